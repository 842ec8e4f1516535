"""Losses of one's own (``Config(loss=fn)``) exact against dense SGD (float64), their label
checks, and the per-step status code with its ``checkify`` raise.

Dense SGD differentiates ``fn`` through the whole network; kronjax differentiates it with
respect to the batch outputs only and updates ``A`` and ``P`` from ``g = dL/df``. Both must
agree, for losses that couple the batch's points (RankNet) too.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import kronjax
from kronjax import dense
from kronjax._src.step.step import Status, check_status

pytestmark = pytest.mark.usefixtures("x64_module")


def logistic(outputs, labels):
  """Logistic loss on +-1 labels ``(B,)``."""
  return jnp.mean(jax.nn.softplus(-labels * outputs[:, 0]))


def weighted_mse(outputs, labels):
  """``labels = {"y": (B,), "w": (B,)}``: a per-point weighted squared error."""
  return 0.5 * jnp.sum(labels["w"] * (outputs[:, 0] - labels["y"]) ** 2) / jnp.sum(labels["w"])


def ranknet(outputs, labels):
  """Mean over the batch's pairs i < j of log(1 + exp(-(f_i - f_j) sign(y_i - y_j)))."""
  f = outputs[:, 0]
  diff = f[:, None] - f[None, :]
  sign = jnp.sign(labels[:, None] - labels[None, :])
  pairs = jnp.triu(jnp.ones(diff.shape, diff.dtype), k=1)
  return jnp.sum(pairs * jax.nn.softplus(-diff * sign)) / jnp.sum(pairs)


def _task(n=40, dims=(4, 6), seed=0):
  data, y = kronjax.data.planted(jax.random.PRNGKey(seed), n, dims=dims, task="regression",
                                 dtype=jnp.float64)
  return data, np.asarray(y, np.float64).reshape(-1)


def _labels(name, y):
  if name == "logistic":
    return np.where(y > np.median(y), 1.0, -1.0)
  if name == "weighted_mse":
    return {"y": y, "w": np.linspace(0.5, 2.0, y.shape[0])}
  return y


LOSSES = {"logistic": logistic, "weighted_mse": weighted_mse, "ranknet": ranknet}


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


@pytest.mark.parametrize("update", ["sparse", "full"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_callable_loss_matches_dense_sgd(name, update):
  data, y = _task()
  labels = _labels(name, y)
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=48, threshold=0.3, loss=LOSSES[name], train_output=True,
                          output_bias=True)
  key = jax.random.PRNGKey(3)
  tx = optax.sgd(0.3, momentum=0.5)
  state = kronjax.init(key, config, dataset, tx, plan=kronjax.Plan(update=update))
  X = data.materialize()
  dstate = dense.init(key, config, data.dims, tx, dtype=X.dtype)
  dstep = dense.make_step(config, tx, donate=False)
  step = jax.jit(kronjax.train_step)
  rng = np.random.default_rng(0)
  for _ in range(20):
    bi = rng.choice(data.n, 6, replace=False).astype(np.int32)
    state, m = step(state, dataset, jnp.asarray(bi))
    assert int(m["status"]) == Status.OK and not bool(m["skipped"])
    dstate, dm = dstep(dstate, X[bi], jax.tree.map(lambda x: x[bi], dataset.labels))
    np.testing.assert_allclose(float(m["loss"]), float(dm["loss"]), rtol=1e-10)
  params = kronjax.dense_params(state, dataset)
  assert _rel(params["W"], dstate.params["W"]) < 1e-9
  assert _rel(state.P, dstate.params["W"] @ X.T) < 1e-9
  assert _rel(params["a"], dstate.a) < 1e-9
  np.testing.assert_allclose(np.asarray(state.bias), np.asarray(dstate.bias), atol=1e-10)
  # evaluate: fn over the whole split (every pair for RankNet).
  got = kronjax.evaluate(state, dataset)
  assert set(got) == {"train_loss"}
  out = dense.forward(dstate.params["W"], dstate.a, dstate.b, X, dstate.bias)
  np.testing.assert_allclose(float(got["train_loss"]),
                             float(LOSSES[name](out, dataset.labels)), rtol=1e-9)


def test_fit_runs_with_a_callable_loss():
  data, y = _task(n=50)
  dataset = kronjax.Dataset(data.subset(jnp.arange(40)), {"y": y[:40], "w": np.ones(40)},
                            eval_data=data.subset(jnp.arange(40, 50)),
                            eval_labels={"y": y[40:], "w": np.ones(10)})
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=64, loss=weighted_mse),
                       dataset, optax.sgd(0.5))
  before = float(kronjax.evaluate(state, dataset)["train_loss"])
  state, history = kronjax.fit(state, dataset, jax.random.PRNGKey(1), batch_size=8, steps=30,
                               progress=False)
  metrics = kronjax.evaluate(state, dataset)
  assert set(metrics) == {"train_loss", "eval_loss"}
  assert int(state.step) == 30 and float(metrics["train_loss"]) < before
  assert np.all(np.isfinite(history["loss"]))


def test_callable_config_is_hashable_and_its_identity_is_json():
  config = kronjax.Config(width=16, loss=ranknet)
  assert hash(config) == hash(kronjax.Config(width=16, loss=ranknet))
  assert config == kronjax.Config(width=16, loss=ranknet)
  assert config != kronjax.Config(width=16, loss=lambda f, y: ranknet(f, y))  # another object
  assert config.replace(width=32).loss is ranknet
  identity = config.identity()
  assert identity["loss"] == f"{__name__}.ranknet"
  json.dumps(identity)
  assert kronjax.Config(width=16).identity()["loss"] == "mse"
  with pytest.raises(ValueError, match="loss=.*name of a function.*the function itself"):
    kronjax.Config.from_dict(identity)
  with pytest.raises(TypeError, match="loss must be one of"):
    kronjax.Config(width=16, loss=3)


def test_callable_loss_label_errors():
  data, y = _task()
  config = kronjax.Config(width=16, loss=weighted_mse)
  with pytest.raises(ValueError, match=r"labels\['w'\] must have leading axis 40"):
    kronjax.Dataset(data, {"y": y, "w": np.ones(39)})
  with pytest.raises(ValueError, match=r"labels\['w'\] contains 1 non-finite"):
    kronjax.Dataset(data, {"y": y, "w": np.where(np.arange(40) == 3, np.nan, 1.0)})
  with pytest.raises(TypeError, match=r"labels\['g'\] must hold floats"):
    kronjax.Dataset(data, {"y": y, "g": np.array(["a"] * 40)})
  with pytest.raises(ValueError, match=r"eval_labels\['y'\] must have leading axis 5"):
    kronjax.Dataset(data.subset(jnp.arange(35)), {"y": y[:35], "w": np.ones(35)},
                    eval_data=data.subset(jnp.arange(35, 40)),
                    eval_labels={"y": y[:4], "w": np.ones(5)})
  # Labels rebuilt leaf by leaf skip the Dataset's checks; init checks them again.
  dataset = kronjax.Dataset(data, {"y": y, "w": np.ones(40)})
  broken = jax.tree_util.tree_map(lambda x: x, dataset)
  broken.labels = {"y": jnp.asarray(y), "w": jnp.ones((40,)).at[0].set(jnp.inf)}
  with pytest.raises(ValueError, match=r"labels\['w'\] contains 1 non-finite"):
    kronjax.init(jax.random.PRNGKey(0), config, broken, optax.sgd(0.1))
  # No shape check beyond the leading axis: (n, 2, 3) labels are the loss's business.
  kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16, loss=lambda f, t: jnp.mean(t)),
               kronjax.Dataset(data, np.ones((40, 2, 3))), optax.sgd(0.1))
  # A pytree of labels needs a loss of one's own.
  with pytest.raises(TypeError, match=r"labels is a dict.*kronjax.Config\(loss=fn\)"):
    kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=16), dataset, optax.sgd(0.1))


def test_a_loss_must_return_a_scalar():
  data, y = _task()
  dataset = kronjax.Dataset(data, y)
  config = kronjax.Config(width=16, loss=lambda f, t: (f[:, 0] - t) ** 2)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1))
  with pytest.raises(ValueError, match="loss must return a scalar"):
    kronjax.train_step(state, dataset, jnp.arange(4))


def _status_setup(loss=logistic, **plan):
  data, y = _task()
  dataset = kronjax.Dataset(data, _labels("logistic", y))
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32, threshold=0.0, loss=loss),
                       dataset, optax.sgd(0.1), plan=kronjax.Plan(**plan))
  return dataset, state


def test_status_codes():
  assert [int(s) for s in Status] == [0, 1, 2, 3, 4]
  dataset, state = _status_setup(update="sparse")
  step = jax.jit(kronjax.train_step)
  _, m = step(state, dataset, jnp.arange(4))
  assert m["status"].dtype == jnp.int32 and int(m["status"]) == Status.OK
  _, m = step(state, dataset, jnp.asarray([0, 1, 40]))
  assert int(m["status"]) == Status.INVALID_BATCH and bool(m["invalid_batch"])
  small = kronjax.with_plan(state, active_capacity=1)
  _, m = step(small, dataset, jnp.asarray([0, 1, 40]))   # overflow comes first
  assert int(m["status"]) == Status.OVERFLOW and bool(m["skipped"])
  other = kronjax.Dataset(dataset.data, -dataset.labels)
  _, m = step(state, other, jnp.arange(4))
  assert int(m["status"]) == Status.WRONG_DATASET
  dataset, state = _status_setup(loss=lambda f, t: jnp.mean(jnp.log(f[:, 0] - 1e3)),
                                 update="full")
  new, m = step(state, dataset, jnp.arange(4))
  assert int(m["status"]) == Status.NONFINITE_LOSS and int(new.step) == 0


def test_check_status_raises_under_checkify_in_a_scan():
  dataset, state = _status_setup()
  batches = jnp.asarray(np.arange(5 * 4).reshape(5, 4) % 40, jnp.int32).at[3, 2].set(40)

  def run(state, batches):
    def body(state, batch_idx):
      state, metrics = kronjax.train_step(state, dataset, batch_idx)
      check_status(metrics)
      return state, metrics["status"]
    return jax.lax.scan(body, state, batches)

  err, (new, statuses) = jax.jit(checkify.checkify(run))(state, batches)
  assert list(np.asarray(statuses)) == [0, 0, 0, 2, 0]
  assert int(new.step) == 4
  message = err.get()
  assert message is not None and "at step 3" in message and "status 2" in message
  with pytest.raises(Exception, match="status 2"):
    err.throw()
  err, _ = jax.jit(checkify.checkify(run))(state, batches.at[3, 2].set(0))
  assert err.get() is None
