"""The public surface promised by the design exists with its meaning."""

import jax
import numpy as np
import optax

import kronjax


def test_public_names_exist():
  for name in kronjax.__all__:
    assert hasattr(kronjax, name), name
  for name in ("KronData", "Config", "TrainState", "init", "train_step", "fit", "predict",
               "evaluate", "dense_params", "dense_weights", "sweep", "sharding", "checkpoint"):
    assert name in kronjax.__all__, name


def test_kron_data_surface():
  data = kronjax.data.synthetic(jax.random.PRNGKey(0), 5, (2, 3))
  assert (data.n, data.dims, data.dim, data.rank, data.num_factors) == (5, (2, 3), 6, 1, 2)
  X = data.materialize()
  np.testing.assert_allclose(data.gram(), X @ X.T, rtol=1e-5, atol=1e-6)
  W = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  np.testing.assert_allclose(data.inner(W), W @ X.T, rtol=1e-5, atol=1e-5)


def test_train_state_fields_and_dense_weights():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 12, (3, 4), task="regression")
  config = kronjax.Config(width=16)
  state = kronjax.init(jax.random.PRNGKey(0), config, data, labels, optax.sgd(0.1))
  assert state.P.shape == state.A.shape == (16, 12)
  assert state.a.shape == (16, 1) and state.b.shape == ()
  for field in ("width", "threshold", "loss", "num_classes", "init", "train_output", "index", "update"):
    assert hasattr(config, field), field
  W = kronjax.dense_weights(state)
  np.testing.assert_allclose(W @ data.materialize().T, state.P, rtol=1e-5, atol=1e-5)
