"""Atomic checkpoints of a whole ``TrainState`` (``save``) and their refusal-checked restore (``load``).

A checkpoint is one ``.npz`` file, ``<directory>/ckpt-<step>.npz``, holding

* every array leaf of the state (``P``, ``A``, ``a``, ``b``, the optimizer and
  index states, the key, the step; never the dataset), with its
  dtype (typed PRNG keys are stored as their key data plus the implementation
  name; extension dtypes such as bfloat16 as raw bits plus the dtype name);
* a JSON manifest: the static ``Config`` (``dataclasses.asdict``), the index
  kind, a description of the optimizer (the structure of its state; an optax
  transformation is a pair of closures and cannot be serialized reliably), the
  pytree path, shape and dtype of every leaf, the fingerprint of the dataset
  the state was built from, and the caller's ``metadata`` (JSON values and arrays).

``save`` writes to a temporary file in the same directory, flushes and fsyncs
it, and renames it over the final name (``os.replace``), so a process killed at
any moment leaves either the previous checkpoint or the new one, never half a
file. It keeps the latest ``keep`` checkpoints (default 2: the latest and one
before it) and deletes older ones. Saving step ``s`` also deletes checkpoints of
steps after ``s``: they belong to a trajectory abandoned by resuming from an
older checkpoint, and would otherwise be what the next ``load`` restores.

``load(directory, like=state)`` needs a freshly initialized state built with the
same dataset, config and ``tx`` (the optimizer cannot be restored from the
file, so the caller passes it again through ``like``). The checkpoint's config
may differ from ``like.config`` in settings ``kronjax.with_config`` may change
(capacities grown by an overflow replay, index kind, update path): the state is
restored under the checkpoint's config. A checkpoint that is corrupt (truncated,
not a zip, missing arrays, bad manifest) or that does not match ``like``
(network settings, data fingerprint, optimizer state structure, shapes, dtypes)
is refused with a ``ValueError`` that says what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.state import TrainState, with_config

FORMAT = "kronjax-checkpoint"
VERSION = 2  # v1 (earlier kronjax) stored the dataset inside the state
_MANIFEST = "__manifest__"
_NAME = re.compile(r"^ckpt-(\d{10})\.npz$")
# Settings that define the network (or the state's pytree): a checkpoint must agree on them.
FIXED_CONFIG = ("width", "threshold", "loss", "num_classes", "init", "init_rank", "train_output")


class _Outdated(Exception):
  pass


def checkpoint_path(directory: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(directory) / f"ckpt-{int(step):010d}.npz"


def steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the checkpoints in ``directory``, ascending (empty when there are none)."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    return []
  found = []
  for entry in path.iterdir():
    match = _NAME.match(entry.name)
    if match:
      found.append(int(match.group(1)))
  return sorted(found)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The step of the newest checkpoint in ``directory``, or None."""
  found = steps(directory)
  return found[-1] if found else None


# ----------------------------------------------------------------------------- save


def save(directory: str | os.PathLike, state: TrainState, metadata: dict | None = None, *,
         keep: int = 2) -> pathlib.Path:
  """Saves ``state`` (and ``metadata``) atomically as ``directory/ckpt-<step>.npz``.

  Args:
    directory: created if missing.
    state: the ``TrainState`` to save (on any device; copied to host).
    metadata: a dict of JSON values (str keys, numbers, strings, lists, dicts)
      and arrays (numpy or jax, PRNG keys included); returned by ``load``.
      Tuples come back as lists.
    keep: how many checkpoints to keep, newest first (older ones are deleted,
      and so are any of steps after ``state.step``: see the module docstring).

  Returns:
    The path of the written file.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep must be an int >= 1, got {keep!r}.")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)

  arrays: dict[str, np.ndarray] = {}
  leaves = []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
    name = f"leaf_{i:04d}"
    leaves.append({"path": jax.tree_util.keystr(path), "name": name,
                   **put_array(arrays, name, leaf)})
  step = int(np.asarray(state.step))
  manifest = {
      "format": FORMAT, "version": VERSION, "step": step,
      "config": dataclasses.asdict(state.config), "index_kind": state.index_kind,
      "shape_free_tx": bool(state.shape_free_tx), "tx": describe_tx(state),
      "data_fingerprint": state.fingerprint, "leaves": leaves,
      "metadata": _encode(metadata, arrays, "metadata"),
  }
  arrays[_MANIFEST] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)

  final = checkpoint_path(directory, step)
  write_npz_atomically(final, arrays)
  # Checkpoints of later steps belong to a trajectory that was abandoned (a run
  # resumed from an older checkpoint): left in place, they would shadow this one
  # in ``latest_step`` and ``load``, and a resume would jump back onto them.
  found = steps(directory)
  stale = [s for s in found if s > step]
  current = [s for s in found if s <= step]
  for old in stale + current[:-keep]:
    checkpoint_path(directory, old).unlink(missing_ok=True)
  return final


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


def _encode(obj: Any, arrays: dict, where: str) -> Any:
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, np.generic) and obj.ndim == 0 and obj.dtype.isbuiltin:
    return obj.item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    name = f"meta_{sum(k.startswith('meta_') for k in arrays):04d}"
    return {"__ndarray__": name, **put_array(arrays, name, obj)}
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"{where} keys must be str, got {k!r}.")
      out[k] = _encode(v, arrays, f"{where}[{k!r}]")
    return out
  if isinstance(obj, (list, tuple)):
    return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
  raise TypeError(f"{where} is a {type(obj).__name__}; checkpoint metadata holds JSON values "
                  "(numbers, strings, lists, dicts) and arrays only.")


def _decode(obj: Any, npz: Any) -> Any:
  if isinstance(obj, dict):
    if "__ndarray__" in obj:
      return get_array(npz, {**obj, "name": obj["__ndarray__"]})
    return {k: _decode(v, npz) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, npz) for v in obj]
  return obj


def describe_tx(state: TrainState) -> dict[str, Any]:
  """What identifies the optimizer in a checkpoint: the structure of its state.

  The transformation itself (closures) is not saved; ``load`` takes it from ``like``.
  """
  return {"opt_state_structure": str(jax.tree.structure(state.opt_state)),
          "opt_state_shapes": [list(np.shape(x)) for x in jax.tree.leaves(state.opt_state)]}


# ----------------------------------------------------------------------------- load


def load(directory: str | os.PathLike, *, like: TrainState,
         step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Restores the checkpoint of ``step`` (default: the latest) in ``directory``.

  Args:
    directory: where ``save`` wrote.
    like: a state from ``kronjax.init`` with the same data, labels, eval data,
      config (up to capacities / index / update path) and optimizer ``tx`` as the
      saved one. Its arrays are not used, only its structure, ``tx`` and data
      fingerprint.
    step: load this step's checkpoint instead of the latest.

  Returns:
    ``(state, metadata)``: the saved state under the saved config (grown
    capacities included), and the ``metadata`` given to ``save``.

  Raises:
    FileNotFoundError: no checkpoint in ``directory`` (or none for ``step``).
    ValueError: the checkpoint is corrupt, or does not match ``like``.
  """
  if not isinstance(like, TrainState):
    raise TypeError(f"like must be a kronjax.TrainState (a freshly initialized state), "
                    f"got {type(like).__name__}.")
  directory = pathlib.Path(directory)
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f"no checkpoint (ckpt-<step>.npz) in {str(directory)!r}.")
  path = checkpoint_path(directory, step)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint for step {step} in {str(directory)!r}; "
                            f"available steps: {steps(directory)}.")
  try:
    raw = path.read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      manifest = json.loads(bytes(npz[_MANIFEST]).decode())
      if manifest.get("format") == FORMAT and manifest.get("version") == 1:
        raise _Outdated(f"checkpoint {str(path)!r} was written by an earlier kronjax (format v1, "
                        "which stored the dataset inside the state); this kronjax reads v2. "
                        "Train again, or load it with the kronjax that wrote it.")
      if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} v{VERSION} file (format={manifest.get('format')!r}, "
                         f"version={manifest.get('version')!r})")
      for field in ("step", "config", "index_kind", "data_fingerprint", "leaves", "metadata"):
        if field not in manifest:
          raise KeyError(f"manifest field {field!r}")
      leaves = [get_array(npz, entry) for entry in manifest["leaves"]]
      metadata = _decode(manifest["metadata"], npz)
  except _Outdated as e:
    raise ValueError(str(e)) from None
  except (zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, OSError,
          UnicodeDecodeError) as e:
    raise ValueError(
        f"checkpoint {str(path)!r} is corrupt or incomplete ({type(e).__name__}: {e}). "
        "Delete it to fall back to the previous checkpoint, or start the run again.") from e

  state = _matching_like(like, manifest, path)
  paths_and_like = jax.tree_util.tree_flatten_with_path(state)
  like_leaves, treedef = [x for _, x in paths_and_like[0]], paths_and_like[1]
  like_paths = [jax.tree_util.keystr(p) for p, _ in paths_and_like[0]]
  saved_paths = [entry["path"] for entry in manifest["leaves"]]
  if like_paths != saved_paths:
    missing = sorted(set(saved_paths) ^ set(like_paths))
    raise ValueError(
        f"checkpoint {str(path)!r} does not match `like`: their states have different "
        f"structures (leaves only in one of them: {missing[:6]}). The optimizer state "
        f"{manifest.get('tx', {}).get('opt_state_structure')!r} was saved; build `like` with "
        "the same tx, config, data and eval data as the saved run.")
  for p, want, got in zip(like_paths, like_leaves, leaves):
    if tuple(np.shape(want)) != tuple(got.shape) or want.dtype != got.dtype:
      raise ValueError(
          f"checkpoint {str(path)!r} does not match `like` at {p}: saved "
          f"{got.dtype}{list(got.shape)}, `like` has {want.dtype}{list(np.shape(want))}. "
          "Build `like` with the same config, data shapes, dtype and tx as the saved run.")
  restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
  if int(restored.step) != manifest["step"]:
    raise ValueError(f"checkpoint {str(path)!r} is corrupt: its file name and manifest say step "
                     f"{manifest['step']}, its state says step {int(restored.step)}.")
  return restored, metadata


def _matching_like(like: TrainState, manifest: dict, path: pathlib.Path) -> TrainState:
  """``like`` under the checkpoint's config, after checking they describe the same run."""
  saved = manifest["config"]
  current = dataclasses.asdict(like.config)
  if set(saved) != set(current):
    raise ValueError(f"checkpoint {str(path)!r} was written by a kronjax with different Config "
                     f"fields ({sorted(set(saved) ^ set(current))}); it cannot be restored.")
  for name in FIXED_CONFIG:
    if saved[name] != current[name]:
      raise ValueError(
          f"checkpoint {str(path)!r} does not match `like`: config.{name} is {saved[name]!r} in "
          f"the checkpoint and {current[name]!r} in `like`. Build `like` with the saved run's config.")
  saved_fp = manifest["data_fingerprint"]
  if saved_fp is not None and like.fingerprint is not None and saved_fp != like.fingerprint:
    raise ValueError(
        f"checkpoint {str(path)!r} was saved for another dataset: the fingerprint of its "
        "training/eval factors and labels differs from `like`'s. Build `like` with "
        "kronjax.init from the same kronjax.Dataset as the saved run.")
  saved_tx = manifest.get("tx", {}).get("opt_state_structure")
  if saved_tx is not None and saved_tx != describe_tx(like)["opt_state_structure"]:
    raise ValueError(
        f"checkpoint {str(path)!r} was saved with a different optimizer: its optimizer state is "
        f"{saved_tx}, `like`'s is {describe_tx(like)['opt_state_structure']}. Pass the same tx "
        "(optax transformations cannot be stored in a checkpoint).")
  changes = {k: v for k, v in saved.items() if v != current[k]}
  state = with_config(like, **changes) if changes else like
  if state.index_kind != manifest["index_kind"]:
    raise ValueError(f"checkpoint {str(path)!r} used threshold index {manifest['index_kind']!r}, "
                     f"but its config resolves to {state.index_kind!r} here.")
  return state
