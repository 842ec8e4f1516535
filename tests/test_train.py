"""The kernel-space step equals dense SGD on the materialized inputs (float64)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from reference import batches, rel_err, run_pair

TXS = {
    "sgd": lambda: optax.sgd(0.5),
    "momentum": lambda: optax.sgd(0.2, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.2, momentum=0.8, nesterov=True),
    "schedule": lambda: optax.sgd(optax.exponential_decay(0.8, transition_steps=10, decay_rate=0.5)),
    "inject": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.4),
}

# A covering set of the option matrix: every value of every option appears, and
# the risky pairs (momentum x sparse gradient, factors Gram x rank 2, ...) too.
CASES = [
    # tx, loss, train_output, update, gram, dims, rank, layout
    ("sgd", "mse", False, "sparse", "precomputed", (4, 6), 1, "auto"),
    ("sgd", "softmax", True, "sparse", "factors", (3, 4, 5), 2, "auto"),
    ("sgd", "mse", True, "dense", "factors", (4, 6), 2, "neurons"),
    ("momentum", "mse", False, "dense", "precomputed", (3, 4, 5), 1, "auto"),
    ("momentum", "softmax", True, "sparse", "precomputed", (4, 6), 2, "neurons"),
    ("nesterov", "softmax", False, "dense", "factors", (4, 6), 1, "neurons"),
    ("nesterov", "mse", True, "sparse", "precomputed", (3, 4, 5), 1, "auto"),
    ("schedule", "softmax", True, "dense", "precomputed", (4, 6), 1, "points"),
    ("schedule", "mse", False, "sparse", "factors", (3, 4, 5), 2, "auto"),
    ("inject", "softmax", False, "sparse", "precomputed", (4, 6), 1, "auto"),
    ("sgd", "mse", False, "dense", "precomputed", (4, 6), 1, "points"),
]


def _task(loss, dims, rank, n=48, seed=0):
  key = jax.random.PRNGKey(seed)
  task = "regression" if loss == "mse" else "classification"
  return kronjax.data.planted(key, n, dims, task=task, num_classes=3, rank=rank)


@pytest.mark.parametrize("tx_name,loss,train_output,update,gram,dims,rank,layout", CASES)
def test_matches_dense_sgd(x64, tx_name, loss, train_output, update, gram, dims, rank, layout):
  data, labels = _task(loss, dims, rank)
  config = kronjax.Config(width=96, threshold=0.6, loss=loss, num_classes=3 if loss == "softmax" else 1,
                          train_output=train_output, update=update, gram=gram, layout=layout)
  assert config.resolved_layout == ("points" if update == "dense" and layout != "neurons"
                                    else "neurons")
  state, dstate, hist = run_pair(jax.random.PRNGKey(3), config, TXS[tx_name](), data, labels,
                                 steps=50, batch=8)
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  np.testing.assert_array_equal(hist["kron"]["active"], hist["dense"]["active"])
  params = kronjax.dense_params(state)
  assert rel_err(params["W"], dstate.params["W"]) < 1e-9
  assert rel_err(params["a"], dstate.a) < 1e-9
  # The run really moved the weights (a stuck run would match trivially).
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3


@pytest.mark.parametrize("layout", ["neurons", "points"])
@pytest.mark.parametrize("native", [True, False])
def test_dense_step_with_each_cpu_product_matches_dense_sgd(x64, monkeypatch, native, layout):
  """The dense path's P and P_eval updates (products.add_product) with the native
  kernel and with XLA's product. At ~5 % of neurons active (threshold 1.6) the
  kernel takes its zero-skipping loop for the neuron-major updates (every P_eval;
  P in the "neurons" layout) and gemm for the point-major P."""
  if native and not kronjax.native.available():
    pytest.skip(f"native kernel unavailable: {kronjax.native.info()['reason']}")
  monkeypatch.setattr(kronjax.products, "USE_NATIVE", native)
  jax.clear_caches()  # the choice is made at trace time
  data, labels = _task("mse", (4, 6), 1, n=60)
  train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
  config = kronjax.Config(width=128, threshold=1.6, train_output=True, update="dense", layout=layout)
  state, dstate, hist = run_pair(jax.random.PRNGKey(2), config, optax.sgd(2.0), train, labels[:40],
                                 steps=30, eval_data=held, eval_labels=labels[40:])
  assert 0 < np.mean(hist["kron"]["active"]) < 0.1 * config.width  # the kernel's sparse regime
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-10
  params = kronjax.dense_params(state)
  assert rel_err(params["W"], dstate.params["W"]) < 1e-10
  held_W = dstate.params["W"] @ held.materialize().T                  # (m, n_e)
  assert rel_err(state.P_eval, held_W) < 1e-10
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3
  jax.clear_caches()


class TestJitVariants(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_with_and_without_jit(self):
    with jax.enable_x64(True):
      data, labels = _task("softmax", (4, 5), 1)
      config = kronjax.Config(width=64, threshold=0.5, loss="softmax", num_classes=3, train_output=True)
      tx = optax.sgd(0.3, momentum=0.5)
      state = kronjax.init(jax.random.PRNGKey(0), config, data, labels, tx)
      step = self.variant(kronjax.train_step)
      ref = jax.jit(kronjax.train_step)
      ref_state = state
      for bi in batches(data.n, 6, 10):
        state, m = step(state, jnp.asarray(bi))
        ref_state, rm = ref(ref_state, jnp.asarray(bi))
        chex.assert_trees_all_close(m["loss"], rm["loss"], rtol=1e-12)
      chex.assert_trees_all_close(state.P, ref_state.P, rtol=1e-12, atol=1e-12)


def test_invariants_after_many_steps(x64):
  data, labels = _task("mse", (5, 6), 1, n=40)
  config = kronjax.Config(width=128, threshold=0.5)
  state0 = kronjax.init(jax.random.PRNGKey(1), config, data, labels, optax.sgd(0.5, momentum=0.5))
  state = state0
  step = jax.jit(kronjax.train_step)
  for bi in batches(data.n, 5, 200):
    state, _ = step(state, jnp.asarray(bi))
  K = data.gram()
  chex.assert_trees_all_close(state.P, state0.P + state.A @ K, rtol=0, atol=1e-10)
  W = kronjax.dense_params(state)["W"]
  chex.assert_trees_all_close(state.P, W @ data.materialize().T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("update", ["auto", "dense"])   # "dense" stores P point-major
def test_eval_projections_and_predict_match_dense(x64, update):
  data, labels = _task("mse", (4, 6), 1, n=60)
  train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
  config = kronjax.Config(width=96, threshold=0.5, train_output=True, update=update)
  state, dstate, _ = run_pair(jax.random.PRNGKey(2), config, optax.sgd(0.5, momentum=0.3), train,
                              labels[:40], steps=30, eval_data=held, eval_labels=labels[40:])
  dense_out = kronjax.dense.forward(dstate.params["W"], dstate.a, dstate.b, held.materialize())
  chex.assert_trees_all_close(kronjax.predict(state, held), dense_out, rtol=1e-9, atol=1e-12)
  # New points (neither train nor eval) go through W0 regeneration + A K.
  fresh = kronjax.data.synthetic(jax.random.PRNGKey(9), 7, (4, 6))
  fresh_out = kronjax.dense.forward(dstate.params["W"], dstate.a, dstate.b, fresh.materialize())
  chex.assert_trees_all_close(kronjax.predict(state, fresh), fresh_out, rtol=1e-9, atol=1e-12)
  ev = kronjax.evaluate(state)
  dense_eval = kronjax.dense.evaluate(dstate, config, held.materialize(), labels[40:])
  assert abs(float(ev["eval_loss"]) - float(dense_eval["loss"])) < 1e-10


def test_implicit_init_trains_and_predicts_registered_points():
  data, labels = _task("softmax", (8, 8), 1, n=80)
  train, held = data.subset(np.arange(60)), data.subset(np.arange(60, 80))
  config = kronjax.Config(width=256, init="implicit", loss="softmax", num_classes=3)
  state = kronjax.init(jax.random.PRNGKey(0), config, train, labels[:60], optax.sgd(1.0),
                       eval_data=held, eval_labels=labels[60:])
  out = kronjax.predict(state, held)
  assert out.shape == (20, 3)
  with pytest.raises(ValueError, match="implicit"):
    kronjax.predict(state, kronjax.data.synthetic(jax.random.PRNGKey(1), 3, (8, 8)))
  with pytest.raises(ValueError, match="explicit"):
    kronjax.dense_params(state)


def test_overflowing_step_is_skipped_and_flagged():
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=64, threshold=0.0, active_capacity=2)
  state = kronjax.init(jax.random.PRNGKey(0), config, data, labels, optax.sgd(0.1))
  new, m = jax.jit(kronjax.train_step)(state, jnp.arange(4))
  assert bool(m["overflow"]) and int(m["max_active"]) > 2
  assert np.isnan(float(m["loss"]))
  chex.assert_trees_all_equal(new.P, state.P)
  chex.assert_trees_all_equal(new.A, state.A)
  assert int(new.step) == 0


def test_step_compiles_once_per_shape():
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=64, threshold=0.5)
  state = kronjax.init(jax.random.PRNGKey(0), config, data, labels, optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, b):
    return kronjax.train_step(s, b)

  for bi in batches(data.n, 4, 5):
    state, _ = step(state, jnp.asarray(bi))


def _one_label_named_P():
  # A multi_transform whose only label is literally "P": the A trace sits under
  # inner_states["P"] too, and must not be transposed with P's.
  return optax.multi_transform({"P": optax.sgd(0.2, momentum=0.9)},
                               lambda params: {k: "P" for k in params})


@pytest.mark.parametrize("tx_name", ["sgd", "momentum", "label named P"])
def test_layout_switch_mid_training_is_exact(x64, tx_name):
  """with_config(layout=...) transposes P and the optimizer's P traces: the run
  continues exactly as if it had never switched."""
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=96, threshold=0.6, update="dense", layout="neurons")
  tx = _one_label_named_P() if tx_name == "label named P" else TXS[tx_name]()
  state = kronjax.init(jax.random.PRNGKey(5), config, data, labels, tx)
  step = jax.jit(kronjax.train_step)
  switched = straight = state
  for t, bi in enumerate(batches(data.n, 8, 20)):
    if t == 10:
      switched = kronjax.with_config(switched, layout="points")
      assert switched.projections.shape == (data.n, 96) and switched.P.shape == (96, data.n)
    switched, m1 = step(switched, jnp.asarray(bi))
    straight, m2 = step(straight, jnp.asarray(bi))
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-12 * abs(float(m2["loss"]))
  chex.assert_trees_all_close(switched.P, straight.P, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(switched.A_T, straight.A_T, rtol=1e-12, atol=1e-12)
  back = kronjax.with_config(switched, layout="neurons")
  chex.assert_trees_all_close(back.opt_state, straight.opt_state, rtol=1e-12, atol=1e-12)


def test_replace_P_is_stored_in_the_layout():
  data, labels = _task("mse", (4, 6), 1)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32, update="dense"), data,
                       labels, optax.sgd(0.1))
  assert state.layout == "points"
  P = jnp.arange(32 * data.n, dtype=state.P.dtype).reshape(32, data.n)
  np.testing.assert_array_equal(state.replace(P=P).P, P)
  np.testing.assert_array_equal(state.replace(P=P).projections, P.T)


def test_point_major_state_always_gets_the_dense_index(monkeypatch):
  # The dense path never queries an index; a bucketed one built from the (n, m)
  # array would be wrong and would cost rebuilds.
  monkeypatch.setattr(kronjax.threshold, "AUTO_BUCKETED_MIN_WIDTH", 1)
  data, labels = _task("mse", (4, 6), 1)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=64, update="dense"), data,
                       labels, optax.sgd(0.1))
  assert state.layout == "points" and state.index_kind == "dense"
  state, metrics = jax.jit(kronjax.train_step)(state, jnp.arange(8))
  assert np.isfinite(float(metrics["loss"]))
  assert kronjax.with_config(state, active_capacity=32).index_kind == "dense"
  assert kronjax.with_config(state, layout="neurons").index_kind == "bucketed"
