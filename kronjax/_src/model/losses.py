"""Losses shared by the kernel-space step and the dense baseline.

Shapes: B batch, C outputs. ``outputs`` are ``(B, C)``; ``labels`` are ``(B, C)``
floats for ``mse`` and ``(B,)`` integer class ids for ``softmax``.
Both losses are batch *means*, so the output gradient carries the ``1/B``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax._src.base import checks


def batch_loss(kind: str, outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Scalar batch-mean loss."""
  if kind == "mse":
    return 0.5 * jnp.mean(jnp.sum((outputs - labels) ** 2, axis=-1))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))


def loss_and_output_grad(kind: str, outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(loss, dloss/doutputs)``; the gradient is ``(B, C)``."""
  return jax.value_and_grad(lambda f: batch_loss(kind, f, labels))(outputs)


def accuracy(kind: str, outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of correct class predictions (softmax only; NaN for mse)."""
  if kind != "softmax":
    return jnp.asarray(jnp.nan, outputs.dtype)
  return jnp.mean(jnp.argmax(outputs, axis=-1) == labels)


def hidden(pre: jax.Array, b: jax.Array) -> jax.Array:
  """The shifted ReLU ``relu(z - b)``; its derivative at ``z == b`` is 0, as in ``jax.nn.relu``."""
  return jax.nn.relu(pre - b)


def check_labels(kind: str, num_classes: int, labels, n: int, name: str = "labels") -> jax.Array:
  """Validates labels for ``n`` points and returns them in the step's layout.

  mse: ``(n,)`` (when C == 1) or ``(n, C)`` finite floats -> ``(n, C)``.
  softmax: ``(n,)`` integer class ids in ``[0, C)`` -> ``(n,)`` int32.
  """
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
