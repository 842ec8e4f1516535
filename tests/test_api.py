"""The public surface: curated names with their meaning, nothing private leaking out."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.data.dataset import fingerprint_text
from kronjax._src.step import step as step_lib

PUBLIC = {
    "CapacityError", "Config", "Dataset", "KronData", "NormWarning", "Plan", "TrainState", "batch_schedule", "checkpoint", "data",
    "dense", "dense_params", "evaluate", "fit", "init", "jit_train_step", "native_info", "network", "predict", "resync", "sharding",
    "sweep", "train_step", "with_plan", "STOP", "StepInfo", "verify", "Status", "check_status",
    "assume_linear", "memory_estimate",
}


def test_version():
  assert kronjax.__version__ == "0.3.0"


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


def test_dataset_is_a_pytree_with_its_fingerprint_as_an_array_leaf():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 12, (3, 4), task="regression")
  dataset = kronjax.Dataset(data, labels)
  leaves, treedef = jax.tree.flatten(dataset)
  # The fingerprint is a (8,) uint32 leaf, not static data: datasets of one shape share a treedef.
  assert dataset.fingerprint.shape == (8,) and dataset.fingerprint.dtype == np.uint32
  assert any(x is dataset.fingerprint for x in leaves)
  again = jax.tree.unflatten(treedef, leaves)
  assert np.array_equal(again.fingerprint, dataset.fingerprint) and again.gram_mode == "precomputed"
  assert fingerprint_text(again.fingerprint) == fingerprint_text(dataset.fingerprint)
  assert len(fingerprint_text(dataset.fingerprint)) == 64  # sha256 as hex
  other = kronjax.Dataset(data, labels + 1.0)
  assert not np.array_equal(other.fingerprint, dataset.fingerprint)
  assert fingerprint_text(other.fingerprint) != fingerprint_text(dataset.fingerprint)
  assert jax.tree.structure(other) == treedef
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


def _planted(seed, n=24, dims=(3, 4)):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(seed), n, dims, task="regression")
  return kronjax.Dataset(data, labels)


def test_step_compiles_once_per_shape_for_equal_optimizers_and_datasets():
  """Two datasets of one shape, and two optimizers built alike, share one compiled step."""
  config = kronjax.Config(width=32, threshold=0.5)
  first, second = _planted(0), _planted(1)  # same shapes, other values
  assert not np.array_equal(first.fingerprint, second.fingerprint)
  assert not np.array_equal(first.labels, second.labels)
  cache_size = step_lib._jitted_step._cache_size
  state = kronjax.init(jax.random.PRNGKey(0), config, first, optax.sgd(0.5))
  state, metrics = kronjax.jit_train_step(state, first, jnp.arange(4))
  assert not bool(metrics["skipped"])
  compiled = cache_size()
  # A second state from the second dataset and a freshly built (equal) optimizer.
  other = kronjax.init(jax.random.PRNGKey(1), config, second, optax.sgd(0.5))
  assert other.tx == state.tx and other.tx.tx is not state.tx.tx
  other, metrics = kronjax.jit_train_step(other, second, jnp.arange(4))
  assert not bool(metrics["skipped"]) and not bool(metrics["wrong_dataset"])
  assert int(other.step) == 1
  assert cache_size() == compiled
  state, _ = kronjax.jit_train_step(state, first, jnp.arange(4, 8))
  assert cache_size() == compiled
  # Another learning rate is another optimizer: a step of its own.
  slower = kronjax.init(jax.random.PRNGKey(1), config, second, optax.sgd(0.37))
  assert slower.tx != other.tx
  slower, _ = kronjax.jit_train_step(slower, second, jnp.arange(4))
  assert cache_size() == compiled + 1


@pytest.mark.parametrize("update", ["sparse", "full"])
def test_another_dataset_of_the_same_shapes(update):
  """jit_train_step compares fingerprints inside the step (a flagged no-op); the
  host entry points refuse the dataset before any work."""
  dataset, other = _planted(0), _planted(1)
  config = kronjax.Config(width=32, threshold=0.5, train_output=True)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.3, momentum=0.9),
                       plan=kronjax.Plan(update=update))
  state, metrics = kronjax.jit_train_step(state, dataset, jnp.arange(4))  # nonzero momentum
  assert not bool(metrics["wrong_dataset"]) and int(state.step) == 1
  before = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
  new, metrics = kronjax.jit_train_step(state, other, jnp.arange(4))
  assert bool(metrics["wrong_dataset"]) and bool(metrics["skipped"])
  assert not bool(metrics["overflow"]) and not bool(metrics["invalid_batch"])
  chex.assert_trees_all_equal(new, before)  # bit for bit, optimizer state and step included
  # The right dataset still trains the returned state.
  new, metrics = kronjax.jit_train_step(new, dataset, jnp.arange(4, 8))
  assert not bool(metrics["skipped"]) and int(new.step) == 2
  match = r"not the dataset this state was built from \(its fingerprint"
  with pytest.raises(ValueError, match=match):
    kronjax.train_step(before, other, jnp.arange(4))
  with pytest.raises(ValueError, match=match):
    kronjax.fit(before, other, jax.random.PRNGKey(0), batch_size=4, steps=2, progress=False)


def test_with_plan_changes_the_plan_and_keeps_the_network():
  dataset = _planted(0)
  config = kronjax.Config(width=64, threshold=0.5)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.3, momentum=0.5),
                       plan=kronjax.Plan(update="sparse"))
  state, _ = kronjax.jit_train_step(state, dataset, jnp.arange(4))
  assert state.config == config.resolve() and isinstance(state.config.threshold, float)
  assert state.plan == kronjax.Plan(update="sparse")  # as given; resolved_plan fills it in
  assert state.resolved_plan == kronjax.Plan(update="sparse").resolve(config)
  grown = kronjax.with_plan(state, active_capacity=40)
  assert grown.config == state.config and grown.config.identity() == state.config.identity()
  assert grown.plan == kronjax.Plan(update="sparse", active_capacity=40)
  assert grown.resolved_plan.active_capacity == 40
  assert grown.tx == state.tx
  for name in ("P", "A_T", "a", "b", "step", "key", "fingerprint"):
    np.testing.assert_array_equal(getattr(grown, name), getattr(state, name), err_msg=name)
  chex.assert_trees_all_equal(grown.opt_state, state.opt_state)
  # A whole plan replaces the state's; a layout change transposes storage, not values.
  points = kronjax.with_plan(state, kronjax.Plan(layout="points"))
  assert points.config == state.config and points.plan == kronjax.Plan(layout="points")
  assert points.layout == "points" and points.projections.shape == (dataset.n, 64)
  np.testing.assert_array_equal(points.P, state.P)
  # Steps from either plan give the same numbers (float32: to rounding).
  a, ma = kronjax.train_step(grown, dataset, jnp.arange(4, 8))
  b, mb = kronjax.train_step(points, dataset, jnp.arange(4, 8))
  np.testing.assert_allclose(a.P, b.P, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="Unknown plan key 'width'"):
    kronjax.with_plan(state, width=128)


@pytest.mark.parametrize("kwargs,field", [
    ({"layout": "points", "update": "sparse"}, "update='sparse'"),
    ({"layout": "points", "index": "bucketed"}, "index='bucketed'"),
    ({"layout": "sideways"}, "layout"),
    ({"update": "dense"}, "update"),
    ({"index_delta": 0.0}, "index_delta"),
    ({"init_chunk": -1}, "init_chunk"),
])
def test_plan_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    kronjax.Plan(**kwargs)


@pytest.mark.parametrize("field", ["active_capacity", "candidate_capacity"])
def test_plan_capacity_above_the_width_is_refused_at_init(field):
  dataset = _planted(0)
  config = kronjax.Config(width=32)
  plan = kronjax.Plan(**{field: 33})  # a plan alone knows no width
  with pytest.raises(ValueError, match=rf"{field} must be in \[1, width=32\], got 33"):
    kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1), plan=plan)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1))
  with pytest.raises(ValueError, match=rf"{field} must be in \[1, width=32\]"):
    kronjax.with_plan(state, **{field: 33})
  assert getattr(kronjax.with_plan(state, **{field: 32}).resolved_plan, field) == 32


def test_config_threshold_must_be_finite():
  with pytest.raises(ValueError, match="threshold"):
    kronjax.Config(threshold=float("inf"), width=8)
  assert kronjax.Config(width=8).threshold is None
  assert kronjax.Config(width=8).resolve().threshold == pytest.approx(np.sqrt(0.4 * np.log(8)))


def test_a_dataset_rebuilt_leaf_by_leaf_is_refused():
  """``jax.tree.map(lambda x: x[idx], dataset)`` re-indexes the Gram's rows only: its
  fingerprint leaf is mapped too, and every entry point refuses it, naming ``take``."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 40, dims=(4, 4))
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), dataset, optax.sgd(0.1))
  shuffled = jax.tree.map(lambda x: x[jnp.arange(40)[::-1]], dataset)
  with pytest.raises(ValueError, match=r"rebuilt leaf by leaf.*dataset\.take"):
    kronjax.train_step(state, shuffled, jnp.arange(4))
  with pytest.raises(ValueError, match=r"rebuilt leaf by leaf.*dataset\.take"):
    kronjax.evaluate(state, shuffled)
