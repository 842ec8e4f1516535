"""The public surface: curated names with their meaning, nothing private leaking out."""

import jax
import numpy as np
import optax
import pytest

import kronjax

PUBLIC = {
    "CapacityError", "Config", "Dataset", "KronData", "NormWarning", "TrainState", "batch_schedule", "checkpoint", "data", "dense",
    "dense_params", "evaluate", "fit", "init", "jit_train_step", "native_info", "network", "predict", "resync", "sharding", "sweep",
    "train_step", "with_config",
}


def test_all_is_the_curated_surface():
  assert set(kronjax.__all__) == PUBLIC
  public_modules = {name for name in dir(kronjax) if not name.startswith("_")}
  # Nothing else is reachable as a public attribute of the package (the
  # experiment layer is imported explicitly, never by the library).
  assert public_modules - PUBLIC <= {"experiments"}, public_modules - PUBLIC


@pytest.mark.parametrize("namespace", ["sweep", "sharding", "checkpoint", "data", "dense", "network"])
def test_public_namespaces_export_only_public_callables(namespace):
  module = getattr(kronjax, namespace)
  assert module.__all__, namespace
  for name in module.__all__:
    assert not name.startswith("_")
    assert callable(getattr(module, name)), (namespace, name)


def test_kron_data_surface():
  data = kronjax.data.synthetic(jax.random.PRNGKey(0), 5, (2, 3))
  assert (data.n, data.dims, data.dim, data.rank, data.num_factors) == (5, (2, 3), 6, 1, 2)
  X = data.materialize()
  np.testing.assert_allclose(data.gram(), X @ X.T, rtol=1e-5, atol=1e-6)
  W = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  np.testing.assert_allclose(data.inner(W), W @ X.T, rtol=1e-5, atol=1e-5)


def test_state_holds_what_training_changes_and_the_dataset_stays_beside_it():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 12, (3, 4), task="regression")
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, init="explicit"), dataset,
                       optax.sgd(0.1))
  assert state.P.shape == state.A.shape == (16, 12)
  assert state.a.shape == (16, 1) and state.b.shape == ()
  # No leaf of the state is the data, its labels or its Gram.
  sizes = {x.size for x in jax.tree.leaves(state)}
  assert dataset.gram.size not in sizes or dataset.gram.size == state.P.size
  leaves = jax.tree.leaves(state)
  for x in jax.tree.leaves(dataset):
    assert not any(y is x for y in leaves)
  W = kronjax.dense_params(state, dataset)["W"]
  np.testing.assert_allclose(W @ data.materialize().T, state.P, rtol=1e-5, atol=1e-5)


def test_dataset_is_a_pytree_with_its_fingerprint_as_static_data():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 12, (3, 4), task="regression")
  dataset = kronjax.Dataset(data, labels)
  leaves, treedef = jax.tree.flatten(dataset)
  again = jax.tree.unflatten(treedef, leaves)
  assert again.fingerprint == dataset.fingerprint and again.gram_mode == "precomputed"
  other = kronjax.Dataset(data, labels + 1.0)
  assert other.fingerprint != dataset.fingerprint
  assert kronjax.Dataset(data, labels, gram="factors").gram is None


def test_non_unit_norm_data_warns_with_the_range_and_normalize_fixes_it():
  raw = kronjax.data.synthetic(jax.random.PRNGKey(0), 50, (16, 16), normalize=False)
  labels = np.zeros(50)
  with pytest.warns(kronjax.NormWarning, match=r"\|\|x\|\|\^2 ranges over \[.*normalize=True"):
    kronjax.Dataset(raw, labels)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dataset = kronjax.Dataset(raw, labels, normalize=True)
    kronjax.Dataset(kronjax.data.synthetic(jax.random.PRNGKey(0), 50, (16, 16)), labels)
  np.testing.assert_allclose(dataset.data.sq_norms(), 1.0, rtol=1e-5)
  # The sparsity the threshold promises holds only on unit-norm points.
  config = kronjax.Config(width=2048, init="kronecker")
  for data, expect_sparse in ((dataset, True), (None, False)):
    if data is None:
      with pytest.warns(kronjax.NormWarning):
        data = kronjax.Dataset(raw, labels)
    state = kronjax.init(jax.random.PRNGKey(1), config, data, optax.sgd(0.1))
    active = float(np.mean(np.sum(np.asarray(state.P) > float(state.b), axis=0)))
    expected = config.width * config.firing_probability
    assert (active < 2 * expected) == expect_sparse, (active, expected)
