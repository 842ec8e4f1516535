"""Arrays in files: ``.npz`` written atomically, arrays and PRNG keys stored with their dtype.

Used by ``kronjax.network`` (a trained network is one ``.npz``) and by the checkpoints'
JSON metadata.
"""

from __future__ import annotations

import base64
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np



def write_npz_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes ``arrays`` as ``path`` (.npz): to a temporary file in the same folder,
  flushed and fsynced, then renamed over ``path``; a crash leaves the old file or
  the new one, never half a file."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  _fsync_dir(path.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def put_array(arrays: dict, name: str, value: Any) -> dict[str, Any]:
  """Stores ``value`` under ``name``; returns its manifest entry (dtype, shape, prng_impl)."""
  impl = None
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(value))
    value = jax.random.key_data(value)
  arr = np.asarray(jax.device_get(value))
  dtype = arr.dtype
  if not dtype.isbuiltin:  # bfloat16 & co: npz cannot describe them, store the raw bits
    arr = arr.view(np.dtype(f"u{dtype.itemsize}"))
  arrays[name] = arr
  return {"dtype": dtype.name, "shape": list(arr.shape), "prng_impl": impl}


def get_array(npz: Any, entry: dict[str, Any]) -> np.ndarray | jax.Array:
  """The array ``put_array`` stored: numpy with its saved dtype (never narrowed
  to JAX's default precision), or a typed PRNG key."""
  arr = npz[entry["name"]]
  dtype = jnp.dtype(entry["dtype"])
  if arr.dtype != dtype:
    arr = arr.view(dtype)
  if list(arr.shape) != list(entry["shape"]):
    raise ValueError(f"array {entry['name']} has shape {arr.shape}, manifest says {entry['shape']}")
  if entry.get("prng_impl"):
    return jax.random.wrap_key_data(jnp.asarray(arr), impl=entry["prng_impl"])
  return arr


def array_to_json(arr: np.ndarray) -> dict[str, Any]:
  arr = np.ascontiguousarray(arr)
  return {"dtype": arr.dtype.str, "shape": list(arr.shape),
          "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def array_from_json(obj: dict[str, Any]) -> np.ndarray:
  raw = base64.b64decode(obj["data"].encode("ascii"), validate=True)
  return np.frombuffer(raw, np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
