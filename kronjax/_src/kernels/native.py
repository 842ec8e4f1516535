"""Native CPU kernels (XLA FFI), built once with the system C++ compiler.

Kernels (sources in ``kronjax/_src/kernels/csrc/``, built into one library):

* ``add_product(X, G, R) = X + G @ R`` accumulated in place by BLAS ``gemm``
  with ``beta = 1``, and ``add_product_t`` for ``G`` given transposed
  (``add_product.cc``);
* the dense step's work on the batch's rows (``rows.cc``): ``take_rows`` and
  ``add_rows`` (``X[..., idx, :]`` read, and added to in place), ``relu_rows``
  (the hidden layer's output ``relu(X[idx] - b) @ a`` and active count) and
  ``relu_rows_grad`` (the coefficients ``where(X[idx] > b, g @ a^T, 0)``), each
  reading a row once and splitting the rows over XLA's intra-op threads
  (``parallel.h``). Why: ``kronjax._src.kernels.rows``.

About ``add_product``: XLA CPU computes the same expression as a product into
a temporary followed by a separate add pass over ``X`` that one core runs (a
large part of a vmapped sweep's step: the performance page). The kernel runs every member's
gemm in one call, reading and writing each member's ``X`` once. When under
10 % of ``G``'s entries are nonzero (the coefficients of inactive neurons are
exact zeros) it skips them instead: one axpy per nonzero, exact for finite ``R``.

Threads: every kernel splits its work over XLA's intra-op pool size (the caller
included; ``pool_threads``), in chunks taken one at a time, waiting without
spinning (``csrc/parallel.h``). ``add_product`` cuts ``X`` into pieces along its
longer side, each a single-threaded gemm, with BLAS set to one thread while it
runs: BLAS's own threads split a gemm statically and spin while they wait for
each other, which beside one busy process made a 1.5 ms step take 16-32 ms
(``experiments/bench_contention.py``). ``set_max_threads`` caps the threads and
``set_blas_split(False)`` hands the gemm back to BLAS's threads, for benchmarks.

Building: ``make native`` (``native.main()``; also ``python -m kronjax._src.kernels.native``)
compiles the sources (~13 s) against jaxlib's FFI headers
(``jax.ffi.include_dir``) into a cache directory, keyed by the sources, the
flags, the jaxlib version, the compiler and the machine, and prints the
compiler's command and warnings. Otherwise the first ``import kronjax`` of a
process that finds no build compiles it (``prepare``), saying so on stderr first;
later processes reuse the file. Nothing is built or loaded while JAX traces a
function: tracing only asks ``available()``, which reads what ``prepare`` found.
``prepare`` does not initialize a JAX backend (``jax.distributed.initialize`` may
still follow the import); the kernels are used only when the default backend
turns out to be the CPU. Without a C++ compiler kronjax runs on XLA only (one
warning). The gemm itself is scipy's
(``scipy.linalg.cython_blas``; scipy is a dependency of jax), so nothing links
against a BLAS.

Whether an op calls a kernel is decided in ``kronjax._src.kernels.dispatch`` (which also
has the programmatic on/off switch).

Environment:
  * ``KRONJAX_NATIVE``: ``auto`` (default: use the kernels where they build, else
    fall back to XLA with one warning), ``off`` (never; XLA only), ``require``
    (raise ``RuntimeError`` when they cannot be built).
  * ``KRONJAX_CACHE_DIR``: where the built library goes (default
    ``$XDG_CACHE_HOME/kronjax`` or ``~/.cache/kronjax``).
  * ``CXX``: the compiler (default ``c++``, then ``g++``).

The library is loaded once per process, at the first import: set the variables before it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import numpy as np

_CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = (_CSRC / "add_product.cc", _CSRC / "rows.cc")
HEADERS = (_CSRC / "parallel.h",)
# -fno-trapping-math lets a masked select vectorize (nothing here reads FP exception flags).
# jaxlib's headers come in with -isystem: -Wall reports warnings in kronjax's own code only.
FLAGS = ("-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-Wall")
MODES = ("auto", "off", "require")
KERNELS = ("add_product", "add_product_t", "trace_product", "trace_product_t", "take_rows",
           "take_cols", "add_rows", "add_rows_product", "relu_rows", "relu_rows_grad")
POOL_THREADS = "kronjax_pool_threads"  # a probe: the threads the row kernels split over
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

NO_COMPILER = ("no C++ compiler found: kronjax runs on XLA only; install g++ (apt-get install g++) "
               "and run `make native` to build the CPU kernels")
BUILDING = ("kronjax: building native CPU kernels (one time, ~15 s); "
            "run `make native` ahead of time")


class BuildError(RuntimeError):
  """The compiler failed; the message has its command and output."""


class Build(NamedTuple):
  """What ``build`` did."""
  library: pathlib.Path   # the built library in the cache
  compiled: bool          # False: the cache had it already
  command: tuple[str, ...]  # the compiler command run (empty when not compiled)
  output: str             # the compiler's warnings (empty when not compiled)


class Status(NamedTuple):
  """This process's kernels: loaded, or why not."""
  available: bool
  reason: str | None      # why not available; None when available
  library: str | None     # the loaded library's path
  failed: bool            # a failure (warned about, or raised under ``require``), not a choice


class HiddenRows(NamedTuple):
  """The hidden layer on a batch's rows (``relu_rows``)."""
  raw: jax.Array          # relu(X[idx] - b) @ a, (..., B, C): the unscaled outputs
  active: jax.Array       # #(X[idx] > b) per row, (..., B), in X's dtype


_lock = threading.Lock()
_status: Status | None = None   # set once by prepare()
_build: Build | None = None     # what prepare() built or found in this process
_warned = False
_handles: list[ctypes.CDLL] = []  # the loaded libraries, kept for the process's lifetime


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


def compiler() -> str | None:
  """The C++ compiler: ``CXX``, else ``c++`` or ``g++`` on the path; None if there is none."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  return shutil.which("c++") or shutil.which("g++")


def library_path(cxx: str) -> pathlib.Path:
  """Where the build with compiler ``cxx`` goes in the cache (whether or not it is there)."""
  import jaxlib  # the FFI headers and the ABI come with jaxlib

  sources = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
  key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                    cxx.encode(), platform.machine().encode()])).hexdigest()[:16]
  return cache_dir() / f"kronjax_native_{key}.so"


def build(cxx: str, *, rebuild: bool = False, announce: bool = False) -> Build:
  """Compiles the kernels with ``cxx`` into the cache, unless it has them (or ``rebuild``).

  Atomic: the library appears whole or not at all, so concurrent processes may
  build at once. ``announce`` prints ``BUILDING`` to stderr before compiling.
  Raises ``BuildError`` when the compiler cannot run or fails.
  """
  target = library_path(cxx)
  if target.exists() and not rebuild:
    return Build(target, False, (), "")
  if announce:
    print(BUILDING, file=sys.stderr, flush=True)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = (cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp)
  try:
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
      raise BuildError(f"`{shlex.join(cmd)}` could not run: {e}") from e
    if done.returncode != 0:
      raise BuildError(f"`{shlex.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, target)  # atomic: a concurrent process sees all of it or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return Build(target, True, cmd, done.stdout + done.stderr)


def _capsule_pointer(capsule: Any) -> int:
  # Own prototypes: setting restype on ctypes.pythonapi's shared entries would
  # change them for every other user in the process.
  name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
      ("PyCapsule_GetName", ctypes.pythonapi))
  pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
      ("PyCapsule_GetPointer", ctypes.pythonapi))
  return pointer(capsule, name(capsule))


# The thread-count setter and getter of the BLAS behind scipy's gemm: scipy's
# wheels ship OpenBLAS with its symbols prefixed ``scipy_``; other builds, plain.
BLAS_THREADS = (("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                ("openblas_set_num_threads", "openblas_get_num_threads"))


def _blas_threads(cython_blas: Any) -> tuple[int | None, int | None]:
  """Addresses of the thread-count functions of the BLAS scipy's gemm calls, or
  ``(None, None)``: looked up from scipy's BLAS wrapper module, whose dependencies
  include the BLAS library."""
  try:
    wrapper = ctypes.CDLL(cython_blas.__file__)
  except OSError:
    return None, None
  for setter, getter in BLAS_THREADS:
    try:
      return (ctypes.cast(getattr(wrapper, setter), ctypes.c_void_p).value,
              ctypes.cast(getattr(wrapper, getter), ctypes.c_void_p).value)
    except AttributeError:
      continue
  return None, None


def _register(library: pathlib.Path) -> None:
  """Loads the library, hands it scipy's gemm (and its BLAS's thread-count functions)
  and registers its FFI targets with XLA."""
  from scipy.linalg import cython_blas  # pylint: disable=import-outside-toplevel
  handle = ctypes.CDLL(str(library))
  _handles.append(handle)
  handle.kronjax_set_blas.argtypes = [ctypes.c_void_p] * 4
  handle.kronjax_set_blas(_capsule_pointer(cython_blas.__pyx_capi__["sgemm"]),
                          _capsule_pointer(cython_blas.__pyx_capi__["dgemm"]),
                          *_blas_threads(cython_blas))
  handle.kronjax_set_max_threads.argtypes = [ctypes.c_int]
  handle.kronjax_set_max_threads.restype = ctypes.c_int
  for target in (*_targets(), POOL_THREADS):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)), platform="cpu")


def _try_load() -> Status:
  if mode() == "off":
    return Status(False, "KRONJAX_NATIVE=off", None, failed=False)
  cxx = compiler()
  if cxx is None:
    return Status(False, NO_COMPILER, None, failed=True)
  global _build
  try:
    _build = build(cxx, announce=True)
    library = _build.library
    _register(library)
  except Exception as e:  # noqa: BLE001 -- any failure means: fall back to XLA
    return Status(False, f"native CPU kernels unavailable ({type(e).__name__}: {e}); kronjax "
                  "runs on XLA only (exact, slower)", None, failed=True)
  return Status(True, None, str(library), failed=False)


def prepare() -> Status:
  """Builds (if the cache lacks it), loads and registers the library, once per process.

  Called by the first ``import kronjax``, never while tracing; never raises
  (``available`` reports a failure). Initializes no JAX backend.
  """
  global _status
  with _lock:
    if _status is None:
      _status = _try_load()
    return _status


def available(warn: bool = True) -> bool:
  """Whether the native kernels are in use: ``prepare`` loaded them and JAX's default
  backend is the CPU. Builds nothing (safe while tracing).

  False with ``KRONJAX_NATIVE=off`` and on other backends. When they could not be
  built: with ``KRONJAX_NATIVE=require`` a ``RuntimeError``; with ``auto`` one
  warning per process (if ``warn``) and False (callers then use XLA).
  """
  global _warned
  status = _status if _status is not None else Status(
      False, "the native kernels were not prepared (kronjax._src.kernels.native.prepare)", None,
      failed=False)
  if status.failed and mode() == "require":
    raise RuntimeError(f"KRONJAX_NATIVE=require but the native kernels are unavailable: "
                       f"{status.reason}")
  if status.failed and mode() == "auto" and warn and not _warned:
    _warned = True
    warnings.warn(f"kronjax: {status.reason}. KRONJAX_NATIVE=off silences this.",
                  RuntimeWarning, stacklevel=2)
  return status.available and jax.default_backend() == "cpu"


def info() -> dict[str, Any]:
  """``{"mode", "available", "library", "reason"}`` for logs and benchmark JSON."""
  status = prepare()
  on_cpu = jax.default_backend() == "cpu"
  return {"mode": mode(), "available": status.available and on_cpu, "library": status.library,
          "reason": status.reason if on_cpu else
          f"JAX's default backend is {jax.default_backend()}; the native kernels are CPU-only"}


def pool_threads() -> int:
  """How many threads the row kernels split their rows over in this process (XLA's
  intra-op pool, the caller included; ``PJRT_NPROC`` sets it). Needs ``available()``."""
  call = jax.ffi.ffi_call(POOL_THREADS, jax.ShapeDtypeStruct((), np.int32))
  return int(jax.jit(call)())


def _library() -> ctypes.CDLL:
  if not _handles:
    raise RuntimeError("the native kernels are not loaded: check native.available() first")
  return _handles[-1]


def set_max_threads(threads: int) -> int:
  """Caps the threads every kernel call splits its work over (the caller included)
  at ``threads``; 0 lifts the cap (XLA's intra-op pool size, ``pool_threads``).
  Returns the previous cap. Process-wide and read when a kernel runs, so compiled
  steps pick it up without retracing (for benchmarks comparing thread counts)."""
  if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
    raise ValueError(f"threads must be an int >= 0 (0: XLA's pool size), got {threads!r}.")
  return int(_library().kronjax_set_max_threads(threads))


@contextlib.contextmanager
def max_threads(threads: int) -> Iterator[None]:
  """``set_max_threads(threads)`` inside the block, the previous cap after it."""
  previous = set_max_threads(threads)
  try:
    yield
  finally:
    set_max_threads(previous)


def blas_split() -> bool:
  """Whether ``add_product`` splits its gemm over XLA's threads itself (single-threaded
  BLAS calls on pieces taken one at a time), which needs the BLAS's thread-count
  functions; else each member's gemm is one call that BLAS threads on its own."""
  return bool(_library().kronjax_blas_split())


def set_blas_split(flag: bool) -> bool:
  """Turns ``add_product``'s own split off (``False``: each member's gemm is one BLAS
  call on BLAS's threads; for benchmarks) or back on; returns the previous setting.
  Process-wide, read when a kernel runs (no retrace)."""
  if not isinstance(flag, bool):
    raise TypeError(f"flag must be a bool, got {type(flag).__name__} {flag!r}.")
  return bool(_library().kronjax_set_blas_split(int(flag)))


def _targets() -> list[str]:
  return [f"kronjax_{kernel}_{suffix}" for kernel in KERNELS for suffix in _SUFFIX.values()]


def _target(kernel: str, dtype: Any) -> str:
  return f"kronjax_{kernel}_{_SUFFIX[np.dtype(dtype)]}"


def supports(X: jax.Array, G: jax.Array, R: jax.Array) -> bool:
  """Whether ``add_product`` takes these dtypes: ``X``, ``G``, ``R`` all float32 or all float64."""
  dtype = np.dtype(X.dtype)
  return dtype in _SUFFIX and G.dtype == dtype and R.dtype == dtype


def supports_rows(X: jax.Array, idx: jax.Array, U: jax.Array | None = None) -> bool:
  """Whether ``take_rows`` / ``add_rows`` take these operands: ``X`` (and ``U``)
  float32 or float64 of rank >= 2 (``U`` of ``X``'s rank and dtype), ``idx`` int32 of rank 1."""
  ok = (np.dtype(X.dtype) in _SUFFIX and X.ndim >= 2 and idx.ndim == 1
        and np.dtype(idx.dtype) == np.dtype(np.int32))
  return ok and (U is None or (U.dtype == X.dtype and U.ndim == X.ndim))


def add_product(X: jax.Array, G: jax.Array, R: jax.Array, *, transpose_g: bool = False) -> jax.Array:
  """``X + G @ R`` in place on CPU: ``X (..., r, c)``, ``G (..., r, k)``, ``R (..., k, c)``.

  With ``transpose_g``, ``G`` is given transposed, ``(..., k, r)``, and the
  result is ``X + G^T @ R`` (BLAS reads it transposed; no copy).

  Each leading dimension of ``G`` and ``R`` equals ``X``'s or is 1 (broadcast
  without a copy). The result aliases ``X``: donate it (or let it be a loop
  carry) and no copy is made. CPU only; call ``available()`` first and check
  ``supports``. Under ``jax.vmap`` every operand gets the batch axis (XLA
  materializes the broadcast of unbatched ones).
  """
  if not supports(X, G, R) or X.ndim < 2 or G.ndim != X.ndim or R.ndim != X.ndim:
    raise TypeError(f"native.add_product needs one float32/float64 dtype and equal ranks >= 2, "
                    f"got X {X.dtype}{X.shape}, G {G.dtype}{G.shape}, R {R.dtype}{R.shape}.")
  kernel = "add_product_t" if transpose_g else "add_product"
  call = jax.ffi.ffi_call(_target(kernel, X.dtype), jax.ShapeDtypeStruct(X.shape, X.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")
  return call(X, G, R)


def trace_product(X: jax.Array, Y: jax.Array, G: jax.Array, R: jax.Array, coef: jax.Array, *,
                  transpose_g: bool = False) -> tuple[jax.Array, jax.Array]:
  """The momentum step in place on CPU: ``X' = mu X + nu Y + G @ R``, ``Y' = Y + c X'``.

  ``X``, ``Y`` ``(..., r, c)`` (a trace and its array), ``G (..., r, k)`` (``(..., k, r)``
  with ``transpose_g``), ``R (..., k, c)``, ``coef (..., 3)`` the scalars ``(mu, nu, c)``;
  leading dimensions of ``G``, ``R`` and ``coef`` equal ``X``'s or are 1. Each piece of
  ``X`` and ``Y`` is scaled, multiplied into and read back while in cache. The results
  alias ``X`` and ``Y``. CPU only, as ``add_product``.
  """
  if not supports(X, G, R) or Y.dtype != X.dtype or coef.dtype != X.dtype or Y.shape != X.shape \
      or X.ndim < 2 or G.ndim != X.ndim or R.ndim != X.ndim or coef.ndim != X.ndim - 1 \
      or coef.shape[-1] != 3:
    raise TypeError(f"native.trace_product needs one float32/float64 dtype, Y of X's shape and "
                    f"coef (..., 3), got X {X.dtype}{X.shape}, Y {Y.dtype}{Y.shape}, G "
                    f"{G.dtype}{G.shape}, R {R.dtype}{R.shape}, coef {coef.dtype}{coef.shape}.")
  kernel = "trace_product_t" if transpose_g else "trace_product"
  out = jax.ShapeDtypeStruct(X.shape, X.dtype)
  call = jax.ffi.ffi_call(_target(kernel, X.dtype), (out, out),
                          input_output_aliases={0: 0, 1: 1}, vmap_method="broadcast_all")
  return call(X, Y, G, R, coef)


def _gather(kernel: str, name: str, X: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """The ``(..., B, X.shape[axis])`` result of the gather kernel ``kernel`` on ``X`` (called
  ``name`` in the error) and ``idx``, after checking the operands."""
  if not supports_rows(X, idx):
    raise TypeError(f"native.{kernel} needs {name} float32/float64 of rank >= 2 and idx int32 "
                    f"(B,), got {name} {X.dtype}{X.shape}, idx {idx.dtype}{idx.shape}.")
  shape = (*X.shape[:-2], idx.shape[0], X.shape[axis])
  call = jax.ffi.ffi_call(_target(kernel, X.dtype), jax.ShapeDtypeStruct(shape, X.dtype),
                          vmap_method="broadcast_all")
  return call(X, idx)


def take_rows(X: jax.Array, idx: jax.Array) -> jax.Array:
  """``X[..., idx, :]`` on CPU: ``X (..., n, m)``, ``idx (B,)`` int32; returns ``(..., B, m)``.

  Indices as ``X[idx]`` reads them: negative ones count from the end, then
  they are clamped into ``[0, n)``. CPU only; check ``available`` and ``supports_rows``.
  """
  return _gather("take_rows", "X", X, idx, -1)


def take_cols(P: jax.Array, idx: jax.Array) -> jax.Array:
  """``swapaxes(P[..., :, idx], -1, -2)`` on CPU: ``P (..., m, n)``, ``idx (B,)`` int32;
  returns ``(..., B, m)``, the batch's columns of a neuron-major ``P`` as rows.

  Indices as ``take_rows``'s. CPU only; check ``available`` and ``supports_rows``.
  """
  return _gather("take_cols", "P", P, idx, -2)


def add_rows(X: jax.Array, idx: jax.Array, U: jax.Array) -> jax.Array:
  """``X.at[..., idx, :].add(U)`` in place on CPU: ``X (..., n, m)``, ``idx (B,)``
  int32, ``U (..., B, m)`` with ``X``'s leading dimensions; returns ``X``'s shape.

  Indices as ``X.at[idx].add`` reads them: negative ones count from the end, and
  out-of-range ones are dropped; repeated ones accumulate. The result aliases ``X``.
  """
  if (not supports_rows(X, idx, U) or U.shape[:-2] != X.shape[:-2]
      or U.shape[-2:] != (idx.shape[0], X.shape[-1])):
    raise TypeError(f"native.add_rows needs X (..., n, m) and U (..., B, m) of one float dtype and "
                    f"idx int32 (B,), got X {X.dtype}{X.shape}, idx {idx.dtype}{idx.shape}, "
                    f"U {U.dtype}{U.shape}.")
  call = jax.ffi.ffi_call(_target("add_rows", X.dtype), jax.ShapeDtypeStruct(X.shape, X.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")
  return call(X, idx, U)


def add_rows_product(X: jax.Array, T: jax.Array, U: jax.Array, R: jax.Array) -> jax.Array:
  """``X[..., T, :] += U @ R`` in place on CPU: the sparse step's touched rows.

  ``X (..., n, m)``, ``T (..., Tc)`` int32 row ids (out of range: dropped), ``U (..., Tc, B)``,
  ``R (..., B, m)`` with ``X``'s leading dimensions or all 1 (shared); a member's ids unique. Each row is read and
  written once, one axpy per nonzero of its ``U`` row; no ``(Tc, m)`` temporary. The result
  aliases ``X``.
  """
  lead = X.shape[:-2]
  if (np.dtype(X.dtype) not in _SUFFIX or X.ndim < 2 or U.dtype != X.dtype or R.dtype != X.dtype
      or np.dtype(T.dtype) != np.dtype(np.int32) or T.shape[:-1] != lead
      or U.shape != (*lead, T.shape[-1], R.shape[-2]) or R.shape[-1] != X.shape[-1]
      or R.ndim != X.ndim or R.shape[:-2] not in (lead, (1,) * len(lead))):
    raise TypeError(f"native.add_rows_product needs X (..., n, m), T (..., Tc) int32, U (..., Tc, B) "
                    f"and R (..., B, m) of one float dtype, got X {X.dtype}{X.shape}, T "
                    f"{T.dtype}{T.shape}, U {U.dtype}{U.shape}, R {R.dtype}{R.shape}.")
  call = jax.ffi.ffi_call(_target("add_rows_product", X.dtype),
                          jax.ShapeDtypeStruct(X.shape, X.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")
  return call(X, T, U, R)


def _check_hidden(name: str, X: jax.Array, idx: jax.Array, b: jax.Array, a: jax.Array,
                  g: jax.Array | None = None) -> None:
  lead = X.shape[:-2]
  ok = (supports_rows(X, idx) and b.shape == lead and a.shape[:-1] == (*lead, X.shape[-1])
        and a.ndim == X.ndim and b.dtype == X.dtype and a.dtype == X.dtype)
  if g is not None:
    ok = ok and g.shape == (*lead, idx.shape[0], a.shape[-1]) and g.dtype == X.dtype
  if not ok:
    raise TypeError(f"native.{name} needs X (..., n, m), b (...), a (..., m, C)"
                    f"{', g (..., B, C)' if g is not None else ''} of one float dtype and idx "
                    f"int32 (B,), got X {X.dtype}{X.shape}, idx {idx.dtype}{idx.shape}, "
                    f"b {b.dtype}{b.shape}, a {a.dtype}{a.shape}"
                    f"{'' if g is None else f', g {g.dtype}{g.shape}'}.")


def relu_rows(X: jax.Array, idx: jax.Array, b: jax.Array, a: jax.Array) -> HiddenRows:
  """The hidden layer on the batch's rows, on CPU, without materializing it.

  ``X (..., n, m)``, ``idx (B,)`` int32, ``b (...)``, ``a (..., m, C)``; returns
  ``HiddenRows(raw=h @ a (..., B, C), active (..., B))`` for
  ``h = relu(X[..., idx, :] - b)``, with ``active`` the number of entries ``> b``
  per row (in ``X``'s dtype).
  Terms with ``h == 0`` are skipped (exact for finite ``a``). Indices as ``X[idx]``.
  """
  _check_hidden("relu_rows", X, idx, b, a)
  lead, B, C = X.shape[:-2], idx.shape[0], a.shape[-1]
  call = jax.ffi.ffi_call(_target("relu_rows", X.dtype),
                          (jax.ShapeDtypeStruct((*lead, B, C), X.dtype),
                           jax.ShapeDtypeStruct((*lead, B), X.dtype)),
                          vmap_method="broadcast_all")
  return HiddenRows(*call(X, idx, b, a))


def relu_rows_grad(X: jax.Array, idx: jax.Array, b: jax.Array, a: jax.Array,
                   g: jax.Array) -> jax.Array:
  """``where(X[..., idx, :] > b, g @ a^T, 0)`` on CPU: ``(..., B, m)``.

  ``X (..., n, m)``, ``idx (B,)`` int32, ``b (...)``, ``a (..., m, C)``,
  ``g (..., B, C)``: the hidden layer's coefficients for output gradients ``g``.
  """
  _check_hidden("relu_rows_grad", X, idx, b, a, g)
  shape = (*X.shape[:-2], idx.shape[0], X.shape[-1])
  call = jax.ffi.ffi_call(_target("relu_rows_grad", X.dtype), jax.ShapeDtypeStruct(shape, X.dtype),
                          vmap_method="broadcast_all")
  return call(X, idx, b, a, g)


def main(argv: Sequence[str] | None = None) -> int:
  """``make native``: builds the kernels into the cache ahead of the first step.

  Prints the compiler command and its warnings. Exits 0 on success and also
  when there is nothing to build (no compiler: kronjax runs on XLA; a non-CPU
  default backend; ``KRONJAX_NATIVE=off``), 1 when the compiler cannot run or fails.
  """
  parser = argparse.ArgumentParser(prog="python -m kronjax._src.kernels.native",
                                   description="Builds kronjax's native CPU kernels into the cache.")
  parser.add_argument("--rebuild", action="store_true",
                      help="compile again even when the cache has this build")
  args = parser.parse_args(argv)
  if mode() == "off":
    print("kronjax: KRONJAX_NATIVE=off: kronjax runs on XLA only; nothing to build.")
    return 0
  backend = jax.default_backend()
  if backend != "cpu":
    print(f"kronjax: JAX's default backend is {backend}; the native kernels are CPU-only and "
          "would not be used, so nothing is built (JAX_PLATFORMS=cpu builds them).")
    return 0
  cxx = compiler()
  if cxx is None:
    print(NO_COMPILER)
    return 0
  try:
    # The first import of kronjax (this module's package) has prepared the kernels already:
    # report that build when it compiled, else build now (or find the cached one).
    result = (_build if _build is not None and _build.compiled and not args.rebuild
              else build(cxx, rebuild=args.rebuild))
  except BuildError as e:
    print(f"kronjax: building the native CPU kernels failed: {e}", file=sys.stderr)
    return 1
  if result.compiled:
    print(shlex.join(result.command), flush=True)
    if result.output.strip():
      print(result.output.rstrip(), file=sys.stderr, flush=True)
    print(f"kronjax: built the native CPU kernels: {result.library}")
  else:
    print(f"kronjax: the native CPU kernels are built: {result.library} "
          "(--rebuild compiles them again)")
  status = prepare()
  if not status.available:
    print(f"kronjax: {status.reason}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  # The package is imported already (kronjax/__init__): run its copy of this module.
  from kronjax._src.kernels import native as imported  # pylint: disable=import-self
  sys.exit(imported.main())
