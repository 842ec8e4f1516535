"""Using a trained network: evaluation, predictions on any input, dense export.

Shapes: m neurons, n training points, n_e eval points, n' new points, d input
dimension, C outputs.

* ``evaluate``: loss/accuracy from the maintained projections; no ``d``.
* ``predict``: on the dataset's training or eval points, from the maintained
  projections (``O(m n)``); on other points ``W X'^T = W0 X'^T + A K(X, X')``,
  with ``W0 X'^T`` from the init (``kronecker``: from the factors,
  ``O(n' m R sum_q d_q)``; ``explicit``: ``W0`` regenerated in chunks,
  ``O(m d n')``; ``implicit`` never drew ``W0`` and refuses) and the learned
  part ``A K(X, X')`` in ``O(n' n sum_q d_q + m n n')``.
* ``dense_params``: ``{"W": W0 + A X (m, d), "a"}`` when ``d`` fits in memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.model import initializers
from kronjax._src.model import losses
from kronjax._src.inference import network
from kronjax._src.data.dataset import Dataset
from kronjax._src.data.kron_data import KronData
from kronjax._src.step.state import TrainState


def outputs_from_projections(state: TrainState, P: jax.Array) -> jax.Array:
  """Network outputs ``(n', C)`` from projections ``P (m, n')``."""
  return network.outputs(state.config, state.a, state.b, state.bias, P)


def evaluate(state: TrainState, dataset: Dataset) -> dict[str, jax.Array]:
  """Full-data metrics on the dataset's training and eval points, named for what they are.

  Returns, for each split (``train_``, and ``eval_`` with an eval split):

  * ``loss``: the training objective, the batch-mean loss over the whole split (for
    ``mse`` that is *half* the mean squared error, ``1/2 mean ||f - y||^2``);
  * mse: ``mse`` (the mean squared error, summed over outputs) and ``rmse`` (its root);
  * softmax: ``accuracy``.

  For a loss of one's own (``Config(loss=fn)``) only ``loss``: ``fn`` over the whole
  split at once (for a loss that couples points, a pairwise ranking loss, that is
  every pair of the split, not a mean over batches).

  Cost ``O(m (n + n_e) C)``; jit-able. A stacked sweep state is evaluated member-wise
  with ``jax.vmap(kronjax.evaluate, in_axes=(0, None))``; given one directly it is refused.
  """
  network.check_single_state(state)
  state.check_dataset(dataset)
  result = _metrics("train", state, state.P, dataset.labels)
  if state.P_eval is not None and dataset.eval_labels is not None:
    result.update(_metrics("eval", state, state.P_eval, dataset.eval_labels))
  return result


def _metrics(split: str, state: TrainState, P: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  kind = state.config.loss
  out = outputs_from_projections(state, P)
  labels = _labels(state, labels)
  loss = losses.batch_loss(kind, out, labels)
  if not losses.is_named(kind):
    return {f"{split}_loss": loss}
  if kind == "mse":
    return {f"{split}_loss": loss, f"{split}_mse": 2 * loss, f"{split}_rmse": jnp.sqrt(2 * loss)}
  return {f"{split}_loss": loss, f"{split}_accuracy": losses.accuracy(kind, out, labels)}


def _labels(state: TrainState, labels: Any) -> Any:
  if losses.is_named(state.config.loss) and state.config.loss == "mse":
    return labels.reshape(labels.shape[0], -1).astype(state.a.dtype)
  return labels


def check_unsharded(state: TrainState) -> None:
  if state.P.shape[0] != state.config.width:
    raise ValueError(
        f"state holds {state.P.shape[0]} neuron rows but config.width={state.config.width}: it is "
        "a padded neuron-sharded state (from fit(..., mesh=...)). Call "
        "kronjax.sharding.unshard_state(state) first.")


def _same_data(x: KronData, y: KronData | None) -> bool:
  """``x`` holds the points of ``y`` (compared by value on the host; traced points are
  other points, whose projections are computed: the same numbers, exactly)."""
  if y is None:
    return False
  if x is y:
    return True
  if not all(checks.is_concrete(f) for f in jax.tree.leaves((x, y))):
    return False
  if (x.dims != y.dims or x.n != y.n or x.rank != y.rank or x.is_indexed != y.is_indexed
      or x.entity_counts != y.entity_counts):
    return False
  if x.is_indexed and not np.array_equal(np.asarray(x.index), np.asarray(y.index)):
    return False
  return all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(x.factors, y.factors))


def projections(state: TrainState, dataset: Dataset, data: KronData) -> jax.Array:
  """``W X'^T`` ``(m, n')`` for ``data`` (normalized first when the dataset's points were),
  with ``W = W0 + A X`` the current weights."""
  network.check_single_state(state)
  state.check_dataset(dataset)
  data = network.prepare_new_data("data", dataset.data, data, dataset.normalized)
  check_unsharded(state)
  if _same_data(data, dataset.data):
    return state.P
  if _same_data(data, dataset.eval_data):
    return state.P_eval
  return network.new_projections(state.config, state.key, state.A, dataset.data, data,
                                 state.w0_scale)


def predict(state: TrainState, dataset: Dataset, data: KronData) -> jax.Array:
  """Network outputs ``(n', C)`` on the points ``data`` (any ``KronData`` in the dataset's space).

  The dataset's training and eval points come from the maintained projections
  (recognized by value on the host; under ``jax.jit`` every point is computed from
  the weights, which gives the same numbers up to rounding).
  Other points: ``W0 X'^T`` from the init (module docstring; ``implicit``
  refuses) plus the learned ``A K(X, X')``. No ``O(d)`` work for ``kronecker``.

  ``data`` are raw points, prepared as the dataset's were: normalized when the
  dataset was built with ``normalize=True`` (per point; per entity row for
  indexed data), else taken as they are, with a ``NormWarning`` when they are not
  unit-norm. A stacked sweep state: ``jax.vmap(kronjax.predict, in_axes=(0, None,
  None))``; given one directly it is refused.

  Raises:
    TypeError: ``data`` is not a KronData; ``state`` is a stacked sweep state.
    ValueError: another factor count or dims, NaN/inf values, a state built for
      another dataset, or ``init="implicit"`` and points outside the dataset.
  """
  return outputs_from_projections(state, projections(state, dataset, data))


def dense_params(state: TrainState, dataset: Dataset, *,
                 max_bytes: int = 4 * 2**30) -> dict[str, jax.Array]:
  """``{"W": s W0 + A X (m, d), "a": (m, C), "bias": (C,)}``: the network as dense weights.

  For ``init="explicit"`` and ``"kronecker"`` (``implicit`` never drew ``W0``),
  when the ``(m, d)`` weight fits in ``max_bytes``. The dense baseline
  (``kronjax.dense.init(..., W0=dense_params(state0, dataset)["W"])``) starts
  from this network.
  """
  network.check_single_state(state)
  state.check_dataset(dataset)
  config = state.config
  if config.init == "implicit":
    raise ValueError("dense_params needs init='kronecker' or 'explicit': an implicit-init state "
                     "never drew W0, only its projections onto the data.")
  check_unsharded(state)
  m, d = config.width, dataset.data.dim
  itemsize = jnp.dtype(state.P.dtype).itemsize
  need = m * d * itemsize + dataset.n * d * itemsize
  if need > max_bytes:
    raise ValueError(
        f"dense_params would need {need / 2**30:.2f} GiB for W ({m} x {d}) and the "
        f"materialized data, more than max_bytes={max_bytes / 2**30:.2f} GiB; raise "
        "max_bytes if you have the memory, or use kronjax.predict / evaluate, which never form W.")
  W0 = initializers.initial_weights(initializers.init_keys(state.key)["W0"], config,
                                    dataset.data.dims, state.P.dtype)
  return {"W": state.w0_scale * W0 + state.A @ dataset.data.materialize(), "a": state.a,
          "bias": state.bias}
