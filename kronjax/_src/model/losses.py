"""Losses shared by the kernel-space step and the dense baseline.

Shapes: B batch, C outputs. ``outputs`` are ``(B, C)``; ``labels`` are ``(B, C)``
floats for ``mse``, ``(B,)`` integer class ids for ``softmax``, and for a loss of
one's own (``Config(loss=fn)``) whatever pytree the dataset holds, each leaf
indexed along its leading axis (``jax.tree.map(lambda x: x[idx], labels)``).

A loss is a function ``fn(outputs, labels) -> scalar``. The step needs only
``g = dL/doutputs`` ``(B, C)`` (``jax.value_and_grad`` of ``fn`` with respect to the
outputs), so any differentiable ``fn`` works, including losses that couple the
batch's points (a pairwise ranking loss). The two named losses are two such
functions (``mse`` and ``softmax_cross_entropy``); both are batch *means*, so the
output gradient carries the ``1/B``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax._src.base import checks


def mse(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """``loss="mse"``: batch mean of ``1/2 ||f - y||^2``; ``labels`` ``(B, C)`` floats."""
  return 0.5 * jnp.mean(jnp.sum((outputs - labels) ** 2, axis=-1))


def softmax_cross_entropy(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """``loss="softmax"``: batch mean cross-entropy; ``labels`` ``(B,)`` integer class ids."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


NAMED = {"mse": mse, "softmax": softmax_cross_entropy}


def is_named(loss: Any) -> bool:
  """True for the names ``"mse"`` and ``"softmax"`` (False for a callable loss)."""
  return isinstance(loss, str)


def loss_function(loss: str | Callable) -> Callable:
  """The function ``fn(outputs, labels) -> scalar`` of a config's ``loss``."""
  return NAMED[loss] if is_named(loss) else loss


def loss_name(loss: str | Callable) -> str:
  """What identifies ``loss`` in a checkpoint: the name, or the function's qualified name
  (``module.qualname``; ``functools.partial(module.qualname)`` for a partial)."""
  if is_named(loss):
    return loss
  func = getattr(loss, "func", None)
  if func is not None and callable(func):  # functools.partial
    return f"{type(loss).__module__}.{type(loss).__qualname__}({loss_name(func)})"
  module = getattr(loss, "__module__", None) or type(loss).__module__
  qualname = getattr(loss, "__qualname__", None) or type(loss).__qualname__
  return f"{module}.{qualname}"


def batch_loss(kind: str | Callable, outputs: jax.Array, labels: Any) -> jax.Array:
  """Scalar batch loss of ``outputs`` ``(B, C)`` (``kind``: a name or a callable)."""
  value = jnp.asarray(loss_function(kind)(outputs, labels))
  if value.shape != ():
    raise ValueError(
        f"loss must return a scalar (the batch's loss), but {loss_name(kind)} returned shape "
        f"{value.shape}; reduce it, e.g. with jnp.mean.")
  return value


def loss_and_output_grad(kind: str | Callable, outputs: jax.Array,
                         labels: Any) -> tuple[jax.Array, jax.Array]:
  """``(loss, dloss/doutputs)``; the gradient is ``(B, C)``, in the outputs' dtype."""
  loss, g = jax.value_and_grad(lambda f: batch_loss(kind, f, labels))(outputs)
  return loss, g.astype(outputs.dtype)


def accuracy(kind: str | Callable, outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of correct class predictions (softmax only; NaN for mse and callables)."""
  if not (is_named(kind) and kind == "softmax"):
    return jnp.asarray(jnp.nan, outputs.dtype)
  return jnp.mean(jnp.argmax(outputs, axis=-1) == labels)


def hidden(pre: jax.Array, b: jax.Array) -> jax.Array:
  """The shifted ReLU ``relu(z - b)``; its derivative at ``z == b`` is 0, as in ``jax.nn.relu``."""
  return jax.nn.relu(pre - b)


def is_array(labels: Any) -> bool:
  """Labels given as one array (or a list of numbers), not a pytree of several."""
  return hasattr(labels, "shape") or isinstance(labels, list)


def check_labels(kind: str | Callable, num_classes: int, labels, n: int,
                 name: str = "labels") -> Any:
  """Validates labels for ``n`` points and returns them in the step's layout.

  mse: ``(n,)`` (when C == 1) or ``(n, C)`` finite floats -> ``(n, C)``.
  softmax: ``(n,)`` integer class ids in ``[0, C)`` -> ``(n,)`` int32.
  callable: any pytree of arrays with leading axis ``n``, finite if float (as is).
  """
  if not is_named(kind):
    return checks.check_label_tree(labels, n, name)
  if not is_array(labels):
    raise TypeError(
        f"{name} is a {type(labels).__name__}, not an array: loss={kind!r} needs "
        f"{'(n,) or (n, C) float targets' if kind == 'mse' else '(n,) integer class ids'}. "
        "Labels that are a pytree (targets, weights, groups) need a loss of your own: "
        "kronjax.Config(loss=fn) with fn(outputs, labels) -> scalar.")
  if not hasattr(labels, "shape"):
    labels = np.asarray(labels)
  if kind == "mse":
    if labels.ndim == 1 and num_classes == 1:
      labels = labels[:, None]
    if labels.shape != (n, num_classes):
      raise ValueError(
          f"{name} must have shape ({n}, {num_classes}) for loss='mse' with num_classes="
          f"{num_classes} (or ({n},) when num_classes=1), got {tuple(labels.shape)}.")
    if not np.issubdtype(labels.dtype, np.floating):
      labels = jnp.asarray(labels).astype(jnp.result_type(float))
    checks.check_finite(name, labels)
    return jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(
        f"{name} must have shape ({n},) of integer class ids for loss='softmax', got "
        f"{tuple(labels.shape)}; pass class indices, not one-hot rows.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"{name} must hold integer class ids for loss='softmax', got dtype {labels.dtype}.")
  if checks.is_concrete(labels):
    arr = np.asarray(labels)
    if arr.min() < 0 or arr.max() >= num_classes:
      raise ValueError(
          f"{name} must hold class ids in [0, {num_classes}) (num_classes={num_classes}), "
          f"got values in [{int(arr.min())}, {int(arr.max())}].")
  return jnp.asarray(labels, jnp.int32)
