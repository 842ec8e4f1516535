"""Composing kronjax with JAX transforms and other tools: resampled and stacked datasets,
new points prepared as the training points were, sweep states, half precision, pickle and
flax, the memory check, networks with a loss of one's own, zero rows under normalize."""

from __future__ import annotations

import copy
import io
import json
import pickle
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import dense
from kronjax import sweep
from kronjax._src.inference import network as network_lib
from kronjax._src.step import state as state_lib

from reference import batches, rel_err, run_pair

KEY = jax.random.PRNGKey(0)


def _task(n=40, n_eval=0, dims=(4, 5)):
  data, y = kronjax.data.planted(jax.random.PRNGKey(1), n + n_eval, dims=dims, task="regression")
  train = data.subset(np.arange(n))
  if not n_eval:
    return train, y[:n]
  return train, y[:n], data.subset(np.arange(n, n + n_eval)), y[n:]


def _indexed(n=30):
  rng = np.random.default_rng(0)
  tables = tuple(t / np.linalg.norm(t, axis=1, keepdims=True)       # unit-norm points
                 for t in (rng.normal(size=(6, 3)), rng.normal(size=(5, 4))))
  index = np.stack([rng.integers(0, 6, n), rng.integers(0, 5, n)], axis=1)
  return kronjax.KronData(tables, index=index), rng.normal(size=n)


def _train(state, dataset, idx_list):
  step = jax.jit(kronjax.train_step)
  for bi in idx_list:
    state, m = step(state, dataset, jnp.asarray(bi))
    assert int(m["status"]) == 0
  return state


# ----------------------------------------------------------------------------- take and stack

@pytest.mark.parametrize("gram", ["precomputed", "factors"])
def test_take_is_the_dataset_built_from_those_points(x64, gram):
  data, y, held, y_held = _task(n_eval=10)
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held, gram=gram)
  idx = np.array([3, 3, 0, 7, 12, 39, 5])                     # repeats: a bootstrap draw
  taken = ds.take(idx)
  built = kronjax.Dataset(data.subset(idx), y[idx], eval_data=held, eval_labels=y_held, gram=gram)
  assert taken.n == 7 and taken.n_eval == 10 and taken.gram_mode == gram
  np.testing.assert_array_equal(taken.fingerprint, built.fingerprint)
  assert not np.array_equal(taken.fingerprint, ds.fingerprint)
  assert rel_err(taken.full_gram(), built.full_gram()) < 1e-12           # rows and columns
  assert rel_err(taken.full_gram_eval(), built.full_gram_eval()) < 1e-12
  np.testing.assert_array_equal(taken.labels, built.labels)
  dropped = ds.take(idx, keep_eval=False)
  assert dropped.n_eval == 0 and dropped.gram_eval is None and dropped.eval_labels is None
  np.testing.assert_array_equal(
      dropped.fingerprint, kronjax.Dataset(data.subset(idx), y[idx], gram=gram).fingerprint)


def test_take_of_indexed_data_keeps_the_tables_and_a_label_pytree(x64):
  data, y = _indexed()
  labels = {"y": y, "w": np.linspace(0.5, 1.5, 30)}
  ds = kronjax.Dataset(data, labels)                          # gram "entities"
  idx = np.array([0, 4, 4, 29, 11])
  taken = ds.take(idx)
  built = kronjax.Dataset(data.subset(idx), {"y": y[idx], "w": labels["w"][idx]})
  assert taken.gram_mode == "entities" and taken.entity_grams is ds.entity_grams
  np.testing.assert_array_equal(taken.fingerprint, built.fingerprint)
  assert rel_err(taken.full_gram(), data.subset(idx).gram()) < 1e-12
  np.testing.assert_array_equal(taken.labels["w"], labels["w"][idx])


def test_training_on_take_equals_the_rebuilt_dataset_and_dense_sgd(x64):
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  idx = np.random.default_rng(3).integers(0, 40, 40)            # a bootstrap resample
  config = kronjax.Config(width=64, threshold=0.5)
  tx = optax.sgd(0.5, momentum=0.5)
  ref, dstate, _, built = run_pair(KEY, config, tx, data.subset(idx), y[idx], steps=20, batch=6)
  taken = ds.take(idx)
  state = _train(kronjax.init(KEY, config, taken, tx), taken, batches(40, 6, 20))
  assert rel_err(state.P, ref.P) < 1e-9 and rel_err(state.A, ref.A) < 1e-9
  assert rel_err(kronjax.dense_params(state, taken)["W"], dstate.params["W"]) < 1e-9
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3
  kronjax.evaluate(state, built)                # same fingerprint: the rebuilt one is accepted


@pytest.mark.slow   # compiles the vmapped scan and the single step: ~15 s on 2 cores
def test_vmapped_bootstrap_equals_separate_runs(x64):
  data, y, held, y_held = _task(n_eval=8)
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held)
  rng = np.random.default_rng(5)
  resamples = [ds.take(rng.integers(0, 40, 40)) for _ in range(3)]
  stacked = kronjax.Dataset.stack(resamples)
  config, tx = kronjax.Config(width=32, threshold=0.5), optax.sgd(0.5)
  schedule = jnp.asarray(np.stack(batches(40, 5, 8)))

  def run(dataset):
    state = kronjax.init(KEY, config, dataset, tx)
    def body(state, bi):
      state, m = kronjax.train_step(state, dataset, bi)
      return state, m["status"]
    return jax.lax.scan(body, state, schedule)

  states, status = jax.jit(jax.vmap(run))(stacked)
  assert not np.any(status)
  metrics = jax.vmap(kronjax.evaluate)(states, stacked)
  for i, member in enumerate(resamples):
    alone = _train(kronjax.init(KEY, config, member, tx), member, list(np.asarray(schedule)))
    one = sweep.member(states, i)
    np.testing.assert_array_equal(one.fingerprint, member.fingerprint)
    assert rel_err(one.P, alone.P) < 1e-9 and rel_err(one.P_eval, alone.P_eval) < 1e-9
    assert rel_err(one.A, alone.A) < 1e-9
    assert abs(float(metrics["eval_loss"][i]) - float(kronjax.evaluate(alone, member)["eval_loss"])) < 1e-9
  kronjax.verify(sweep.member(states, 1), resamples[1])


def test_take_refuses_bad_indices():
  ds = kronjax.Dataset(*_task())
  with pytest.raises(ValueError, match=r"indices must hold indices in \[0, 40\)"):
    ds.take(np.array([0, 40]))
  with pytest.raises(TypeError, match="indices must be an integer array"):
    ds.take(np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="indices must be 1-D"):
    ds.take(np.zeros((2, 2), int))
  with pytest.raises(TypeError, match="keep_eval must be a bool"):
    ds.take(np.arange(3), keep_eval=1)


def test_stack_refuses_datasets_that_differ():
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  with pytest.raises(TypeError, match="non-empty list of kronjax.Dataset"):
    kronjax.Dataset.stack([])
  with pytest.raises(ValueError, match=r"datasets\[1\].data has a leaf of shape \(5, 4\).*length"):
    kronjax.Dataset.stack([ds.take(np.arange(4)), ds.take(np.arange(5))])
  with pytest.raises(ValueError, match="differs from datasets\\[0\\] in structure"):
    kronjax.Dataset.stack([ds.take(np.arange(4)),
                           kronjax.Dataset(data, y, gram="factors").take(np.arange(4))])
  two = kronjax.Dataset.stack([ds.take(np.arange(4)), ds.take(np.arange(1, 5))])
  with pytest.raises(ValueError, match="already stacked"):
    kronjax.Dataset.stack([two, two])


def test_a_stacked_dataset_on_the_host_is_refused():
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  two = kronjax.Dataset.stack([ds.take(np.arange(40)), ds.take(np.arange(40)[::-1])])
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.1))
  for call in (lambda: kronjax.train_step(state, two, jnp.arange(4)),
               lambda: kronjax.evaluate(state, two)):
    with pytest.raises(ValueError, match=r"stacked dataset \(2 members.*jax.vmap"):
      call()


def test_a_dataset_rebuilt_leaf_by_leaf_is_refused_naming_take():
  data, y, held, y_held = _task(n_eval=10)
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held)
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.1))
  idx = jnp.arange(40)[::-1]
  mapped = jax.tree.map(lambda x: x[idx], ds)
  for call in (lambda: kronjax.train_step(state, mapped, jnp.arange(4)),
               lambda: kronjax.jit_train_step(state, mapped, jnp.arange(4)),
               lambda: kronjax.evaluate(state, mapped)):
    with pytest.raises(ValueError, match=r"rebuilt leaf by leaf.*rows but not its columns.*"
                                         r"dataset\.take\(idx\)"):
      call()


@pytest.mark.parametrize("gram", ["precomputed", "entities"])
def test_a_leaf_by_leaf_rebuild_that_kept_the_fingerprint_is_refused(gram):
  data, y, held, y_held = _task(n_eval=10)
  if gram == "entities":
    data = kronjax.KronData(data.factors, index=np.stack([np.arange(40)] * 2, axis=1))
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held, gram=gram)
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.1))
  idx = jnp.arange(40)[::-1]
  mapped = jax.tree.map(lambda x: x[idx] if x.ndim and x.shape[0] == 40 else x, ds)
  np.testing.assert_array_equal(mapped.fingerprint, ds.fingerprint)     # the old one, kept
  for call in (lambda: kronjax.evaluate(state, mapped),
               lambda: kronjax.jit_train_step(state, mapped, jnp.arange(4)),
               lambda: kronjax.predict(state, mapped, held)):
    with pytest.raises(ValueError, match=r"fingerprint is not that of its own points.*"
                                         r"rebuilt leaf by leaf.*dataset\.take\(idx\)"):
      call()
  kronjax.evaluate(state, ds)                               # the dataset itself passes


# ----------------------------------------------------------------------------- new points

def _digits_like(n, seed):
  """Pixel-like factors (integers 0..16): squared norms in the thousands."""
  rng = np.random.default_rng(seed)
  return kronjax.KronData((rng.integers(0, 17, (n, 8)).astype(float),
                           rng.integers(0, 17, (n, 8)).astype(float)))


def test_predict_and_a_saved_network_normalize_new_points_as_the_training_data(x64, tmp_path):
  raw = _digits_like(60, 0)
  y = np.random.default_rng(1).integers(0, 3, 40)
  with warnings.catch_warnings():
    warnings.simplefilter("error", kronjax.NormWarning)    # normalize=True: no warning
    ds = kronjax.Dataset(raw.subset(np.arange(40)), y, normalize=True)
  assert ds.normalized
  config = kronjax.Config(width=64, threshold=0.5, loss="softmax", num_classes=3)
  state = _train(kronjax.init(KEY, config, ds, optax.sgd(2.0)), ds, batches(40, 8, 10))
  new = raw.subset(np.arange(40, 60))                      # raw points, never normalized
  W = kronjax.dense_params(state, ds)
  expected = dense.forward(W["W"], W["a"], state.b, new.normalize().materialize()) + W["bias"][None, :]
  got = kronjax.predict(state, ds, new)
  assert rel_err(got, expected) < 1e-9
  unprepared = network_lib.outputs(config.resolve(), state.a, state.b, state.bias,
                                   kronjax.network.from_state(state, ds).projections(new))
  assert float(jnp.max(jnp.abs(unprepared - expected))) > 10.0   # raw points are far off
  # The training points given raw read the maintained projections.
  assert rel_err(kronjax.predict(state, ds, raw.subset(np.arange(40))),
                 network_lib.outputs(config.resolve(), state.a, state.b, state.bias, state.P)) < 1e-12
  net = kronjax.network.from_state(state, ds)
  H = net.hidden(new)                                       # (20, m), from normalized points
  assert H.shape == (20, 64) and rel_err(H, jax.nn.relu(net.projections(new.normalize()) - state.b).T) < 1e-12
  assert rel_err(H @ state.a / 8.0 + state.bias[None, :], expected) < 1e-9
  path = kronjax.network.save(tmp_path / "net.npz", state, ds)
  net = kronjax.network.load(path)
  assert net.normalize
  np.testing.assert_array_equal(net.predict(new), kronjax.predict(state, ds, new))
  assert rel_err(jax.jit(lambda n, x: n.predict(x))(net, new), expected) < 1e-9


def test_indexed_points_are_normalized_per_entity(x64):
  data, y = _indexed()
  scaled = kronjax.KronData(tuple(8.0 * t for t in data.factors), index=data.index)
  ds = kronjax.Dataset(scaled, y, normalize=True)
  state = _train(kronjax.init(KEY, kronjax.Config(width=32), ds, optax.sgd(0.5)), ds,
                 batches(30, 5, 5))
  new = kronjax.KronData(tuple(3.0 * t for t in data.factors), index=data.index[:7])
  expected = kronjax.network.from_state(state, ds).projections(new.normalize())
  got_out = kronjax.predict(state, ds, new)
  assert rel_err(got_out, network_lib.outputs(state.config, state.a, state.b, state.bias,
                                              expected)) < 1e-9


def test_raw_points_of_an_unnormalized_dataset_warn(tmp_path):
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.1))
  big = kronjax.KronData(tuple(10.0 * f for f in data.factors[:1]) + data.factors[1:])
  with pytest.warns(kronjax.NormWarning, match=r"data is not unit-norm.*normalize"):
    kronjax.predict(state, ds, big)
  net = kronjax.network.from_state(state, ds)
  assert not net.normalize
  with pytest.warns(kronjax.NormWarning):
    net.predict(big)
  with warnings.catch_warnings():
    warnings.simplefilter("error", kronjax.NormWarning)
    kronjax.predict(state, ds, data)                       # unit-norm points: no warning


def test_a_v2_network_file_without_the_normalize_field_loads(tmp_path):
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.1))
  path = kronjax.network.save(tmp_path / "net.npz", state, ds)
  with np.load(path) as npz:
    arrays = dict(npz)
  manifest = json.loads(bytes(arrays["__manifest__"]).decode())
  del manifest["normalize"]
  arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  old = tmp_path / "old.npz"
  old.write_bytes(buf.getvalue())
  net = kronjax.network.load(old)
  assert not net.normalize
  np.testing.assert_array_equal(net.predict(data), kronjax.network.load(path).predict(data))


def test_jit_predict_on_points_of_the_training_shape(x64):
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  state = _train(kronjax.init(KEY, kronjax.Config(width=32), ds, optax.sgd(0.5)), ds,
                 batches(40, 5, 5))
  other = _task(n=80)[0].subset(np.arange(40, 80))
  for points in (data, other):
    assert rel_err(jax.jit(kronjax.predict)(state, ds, points),
                   kronjax.predict(state, ds, points)) < 1e-9


# ----------------------------------------------------------------------------- sweep states

def _sweep_state():
  data, y, held, y_held = _task(n_eval=10)
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held)
  config = kronjax.Config(width=16, threshold=0.5)
  states = [kronjax.init(jax.random.PRNGKey(i), config, ds, optax.sgd(0.5)) for i in range(2)]
  return sweep.stack(states), ds


def test_evaluate_and_predict_refuse_a_sweep_state():
  stacked, ds = _sweep_state()
  for call in (lambda: kronjax.evaluate(stacked, ds),
               lambda: kronjax.predict(stacked, ds, ds.eval_data),
               lambda: kronjax.dense_params(stacked, ds)):
    with pytest.raises(TypeError, match=r"this is a sweep state: use kronjax.sweep.member\(state, "
                                        r"i\) or jax.vmap"):
      call()


def test_evaluate_and_predict_map_over_a_sweep_state():
  stacked, ds = _sweep_state()
  metrics = jax.vmap(kronjax.evaluate, in_axes=(0, None))(stacked, ds)
  out = jax.vmap(kronjax.predict, in_axes=(0, None, None))(stacked, ds, ds.eval_data)
  for i in range(2):
    one = sweep.member(stacked, i)
    assert abs(float(metrics["eval_loss"][i]) - float(kronjax.evaluate(one, ds)["eval_loss"])) < 1e-6
    np.testing.assert_allclose(out[i], kronjax.predict(one, ds, ds.eval_data), rtol=1e-6)


# ----------------------------------------------------------------------------- half precision

@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16])
def test_half_precision_factors_are_stored_and_computed_in_float32(half):
  data, y = _task()
  low = tuple(f.astype(half) for f in data.factors)
  kd = kronjax.KronData(low)
  assert kd.dtype == jnp.float32
  exact = kronjax.KronData(tuple(np.asarray(f, np.float32) for f in low))
  np.testing.assert_array_equal(kd.gram(), exact.gram())
  ds = kronjax.Dataset(kd, y)
  assert ds.gram.dtype == jnp.float32 and ds.labels.dtype == jnp.float32
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.5))
  state, m = kronjax.train_step(state, ds, jnp.arange(4))
  assert state.P.dtype == jnp.float32 and int(m["status"]) == 0


def test_half_precision_nan_is_refused():
  bad = np.ones((3, 4), np.float32)
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"factors\[0\] contains 1 non-finite"):
    kronjax.KronData((jnp.asarray(bad, jnp.bfloat16),))


# ----------------------------------------------------------------------------- pickle and flax

def test_pickle_is_refused_naming_checkpoint_save_and_copies_work():
  ds = kronjax.Dataset(*_task())
  state = kronjax.init(KEY, kronjax.Config(width=16), ds, optax.sgd(0.5, momentum=0.9))
  with pytest.raises(TypeError, match=r"cannot be pickled.*closures.*kronjax.checkpoint.save"):
    pickle.dumps(state)
  for other in (copy.copy(state), copy.deepcopy(state)):
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(state)))
    assert other.tx is state.tx


@pytest.mark.parametrize("typed_key", [False, True])
def test_flax_serialization_round_trip(typed_key):
  serialization = pytest.importorskip("flax.serialization")
  data, y, held, y_held = _task(n_eval=10)
  ds = kronjax.Dataset(data, y, eval_data=held, eval_labels=y_held)
  key = jax.random.key(0) if typed_key else KEY
  config, tx = kronjax.Config(width=16, threshold=0.5), optax.sgd(0.5, momentum=0.9)
  state = _train(kronjax.init(key, config, ds, tx), ds, batches(40, 5, 3))
  blob = serialization.to_bytes(state)
  template = kronjax.init(jax.random.key(7) if typed_key else jax.random.PRNGKey(7), config, ds, tx)
  back = serialization.from_bytes(template, blob)
  assert isinstance(back, kronjax.TrainState) and back.config == state.config
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)
  step = jax.jit(kronjax.train_step)
  np.testing.assert_array_equal(step(back, ds, jnp.arange(4))[0].P, step(state, ds, jnp.arange(4))[0].P)
  with pytest.raises(ValueError, match="not written from a TrainState"):
    serialization.from_state_dict(template, {"A_T": 0})


# ----------------------------------------------------------------------------- memory check

def test_a_width_needing_terabytes_is_refused_before_allocating():
  ds = kronjax.Dataset(*_task())
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"would allocate about [\d.e+]+ GiB \(projections .*"
                                       r"only .* free.*smaller width \(m=17179869184.*"
                                       r"check_memory=False"):
    kronjax.init(KEY, kronjax.Config(width=2**34), ds, optax.sgd(0.5, momentum=0.9))
  assert time.perf_counter() - start < 5.0


def test_memory_check_counts_the_optimizer_traces_and_can_be_skipped(monkeypatch):
  data, y = _task()
  ds = kronjax.Dataset(data, y)
  config = kronjax.Config(width=64)
  plain = state_lib.memory_estimate(config, ds, optax.sgd(0.5))
  momentum = state_lib.memory_estimate(config, ds, optax.sgd(0.5, momentum=0.9))
  assert plain["optimizer"] == 0 and plain["projections"] == 64 * 40 * 4
  assert momentum["optimizer"] == plain["projections"] + plain["coefficients"]
  assert plain["gram"] == 40 * 40 * 4
  monkeypatch.setattr(state_lib, "available_memory", lambda: (1000, "a test device"))
  with pytest.raises(ValueError, match=r"free on a test device.*Dataset\(gram='factors'\)"):
    kronjax.init(KEY, config, ds, optax.sgd(0.5, momentum=0.9))
  state = kronjax.init(KEY, config, ds, optax.sgd(0.5), check_memory=False)
  assert state.P.shape == (64, 40)
  with pytest.raises(TypeError, match="check_memory must be a bool"):
    kronjax.init(KEY, config, ds, optax.sgd(0.5), check_memory="no")


# ----------------------------------------------------------------------------- networks

def weighted_mse(outputs, labels):
  return 0.5 * jnp.mean(labels["w"] * (outputs[:, 0] - labels["y"]) ** 2)


def other_loss(outputs, labels):
  return jnp.mean(outputs)


def test_a_network_trained_with_a_loss_of_ones_own_saves_and_loads(tmp_path):
  data, y = _task()
  ds = kronjax.Dataset(data, {"y": jnp.ravel(y), "w": jnp.ones(40)})
  config = kronjax.Config(width=16, loss=weighted_mse)
  state = _train(kronjax.init(KEY, config, ds, optax.sgd(0.5)), ds, batches(40, 5, 3))
  path = kronjax.network.save(tmp_path / "net.npz", state, ds)
  net = kronjax.network.load(path)                          # predicts without the loss
  np.testing.assert_array_equal(net.predict(data), kronjax.network.from_state(state, ds).predict(data))
  with pytest.raises(ValueError, match=r"test_compose.weighted_mse.*loss=<that function>"):
    net.config.loss(jnp.zeros((2, 1)), None)
  assert kronjax.network.load(path, loss=weighted_mse).config.loss is weighted_mse
  with pytest.raises(ValueError, match="other_loss.*trained with .*weighted_mse"):
    kronjax.network.load(path, loss=other_loss)
  with pytest.raises(TypeError, match="loss must be the function"):
    kronjax.network.load(path, loss="mse")
  again = kronjax.network.save(tmp_path / "again.npz", state, ds)
  np.testing.assert_array_equal(kronjax.network.load(again).predict(data), net.predict(data))
  mse = kronjax.network.save(tmp_path / "mse.npz",
                             kronjax.init(KEY, kronjax.Config(width=16), kronjax.Dataset(data, y),
                                          optax.sgd(0.5)), kronjax.Dataset(data, y))
  with pytest.raises(ValueError, match="loss= is only for a network trained with a loss of one"):
    kronjax.network.load(mse, loss=weighted_mse)


# ----------------------------------------------------------------------------- zero rows

@pytest.mark.parametrize("kind", ["rank1", "rankR", "indexed"])
def test_an_all_zero_row_under_normalize_says_zero_row(kind):
  rng = np.random.default_rng(0)
  if kind == "rank1":
    u = rng.normal(size=(6, 3))
    u[2] = 0
    data, where = kronjax.KronData((u, rng.normal(size=(6, 4)))), r"factors\[0\] row 2"
  elif kind == "rankR":
    u = rng.normal(size=(6, 2, 3))
    u[4] = 0
    data, where = kronjax.KronData((u, rng.normal(size=(6, 2, 4)))), r"data row 4"
  else:
    t = rng.normal(size=(5, 4))
    t[1] = 0
    data = kronjax.KronData((rng.normal(size=(3, 3)), t), index=np.array([[0, 1], [2, 3]] * 3))
    where = r"factors\[1\] row 1"
  with pytest.raises(ValueError, match=where + r" is all zero \(a zero row"):
    kronjax.Dataset(data, np.zeros(6), normalize=True)
