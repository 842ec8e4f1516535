"""How the training loop drives one kind of state: a single run, a sweep, a sharded run.

A runner is a small object with a few named methods (the ``Runner`` protocol, in
the manner of optax's ``GradientTransformation``): the loop (``loop.train``) is
written once and calls them by name.

* ``prepare(state, dataset)``: the state and dataset as the runner steps them
  (a copy, since the compiled step donates its input; sharded: laid out on the mesh);
* ``step(state, dataset, batch, mask)``: one compiled step (``mask`` ``(S,)``
  bool or None says which sweep members take it; the others keep their state);
* ``evaluate(state, dataset)``: ``kronjax.evaluate``, per member for a sweep;
* ``regrow(state, plan_changes)``: the state under a changed plan (an overflow replay);
* ``resync(state, dataset)``: ``kronjax.resync``.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
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

  def prepare(self, state: TrainState, dataset: Dataset) -> tuple[TrainState, Dataset]: ...

  def step(self, state: TrainState, dataset: Dataset, batch: jax.Array,
           mask: jax.Array | None) -> tuple[TrainState, Metrics]: ...

  def evaluate(self, state: TrainState, dataset: Dataset) -> Metrics: ...

  def regrow(self, state: TrainState, changes: dict[str, Any]) -> TrainState: ...

  def resync(self, state: TrainState, dataset: Dataset) -> TrainState: ...


def fresh_copy(tree: Any) -> Any:
  """Copies of every leaf: the compiled step donates its input, so the loop trains a
  copy and the caller's state stays valid."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


_step = jax.jit(step_lib.step, donate_argnums=0)
_evaluate = jax.jit(evaluate)
_resync = jax.jit(resync)


class Single:
  """One state on one device: ``kronjax.fit``."""

  name = "kronjax.fit"
  members = None

  def prepare(self, state, dataset):
    return fresh_copy(state), dataset

  def step(self, state, dataset, batch, mask):
    del mask  # one member: the loop only steps it while it trains
    return _step(state, dataset, batch)

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
_resync_sweep = jax.jit(jax.vmap(resync, in_axes=(0, None)))


class Sweep:
  """A stacked sweep of ``members`` states, vmapped: ``kronjax.sweep.fit``."""

  name = "kronjax.sweep.fit"

  def __init__(self, members: int):
    self.members = members

  def prepare(self, state, dataset):
    return fresh_copy(state), dataset

  def step(self, state, dataset, batch, mask):
    if mask is None:
      return sweep_step(state, dataset, batch)
    return masked_sweep_step(state, dataset, batch, mask)

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
  """

  name = "kronjax.fit"
  members = None

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
