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

Memory per device (``r = m_pad / D`` rows, ``f`` bytes per float, ``k`` moments
per trainable in the optimizer state: 0 for plain sgd, 1 for momentum, 2 for adam):

  * sharded: ``P`` ``r n f``, ``A`` ``r n f``, ``a`` ``r C f``, ``P_eval``
    ``r n_e f``, and ``k`` times that again for the optimizer moments; the
    bucketed index adds its ``(n, C_cap)`` int32 candidate lists per device;
  * replicated: the dataset: factors ``n R sum_q d_q f`` (plus the eval points),
    labels, and with ``gram="precomputed"`` the Gram ``n^2 f`` (plus the cross
    Gram ``n n_e f``). A dataset whose Gram does not fit one host uses
    ``kronjax.Dataset(..., gram="factors")``: nothing ``n x n`` is stored and
    each step computes its ``(B, n)`` Gram rows from the factors;
  * step temporaries: the full update path with a stateful optimizer forms the
    full-shape gradients of ``P`` and ``A`` (``2 r n f``, plus ``r n_e f``); the
    sparse path with plain sgd only ``O(T B n)`` (``T`` touched rows).

The measured sizes of the compiled step's arguments and temporaries, and the peak
resident memory over training, are on the performance page (``bench_checkpoint``).
Not yet sharded: ``kronjax.init`` builds the whole state on every process before
``shard_state`` keeps its rows, so the start needs the unsharded state once per
process; restoring a checkpoint needs about twice a device's state for a moment.

Multi-process / multi-host: call ``jax.distributed.initialize()`` in every
process first (CPU devices need ``jax_cpu_collectives_implementation="gloo"``);
a mesh over ``jax.devices()`` then spans all processes and the same code runs
unchanged. Every process builds the same dataset and passes the same key, so
all derive the same batch indices (``kronjax.batch_schedule``); each holds and
updates only its rows. ``kronjax.checkpoint`` saves and restores shard by shard
(each process its own; nothing gathered), onto any device count;
``unshard_state`` gathers the network into every process's memory.
``experiments/multiprocess_fit.py`` is the recipe (tests/test_multiprocess.py
runs it as two local processes).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kronjax._src.step import step as step_lib
from kronjax._src.data.dataset import Dataset
from kronjax._src.step.state import TrainState, threshold_index, trainable_key

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


def resize_rows(state: TrainState, rows: int) -> TrainState:
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
  if key in ("bias", "W0"):   # (C,) and (): replicated, whatever their size
    return None
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
  rows = state.A_T.shape[-1]   # (A_T is (n, m) in every layout; also for shape-only trees)
  specs = jax.tree.map(lambda _: P(), state)
  changes = {f: _spec(ax, axis_name) for f, (ax, _) in _row_fields(state).items()
             if getattr(state, f) is not None}
  changes["opt_state"] = jax.tree_util.tree_map_with_path(
      lambda path, x: _spec(_neuron_axis(path, x, rows, state.layout), axis_name), state.opt_state)
  changes["index"] = jax.tree.map(lambda _: P(axis_name), state.index)
  return specs.replace(**changes)


def index_rebuilds(index: Any) -> jax.Array:
  r = getattr(index, "rebuilds", None)
  return jnp.zeros((), jnp.int32) if r is None else jnp.max(jnp.asarray(r))


def with_index_rebuilds(index: Any, count: jax.Array) -> Any:
  if hasattr(index, "rebuilds") and hasattr(index, "_replace"):
    return index._replace(rebuilds=jnp.broadcast_to(count, jnp.shape(index.rebuilds)).astype(jnp.int32))
  return index


def shard_state(state: TrainState, mesh: Mesh, axis_name: str | None = None) -> TrainState:
  """``state`` laid out over ``mesh`` with neurons split along ``axis_name`` (module docstring).

  Accepts an unsharded state or one already sharded (for any device count):
  the neuron axis is re-padded to a multiple of the device count and the index
  is rebuilt per shard from the shard's rows (a rebuild never changes a query's
  answer; the rebuild counter is carried over). With several processes every
  process calls it with the same (unsharded) state and keeps its own shards.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  axis = _axis(mesh, axis_name)
  devices = mesh.shape[axis]
  if state.P.ndim != 2:
    raise ValueError(f"state.P must be (m, n); got shape {state.P.shape}. A stacked sweep state "
                     "cannot be neuron-sharded; shard its members one by one.")
  rebuilds = index_rebuilds(state.index)
  state = resize_rows(state.replace(index=None), padded_width(state.config.width, devices))
  specs = state_specs(state, axis)
  state = jax.tree.map(lambda x, s: _put(x, NamedSharding(mesh, s)), state, specs)
  return build_shard_indices(state, mesh, axis, rebuilds)


def build_shard_indices(state: TrainState, mesh: Mesh, axis: str, rebuilds: Any) -> TrainState:
  """``state`` (sharded, any index) with one threshold index per shard built from
  the shard's rows, its rebuild counter set to ``rebuilds``."""
  index = threshold_index(state)
  count = jnp.asarray(rebuilds, jnp.int32)

  def build(P_local, b, count):
    return jax.tree.map(lambda x: x[None], with_index_rebuilds(index.build(P_local, b), count))

  built = jax.jit(jax.shard_map(build, mesh=mesh, in_specs=(P(axis), P(), P()), out_specs=P(axis),
                                check_vma=False))(
      state.P, state.b, _put(count, NamedSharding(mesh, P())))
  return state.replace(index=built)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """A fresh copy of ``x`` laid out as ``sharding``. The step donates the sharded
  state, and device_put may reuse the caller's buffer for shard 0 of a replicated
  leaf (even with may_alias=False): copy first. A mesh spanning processes gets its
  shards from each process's (identical) host copy of ``x``."""
  if sharding.is_fully_addressable:
    return jax.device_put(jnp.array(x, copy=True), sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: jnp.array(y, copy=True), out_shardings=sharding)(x)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def mesh_axis(state: TrainState) -> tuple[Mesh, str] | None:
  """``(mesh, axis name)`` of a state laid out by ``shard_state``, or None when
  ``state`` is an ordinary (unsharded) state."""
  sharding = getattr(state.projections, "sharding", None)
  if isinstance(sharding, NamedSharding):
    for entry in tuple(sharding.spec):
      if isinstance(entry, str):
        return sharding.mesh, entry
  return None


def neuron_axes(state: TrainState) -> list[int | None]:
  """The neuron axis of every leaf of ``state.replace(index=None)`` (flattening
  order; None for a replicated leaf). A stacked sweep state has none."""
  leaves = jax.tree.leaves(state.replace(index=None))
  if state.A_T.ndim != 2:
    return [None] * len(leaves)
  specs = jax.tree.leaves(state_specs(state).replace(index=None),
                          is_leaf=lambda x: isinstance(x, P))
  assert len(specs) == len(leaves)
  return [next((i for i, e in enumerate(tuple(s)) if e is not None), None) for s in specs]


def set_padding(state: TrainState) -> TrainState:
  """The padded neurons (rows ``>= width``) of a sharded state set to never fire:
  ``P = P_eval = -inf`` (``A``, ``a`` and optimizer moments are zero wherever a
  restore padded them). Layout unchanged."""
  width, rows = state.config.width, state.P.shape[0]
  if rows == width:
    return state
  fields = {f: ax for f, (ax, _) in _row_fields(state).items()
            if f in ("projections", "P_eval") and getattr(state, f) is not None}

  def fill(**arrays):
    out = {}
    for f, x in arrays.items():
      row = jax.lax.broadcasted_iota(jnp.int32, x.shape, fields[f])
      out[f] = jnp.where(row < width, x, jnp.asarray(-jnp.inf, x.dtype))
    return out

  arrays = {f: getattr(state, f) for f in fields}
  filled = jax.jit(fill, out_shardings={f: x.sharding for f, x in arrays.items()})(**arrays)
  return state.replace(**filled)


def unshard_state(state: TrainState, device: Any = None) -> TrainState:
  """An ordinary single-device state from a sharded one: padding stripped, one global index.

  ``kronjax.predict`` / ``dense_params`` / ``kronjax.init``-shaped code expect this.
  A state that is not sharded is returned with its arrays moved to ``device``
  (default: this process's first device). With several processes every process
  must call it: each gets the whole state in its own memory (the shards are
  gathered over the processes, ``multihost_utils.process_allgather``).
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  device = jax.local_devices()[0] if device is None else device
  rebuilds = index_rebuilds(state.index)
  sharded = (mesh_axis(state) is not None or state.P.shape[0] != state.config.width
             or not _is_global_index(state))
  if sharded:
    rebuilds = local_part(rebuilds)
    state = state.replace(index=None)
  state = jax.tree.map(lambda x: jax.device_put(jnp.array(local_part(x), copy=True), device), state)
  if not sharded:
    return state
  state = resize_rows(state, state.config.width)
  index = threshold_index(state).build(state.P, state.b)
  return state.replace(index=with_index_rebuilds(index, jax.device_put(rebuilds, device)))


def local_part(x: Any) -> Any:
  """``x``'s whole value on this process: itself when this process holds all of it,
  else its local replica, else gathered from every process (a collective)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  if x.is_fully_replicated:
    return x.addressable_data(0)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(local_part(jax.random.key_data(x)), impl=jax.random.key_impl(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _is_global_index(state: TrainState) -> bool:
  """False when the index carries the per-shard leading device axis."""
  reference = jax.eval_shape(threshold_index(state).build, state.P, state.b)
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


# ----------------------------------------------------------------------------- communication

def estimated_bytes(batch: int, classes: int, *, float_bytes: int = 4,
                    update: str = "sparse") -> dict[str, int]:
  """The paper estimate of one step's all-reduce payload per device (the docs' multi-process page).

  ``update`` is the step's update path (``state.update_path(batch)``):

  * ``"sparse"``: ``outputs``, the ``(B, C)`` partial outputs (``float_bytes``
    each); ``counts``, the ``(B,)`` int32 active counts; ``scalars``, overflow
    flag, max count and index rebuilds (int32);
  * ``"full"``: ``outputs`` as above; ``counts``, the ``(B,)`` active counts in
    floats of at least 4 bytes (they come from the dense ``(B, m)`` slice, and
    the max count is taken after the reduction); ``scalars``: index rebuilds.

  Independent of ``m``, ``n`` and ``d``, of the optimizer and of the layout.
  Matches the compiled step's collectives byte for byte
  (``kronjax.experiments.hlo.step_collectives``; tests/test_sharding.py).
  """
  if update not in ("sparse", "full"):
    raise ValueError(f"update must be 'sparse' or 'full' (state.update_path(batch)), "
                     f"got {update!r}.")
  if update == "sparse":
    out = {"outputs": batch * classes * float_bytes, "counts": 4 * batch, "scalars": 3 * 4}
  else:
    out = {"outputs": batch * classes * float_bytes, "counts": max(float_bytes, 4) * batch,
           "scalars": 4}
  out["total"] = sum(out.values())
  return out
