"""Tests for ``kronjax.initializers``: explicit (chunked W0) and implicit (N(0, K)) P0."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import KronData
from kronjax._src.model import initializers as inits


pytestmark = pytest.mark.usefixtures("x64_module")  # float64 comparisons throughout


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def unit_data(seed, n, dims, rank=1):
  rng = np.random.default_rng(seed)
  shape = (n,) if rank == 1 else (n, rank)
  return KronData(tuple(rng.standard_normal(shape + (d,)) for d in dims)).normalize()


def dense(data):
  return np.asarray(jax.jit(lambda d: d.materialize())(data))


# ------------------------------------------------------------------ explicit
M = 10
DIMS = (3, 5)  # d = 15, uneven


@pytest.mark.parametrize("key_fn", [jax.random.key, jax.random.PRNGKey])
def test_explicit_weights_chunked_equal_whole_bit_for_bit(key_fn):
  key = key_fn(3)
  d = 15
  W0 = np.asarray(inits.explicit_weights(key, M, d))
  assert W0.shape == (M, d) and W0.dtype == np.float64
  keys = inits.neuron_keys(key, M)
  for a, b in [(0, 5), (5, 10), (3, 8)]:
    np.testing.assert_array_equal(inits.w0_rows(keys[a:b], d), W0[a:b])
  # the rows look like N(0, 1) draws and are not copies of each other
  assert len({tuple(r) for r in W0}) == M
  assert abs(W0.mean()) < 0.5 and 0.5 < W0.std() < 1.5


def test_explicit_projections_equal_dense_for_every_chunk():
  key = jax.random.key(7)
  data = unit_data(1, 6, DIMS, rank=2)
  X = dense(data)
  W0 = np.asarray(inits.explicit_weights(key, M, data.dim))
  want = W0 @ X.T
  outs = {}
  for chunk in (3, 4, 64):  # 3 and 4 do not divide M = 10; 64 > M (one chunk)
    (P,) = inits.explicit_projections(key, M, data, chunk=chunk)
    assert P.shape == (M, 6) and P.dtype == jnp.float64
    assert rel_err(P, want) < 1e-12, chunk
    outs[chunk] = np.asarray(P)
  for chunk, P in outs.items():
    np.testing.assert_allclose(P, outs[64], rtol=1e-13, atol=1e-14, err_msg=f"chunk={chunk}")



def test_explicit_projections_extra_use_the_same_w0():
  key = jax.random.key(8)
  data, held = unit_data(2, 6, DIMS), unit_data(3, 4, DIMS, rank=2)
  W0 = np.asarray(inits.explicit_weights(key, M, data.dim))
  P, Pe = inits.explicit_projections(key, M, data, chunk=3, extra=(held,))
  assert rel_err(P, W0 @ dense(data).T) < 1e-12
  assert Pe.shape == (M, 4)
  assert rel_err(Pe, W0 @ dense(held).T) < 1e-12


def test_explicit_projections_under_jit():
  key = jax.random.key(9)
  data = unit_data(4, 6, DIMS, rank=2)
  f = jax.jit(functools.partial(inits.explicit_projections, width=M, chunk=4))
  (P,) = f(key, data=data)
  W0 = np.asarray(inits.explicit_weights(key, M, data.dim))
  assert rel_err(P, W0 @ dense(data).T) < 1e-12


def test_explicit_different_keys_differ():
  data = unit_data(5, 6, DIMS, rank=2)
  (P1,) = inits.explicit_projections(jax.random.key(0), M, data, chunk=4)
  (P2,) = inits.explicit_projections(jax.random.key(1), M, data, chunk=4)
  assert not np.allclose(P1, P2)


# ------------------------------------------------------------------ implicit
# One shape family (n = 12 training, 5 held-out points, width WIDE) for the sampling tests,
# so the jitted sampler compiles a few times, not once per test.
WIDE = 20000
N, N_HELD, IDIMS = 12, 5, (4, 5)


def empirical_cov(P):
  P = np.asarray(P)
  return P.T @ P / P.shape[0]


@pytest.fixture(scope="module")
def train_held():
  return unit_data(13, N, IDIMS), unit_data(14, N_HELD, IDIMS, rank=2)


@pytest.fixture(scope="module")
def sampled(train_held):
  data, held = train_held
  return inits.implicit_projections(jax.random.key(3), WIDE, data, extra=(held,))


def test_implicit_covariance_matches_gram(train_held):
  data, _ = train_held  # d = 20 > n: K nonsingular
  K = dense(data) @ dense(data).T
  (P,) = inits.implicit_projections(jax.random.key(0), WIDE, data)
  assert P.shape == (WIDE, N) and P.dtype == jnp.float64
  assert rel_err(empirical_cov(P), K) < 0.05
  # the marginals are N(0, ||x_i||^2) = N(0, 1)
  np.testing.assert_allclose(np.asarray(P).std(axis=0), np.ones(N), atol=0.05)


def test_implicit_covariance_singular_gram_duplicates():
  base = unit_data(11, N // 2, IDIMS)
  data = base.subset(np.tile(np.arange(N // 2), 2))  # every point twice
  X = dense(data)
  K = X @ X.T
  assert np.linalg.matrix_rank(K) == N // 2
  (P,) = inits.implicit_projections(jax.random.key(1), WIDE, data)
  assert np.all(np.isfinite(P))
  assert rel_err(empirical_cov(P), K) < 0.05
  # duplicated points get identical projections (P lies in the range of K)
  np.testing.assert_allclose(np.asarray(P)[:, :N // 2], np.asarray(P)[:, N // 2:], atol=1e-6)


def test_implicit_covariance_singular_gram_n_greater_than_d():
  data = unit_data(12, N, (2, 3))  # d = 6 < n = 12
  X = dense(data)
  K = X @ X.T
  (P,) = inits.implicit_projections(jax.random.key(2), WIDE, data)
  assert np.all(np.isfinite(P))
  assert rel_err(empirical_cov(P), K) < 0.05


def test_implicit_held_out_joint_covariance(train_held, sampled):
  data, held = train_held
  X, Y = dense(data), dense(held)
  P, Pe = sampled
  assert P.shape == (WIDE, N) and Pe.shape == (WIDE, N_HELD)
  joint = empirical_cov(np.concatenate([P, Pe], axis=1))
  Z = np.concatenate([X, Y])
  assert rel_err(joint, Z @ Z.T) < 0.05
  # each block on its own, the cross block included
  assert rel_err(joint[:N, :N], X @ X.T) < 0.05
  assert rel_err(joint[N:, N:], Y @ Y.T) < 0.05
  assert rel_err(joint[:N, N:], X @ Y.T) < 0.05


def test_implicit_two_held_out_sets_joint_covariance(train_held):
  data, held = train_held
  h1, h2 = held, data.subset(np.arange(N_HELD)).normalize()
  outs = inits.implicit_projections(jax.random.key(4), WIDE, data, extra=(h1, h2))
  assert [o.shape for o in outs] == [(WIDE, N), (WIDE, N_HELD), (WIDE, N_HELD)]
  Z = np.concatenate([dense(data), dense(h1), dense(h2)])
  assert rel_err(empirical_cov(np.concatenate(outs, axis=1)), Z @ Z.T) < 0.05
  # h2 repeats training points 0..4: one implicit W0 gives them identical projections
  np.testing.assert_allclose(outs[2], np.asarray(outs[0])[:, :N_HELD], atol=1e-6)


def test_implicit_precomputed_gram_is_used(train_held):
  data, _ = train_held
  key = jax.random.key(0)
  (P,) = inits.implicit_projections(key, WIDE, data)
  (Pg,) = inits.implicit_projections(key, WIDE, data, gram=jax.jit(lambda d: d.gram())(data))
  np.testing.assert_allclose(Pg, P, rtol=1e-10, atol=1e-10)
  # a different Gram changes the samples: the argument is really used
  (Ph,) = inits.implicit_projections(key, WIDE, data, gram=4.0 * np.eye(N))
  np.testing.assert_allclose(np.asarray(Ph).std(axis=0), 2.0 * np.ones(N), atol=0.1)


def test_implicit_deterministic_and_key_dependent(train_held, sampled):
  data, held = train_held
  P1, _ = inits.implicit_projections(jax.random.key(3), WIDE, data, extra=(held,))
  P2, _ = inits.implicit_projections(jax.random.key(5), WIDE, data, extra=(held,))
  np.testing.assert_array_equal(P1, sampled[0])
  assert not np.allclose(P1, P2)


def test_implicit_under_jit(train_held, sampled):
  # Regression: the split points were once computed from a traced cumsum (.tolist()),
  # so implicit_projections(..., extra=...) could not be jitted.
  data, held = train_held
  f = jax.jit(functools.partial(inits.implicit_projections, width=WIDE))
  P, Pe = f(jax.random.key(3), data=data, extra=(held,))
  np.testing.assert_allclose(P, sampled[0], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(Pe, sampled[1], rtol=1e-10, atol=1e-10)


def test_psd_factor_singular():
  rng = np.random.default_rng(0)
  B = rng.standard_normal((8, 3))
  K = B @ B.T  # rank 3, eigenvalues below zero by round-off
  L = np.asarray(inits.psd_factor(jnp.asarray(K)))
  assert np.all(np.isfinite(L))
  np.testing.assert_allclose(L @ L.T, K, atol=1e-12 * np.abs(K).max())


# ------------------------------------------------------------------ output layer, keys
def test_output_layer_rademacher():
  a = np.asarray(inits.output_layer(jax.random.key(0), 4000, 3))
  assert a.shape == (4000, 3)
  assert set(np.unique(a)) == {-1.0, 1.0}
  assert abs(a.mean()) < 0.05


def test_init_keys_are_distinct_and_deterministic():
  k1, k2 = inits.init_keys(jax.random.key(0)), inits.init_keys(jax.random.key(0))
  assert set(k1) == {"W0", "a"}
  for name in k1:
    np.testing.assert_array_equal(jax.random.key_data(k1[name]), jax.random.key_data(k2[name]))
  assert not np.array_equal(jax.random.key_data(k1["W0"]), jax.random.key_data(k1["a"]))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("chunk", [0, -3])
def test_bad_chunk_below_one(chunk):
  with pytest.raises(ValueError, match="chunk"):
    inits.explicit_projections(jax.random.key(0), M, unit_data(0, 3, DIMS), chunk=chunk)


def test_bad_chunk_not_int():
  with pytest.raises(TypeError, match="chunk"):
    inits.explicit_projections(jax.random.key(0), M, unit_data(0, 3, DIMS), chunk=2.5)


@pytest.mark.parametrize("fn", [inits.explicit_projections, inits.implicit_projections])
def test_bad_width_non_positive(fn):
  with pytest.raises(ValueError, match="width"):
    fn(jax.random.key(0), 0, unit_data(0, 3, DIMS))


def test_bad_explicit_weights_width():
  with pytest.raises(ValueError, match="width"):
    inits.explicit_weights(jax.random.key(0), -1, 15)


@pytest.mark.parametrize("fn", [inits.explicit_projections, inits.implicit_projections])
def test_bad_extra_dims(fn):
  with pytest.raises(ValueError, match=r"extra\[0\]"):
    fn(jax.random.key(0), M, unit_data(0, 3, DIMS), extra=(unit_data(1, 3, (5, 3)),))


@pytest.mark.parametrize("fn", [inits.explicit_projections, inits.implicit_projections])
def test_bad_extra_type(fn):
  with pytest.raises(TypeError, match=r"extra\[0\]"):
    fn(jax.random.key(0), M, unit_data(0, 3, DIMS), extra=(np.ones((3, 15)),))




def test_bad_implicit_gram_wrong_shape():
  data = unit_data(0, 5, DIMS)
  with pytest.raises(ValueError, match="gram"):
    inits.implicit_projections(jax.random.key(0), M, data, gram=np.eye(6))  # n = 5


def test_bad_implicit_gram_non_finite():
  data = unit_data(0, 5, DIMS)
  with pytest.raises(ValueError, match="gram"):
    inits.implicit_projections(jax.random.key(0), M, data, gram=np.full((5, 5), np.nan))


def test_psd_factor_uses_cholesky_when_positive_definite_and_falls_back_exactly():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 10))
    K = X @ X.T                                       # positive definite
    L = np.asarray(inits.psd_factor(jnp.asarray(K)))
    np.testing.assert_allclose(L, np.linalg.cholesky(K), rtol=1e-10, atol=1e-12)
    Xs = np.concatenate([X, X[:2]])                   # duplicates: singular
    Ks = Xs @ Xs.T
    Ls = np.asarray(inits.psd_factor(jnp.asarray(Ks)))
    assert np.all(np.isfinite(Ls))
    np.testing.assert_allclose(Ls @ Ls.T, Ks, rtol=0, atol=1e-10 * np.abs(Ks).max())
