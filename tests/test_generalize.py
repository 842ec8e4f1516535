"""The centered start, weight decay and the output bias: each exact against dense SGD (float64).

Dense SGD runs on the materialized inputs from the same key on the same batches; kronjax's
``P`` must stay ``W X^T`` and its weights ``s W0 + A X`` must equal the dense ``W``, and
``predict`` on unseen points must equal the dense network's outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import dense

pytestmark = pytest.mark.usefixtures("x64_module")

TXS = {
    "sgd": lambda: optax.sgd(0.4),
    "momentum": lambda: optax.sgd(0.3, momentum=0.8),
    "decay": lambda: optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.4)),
    "decay_momentum": lambda: optax.chain(optax.add_decayed_weights(0.05),
                                          optax.sgd(0.3, momentum=0.8)),
}


def _task(dims, n=60, n_new=7, seed=0):
  key = jax.random.PRNGKey(seed)
  data, labels = kronjax.data.planted(key, n + n_new, dims=dims, task="regression",
                                      dtype=jnp.float64)
  return (data.subset(jnp.arange(n)), labels[:n], data.subset(jnp.arange(n, n + n_new)))


def _batches(n, batch, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.choice(n, batch, replace=False).astype(np.int32) for _ in range(steps)]


def _run(config, tx_name, dims, plan=None, steps=25, batch=6):
  data, labels, new = _task(dims)
  key = jax.random.PRNGKey(3)
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(key, config, dataset, TXS[tx_name](), plan=plan)
  X = data.materialize()
  dstate = dense.init(key, config, data.dims, TXS[tx_name](), dtype=X.dtype)
  dstep = dense.make_step(config, TXS[tx_name](), donate=False)
  step = jax.jit(kronjax.train_step)
  for bi in _batches(data.n, batch, steps):
    state, m = step(state, dataset, jnp.asarray(bi))
    assert not bool(m["skipped"])
    dstate, _ = dstep(dstate, X[bi], dataset.labels[bi])
  return state, dstate, dataset, new


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


CASES = [
    # (tx, centered, output_bias, train_output, dims, plan)
    ("sgd", True, False, False, (4, 6), None),
    ("momentum", True, True, True, (3, 2, 4), None),
    ("decay", False, False, False, (4, 6), None),
    ("decay", True, True, True, (3, 2, 4), kronjax.Plan(update="full", layout="neurons")),
    ("decay_momentum", False, True, False, (4, 6), kronjax.Plan(update="sparse")),
    ("decay_momentum", True, False, True, (3, 2, 4), kronjax.Plan(update="full")),
    ("sgd", False, True, False, (4, 6), kronjax.Plan(update="sparse")),
    ("momentum", False, True, True, (4, 6), kronjax.Plan(update="full")),
]


@pytest.mark.parametrize("tx_name,centered,output_bias,train_output,dims,plan", CASES)
def test_matches_dense_sgd_and_predicts_unseen_points(tx_name, centered, output_bias,
                                                      train_output, dims, plan):
  config = kronjax.Config(width=48, threshold=0.3, centered=centered, output_bias=output_bias,
                          train_output=train_output)
  state, dstate, dataset, new = _run(config, tx_name, dims, plan)
  params = kronjax.dense_params(state, dataset)
  assert _rel(params["W"], dstate.params["W"]) < 1e-9
  assert _rel(state.P, dstate.params["W"] @ dataset.data.materialize().T) < 1e-9
  assert _rel(params["a"], dstate.a) < 1e-12 if train_output else True
  np.testing.assert_allclose(np.asarray(state.bias), np.asarray(dstate.bias), atol=1e-12)
  want = dense.forward(dstate.params["W"], dstate.a, dstate.b, new.materialize(), dstate.bias)
  assert _rel(kronjax.predict(state, dataset, new), want) < 1e-9
  if "decay" in tx_name:
    assert float(state.w0_scale) < 1.0   # the init's weights decayed with the rest


def test_centered_start_outputs_zero_on_every_input():
  config = kronjax.Config(width=64, threshold=0.0, centered=True)
  data, labels, new = _task((4, 6))
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1))
  # Mirrored neurons cancel exactly in real arithmetic; the sum over m is rounded.
  assert np.max(np.abs(np.asarray(kronjax.predict(state, dataset, new)))) < 1e-12
  assert np.max(np.abs(np.asarray(kronjax.predict(state, dataset, data)))) < 1e-12
  assert np.array_equal(np.asarray(state.P[:32]), np.asarray(state.P[32:]))
  assert np.array_equal(np.asarray(state.a[:32]), -np.asarray(state.a[32:]))


def test_centered_needs_an_even_width():
  with pytest.raises(ValueError, match="width must be even"):
    kronjax.Config(width=33, centered=True)


def test_weight_decay_is_accepted_and_adam_still_refused():
  data, labels, _ = _task((4, 6))
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=16)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset,
                       optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1)))
  assert state.tx.needs_params and not state.tx.shape_free
  with pytest.raises(ValueError, match="not linear"):
    kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.adamw(1e-3))


def test_resync_keeps_the_decayed_init_scale():
  config = kronjax.Config(width=48, threshold=0.3)
  state, _, dataset, _ = _run(config, "decay", (4, 6))
  again = kronjax.resync(state, dataset)
  assert _rel(again.P, state.P) < 1e-12


def test_evaluate_names_what_it_reports():
  data, labels, new = _task((4, 6))
  dataset = kronjax.Dataset(data.subset(jnp.arange(50)), labels[:50],
                            eval_data=data.subset(jnp.arange(50, 60)), eval_labels=labels[50:])
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32, output_bias=True),
                       dataset, optax.sgd(0.1))
  metrics = kronjax.evaluate(state, dataset)
  assert set(metrics) == {"train_loss", "train_mse", "train_rmse", "eval_loss", "eval_mse",
                          "eval_rmse"}
  err = np.asarray(kronjax.predict(state, dataset, dataset.eval_data)) - np.asarray(
      dataset.eval_labels).reshape(-1, 1)
  np.testing.assert_allclose(float(metrics["eval_mse"]), np.mean(err ** 2), rtol=1e-10)
  np.testing.assert_allclose(float(metrics["eval_loss"]), 0.5 * np.mean(err ** 2), rtol=1e-10)
  np.testing.assert_allclose(float(metrics["eval_rmse"]), np.sqrt(np.mean(err ** 2)), rtol=1e-10)


def test_a_sweep_varies_threshold_learning_rate_and_decay_together():
  data, labels, _ = _task((4, 6))
  dataset = kronjax.Dataset(data, labels)

  def decayed_sgd(learning_rate, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))

  tx = optax.inject_hyperparams(decayed_sgd)(learning_rate=0.1, weight_decay=0.0)
  members = kronjax.sweep.grid(threshold=[0.0, 0.5], learning_rate=[0.2], weight_decay=[0.0, 0.1])
  config = kronjax.Config(width=32, centered=True)
  states = kronjax.sweep.init(config, dataset, members, tx=tx)
  states, _ = kronjax.sweep.fit(states, dataset, jax.random.PRNGKey(1), batch_size=5, steps=6,
                                progress=False)
  for i, member in enumerate(members):
    tx_i = decayed_sgd(member["learning_rate"], member["weight_decay"])
    one = kronjax.init(jax.random.PRNGKey(0), config, dataset, tx_i, threshold=member["threshold"])
    one, _ = kronjax.fit(one, dataset, jax.random.PRNGKey(1), batch_size=5, steps=6,
                         progress=False)
    got = kronjax.sweep.member(states, i)
    assert _rel(got.P, one.P) < 1e-10 and _rel(got.w0_scale, one.w0_scale) < 1e-12
