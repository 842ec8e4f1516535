"""The dense baseline: the same network trained on explicit ``(n, d)`` inputs.

It is the reference of every equivalence test and the opponent in every
benchmark, so it is written as a careful JAX user would: one fused jit-compiled
forward/backward, optax, donated buffers.

Shapes: m neurons, d input dimension, n points, B batch, C outputs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kronjax._src.model import initializers
from kronjax._src.model import losses
from kronjax._src.step import optim
from kronjax._src.model.config import Config


class DenseState(NamedTuple):
  params: dict          # {"W": (m, d)[, "a": (m, C)][, "bias": (C,)]}: the trained parameters
  a: jax.Array          # (m, C) output layer (also in params when it is trained)
  bias: jax.Array       # (C,) output bias (also in params when it is trained)
  b: jax.Array          # () threshold
  opt_state: Any
  step: jax.Array       # () int32


def init(key: jax.Array, config: Config, dims: int | tuple[int, ...],
         tx: optax.GradientTransformation, *, dtype=None, threshold: Any = None) -> DenseState:
  """The network ``kronjax.init`` builds from the same key, with ``W (m, d)`` explicit.

  Args:
    dims: the factor dims ``(d_1, ..., d_p)`` of the data (an int ``d`` is
      accepted for ``init="explicit"``, whose ``W0`` does not depend on them).
  """
  dtype = dtype or jnp.result_type(float)
  config = config.resolve()
  if isinstance(dims, int):
    if config.init == "kronecker":
      raise ValueError("dims must be the tuple of factor dims for init='kronecker' (its W0 is "
                       f"a sum of Kronecker products of them), got the int {dims}.")
    dims = (dims,)
  keys = initializers.init_keys(key)
  W = initializers.initial_weights(keys["W0"], config, tuple(dims), dtype)
  a = initializers.output_layer(keys["a"], config.width, config.num_classes, dtype,
                                centered=config.centered)
  bias = jnp.zeros((config.num_classes,), dtype)
  params = {"W": W}
  if config.train_output:
    params["a"] = a
  if config.output_bias:
    params["bias"] = bias
  b = jnp.asarray(config.threshold if threshold is None else threshold, dtype)
  return DenseState(params, a, bias, b, tx.init(params), jnp.zeros((), jnp.int32))


def forward(W: jax.Array, a: jax.Array, b: jax.Array, X: jax.Array,
            bias: jax.Array | None = None) -> jax.Array:
  """Network outputs ``(n, C)`` for inputs ``X (n, d)`` (plus the ``(C,)`` ``bias``)."""
  m = W.shape[0]
  out = losses.hidden(X @ W.T, b) @ a / math.sqrt(m)
  return out if bias is None else out + bias[None, :]


def make_step(config: Config, tx: optax.GradientTransformation, *, donate: bool = True):
  """A jit-compiled ``step(state, X_batch (B, d), y_batch) -> (state, metrics)``.

  ``y_batch`` is the batch's labels in the form ``config.loss`` takes them: ``(B, C)``
  floats (mse), ``(B,)`` class ids (softmax), or for a loss of one's own
  (``Config(loss=fn)``) the batch's rows of the label pytree,
  ``jax.tree.map(lambda x: x[idx], labels)``; ``fn(outputs (B, C), y_batch)`` is
  differentiated through the network as kronjax differentiates it through the outputs.

  ``metrics``: ``loss`` (before the step) and ``active`` (mean active neurons per point).
  """
  # Same contract as kronjax, so comparisons are apples to apples.
  config = config.resolve()
  keys = ("W",) + (("a",) if config.train_output else ()) + (("bias",) if config.output_bias else ())
  optim.check_linear(tx, keys=keys)

  def loss_fn(params, a, bias, b, X, y):
    a = params.get("a", a)
    pre = X @ params["W"].T                                        # (B, m)
    out = losses.hidden(pre, b) @ a / math.sqrt(a.shape[0]) + params.get("bias", bias)[None, :]
    active = jnp.mean(jnp.sum(pre > b, axis=1).astype(X.dtype))
    return losses.batch_loss(config.loss, out, y), active

  def step(state: DenseState, X: jax.Array, y: jax.Array):
    (loss, active), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.a, state.bias, state.b, X, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    a, bias = params.get("a", state.a), params.get("bias", state.bias)
    return (DenseState(params, a, bias, state.b, opt_state, state.step + 1),
            {"loss": loss, "active": active})

  return jax.jit(step, donate_argnums=(0,) if donate else ())


def evaluate(state: DenseState, config: Config, X: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """Loss (and accuracy for softmax; NaN otherwise) of the dense network on ``X (n, d)``;
  ``y`` as ``config.loss`` takes it (a pytree for a loss of one's own)."""
  out = forward(state.params["W"], state.a, state.b, X, state.bias)
  return {"loss": losses.batch_loss(config.loss, out, y),
          "accuracy": losses.accuracy(config.loss, out, y)}
