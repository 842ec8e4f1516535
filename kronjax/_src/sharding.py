"""Neuron-sharded training: the rows of ``P``, ``A``, ``a`` split over devices.

Shapes: m neurons, m_pad = D * ceil(m / D) padded neurons, D devices on the
neuron axis, n points, n_e eval points, B batch, C outputs.

Layout (``shard_state``), with a 1-D mesh axis ``"neurons"`` of ``D`` devices:

  * sharded along rows: ``P (m_pad, n)``, ``A (m_pad, n)``, ``a (m_pad, C)``,
    ``P_eval (m_pad, n_e)`` and every optimizer-state leaf whose leading axis
    has ``m_pad`` entries (momentum traces); each device holds ``m_pad / D`` rows;
  * per shard: the threshold index, built from the shard's own rows and stored
    with a leading ``(D,)`` axis (``index.leaf[k]`` belongs to device ``k``; for
    the bucketed kind the candidate lists hold *local* neuron ids);
  * replicated: ``b``, ``step``, ``key``, scalar optimizer leaves (``count``,
    injected hyperparameters), and the whole dataset (factors, labels, Gram).

When ``D`` does not divide ``m`` the state is padded with ``m_pad - m`` neurons
that can never fire: ``P = -inf`` (so ``P > b`` is never true and they never
enter an active set or a candidate list), ``A = 0``, ``a = 0``, zero optimizer
moments. Their gradient is zero, so they stay that way and the trained
network is exactly the unpadded one; ``unshard_state`` strips them.

The step (``compiled_step``) is the train step under ``jax.shard_map``:
each device queries its index on its rows, computes its partial ``(B, C)``
outputs, and the only communication is one all-reduce of those outputs plus a
few ``(B,)``/scalar reductions (active counts, overflow, max count, rebuilds).
No ``P``-sized array ever moves (see ``collectives`` and the multi-process page of the docs).

Multi-host: call ``jax.distributed.initialize()`` on every host first; a mesh
over ``jax.devices()`` then spans all hosts and the same code runs unchanged
(each host feeds the same batch indices; the data is replicated per host).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kronjax._src import loop
from kronjax._src import step as step_lib
from kronjax._src.dataset import Dataset
from kronjax._src.state import TrainState, threshold_index, trainable_key, with_config

AXIS = "neurons"


def _row_fields(state: TrainState) -> dict[str, tuple[int, float]]:
  """field -> (neuron axis, padding value). ``A_T`` is stored ``(n, m)`` and so is
  ``projections`` in the ``"points"`` layout: their neurons are axis 1."""
  p_axis = 1 if state.layout == "points" else 0
  return {"projections": (p_axis, -jnp.inf), "A_T": (1, 0.0), "a": (0, 0.0),
          "P_eval": (0, -jnp.inf)}


def neuron_mesh(devices: Any = None, axis_name: str = AXIS) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) named ``axis_name``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis_name,))


def _axis(mesh: Mesh, axis_name: str | None) -> str:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; "
                    "build one with kronjax.sharding.neuron_mesh().")
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(f"mesh has axes {mesh.axis_names}; pass axis_name= to say which one "
                       "splits the neurons.")
    return mesh.axis_names[0]
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
  return axis_name


def padded_width(width: int, devices: int) -> int:
  """``m_pad``: the width rounded up to a multiple of the device count."""
  return devices * math.ceil(width / devices)


def _resize_rows(state: TrainState, rows: int) -> TrainState:
  """Pads (never-firing neurons) or truncates the neuron axis to ``rows``."""
  old = state.P.shape[0]
  if old == rows:
    return state

  def fit(x, value, axis):
    if x.shape[axis] > rows:
      return jax.lax.slice_in_dim(x, 0, rows, axis=axis)
    shape = list(x.shape)
    shape[axis] = rows - x.shape[axis]
    return jnp.concatenate([x, jnp.full(shape, value, x.dtype)], axis=axis)

  changes = {f: fit(getattr(state, f), v, ax) for f, (ax, v) in _row_fields(state).items()
             if getattr(state, f) is not None}
  axis = functools.partial(_neuron_axis, rows=old, layout=state.layout)
  changes["opt_state"] = jax.tree_util.tree_map_with_path(
      lambda path, x: x if axis(path, x) is None else fit(x, 0, axis(path, x)), state.opt_state)
  return state.replace(**changes)


def _neuron_axis(path: Any, x: Any, rows: int, layout: str) -> int | None:
  """The neuron axis of an optimizer-state leaf, or None for a replicated leaf.

  Leaves under the ``"A"`` key mirror ``A_T`` ``(n, m)`` (neurons on axis 1), and
  so do those under ``"P"`` in the ``"points"`` layout; the others mirror ``P``,
  ``a``, ``P_eval``: neurons on axis 0.
  """
  if getattr(x, "ndim", 0) < 1:
    return None
  key = trainable_key(path)
  if key == "A" or (key == "P" and layout == "points"):
    return 1 if x.ndim >= 2 and x.shape[1] == rows else None
  return 0 if x.shape[0] == rows else None


def _spec(axis: int | None, axis_name: str) -> P:
  if axis is None:
    return P()
  return P(*([None] * axis), axis_name)


def state_specs(state: TrainState, axis_name: str = AXIS) -> TrainState:
  """The ``PartitionSpec`` tree of a sharded state (a ``TrainState`` of specs).

  Neuron fields and optimizer leaves are split along ``axis_name`` on their
  neuron axis; the index leaves along their leading device axis; the rest is
  replicated.
  """
  rows = state.P.shape[0]
  specs = jax.tree.map(lambda _: P(), state)
  changes = {f: _spec(ax, axis_name) for f, (ax, _) in _row_fields(state).items()
             if getattr(state, f) is not None}
  changes["opt_state"] = jax.tree_util.tree_map_with_path(
      lambda path, x: _spec(_neuron_axis(path, x, rows, state.layout), axis_name), state.opt_state)
  changes["index"] = jax.tree.map(lambda _: P(axis_name), state.index)
  return specs.replace(**changes)


def _rebuilds(index: Any) -> jax.Array:
  r = getattr(index, "rebuilds", None)
  return jnp.zeros((), jnp.int32) if r is None else jnp.max(jnp.asarray(r))


def _keep_rebuilds(index: Any, count: jax.Array) -> Any:
  if hasattr(index, "rebuilds") and hasattr(index, "_replace"):
    return index._replace(rebuilds=jnp.broadcast_to(count, jnp.shape(index.rebuilds)).astype(jnp.int32))
  return index


def shard_state(state: TrainState, mesh: Mesh, axis_name: str | None = None) -> TrainState:
  """``state`` laid out over ``mesh`` with neurons split along ``axis_name`` (module docstring).

  Accepts an unsharded state or one already sharded (for any device count):
  the neuron axis is re-padded to a multiple of the device count and the index
  is rebuilt per shard from the shard's rows (a rebuild never changes a query's
  answer; the rebuild counter is carried over).
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  axis = _axis(mesh, axis_name)
  devices = mesh.shape[axis]
  if state.P.ndim != 2:
    raise ValueError(f"state.P must be (m, n); got shape {state.P.shape}. A stacked sweep state "
                     "cannot be neuron-sharded; shard its members one by one.")
  rebuilds = _rebuilds(state.index)
  state = _resize_rows(state, padded_width(state.config.width, devices))
  index = threshold_index(state.config, state.index_kind)

  def build(P_local, b):
    return jax.tree.map(lambda x: x[None], index.build(P_local, b))

  state = state.replace(index=None)
  specs = state_specs(state, axis)
  # The step donates the sharded state, and device_put may reuse the caller's buffer
  # for shard 0 of a replicated leaf (even with may_alias=False): copy first.
  state = jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), NamedSharding(mesh, s)),
                       state, specs)
  built = jax.jit(jax.shard_map(build, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis),
                                check_vma=False))(
      state.P, state.b)
  return state.replace(index=_keep_rebuilds(built, rebuilds))


def unshard_state(state: TrainState, device: Any = None) -> TrainState:
  """An ordinary single-device state from a sharded one: padding stripped, one global index.

  ``kronjax.predict`` / ``dense_params`` / ``kronjax.init``-shaped code expect this.
  A state that is not sharded is returned with its arrays moved to ``device``.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  device = jax.devices()[0] if device is None else device
  rebuilds = _rebuilds(state.index)
  sharded = state.P.shape[0] != state.config.width or not _is_global_index(state)
  state = jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), device), state)
  if not sharded:
    return state
  state = _resize_rows(state, state.config.width)
  index = threshold_index(state.config, state.index_kind).build(state.P, state.b)
  return state.replace(index=_keep_rebuilds(index, rebuilds))


def _is_global_index(state: TrainState) -> bool:
  """False when the index carries the per-shard leading device axis."""
  reference = jax.eval_shape(threshold_index(state.config, state.index_kind).build, state.P, state.b)
  return jax.tree.structure(reference) == jax.tree.structure(state.index) and all(
      x.shape == y.shape for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(state.index)))


_STEP_CACHE: dict[Any, Any] = {}


def compiled_step(mesh: Mesh, axis_name: str | None = None, *, donate: bool = True):
  """The jitted sharded step ``step(state, dataset, batch_idx) -> (state, metrics)``.

  ``state`` comes from ``shard_state(state, mesh, axis_name)``; the step donates
  it unless ``donate=False``. The dataset is replicated on every device. Metrics
  are as ``kronjax.train_step``'s (``index_rebuilds`` is the largest count over
  shards).
  """
  axis = _axis(mesh, axis_name)
  key = (mesh, axis, donate)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(functools.partial(_sharded_step, mesh=mesh, axis=axis),
                               donate_argnums=(0,) if donate else ())
  return _STEP_CACHE[key]


def _sharded_step(state: TrainState, dataset: Dataset, batch_idx: jax.Array, *, mesh: Mesh,
                  axis: str):
  specs = state_specs(state, axis)
  data_specs = jax.tree.map(lambda _: P(), dataset)

  def body(state, dataset, batch_idx):
    local = state.replace(index=jax.tree.map(lambda x: x[0], state.index))
    new, metrics = step_lib.step(local, dataset, batch_idx, axis_name=axis)
    metrics["index_rebuilds"] = jax.lax.pmax(metrics["index_rebuilds"], axis)
    return new.replace(index=jax.tree.map(lambda x: x[None], new.index)), metrics

  # check_vma=False: the index's loops (fori_loop carries built from constants) are not
  # annotated for varying-manual-axes checking; the replicated outputs (metrics,
  # step) are identical on every shard by construction (all derive from psums).
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, data_specs, P()),
                       out_specs=(specs, P()), check_vma=False)(
                           state, dataset, jnp.asarray(batch_idx, jnp.int32))


def replicate(dataset: Dataset, mesh: Mesh) -> Dataset:
  """``dataset`` with every array replicated over ``mesh``."""
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), dataset)


def sharded_runner(mesh: Mesh, axis_name: str | None = None) -> loop.Runner:
  """The training loop's runner for neuron-sharded training over ``mesh``."""
  step_fn = compiled_step(mesh, axis_name)

  def prepare(state, dataset):
    return shard_state(state, mesh, axis_name), replicate(dataset, mesh)

  def run_step(state, dataset, batch, mask):
    del mask  # one member
    return step_fn(state, dataset, batch)

  def regrow(state, **changes):
    return shard_state(with_config(state, **changes), mesh, axis_name)

  # Checkpoints hold the unsharded state (no padding, one index), so
  # kronjax.checkpoint.load(like=init(...)) restores it whatever mesh wrote it.
  def resync(state, dataset):
    return shard_state(loop.resync_jit(unshard_state(state), dataset), mesh, axis_name)

  return loop.Runner(members=None, prepare=prepare, step=run_step, evaluate=loop.evaluate_jit,
                     with_config=regrow, saveable=unshard_state, resync=resync,
                     name="kronjax.fit")


# ----------------------------------------------------------------------------- communication

def estimated_bytes(batch: int, classes: int, *, float_bytes: int = 4) -> dict[str, int]:
  """The paper estimate of one step's all-reduce payload per device (the docs' multi-process page).

  ``outputs``: the ``(B, C)`` partial outputs; ``counts``: the ``(B,)`` int32
  active counts; ``scalars``: overflow flag, max count, index rebuilds (int32).
  Independent of ``m``, ``n`` and ``d``.
  """
  out = {"outputs": batch * classes * float_bytes, "counts": 4 * batch, "scalars": 3 * 4}
  out["total"] = sum(out.values())
  return out
