"""The step's one ``O(m n)`` operation, ``X + G @ R``, and how it runs on each backend.

Shapes: m rows (neurons), B batch, n columns (points).

On the dense path every step adds ``G (m, B) @ K[S, :] (B, n)`` to ``P (m, n)``.

* CPU, native kernel available (``kronjax._src.kernels.native``, the default where a
  C++ compiler exists): in place, one BLAS ``gemm`` with ``beta = 1`` per member,
  or, when ``G`` is mostly zeros (inactive neurons), one axpy per nonzero.
  Under ``jax.vmap`` over sweep members all members go to one call, and the
  shared ``R`` (the batch's Gram rows) is not copied per member.
* CPU, XLA only (``KRONJAX_NATIVE=off``, ``dispatch.disabled()`` or no
  compiler): XLA's product into a temporary, then an add pass. Under
  ``jax.vmap`` JAX's default rule would fold the members into one tall product
  ``(S m, B) @ (B, n)`` whose ``(S, m, n)`` result is written out and then
  added; on a CPU that temporary does not fit in cache and a sweep runs slower
  than its members stepped one by one (the performance page). The batching
  rule instead loops over the members inside the compiled program and updates
  each member's rows in place.
* GPU and TPU: the plain expression and JAX's batched product (one member's
  product leaves the device idle; XLA fuses the add into the gemm there).

``trace_product`` is the momentum step built on the same kernel: a trace ``X`` and its array
``Y`` updated piece by piece (``X = mu X + nu Y + G @ R``, ``Y += c X``), each piece in cache.

Every variant is exactly ``X + G @ R`` up to float rounding order. The choice,
the switch and the custom_jvp / custom_vmap wrapping are ``kronjax._src.kernels.dispatch``'s;
here: the expression, the kernel call and the batching rule.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native

# Below this many bytes of batched result the default batched product stays in
# cache and its single dispatch wins over a loop (experiments/bench_sweep.py at
# small shapes). Read when a caller is traced.
LOOP_MIN_BYTES = 4 * 2**20


def _make_add_product(transposed: bool) -> Callable[..., jax.Array]:
  """``X + op(G) @ R`` with ``op`` the identity or (``transposed``) the transpose
  of ``G``'s last two axes."""

  def product(G, R):
    return (jnp.swapaxes(G, -1, -2) if transposed else G) @ R

  def plain(X, G, R):
    return X + product(G, R)

  def kernel(X, G, R):
    return native.add_product(X, G, R, transpose_g=transposed)

  def vmap_rule(op, axis_size, in_batched, X, G, R):
    del op  # the rule runs the members itself
    x_batched, g_batched, r_batched = in_batched
    out_bytes = axis_size * X.shape[-2] * X.shape[-1] * X.dtype.itemsize
    in_axes = tuple(0 if b else None for b in in_batched)
    # The in-place loop writes into X: only when the result keeps X's dtype (mixed
    # dtypes promote, as the plain expression does).
    same_dtype = jnp.result_type(X, G, R) == X.dtype

    def batched(X, G, R):
      return jax.vmap(plain, in_axes=in_axes)(X, G, R)

    def members_native(X, G, R):
      # Unbatched operands get a leading axis of 1: the kernel broadcasts it.
      X = X if x_batched else jnp.broadcast_to(X, (axis_size, *X.shape))
      return kernel(X, G if g_batched else G[None], R if r_batched else R[None])

    def looped(X, G, R):
      def member(i, X):
        g = G[i] if g_batched else G
        r = R[i] if r_batched else R
        # Slice, add and write back with the member axis kept (size 1): XLA then
        # fuses the three into one in-place pass; ``X[i] + ...`` copied X[i] first.
        rows = jax.lax.dynamic_slice_in_dim(X, i, 1, 0) + product(g, r)[None]
        return jax.lax.dynamic_update_slice_in_dim(X, rows, i, 0)
      return jax.lax.fori_loop(0, axis_size, member, X)

    def cpu(X, G, R):
      if dispatch.native_ok(native.supports(X, G, R)):
        return members_native(X, G, R)
      if not x_batched or out_bytes < LOOP_MIN_BYTES or not same_dtype:
        return batched(X, G, R)
      return looped(X, G, R)

    return dispatch.by_platform(X, G, R, cpu=cpu, default=batched)

  return dispatch.op(plain, kernel, native.supports, vmap_rule)


_add_product = _make_add_product(transposed=False)
_add_product_t = _make_add_product(transposed=True)


def change_bound(U: jax.Array, R: jax.Array) -> jax.Array:
  """An upper bound on ``max_j |(U^T @ R)[r, j]|`` per row ``r`` for ``U (B, r)``, ``R (B, n)``:
  ``sum_b |U[b, r]| max_j |R[b, j]|``, widened by the rounding of both float sums.

  What the threshold index needs of a step's update (``Updated.row_change``), at ``O(B (r + n))``
  instead of a pass over the ``(r, n)`` update.
  """
  eps = jnp.finfo(R.dtype).eps
  return (jnp.max(jnp.abs(R), axis=-1) @ jnp.abs(U)) * (1 + 4 * (R.shape[-2] + 1) * eps)


def add_product(X: jax.Array, G: jax.Array, R: jax.Array) -> jax.Array:
  """``X + G @ R`` for ``X (m, n)``, ``G (m, B)``, ``R (B, n)``; returns ``(m, n)``.

  ``X + G @ R`` up to float rounding order: on CPU the native kernel computes
  it (when built), and under ``jax.vmap`` the batching differs from the plain
  expression's (see the module docstring). Differentiable (forward and reverse
  mode) like the plain expression.
  """
  return _add_product(X, G, R)


def add_product_t(X: jax.Array, Gt: jax.Array, R: jax.Array) -> jax.Array:
  """``X + Gt.T @ R`` for ``X (n, m)``, ``Gt (B, n)``, ``R (B, m)``; returns ``(n, m)``.

  ``add_product`` with the left factor given transposed: the point-major
  ``P + K[S, :]^T @ U`` without a transposed copy of the Gram rows (an XLA
  gather-and-transpose that cost ~60-90 us per step at n = 512, B = 32).
  """
  return _add_product_t(X, Gt, R)


def _make_trace_product(transposed: bool) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``(X', Y')``, ``X' = mu X + nu Y + op(G) @ R`` and ``Y' = Y + c X'``, with
  ``(mu, nu, c) = coef[..., 0], coef[..., 1], coef[..., 2]``."""

  def plain(X, Y, G, R, coef):
    mu, nu, c = (coef[..., i, None, None].astype(X.dtype) for i in range(3))
    X = mu * X + nu * Y + (jnp.swapaxes(G, -1, -2) if transposed else G) @ R
    return X, Y + c * X

  def kernel(X, Y, G, R, coef):
    return native.trace_product(X, Y, G, R, coef, transpose_g=transposed)

  def supports(X, Y, G, R, coef):
    return native.supports(X, G, R) and Y.dtype == X.dtype and coef.dtype == X.dtype

  def vmap_rule(op, axis_size, in_batched, X, Y, G, R, coef):
    del op  # the rule runs the members itself
    in_axes = tuple(0 if b else None for b in in_batched)

    def batched(*args):
      return jax.vmap(plain, in_axes=in_axes)(*args)

    def cpu(X, Y, G, R, coef):
      if not dispatch.native_ok(supports(X, Y, G, R, coef)):
        return batched(X, Y, G, R, coef)
      # Unbatched operands get a leading axis of 1 (the kernel broadcasts it); the two
      # arrays written in place are materialized per member.
      lead = lambda v, b: v if b else v[None]  # noqa: E731
      full = lambda v, b: v if b else jnp.broadcast_to(v, (axis_size, *v.shape))  # noqa: E731
      bx, by, bg, br, bc = in_batched
      return kernel(full(X, bx), full(Y, by), lead(G, bg), lead(R, br), lead(coef, bc))

    return dispatch.by_platform(X, Y, G, R, coef, cpu=cpu, default=batched)

  return dispatch.op(plain, kernel, supports, vmap_rule)


_trace_product = _make_trace_product(transposed=False)
_trace_product_t = _make_trace_product(transposed=True)


def trace_product(X: jax.Array, Y: jax.Array, G: jax.Array, R: jax.Array,
                  coef: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A momentum step on ``Y (m, n)`` with trace ``X (m, n)``: ``G (m, B)``, ``R (B, n)``,
  ``coef (3,)`` the scalars ``(mu, nu, c)``.

  Returns ``(X', Y')`` with ``X' = mu X + nu Y + G @ R`` and ``Y' = Y + c X'`` up to float
  rounding order. On CPU the native kernel does it piece by piece in place: ``X`` and ``Y``
  cross memory once, where the plain expression's passes cross them three times (a
  vmapped sweep cannot keep a member in cache between two of XLA's passes).
  """
  return _trace_product(X, Y, G, R, coef)


def trace_product_t(X: jax.Array, Y: jax.Array, Gt: jax.Array, R: jax.Array,
                    coef: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``trace_product`` with the left factor given transposed: ``X``, ``Y`` ``(n, m)``,
  ``Gt (B, n)``, ``R (B, m)``: ``X' = mu X + nu Y + Gt^T @ R``, ``Y' = Y + c X'``."""
  return _trace_product_t(X, Y, Gt, R, coef)
