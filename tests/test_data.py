"""Tests for ``kronjax.data``: synthetic Kronecker points and the planted-teacher task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kronjax
from kronjax import KronData


def point_norms(data):
  return np.sqrt(np.asarray(jax.jit(lambda d: d.sq_norms())(data)))


@pytest.mark.parametrize("dims,rank", [((3, 5), 1), ((2, 3, 4), 3)])
def test_synthetic_shapes_dtype_unit_norm(dims, rank):
  data = kronjax.data.synthetic(jax.random.key(0), 11, dims, rank=rank, dtype=jnp.float32)
  assert isinstance(data, KronData)
  assert data.n == 11 and data.dims == dims and data.rank == rank and data.num_factors == len(dims)
  for f, d in zip(data.factors, dims):
    assert f.shape == ((11, d) if rank == 1 else (11, rank, d))
    assert f.dtype == jnp.float32
  np.testing.assert_allclose(point_norms(data), np.ones(11), rtol=1e-5)


def test_synthetic_default_dtype_and_unnormalized():
  data = kronjax.data.synthetic(jax.random.key(0), 11, (4, 6), normalize=False)
  assert data.dtype == jnp.result_type(float)
  norms = point_norms(data)
  # Gaussian factors: ||x||^2 = prod_q ||u_q||^2 with E = d = 24, far from all ones
  assert not np.allclose(norms, 1.0, atol=0.1)
  assert 10 < np.mean(norms**2) < 40


def test_synthetic_deterministic_and_key_dependent():
  kw = dict(rank=3, dtype=jnp.float32)  # the shapes of a case above: no new compile
  a = kronjax.data.synthetic(jax.random.key(3), 11, (2, 3, 4), **kw)
  b = kronjax.data.synthetic(jax.random.key(3), 11, (2, 3, 4), **kw)
  c = kronjax.data.synthetic(jax.random.key(4), 11, (2, 3, 4), **kw)
  for fa, fb, fc in zip(a.factors, b.factors, c.factors):
    np.testing.assert_array_equal(fa, fb)
    assert not np.allclose(fa, fc)


def test_synthetic_points_are_distinct():
  data = kronjax.data.synthetic(jax.random.key(1), 11, (3, 5), dtype=jnp.float32)
  K = np.asarray(jax.jit(lambda d: d.gram())(data))
  off = K[~np.eye(11, dtype=bool)]
  assert np.max(np.abs(off)) < 0.99  # no two points (nearly) equal or opposite


# One shape family for the planted task so it compiles a few times only.
PN, PDIMS = 40, (16, 12)


@pytest.mark.parametrize("rank", [1, 2])
def test_planted_regression(rank):
  data, y = kronjax.data.planted(jax.random.key(0), PN, PDIMS, rank=rank, dtype=jnp.float32)
  assert isinstance(data, KronData)
  assert data.n == PN and data.dims == PDIMS and data.rank == rank
  assert y.shape == (PN, 1) and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(point_norms(data), np.ones(PN), rtol=1e-5)
  # standardized targets that actually vary
  assert abs(float(y.mean())) < 1e-4
  assert abs(float(y.std()) - 1.0) < 1e-3


@pytest.mark.parametrize("num_classes", [2, 5])
def test_planted_classification(num_classes):
  data, y = kronjax.data.planted(jax.random.key(1), PN, PDIMS, task="classification",
                                 num_classes=num_classes)
  assert data.n == PN
  assert y.shape == (PN,) and y.dtype == jnp.int32
  y = np.asarray(y)
  assert y.min() >= 0 and y.max() < num_classes
  assert len(np.unique(y)) >= 2  # not a constant labelling
  np.testing.assert_allclose(point_norms(data), np.ones(PN), rtol=1e-5)


def test_planted_deterministic_and_key_dependent():
  kw = dict(task="classification", num_classes=5)
  d1, y1 = kronjax.data.planted(jax.random.key(5), PN, PDIMS, **kw)
  d2, y2 = kronjax.data.planted(jax.random.key(5), PN, PDIMS, **kw)
  d3, _ = kronjax.data.planted(jax.random.key(6), PN, PDIMS, **kw)
  np.testing.assert_array_equal(y1, y2)
  for f1, f2, f3 in zip(d1.factors, d2.factors, d3.factors):
    np.testing.assert_array_equal(f1, f2)
    assert not np.allclose(f1, f3)


def test_planted_points_share_latent_structure():
  # Factors live near a latent_dim-dimensional subspace: the factor Gram has
  # latent_dim dominant eigenvalues, unlike isotropic Gaussian factors.
  data, _ = kronjax.data.planted(jax.random.key(2), PN, PDIMS, dtype=jnp.float32)
  u = np.asarray(data.factors[1])  # second factor: unit-norm rows (not rescaled by normalize)
  ev = np.linalg.eigvalsh(u.T @ u)[::-1]
  assert ev[:4].sum() / ev.sum() > 0.8  # latent_dim = 4 (default) of 12 directions


# ------------------------------------------------------------------ bad input
def test_bad_n_zero():
  with pytest.raises(ValueError, match="n"):
    kronjax.data.synthetic(jax.random.key(0), 0, (3, 4))


@pytest.mark.parametrize("dims", [(), 5])
def test_bad_dims_not_a_sequence(dims):
  with pytest.raises(ValueError, match="dims"):
    kronjax.data.synthetic(jax.random.key(0), 3, dims)


def test_bad_dims_entry():
  with pytest.raises(ValueError, match=r"dims\[1\]"):
    kronjax.data.synthetic(jax.random.key(0), 3, (3, 0))


def test_bad_rank():
  with pytest.raises(ValueError, match="rank"):
    kronjax.data.synthetic(jax.random.key(0), 3, (3, 4), rank=0)


def test_bad_task():
  with pytest.raises(ValueError, match="task"):
    kronjax.data.planted(jax.random.key(0), 3, (3, 4), task="ranking")


def test_bad_num_classes():
  with pytest.raises(ValueError, match="num_classes"):
    kronjax.data.planted(jax.random.key(0), 3, (3, 4), task="classification", num_classes=1)


def test_bad_planted_n_type():
  with pytest.raises(TypeError, match="n"):
    kronjax.data.planted(jax.random.key(0), 3.0, (3, 4))
