"""The kernel-space step equals dense SGD on the materialized inputs (float64)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native as native_lib
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
    ("sgd", "mse", True, "full", "factors", (4, 6), 2, "neurons"),
    ("momentum", "mse", False, "full", "precomputed", (3, 4, 5), 1, "auto"),
    ("momentum", "softmax", True, "sparse", "precomputed", (4, 6), 2, "neurons"),
    ("nesterov", "softmax", False, "full", "factors", (4, 6), 1, "neurons"),
    ("nesterov", "mse", True, "sparse", "precomputed", (3, 4, 5), 1, "auto"),
    ("schedule", "softmax", True, "full", "precomputed", (4, 6), 1, "points"),
    ("schedule", "mse", False, "sparse", "factors", (3, 4, 5), 2, "auto"),
    ("inject", "softmax", False, "sparse", "precomputed", (4, 6), 1, "auto"),
    ("sgd", "mse", False, "full", "precomputed", (4, 6), 1, "points"),
]


def _task(loss, dims, rank, n=48, seed=0):
  key = jax.random.PRNGKey(seed)
  task = "regression" if loss == "mse" else "classification"
  return kronjax.data.planted(key, n, dims, task=task, num_classes=3, rank=rank)


@pytest.mark.parametrize("tx_name,loss,train_output,update,gram,dims,rank,layout", CASES)
def test_matches_dense_sgd(x64, tx_name, loss, train_output, update, gram, dims, rank, layout):
  data, labels = _task(loss, dims, rank)
  config = kronjax.Config(width=96, threshold=0.6, loss=loss, num_classes=3 if loss == "softmax" else 1,
                          train_output=train_output)
  plan = kronjax.Plan(update=update, layout=layout)
  expected_layout = "points" if layout == "points" else "neurons"
  assert plan.resolve(config).layout == expected_layout
  state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(3), config, TXS[tx_name](), data,
                                          labels, plan=plan, steps=50, batch=8, gram=gram)
  assert state.layout == expected_layout and dataset.gram_mode == gram
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  np.testing.assert_array_equal(hist["kron"]["active"], hist["dense"]["active"])
  params = kronjax.dense_params(state, dataset)
  assert rel_err(params["W"], dstate.params["W"]) < 1e-9
  assert rel_err(params["a"], dstate.a) < 1e-9
  # The run really moved the weights (a stuck run would match trivially).
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["neurons", "points"])
@pytest.mark.parametrize("native", [True, False])
def test_full_step_with_each_cpu_product_matches_dense_sgd(x64, native, layout):
  """The full path's P and P_eval updates (products.add_product) with the native
  kernel and with XLA's product. At ~5 % of neurons active (threshold 1.6) the
  kernel takes its zero-skipping loop for the neuron-major updates (every P_eval;
  P in the "neurons" layout) and gemm for the point-major P."""
  if native and not native_lib.available():
    pytest.skip(f"native kernel unavailable: {native_lib.info()['reason']}")
  with dispatch.using(native):  # the choice is made at trace time; caches cleared
    data, labels = _task("mse", (4, 6), 1, n=60)
    train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
    config = kronjax.Config(width=128, threshold=1.6, train_output=True)
    plan = kronjax.Plan(update="full", layout=layout)
    state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(2), config, optax.sgd(2.0), train,
                                            labels[:40], plan=plan, steps=30, eval_data=held,
                                            eval_labels=labels[40:])
    assert 0 < np.mean(hist["kron"]["active"]) < 0.1 * config.width  # the kernel's sparse regime
    assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-10
    params = kronjax.dense_params(state, dataset)
    assert rel_err(params["W"], dstate.params["W"]) < 1e-10
    held_W = dstate.params["W"] @ held.materialize().T                  # (m, n_e)
    assert rel_err(state.P_eval, held_W) < 1e-10
    assert float(jnp.max(jnp.abs(state.A))) > 1e-3


class TestJitVariants(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_with_and_without_jit(self):
    with jax.enable_x64(True):
      data, labels = _task("softmax", (4, 5), 1)
      config = kronjax.Config(width=64, threshold=0.5, loss="softmax", num_classes=3, train_output=True)
      tx = optax.sgd(0.3, momentum=0.5)
      dataset = kronjax.Dataset(data, labels)
      state = kronjax.init(jax.random.PRNGKey(0), config, dataset, tx)
      step = self.variant(kronjax.train_step)
      ref = jax.jit(kronjax.train_step)
      ref_state = state
      for bi in batches(data.n, 6, 10):
        state, m = step(state, dataset, jnp.asarray(bi))
        ref_state, rm = ref(ref_state, dataset, jnp.asarray(bi))
        chex.assert_trees_all_close(m["loss"], rm["loss"], rtol=1e-12)
      chex.assert_trees_all_close(state.P, ref_state.P, rtol=1e-12, atol=1e-12)


def test_invariants_after_many_steps(x64):
  data, labels = _task("mse", (5, 6), 1, n=40)
  config = kronjax.Config(width=128, threshold=0.5)
  dataset = kronjax.Dataset(data, labels)
  state0 = kronjax.init(jax.random.PRNGKey(1), config, dataset, optax.sgd(0.5, momentum=0.5))
  state = state0
  step = jax.jit(kronjax.train_step)
  for bi in batches(data.n, 5, 200):
    state, _ = step(state, dataset, jnp.asarray(bi))
  K = data.gram()
  chex.assert_trees_all_close(state.P, state0.P + state.A @ K, rtol=0, atol=1e-10)
  W = kronjax.dense_params(state, dataset)["W"]
  chex.assert_trees_all_close(state.P, W @ data.materialize().T, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["auto", "full"])   # "full" stores P point-major
def test_eval_projections_and_predict_match_dense(x64, update):
  data, labels = _task("mse", (4, 6), 1, n=60)
  train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
  config = kronjax.Config(width=96, threshold=0.5, train_output=True)
  state, dstate, _, dataset = run_pair(jax.random.PRNGKey(2), config, optax.sgd(0.5, momentum=0.3),
                                       train, labels[:40], plan=kronjax.Plan(update=update),
                                       steps=30, eval_data=held, eval_labels=labels[40:])
  dense_out = kronjax.dense.forward(dstate.params["W"], dstate.a, dstate.b, held.materialize())
  chex.assert_trees_all_close(kronjax.predict(state, dataset, held), dense_out, rtol=1e-9,
                              atol=1e-12)
  # New points (neither train nor eval) go through W0 regeneration + A K.
  fresh = kronjax.data.synthetic(jax.random.PRNGKey(9), 7, (4, 6))
  fresh_out = kronjax.dense.forward(dstate.params["W"], dstate.a, dstate.b, fresh.materialize())
  chex.assert_trees_all_close(kronjax.predict(state, dataset, fresh), fresh_out, rtol=1e-9,
                              atol=1e-12)
  ev = kronjax.evaluate(state, dataset)
  dense_eval = kronjax.dense.evaluate(dstate, config, held.materialize(), labels[40:])
  assert abs(float(ev["eval_loss"]) - float(dense_eval["loss"])) < 1e-10


def test_implicit_init_trains_and_predicts_registered_points():
  data, labels = _task("softmax", (8, 8), 1, n=80)
  train, held = data.subset(np.arange(60)), data.subset(np.arange(60, 80))
  config = kronjax.Config(width=256, init="implicit", loss="softmax", num_classes=3)
  dataset = kronjax.Dataset(train, labels[:60], eval_data=held, eval_labels=labels[60:])
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(1.0))
  out = kronjax.predict(state, dataset, held)
  assert out.shape == (20, 3)
  with pytest.raises(ValueError, match="init='kronecker'"):
    kronjax.predict(state, dataset, kronjax.data.synthetic(jax.random.PRNGKey(1), 3, (8, 8)))
  with pytest.raises(ValueError, match="explicit"):
    kronjax.dense_params(state, dataset)


def test_overflowing_step_is_skipped_and_flagged():
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=64, threshold=0.0)
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1),
                       plan=kronjax.Plan(active_capacity=2))
  new, m = jax.jit(kronjax.train_step)(state, dataset, jnp.arange(4))
  assert bool(m["overflow"]) and bool(m["skipped"]) and int(m["max_active"]) > 2
  assert np.isnan(float(m["loss"]))
  chex.assert_trees_all_equal(new, state)
  assert int(new.step) == 0


def test_step_compiles_once_per_shape():
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=64, threshold=0.5)
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, b):
    return kronjax.train_step(s, dataset, b)

  for bi in batches(data.n, 4, 5):
    state, _ = step(state, jnp.asarray(bi))


def _one_label_named_P():
  # A multi_transform whose only label is literally "P": the A trace sits under
  # inner_states["P"] too, and must not be transposed with P's.
  return optax.multi_transform({"P": optax.sgd(0.2, momentum=0.9)},
                               lambda params: {k: "P" for k in params})


@pytest.mark.parametrize("tx_name", ["sgd", "momentum", "label named P"])
def test_layout_switch_mid_training_is_exact(x64, tx_name):
  """with_plan(layout=...) transposes P and the optimizer's P traces: the run
  continues exactly as if it had never switched."""
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=96, threshold=0.6)
  tx = _one_label_named_P() if tx_name == "label named P" else TXS[tx_name]()
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(5), config, dataset, tx,
                       plan=kronjax.Plan(update="full", layout="neurons"))
  step = jax.jit(kronjax.train_step)
  switched = straight = state
  for t, bi in enumerate(batches(data.n, 8, 20)):
    if t == 10:
      switched = kronjax.with_plan(switched, layout="points")
      assert switched.projections.shape == (data.n, 96) and switched.P.shape == (96, data.n)
    switched, m1 = step(switched, dataset, jnp.asarray(bi))
    straight, m2 = step(straight, dataset, jnp.asarray(bi))
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-12 * abs(float(m2["loss"]))
  chex.assert_trees_all_close(switched.P, straight.P, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(switched.A_T, straight.A_T, rtol=1e-12, atol=1e-12)
  back = kronjax.with_plan(switched, layout="neurons")
  chex.assert_trees_all_close(back.opt_state, straight.opt_state, rtol=1e-12, atol=1e-12)


def test_replace_P_is_stored_in_the_layout():
  data, labels = _task("mse", (4, 6), 1)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32),
                       kronjax.Dataset(data, labels), optax.sgd(0.1),
                       plan=kronjax.Plan(layout="points"))
  assert state.layout == "points"
  P = jnp.arange(32 * data.n, dtype=state.P.dtype).reshape(32, data.n)
  np.testing.assert_array_equal(state.replace(P=P).P, P)
  np.testing.assert_array_equal(state.replace(P=P).projections, P.T)


def test_point_major_state_always_gets_the_scan_index():
  # The full path never queries an index; a bucketed one built from the (n, m)
  # array would be wrong and would cost rebuilds. index="auto" resolves to "scan"
  # (and "bucketed" with the points layout is refused, test_errors).
  data, labels = _task("mse", (4, 6), 1)
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=64), dataset,
                       optax.sgd(0.1), plan=kronjax.Plan(layout="points"))
  assert state.layout == "points" and state.index_kind == "scan"
  state, metrics = jax.jit(kronjax.train_step)(state, dataset, jnp.arange(8))
  assert np.isfinite(float(metrics["loss"]))
  assert kronjax.with_plan(state, active_capacity=32).index_kind == "scan"
  assert kronjax.with_plan(state, layout="neurons").index_kind == "scan"
  bucketed = kronjax.with_plan(state, layout="neurons", index="bucketed")
  assert bucketed.layout == "neurons" and bucketed.index_kind == "bucketed"


@pytest.mark.parametrize("tx_name", ["sgd", "momentum"])
def test_sparse_path_at_batch_size_one_matches_dense_sgd(x64, tx_name):
  data, labels = _task("mse", (4, 6), 1)
  config = kronjax.Config(width=96, threshold=0.6)
  state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(4), config, TXS[tx_name](), data,
                                          labels, plan=kronjax.Plan(update="sparse"), steps=60,
                                          batch=1)
  assert state.update_path(1) == "sparse"
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  assert rel_err(kronjax.dense_params(state, dataset)["W"], dstate.params["W"]) < 1e-9
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3


@pytest.mark.slow
def test_factors_gram_with_eval_data_matches_dense_sgd(x64):
  data, labels = _task("softmax", (3, 4, 5), 2, n=60)
  train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
  config = kronjax.Config(width=96, threshold=0.6, loss="softmax", num_classes=3, train_output=True)
  state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(6), config, TXS["momentum"](), train,
                                          labels[:40], steps=30, eval_data=held,
                                          eval_labels=labels[40:], gram="factors")
  assert dataset.gram is None and dataset.gram_eval is None
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  assert rel_err(state.P_eval, dstate.params["W"] @ held.materialize().T) < 1e-9
  ev = kronjax.evaluate(state, dataset)
  dense_eval = kronjax.dense.evaluate(dstate, config, held.materialize(), labels[40:])
  assert abs(float(ev["eval_loss"]) - float(dense_eval["loss"])) < 1e-9


# Every update path, layout and index kind: (update, layout, index, tx)
SKIP_CASES = [
    ("sparse", "neurons", "scan", "sgd"),
    ("sparse", "neurons", "bucketed", "momentum"),
    ("full", "neurons", "scan", "sgd"),
    ("full", "points", "scan", "momentum"),
    ("full", "points", "scan", "sgd"),
]


@pytest.mark.parametrize("update,layout,index,tx_name", SKIP_CASES)
@pytest.mark.parametrize("bad", [[0, 1, 48, 40], [0, -1, 2, 3], [5, 6, 7, 2**30]])
def test_out_of_range_batch_under_jit_is_an_exact_no_op(update, layout, index, tx_name, bad):
  data, labels = _task("mse", (4, 6), 1)
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=64, threshold=0.5, train_output=True)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, TXS[tx_name](),
                       plan=kronjax.Plan(update=update, layout=layout, index=index))
  assert (state.layout, state.index_kind, state.update_path(4)) == (layout, index, update)
  state, _ = jax.jit(kronjax.train_step)(state, dataset, jnp.arange(4))  # nonzero momentum
  new, m = jax.jit(kronjax.train_step)(state, dataset, jnp.asarray(bad, jnp.int32))
  assert bool(m["invalid_batch"]) and bool(m["skipped"]) and np.isnan(float(m["loss"]))
  chex.assert_trees_all_equal(new, state)  # bit for bit, optimizer state and step included
  # Concrete indices are refused before any work.
  with pytest.raises(ValueError, match=r"batch_idx must hold indices in \[0, 48\)"):
    kronjax.train_step(state, dataset, np.asarray(bad))


@pytest.mark.parametrize("update", ["sparse", "full"])
def test_non_finite_loss_skips_the_step(update):
  data, labels = _task("mse", (4, 6), 1)
  bad_labels = np.asarray(labels).copy()
  dataset = kronjax.Dataset(data, bad_labels)
  config = kronjax.Config(width=64, threshold=0.5)
  state = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.1, momentum=0.5),
                       plan=kronjax.Plan(update=update))
  huge = state.replace(a=state.a * jnp.asarray(1e30, state.a.dtype))  # outputs overflow to inf
  new, m = jax.jit(kronjax.train_step)(huge, dataset, jnp.arange(8))
  assert not np.isfinite(float(m["loss"])) and bool(m["skipped"]) and not bool(m["overflow"])
  chex.assert_trees_all_equal(new, huge)
  with pytest.raises(FloatingPointError, match="non-finite"):
    kronjax.fit(huge, dataset, jax.random.PRNGKey(1), batch_size=8, steps=3, progress=False)


def test_old_dense_aliases_are_refused():
  # "dense" once stood for update="full" and index="scan"; the aliases are gone,
  # and neither field belongs to the Config any more.
  with pytest.raises(ValueError, match=r"update must be one of .*'full'\), got 'dense'"):
    kronjax.Plan(update="dense")
  with pytest.raises(ValueError, match=r"index must be one of .*'bucketed'\), got 'dense'"):
    kronjax.Plan(index="dense")
  with pytest.raises(ValueError, match=r"kronjax\.Plan\(update=\.\.\.\)"):
    kronjax.Config.from_dict({"width": 8, "update": "dense"})
  with pytest.raises(TypeError, match="index"):
    kronjax.Config(width=8, index="dense")
  assert kronjax.Plan(update="full").update == "full" and kronjax.Plan(index="scan").index == "scan"


def test_jit_train_step_equals_train_step_and_donates():
  data, labels = _task("mse", (4, 6), 1)
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=64), dataset, optax.sgd(0.3))
  expected, _ = jax.jit(kronjax.train_step)(state, dataset, jnp.arange(8))
  copy = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
  got, _ = kronjax.jit_train_step(copy, dataset, jnp.arange(8))
  chex.assert_trees_all_equal(got, expected)
  assert copy.A_T.is_deleted()  # donated
  with pytest.raises(ValueError, match="batch_idx"):
    kronjax.jit_train_step(got, dataset, np.array([0, 99]))


def test_every_entry_point_refuses_another_dataset():
  data, labels = _task("mse", (4, 6), 1)
  dataset = kronjax.Dataset(data, labels)
  other = kronjax.Dataset(data, np.asarray(labels) + 1.0)
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32), dataset, optax.sgd(0.1))
  # kronjax.jit_train_step compares the fingerprints inside the step (a no-op with
  # metrics["wrong_dataset"]; test_api) and refuses only other shapes on the host.
  calls = {
      "train_step": lambda: kronjax.train_step(state, other, jnp.arange(4)),
      "fit": lambda: kronjax.fit(state, other, jax.random.PRNGKey(0), batch_size=4, steps=1),
      "evaluate": lambda: kronjax.evaluate(state, other),
      "predict": lambda: kronjax.predict(state, other, data),
      "dense_params": lambda: kronjax.dense_params(state, other),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match="not the dataset this state was built from"):
      call()
  smaller = kronjax.Dataset(data.subset(np.arange(10)), labels[:10])
  for step in (kronjax.train_step, kronjax.jit_train_step):
    with pytest.raises(ValueError, match="n=10"):
      step(state, smaller, jnp.arange(4))


def test_dtype_policy_labels_threshold_and_optimizer_scalars_follow_the_data(x64):
  """float32 data under x64: float64 labels, a float64 threshold and a float64
  learning rate are cast once; the state stays float32 and trains exactly as the
  all-float32 run."""
  data64, labels64 = _task("mse", (4, 6), 1)
  data = kronjax.KronData(tuple(f.astype(jnp.float32) for f in data64.factors))
  mixed = kronjax.Dataset(data, np.asarray(labels64, np.float64))
  plain = kronjax.Dataset(data, np.asarray(labels64, np.float32))
  assert mixed.labels.dtype == jnp.float32
  np.testing.assert_array_equal(mixed.fingerprint, plain.fingerprint)
  config = kronjax.Config(width=64, threshold=0.5)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.asarray(0.3, jnp.float64))
  s_mixed = kronjax.init(jax.random.PRNGKey(0), config, mixed, tx, threshold=np.float64(0.5))
  s_plain = kronjax.init(jax.random.PRNGKey(0), config, plain, optax.inject_hyperparams(optax.sgd)(
      learning_rate=jnp.asarray(0.3, jnp.float32)))
  assert s_mixed.b.dtype == jnp.float32
  step = jax.jit(kronjax.train_step)
  for bi in batches(data.n, 8, 5):
    s_mixed, _ = step(s_mixed, mixed, jnp.asarray(bi))
    s_plain, _ = step(s_plain, plain, jnp.asarray(bi))
  for x in (s_mixed.projections, s_mixed.A_T, s_mixed.a):
    assert x.dtype == jnp.float32
  np.testing.assert_array_equal(s_mixed.P, s_plain.P)
  # Integer targets for mse are cast to the data's dtype by the step, not promoted.
  ints = kronjax.Dataset(data, np.arange(data.n) % 3)
  s_int = kronjax.init(jax.random.PRNGKey(0), config, ints, optax.sgd(0.1))
  out, m = step(s_int, ints, jnp.arange(8))
  assert out.P.dtype == jnp.float32 and m["loss"].dtype == jnp.float32


def test_active_counts_are_exact_in_bfloat16():
  from kronjax._src.kernels import rows
  Z = jnp.ones((2, 1000), jnp.bfloat16)
  a = jnp.ones((1000, 1), jnp.bfloat16)
  counts = rows.relu_of(Z, jnp.asarray(0.0, jnp.bfloat16), a).active
  np.testing.assert_array_equal(np.asarray(counts), [1000, 1000])
  Z = Z.at[0, :3].set(-1)  # 997 has no bfloat16 value (multiples of 4 above 512)
  np.testing.assert_array_equal(np.asarray(rows.relu_of(Z, jnp.asarray(0.0, jnp.bfloat16), a).active),
                                [997, 1000])


@pytest.mark.slow
@pytest.mark.parametrize("init", ["explicit", "implicit"])
def test_resync_recomputes_P_exactly_from_A(init):
  """float32: after many momentum steps P has drifted from P0 + A K by rounding;
  resync puts it back to within one product's rounding, and fit(resync_every=)
  trains on."""
  data, labels = _task("mse", (4, 6), 1, n=40)
  train, held = data.subset(np.arange(30)), data.subset(np.arange(30, 40))
  dataset = kronjax.Dataset(train, labels[:30], eval_data=held, eval_labels=labels[30:])
  config = kronjax.Config(width=64, threshold=0.5, init=init)
  state0 = kronjax.init(jax.random.PRNGKey(0), config, dataset, optax.sgd(0.5, momentum=0.9))
  state, _ = kronjax.fit(state0, dataset, jax.random.PRNGKey(1), batch_size=5, steps=400,
                         progress=False)
  with jax.enable_x64(True):
    K = np.asarray(train.gram(), np.float64)
    exact = np.asarray(state0.P, np.float64) + np.asarray(state.A, np.float64) @ K
  fixed = kronjax.resync(state, dataset)
  drift = np.max(np.abs(np.asarray(state.P) - exact))
  after = np.max(np.abs(np.asarray(fixed.P) - exact))
  assert after < drift and after < 1e-5 * np.max(np.abs(exact))
  assert np.array_equal(fixed.A_T, state.A_T) and int(fixed.step) == int(state.step)
  assert fixed.P_eval is not None
  out, hist = kronjax.fit(state0, dataset, jax.random.PRNGKey(1), batch_size=5, steps=40,
                          progress=False, resync_every=10)
  assert np.all(np.isfinite(hist["loss"])) and int(out.step) == 40


# The kronecker init: (tx, loss, train_output, update, dims, data rank, init_rank)
KRONECKER_CASES = [
    ("sgd", "mse", False, "sparse", (4, 6), 1, 1),
    ("momentum", "softmax", True, "full", (3, 4, 5), 2, 4),
    pytest.param("nesterov", "mse", True, "sparse", (3, 4, 5), 1, 3, marks=pytest.mark.slow),
    pytest.param("sgd", "softmax", False, "full", (4, 6), 3, 8, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("tx_name,loss,train_output,update,dims,rank,init_rank", KRONECKER_CASES)
def test_kronecker_init_matches_dense_sgd_and_predicts_unseen_points(
    x64, tx_name, loss, train_output, update, dims, rank, init_rank):
  data, labels = _task(loss, dims, rank, n=48)
  config = kronjax.Config(width=96, threshold=0.6, loss=loss, num_classes=3 if loss == "softmax" else 1,
                          train_output=train_output, init="kronecker", init_rank=init_rank)
  plan = kronjax.Plan(update=update)
  state0 = kronjax.init(jax.random.PRNGKey(3), config, kronjax.Dataset(data, labels),
                        TXS[tx_name](), plan=plan)
  dataset0 = kronjax.Dataset(data, labels)
  W0 = kronjax.dense_params(state0, dataset0)["W"]
  assert rel_err(state0.P, W0 @ data.materialize().T) < 1e-12   # P0 = W0 X^T from the factors
  state, dstate, hist, dataset = run_pair(jax.random.PRNGKey(3), config, TXS[tx_name](), data,
                                          labels, plan=plan, steps=40, batch=8)
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  assert rel_err(kronjax.dense_params(state, dataset)["W"], dstate.params["W"]) < 1e-9
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3
  unseen = kronjax.data.synthetic(jax.random.PRNGKey(11), 7, dims, rank=2)
  expected = kronjax.dense.forward(dstate.params["W"], dstate.a, dstate.b, unseen.materialize())
  assert rel_err(kronjax.predict(state, dataset, unseen), expected) < 1e-9
