"""Tests for ``kronjax.KronData``: Grams, inner products, properties, pytree, bad input.

Every numeric comparison is against a plain dense reference built from
``materialize()`` (itself checked against ``np.kron``), in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import KronData


pytestmark = pytest.mark.usefixtures("x64_module")  # float64 comparisons throughout


# Every numeric check goes through jit, as users run it (and it compiles once per shape
# instead of dispatching op by op).
_gram = jax.jit(lambda d, rows, cols: d.gram(rows, cols))
_cross_gram = jax.jit(lambda d, rows, cols, other: d.gram(rows, cols, other=other))
_inner = jax.jit(lambda d, W: d.inner(W))
_materialize = jax.jit(lambda d: d.materialize())


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def make_factors(seed, n, dims, rank):
  """Random float64 factors: (n, d_q) for rank 1, (n, R, d_q) otherwise."""
  rng = np.random.default_rng(seed)
  shape = (n,) if rank == 1 else (n, rank)
  return tuple(rng.standard_normal(shape + (d,)) for d in dims)


def np_kron_points(factors):
  """The reference ``(n, d)`` inputs with ``np.kron``, summed over rank terms."""
  n = factors[0].shape[0]
  ranked = [f if f.ndim == 3 else f[:, None, :] for f in factors]
  rows = []
  for i in range(n):
    x = 0.0
    for s in range(ranked[0].shape[1]):
      x = x + functools.reduce(np.kron, [f[i, s] for f in ranked])
    rows.append(x)
  return np.stack(rows)


# Uneven dims for every p; n is odd so nothing lines up with block sizes.
DIMS = {1: (7,), 2: (3, 5), 3: (2, 3, 4)}
CASES = [(p, r) for p in (1, 2, 3) for r in (1, 3)]


@pytest.mark.parametrize("p,rank", CASES)
def test_materialize_gram_inner_match_dense(p, rank):
  factors = make_factors(p * 10 + rank, 9, DIMS[p], rank)
  data = KronData(factors)
  X = np.asarray(_materialize(data))
  assert X.shape == (9, int(np.prod(DIMS[p])))
  np.testing.assert_allclose(X, np_kron_points(factors), rtol=1e-13, atol=1e-13)

  K = X @ X.T
  G = _gram(data, None, None)
  assert G.shape == (9, 9)
  assert G.dtype == jnp.float64
  assert rel_err(G, K) < 1e-12
  rows = np.array([8, 0, 3, 3])
  cols = np.array([1, 5, 2])
  assert rel_err(_gram(data, rows, cols), K[rows][:, cols]) < 1e-12
  assert rel_err(_gram(data, rows, None), K[rows]) < 1e-12
  assert rel_err(_gram(data, None, cols), K[:, cols]) < 1e-12

  W = np.random.default_rng(1).standard_normal((6, data.dim))
  P = _inner(data, W)
  assert P.shape == (6, 9)
  assert rel_err(P, W @ X.T) < 1e-12


@pytest.mark.parametrize("p,rank,other_rank", [(1, 1, 2), (2, 3, 1), (3, 1, 1), (3, 3, 2)])
def test_cross_gram_matches_dense(p, rank, other_rank):
  data = KronData(make_factors(p, 9, DIMS[p], rank))
  other = KronData(make_factors(p + 100, 4, DIMS[p], other_rank))
  X, Y = np.asarray(_materialize(data)), np.asarray(_materialize(other))
  C = X @ Y.T
  assert rel_err(_cross_gram(data, None, None, other), C) < 1e-12
  rows, cols = np.array([2, 7]), np.array([3, 0, 1])
  assert rel_err(_cross_gram(data, rows, cols, other), C[rows][:, cols]) < 1e-12


def test_eager_gram_matches_jitted():
  # The eager path validates indices; it must compute the same numbers.
  data = KronData(make_factors(5, 9, (3, 5), 1))
  other = KronData(make_factors(6, 4, (3, 5), 1))
  rows, cols = np.array([8, 0, 3, 3]), np.array([1, 2])
  np.testing.assert_allclose(data.gram(rows, cols, other=other),
                             _cross_gram(data, rows, cols, other), rtol=1e-13)


def test_gram_empty_index_array_gives_empty_block():
  data = KronData(make_factors(0, 5, (2, 3), 1))
  assert data.gram(np.array([], dtype=np.int32), np.array([1, 2])).shape == (0, 2)


def test_inner_point_block_not_dividing_n():
  data = KronData(make_factors(7, 9, (3, 5), 2))
  X = np.asarray(_materialize(data))
  W = np.random.default_rng(1).standard_normal((6, data.dim))
  P = jax.jit(lambda d, W: d.inner(W, point_block=4))(data, W)
  assert rel_err(P, W @ X.T) < 1e-12


def test_sq_norms_match_dense():
  data = KronData(make_factors(4, 6, (3, 4), 3))
  X = np.asarray(_materialize(data))
  sq = jax.jit(lambda d: d.sq_norms())(data)
  np.testing.assert_allclose(sq, np.sum(X * X, axis=1), rtol=1e-12)


@pytest.mark.parametrize("p,rank", [(1, 1), (2, 1), (3, 3)])
def test_normalize_gives_unit_norms(p, rank):
  data = jax.jit(lambda d: d.normalize())(KronData(make_factors(p + rank, 9, DIMS[p], rank)))
  X = np.asarray(_materialize(data))
  np.testing.assert_allclose(np.linalg.norm(X, axis=1), np.ones(9), rtol=1e-12)
  np.testing.assert_allclose(np.diag(np.asarray(_gram(data, None, None))), np.ones(9), rtol=1e-12)
  assert data.dims == DIMS[p] and data.rank == rank


def test_normalize_preserves_direction():
  data = KronData(make_factors(2, 5, (3, 4), 2))
  X = np.asarray(_materialize(data))
  Xn = np.asarray(jax.jit(lambda d: d.normalize().materialize())(data))
  np.testing.assert_allclose(Xn, X / np.linalg.norm(X, axis=1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("rank", [1, 3])
def test_subset(rank):
  # eager, so the index check runs
  data = KronData(make_factors(5, 9, (3, 5), rank))
  idx = np.array([4, 0, 4, 8])
  sub = data.subset(idx)
  assert isinstance(sub, KronData)
  assert sub.n == 4 and sub.dims == data.dims and sub.rank == rank
  X = np.asarray(_materialize(data))
  np.testing.assert_array_equal(_materialize(sub), X[idx])
  assert rel_err(_gram(sub, None, None), (X @ X.T)[idx][:, idx]) < 1e-12


@pytest.mark.parametrize("p,rank", CASES)
def test_properties(p, rank):
  data = KronData(make_factors(0, 9, DIMS[p], rank))
  assert data.n == 9
  assert data.dims == DIMS[p]
  assert data.dim == int(np.prod(DIMS[p]))
  assert data.rank == rank
  assert data.num_factors == p
  for value in (data.n, data.dim, data.rank, data.num_factors, *data.dims):
    assert type(value) is int


def test_dim_is_python_int_beyond_int32():
  # Tiny factors in memory (one point); d = 2**32 is never allocated.
  data = KronData((np.ones((1, 2**16), np.float32), np.ones((1, 2**16), np.float32)))
  assert data.dim == 2**32
  assert type(data.dim) is int


def test_dim_beyond_int64_from_shapes_only():
  # Built under tracing, so the factors are abstract: d = 2**66 overflows any fixed-width int.
  seen = {}

  def build(a, b, c):
    data = KronData((a, b, c))
    seen["dim"], seen["dims"] = data.dim, data.dims
    return data.n

  spec = jax.ShapeDtypeStruct((2, 2**22), jnp.float32)
  jax.eval_shape(build, spec, spec, spec)
  assert seen["dim"] == 2**66
  assert type(seen["dim"]) is int
  assert seen["dims"] == (2**22,) * 3


def test_integer_factors_are_promoted_to_float():
  data = KronData((np.arange(6).reshape(2, 3), np.ones((2, 2), np.int32)))
  assert jnp.issubdtype(data.dtype, jnp.floating)


def test_is_pytree():
  data = KronData(make_factors(1, 5, (2, 3), 2))
  leaves, treedef = jax.tree_util.tree_flatten(data)
  assert len(leaves) == 2
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(rebuilt, KronData)
  doubled = jax.tree_util.tree_map(lambda f: 2.0 * f, data)
  assert isinstance(doubled, KronData)
  # each of two factors doubled: x -> 4 x, K -> 16 K
  np.testing.assert_allclose(_gram(doubled, None, None), 16.0 * np.asarray(_gram(data, None, None)),
                             rtol=1e-12)

  @jax.jit
  def f(d):
    return d.gram(), d.normalize()

  G, normed = f(data)
  X = np.asarray(_materialize(data))
  np.testing.assert_allclose(G, X @ X.T, rtol=1e-12)
  assert isinstance(normed, KronData)
  np.testing.assert_allclose(np.diag(np.asarray(_gram(normed, None, None))), np.ones(5), rtol=1e-12)


def test_gram_jits_with_index_arrays():
  data = KronData(make_factors(3, 9, (3, 4), 1))
  X = np.asarray(_materialize(data))
  K = X @ X.T
  traces = []

  @jax.jit
  def f(d, rows, cols):
    traces.append(None)
    return d.gram(rows, cols)

  for rows, cols in [([0, 1, 2], [3, 4]), ([8, 7, 6], [0, 0])]:
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    assert rel_err(f(data, rows, cols), K[np.asarray(rows)][:, np.asarray(cols)]) < 1e-12
  assert len(traces) == 1  # same shapes: traced once

  sub = jax.jit(lambda d, idx: d.subset(idx).gram())(data, jnp.array([1, 5]))
  assert rel_err(sub, K[[1, 5]][:, [1, 5]]) < 1e-12


def test_gram_rejects_float_index_under_jit():
  data = KronData(make_factors(3, 4, (3, 4), 1))
  with pytest.raises(TypeError, match="rows"):
    jax.jit(lambda d, r: d.gram(r))(data, jnp.array([0.0, 1.0]))


# ---------------------------------------------------------------- bad input
def test_bad_different_row_counts():
  with pytest.raises(ValueError, match="factors"):
    KronData((np.ones((3, 2)), np.ones((4, 2))))


def test_bad_1d_factor():
  with pytest.raises(ValueError, match=r"factors\[1\]"):
    KronData((np.ones((3, 2)), np.ones(3)))


def test_bad_4d_factor():
  with pytest.raises(ValueError, match=r"factors\[0\]"):
    KronData((np.ones((3, 2, 2, 2)),))


def test_bad_rank_mismatch_across_factors():
  with pytest.raises(ValueError, match="factors"):
    KronData((np.ones((3, 2, 4)), np.ones((3, 3, 4))))


def test_bad_rank1_mixed_with_rank_r():
  with pytest.raises(ValueError, match="factors"):
    KronData((np.ones((3, 4)), np.ones((3, 2, 4))))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_non_finite(bad):
  f = np.ones((3, 4))
  f[1, 2] = bad
  with pytest.raises(ValueError, match=r"factors\[1\]"):
    KronData((np.ones((3, 2)), f))


def test_bad_empty_data():
  with pytest.raises(ValueError, match="factors"):
    KronData((np.ones((0, 2)), np.ones((0, 3))))


def test_bad_empty_factor_tuple():
  with pytest.raises(ValueError, match="factors"):
    KronData(())


@pytest.mark.parametrize("factors", [np.ones((3, 2)), jnp.ones((3, 2)), "abc", 3.0])
def test_bad_non_tuple_factors(factors):
  with pytest.raises(TypeError, match="factors"):
    KronData(factors)


def test_bad_complex_factor():
  with pytest.raises(TypeError, match=r"factors\[0\]"):
    KronData((np.ones((3, 2), np.complex64),))


def test_bad_gram_rows_non_integer():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(TypeError, match="rows"):
    data.gram(np.array([0.0, 1.0]))


def test_bad_gram_cols_non_integer():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(TypeError, match="cols"):
    data.gram(None, np.array([0.5]))


@pytest.mark.parametrize("rows", [[4], [-1], [0, 7]])
def test_bad_gram_rows_out_of_range(rows):
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="rows"):
    data.gram(np.array(rows))


def test_bad_gram_cols_out_of_range_of_other():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  other = KronData(make_factors(1, 2, (2, 3), 1))
  with pytest.raises(ValueError, match="cols"):
    data.gram(None, np.array([2]), other=other)  # valid for data, not for other


def test_bad_gram_rows_2d():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="rows"):
    data.gram(np.array([[0, 1]]))


def test_bad_gram_other_type():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(TypeError, match="other"):
    data.gram(other=np.ones((4, 6)))


def test_bad_gram_other_dims():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="other"):
    data.gram(other=KronData(make_factors(0, 4, (3, 2), 1)))


def test_bad_subset_non_integer():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(TypeError, match="idx"):
    data.subset(np.array([0.0, 1.0]))


def test_bad_subset_out_of_range():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="idx"):
    data.subset(np.array([1, 4]))


def test_bad_subset_empty():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="idx"):
    data.subset(np.array([], dtype=np.int32))


def test_bad_inner_shape():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="W"):
    data.inner(np.ones((5, 7)))


def test_bad_inner_point_block():
  data = KronData(make_factors(0, 4, (2, 3), 1))
  with pytest.raises(ValueError, match="point_block"):
    data.inner(np.ones((5, 6)), point_block=0)


def test_public_api_names():
  assert kronjax.KronData is KronData
  for name in kronjax.__all__:
    assert hasattr(kronjax, name), name
