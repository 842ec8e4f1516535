"""How the training loop drives one kind of state: a single run, a sweep, a sharded run.

A runner is a small object with a few named methods (the ``Runner`` protocol, in
the manner of optax's ``GradientTransformation``): the loop (``loop.train``) is
written once and calls them by name.

* ``prepare(state, dataset)``: the state and dataset as the runner steps them
  (a copy, since the compiled step donates its input; sharded: laid out on the mesh);
* ``step(state, dataset, batch, mask)``: one compiled step (``mask`` ``(S,)``
  bool or None says which sweep members take it; the others keep their state);
* ``chunk(state, dataset, batches, count, mask, limit)``: up to ``count`` steps
  in one compiled loop (``run_chunk``), ending early after the first step the
  loop must see (``chunk_limit`` says how many steps a runner may take at once:
  1 for the sharded runner, which only has ``step``);
* ``evaluate(state, dataset)``: ``kronjax.evaluate``, per member for a sweep;
* ``regrow(state, plan_changes)``: the state under a changed plan (an overflow replay);
* ``resync(state, dataset)``: ``kronjax.resync``.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kronjax._src.data.dataset import Dataset
from kronjax._src.distributed import sharding
from kronjax._src.inference.inference import evaluate
from kronjax._src.step import step as step_lib
from kronjax._src.step.state import TrainState, resync, with_plan

Metrics = dict[str, Any]


class Runner(Protocol):
  """What ``loop.train`` needs of a runner (see the module docstring)."""

  name: str
  members: int | None   # None: one state (scalar metrics); S: a stacked sweep ((S,) metrics)
  chunk_limit: int      # the most steps one dispatch may take (1: ``chunk`` is never called)

  def prepare(self, state: TrainState, dataset: Dataset) -> tuple[TrainState, Dataset]: ...

  def step(self, state: TrainState, dataset: Dataset, batch: jax.Array,
           mask: jax.Array | None) -> tuple[TrainState, Metrics]: ...

  def chunk(self, state: TrainState, dataset: Dataset, batches: jax.Array, count: jax.Array,
            mask: jax.Array | None, limit: jax.Array) -> tuple[TrainState, Metrics, jax.Array]: ...

  def evaluate(self, state: TrainState, dataset: Dataset) -> Metrics: ...

  def regrow(self, state: TrainState, changes: dict[str, Any]) -> TrainState: ...

  def resync(self, state: TrainState, dataset: Dataset) -> TrainState: ...


@jax.jit
def fresh_copy(tree: Any) -> Any:
  """Copies of every leaf: the compiled step donates its input, so the loop trains a
  copy and the caller's state stays valid. One compiled copy (``copy=True`` is a copy
  under ``jit`` too): a dispatch per leaf cost more than the copies."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


_step = jax.jit(step_lib.step, donate_argnums=0)
_evaluate = jax.jit(evaluate)
_resync = jax.jit(resync)

CHUNK_LIMIT = 4096
"""The most steps ``fit``'s ``chunk="auto"`` takes in one compiled chunk."""


def run_chunk(step_fn, state: TrainState, dataset: Dataset, batches: jax.Array,
              count: jax.Array, live: jax.Array, limit: jax.Array
              ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
  """Steps ``batches[0], batches[1], ...`` ``(K, B)`` in one ``lax.while_loop``.

  Runs ``count`` steps, or fewer: the loop ends after the first step where a
  member in ``live`` was skipped (overflow, invalid batch, other dataset,
  non-finite loss) or its loss passed ``limit``, so the state comes back as the
  step-by-step loop has it when it must act on that step (replay, raise, stop),
  and no later step of the chunk has run. Each step is ``step_fn`` exactly, so
  the result is bit-identical to calling it ``count`` times.

  Args:
    step_fn: ``(state, dataset, batch) -> (state, metrics)``.
    batches: ``(K, B)`` int32; only the first ``count`` rows are read.
    count: () int32, in ``[1, K]``.
    live: ``(S,)`` or () bool: the members whose failures end the chunk.
    limit: ``(S,)`` or () float: the loss past which a member diverges (inf: no limit).

  Returns:
    ``(state, packed, taken)``: ``taken`` () int32 is the steps run; ``packed``
    holds every metric stacked ``(K, ...)`` (rows from ``taken`` on are zeros),
    the metrics of one dtype and shape side by side in one array (one transfer
    each, not one per metric): ``unpack`` names them again.
  """
  size = batches.shape[0]
  shapes = jax.eval_shape(step_fn, state, dataset, batches[0])[1]
  groups: dict[tuple, list[str]] = {}
  for name, s in shapes.items():
    groups.setdefault((s.shape, jnp.dtype(s.dtype)), []).append(name)
  packed = {",".join(names): jnp.zeros((size,) + shape + (len(names),), dtype)
            for (shape, dtype), names in groups.items()}

  def cond(carry):
    i, _, _, halt = carry
    return (i < count) & ~halt

  def body(carry):
    i, state, packed, _ = carry
    state, metrics = step_fn(state, dataset, batches[i])
    packed = {key: rows.at[i].set(jnp.stack([metrics[n] for n in key.split(",")], axis=-1))
              for key, rows in packed.items()}
    # loss > limit is False for NaN: a skipped step is caught by its status.
    halt = (metrics["status"] != step_lib.Status.OK) | (metrics["loss"] > limit)
    return i + 1, state, packed, jnp.any(live & halt)

  start = (jnp.zeros((), jnp.int32), state, packed, jnp.zeros((), bool))
  taken, state, packed, _ = jax.lax.while_loop(cond, body, start)
  return state, packed, taken


def unpack(packed: dict[str, Any]) -> dict[str, Any]:
  """``run_chunk``'s packed metrics as ``{name: (K, ...)}`` (views, no copies)."""
  return {name: rows[..., j] for key, rows in packed.items()
          for j, name in enumerate(key.split(","))}


def _chunk_of(step_fn):
  return jax.jit(lambda state, dataset, batches, count, live, limit: run_chunk(
      step_fn, state, dataset, batches, count, live, limit), donate_argnums=0)


_chunk = _chunk_of(step_lib.step)


class Single:
  """One state on one device: ``kronjax.fit``."""

  name = "kronjax.fit"
  members = None
  chunk_limit = 1 << 30

  def prepare(self, state, dataset):
    return fresh_copy(state), dataset

  def step(self, state, dataset, batch, mask):
    del mask  # one member: the loop only steps it while it trains
    return _step(state, dataset, batch)

  def chunk(self, state, dataset, batches, count, mask, limit):
    del mask
    return _chunk(state, dataset, batches, count, np.ones((), bool), limit[0])

  def evaluate(self, state, dataset):
    return _evaluate(state, dataset)

  def regrow(self, state, changes):
    return with_plan(state, **changes)

  def resync(self, state, dataset):
    return _resync(state, dataset)


def _masked_step(state, dataset, batch_idx, mask):
  new, metrics = step_lib.step(state, dataset, batch_idx)
  return jax.tree.map(lambda x, y: jnp.where(mask, x, y), new, state), metrics


sweep_step = jax.jit(jax.vmap(step_lib.step, in_axes=(0, None, None)), donate_argnums=0)
masked_sweep_step = jax.jit(jax.vmap(_masked_step, in_axes=(0, None, None, 0)),
                            donate_argnums=0)
_evaluate_sweep = jax.jit(jax.vmap(evaluate, in_axes=(0, None)))
_sweep_chunk = _chunk_of(jax.vmap(step_lib.step, in_axes=(0, None, None)))
# Some members stopped: each step keeps their state (the mask is the chunk's live set).
_masked_sweep_chunk = jax.jit(
    lambda state, dataset, batches, count, mask, limit: run_chunk(
        lambda s, d, b: jax.vmap(_masked_step, in_axes=(0, None, None, 0))(s, d, b, mask),
        state, dataset, batches, count, mask, limit), donate_argnums=0)
_resync_sweep = jax.jit(jax.vmap(resync, in_axes=(0, None)))


class Sweep:
  """A stacked sweep of ``members`` states, vmapped: ``kronjax.sweep.fit``."""

  name = "kronjax.sweep.fit"

  def __init__(self, members: int):
    self.members = members

  def prepare(self, state, dataset):
    return fresh_copy(state), dataset

  chunk_limit = 1 << 30

  def step(self, state, dataset, batch, mask):
    if mask is None:
      return sweep_step(state, dataset, batch)
    return masked_sweep_step(state, dataset, batch, mask)

  def chunk(self, state, dataset, batches, count, mask, limit):
    # All members live: the unmasked step, as ``step`` (no O(S m n) select per step).
    if mask is None:
      return _sweep_chunk(state, dataset, batches, count, np.ones((self.members,), bool), limit)
    return _masked_sweep_chunk(state, dataset, batches, count, mask, limit)

  def evaluate(self, state, dataset):
    return _evaluate_sweep(state, dataset)

  def regrow(self, state, changes):
    return jax.vmap(lambda s: with_plan(s, **changes))(state)

  def resync(self, state, dataset):
    return _resync_sweep(state, dataset)


class Sharded:
  """One state with its neurons sharded over ``mesh``: ``kronjax.fit(..., mesh=mesh)``.

  Checkpoints are written shard by shard, each process its own (nothing is
  gathered), and ``kronjax.checkpoint.load`` restores them onto any layout.

  Steps one batch per dispatch (``chunk_limit = 1``): every process must issue
  the same collectives in the same order, and a compiled loop whose trip count
  depends on per-step results (a chunk ends at the first overflow) is not
  checked to stay in lockstep across processes, so the loop is left on the host.
  """

  name = "kronjax.fit"
  members = None
  chunk_limit = 1

  def __init__(self, mesh: Mesh, axis_name: str | None = None):
    self.mesh, self.axis_name = mesh, axis_name
    self._step = sharding.compiled_step(mesh, axis_name)

  def prepare(self, state, dataset):
    return (sharding.shard_state(state, self.mesh, self.axis_name),
            sharding.replicate(dataset, self.mesh))

  def step(self, state, dataset, batch, mask):
    del mask  # one member
    return self._step(state, dataset, batch)

  def evaluate(self, state, dataset):
    return _evaluate(state, dataset)

  def regrow(self, state, changes):
    return sharding.shard_state(with_plan(state, **changes), self.mesh, self.axis_name)

  def resync(self, state, dataset):
    # On one device (each process): P = P0 + A K needs all of K.
    local = jax.tree.map(sharding.local_part, dataset)
    return sharding.shard_state(_resync(sharding.unshard_state(state), local), self.mesh,
                                self.axis_name)
