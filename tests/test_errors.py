"""Bad input to Config, Plan, Dataset, init and train_step: a clear error naming the argument."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax


def _reg():
  return kronjax.data.planted(jax.random.PRNGKey(0), 20, (3, 4), task="regression")


@pytest.fixture(scope="module")
def reg():
  return _reg()


@pytest.fixture(scope="module")
def cls():
  return kronjax.data.planted(jax.random.PRNGKey(0), 20, (3, 4), task="classification", num_classes=3)


@pytest.fixture(scope="module")
def state(reg):
  data, labels = reg
  return kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32), kronjax.Dataset(data, labels),
                      optax.sgd(0.1))


@pytest.mark.parametrize("tx", [
    optax.adam(1e-3),
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    optax.adamw(1e-3),
], ids=["adam", "clip", "adamw"])
def test_nonlinear_optimizer_is_refused_with_reason(reg, tx):
  """Weight decay is linear and accepted (tests/test_generalize.py); these are not."""
  data, labels = reg
  with pytest.raises(ValueError, match=r"tx cannot be used.*span\(W0, X\).*optax.sgd"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels), tx)


@pytest.mark.parametrize("make_labels,config_kw,match,exc", [
    (lambda y: y[:5], {}, r"labels must have shape \(20,\) or \(20, C\)", ValueError),
    (lambda y: jnp.concatenate([y, y], axis=1), {}, r"labels must have shape \(20, 1\)", ValueError),
    (lambda y: y.at[3, 0].set(jnp.nan), {}, "labels contains 1 non-finite", ValueError),
], ids=["rows", "columns", "nan"])
def test_bad_regression_labels(reg, make_labels, config_kw, match, exc):
  data, labels = reg
  with pytest.raises(exc, match=match):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, **config_kw),
                 kronjax.Dataset(data, make_labels(labels)), optax.sgd(0.1))


def test_class_ids_out_of_range(cls):
  data, labels = cls
  with pytest.raises(ValueError, match=r"labels must hold class ids in \[0, 3\)"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, loss="softmax", num_classes=3), kronjax.Dataset(data, labels.at[0].set(3)), optax.sgd(0.1))


def test_one_hot_labels_for_softmax(cls):
  data, labels = cls
  with pytest.raises(ValueError, match=r"labels must have shape \(20,\).*not one-hot"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, loss="softmax", num_classes=3), kronjax.Dataset(data, jax.nn.one_hot(labels, 3)), optax.sgd(0.1))


def test_float_class_ids(cls):
  data, labels = cls
  with pytest.raises(TypeError, match="labels must hold integer class ids"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, loss="softmax", num_classes=3), kronjax.Dataset(data, labels.astype(jnp.float32)), optax.sgd(0.1))


def test_eval_data_with_other_dims(reg):
  data, labels = reg
  other = kronjax.data.synthetic(jax.random.PRNGKey(1), 5, (4, 3))
  with pytest.raises(ValueError, match=r"eval_data has factor dims \(4, 3\).*\(3, 4\)"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels, eval_data=other), optax.sgd(0.1))


def test_eval_labels_without_eval_data(reg):
  data, labels = reg
  with pytest.raises(ValueError, match="eval_labels was given without eval_data"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels, eval_labels=labels), optax.sgd(0.1))


def test_non_finite_threshold(reg):
  data, labels = reg
  with pytest.raises(ValueError, match="threshold must be a finite number"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels), optax.sgd(0.1),
                 threshold=float("inf"))
  with pytest.raises(ValueError, match="threshold must be a finite number"):
    kronjax.Config(width=16, threshold=float("nan"))


def test_non_finite_threshold_is_refused_and_negative_is_taken(reg):
  data, labels = reg
  with pytest.raises(ValueError, match=r"threshold must be a finite number.*got inf"):
    kronjax.Config(threshold=float("inf"), width=16)
  with pytest.raises(ValueError, match=r"threshold must be a finite number.*got nan"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels),
                 optax.sgd(0.1), threshold=float("nan"))
  assert kronjax.Config(width=16, threshold=0.0).threshold == 0.0  # b = 0 is a plain relu
  assert kronjax.Config(width=16, threshold=-1.0).threshold == -1.0
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16),
                       kronjax.Dataset(data, labels), optax.sgd(0.1), threshold=-1.0)
  assert float(state.b) == -1.0


def test_data_and_config_types(reg):
  data, labels = reg
  with pytest.raises(TypeError, match="config must be a kronjax.Config"):
    kronjax.init(jax.random.PRNGKey(0), {"width": 16}, kronjax.Dataset(data, labels), optax.sgd(0.1))
  with pytest.raises(TypeError, match="data must be a kronjax.KronData"):
    kronjax.Dataset(data.materialize(), labels)
  with pytest.raises(TypeError, match="dataset must be a kronjax.Dataset"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), data, optax.sgd(0.1))
  with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels),
                 0.1)


@pytest.mark.parametrize("batch,match,exc", [
    (np.array([0, 20]), r"batch_idx must hold indices in \[0, 20\)", ValueError),
    (np.array([-1, 2]), r"batch_idx must hold indices in \[0, 20\)", ValueError),
    (np.array([], np.int32), "batch_idx is empty", ValueError),
    (np.array([0.0, 1.0]), "batch_idx must be an integer array", TypeError),
    (np.array([[0, 1]]), "batch_idx must be 1-D", ValueError),
], ids=["too_large", "negative", "empty", "float", "2d"])
def test_bad_batch_indices_leave_state_untouched(state, batch, match, exc):
  P_before = np.asarray(state.P).copy()
  with pytest.raises(exc, match=match):
    kronjax.train_step(state, kronjax.Dataset(*_reg()), batch)
  np.testing.assert_array_equal(np.asarray(state.P), P_before)


@pytest.mark.parametrize("kwargs,match,exc", [
    ({"width": 0}, "width must be >= 1", ValueError),
    ({"width": 8.0}, "width must be an int", TypeError),
    ({"width": 16, "loss": "hinge"}, "loss must be one of", ValueError),
    ({"width": 16, "init": "lazy"}, "init must be one of", ValueError),
    ({"width": 16, "loss": "softmax", "num_classes": 1}, "num_classes must be >= 2", ValueError),
    ({"width": 16, "train_output": 1}, "train_output must be a bool", TypeError),
    ({"width": 16, "init_rank": 0}, "init_rank must be >= 1", ValueError),
    ({"width": 16, "init_rank": 2.0}, "init_rank must be an int", TypeError),
    ({"width": 16, "init_rank": True}, "init_rank must be an int", TypeError),
    ({"width": 16, "init": "explicit", "init_rank": 2}, "init_rank=2 was given with init='explicit'",
     ValueError),
    ({"width": 16, "threshold": np.ones(1)}, "threshold must be a real number", TypeError),
    ({"width": 16, "threshold": float("nan")}, "threshold must be a finite number", ValueError),
])
def test_config_validation(kwargs, match, exc):
  with pytest.raises(exc, match=match):
    kronjax.Config(**kwargs)


@pytest.mark.parametrize("kwargs,match,exc", [
    ({"index": "tree"}, "index must be one of", ValueError),
    ({"update": "fast"}, "update must be one of", ValueError),
    ({"active_capacity": 0}, "active_capacity must be >= 1", ValueError),
    ({"candidate_capacity": 2.0}, "candidate_capacity must be an int", TypeError),
    ({"index_delta": -1.0}, "index_delta must be a positive", ValueError),
    ({"init_chunk": 0}, "init_chunk must be >= 1", ValueError),
    ({"layout": "rows"}, "layout must be one of", ValueError),
    ({"layout": "points", "update": "sparse"},
     r"layout='points'.*update='sparse'.*use layout='neurons'", ValueError),
    ({"layout": "points", "index": "bucketed"},
     r"layout='points'.*index='bucketed'.*use index='auto' or 'scan'", ValueError),
])
def test_plan_validation(kwargs, match, exc):
  with pytest.raises(exc, match=match):
    kronjax.Plan(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"active_capacity": 17}, r"active_capacity must be in \[1, width=16\]"),
    ({"candidate_capacity": 99}, r"candidate_capacity must be in \[1, width=16\]"),
])
def test_plan_capacities_above_the_width_are_refused_at_init(reg, kwargs, match):
  # A plan knows no width: its capacities are checked against the network's at init.
  data, labels = reg
  plan = kronjax.Plan(**kwargs)
  with pytest.raises(ValueError, match=match):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels),
                 optax.sgd(0.1), plan=plan)
  with pytest.raises(ValueError, match=match):
    plan.resolve(kronjax.Config(width=16))
  resolved = plan.resolve(kronjax.Config(width=128))  # the same plan fits a wider network
  assert all(getattr(resolved, k) == v for k, v in kwargs.items())


def test_dataset_gram_validation(reg):
  data, labels = reg
  with pytest.raises(ValueError, match="gram must be one of"):
    kronjax.Dataset(data, labels, gram="cached")


def test_config_unknown_key_suggests_closest():
  with pytest.raises(ValueError, match=r"Unknown config key 'widht'.*Did you mean 'width'"):
    kronjax.Config.from_dict({"widht": 16})


def test_plan_unknown_key_suggests_closest():
  with pytest.raises(ValueError, match=r"Unknown plan key 'activ_capacity'.*Did you mean 'active_capacity'"):
    kronjax.Plan.from_dict({"activ_capacity": 16})


@pytest.mark.parametrize("field,value", [
    ("active_capacity", 8), ("candidate_capacity", 8), ("index_delta", 0.5), ("index", "scan"),
    ("update", "full"), ("layout", "points"), ("init_chunk", 64),
])
def test_plan_fields_given_to_config_name_kronjax_plan(field, value):
  message = rf"{field!r} is not a config key.*kronjax\.Plan\({field}=\.\.\.\)"
  with pytest.raises(ValueError, match=message):
    kronjax.Config.from_dict({"width": 16, field: value})
  with pytest.raises(ValueError, match=message):
    kronjax.Config(width=16).replace(**{field: value})
  with pytest.raises(TypeError, match=field):  # the dataclass constructor knows no such field
    kronjax.Config(width=16, **{field: value})


def test_with_plan_refuses_network_changes(state):
  for field, value in (("width", 64), ("threshold", 0.1), ("loss", "softmax")):
    with pytest.raises(ValueError, match=rf"Unknown plan key {field!r}"):
      kronjax.with_plan(state, **{field: value})
  with pytest.raises(TypeError, match="plan must be a kronjax.Plan"):
    kronjax.with_plan(state, kronjax.Config(width=64))


def test_optimizer_that_separates_A_from_P_is_refused(reg):
  data, labels = reg
  tx = optax.chain(optax.sgd(0.5),
                   optax.masked(optax.scale(3.0), lambda p: {k: k == "A" for k in p}))
  with pytest.raises(ValueError, match=r"updates 'P' differently from 'A'"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels), tx)


def test_optimizer_scaling_only_the_output_layer_is_accepted(reg):
  data, labels = reg
  tx = optax.chain(optax.sgd(0.5),
                   optax.masked(optax.scale(3.0), lambda p: {k: k == "a" for k in p}))
  kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, train_output=True), kronjax.Dataset(data, labels), tx)


@pytest.mark.parametrize("name, transform", [
    ("permutation", lambda g: jnp.flip(g, axis=-1)),
    ("per-entry scaling", lambda g: g * jnp.arange(1, g.size + 1, dtype=g.dtype).reshape(g.shape)),
])
def test_linear_but_not_scalar_optimizer_is_refused(reg, name, transform):
  # Linear and stateless, so additivity and homogeneity pass; but it does not
  # commute with the product by K, so P would stop equalling W X^T.
  data, labels = reg
  tx = optax.chain(optax.stateless(lambda updates, params=None: jax.tree.map(transform, updates)),
                   optax.sgd(0.5))
  with pytest.raises(ValueError, match="not a scalar multiple of the gradient"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels), tx)


def test_large_threshold_clipping_is_refused(reg):
  data, labels = reg
  tx = optax.chain(optax.clip_by_global_norm(1e5), optax.sgd(0.1))
  with pytest.raises(ValueError, match="not linear"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), kronjax.Dataset(data, labels), tx)


def test_config_has_no_gram_the_dataset_holds_it(reg):
  # Config.gram is gone: the Gram belongs to the Dataset.
  data, labels = reg
  with pytest.raises(ValueError, match=r"Unknown config key 'gram'"):
    kronjax.Config.from_dict({"width": 16, "gram": "factors"})
  with pytest.raises(TypeError, match="gram"):
    kronjax.Config(width=16, gram="factors")
  assert not hasattr(kronjax.Config(width=16), "gram")
  dataset = kronjax.Dataset(data, labels, gram="factors")
  assert dataset.gram_mode == "factors" and dataset.gram is None
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), dataset, optax.sgd(0.1))
  kronjax.train_step(state, dataset, np.arange(4))


def test_config_replace_derives_the_threshold_again():
  # Derived fields stay None as given: a copy with another width resolves to
  # that width's threshold (and a plan left automatic to its capacities).
  from kronjax._src.model.config import default_threshold
  from kronjax._src.step.plan import default_active_capacity
  small = kronjax.Config(width=128)
  assert small.threshold is None and small.init_rank is None
  wide = small.replace(width=1024)
  assert wide == kronjax.Config(width=1024) and wide.threshold is None
  assert wide.resolve().width == 1024
  assert wide.resolve().threshold == default_threshold(1024) == math.sqrt(0.4 * math.log(1024))
  assert wide.resolve().threshold != small.resolve().threshold
  assert kronjax.Config(width=8).resolve().threshold == math.sqrt(0.4 * math.log(8))
  assert kronjax.Plan().resolve(wide).active_capacity == default_active_capacity(
      1024, default_threshold(1024))
  assert kronjax.Plan().resolve(wide) != kronjax.Plan().resolve(small)
  explicit = kronjax.Config(width=128, threshold=0.5)
  assert explicit.replace(width=1024).resolve().threshold == 0.5
  assert kronjax.Plan(active_capacity=40).resolve(wide).active_capacity == 40
  assert kronjax.Config(width=128, threshold=np.float32(0.5)).threshold == 0.5
