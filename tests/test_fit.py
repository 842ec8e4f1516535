"""kronjax.fit: learning, overflow replay, errors, resumable batch order."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.train.loop import batch_schedule


@pytest.fixture(scope="module")
def task():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 360, (16, 16), task="regression")
  return data, labels


def _init(key, config, data, labels, tx, plan=None):
  dataset = kronjax.Dataset(data, labels)
  return kronjax.init(key, config, dataset, tx, plan=plan), dataset


@pytest.mark.slow
def test_planted_task_is_learned(task):
  data, labels = task
  train, held = data.subset(np.arange(300)), data.subset(np.arange(300, 360))
  config = kronjax.Config(width=1024, init="implicit")
  dataset = kronjax.Dataset(train, labels[:300], eval_data=held, eval_labels=labels[300:])
  state = kronjax.init(jax.random.PRNGKey(1), config, dataset, optax.sgd(8.0))
  before = kronjax.evaluate(state, dataset)
  state, hist = kronjax.fit(state, dataset, jax.random.PRNGKey(2), batch_size=10, epochs=40,
                            progress=False, eval_every=600)
  after = kronjax.evaluate(state, dataset)
  assert float(after["train_loss"]) < 0.1 * float(before["train_loss"])
  assert float(after["eval_loss"]) < 0.7 * float(before["eval_loss"])
  assert hist["loss"].shape == (1200,) and hist["eval_loss"].shape == (2,)
  assert np.all(hist["active"] > 0) and np.all(hist["active"] < 0.2 * config.width)


def test_overflow_replay_equals_run_with_large_capacity(x64):
  # float64: a different capacity pads the reductions over active neurons
  # differently, so float32 runs agree only to rounding; the active sets and the
  # trajectory are the same.
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 200, (16, 16), task="regression")
  config = kronjax.Config(width=256, threshold=0.3)
  small = kronjax.Plan(active_capacity=8)
  large = small.replace(active_capacity=256)
  tx = optax.sgd(0.5)
  s_small, dataset = _init(jax.random.PRNGKey(0), config, data, labels, tx, small)
  s_large, _ = _init(jax.random.PRNGKey(0), config, data, labels, tx, large)
  key = jax.random.PRNGKey(5)
  out_small, h_small = kronjax.fit(s_small, dataset, key, batch_size=8, steps=40, progress=False)
  out_large, h_large = kronjax.fit(s_large, dataset, key, batch_size=8, steps=40, progress=False)
  assert h_small["replays"], "the tiny capacity should have overflowed"
  assert h_small["replays"][0][0] == 0  # global step of the first overflow
  assert out_small.resolved_plan.active_capacity > small.active_capacity
  assert out_small.config == s_small.config  # the replay grew the plan, not the network
  assert not h_large["replays"]
  chex.assert_trees_all_close(out_small.P, out_large.P, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(out_small.A, out_large.A, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(h_small["loss"], h_large["loss"], rtol=1e-12)
  np.testing.assert_array_equal(h_small["active"], h_large["active"])
  # The caller's state is untouched (fit trains a copy; the step donates).
  assert int(s_small.step) == 0 and float(jnp.max(jnp.abs(s_small.A))) == 0.0


def test_overflow_raise_names_count_and_capacity(task):
  data, labels = task
  config = kronjax.Config(width=256, threshold=0.3)
  state, dataset = _init(jax.random.PRNGKey(0), config, data, labels, optax.sgd(0.5),
                         kronjax.Plan(active_capacity=8))
  with pytest.raises(kronjax.CapacityError, match=r"active_capacity=8.*active_capacity>=\d+"):
    kronjax.fit(state, dataset, jax.random.PRNGKey(0), batch_size=8, steps=3, progress=False,
                on_overflow="raise")


def test_non_finite_loss_names_step_and_learning_rate(task):
  data, labels = task
  config = kronjax.Config(width=128, threshold=0.0, train_output=True)
  state, dataset = _init(jax.random.PRNGKey(0), config, data, labels * 1e6, optax.sgd(1e8))
  with pytest.raises(FloatingPointError, match=r"step \d+.*learning rate"):
    kronjax.fit(state, dataset, jax.random.PRNGKey(0), batch_size=16, steps=200, progress=False)


def test_non_finite_stop_policy_keeps_the_last_finite_state(task):
  data, labels = task
  config = kronjax.Config(width=128, threshold=0.0, train_output=True)
  state, dataset = _init(jax.random.PRNGKey(0), config, data, labels * 1e6, optax.sgd(1e8))
  out, hist = kronjax.fit(state, dataset, jax.random.PRNGKey(0), batch_size=16, steps=200,
                          progress=False, on_nonfinite="stop")
  assert hist["stopped"].startswith("non-finite loss at step")
  stop = int(hist["stopped"].rsplit(" ", 1)[1])
  assert int(out.step) == stop  # the step whose loss was non-finite was not taken
  assert len(hist["loss"]) == stop + 1 and not np.isfinite(hist["loss"][-1])


def test_fit_twice_equals_fit_once(task):
  data, labels = task
  config = kronjax.Config(width=128)
  state, dataset = _init(jax.random.PRNGKey(0), config, data, labels, optax.sgd(1.0, momentum=0.5))
  key = jax.random.PRNGKey(3)
  once, _ = kronjax.fit(state, dataset, key, batch_size=32, steps=30, progress=False)
  half, _ = kronjax.fit(state, dataset, key, batch_size=32, steps=17, progress=False)
  twice, hist = kronjax.fit(half, dataset, key, batch_size=32, steps=13, progress=False)
  chex.assert_trees_all_equal(once.P, twice.P)
  assert hist["step"][0] == 18 and hist["step"][-1] == 30


def test_batch_schedule_is_a_pure_function_of_key_and_step():
  key = jax.random.PRNGKey(0)
  full = batch_schedule(key, 50, 8, 20)
  assert full.shape == (20, 8) and full.dtype == np.int32
  np.testing.assert_array_equal(full[7:], batch_schedule(key, 50, 8, 13, start=7))
  epoch = full[:6].ravel()
  assert len(set(epoch.tolist())) == 48  # each epoch is a permutation (remainder dropped)


@pytest.mark.parametrize("key", [jax.random.PRNGKey(3), jax.random.key(3)])
@pytest.mark.parametrize("n,batch,epochs", [(50, 8, 70), (1700, 400, 3)])
def test_batch_schedule_is_each_epochs_permutation_of_fold_in(key, n, batch, epochs):
  """The definition, one epoch at a time: checkpoints written by any version resume on the
  same batches (the schedule draws the sort keys of up to 64 epochs per dispatch, padded,
  vmapped, and sorts on the host). 70 epochs: two dispatches, one padded; n = 1700: two
  sort rounds (more than 2**(32/3) items)."""
  per_epoch = n // batch
  start, steps = 13, per_epoch * epochs
  got = batch_schedule(key, n, batch, steps, start=start)
  epochs = range(start // per_epoch, (start + steps) // per_epoch + 1)
  orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n)) for e in epochs]
  rows = np.concatenate([o[:per_epoch * batch].reshape(per_epoch, batch) for o in orders])
  offset = start % per_epoch
  np.testing.assert_array_equal(got, rows[offset:offset + steps])


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0, "steps": 1}, "batch_size"),
    ({"batch_size": 10**6, "steps": 1}, "batch_size"),
    ({"batch_size": 4}, "steps"),
    ({"batch_size": 4, "steps": 2, "epochs": 1}, "steps"),
    ({"batch_size": 4, "steps": 2, "on_overflow": "ignore"}, "on_overflow"),
    ({"batch_size": 4, "steps": 2, "checkpoint_every": 1}, "checkpoint_dir"),
    ({"batch_size": 4, "steps": 2, "resume": True}, "checkpoint_dir"),
    ({"batch_size": 4, "steps": 2, "on_nonfinite": "ignore"}, "on_nonfinite"),
])
def test_fit_rejects_bad_arguments(task, kwargs, match):
  data, labels = task
  state, dataset = _init(jax.random.PRNGKey(0), kronjax.Config(width=32), data, labels,
                         optax.sgd(0.1))
  with pytest.raises((ValueError, TypeError), match=match):
    kronjax.fit(state, dataset, jax.random.PRNGKey(0), progress=False, **kwargs)


def test_fit_rejects_an_integer_key(task):
  data, labels = task
  state, dataset = _init(jax.random.PRNGKey(0), kronjax.Config(width=32), data, labels,
                         optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"key must be a JAX PRNG key.*jax.random.key\(seed\)"):
    kronjax.fit(state, dataset, 0, batch_size=4, steps=1, progress=False)
  with pytest.raises(TypeError, match=r"key must be a JAX PRNG key"):
    kronjax.init(0, kronjax.Config(width=32), dataset, optax.sgd(0.1))


@pytest.mark.slow
def test_candidate_overflow_grows_only_the_candidate_capacity(x64):
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 120, (8, 8), task="regression")
  config = kronjax.Config(width=128, threshold=0.8)
  small = kronjax.Plan(index="bucketed", candidate_capacity=8, active_capacity=128,
                       update="sparse")  # the full path never queries
  large = small.replace(candidate_capacity=128)
  tx = optax.sgd(0.5)
  key = jax.random.PRNGKey(1)
  with pytest.raises(kronjax.CapacityError, match=r"candidate list.*candidate_capacity>=\d+"):
    kronjax.fit(*_init(key, config, data, labels, tx, small), key, batch_size=8, steps=2,
                progress=False, on_overflow="raise")
  out_small, h_small = kronjax.fit(*_init(key, config, data, labels, tx, small), key,
                                   batch_size=8, steps=20, progress=False)
  out_large, _ = kronjax.fit(*_init(key, config, data, labels, tx, large), key, batch_size=8,
                             steps=20, progress=False)
  assert h_small["replays"] and all(set(c) == {"candidate_capacity"} for _, c in h_small["replays"])
  assert out_small.resolved_plan.active_capacity == 128
  chex.assert_trees_all_close(out_small.P, out_large.P, rtol=1e-12, atol=1e-12)
