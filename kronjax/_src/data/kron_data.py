"""Kronecker-structured data: ``x_i = sum_s u_{i,s}^(1) ⊗ ... ⊗ u_{i,s}^(p)``.

Glossary of shape letters used in this module:
  n   number of points          p    number of factors
  R   rank (terms per point)    d_q  dimension of factor q
  N_q rows (entities) of table q, for entity-indexed data
  d   prod_q d_q (never allocated except by ``materialize``)
  m   rows of a dense weight passed to ``inner``

Inner products never touch ``d``: for rank 1,
``<x_i, x_j> = prod_q <u_i^(q), u_j^(q)>`` (a Hadamard product of p small Grams).

Entity-indexed (pairwise) data stores ``p`` tables ``F_q`` ``(N_q, d_q)`` and an
index ``I`` ``(n, p)``: point ``i`` is ``F_1[I[i,1]] ⊗ ... ⊗ F_p[I[i,p]]``. Its Gram
is ``K[i, j] = prod_q G_q[I[i,q], J[j,q]]`` with the entity Grams ``G_q = F_q F'_q^T``
``(N_q, N'_q)``: ``O(sum_q N_q N'_q d_q)`` once, then ``p`` gathers per entry. Per-point
data is the case ``N_q = n``, ``I[i, q] = i``. Rank-R points stay per point (an
indexed point is one tensor product).
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
    factors: a sequence of ``p >= 1`` arrays. Without ``index``: all ``(n, d_q)``
      (rank 1) or all ``(n, R, d_q)`` (rank ``R``: each point is a sum of ``R``
      tensor products); point ``i`` is ``np.kron(u[0][i], np.kron(u[1][i], ...))``
      (summed over the rank axis when present). With ``index``: entity tables
      ``(N_q, d_q)``, one per factor, whose row counts may differ (rank 1 only).
    index: optional integer array ``(n, p)``: point ``i`` is
      ``factors[0][index[i, 0]] ⊗ ... ⊗ factors[p-1][index[i, p-1]]`` (entity-indexed
      or pairwise data: entities shared by many points are stored once).

  Dtypes: float32 and float64 factors are kept as they are (mixed ones are
  promoted to the wider); integer factors become the default float; bfloat16 and
  float16 factors are accepted and stored as float32, so the Gram, ``P`` and the
  step run in float32 (kronjax has no half-precision step: the Gram's products of
  ``p`` inner products would lose most of bfloat16's 8 bits).

  Raises:
    TypeError: ``factors`` is not a sequence of real arrays; ``index`` is not an
      integer array.
    ValueError: the factors' shapes disagree, a factor is not 2-D/3-D (2-D with
      ``index``), the data is empty, or a value is NaN/inf (the message names
      ``factors[q]``); ``index`` has the wrong shape or an entry outside
      ``[0, N_q)`` (the message names ``index``, the column and the value).
  """

  __slots__ = ("_factors", "_index")

  def __init__(self, factors: Sequence[Any], index: Any = None):
    if index is None and isinstance(factors, KronData):
      self._factors, self._index = factors._factors, factors._index
      return
    self._factors = _validate_factors(factors, indexed=index is not None)
    self._index = None if index is None else _validate_index(index, self._factors)

  # -- pytree protocol: unflatten bypasses validation (leaves may be tracers).
  # Per-point data flattens to its factors with aux None (as it always did);
  # indexed data to its tables then the index, with aux "indexed".
  def tree_flatten(self):
    if self._index is None:
      return self._factors, None
    return self._factors + (self._index,), "indexed"

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    children = tuple(children)
    if aux is None:
      obj._factors, obj._index = children, None
    else:
      obj._factors, obj._index = children[:-1], children[-1]
    return obj

  # -- static properties (from shapes only, valid under tracing).
  @property
  def factors(self) -> tuple[jax.Array, ...]:
    """The per-point factors, or the entity tables ``(N_q, d_q)`` of indexed data."""
    return self._factors

  @property
  def index(self) -> jax.Array | None:
    """``(n, p)`` int32 entity index, or None for per-point data."""
    return self._index

  @property
  def is_indexed(self) -> bool:
    """True for entity-indexed data (tables plus an index)."""
    return self._index is not None

  @property
  def n(self) -> int:
    if self._index is not None:
      return int(self._index.shape[0])
    return int(self._factors[0].shape[0])

  @property
  def entity_counts(self) -> tuple[int, ...]:
    """``(N_1, ..., N_p)``: rows of each table (``(n,) * p`` for per-point data)."""
    return tuple(int(f.shape[0]) for f in self._factors)

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
    entities = f", entities={self.entity_counts}" if self.is_indexed else ""
    return (f"KronData(n={self.n}, dims={self.dims}, dim={self.dim}, "
            f"rank={self.rank}{entities}, dtype={self.dtype})")

  def _ranked(self) -> tuple[jax.Array, ...]:
    """Per-point factors as ``(n, R, d_q)`` whatever the layout (gathered for indexed data)."""
    return tuple(f if f.ndim == 3 else f[:, None, :] for f in self.per_point()._factors)

  def _tables(self) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """Tables ``(N_q, R, d_q)`` and the index ``(n, p)`` (None: identity, ``N_q = n``)."""
    return tuple(f if f.ndim == 3 else f[:, None, :] for f in self._factors), self._index

  # -- conversions.
  def per_point(self) -> "KronData":
    """The same points with per-point factors ``(n, d_q)`` (rows gathered from the tables).

    Costs ``n sum_q d_q`` memory; per-point data is returned as is. Jit-able.
    """
    if self._index is None:
      return self
    return KronData.tree_unflatten(
        None, tuple(f[self._index[:, q]] for q, f in enumerate(self._factors)))

  def astype(self, dtype: Any) -> "KronData":
    """The same points with factors (tables) cast to ``dtype``; the index is kept."""
    factors = tuple(f.astype(dtype) for f in self._factors)
    if self._index is None:
      return KronData.tree_unflatten(None, factors)
    return KronData.tree_unflatten("indexed", factors + (self._index,))

  # -- derived data.
  def gram(self, rows: Any = None, cols: Any = None, *, other: "KronData | None" = None) -> jax.Array:
    """``K[rows][:, cols]`` with ``K[i, j] = <x_i, y_j>``, shape ``(len(rows), len(cols))``.

    ``y`` is ``other`` when given (a cross Gram, e.g. against held-out points),
    else this data. Per-point data: from the factor Grams, cost
    ``O(|rows| |cols| R^2 sum_q d_q)``. When either side is entity-indexed: from the
    entity Grams ``G_q = F_q F'_q^T`` (``O(sum_q N_q N'_q d_q)``, a per-point side
    counting as tables with ``N_q = n``) and ``p`` gathers per entry, never from
    per-point factors. Jit-able with index arrays.
    """
    right = self if other is None else other
    if other is not None:
      check_compatible("other", self, other)
    if rows is not None:
      checks.check_indices("rows", rows, self.n, allow_empty=True)
    if cols is not None:
      checks.check_indices("cols", cols, right.n, allow_empty=True)
    if self.is_indexed or right.is_indexed:
      left_t, left_i = self._tables()
      right_t, right_i = right._tables()
      if rows is not None:
        rows = jnp.asarray(rows)
        left_i = _gather_index(left_i, rows, self.num_factors)
      if cols is not None:
        cols = jnp.asarray(cols)
        right_i = _gather_index(right_i, cols, right.num_factors)
      return _entity_gram(left_t, left_i, right_t, right_i)
    left_f = self._ranked()
    right_f = right._ranked()
    if rows is not None:
      left_f = tuple(f[jnp.asarray(rows)] for f in left_f)
    if cols is not None:
      right_f = tuple(f[jnp.asarray(cols)] for f in right_f)
    return _gram_from_ranked(left_f, right_f)

  def entity_grams(self, other: "KronData | None" = None) -> tuple[jax.Array, ...]:
    """The entity Grams ``G_q = F_q F'_q^T``, a tuple of ``(N_q, N'_q)``.

    ``F'`` are ``other``'s tables (this data's when None); per-point data counts
    as tables with ``N_q = n``. Combine them with ``gram_from_entity_grams``.
    Cost ``O(sum_q N_q N'_q d_q)``. Rank 1 only.
    """
    right = self if other is None else other
    if other is not None:
      check_compatible("other", self, other)
    for name, data in (("self", self), ("other", right)):
      if data.rank != 1 or data._factors[0].ndim != 2:
        raise ValueError(
            f"entity_grams needs rank-1 points, but {name} has rank {data.rank}; a sum of "
            "tensor products has no (N_q, N'_q) entity Gram. Use gram() instead.")
    return tuple(_table_gram(fl, fr) for fl, fr in zip(self._factors, right._factors))

  def sq_norms(self) -> jax.Array:
    """``||x_i||^2`` for every point, shape ``(n,)``, without forming the Gram.

    For indexed data: the tables' squared row norms, gathered and multiplied.
    """
    if self._index is not None:
      prod = None
      for q, f in enumerate(self._factors):
        s = jnp.sum(f * f, axis=-1)[self._index[:, q]]  # (n,)
        prod = s if prod is None else prod * s
      return prod
    ranked = self._ranked()
    prod = None
    for f in ranked:
      g = jnp.einsum("isd,itd->ist", f, f)  # (n, R, R)
      prod = g if prod is None else prod * g
    return jnp.sum(prod, axis=(1, 2))

  def normalize(self) -> "KronData":
    """Unit-norm points (the theory assumes ``||x_i|| = 1``).

    Rank 1 rescales every factor to unit norm; rank R rescales the first factor
    by ``1 / ||x_i||`` (the tensor sum does not factor). Indexed data normalizes
    every entity row of every table, which makes every point unit-norm
    (``||x_i|| = prod_q ||F_q[I[i,q]]||``); an all-zero entity row cannot be
    normalized and raises ValueError naming ``factors[q]`` and the row.
    """
    if self._index is not None:
      tables = []
      for q, f in enumerate(self._factors):
        norms = jnp.linalg.norm(f, axis=-1, keepdims=True)  # (N_q, 1)
        _refuse_zero_rows(f"factors[{q}]", norms, "entity")
        tables.append(f / norms)
      return KronData.tree_unflatten("indexed", tuple(tables) + (self._index,))
    if self.rank == 1 and self._factors[0].ndim == 2:
      norms = [jnp.linalg.norm(f, axis=-1, keepdims=True) for f in self._factors]  # (n, 1)
      for q, nq in enumerate(norms):
        _refuse_zero_rows(f"factors[{q}]", nq, "point")
      return KronData(tuple(f / nq for f, nq in zip(self._factors, norms)))
    norms = jnp.sqrt(self.sq_norms())
    _refuse_zero_rows("data", norms, "point")
    first = self._factors[0] / norms.reshape((-1,) + (1,) * (self._factors[0].ndim - 1))
    return KronData((first,) + self._factors[1:])

  def subset(self, idx: Any) -> "KronData":
    """The points ``idx`` (a 1-D integer array) as a new ``KronData``.

    Indexed data keeps (shares) its tables and takes the rows ``idx`` of the index.
    """
    checks.check_indices("idx", idx, self.n)
    idx = jnp.asarray(idx)
    if self._index is not None:
      return KronData.tree_unflatten("indexed", self._factors + (self._index[idx],))
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


def _refuse_zero_rows(name: str, norms: jax.Array, what: str) -> None:
  """ValueError naming the first zero row of concrete ``norms`` ``(N,)`` / ``(N, 1)``: a zero
  row has no direction, and dividing by its norm would fill it with NaN."""
  if not checks.is_concrete(norms):
    return
  zero = np.flatnonzero(np.asarray(norms).reshape(-1) == 0)
  if zero.size:
    drop = ("that entity (and the points that use it)" if what == "entity" else "that point")
    raise ValueError(
        f"{name} row {int(zero[0])} is all zero (a zero row; {zero.size} such row(s) in "
        f"{name}): an all-zero {what} cannot be normalized to unit norm. Drop {drop} or "
        "give it a nonzero feature vector.")


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


def _table_gram(left: jax.Array, right: jax.Array) -> jax.Array:
  """``(N_q, d_q) x (N'_q, d_q) -> (N_q, N'_q)`` in the wider dtype."""
  dtype = jnp.result_type(left.dtype, right.dtype)
  return left.astype(dtype) @ right.astype(dtype).T


def _gather_index(index: jax.Array | None, idx: jax.Array, p: int) -> jax.Array:
  """Rows ``idx`` of ``index`` ``(n, p)``; for the identity index (None), ``idx`` per column."""
  if index is not None:
    return index[idx]
  return jnp.broadcast_to(idx[:, None], (idx.shape[0], p))


@jax.jit
def _entity_gram(left: Sequence[jax.Array], left_index: jax.Array | None,
                 right: Sequence[jax.Array], right_index: jax.Array | None) -> jax.Array:
  """Gram between indexed (or identity-indexed, None) tables ``(N_q, R, d_q)``, ``(N'_q, S, d_q)``.

  ``K[i, j] = sum_{s,t} prod_q G_q[I[i,q], J[j,q], s, t]``; rank 1 on both sides
  uses the ``(N_q, N'_q)`` entity Grams and 2-D gathers only.
  """
  if left[0].shape[1] == 1 and right[0].shape[1] == 1:
    grams = tuple(_table_gram(fl[:, 0, :], fr[:, 0, :]) for fl, fr in zip(left, right))
    return _gram_from_grams(grams, left_index, right_index)
  prod = None
  for q, (fl, fr) in enumerate(zip(left, right)):
    g = jnp.einsum("asd,btd->abst", fl, fr)  # (N_q, N'_q, R, S)
    if left_index is not None:
      g = g[left_index[:, q]]
    if right_index is not None:
      g = g[:, right_index[:, q]]
    prod = g if prod is None else prod * g
  return jnp.sum(prod, axis=(2, 3))


def _gram_from_grams(grams: Sequence[jax.Array], left_index: jax.Array | None,
                     right_index: jax.Array | None) -> jax.Array:
  """``prod_q grams[q][I[:, q]][:, J[:, q]]``; a None index is the identity (all rows/cols)."""
  prod = None
  for q, g in enumerate(grams):
    if left_index is not None and right_index is not None:
      g = g[left_index[:, q][:, None], right_index[:, q][None, :]]
    elif left_index is not None:
      g = g[left_index[:, q]]
    elif right_index is not None:
      g = g[:, right_index[:, q]]
    prod = g if prod is None else prod * g
  return prod


def gram_from_entity_grams(grams: Sequence[Any], left_index: Any, right_index: Any) -> jax.Array:
  """The Gram of indexed points from entity Grams: ``K[i, j] = prod_q G_q[I[i,q], J[j,q]]``.

  Args:
    grams: ``p`` entity Grams ``G_q`` ``(N_q, N'_q)`` (``KronData.entity_grams``).
    left_index: ``(a, p)`` integer entity index of the rows.
    right_index: ``(b, p)`` integer entity index of the columns.

  Returns:
    ``(a, b)``: ``p`` gathers and products per entry (``O(a b p)``). Jit-able; the
    index values are not range-checked here (JAX clamps out-of-range gathers), so
    pass indices validated by ``KronData``.
  """
  if not isinstance(grams, (tuple, list)) or len(grams) == 0:
    raise TypeError(f"grams must be a non-empty tuple of (N_q, N'_q) arrays, got "
                    f"{type(grams).__name__}; use KronData.entity_grams().")
  grams = tuple(jnp.asarray(g) for g in grams)
  p = len(grams)
  for q, g in enumerate(grams):
    if g.ndim != 2:
      raise ValueError(f"grams[{q}] must be 2-D (N_q, N'_q), got shape {tuple(g.shape)}.")
  for name, idx in (("left_index", left_index), ("right_index", right_index)):
    dtype = getattr(idx, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer):
      raise TypeError(f"{name} must be an integer array (a, p) of entity ids, got "
                      f"{type(idx).__name__} of dtype {dtype}.")
    if idx.ndim != 2 or idx.shape[1] != p:
      raise ValueError(f"{name} must have shape (points, {p}) (one column per entity Gram), "
                       f"got {tuple(idx.shape)}.")
  return _gram_from_grams_jit(grams, jnp.asarray(left_index), jnp.asarray(right_index))


_gram_from_grams_jit = jax.jit(_gram_from_grams)


def check_compatible(name: str, data: KronData, other: Any) -> None:
  if not isinstance(other, KronData):
    raise TypeError(f"{name} must be a kronjax.KronData, got {type(other).__name__}.")
  if other.dims != data.dims:
    raise ValueError(
        f"{name} has factor dims {other.dims} but the training data has {data.dims}; "
        "points must live in the same tensor space (same number and sizes of factors).")


def _validate_index(index: Any, tables: tuple[jax.Array, ...]) -> jax.Array:
  """``index`` as ``(n, p)`` int32 after the type, shape and range checks."""
  p = len(tables)
  if isinstance(index, (list, tuple)):
    index = np.asarray(index)
  dtype = getattr(index, "dtype", None)
  if dtype is None or not hasattr(index, "shape"):
    raise TypeError(f"index must be an integer array of shape (n, {p}), got "
                    f"{type(index).__name__}.")
  if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
    raise TypeError(
        f"index must be an integer array of entity ids, got dtype {dtype}; cast it with "
        ".astype(int) if the values are whole numbers (booleans are not entity ids).")
  if index.ndim != 2 or index.shape[1] != p:
    raise ValueError(
        f"index must have shape (n, {p}): one row per point, one column per table in "
        f"factors ({p}), got shape {tuple(index.shape)}.")
  if index.shape[0] == 0:
    raise ValueError(f"index is empty (shape {tuple(index.shape)}); pass at least one point.")
  if checks.is_concrete(index):
    arr = np.asarray(index)
    for q, f in enumerate(tables):
      col = arr[:, q]
      bad = np.flatnonzero((col < 0) | (col >= f.shape[0]))
      if bad.size:
        raise ValueError(
            f"index column {q} must hold row ids of factors[{q}] in [0, {f.shape[0]}), but "
            f"index[{int(bad[0])}, {q}] = {int(col[bad[0]])} ({bad.size} bad entr"
            f"{'y' if bad.size == 1 else 'ies'}); fix the index or add the missing entities "
            f"to factors[{q}].")
    if arr.max() >= 2**31:
      raise ValueError("index holds ids beyond int32; entity tables that large are not supported.")
  return jnp.asarray(index, jnp.int32)


def _validate_factors(factors: Any, *, indexed: bool = False) -> tuple[jax.Array, ...]:
  if isinstance(factors, KronData):
    if indexed and factors.is_indexed:
      raise TypeError("factors is an indexed KronData; pass its tables (data.factors) with index.")
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
    if indexed and f.ndim == 3:
      raise ValueError(
          f"factors[{q}] is 3-D {tuple(f.shape)} but an index was given: entity tables are "
          f"(N_q, d_q), rank 1 only. Rank-R points stay per point: pass (n, R, d_q) factors "
          "without index.")
    if indexed and f.ndim != 2:
      raise ValueError(
          f"factors[{q}] must be a 2-D entity table (N_q, d_q) when index is given, got "
          f"{f.ndim}-D with shape {tuple(f.shape)}.")
    if f.ndim not in (2, 3):
      raise ValueError(
          f"factors[{q}] must be 2-D (n, d_q) for rank 1 or 3-D (n, R, d_q) for rank R, "
          f"got {f.ndim}-D with shape {tuple(f.shape)}.")
    dtype = getattr(f, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating)
                                  or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"factors[{q}] must be a real numeric array (floats or integers), got "
                      f"dtype {dtype}.")
    arr = jnp.asarray(f)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      arr = arr.astype(jnp.result_type(float))
    elif jnp.finfo(arr.dtype).bits < 32:
      arr = arr.astype(jnp.float32)  # half precision: stored, and computed, in float32
    checks.check_finite(f"factors[{q}]", arr)
    out.append(arr)
  first = out[0]
  for q, f in enumerate(out):
    if f.ndim != first.ndim:
      raise ValueError(
          f"factors[{q}] is {f.ndim}-D but factors[0] is {first.ndim}-D; use (n, d_q) "
          "for every factor (rank 1) or (n, R, d_q) for every factor (rank R).")
    if indexed:
      if f.shape[0] == 0:
        raise ValueError(f"factors[{q}] has no rows (entities); every table needs at least one.")
    elif f.shape[0] != first.shape[0]:
      raise ValueError(
          f"factors must all have the same number of rows (points): factors[0] has "
          f"{first.shape[0]}, factors[{q}] has {f.shape[0]}.")
    if f.ndim == 3 and f.shape[1] != first.shape[1]:
      raise ValueError(
          f"factors must all have the same rank R (axis 1): factors[0] has {first.shape[1]}, "
          f"factors[{q}] has {f.shape[1]}.")
    if f.shape[-1] == 0 or (f.ndim == 3 and f.shape[1] == 0):
      raise ValueError(f"factors[{q}] has an empty axis (shape {tuple(f.shape)}).")
  if not indexed and first.shape[0] == 0:
    raise ValueError("factors hold no points (n = 0); pass at least one point.")
  dtypes = {f.dtype for f in out}
  if len(dtypes) > 1:
    common = jnp.result_type(*dtypes)
    out = [f.astype(common) for f in out]
  return tuple(out)
