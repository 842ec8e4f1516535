"""The training state and its constructor ``kronjax.init``.

Shapes: m neurons, n training points, n_e registered eval points, C outputs.

The state is a pytree: arrays are leaves (so ``jax.vmap`` maps them and ``jit``
traces them); the ``Config`` and the optax transformation are static metadata.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kronjax._src import checks, initializers, losses, optim
from kronjax._src import index as index_lib
from kronjax._src.config import Config
from kronjax._src.kron import KronData, check_compatible


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything one training run carries from step to step.

  Attributes:
    projections: the projections ``P[r, j] = <w_r, x_j>`` of the training points,
      stored as ``config.resolved_layout`` says: ``(m, n)`` (``"neurons"``) or
      ``(n, m)`` (``"points"``). ``state.P`` is the ``(m, n)`` view either way.
    A_T: ``(n, m)`` coefficients, transposed: ``W = W0 + A X`` with ``A = A_T.T``
      (zeros at init). Stored point-major because a step writes the ``B`` batch
      *columns* of ``A``: rows of ``A_T`` are contiguous, columns of ``A`` are not
      (2.3 ms vs 0.06 ms per step at m = 4096, n = 1024, B = 32 on XLA CPU).
      ``state.A`` is the ``(m, n)`` view.
    a: ``(m, C)`` output layer.
    b: ``()`` ReLU threshold (an array so sweeps can vmap it).
    opt_state: the optax state over the tree ``{"A", "P"[, "a"][, "P_eval"]}``
      (its ``"A"`` leaf is ``A_T``-shaped, ``(n, m)``; its ``"P"`` leaf is
      shaped as ``projections``).
    step: ``()`` int32, number of applied steps.
    key: the key the state was initialized from (W0 and ``a`` are derived from it).
    index: the threshold index state (kind chosen by ``config.index``).
    P_eval: ``(m, n_e)`` maintained projections of registered eval points, or None.
    data, labels: the training points and their labels (``(n, C)`` or ``(n,)``).
    gram: ``(n, n)`` data Gram when ``config.gram == "precomputed"``, else None.
    gram_eval: ``(n, n_e)`` cross Gram to the eval points (precomputed), else None.
    eval_data, eval_labels: registered eval points and labels, or None.
    config, tx, shape_free_tx, index_kind: static metadata.
  """

  projections: jax.Array
  A_T: jax.Array
  a: jax.Array
  b: jax.Array
  opt_state: Any
  step: jax.Array
  key: jax.Array
  index: Any
  P_eval: jax.Array | None
  data: KronData
  labels: jax.Array
  gram: jax.Array | None
  gram_eval: jax.Array | None
  eval_data: KronData | None
  eval_labels: jax.Array | None
  config: Config = dataclasses.field(metadata=dict(static=True))
  tx: optax.GradientTransformation = dataclasses.field(metadata=dict(static=True))
  shape_free_tx: bool = dataclasses.field(metadata=dict(static=True))
  index_kind: str = dataclasses.field(metadata=dict(static=True))

  def replace(self, **changes: Any) -> "TrainState":
    """A copy with ``changes``; ``P=`` takes the ``(m, n)`` view and is stored in
    this state's layout (``(S, m, n)`` in a sweep)."""
    if "P" in changes:
      if "projections" in changes:
        raise ValueError("replace got both P and projections; pass one of them.")
      P = changes.pop("P")
      changes["projections"] = P if self.layout == "neurons" else jnp.swapaxes(P, -1, -2)
    return dataclasses.replace(self, **changes)

  @property
  def layout(self) -> str:
    """``"neurons"`` (``projections`` is ``(m, n)``) or ``"points"`` (``(n, m)``)."""
    return self.config.resolved_layout

  @property
  def P(self) -> jax.Array:
    """``(m, n)`` projections of the training points (``(S, m, n)`` in a sweep); a
    transposed view of ``projections`` in the ``"points"`` layout."""
    if self.layout == "neurons" or not hasattr(self.projections, "ndim"):
      return self.projections  # (also a spec tree's PartitionSpec, as stored)
    return jnp.swapaxes(self.projections, -1, -2)

  @property
  def width(self) -> int:
    return self.config.width

  @property
  def A(self) -> jax.Array:
    """``(m, n)`` coefficients, ``W = W0 + A X`` (a view of ``A_T``; ``(S, m, n)`` in a sweep)."""
    return jnp.swapaxes(self.A_T, -1, -2)

  def trainable(self) -> dict[str, jax.Array]:
    """The tree the optimizer acts on: ``{"A", "P"[, "a"][, "P_eval"]}``."""
    return trainable_tree(self.A_T, self.projections, self.a, self.P_eval, self.config)


jax.tree_util.register_dataclass(
    TrainState,
    data_fields=[f.name for f in dataclasses.fields(TrainState) if not f.metadata.get("static")],
    meta_fields=[f.name for f in dataclasses.fields(TrainState) if f.metadata.get("static")],
)


def trainable_tree(A_T, P, a, P_eval, config: Config) -> dict[str, jax.Array]:
  tree = {"A": A_T, "P": P}
  if config.train_output:
    tree["a"] = a
  if P_eval is not None:
    tree["P_eval"] = P_eval
  return tree


def index_for(state_or_config, n: int | None = None, kind: str | None = None) -> index_lib.ThresholdIndex:
  """The ThresholdIndex functions for a state (or a config plus ``n`` and kind)."""
  if isinstance(state_or_config, TrainState):
    config, n, kind = state_or_config.config, state_or_config.data.n, state_or_config.index_kind
  else:
    config = state_or_config
  return index_lib.make_index(
      kind, width=config.width, active_capacity=config.active_capacity,
      candidate_capacity=config.candidate_capacity, delta=config.index_delta, n=n)


def init(key: jax.Array, config: Config, data: KronData, labels: Any,
         tx: optax.GradientTransformation, *, eval_data: KronData | None = None,
         eval_labels: Any = None, threshold: Any = None) -> TrainState:
  """Builds the initial ``TrainState``.

  Args:
    key: PRNG key; ``W0`` and ``a`` are drawn from it exactly as
      ``kronjax.dense.init`` draws them, so both start from the same network.
      May be traced: ``jax.vmap(lambda k: kronjax.init(k, ...))(keys)`` works.
    config: static settings (``kronjax.Config``).
    data: training points ``KronData`` (n points).
    labels: ``(n, C)`` / ``(n,)`` floats for mse, ``(n,)`` int class ids for softmax.
    tx: an optax transformation that is linear in the gradient (sgd, momentum,
      nesterov, schedules, ``inject_hyperparams``); others raise ValueError.
    eval_data, eval_labels: optional held-out points whose projections are
      initialized consistently with ``W0`` and maintained every step.
    threshold: optional ``b`` overriding ``config.threshold``; may be a traced
      scalar (sweeps over ``b``).

  Raises:
    TypeError / ValueError for invalid arguments, before any work is done.
  """
  if not isinstance(config, Config):
    raise TypeError(f"config must be a kronjax.Config, got {type(config).__name__}.")
  if not isinstance(data, KronData):
    raise TypeError(f"data must be a kronjax.KronData, got {type(data).__name__}; "
                    "wrap your factors with kronjax.KronData((u, v, ...)).")
  labels = losses.check_labels(config.loss, config.num_classes, labels, data.n, "labels")
  if eval_data is not None:
    check_compatible("eval_data", data, eval_data)
    if eval_labels is not None:
      eval_labels = losses.check_labels(config.loss, config.num_classes, eval_labels,
                                        eval_data.n, "eval_labels")
  elif eval_labels is not None:
    raise ValueError("eval_labels was given without eval_data; pass both or neither.")
  optim.check_linear(tx, keys=trainable_tree(0, 0, 0, None if eval_data is None else 0, config))
  if threshold is not None and checks.is_concrete(threshold):
    if not math.isfinite(float(jnp.asarray(threshold))):
      raise ValueError(f"threshold must be finite, got {threshold}.")

  # The state owns fresh buffers: a step jitted with donate_argnums=0 must not
  # delete the caller's key, data or labels.
  key, data, labels, eval_data, eval_labels = _fresh((key, data, labels, eval_data, eval_labels))
  dtype = data.dtype
  m, n, C = config.width, data.n, config.num_classes
  keys = initializers.init_keys(key)
  extra = () if eval_data is None else (eval_data,)
  gram = data.gram() if config.gram == "precomputed" else None
  if config.init == "explicit":
    projections = initializers.explicit_projections(keys["W0"], m, data, chunk=config.init_chunk,
                                                    extra=extra)
  else:
    projections = initializers.implicit_projections(keys["W0"], m, data, extra=extra, gram=gram)
  P = projections[0]                                                    # (m, n)
  P_eval = projections[1] if eval_data is not None else None
  stored = P if config.resolved_layout == "neurons" else jnp.array(P.T)
  gram_eval = (data.gram(other=eval_data)
               if eval_data is not None and config.gram == "precomputed" else None)
  a = initializers.output_layer(keys["a"], m, C, dtype)
  b = jnp.asarray(config.threshold if threshold is None else threshold, dtype)
  A_T = jnp.zeros((n, m), dtype)
  opt_state = tx.init(trainable_tree(A_T, stored, a, P_eval, config))
  kind = _index_kind(config, n)
  index_state = _fresh(index_for(config, n, kind).build(P, b))
  return TrainState(
      projections=stored, A_T=A_T, a=a, b=b, opt_state=opt_state, step=jnp.zeros((), jnp.int32), key=key,
      index=index_state, P_eval=P_eval, data=data, labels=labels, gram=gram,
      gram_eval=gram_eval, eval_data=eval_data, eval_labels=eval_labels, config=config, tx=tx,
      shape_free_tx=optim.is_shape_free(tx, trainable_tree(A_T, stored, a, P_eval, config)),
      index_kind=kind)


def with_config(state: TrainState, **changes: Any) -> TrainState:
  """The same state under a changed static config, with the index rebuilt from ``P``.

  Used to grow capacities after an overflow (``fit`` replays the step with it)
  or to switch index kind / update path / layout (``P`` and the optimizer's
  ``"P"`` leaves are transposed when the layout changes: exact). Only settings
  that do not change the network may differ: width, loss, classes, init and
  train_output may not.
  """
  fixed = ("width", "loss", "num_classes", "init", "train_output", "threshold", "gram")
  for name in changes:
    if name in fixed:
      raise ValueError(f"with_config cannot change {name!r}: it defines the network; "
                       "build a new state with kronjax.init instead.")
  config = state.config.replace(**changes)
  if config.resolved_layout != state.layout:
    state = _transpose_projections(state).replace(config=config)
  kind = _index_kind(config, state.data.n)
  new_index = _fresh(index_for(config, state.data.n, kind).build(state.P, state.b))
  index_state = _carry_rebuild_count(state.index, new_index)
  return state.replace(config=config, index_kind=kind, index=index_state)


def _index_kind(config: Config, n: int) -> str:
  """The index kind ``config.index`` stands for. The point-major layout runs only the
  dense path, which never queries an index: it always gets the trivial dense one."""
  if config.resolved_layout == "points":
    return "dense"
  return config.index if config.index != "auto" else index_lib.choose_kind(config.width, n)


TRAINABLE_KEYS = ("A", "P", "a", "P_eval")


def trainable_key(path: Any) -> str | None:
  """Which trainable leaf (``"A"``, ``"P"``, ``"a"``, ``"P_eval"``) an optimizer-state
  leaf mirrors: the innermost such dict key of its path (a ``multi_transform``
  label named ``"P"`` further out does not count), or None."""
  for k in reversed(tuple(path)):
    if getattr(k, "key", None) in TRAINABLE_KEYS:
      return k.key
  return None


def _transpose_projections(state: TrainState) -> TrainState:
  """``projections`` and the optimizer leaves mirroring ``P`` with their last two axes swapped."""
  def swap(path, x):
    mirrors_P = trainable_key(path) == "P"
    return jnp.swapaxes(x, -1, -2) if mirrors_P and getattr(x, "ndim", 0) >= 2 else x

  return dataclasses.replace(
      state, projections=jnp.swapaxes(state.projections, -1, -2),
      opt_state=jax.tree_util.tree_map_with_path(swap, state.opt_state))


def _fresh(tree):
  """Copies of the leaves: an index state may hold an input (``b``) as is, and two
  leaves sharing one buffer cannot both be donated to a jitted step."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _carry_rebuild_count(old, new):
  if hasattr(old, "rebuilds") and hasattr(new, "rebuilds") and hasattr(new, "_replace"):
    return new._replace(rebuilds=old.rebuilds)
  return new
