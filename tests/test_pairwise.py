"""Entity-indexed (pairwise) ``KronData`` and the ``"entities"`` Gram mode of ``Dataset``.

Every numeric check compares the indexed data with the same points stored per
point (``per_point()``, itself checked against ``np.kron``), in float64, through jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import KronData
from kronjax._src.data.kron_data import gram_from_entity_grams

pytestmark = pytest.mark.usefixtures("x64_module")  # float64 comparisons throughout

_gram = jax.jit(lambda d, rows, cols: d.gram(rows, cols))
_cross_gram = jax.jit(lambda d, rows, cols, other: d.gram(rows, cols, other=other))
_materialize = jax.jit(lambda d: d.materialize())

DIMS = {2: (3, 5), 3: (2, 3, 4)}
ENTITIES = {2: (7, 4), 3: (5, 3, 6)}


def make_indexed(seed, n, p, *, entities=None, dims=None):
  """Random float64 tables ``(N_q, d_q)`` and an index ``(n, p)`` with repeats."""
  rng = np.random.default_rng(seed)
  entities = entities or ENTITIES[p]
  dims = dims or DIMS[p]
  tables = tuple(rng.standard_normal((N, d)) for N, d in zip(entities, dims))
  index = np.stack([rng.integers(0, N, n) for N in entities], axis=1)
  return tables, index


def np_kron_points(tables, index):
  return np.stack([functools.reduce(np.kron, [t[i] for t, i in zip(tables, row)])
                   for row in index])


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(b) else 0.0


# -- KronData ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 3])
def test_indexed_gram_equals_per_point_gram(p):
  tables, index = make_indexed(p, 23, p)
  data = KronData(tables, index=index)
  flat = data.per_point()
  X = np_kron_points(tables, index)
  np.testing.assert_allclose(_materialize(data), X, rtol=0, atol=1e-13)
  np.testing.assert_allclose(_materialize(flat), X, rtol=0, atol=1e-13)

  K = X @ X.T
  assert max_err(_gram(data, None, None), K) < 1e-12
  assert max_err(_gram(data, None, None), _gram(flat, None, None)) < 1e-12
  rows, cols = np.array([22, 0, 5, 5]), np.array([3, 1, 17])
  assert max_err(_gram(data, rows, cols), K[rows][:, cols]) < 1e-12
  assert max_err(_gram(data, rows, None), K[rows]) < 1e-12
  assert max_err(_gram(data, None, cols), K[:, cols]) < 1e-12
  assert max_err(data.gram(rows, cols), K[rows][:, cols]) < 1e-12  # eager (validated) path

  # other: indexed with other tables, and per point, on either side.
  o_tables, o_index = make_indexed(p + 50, 9, p, entities=tuple(N + 1 for N in ENTITIES[p]))
  other = KronData(o_tables, index=o_index)
  Y = np_kron_points(o_tables, o_index)
  C = X @ Y.T
  ocols = np.array([8, 2])
  for right in (other, other.per_point()):
    assert max_err(_cross_gram(data, None, None, right), C) < 1e-12
    assert max_err(_cross_gram(data, rows, ocols, right), C[rows][:, ocols]) < 1e-12
  assert max_err(_cross_gram(flat, rows, ocols, other), C[rows][:, ocols]) < 1e-12
  assert max_err(_cross_gram(other, ocols, rows, flat), C[rows][:, ocols].T) < 1e-12


def test_indexed_gram_against_rank_r_per_point_other():
  tables, index = make_indexed(4, 11, 2)
  data = KronData(tables, index=index)
  rng = np.random.default_rng(5)
  other = KronData(tuple(rng.standard_normal((6, 3, d)) for d in DIMS[2]))
  C = np_kron_points(tables, index) @ np.asarray(_materialize(other)).T
  assert max_err(_cross_gram(data, None, None, other), C) < 1e-12
  assert max_err(_cross_gram(other, None, None, data), C.T) < 1e-12


@pytest.mark.parametrize("p", [2, 3])
def test_entity_grams_and_gram_from_entity_grams(p):
  tables, index = make_indexed(10 + p, 17, p)
  data = KronData(tables, index=index)
  grams = data.entity_grams()
  assert tuple(g.shape for g in grams) == tuple((N, N) for N in ENTITIES[p])
  for g, t in zip(grams, tables):
    np.testing.assert_allclose(g, t @ t.T, rtol=1e-13)
  fn = jax.jit(gram_from_entity_grams)
  K = np.asarray(data.per_point().gram())
  rows = np.array([3, 16, 0])
  assert max_err(fn(grams, data.index[rows], data.index), K[rows]) < 1e-12

  o_tables, o_index = make_indexed(p + 70, 5, p)
  other = KronData(o_tables, index=o_index)
  cross = data.entity_grams(other)
  assert tuple(g.shape for g in cross) == tuple((N, N) for N in ENTITIES[p])
  assert max_err(fn(cross, data.index, other.index),
                 data.per_point().gram(other=other.per_point())) < 1e-12


def test_gram_from_entity_grams_bad_input():
  grams = (np.eye(3), np.eye(2))
  with pytest.raises(TypeError, match="left_index"):
    gram_from_entity_grams(grams, np.zeros((2, 2)), np.zeros((2, 2), int))
  with pytest.raises(ValueError, match="right_index"):
    gram_from_entity_grams(grams, np.zeros((2, 2), int), np.zeros((2, 3), int))
  with pytest.raises(TypeError, match="grams"):
    gram_from_entity_grams(np.eye(3), np.zeros((2, 2), int), np.zeros((2, 2), int))


def test_properties_and_pytree():
  tables, index = make_indexed(1, 13, 3)
  data = KronData(tables, index=index)
  assert data.is_indexed and not data.per_point().is_indexed
  assert data.n == 13 and data.num_factors == 3 and data.rank == 1
  assert data.dims == DIMS[3] and data.dim == 24
  assert data.entity_counts == ENTITIES[3]
  assert data.per_point().entity_counts == (13, 13, 13)
  assert data.index.shape == (13, 3) and data.index.dtype == jnp.int32
  assert "entities=(5, 3, 6)" in repr(data)
  for value in (data.n, data.dim, *data.entity_counts):
    assert type(value) is int

  leaves, treedef = jax.tree_util.tree_flatten(data)
  assert len(leaves) == 4  # three tables and the index
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.is_indexed and rebuilt.entity_counts == ENTITIES[3]
  # unflatten bypasses validation: an out-of-range index leaf is taken as is
  bad = jax.tree_util.tree_unflatten(treedef, leaves[:-1] + [jnp.full((13, 3), 99)])
  assert bad.index.shape == (13, 3)
  # a per-point KronData flattens as it always did: its factors, aux None
  flat = data.per_point()
  assert jax.tree_util.tree_flatten(flat)[1] == jax.tree_util.tree_flatten(
      KronData(tuple(np.asarray(f) for f in flat.factors)))[1]

  @jax.jit
  def f(d):
    return d.gram(), d.normalize(), d.sq_norms()

  K, normed, sq = f(data)
  assert normed.is_indexed
  X = np_kron_points(tables, index)
  assert max_err(K, X @ X.T) < 1e-12
  np.testing.assert_allclose(sq, np.sum(X * X, axis=1), rtol=1e-12)


def test_subset_shares_tables():
  tables, index = make_indexed(2, 19, 2)
  data = KronData(tables, index=index)
  idx = np.array([4, 0, 4, 18])
  sub = data.subset(idx)
  assert sub.is_indexed and sub.n == 4
  assert all(a is b for a, b in zip(sub.factors, data.factors))
  np.testing.assert_array_equal(sub.index, index[idx])
  X = np_kron_points(tables, index)
  np.testing.assert_allclose(_materialize(sub), X[idx], rtol=0, atol=1e-13)
  assert max_err(_gram(sub, None, None), (X @ X.T)[idx][:, idx]) < 1e-12
  with pytest.raises(ValueError, match="idx"):
    data.subset(np.array([19]))


def test_normalize_makes_every_pair_unit_norm():
  tables, index = make_indexed(3, 21, 3)
  data = KronData(tables, index=index).normalize()
  assert data.is_indexed and data.entity_counts == ENTITIES[3]
  for t in data.factors:
    np.testing.assert_allclose(np.linalg.norm(np.asarray(t), axis=1), 1.0, rtol=1e-13)
  np.testing.assert_allclose(data.sq_norms(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.diag(np.asarray(_gram(data, None, None))), 1.0, rtol=1e-12)
  X = np_kron_points(tables, index)
  np.testing.assert_allclose(_materialize(data), X / np.linalg.norm(X, axis=1, keepdims=True),
                             rtol=0, atol=1e-13)


def test_normalize_refuses_an_all_zero_entity():
  tables, index = make_indexed(3, 9, 2)
  tables = (tables[0], tables[1].copy())
  tables[1][2] = 0.0
  with pytest.raises(ValueError, match=r"factors\[1\] row 2 is all zero"):
    KronData(tables, index=index).normalize()


def test_inner_and_astype():
  tables, index = make_indexed(6, 10, 2)
  data = KronData(tables, index=index)
  W = np.random.default_rng(0).standard_normal((5, data.dim))
  X = np_kron_points(tables, index)
  assert max_err(jax.jit(lambda d, W: d.inner(W))(data, W), W @ X.T) < 1e-12
  low = data.astype(jnp.float32)
  assert low.is_indexed and low.dtype == jnp.float32
  np.testing.assert_array_equal(low.index, data.index)


# -- bad input ---------------------------------------------------------------------------------

def _good():
  return make_indexed(0, 6, 2)


@pytest.mark.parametrize("index,exc,match", [
    (np.zeros((6, 2)), TypeError, r"index must be an integer array.*float64"),
    (np.zeros((6, 2), bool), TypeError, r"index must be an integer array.*bool"),
    ("ab", TypeError, r"index must be an integer array"),
    (np.zeros((6,), int), ValueError, r"index must have shape \(n, 2\).*\(6,\)"),
    (np.zeros((6, 3), int), ValueError, r"index must have shape \(n, 2\).*\(6, 3\)"),
    (np.zeros((0, 2), int), ValueError, r"index is empty"),
    (np.array([[0, 0], [1, -1]]), ValueError, r"index column 1 .*factors\[1\].*index\[1, 1\] = -1"),
    (np.array([[0, 0], [7, 0]]), ValueError, r"index column 0 .*\[0, 7\).*index\[1, 0\] = 7"),
    (np.array([[0, 4], [6, 3]]), ValueError, r"index column 1 .*\[0, 4\).*index\[0, 1\] = 4"),
])
def test_bad_index(index, exc, match):
  tables, _ = _good()
  with pytest.raises(exc, match=match):
    KronData(tables, index=index)


def test_bad_index_dtype_under_jit():
  tables, index = _good()
  with pytest.raises(TypeError, match="index"):
    jax.jit(lambda t, i: KronData(t, index=i).n)(tables, index.astype(np.float64))


def test_bad_tables_with_index():
  tables, index = _good()
  rank_r = (np.ones((7, 2, 3)), np.ones((4, 2, 5)))
  with pytest.raises(ValueError, match=r"factors\[0\] is 3-D.*Rank-R points stay per point"):
    KronData(rank_r, index=index)
  nan = (tables[0], tables[1].copy())
  nan[1][1, 1] = np.nan
  with pytest.raises(ValueError, match=r"factors\[1\] contains 1 non-finite"):
    KronData(nan, index=index)
  inf = (tables[0].copy(), tables[1])
  inf[0][0, 0] = np.inf
  with pytest.raises(ValueError, match=r"factors\[0\] contains 1 non-finite"):
    KronData(inf, index=index)
  with pytest.raises(ValueError, match=r"factors\[1\] has no rows"):
    KronData((tables[0], np.zeros((0, 5))), index=index)
  with pytest.raises(ValueError, match=r"factors\[1\] must be a 2-D entity table"):
    KronData((tables[0], np.zeros(5)), index=index)


# -- Dataset -----------------------------------------------------------------------------------

def _datasets(eval_kind, *, seed=0, n=40, p=2):
  tables, index = make_indexed(seed, n, p)
  data = KronData(tables, index=index).normalize()
  labels = np.random.default_rng(seed).standard_normal(n)
  kwargs = {}
  if eval_kind is not None:
    e_tables, e_index = make_indexed(seed + 1, 9, p, entities=tuple(N + 2 for N in ENTITIES[p]))
    eval_data = KronData(e_tables, index=e_index).normalize()
    if eval_kind == "per_point":
      eval_data = eval_data.per_point()
    kwargs = dict(eval_data=eval_data, eval_labels=np.zeros(9))
  indexed = kronjax.Dataset(data, labels, **kwargs)
  flat_kwargs = dict(kwargs)
  if eval_kind is not None:
    flat_kwargs["eval_data"] = kwargs["eval_data"].per_point()
  flat = kronjax.Dataset(data.per_point(), labels, **flat_kwargs)
  return indexed, flat


@pytest.mark.parametrize("eval_kind", [None, "indexed", "per_point"])
def test_dataset_entities_mode(eval_kind):
  ds, flat = _datasets(eval_kind)
  assert ds.gram_mode == "entities" and flat.gram_mode == "precomputed"
  assert ds.gram is None and ds.gram_eval is None
  n, n_e = ds.n, ds.n_eval
  for leaf in jax.tree.leaves(ds):
    assert leaf.shape not in ((n, n), (n, n_e), (n_e, n)), leaf.shape  # nothing n x n
  assert tuple(g.shape for g in ds.entity_grams) == tuple((N, N) for N in ENTITIES[2])
  if eval_kind is None:
    assert ds.entity_grams_eval is None
  else:
    cols = (N + 2 for N in ENTITIES[2]) if eval_kind == "indexed" else (n_e, n_e)
    assert tuple(g.shape for g in ds.entity_grams_eval) == tuple(
        (N, c) for N, c in zip(ENTITIES[2], cols))

  batch = jnp.array([3, 39, 0, 3, 17])
  rows = jax.jit(lambda d, b: d.gram_rows(b))
  (r, r_eval), (f, f_eval) = rows(ds, batch), rows(flat, batch)
  assert r.shape == (5, n)
  assert max_err(r, f) < 1e-12
  if eval_kind is None:
    assert r_eval is None and f_eval is None
  else:
    assert r_eval.shape == (5, n_e) and max_err(r_eval, f_eval) < 1e-12
  assert max_err(jax.jit(lambda d: d.full_gram())(ds), flat.gram) < 1e-12
  if eval_kind is not None:
    assert max_err(ds.full_gram_eval(), flat.gram_eval) < 1e-12

  # the pytree round trip keeps the mode and the entity Grams
  leaves, treedef = jax.tree_util.tree_flatten(ds)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.gram_mode == "entities" and again.entity_grams is not None


def test_dataset_full_gram_in_every_mode():
  ds, flat = _datasets("indexed")
  for mode in ("precomputed", "factors"):
    other = kronjax.Dataset(ds.data, ds.labels, eval_data=ds.eval_data,
                            eval_labels=ds.eval_labels, gram=mode)
    assert other.gram_mode == mode and other.entity_grams is None
    assert max_err(other.full_gram(), flat.gram) < 1e-12
    assert max_err(other.full_gram_eval(), flat.gram_eval) < 1e-12
    r, r_eval = other.gram_rows(jnp.array([1, 2]))
    assert max_err(r, flat.gram[jnp.array([1, 2])]) < 1e-12
    assert max_err(r_eval, flat.gram_eval[jnp.array([1, 2])]) < 1e-12
  assert flat.full_gram() is flat.gram and flat.full_gram_eval() is flat.gram_eval
  assert kronjax.Dataset(flat.data, flat.labels).full_gram_eval() is None


def test_dataset_entities_needs_indexed_data():
  _, flat = _datasets(None)
  with pytest.raises(ValueError, match="gram='entities' needs entity-indexed data"):
    kronjax.Dataset(flat.data, flat.labels, gram="entities")
  ds, _ = _datasets(None)
  rng = np.random.default_rng(0)
  rank_r = KronData(tuple(rng.standard_normal((3, 2, d)) for d in DIMS[2])).normalize()
  with pytest.raises(ValueError, match="eval_data has rank 2"):
    kronjax.Dataset(ds.data, ds.labels, eval_data=rank_r)
  assert kronjax.Dataset(ds.data, ds.labels, eval_data=rank_r, gram="factors").n_eval == 3


def test_dataset_normalize_and_dtype_of_indexed_eval():
  tables, index = make_indexed(8, 12, 2)
  data = KronData(tables, index=index)
  e_tables, e_index = make_indexed(9, 5, 2)
  eval_data = KronData(e_tables, index=e_index).astype(jnp.float32)
  ds = kronjax.Dataset(data, np.zeros(12), eval_data=eval_data, normalize=True)
  assert ds.data.is_indexed and ds.eval_data.is_indexed and ds.eval_data.dtype == jnp.float64
  np.testing.assert_allclose(ds.data.sq_norms(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.diag(np.asarray(ds.full_gram())), 1.0, rtol=1e-12)


def test_fingerprint_covers_the_index():
  tables, index = make_indexed(0, 10, 2)
  labels = np.zeros(10)
  a = kronjax.Dataset(KronData(tables, index=index), labels, normalize=True)
  b = kronjax.Dataset(KronData(tables, index=index[::-1].copy()), labels, normalize=True)
  c = kronjax.Dataset(KronData(tables, index=index), labels, normalize=True)
  assert not np.array_equal(a.fingerprint, b.fingerprint)
  np.testing.assert_array_equal(a.fingerprint, c.fingerprint)


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["kronecker", "explicit", "implicit"])
def test_training_on_indexed_data_equals_per_point(init):
  # Distinct pairs of generic entities: the joint Gram is positive definite, so the
  # implicit init's factor of K is unique (for a singular K, rounding-level
  # differences between two Grams of the same points pick another square root).
  tables, _ = make_indexed(11, 1, 2, entities=(9, 6), dims=(9, 6))
  rng = np.random.default_rng(3)
  pairs = rng.choice(54, 40, replace=False)
  index = np.stack([pairs // 6, pairs % 6], axis=1)
  data = KronData(tables, index=index).normalize()
  labels = rng.standard_normal(40)
  e_tables, _ = make_indexed(12, 1, 2, entities=(5, 5), dims=(9, 6))
  e_pairs = rng.choice(25, 7, replace=False)
  e_index = np.stack([e_pairs // 5, e_pairs % 5], axis=1)
  eval_data = KronData(e_tables, index=e_index).normalize()
  ds = kronjax.Dataset(data, labels, eval_data=eval_data, eval_labels=np.zeros(7))
  flat = kronjax.Dataset(data.per_point(), labels, eval_data=eval_data.per_point(),
                         eval_labels=np.zeros(7))
  assert ds.gram_mode == "entities" and flat.gram_mode == "precomputed"

  config = kronjax.Config(width=64, threshold=0.3, init=init)
  key = jax.random.PRNGKey(0)
  state = kronjax.init(key, config, ds, optax.sgd(0.5))
  ref = kronjax.init(key, config, flat, optax.sgd(0.5))
  np.testing.assert_allclose(state.P, ref.P, rtol=0, atol=1e-10)
  np.testing.assert_allclose(state.P_eval, ref.P_eval, rtol=0, atol=1e-10)

  step = jax.jit(kronjax.train_step)
  rng = np.random.default_rng(4)
  for _ in range(10):
    batch = jnp.asarray(rng.choice(40, 8, replace=False), jnp.int32)
    state, m = step(state, ds, batch)
    ref, m_ref = step(ref, flat, batch)
    assert not bool(m["skipped"]) and not bool(m_ref["skipped"])
    np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-10)
  np.testing.assert_allclose(state.P, ref.P, rtol=0, atol=1e-10)
  np.testing.assert_allclose(state.A, ref.A, rtol=0, atol=1e-10)
  np.testing.assert_allclose(state.P_eval, ref.P_eval, rtol=0, atol=1e-10)
  assert float(jnp.max(jnp.abs(state.A))) > 0  # it trained
