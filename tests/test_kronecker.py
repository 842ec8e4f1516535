"""Tests for the kronecker init (``kronjax._src.model.kronecker_init``): W0 rows are sums of tensor products."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax import KronData
from kronjax._src.model import kronecker_init as kr
from kronjax._src.base.keys import neuron_keys

pytestmark = [pytest.mark.usefixtures("x64_module"),  # float64 comparisons throughout
              pytest.mark.slow]  # left out of make test-fast


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def unit_data(seed, n, dims, rank=1, dtype=np.float64):
  rng = np.random.default_rng(seed)
  shape = (n,) if rank == 1 else (n, rank)
  return KronData(tuple(rng.standard_normal(shape + (d,)).astype(dtype) for d in dims)).normalize()


# ------------------------------------------------------------------ factors and dense W0


def test_factors_shapes_and_rows_depend_on_own_key_only():
  key = jax.random.key(0)
  dims = (3, 4, 2)
  factors = kr.kronecker_factors(key, 9, 5, dims)
  assert isinstance(factors, tuple) and len(factors) == 3
  for f, d in zip(factors, dims):
    assert f.shape == (9, 5, d) and f.dtype == jnp.float64
  keys = neuron_keys(key, 9)
  for a, b in [(0, 4), (4, 9), (2, 7)]:
    part = kr.kronecker_factor_rows(keys[a:b], 5, dims, jnp.float64)
    for f, g in zip(part, factors):
      np.testing.assert_array_equal(f, g[a:b])
  # one normal call per neuron, sliced by factor: factor q is columns [D_<q, D_<q + d_q)
  z = np.asarray(jax.random.normal(keys[3], (5, sum(dims)), jnp.float64))
  np.testing.assert_array_equal(np.concatenate([np.asarray(f[3]) for f in factors], axis=1), z)


def test_weights_are_scaled_sums_of_np_kron():
  key = jax.random.key(1)
  dims, r0 = (2, 3, 4), 3
  factors = [np.asarray(f) for f in kr.kronecker_factors(key, 4, r0, dims)]
  W = np.asarray(kr.kronecker_weights(key, 4, r0, dims))
  assert W.shape == (4, 24) and W.dtype == np.float64
  for r in range(4):
    want = sum(np.kron(factors[0][r, s], np.kron(factors[1][r, s], factors[2][r, s]))
               for s in range(r0)) / np.sqrt(r0)
    np.testing.assert_allclose(W[r], want, rtol=1e-14, atol=1e-14)


def test_weights_dtype_follows_argument():
  W = kr.kronecker_weights(jax.random.key(2), 3, 2, (2, 2), jnp.float32)
  assert W.dtype == jnp.float32 and W.shape == (3, 4)


# ------------------------------------------------------------------ projections


@pytest.mark.parametrize("dims", [(3, 5), (2, 3, 4)])
@pytest.mark.parametrize("data_rank", [1, 3])
@pytest.mark.parametrize("init_rank", [1, 4])
def test_projections_equal_dense_weights_times_data(dims, data_rank, init_rank):
  key = jax.random.key(7)
  width = 11
  train = unit_data(1, 6, dims, data_rank)
  test = unit_data(2, 4, dims, data_rank)
  W = np.asarray(kr.kronecker_weights(key, width, init_rank, dims))
  P, Q = kr.kronecker_projections(key, width, init_rank, (train, test), chunk=4)
  assert P.shape == (width, 6) and Q.shape == (width, 4) and P.dtype == jnp.float64
  assert rel_err(P, W @ np.asarray(train.materialize()).T) < 1e-12
  assert rel_err(Q, W @ np.asarray(test.materialize()).T) < 1e-12


def _bitwise_same_for_every_chunk(width, init_rank, sets, chunks):
  key = jax.random.key(3)
  whole = kr.kronecker_projections(key, width, init_rank, sets, chunk=width)
  for chunk in chunks:
    parts = kr.kronecker_projections(key, width, init_rank, sets, chunk=chunk)
    for got, want in zip(parts, whole):
      np.testing.assert_array_equal(got, want, err_msg=f"chunk={chunk}")
  return whole


def test_chunked_equals_whole_bit_for_bit():
  # init_rank 16 -> GEMM blocks of 16 neurons, so width 70 spans several blocks;
  # 1 and 7 divide 70, 20, 33, 50 and 64 do not; 200 > 70 gives one step
  sets = (unit_data(4, 5, (3, 4), 2), unit_data(5, 3, (3, 4), 2))
  assert kr.gemm_block(70, 16) == 16
  _bitwise_same_for_every_chunk(70, 16, sets, (1, 7, 20, 33, 50, 64, 200))


def test_chunked_equals_whole_bit_for_bit_at_blocked_gemm_sizes():
  # float32 with d_q = 768: sizes where a GEMM's rounding changes with its number of
  # rows (a single neuron per chunk, or 7, took other paths before the fixed block)
  sets = (unit_data(6, 48, (768, 768), dtype=np.float32),)
  for init_rank in (1, 3):
    block = kr.gemm_block(300, init_rank)
    assert block < 300
    (P,) = _bitwise_same_for_every_chunk(300, init_rank, sets, (1, 7, block, 250))
    assert P.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(P)))


def test_a_set_alone_equals_the_same_set_among_others():
  # what predict on unseen points relies on: new points see exactly the training W0
  key = jax.random.key(8)
  train, new = unit_data(1, 7, (4, 3), 2), unit_data(2, 5, (4, 3), 1)
  _, P_new = kr.kronecker_projections(key, 20, 3, (train, new), chunk=6)
  (P_alone,) = kr.kronecker_projections(key, 20, 3, (new,), chunk=13)
  np.testing.assert_array_equal(P_alone, P_new)


def test_projections_never_touch_d():
  # d = 2**30: materializing W0 or X would need 8 GiB per row; the factors suffice
  dims = (1024, 1024, 1024)
  data = unit_data(9, 3, dims, 2)
  key = jax.random.key(4)
  (P,) = kr.kronecker_projections(key, 5, 2, (data,), chunk=2)
  g = [np.asarray(f) for f in kr.kronecker_factors(key, 5, 2, dims)]  # (m, R0, d_q)
  u = [np.asarray(f) for f in data.factors]  # (n, R, d_q)
  ip = [np.einsum("rsd,ntd->rsnt", gq, uq) for gq, uq in zip(g, u)]
  want = (ip[0] * ip[1] * ip[2]).sum(axis=(1, 3)) / np.sqrt(2)
  assert P.shape == (5, 3) and rel_err(P, want) < 1e-12


def test_dtype_is_the_common_dtype_of_the_sets():
  a = unit_data(1, 3, (2, 3), dtype=np.float32)
  (P,) = kr.kronecker_projections(jax.random.key(0), 4, 2, (a,))
  assert P.dtype == jnp.float32
  P32, P64 = kr.kronecker_projections(jax.random.key(0), 4, 2, (a, unit_data(2, 3, (2, 3))))
  assert P32.dtype == P64.dtype == jnp.float64


def test_runs_under_jit_with_traced_key_and_data():
  data = unit_data(3, 4, (3, 2), 2)
  key = jax.random.key(5)
  fn = jax.jit(functools.partial(kr.kronecker_projections, width=6, init_rank=2, chunk=4),
               static_argnames=())
  (P,) = fn(key, sets=(data,))
  (want,) = kr.kronecker_projections(key, 6, 2, (data,), chunk=4)
  np.testing.assert_allclose(P, want, rtol=1e-13)


# ------------------------------------------------------------------ statistics


def test_covariance_of_projections_is_the_gram():
  """E[<w_r, x_i> <w_r, x_j>] = K_ij, checked over m = 4 * 10^5 neurons.

  Tolerance: for y_i = <w_r, x_i>, conditioning on all but one factor at a time gives
  E[<G, x>^4] <= 3^p ||x||^4 for one tensor term G, so with R0 i.i.d. terms
  E[y_i^4] <= kappa K_ii^2, kappa = 3 + (3^p - 3) / R0, and
  Var(y_i y_j) <= kappa K_ii K_jj. Hence E||C_hat - K||_F^2 <= kappa tr(K)^2 / m and, by
  Chebyshev, ||C_hat - K||_F < 10 sqrt(kappa / m) tr(K) fails with probability <= 1%
  (the seed is fixed, so the test is deterministic). The bound is 0.11 ||K||_F here,
  while a wrong scale (e.g. a missing 1/sqrt(R0): C = 4 K) is off by 3 ||K||_F.
  """
  dims, init_rank, m = (3, 4, 5), 4, 400_000
  data = unit_data(11, 6, dims, 2)
  K = np.asarray(data.gram())
  (P,) = kr.kronecker_projections(jax.random.key(12), m, init_rank, (data,), chunk=8192)
  P = np.asarray(P)
  C = P.T @ P / m
  kappa = 3 + (3 ** len(dims) - 3) / init_rank
  tol = 10 * np.sqrt(kappa / m) * np.trace(K)
  assert tol < 0.12 * np.linalg.norm(K)
  assert np.linalg.norm(C - K) < tol, (np.linalg.norm(C - K), tol)
  # mean zero: Var(mean_i) = K_ii / m, Chebyshev at 10 sigma per point
  assert np.all(np.abs(P.mean(axis=0)) < 10 * np.sqrt(np.diag(K) / m))


def test_fourth_moment_tends_to_gaussian_as_init_rank_grows():
  """For a unit rank-1 x and p = 2, E<w_r, x>^4 = 3 + (3^p - 3) / R0 (Gaussian: 3)."""
  data = unit_data(13, 4, (4, 5))
  m = 100_000
  for init_rank, want in [(1, 9.0), (16, 3.375)]:
    (P,) = kr.kronecker_projections(jax.random.key(14), m, init_rank, (data,), chunk=8192)
    per_neuron = np.mean(np.asarray(P) ** 4, axis=1)  # average over the 4 points
    est, se = per_neuron.mean(), per_neuron.std() / np.sqrt(m)
    assert abs(est - want) < 6 * se, (init_rank, est, want, se)


# ------------------------------------------------------------------ argument errors

DATA = unit_data(0, 3, (2, 3))


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                      (True, TypeError), ("4", TypeError), (None, TypeError)])
def test_init_rank_must_be_a_positive_int(bad, exc):
  key = jax.random.key(0)
  with pytest.raises(exc, match="init_rank"):
    kr.kronecker_projections(key, 4, bad, (DATA,))
  with pytest.raises(exc, match="init_rank"):
    kr.kronecker_weights(key, 4, bad, (2, 3))
  with pytest.raises(exc, match="init_rank"):
    kr.kronecker_factors(key, 4, bad, (2, 3))


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (True, TypeError),
                                      (2.0, TypeError)])
def test_width_and_chunk_must_be_positive_ints(bad, exc):
  key = jax.random.key(0)
  with pytest.raises(exc, match="width"):
    kr.kronecker_projections(key, bad, 2, (DATA,))
  with pytest.raises(exc, match="width"):
    kr.kronecker_weights(key, bad, 2, (2, 3))
  with pytest.raises(exc, match="chunk"):
    kr.kronecker_projections(key, 4, 2, (DATA,), chunk=bad)


def test_sets_must_be_a_nonempty_tuple_of_compatible_kron_data():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="sets"):
    kr.kronecker_projections(key, 4, 2, ())
  with pytest.raises(TypeError, match="sets"):
    kr.kronecker_projections(key, 4, 2, DATA)
  with pytest.raises(TypeError, match=r"sets\[0\]"):
    kr.kronecker_projections(key, 4, 2, (np.ones((3, 6)),))
  with pytest.raises(TypeError, match=r"sets\[1\]"):
    kr.kronecker_projections(key, 4, 2, (DATA, np.ones((3, 6))))
  with pytest.raises(ValueError, match=r"sets\[1\].*dims"):
    kr.kronecker_projections(key, 4, 2, (DATA, unit_data(1, 3, (3, 2))))
  with pytest.raises(ValueError, match=r"sets\[2\].*dims"):
    kr.kronecker_projections(key, 4, 2, (DATA, DATA, unit_data(1, 3, (2, 3, 1))))


@pytest.mark.parametrize("dims, exc, name", [((), ValueError, "dims"), (3, ValueError, "dims"),
                                             ((2, 0), ValueError, r"dims\[1\]"),
                                             ((2, 1.0), TypeError, r"dims\[1\]")])
def test_dims_must_be_positive_ints(dims, exc, name):
  with pytest.raises(exc, match=name):
    kr.kronecker_factors(jax.random.key(0), 3, 2, dims)
  with pytest.raises(exc, match=name):
    kr.kronecker_weights(jax.random.key(0), 3, 2, dims)


def test_dtype_must_be_floating():
  with pytest.raises(TypeError, match="dtype"):
    kr.kronecker_factors(jax.random.key(0), 3, 2, (2, 2), jnp.int32)
