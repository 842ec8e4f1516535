"""The step's one ``O(m n)`` operation, ``X + G @ R``, with a batching rule for sweeps.

Shapes: m rows (neurons), B batch, n columns (points).

On the dense path every step adds ``G (m, B) @ K[S, :] (B, n)`` to ``P (m, n)``.
Under ``jax.vmap`` over sweep members (``kronjax.sweep``) with the batch and the
Gram shared, JAX's default rule folds the members into one tall product
``(S m, B) @ (B, n)`` whose ``(S, m, n)`` result is written out and then added
to ``P``. On a CPU that temporary does not fit in cache once ``S m n`` floats pass
a few MiB, and XLA's tall product itself ran at half the rate of the
per-member one (``experiments/bench_sweep.py``: the 16-member sweep at
m = 1024, n = 512 was 2x *slower* than 16 separate steps). ``add_product``
carries a ``jax.custom_batching.custom_vmap`` rule that, on CPU, loops over the
members inside the compiled program and updates each member's rows in place,
so the temporary is one member's ``(m, n)`` and stays in cache. On GPU and TPU,
where one member's product leaves the device idle, the rule keeps the batched
product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this many bytes of batched result the default batched product stays in
# cache and its single dispatch wins over a loop (measured: experiments/bench_sweep.py
# at m = 128, n = 64 runs ~0.2x of 16 sequential steps with the batched product).
LOOP_MIN_BYTES = 4 * 2**20


def _add_product(X: jax.Array, G: jax.Array, R: jax.Array) -> jax.Array:
  return X + G @ R


@jax.custom_jvp
def add_product(X: jax.Array, G: jax.Array, R: jax.Array) -> jax.Array:
  """``X + G @ R`` for ``X (m, n)``, ``G (m, B)``, ``R (B, n)``; returns ``(m, n)``.

  Exactly ``X + G @ R``; only its batching under ``jax.vmap`` differs from the
  plain expression (see the module docstring). Differentiable (forward and
  reverse mode) like the plain expression.
  """
  return _batched_add_product(X, G, R)


@add_product.defjvp
def _add_product_jvp(primals, tangents):
  # custom_vmap has no transpose rule: give autodiff the plain linear tangent.
  X, G, R = primals
  dX, dG, dR = tangents
  return add_product(X, G, R), dX + dG @ R + G @ dR


@jax.custom_batching.custom_vmap
def _batched_add_product(X: jax.Array, G: jax.Array, R: jax.Array) -> jax.Array:
  return _add_product(X, G, R)


@_batched_add_product.def_vmap
def _add_product_vmap(axis_size, in_batched, X, G, R):
  x_batched, g_batched, r_batched = in_batched
  out_bytes = axis_size * X.shape[-2] * X.shape[-1] * X.dtype.itemsize
  in_axes = tuple(0 if b else None for b in in_batched)
  # The in-place loop writes into X: only when the result keeps X's dtype (mixed
  # dtypes promote, as the plain expression does).
  same_dtype = jnp.result_type(X, G, R) == X.dtype

  def batched(X, G, R):
    return jax.vmap(_add_product, in_axes=in_axes)(X, G, R)

  if not x_batched or out_bytes < LOOP_MIN_BYTES or not same_dtype:
    return batched(X, G, R), True

  def looped(X, G, R):
    def member(i, X):
      g = G[i] if g_batched else G
      r = R[i] if r_batched else R
      # Slice, add and write back with the member axis kept (size 1): XLA then
      # fuses the three into one in-place pass; ``X[i] + ...`` copied X[i] first
      # (9.5 vs 7.3 ms for 16 members at m = 1024, n = 512).
      rows = jax.lax.dynamic_slice_in_dim(X, i, 1, 0) + (g @ r)[None]
      return jax.lax.dynamic_update_slice_in_dim(X, rows, i, 0)
    return jax.lax.fori_loop(0, axis_size, member, X)

  return jax.lax.platform_dependent(X, G, R, cpu=looped, default=batched), True
