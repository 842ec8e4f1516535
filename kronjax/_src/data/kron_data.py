"""Kronecker-structured data: ``x_i = sum_s u_{i,s}^(1) ⊗ ... ⊗ u_{i,s}^(p)``.

Glossary of shape letters used in this module:
  n   number of points          p    number of factors
  R   rank (terms per point)    d_q  dimension of factor q
  d   prod_q d_q (never allocated except by ``materialize``)
  m   rows of a dense weight passed to ``inner``

Inner products never touch ``d``: for rank 1,
``<x_i, x_j> = prod_q <u_i^(q), u_j^(q)>`` (a Hadamard product of p small Grams).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks


@jax.tree_util.register_pytree_node_class
class KronData:
  """An immutable pytree holding the factors of ``n`` Kronecker-structured points.

  Args:
    factors: a sequence of ``p >= 1`` arrays, all ``(n, d_q)`` (rank 1) or all
      ``(n, R, d_q)`` (rank ``R``: each point is a sum of ``R`` tensor products).
      Point ``i`` is ``np.kron(u[0][i], np.kron(u[1][i], ...))`` (summed over the
      rank axis when present).

  Raises:
    TypeError: ``factors`` is not a sequence of real arrays.
    ValueError: the factors' shapes disagree, a factor is not 2-D/3-D, the data
      is empty, or a value is NaN/inf (the message names ``factors[q]``).
  """

  __slots__ = ("_factors",)

  def __init__(self, factors: Sequence[Any]):
    self._factors = _validate_factors(factors)

  # -- pytree protocol: unflatten bypasses validation (leaves may be tracers).
  def tree_flatten(self):
    return self._factors, None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    obj = object.__new__(cls)
    obj._factors = tuple(children)
    return obj

  # -- static properties (from shapes only, valid under tracing).
  @property
  def factors(self) -> tuple[jax.Array, ...]:
    return self._factors

  @property
  def n(self) -> int:
    return int(self._factors[0].shape[0])

  @property
  def num_factors(self) -> int:
    return len(self._factors)

  @property
  def dims(self) -> tuple[int, ...]:
    return tuple(int(f.shape[-1]) for f in self._factors)

  @property
  def dim(self) -> int:
    """``d = prod_q d_q`` as a Python int (may exceed 2**31)."""
    return math.prod(self.dims)

  @property
  def rank(self) -> int:
    f = self._factors[0]
    return 1 if f.ndim == 2 else int(f.shape[1])

  @property
  def dtype(self):
    return self._factors[0].dtype

  def __repr__(self) -> str:
    return (f"KronData(n={self.n}, dims={self.dims}, dim={self.dim}, "
            f"rank={self.rank}, dtype={self.dtype})")

  def _ranked(self) -> tuple[jax.Array, ...]:
    """Factors as ``(n, R, d_q)`` whatever the input layout."""
    return tuple(f if f.ndim == 3 else f[:, None, :] for f in self._factors)

  # -- derived data.
  def gram(self, rows: Any = None, cols: Any = None, *, other: "KronData | None" = None) -> jax.Array:
    """``K[rows][:, cols]`` with ``K[i, j] = <x_i, y_j>``, shape ``(len(rows), len(cols))``.

    ``y`` is ``other`` when given (a cross Gram, e.g. against held-out points),
    else this data. Computed from the factor Grams; cost
    ``O(|rows| |cols| R^2 sum_q d_q)``; jit-able with index arrays.
    """
    right = self if other is None else other
    if other is not None:
      check_compatible("other", self, other)
    if rows is not None:
      checks.check_indices("rows", rows, self.n, allow_empty=True)
    if cols is not None:
      checks.check_indices("cols", cols, right.n, allow_empty=True)
    left_f = self._ranked()
    right_f = right._ranked()
    if rows is not None:
      left_f = tuple(f[jnp.asarray(rows)] for f in left_f)
    if cols is not None:
      right_f = tuple(f[jnp.asarray(cols)] for f in right_f)
    return _gram_from_ranked(left_f, right_f)

  def sq_norms(self) -> jax.Array:
    """``||x_i||^2`` for every point, shape ``(n,)``, without forming the Gram."""
    ranked = self._ranked()
    prod = None
    for f in ranked:
      g = jnp.einsum("isd,itd->ist", f, f)  # (n, R, R)
      prod = g if prod is None else prod * g
    return jnp.sum(prod, axis=(1, 2))

  def normalize(self) -> "KronData":
    """Unit-norm points (the theory assumes ``||x_i|| = 1``).

    Rank 1 rescales every factor to unit norm; rank R rescales the first factor
    by ``1 / ||x_i||`` (the tensor sum does not factor).
    """
    if self.rank == 1 and self._factors[0].ndim == 2:
      return KronData(tuple(f / jnp.linalg.norm(f, axis=-1, keepdims=True) for f in self._factors))
    norms = jnp.sqrt(self.sq_norms())
    first = self._factors[0] / norms.reshape((-1,) + (1,) * (self._factors[0].ndim - 1))
    return KronData((first,) + self._factors[1:])

  def subset(self, idx: Any) -> "KronData":
    """The points ``idx`` (a 1-D integer array) as a new ``KronData``."""
    checks.check_indices("idx", idx, self.n)
    idx = jnp.asarray(idx)
    return KronData.tree_unflatten(None, tuple(f[idx] for f in self._factors))

  def materialize(self) -> jax.Array:
    """The explicit inputs, shape ``(n, d)`` in ``np.kron`` order. Only for small ``d``."""
    ranked = self._ranked()
    x = ranked[0]  # (n, R, d_1)
    for f in ranked[1:]:
      x = (x[..., :, None] * f[..., None, :]).reshape(x.shape[0], x.shape[1], -1)
    return jnp.sum(x, axis=1)

  def inner(self, W: Any, *, point_block: int = 16) -> jax.Array:
    """``W @ X^T`` for a dense weight ``W`` of shape ``(m, d)``; returns ``(m, n)``.

    Mode products on ``W`` reshaped to ``(m, d_1, ..., d_p)``, contracted one
    factor at a time, ``point_block`` points at a time: time ``O(m n d)``,
    memory ``O(point_block * m * d / d_p)``, never ``O(n d)``.
    """
    W = jnp.asarray(W)
    if W.ndim != 2 or W.shape[1] != self.dim:
      raise ValueError(f"W must have shape (m, {self.dim}) for dims {self.dims}, got {W.shape}.")
    checks.check_positive_int("point_block", point_block)
    Wt = W.reshape((W.shape[0],) + self.dims)
    ranked = self._ranked()

    def one_point(us):  # us: tuple of (R, d_q) -> (m,)
      def one_term(vs):  # vs: tuple of (d_q,)
        t = Wt
        for v in reversed(vs):
          t = t @ v.astype(t.dtype)
        return t
      return jnp.sum(jax.vmap(one_term, out_axes=1)(us), axis=1)

    out = jax.lax.map(one_point, ranked, batch_size=min(point_block, self.n))  # (n, m)
    return out.T


@jax.jit
def _gram_from_ranked(left: Sequence[jax.Array], right: Sequence[jax.Array]) -> jax.Array:
  """Gram between ranked factor tuples ``(a, R, d_q)`` and ``(b, S, d_q)`` -> ``(a, b)``."""
  if left[0].shape[1] == 1 and right[0].shape[1] == 1:
    prod = None
    for fl, fr in zip(left, right):
      g = fl[:, 0, :] @ fr[:, 0, :].T
      prod = g if prod is None else prod * g
    return prod
  prod = None
  for fl, fr in zip(left, right):
    g = jnp.einsum("isd,jtd->ijst", fl, fr)
    prod = g if prod is None else prod * g
  return jnp.sum(prod, axis=(2, 3))


def check_compatible(name: str, data: KronData, other: Any) -> None:
  if not isinstance(other, KronData):
    raise TypeError(f"{name} must be a kronjax.KronData, got {type(other).__name__}.")
  if other.dims != data.dims:
    raise ValueError(
        f"{name} has factor dims {other.dims} but the training data has {data.dims}; "
        "points must live in the same tensor space (same number and sizes of factors).")


def _validate_factors(factors: Any) -> tuple[jax.Array, ...]:
  if isinstance(factors, KronData):
    return factors.factors
  if isinstance(factors, (jax.Array, np.ndarray)) or not isinstance(factors, (tuple, list)):
    raise TypeError(
        "factors must be a tuple or list of arrays (one per Kronecker factor), got "
        f"{type(factors).__name__}; wrap a single factor as (u,).")
  if len(factors) == 0:
    raise ValueError("factors is empty; pass at least one (n, d_q) or (n, R, d_q) array.")
  out = []
  for q, f in enumerate(factors):
    if not hasattr(f, "shape"):
      f = np.asarray(f)
    if f.ndim not in (2, 3):
      raise ValueError(
          f"factors[{q}] must be 2-D (n, d_q) for rank 1 or 3-D (n, R, d_q) for rank R, "
          f"got {f.ndim}-D with shape {tuple(f.shape)}.")
    dtype = getattr(f, "dtype", None)
    if dtype is not None and not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
      raise TypeError(f"factors[{q}] must be a real numeric array, got dtype {dtype}.")
    checks.check_finite(f"factors[{q}]", f)
    arr = jnp.asarray(f)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      arr = arr.astype(jnp.result_type(float))
    out.append(arr)
  first = out[0]
  for q, f in enumerate(out):
    if f.ndim != first.ndim:
      raise ValueError(
          f"factors[{q}] is {f.ndim}-D but factors[0] is {first.ndim}-D; use (n, d_q) "
          "for every factor (rank 1) or (n, R, d_q) for every factor (rank R).")
    if f.shape[0] != first.shape[0]:
      raise ValueError(
          f"factors must all have the same number of rows (points): factors[0] has "
          f"{first.shape[0]}, factors[{q}] has {f.shape[0]}.")
    if f.ndim == 3 and f.shape[1] != first.shape[1]:
      raise ValueError(
          f"factors must all have the same rank R (axis 1): factors[0] has {first.shape[1]}, "
          f"factors[{q}] has {f.shape[1]}.")
    if f.shape[-1] == 0 or (f.ndim == 3 and f.shape[1] == 0):
      raise ValueError(f"factors[{q}] has an empty axis (shape {tuple(f.shape)}).")
  if first.shape[0] == 0:
    raise ValueError("factors hold no points (n = 0); pass at least one point.")
  dtypes = {f.dtype for f in out}
  if len(dtypes) > 1:
    common = jnp.result_type(*dtypes)
    out = [f.astype(common) for f in out]
  return tuple(out)
