"""Native CPU kernels (XLA FFI), compiled on first use with the system C++ compiler.

One kernel today: ``add_product(X, G, R) = X + G @ R`` accumulated in place by
BLAS ``gemm`` with ``beta = 1`` (source: ``kronjax/csrc/add_product.cc``). XLA
CPU computes the same expression as a product into a temporary followed by a
separate add pass over ``X`` that one core runs; for a 16-member sweep at
m = 1024, n = 512, batch 32 that pass was about a third of the step
(``experiments/bench_sweep.py``). The kernel runs every member's gemm in one
call, reading and writing each member's ``X`` once. When under 10 % of ``G``'s
entries are nonzero (the coefficients of inactive neurons are exact zeros) it
skips them instead: one axpy per nonzero, exact for finite ``R``.

Nothing is built at install time. The first trace that needs the kernel
compiles ``add_product.cc`` against jaxlib's FFI headers (``jax.ffi.include_dir``)
into a cache directory, keyed by the source, the jaxlib version, the
compiler and the machine, and loads it; later processes reuse the file. The gemm itself is
scipy's (``scipy.linalg.cython_blas``; scipy is a dependency of jax), so nothing
links against a BLAS.

Environment:
  * ``KRONJAX_NATIVE``: ``auto`` (default: use the kernel where it builds, else
    fall back to XLA with one warning), ``off`` (never; XLA only), ``require``
    (raise ``RuntimeError`` when it cannot be built).
  * ``KRONJAX_CACHE_DIR``: where the built library goes (default
    ``$XDG_CACHE_HOME/kronjax`` or ``~/.cache/kronjax``).
  * ``CXX``: the compiler (default ``c++``, then ``g++``).

The choice is made once per process: set the variables before the first step.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Any

import jax
import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parent / "csrc" / "add_product.cc"
MODES = ("auto", "off", "require")
_TARGETS = {np.dtype(np.float32): "kronjax_add_product_f32",
            np.dtype(np.float64): "kronjax_add_product_f64"}

_lock = threading.Lock()
_state: dict[str, Any] = {}   # filled once by _load(): available, reason, library, handle


def mode() -> str:
  """``KRONJAX_NATIVE`` as one of ``MODES`` (a bad value is a ``ValueError``)."""
  value = os.environ.get("KRONJAX_NATIVE", "auto").strip().lower()
  value = {"1": "require", "on": "require", "0": "off", "": "auto"}.get(value, value)
  if value not in MODES:
    raise ValueError(f"KRONJAX_NATIVE must be one of {MODES} (or 1/0), got "
                     f"{os.environ['KRONJAX_NATIVE']!r}.")
  return value


def cache_dir() -> pathlib.Path:
  """Where built libraries live: ``KRONJAX_CACHE_DIR``, else the user cache."""
  if os.environ.get("KRONJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["KRONJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "kronjax"


def _compiler() -> str | None:
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  return shutil.which("c++") or shutil.which("g++")


def _build(cxx: str) -> pathlib.Path:
  """Compiles the kernel into the cache (atomically; reuses an existing build)."""
  import jaxlib  # the FFI headers and the ABI come with jaxlib

  source = SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), cxx.encode(),
                                    platform.machine().encode()])).hexdigest()[:16]
  target = cache_dir() / f"kronjax_native_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
         str(SOURCE), "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, target)  # atomic: a concurrent process sees all of it or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


def _capsule_pointer(capsule: Any) -> int:
  # Own prototypes: setting restype on ctypes.pythonapi's shared entries would
  # change them for every other user in the process.
  name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
      ("PyCapsule_GetName", ctypes.pythonapi))
  pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
      ("PyCapsule_GetPointer", ctypes.pythonapi))
  return pointer(capsule, name(capsule))


def _load() -> dict[str, Any]:
  """Builds, loads and registers the kernel once per process; never raises."""
  with _lock:
    if _state:
      return _state
    if mode() == "off":
      _state.update(available=False, reason="KRONJAX_NATIVE=off", library=None)
      return _state
    try:
      cxx = _compiler()
      if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
      library = _build(cxx)
      from scipy.linalg import cython_blas  # pylint: disable=import-outside-toplevel
      handle = ctypes.CDLL(str(library))
      handle.kronjax_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
      handle.kronjax_set_blas(_capsule_pointer(cython_blas.__pyx_capi__["sgemm"]),
                              _capsule_pointer(cython_blas.__pyx_capi__["dgemm"]))
      for target in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)),
                                    platform="cpu")
      _state.update(available=True, reason=None, library=str(library), handle=handle)
    except Exception as e:  # noqa: BLE001 -- any failure means: fall back to XLA
      _state.update(available=False, reason=f"{type(e).__name__}: {e}", library=None)
    return _state


def available(warn: bool = True) -> bool:
  """Whether the native kernel is in use (building it on the first call).

  With ``KRONJAX_NATIVE=require`` a failed build raises ``RuntimeError``; with
  ``auto`` it warns once (if ``warn``) and returns False (callers then use XLA).
  """
  state = _load()
  if not state["available"] and mode() == "require":
    raise RuntimeError(f"KRONJAX_NATIVE=require but the native kernel is unavailable: "
                       f"{state['reason']}")
  if not state["available"] and mode() == "auto" and warn and not state.get("warned"):
    state["warned"] = True
    warnings.warn(f"kronjax: native CPU kernel unavailable ({state['reason']}); using XLA's "
                  "product and add instead (exact, slower). Set KRONJAX_NATIVE=off to silence.",
                  RuntimeWarning, stacklevel=2)
  return bool(state["available"])


def info() -> dict[str, Any]:
  """``{"mode", "available", "library", "reason"}`` for logs and benchmark JSON."""
  state = _load()
  return {"mode": mode(), "available": bool(state["available"]), "library": state["library"],
          "reason": state["reason"]}


def supports(X: jax.Array, G: jax.Array, R: jax.Array) -> bool:
  """Whether the kernel takes these dtypes: ``X``, ``G``, ``R`` all float32 or all float64."""
  dtype = np.dtype(X.dtype)
  return dtype in _TARGETS and G.dtype == dtype and R.dtype == dtype


def add_product(X: jax.Array, G: jax.Array, R: jax.Array) -> jax.Array:
  """``X + G @ R`` in place on CPU: ``X (..., r, c)``, ``G (..., r, k)``, ``R (..., k, c)``.

  Each leading dimension of ``G`` and ``R`` equals ``X``'s or is 1 (broadcast
  without a copy). The result aliases ``X``: donate it (or let it be a loop
  carry) and no copy is made. CPU only; call ``available()`` first and check
  ``supports``. Under ``jax.vmap`` every operand gets the batch axis (XLA
  materializes the broadcast of unbatched ones).
  """
  if not supports(X, G, R) or X.ndim < 2 or G.ndim != X.ndim or R.ndim != X.ndim:
    raise TypeError(f"native.add_product needs one float32/float64 dtype and equal ranks >= 2, "
                    f"got X {X.dtype}{X.shape}, G {G.dtype}{G.shape}, R {R.dtype}{R.shape}.")
  call = jax.ffi.ffi_call(_TARGETS[np.dtype(X.dtype)], jax.ShapeDtypeStruct(X.shape, X.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")
  return call(X, G, R)

