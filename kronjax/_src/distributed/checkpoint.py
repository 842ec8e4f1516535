"""Checkpoints of a ``TrainState``, sharded or not: every process writes its own shards.

Format (v4): one directory per step, ``<directory>/ckpt_<step:010d>/``, written
with orbax-checkpoint (``CheckpointManager``) and holding three items:

* ``state``: every array leaf of the state except the threshold index (``P``,
  ``A``, ``a``, ``b``, ``P_eval``, the optimizer state, the key, the step), as
  laid out in memory: a neuron-sharded state is stored *padded* (``m_pad`` rows,
  the never-firing neurons of ``kronjax.sharding`` included), each process
  writing the shards it holds (tensorstore/OCDBT files per process; a
  replicated leaf is written once). Nothing is gathered to one device or host.
* ``index``: the threshold index leaves (per shard, with their leading device
  axis, for a sharded state);
* ``manifest`` (JSON, written by process 0): the network (``Config.identity()``),
  the ``Plan``, the kronjax version, the index kind, a description of the optimizer state (an optax transformation is a pair
  of closures and cannot be stored), the dataset fingerprint, the width ``m``,
  the stored rows ``m_pad`` and device count, the path, shape, dtype and neuron
  axis of every leaf, and the caller's ``metadata`` (JSON values, and arrays
  stored as base64 with their dtype: float64 histories stay float64, PRNG keys
  stay keys). Never the dataset.

Arrays are stored uncompressed: zstd (orbax's default) barely shrinks a float32
training state and makes saving and restoring slower (``experiments/bench_checkpoint.py``,
"compression"; the performance page). Nothing checksums the array files: a
missing, truncated or unreadable file is detected, a flipped bit inside one is not.

Saving (``save``, or a ``Manager`` for a run): orbax writes the step into
``ckpt_<step>.orbax-checkpoint-tmp`` and renames it once every process has
written its shards, so a process killed at any moment (SIGKILL included) leaves
the previous checkpoints and, at worst, a temporary directory that ``steps``
ignores and the next ``Manager`` deletes: a torn write never shadows the last
good checkpoint. The newest ``keep`` checkpoints are kept. Saving step ``s``
first deletes checkpoints of steps ``>= s``: they belong to a trajectory that
was abandoned by resuming from an older checkpoint. A ``Manager`` saves
asynchronously: ``save`` returns once the arrays are copied to host memory (on
CPU it takes references, no copy) and the files are written by a background
thread while training goes on; ``wait_until_finished``/``close`` block until
the last save is committed (``kronjax.fit`` closes its manager before it
returns). ``save`` (the function) waits. On a CPU backend the writer reads the
state's own buffers, so the first training step after a save cannot update
them in place and copies the state once: a save costs the loop about one copy
of the state (``experiments/bench_checkpoint.py``: ``loop_extra_s``); on
accelerators orbax copies to host memory instead.

Restoring (``load(directory, like=state)``) onto ``like``'s layout: an ordinary
state (one device) or a neuron-sharded one (``kronjax.sharding.shard_state``)
over any number of devices and processes, whatever layout wrote the checkpoint:
each process reads only its own shards, the neuron axis is truncated or
zero-padded to ``like``'s ``m_pad`` and padded rows of ``P`` / ``P_eval`` are set
to ``-inf`` (never firing). The index is restored as saved when the layouts
agree (same device count, or both unsharded), else rebuilt from ``P`` (a
rebuild never changes which neurons fire; its rebuild counter is carried).
``like`` must come from ``kronjax.init`` with the same dataset, config and
``tx``; the network (``Config.identity()``) must agree, and the state is restored
under the checkpoint's ``Plan`` (capacities grown by an overflow replay, index
kind, update path, layout: ``kronjax.with_plan``). A checkpoint that is corrupt or incomplete (missing or damaged
manifest, missing or truncated array files) or that does not match ``like``
(network settings, dataset fingerprint, optimizer state structure, shapes,
dtypes) is refused with a ``ValueError`` saying what differs, by every process
(the processes agree on the verdict before any of them goes on). Checkpoints
written by an earlier kronjax (one ``.npz`` file, formats v1 and v2) are
refused as such.

Multi-process: every process calls ``save`` / ``Manager.save`` / ``load`` with
its part of the same state; ``directory`` must be a file system all processes
see (the same path on every host).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from importlib import metadata
import pathlib
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jax.experimental import multihost_utils

from kronjax._src.base import serialization
from kronjax._src.distributed import sharding
from kronjax._src.data.dataset import fingerprint_text
from kronjax._src.step.plan import Plan
from kronjax._src.step.state import TrainState, threshold_index, with_plan

FORMAT = "kronjax-checkpoint"
VERSION = 4
# The kronjax release that wrote each older format: named when such a checkpoint is refused.
WRITTEN_BY = {1: "0.1", 2: "0.1", 3: "0.2"}
_PREFIX = "ckpt"
_NAME = re.compile(r"^ckpt_(\d{10})$")
_LEGACY = re.compile(r"^ckpt-(\d{10})\.npz$")
_TORN = re.compile(r"^ckpt_\d{10}\.orbax-checkpoint-tmp")
_MANIFEST_FILE = "manifest.json"


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _array_handler():
  # Uncompressed: zstd barely shrinks float32 training state and makes saving and
  # restoring several times slower (experiments/bench_checkpoint.py, "compression").
  return _ocp().PyTreeCheckpointHandler(use_compression=False)


def _restore_arrays(directory: pathlib.Path, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """Reads the arrays ``abstract`` names from an item directory, each onto its sharding
  (this process reads only its shards), truncated or zero-padded to its shape."""
  ocp = _ocp()
  restore_args = {k: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                          dtype=a.dtype, strict=False)
                  for k, a in abstract.items()}
  return _array_handler().restore(directory, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=restore_args))


def checkpoint_path(directory: str | os.PathLike, step: int) -> pathlib.Path:
  """The directory holding the checkpoint of ``step`` (``<directory>/ckpt_<step:010d>``)."""
  return pathlib.Path(directory) / f"{_PREFIX}_{int(step):010d}"


def _legacy_path(directory: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(directory) / f"ckpt-{int(step):010d}.npz"


def steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the committed checkpoints in ``directory``, ascending (empty when there
  are none). A save still in progress, or torn by a crash, is not listed. (Files of
  an earlier kronjax are listed: ``load`` refuses them with a message.)"""
  path = pathlib.Path(directory)
  if not path.is_dir():
    return []
  found = set()
  for entry in path.iterdir():
    match = _NAME.match(entry.name) or _LEGACY.match(entry.name)
    if match:
      found.add(int(match.group(1)))
  return sorted(found)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The step of the newest checkpoint in ``directory``, or None."""
  found = steps(directory)
  return found[-1] if found else None


# ----------------------------------------------------------------------------- processes

_BARRIERS = itertools.count()


def _barrier(name: str) -> None:
  """All processes wait here (no-op with one process). Called in the same order everywhere."""
  if jax.process_count() > 1:
    _ocp().multihost.sync_global_processes(f"kronjax_checkpoint_{name}_{next(_BARRIERS)}")


def _agree(error: Exception | None, path: pathlib.Path) -> None:
  """Raises on every process when any process failed (each its own error, or what failed elsewhere)."""
  if jax.process_count() > 1:
    flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    failed = [int(i) for i in np.flatnonzero(flags.reshape(-1))]
    if failed and error is None:
      error = ValueError(f"checkpoint {str(path)!r} was refused by process(es) {failed} (corrupt, "
                         "incomplete or not matching `like` there; see their error).")
  if error is not None:
    raise error


def _host(x: Any) -> Any:
  """What orbax should write for a leaf: a jax.Array spanning every process as is
  (each process writes its shards); in a multi-process run, an array held whole
  by each process (an unsharded state) as numpy, which only process 0 writes."""
  if jax.process_count() > 1 and (not isinstance(x, jax.Array) or x.is_fully_addressable):
    return np.asarray(x)
  return x


# ----------------------------------------------------------------------------- save


class Manager:
  """Saves the checkpoints of one run into ``directory``, asynchronously by default.

  ``save(state, metadata)`` returns once the state's arrays are referenced or
  copied in host memory; the files are written in the background and committed
  atomically. ``wait_until_finished()`` blocks until the last save is committed
  (and raises if it failed); ``close()`` does that and releases the manager. Use
  as a context manager. Every process of a multi-process run creates it and calls
  ``save`` with its part of the same state. Creating one deletes the temporary
  directories of saves torn by a crash.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2, asynchronous: bool = True):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be an int >= 1, got {keep!r}.")
    ocp = _ocp()
    self.directory = pathlib.Path(directory).absolute()
    self.keep = keep
    if jax.process_index() == 0 and self.directory.is_dir():
      for entry in self.directory.iterdir():   # saves torn by a crash
        if _TORN.match(entry.name):
          shutil.rmtree(entry, ignore_errors=True)
    options = ocp.CheckpointManagerOptions(
        step_prefix=_PREFIX, step_format_fixed_length=10, create=True,
        enable_async_checkpointing=asynchronous,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep), save_root_metadata=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": _array_handler(), "index": _array_handler(),
                       "manifest": ocp.JsonCheckpointHandler(filename=_MANIFEST_FILE)})
    # Every process has listed the existing steps before any of them deletes one.
    _barrier("open")

  def save(self, state: TrainState, metadata: dict | None = None) -> pathlib.Path:
    """Starts saving ``state`` (and ``metadata``) as ``checkpoint_path(directory, step)``.

    Args:
      state: the ``TrainState`` to save: unsharded, neuron-sharded (each process
        writes its shards) or a stacked sweep state.
      metadata: a dict of JSON values (str keys, numbers, strings, lists, dicts)
        and arrays (numpy or jax, PRNG keys included); ``load`` returns it.
        Tuples come back as lists.

    Returns:
      The checkpoint's directory (it appears once the save is committed).
    """
    if not isinstance(state, TrainState):
      raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
    if metadata is None:
      metadata = {}
    if not isinstance(metadata, dict):
      raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    manifest, arrays, index_arrays = _describe(state, metadata)
    step = manifest["step"]
    ocp = _ocp()
    stale = [s for s in self._manager.all_steps() if s >= step]
    if stale:
      self._manager.wait_until_finished()
      for s in stale:
        self._manager.delete(s)
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(arrays), index=ocp.args.PyTreeSave(index_arrays),
        manifest=ocp.args.JsonSave(manifest)))
    return checkpoint_path(self.directory, step)

  def wait_until_finished(self) -> None:
    """Blocks until every save started so far is committed; raises if one failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """``wait_until_finished``, then releases the manager."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> "Manager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save(directory: str | os.PathLike, state: TrainState, metadata: dict | None = None, *,
         keep: int = 2) -> pathlib.Path:
  """Saves ``state`` (and ``metadata``) as ``directory/ckpt_<step>`` and waits until it is committed.

  Args:
    directory: created if missing.
    state: the ``TrainState`` to save (unsharded, neuron-sharded or a sweep's
      stacked state). With several processes every process calls ``save``.
    metadata: a dict of JSON values (str keys, numbers, strings, lists, dicts)
      and arrays (numpy or jax, PRNG keys included); returned by ``load`` with
      the arrays' dtypes. Tuples come back as lists.
    keep: how many checkpoints to keep, newest first (older ones are deleted,
      and so are any of steps after ``state.step``: see the module docstring).

  Returns:
    The checkpoint's directory.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  if metadata is not None and not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
  _encode(metadata or {}, {}, "metadata")   # refuse bad metadata before touching the directory
  with Manager(directory, keep=keep, asynchronous=False) as manager:
    return manager.save(state, metadata)


def _describe(state: TrainState, metadata: dict) -> tuple[dict, dict, dict]:
  """The manifest and the arrays to write (state leaves, index leaves)."""
  layout = sharding.mesh_axis(state)
  body = state.replace(index=None)
  axes = sharding.neuron_axes(state)
  arrays, leaves = {}, []
  for i, ((path, leaf), axis) in enumerate(zip(jax.tree_util.tree_flatten_with_path(body)[0], axes)):
    name = f"leaf_{i:04d}"
    arrays[name], entry = _storable(leaf)
    leaves.append({"path": jax.tree_util.keystr(path), "name": name, "neuron_axis": axis, **entry})
  index_arrays, index_leaves = {}, []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(state.index)[0]):
    name = f"index_{i:04d}"
    index_arrays[name], entry = _storable(leaf)
    index_leaves.append({"path": jax.tree_util.keystr(path), "name": name, **entry})
  step = int(np.max(np.asarray(sharding.local_part(state.step))))
  rebuilds = int(np.asarray(sharding.local_part(sharding.index_rebuilds(state.index))))
  meta_arrays: dict[str, Any] = {}
  encoded = _encode(metadata, meta_arrays, "metadata")
  manifest = {
      "format": FORMAT, "version": VERSION, "step": step,
      "kronjax_version": _kronjax_version(),
      "config": state.config.identity(), "plan": dataclasses.asdict(state.plan),
      "index_kind": state.index_kind, "tx": describe_tx(state),
      "data_fingerprint": _fingerprint(state),
      "width": state.config.width,
      "rows": int(state.A_T.shape[-1]),
      "devices": 1 if layout is None else int(layout[0].shape[layout[1]]),
      "processes": jax.process_count(),
      "index_layout": "global" if layout is None else "shards", "index_rebuilds": rebuilds,
      "leaves": leaves, "index_leaves": index_leaves, "metadata": encoded,
      "metadata_arrays": {k: serialization.array_to_json(v) for k, v in meta_arrays.items()},
  }
  return manifest, arrays, index_arrays


def _storable(leaf: Any) -> tuple[Any, dict]:
  impl = None
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(leaf))
    leaf = jax.random.key_data(leaf)
  return _host(leaf), {"dtype": jnp.dtype(leaf.dtype).name, "shape": list(np.shape(leaf)),
                       "prng_impl": impl}


def _encode(obj: Any, arrays: dict, where: str) -> Any:
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, np.generic) and obj.ndim == 0 and obj.dtype.isbuiltin:
    return obj.item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    name = f"meta_{len(arrays):04d}"
    return {"__ndarray__": name, **serialization.put_array(arrays, name, obj)}
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


def _decode(obj: Any, arrays: dict) -> Any:
  if isinstance(obj, dict):
    if "__ndarray__" in obj:
      return serialization.get_array(arrays, {**obj, "name": obj["__ndarray__"]})
    return {k: _decode(v, arrays) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, arrays) for v in obj]
  return obj


def describe_tx(state: TrainState) -> dict[str, Any]:
  """What identifies the optimizer in a checkpoint: the structure of its state.

  The transformation itself (closures) is not saved; ``load`` takes it from ``like``.
  """
  return {"opt_state_structure": str(jax.tree.structure(state.opt_state)),
          "opt_state_shapes": [list(np.shape(x)) for x in jax.tree.leaves(state.opt_state)]}


# ----------------------------------------------------------------------------- load


class _Refused(Exception):
  """A checkpoint that is readable but not restorable onto ``like`` (message ready)."""


def load(directory: str | os.PathLike, *, like: TrainState,
         step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Restores the checkpoint of ``step`` (default: the latest) in ``directory`` onto ``like``'s layout.

  Args:
    directory: where ``save`` wrote.
    like: a state from ``kronjax.init`` with the same data, labels, eval data,
      config (up to capacities / index / update path / layout) and optimizer
      ``tx`` as the saved one; unsharded, or laid out by
      ``kronjax.sharding.shard_state`` over any mesh (then each process reads
      its own shards). Only its structure, layout, ``tx`` and data fingerprint
      are used, not its values.
    step: load this step's checkpoint instead of the latest.

  Returns:
    ``(state, metadata)``: the saved state under the saved config (grown
    capacities included) in ``like``'s layout, and the ``metadata`` given to ``save``.

  Raises:
    FileNotFoundError: no checkpoint in ``directory`` (or none for ``step``).
    ValueError: the checkpoint is corrupt, incomplete, from an earlier kronjax,
      or does not match ``like`` (on every process).
  """
  if not isinstance(like, TrainState):
    raise TypeError(f"like must be a kronjax.TrainState (a freshly initialized state), "
                    f"got {type(like).__name__}.")
  directory = pathlib.Path(directory)
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f"no checkpoint (ckpt_<step>) in {str(directory)!r}.")
  path = checkpoint_path(directory, step)
  if not path.is_dir():
    if _legacy_path(directory, step).is_file():
      raise ValueError(
          f"checkpoint {str(_legacy_path(directory, step))!r} was written by kronjax "
          f"{WRITTEN_BY[1]} (one .npz file, format v1 or v2); this kronjax reads v{VERSION}. "
          "Train again, or load it with the kronjax that wrote it.")
    raise FileNotFoundError(f"no checkpoint for step {step} in {str(directory)!r}; "
                            f"available steps: {steps(directory)}.")
  error, out = None, None
  try:
    out = _read(path, like)
  except _Refused as e:
    error = ValueError(str(e))
  except Exception as e:  # pylint: disable=broad-except
    error = ValueError(
        f"checkpoint {str(path)!r} is corrupt or incomplete ({type(e).__name__}: {e}). "
        "Delete it to fall back to the previous checkpoint, or start the run again.")
    error.__cause__ = e
  _agree(error, path)
  state, metadata, plan = out
  return _finish(state, plan), metadata


def _read(path: pathlib.Path, like: TrainState):
  """Reads and checks the checkpoint (no collective): ``(state, metadata, plan)``."""
  manifest = json.loads((path / "manifest" / _MANIFEST_FILE).read_text())
  if not isinstance(manifest, dict):
    raise TypeError("the manifest is not a JSON object")
  if manifest.get("format") == FORMAT and manifest.get("version") in WRITTEN_BY:
    raise _Refused(
        f"checkpoint {str(path)!r} was written by kronjax {WRITTEN_BY[manifest['version']]} "
        f"(checkpoint format v{manifest['version']}); this kronjax reads v{VERSION}. Train "
        "again, or load it with the kronjax that wrote it.")
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(f"not a {FORMAT} v{VERSION} checkpoint (format={manifest.get('format')!r}, "
                     f"version={manifest.get('version')!r})")
  for field in ("step", "config", "plan", "index_kind", "data_fingerprint", "leaves", "index_leaves",
                "metadata", "metadata_arrays", "width", "rows", "devices", "index_layout",
                "index_rebuilds"):
    if field not in manifest:
      raise KeyError(f"manifest field {field!r}")
  for item in ("state", "index"):
    if not (path / item).is_dir():
      raise FileNotFoundError(f"the {item!r} item of the checkpoint is missing")
  meta_arrays = {k: serialization.array_from_json(v) for k, v in manifest["metadata_arrays"].items()}
  metadata = _decode(manifest["metadata"], meta_arrays)

  target, layout = _target(like, manifest, path)
  body = target.replace(index=None)
  flat, treedef = jax.tree_util.tree_flatten_with_path(body)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  saved = manifest["leaves"]
  if paths != [entry["path"] for entry in saved]:
    missing = sorted(set(paths) ^ {entry["path"] for entry in saved})
    raise _Refused(
        f"checkpoint {str(path)!r} does not match `like`: their states have different "
        f"structures (leaves only in one of them: {missing[:6]}). The optimizer state "
        f"{manifest.get('tx', {}).get('opt_state_structure')!r} was saved; build `like` with "
        "the same tx, config, data and eval data as the saved run.")
  axes = sharding.neuron_axes(body)
  device = _device(like)
  abstract = {}
  for (p, want), axis, entry in zip(flat, axes, saved):
    want = jax.eval_shape(jax.random.key_data, want) if _is_key(want) else want
    got_shape = list(entry["shape"])
    if axis is not None and entry.get("neuron_axis") == axis:
      got_shape[axis] = want.shape[axis]   # the neuron axis is re-padded to like's layout
    if list(want.shape) != got_shape or jnp.dtype(want.dtype).name != entry["dtype"]:
      raise _Refused(
          f"checkpoint {str(path)!r} does not match `like` at {jax.tree_util.keystr(p)}: saved "
          f"{entry['dtype']}{entry['shape']}, `like` has {jnp.dtype(want.dtype).name}"
          f"{list(want.shape)}. Build `like` with the same config, data shapes, dtype and tx as "
          "the saved run.")
    if layout is None:
      where = device
    else:
      mesh, axis_name = layout
      spec = P() if axis is None else P(*([None] * axis), axis_name)
      where = NamedSharding(mesh, spec)
    abstract[entry["name"]] = jax.ShapeDtypeStruct(tuple(want.shape), want.dtype, sharding=where)
  restored = _restore_arrays(path.absolute() / "state", abstract)
  leaves = []
  for entry in saved:
    x = restored[entry["name"]]
    if entry.get("prng_impl"):
      x = jax.random.wrap_key_data(x, impl=entry["prng_impl"])
    leaves.append(x)
  state = jax.tree_util.tree_unflatten(treedef, leaves)

  # The index: as saved when the layouts agree, else rebuilt after the agreement.
  index = None
  devices = 1 if layout is None else layout[0].shape[layout[1]]
  same = manifest["index_layout"] == ("global" if layout is None else "shards") and (
      layout is None or manifest["devices"] == devices)
  index_flat, index_def = jax.tree_util.tree_flatten_with_path(target.index)
  if same and [jax.tree_util.keystr(p) for p, _ in index_flat] == [
      e["path"] for e in manifest["index_leaves"]]:
    where = device if layout is None else NamedSharding(layout[0], P(layout[1]))
    index_abstract = {e["name"]: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                                      sharding=where)
                      for e in manifest["index_leaves"]}
    if index_abstract:
      got = _restore_arrays(path.absolute() / "index", index_abstract)
      index = jax.tree_util.tree_unflatten(
          index_def, [got[e["name"]] for e in manifest["index_leaves"]])
    else:
      index = target.index
  state = state.replace(index=index)
  local_step = int(np.max(np.asarray(sharding.local_part(state.step))))
  if local_step != manifest["step"] or path.name != checkpoint_path(path.parent, local_step).name:
    raise ValueError(f"its directory name and manifest say step {manifest['step']}, its state "
                     f"says step {local_step}")
  plan = {"layout": layout, "rebuild": index is None, "rebuilds": manifest["index_rebuilds"]}
  return state, metadata, plan


def _finish(state: TrainState, plan: dict) -> TrainState:
  """After every process agreed: padded rows never fire, the index rebuilt if needed."""
  layout = plan["layout"]
  if layout is not None:
    state = sharding.set_padding(state)
    if plan["rebuild"]:
      state = sharding.build_shard_indices(state, layout[0], layout[1], plan["rebuilds"])
  elif plan["rebuild"]:
    index = threshold_index(state).build(state.P, state.b)
    state = state.replace(index=sharding.with_index_rebuilds(
        index, jnp.asarray(plan["rebuilds"], jnp.int32)))
  return state


def _is_key(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _device(like: TrainState) -> SingleDeviceSharding:
  """Where an unsharded ``like`` lives (this process's first device by default)."""
  sharding = getattr(like.projections, "sharding", None)
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  return SingleDeviceSharding(jax.local_devices()[0])


def _target(like: TrainState, manifest: dict, path: pathlib.Path):
  """The abstract state to restore (the saved config, ``like``'s layout) and that layout,
  after checking ``like`` describes the same run."""
  saved = manifest["config"]
  current = like.config.identity()
  if set(saved) != set(current):
    raise _Refused(f"checkpoint {str(path)!r} was written by a kronjax with different Config "
                   f"fields ({sorted(set(saved) ^ set(current))}); it cannot be restored.")
  for name in current:
    if saved[name] != current[name]:
      raise _Refused(
          f"checkpoint {str(path)!r} does not match `like`: config.{name} is {saved[name]!r} in "
          f"the checkpoint and {current[name]!r} in `like`. Build `like` with the saved run's config.")
  saved_fp = manifest["data_fingerprint"]
  like_fp = _fingerprint(like)
  if saved_fp is not None and like_fp is not None and saved_fp != like_fp:
    raise _Refused(
        f"checkpoint {str(path)!r} was saved for another dataset: the fingerprint of its "
        "training/eval factors and labels differs from `like`'s. Build `like` with "
        "kronjax.init from the same kronjax.Dataset as the saved run.")
  saved_tx = manifest.get("tx", {}).get("opt_state_structure")
  if saved_tx is not None and saved_tx != describe_tx(like)["opt_state_structure"]:
    raise _Refused(
        f"checkpoint {str(path)!r} was saved with a different optimizer: its optimizer state is "
        f"{saved_tx}, `like`'s is {describe_tx(like)['opt_state_structure']}. Pass the same tx "
        "(optax transformations cannot be stored in a checkpoint).")
  if manifest["width"] != like.config.width:
    raise ValueError(f"manifest width {manifest['width']} disagrees with its config")
  plan = Plan.from_dict(manifest["plan"])   # the saved run's plan (capacities grown by replays)
  layout = sharding.mesh_axis(like)
  width = like.config.width
  base = like.replace(index=None)
  if layout is not None:
    base = jax.eval_shape(lambda s: sharding.resize_rows(s, width), base)
  if base.A_T.ndim == 3:   # a stacked sweep state
    target = jax.eval_shape(jax.vmap(lambda s: with_plan(s, plan)), base)
  else:
    target = jax.eval_shape(lambda s: with_plan(s, plan), base)
  if target.index_kind != manifest["index_kind"]:
    raise _Refused(f"checkpoint {str(path)!r} used threshold index {manifest['index_kind']!r}, "
                   f"but its plan resolves to {target.index_kind!r} here.")
  if layout is not None:
    mesh, axis = layout
    rows = sharding.padded_width(width, mesh.shape[axis])
    target = jax.eval_shape(lambda s: sharding.resize_rows(s, rows), target)
  return target, layout


def _fingerprint(state: TrainState) -> str | None:
  """The state's dataset fingerprint as text (a sweep's members share one)."""
  return fingerprint_text(np.asarray(sharding.local_part(state.fingerprint)).reshape(-1, 8)[0])


def _kronjax_version() -> str:
  try:
    return metadata.version("kronjax")
  except metadata.PackageNotFoundError:
    return "unknown"
