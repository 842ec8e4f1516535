"""The dense step's work on the batch's rows: read, hidden layer, coefficients, write.

Shapes: n points, m neurons, B batch, C outputs; ``X (n, m)`` is a point-major
matrix (``state.projections`` in the ``"points"`` layout, or ``state.A_T``).

    take_rows(X, idx)              X[idx]                                   (B, m)
    take_cols(P, idx)              P[:, idx].T, P (m, n) neuron-major       (B, m)
    add_rows(X, idx, U)            X.at[idx].add(U)                         (n, m)
    relu_rows(X, idx, b, a)        HiddenRows(raw=relu(X[idx] - b) @ a,     (B, C),
                                              active=#(X[idx] > b))         (B,)
    relu_rows_grad(X, idx, b, a, g)
                                   where(X[idx] > b, g @ a^T, 0)            (B, m)
    add_rows_product(X, T, U, R)   X.at[T].add(U @ R), a bound on its rows  (m, n), (T,)

Each equals its plain ``jax.numpy`` expression (``*_of`` below) up to float
rounding order. Why they exist: under ``jax.vmap`` over a sweep the members
share ``idx``, and the step's small operands become ``(S, B, m)`` stacks that
no longer fit in a core's cache. XLA CPU gathers them index-major, transposes
them for every consumer and materializes the ReLU and its mask in separate
passes, which in a vmapped sweep costs more than half of the product
``P + K_rows^T @ U`` itself (``experiments/bench_sweep.py``). So:

* on CPU with the native kernels (``kronjax._src.kernels.native``) each op is one pass that
  reads each batch row once and splits the rows over XLA's threads; under
  ``jax.vmap`` with a shared ``idx`` (any number of nested vmaps) every member
  goes to the same call;
* elsewhere (GPU, TPU, ``KRONJAX_NATIVE=off``, ``dispatch.disabled()``) the
  plain expression, and under ``jax.vmap`` JAX's own batching of it.

The choice and the custom_jvp / custom_vmap wrapping are ``kronjax._src.kernels.dispatch``'s;
here: the expressions, the kernel calls and the batching rule.

Index semantics are ``jax.numpy``'s: negative indices count from the end; reads
clamp, writes drop out-of-range indices; repeated indices accumulate. All four
are differentiable (forward and reverse mode) through the plain expressions.
``relu_rows`` skips the terms where the ReLU is zero: exact for finite ``a``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kronjax._src.kernels import dispatch
from kronjax._src.model import losses
from kronjax._src.kernels import native
from kronjax._src.kernels import products
from kronjax._src.kernels.native import HiddenRows


# ----------------------------------------------------------------------------- the plain math

def relu_of(Z: jax.Array, b: jax.Array, a: jax.Array) -> HiddenRows:
  """``HiddenRows(relu(Z - b) @ a, #(Z > b) per row)`` for rows ``Z (B, m)``, ``a (m, C)``."""
  h = losses.hidden(Z, b)
  # Counted in floats, at least float32 so that counts are exact below 2**24 per
  # row at any input dtype (bfloat16 is exact only to 256): an int32 sum of the
  # mask was a separate convert pass plus a reduce-window tree on XLA CPU.
  count_dtype = jnp.promote_types(Z.dtype, jnp.float32)
  return HiddenRows(h @ a, jnp.sum((Z > b).astype(count_dtype), axis=-1))


def relu_grad_of(Z: jax.Array, b: jax.Array, a: jax.Array, g: jax.Array) -> jax.Array:
  """``where(Z > b, g @ a^T, 0)`` for rows ``Z (B, m)``, ``a (m, C)``, ``g (B, C)``."""
  return jnp.where(Z > b, g @ a.T, jnp.zeros((), Z.dtype))


def _take_of(X, idx):
  return X[idx]


def _take_cols_of(P, idx):
  if idx.shape[0] == 1:
    # At B = 1 XLA turns the gather into a slice that it fuses into every reader; a
    # reader the in-place update of P does not wait for (the active count) then keeps
    # P live past that update, and XLA copies P to keep it. Two gathered columns stay
    # one gather, materialized once.
    return P[:, jnp.concatenate([idx, idx])].T[:1]
  return P[:, idx].T


def _add_of(X, idx, U):
  return X.at[idx].add(U)


def _relu_rows_of(X, idx, b, a):
  return relu_of(X[idx], b, a)


def _relu_rows_grad_of(X, idx, b, a, g):
  return relu_grad_of(X[idx], b, a, g)


# ----------------------------------------------------------------------------- as ops

def _supports(X, idx, *rest) -> bool:
  return all(r.dtype == X.dtype for r in rest) and native.supports_rows(X, idx)


def _vmap_rule(stacked_plain: Callable[..., Any]) -> dispatch.VmapRule:
  """A vmap with a shared ``idx`` adds a leading dimension to every operand (the
  unbatched ones broadcast) and calls the op again: the kernels take any leading
  dimensions. A vmap over ``idx`` is JAX's batching of the plain expression."""

  def rule(op, axis_size, in_batched, X, idx, *rest):
    if in_batched[1]:  # per-member batches
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(stacked_plain, in_axes=in_axes)(X, idx, *rest)
    X, *rest = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                for x, batched in zip((X, *rest), (in_batched[0], *in_batched[2:])))
    return op(X, idx, *rest)

  return rule


def _rows_op(plain: Callable[..., Any], kernel: Callable[..., Any]) -> Callable[..., Any]:
  """``plain(X, idx, *rest)`` as an op that runs ``kernel`` on CPU.

  ``X (n, m)`` and every ``rest`` operand may carry leading member dimensions
  (all the same ones); ``idx (B,)`` never does.
  """

  def stacked_plain(X, idx, *rest):
    fn = plain
    for _ in range(X.ndim - 2):  # one vmap per leading member dimension
      fn = jax.vmap(fn, in_axes=(0, None, *(0,) * len(rest)))
    return fn(X, idx, *rest)

  return dispatch.op(stacked_plain, kernel, _supports, _vmap_rule(stacked_plain))


_take_rows = _rows_op(_take_of, native.take_rows)
_take_cols = _rows_op(_take_cols_of, native.take_cols)
_add_rows = _rows_op(_add_of, native.add_rows)
_relu_rows = _rows_op(_relu_rows_of, native.relu_rows)
_relu_rows_grad = _rows_op(_relu_rows_grad_of, native.relu_rows_grad)


def _index(idx: Any) -> jax.Array:
  return jnp.asarray(idx, jnp.int32)


def take_rows(X: jax.Array, idx: Any) -> jax.Array:
  """``X[idx]`` for ``X (n, m)``, ``idx (B,)``; returns ``(B, m)``."""
  return _take_rows(X, _index(idx))


def take_cols(P: jax.Array, idx: Any) -> jax.Array:
  """``P[:, idx].T`` for a neuron-major ``P (m, n)``, ``idx (B,)``; returns ``(B, m)``, in a
  buffer of its own (never a view that an in-place update of ``P`` would have to copy ``P``
  to keep)."""
  return _take_cols(P, _index(idx))


def add_rows(X: jax.Array, idx: Any, U: jax.Array) -> jax.Array:
  """``X.at[idx].add(U)`` for ``X (n, m)``, ``idx (B,)``, ``U (B, m)``; returns ``(n, m)``.

  In place on CPU (donate ``X``, or let it be a loop carry). ``U`` is cast to
  ``X``'s dtype, as the scatter casts it.
  """
  return _add_rows(X, _index(idx), U.astype(X.dtype))


def relu_rows(X: jax.Array, idx: Any, b: Any, a: jax.Array) -> HiddenRows:
  """The hidden layer on the batch's rows without materializing it.

  Args:
    X: ``(n, m)`` pre-activations of every point (``state.projections``).
    idx: ``(B,)`` the batch.
    b: ``()`` the ReLU threshold.
    a: ``(m, C)`` the output layer.

  Returns:
    ``HiddenRows``: ``raw = relu(X[idx] - b) @ a`` ``(B, C)`` (unscaled outputs)
    and ``active``, the number of active neurons per point ``(B,)``, as floats
    of ``X``'s dtype.
  """
  return _relu_rows(X, _index(idx), jnp.asarray(b, X.dtype), a.astype(X.dtype))


def relu_rows_grad(X: jax.Array, idx: Any, b: Any, a: jax.Array, g: jax.Array) -> jax.Array:
  """``where(X[idx] > b, g @ a^T, 0)`` ``(B, m)``: the hidden layer's coefficients.

  ``X (n, m)``, ``idx (B,)``, ``b ()``, ``a (m, C)``, ``g (B, C)`` (the output
  gradient, with any scalar already folded in).
  """
  return _relu_rows_grad(X, _index(idx), jnp.asarray(b, X.dtype), a.astype(X.dtype),
                         g.astype(X.dtype))


# ----------------------------------------------------------------------------- touched rows

def add_sorted_rows(X: jax.Array, T: jax.Array, rows_update: jax.Array) -> jax.Array:
  """``X[T] += rows_update`` for sorted unique row ids ``T (T_cap,)`` padded with distinct
  out-of-range ids (dropped): the promise lets XLA write in place, copy-free."""
  return X.at[T].add(rows_update, mode="drop", indices_are_sorted=True, unique_indices=True)


# Bytes of one block of touched rows' updates in the XLA expression of ``add_rows_product``:
# under glibc's smallest dynamic mmap threshold, so the block's temporary comes from the heap.
_BLOCK_BYTES = 4 * 2**20


def _rows_product_of(X, T, U, R):
  """``add_rows_product``'s expression, a block of rows at a time.

  Why blocks: the whole ``(T_cap, n)`` update would be the step's largest temporary. Above
  glibc's mmap threshold (at most 32 MiB) it is mapped fresh, and page-faulted, on every
  step: at n = 10^5 that costs ten times the update itself. Blocks of at most
  ``_BLOCK_BYTES`` come from the heap. A block of padding only (``T`` is sorted, padding
  last) computes nothing.
  """
  cap, n = U.shape[0], R.shape[-1]
  rows = X.shape[0]
  per_block = max(1, _BLOCK_BYTES // max(1, n * X.dtype.itemsize))
  if per_block >= cap:
    return add_sorted_rows(X, T, (U @ R).astype(X.dtype))         # (T_cap, n) update
  blocks = -(-cap // per_block)
  pad = blocks * per_block - cap
  T_blocks = jnp.concatenate([T, rows + cap + jnp.arange(pad, dtype=T.dtype)])
  T_blocks = T_blocks.reshape(blocks, per_block)                    # still sorted and unique
  U_blocks = jnp.pad(U, ((0, pad), (0, 0))).reshape(blocks, per_block, U.shape[1])

  def block(X, t_u):
    t, u = t_u
    delta = jax.lax.cond(t[0] < rows, lambda u: (u @ R).astype(X.dtype),
                         lambda u: jnp.zeros((per_block, n), X.dtype), u)
    return add_sorted_rows(X, t, delta), None

  return jax.lax.scan(block, X, (T_blocks, U_blocks))[0]


def _rows_product_supports(X, T, U, R) -> bool:
  return (native.supports_rows(X, T.reshape(-1)) and U.dtype == X.dtype
          and R.dtype == X.dtype)


def _rows_product_rule(op, axis_size, in_batched, X, T, U, R):
  """Members' X, T and U stacked (broadcast where shared), R shared when it is: one call."""
  del op
  in_axes = tuple(0 if b else None for b in in_batched)

  def batched(X, T, U, R):
    return jax.vmap(_rows_product_of, in_axes=in_axes)(X, T, U, R)

  def cpu(X, T, U, R):
    if not dispatch.native_ok(_rows_product_supports(X, T, U, R)):
      return batched(X, T, U, R)
    full = lambda v, b: v if b else jnp.broadcast_to(v, (axis_size, *v.shape))  # noqa: E731
    bx, bt, bu, br = in_batched
    return native.add_rows_product(full(X, bx), full(T, bt), full(U, bu),
                                   R if br else R[None])

  return dispatch.by_platform(X, T, U, R, cpu=cpu, default=batched)


_add_rows_product = dispatch.op(_rows_product_of, native.add_rows_product,
                                _rows_product_supports, _rows_product_rule)


def add_rows_product(X: jax.Array, T: jax.Array, U: jax.Array,
                     R: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``X[T] += U @ R`` and a bound on each row's change: the sparse step's touched rows.

  Args:
    X: ``(m, n)``.
    T: ``(T_cap,)`` int32 sorted unique row ids, padded with distinct out-of-range ids.
    U: ``(T_cap, B)`` coefficients, zero on padding.
    R: ``(B, n)`` the batch's Gram rows.

  Returns:
    ``(X, change)``: ``X`` updated and ``change (T_cap,)``, an upper bound on
    ``max_j |(U @ R)[t, j]|`` (what the threshold index needs): ``sum_b |U[t, b]| max_j
    |R[b, j]|``, widened by the rounding of both sums.

  On CPU the native kernel reads and writes each touched row once, one axpy per nonzero
  coefficient; elsewhere XLA forms the update a block of rows at a time
  (``_rows_product_of``). Neither holds the whole ``(T_cap, n)`` update.
  """
  change = products.change_bound(U.T, R)                           # (T_cap,)
  return _add_rows_product(X, jnp.asarray(T, jnp.int32), U, R), change
