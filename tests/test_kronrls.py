"""Tests for ``kronjax.experiments.kronrls``: KronRLS by CG against a dense solve, and the metrics."""

import numpy as np
import pytest

from kronjax.experiments import kronrls


def psd(rng, n, rank=None):
  F = rng.normal(size=(n, rank or n))
  return F @ F.T / F.shape[1]


def dense_pair_kernel(Kd_rows, Kt_rows, pairs_rows, pairs_cols):
  """``K[i, j] = Kd_rows[a_i, b_j] * Kt_rows[c_i, e_j]`` formed explicitly."""
  return (Kd_rows[np.ix_(pairs_rows[:, 0], pairs_cols[:, 0])]
          * Kt_rows[np.ix_(pairs_rows[:, 1], pairs_cols[:, 1])])


def problem(seed=0, n_d=7, n_t=5, n=20):
  rng = np.random.default_rng(seed)
  Kd, Kt = psd(rng, n_d), psd(rng, n_t, rank=3)
  pairs = np.stack([rng.integers(0, n_d, n), rng.integers(0, n_t, n)], axis=1)
  pairs[-3:] = pairs[:3]  # repeated pairs
  y = rng.normal(size=n)
  return rng, Kd, Kt, pairs, y


def test_cg_matches_a_dense_solve(x64):
  rng, Kd, Kt, pairs, y = problem()
  lam = 0.1
  model = kronrls.fit_kronrls(Kd, Kt, pairs, y, lam, tol=1e-13, maxiter=500)
  assert bool(model.converged) and float(model.residual) < 1e-11
  assert model.alpha.dtype == np.float64
  K = dense_pair_kernel(Kd, Kt, pairs, pairs)
  alpha = np.linalg.solve(K + lam * np.eye(len(y)), y)
  np.testing.assert_allclose(model.alpha, alpha, rtol=0, atol=1e-8)
  # Predictions on new entities through the cross kernels.
  Kd_cross = rng.normal(size=(3, Kd.shape[0]))
  Kt_cross = rng.normal(size=(4, Kt.shape[0]))
  new = np.array([[0, 0], [2, 3], [1, 1], [2, 3]])
  f = kronrls.predict_kronrls(model, Kd_cross, Kt_cross, new)
  np.testing.assert_allclose(f, dense_pair_kernel(Kd_cross, Kt_cross, new, pairs) @ alpha,
                             rtol=0, atol=1e-8)
  # In-sample: the fitted values are K alpha = y - lam alpha.
  fit = kronrls.predict_kronrls(model, Kd, Kt, pairs)
  np.testing.assert_allclose(fit, y - lam * alpha, rtol=0, atol=1e-8)


def test_duplicate_pairs_are_summed_on_the_grid(x64):
  _, Kd, Kt, pairs, y = problem(seed=1)
  model = kronrls.fit_kronrls(Kd, Kt, pairs, y, 0.5, tol=1e-13)
  grid = np.zeros(model.dual.shape)
  np.add.at(grid, (pairs[:, 0], pairs[:, 1]), np.asarray(model.alpha))
  np.testing.assert_allclose(model.dual, grid, rtol=0, atol=1e-12)
  v = np.random.default_rng(3).normal(size=len(y))
  np.testing.assert_allclose(kronrls.pair_kernel_matvec(Kd, Kt, pairs, v),
                             dense_pair_kernel(Kd, Kt, pairs, pairs) @ v, rtol=0, atol=1e-12)


def test_fit_compiles_once_for_new_ridges_and_labels(x64):
  _, Kd, Kt, pairs, y = problem(seed=2)
  kronrls.fit_kronrls(Kd, Kt, pairs, y, 0.1)
  before = kronrls._solve._cache_size()
  kronrls.fit_kronrls(Kd, Kt, pairs, -y, 0.3, tol=1e-4, maxiter=7)
  assert kronrls._solve._cache_size() == before


def test_maxiter_reached_is_reported_not_raised(x64):
  _, Kd, Kt, pairs, y = problem(seed=4)
  model = kronrls.fit_kronrls(Kd, Kt, pairs, y, 1e-3, tol=1e-14, maxiter=1)
  assert int(model.iterations) == 1 and not bool(model.converged)
  assert float(model.residual) > 1e-14


def test_fit_errors_name_the_argument():
  _, Kd, Kt, pairs, y = problem()
  with pytest.raises(ValueError, match=r"Kd must be symmetric"):
    kronrls.fit_kronrls(Kd + np.triu(np.ones_like(Kd), 1), Kt, pairs, y, 0.1)
  with pytest.raises(ValueError, match=r"Kt must be a non-empty square"):
    kronrls.fit_kronrls(Kd, Kt[:, :2], pairs, y, 0.1)
  with pytest.raises(ValueError, match=r"pairs\[:, 1\] must hold indices in \[0, 5\)"):
    kronrls.fit_kronrls(Kd, Kt, pairs + np.array([0, 5]), y, 0.1)
  with pytest.raises(TypeError, match=r"pairs must be an integer"):
    kronrls.fit_kronrls(Kd, Kt, pairs.astype(float), y, 0.1)
  with pytest.raises(ValueError, match=r"y must be a real \(20,\) array"):
    kronrls.fit_kronrls(Kd, Kt, pairs, y[:-1], 0.1)
  with pytest.raises(ValueError, match=r"lam must be a finite ridge > 0"):
    kronrls.fit_kronrls(Kd, Kt, pairs, y, 0.0)
  model = kronrls.fit_kronrls(Kd, Kt, pairs, y, 0.1)
  with pytest.raises(ValueError, match=r"Kt_cross must be \(M, 5\)"):
    kronrls.predict_kronrls(model, Kd, Kt[:, :4], pairs)


# --------------------------------------------------------------------------- metrics


def brute_ci(y, p):
  num = den = 0.0
  for i in range(len(y)):
    for j in range(len(y)):
      if y[i] > y[j]:
        den += 1
        num += 1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0
  return num / den


@pytest.mark.parametrize("seed", range(8))
def test_concordance_index_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 80))
  y = rng.integers(0, 6, n).astype(float)
  p = rng.integers(0, 4, n).astype(float) if seed % 2 else y + rng.normal(size=n)
  y[0], y[-1] = 0.0, 7.0  # at least two distinct labels
  assert kronrls.concordance_index(y, p) == pytest.approx(brute_ci(y, p), rel=1e-12)


def test_concordance_index_extremes_and_scale():
  y = np.arange(10.0)
  assert kronrls.concordance_index(y, 2 * y) == 1.0
  assert kronrls.concordance_index(y, -y) == 0.0
  assert kronrls.concordance_index(y, np.zeros(10)) == 0.5
  rng = np.random.default_rng(0)
  y = rng.normal(size=20_000)
  ci = kronrls.concordance_index(y, y + rng.normal(size=20_000))
  assert 0.7 < ci < 0.8


def test_metric_errors():
  with pytest.raises(ValueError, match=r"y_true holds a single distinct value"):
    kronrls.concordance_index(np.ones(4), np.arange(4.0))
  with pytest.raises(ValueError, match=r"y_pred must have the shape of y_true"):
    kronrls.concordance_index(np.arange(4.0), np.arange(3.0))
  with pytest.raises(ValueError, match=r"y_pred contains 1 non-finite"):
    kronrls.mse(np.arange(2.0), np.array([0.0, np.nan]))
  assert kronrls.mse([1.0, 2.0], [1.0, 4.0]) == 2.0
