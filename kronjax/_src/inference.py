"""Predictions, evaluation and export of a trained network.

Shapes: m neurons, n training points, n_e eval points, n' new points, d input
dimension, C outputs.

* ``evaluate``: loss/accuracy from the maintained projections; no ``d``.
* ``predict``: on the training or registered eval points, from the maintained
  projections (``O(m n)``); on new data (explicit init only) it regenerates
  ``W0`` in chunks: ``O(m d n')`` for the ``W0`` term plus ``O(m n n')`` for ``A K``.
* ``dense_params``: ``{"W": W0 + A X (m, d), "a"}`` when ``d`` fits in memory.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src import initializers, losses
from kronjax._src.kron import KronData, check_compatible
from kronjax._src.state import TrainState


def outputs_from_projections(state: TrainState, P: jax.Array) -> jax.Array:
  """Network outputs ``(n', C)`` from projections ``P (m, n')``."""
  return losses.hidden(P, state.b).T @ state.a / math.sqrt(state.config.width)


def evaluate(state: TrainState) -> dict[str, jax.Array]:
  """Full-data loss (and accuracy for softmax) on the training and registered eval points.

  Returns ``{"train_loss", "train_accuracy"[, "eval_loss", "eval_accuracy"]}``
  (accuracies are NaN for mse). Cost ``O(m (n + n_e) C)``; jit-able.
  """
  kind = state.config.loss
  out = outputs_from_projections(state, state.P)
  result = {"train_loss": losses.batch_loss(kind, out, state.labels),
            "train_accuracy": losses.accuracy(kind, out, state.labels)}
  if state.P_eval is not None and state.eval_labels is not None:
    out_e = outputs_from_projections(state, state.P_eval)
    result["eval_loss"] = losses.batch_loss(kind, out_e, state.eval_labels)
    result["eval_accuracy"] = losses.accuracy(kind, out_e, state.eval_labels)
  return result


def _check_unsharded(state: TrainState) -> None:
  if state.P.shape[0] != state.config.width:
    raise ValueError(
        f"state holds {state.P.shape[0]} neuron rows but config.width={state.config.width}: it is "
        "a padded neuron-sharded state (from fit(..., mesh=...)). Call "
        "kronjax.sharding.unshard_state(state) first.")


def _same_data(x: KronData, y: KronData | None) -> bool:
  if y is None:
    return False
  if x is y:
    return True
  if x.dims != y.dims or x.n != y.n or x.rank != y.rank:
    return False
  return all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(x.factors, y.factors))


def projections(state: TrainState, data: KronData, *, chunk: int | None = None) -> jax.Array:
  """``W X'^T`` ``(m, n')`` for ``data``, with ``W = W0 + A X`` the current weights."""
  if not isinstance(data, KronData):
    raise TypeError(f"data must be a kronjax.KronData, got {type(data).__name__}.")
  check_compatible("data", state.data, data)
  _check_unsharded(state)
  if _same_data(data, state.data):
    return state.P
  if _same_data(data, state.eval_data):
    return state.P_eval
  if state.config.init == "implicit":
    raise ValueError(
        "data is neither the training data nor the registered eval_data, and this state "
        "was initialized with init='implicit': W0 was never drawn in d dimensions, so "
        "projections of new points are undefined. Register the points at init "
        "(kronjax.init(..., eval_data=...)) or use init='explicit'.")
  keys = initializers.init_keys(state.key)
  (P0_new,) = initializers.explicit_projections(
      keys["W0"], state.config.width, data, chunk=chunk or state.config.init_chunk)
  return P0_new + state.A @ state.data.gram(other=data)


def predict(state: TrainState, data: KronData) -> jax.Array:
  """Network outputs ``(n', C)`` on ``data``.

  Training and registered eval points come from the maintained projections.
  Other points need ``init="explicit"``: ``W0`` is regenerated from the key in
  chunks of ``config.init_chunk`` neurons (cost ``O(m d n')``, memory
  ``O(chunk d)``) and ``A K(X, X')`` adds the learned part (``O(m n n')``).
  """
  return outputs_from_projections(state, projections(state, data))


def dense_params(state: TrainState, *, max_bytes: int = 4 * 2**30) -> dict[str, jax.Array]:
  """``{"W": W0 + A X (m, d), "a": (m, C)}``: the network as dense weights.

  Only for ``init="explicit"`` (implicit mode never drew ``W0``) and when the
  ``(m, d)`` weight fits in ``max_bytes``.
  """
  if state.config.init != "explicit":
    raise ValueError("dense_params needs init='explicit': an implicit-init state never drew "
                     "W0, only its projections onto the data.")
  _check_unsharded(state)
  m, d = state.config.width, state.data.dim
  itemsize = jnp.dtype(state.P.dtype).itemsize
  need = m * d * itemsize + state.data.n * d * itemsize
  if need > max_bytes:
    raise ValueError(
        f"dense_params would need {need / 2**30:.2f} GiB for W ({m} x {d}) and the "
        f"materialized data, more than max_bytes={max_bytes / 2**30:.2f} GiB; raise "
        "max_bytes if you have the memory, or use kronjax.predict / evaluate, which never form W.")
  keys = initializers.init_keys(state.key)
  W0 = initializers.explicit_weights(keys["W0"], m, d, state.P.dtype)
  return {"W": W0 + state.A @ state.data.materialize(), "a": state.a}



def dense_weights(state: TrainState, *, max_bytes: int = 4 * 2**30) -> jax.Array:
  """``W = W0 + A X`` ``(m, d)``: the hidden weights of ``dense_params`` (DESIGN §6 name)."""
  return dense_params(state, max_bytes=max_bytes)["W"]
