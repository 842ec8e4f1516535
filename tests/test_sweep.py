"""kronjax.sweep: one vmapped sweep equals the separate runs (float64), overflow, bad input."""

import contextlib
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import sweep as sw
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import products
from kronjax._src.step import index as index_lib
from kronjax._src.train import runners
from reference import rel_err, assert_same_tree

N, BATCH, STEPS = 32, 8, 8
INDEX_KINDS = [k for k in ("scan", "bucketed") if k in index_lib.KINDS]
DOCS = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# One transformation object per optimizer, shared by the sweeps and the reference runs (tx is
# static metadata of the state, compared by structure: equal ones share a compiled step).
TX = {"sgd": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      "momentum": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)}
PLAIN_TX = optax.sgd(1.0)   # no injected hyperparameters
_step = jax.jit(kronjax.train_step)


def _task(n=N, task="regression"):
  return _cached_task(n, task, bool(jax.config.jax_enable_x64))


@functools.cache
def _cached_task(n, task, x64):
  del x64  # part of the cache key: float64 and float32 data differ
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), n, (4, 6), task=task, num_classes=3)
  return kronjax.Dataset(data, labels)


def _separate(start, dataset, member, key, steps=STEPS):
  """One member trained alone, from its initial state, with the plain jitted train_step."""
  state = jax.tree.map(lambda x: x, start)
  losses = []
  for bi in kronjax.batch_schedule(key, dataset.n, BATCH, steps):
    state, m = _step(state, dataset, jnp.asarray(bi))
    assert not bool(m["overflow"]), f"reference run of {member} overflowed"
    losses.append(float(m["loss"]))
  return state, np.asarray(losses)


def _assert_initial_state_is_init(states, dataset, i, member):
  """Member i of a fresh sweep is ``kronjax.init`` with its key, threshold and hyperparameters."""
  alone = kronjax.init(jax.random.PRNGKey(member.get("seed", 0)), states.config, dataset,
                       states.tx.tx, threshold=member.get("threshold"), plan=states.plan)
  hp = {k: v for k, v in member.items() if k in ("learning_rate", "momentum")}
  if hp:
    alone = alone.replace(opt_state=sw.set_hyperparams(alone.opt_state, **hp))
  assert_same_tree(sw.member(states, i), alone)


def _assert_member_equals(states, i, ref, tol=1e-10):
  member = sw.member(states, i)
  for f in ("P", "A", "a"):
    assert rel_err(getattr(member, f), getattr(ref, f)) < tol, (i, f)
  assert int(member.step) == int(ref.step)


def _assert_equals_separate_runs(states, trained, history, dataset, members, key):
  for i, member in enumerate(members):
    ref, losses = _separate(sw.member(states, i), dataset, member, key)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10
  # The members really differ (a sweep that ignored its hyperparameters would match trivially).
  assert np.ptp(history["loss"][:, -1]) > 1e-3


def _eight_members(optimizer):
  """Two learning rates (and momenta), two thresholds, two seeds."""
  if optimizer == "momentum":
    return sw.grid(learning_rate=[0.1, 0.4], momentum=[0.5, 0.9], threshold=[0.5, 0.8], seed=[0, 1])
  return sw.grid(learning_rate=[0.5, 2.0], threshold=[0.5, 0.8], seed=[0, 1])


def _equivalence_config(**changes):
  return kronjax.Config(width=64, threshold=0.6, **changes)


def _equivalence_plan(optimizer, kind):
  return kronjax.Plan(active_capacity=48, candidate_capacity=56, index=kind,
                      update="sparse" if optimizer == "sgd" else "full")


@pytest.mark.parametrize("kind", [k if k == "scan" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in INDEX_KINDS])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_sweep_equals_separate_runs(x64, optimizer, kind):
  dataset = _task()
  config, plan = _equivalence_config(), _equivalence_plan(optimizer, kind)
  axes = dict(learning_rate=[0.2, 0.5, 1.0, 2.0], threshold=[0.5, 0.8], seed=[0, 1])
  if optimizer == "momentum":
    axes["momentum"] = [0.9]
  members = sw.grid(**axes)
  assert len(members) == 16
  key = jax.random.PRNGKey(7)
  states = sw.init(config, dataset, members, tx=TX[optimizer], plan=plan)
  assert sw.size(states) == 16 and states.P.shape == (16, 64, N)
  # Every leaf is stacked; the dataset (and its (n, n) Gram) is shared, never copied per member.
  assert all(x.shape[0] == 16 for x in jax.tree.leaves(states))
  assert not hasattr(states, "gram") and dataset.gram.shape == (N, N)
  for i in (0, 13):                                # b = 0.5 / 0.8, seeds 0 / 1, two learning rates
    _assert_initial_state_is_init(states, dataset, i, members[i])
  before = runners.sweep_step._cache_size(), runners._sweep_chunk._cache_size()
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False)
  assert runners.sweep_step._cache_size() - before[0] <= 1   # one compilation for all members
  assert runners._sweep_chunk._cache_size() - before[1] <= 1
  assert history["loss"].shape == (16, STEPS) and not history["replays"]
  assert history["stopped"] == [None] * 16
  _assert_equals_separate_runs(states, trained, history, dataset, members, key)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_sweep_with_softmax_and_trained_output_equals_separate_runs(x64, optimizer):
  """Issue 17: the softmax loss (3 classes) with a trained output layer, on the sparse path
  (sgd) and the full path (momentum)."""
  dataset = _task(task="classification")
  config = _equivalence_config(loss="softmax", num_classes=3, train_output=True)
  members = _eight_members(optimizer)
  key = jax.random.PRNGKey(4)
  states = sw.init(config, dataset, members, tx=TX[optimizer],
                   plan=_equivalence_plan(optimizer, "auto"))
  assert states.a.shape == (len(members), 64, 3)
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False)
  assert not history["replays"]
  assert rel_err(trained.a, states.a) > 1e-6   # the output layer trained: comparing it means something
  _assert_equals_separate_runs(states, trained, history, dataset, members, key)


@pytest.mark.parametrize("hyper", [{"learning_rate": 0.7}, {"learning_rate": 0.7, "momentum": 0.5}])
def test_set_hyperparams_equals_own_transformation(x64, hyper):
  """The shared tx with a member's injected values updates exactly as a tx built with them."""
  shared = TX["momentum" if "momentum" in hyper else "sgd"]
  own = optax.inject_hyperparams(optax.sgd)(**hyper)
  params = {"A": jnp.zeros((5, 3)), "P": jnp.zeros((5, 3))}
  s_shared = sw.set_hyperparams(shared.init(params), **hyper)
  s_own = own.init(params)
  for t in range(3):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(t), x.shape), params)
    u_shared, s_shared = shared.update(g, s_shared)
    u_own, s_own = own.update(g, s_own)
    for x, y in zip(jax.tree.leaves(u_shared), jax.tree.leaves(u_own)):
      np.testing.assert_array_equal(x, y)


_vmapped_step = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, None, None)))


def test_init_vmaps_over_key_and_train_step_over_stacked_state(x64):
  """The literal API: vmap(init) over keys, vmap(train_step, in_axes=(0, None, None)) on the result."""
  dataset = _task()
  config, plan, tx = _equivalence_config(), _equivalence_plan("sgd", "scan"), TX["sgd"]
  keys = jax.random.split(jax.random.PRNGKey(2), 8)   # 8: the shapes of the test below
  stacked = jax.vmap(lambda k: kronjax.init(k, config, dataset, tx, plan=plan))(keys)
  assert stacked.P.shape == (8, 64, N) and sw.size(stacked) == 8
  assert all(x.shape[0] == 8 for x in jax.tree.leaves(stacked))   # everything stacked
  starts = [kronjax.init(k, config, dataset, tx, plan=plan) for k in keys]
  for i, start in enumerate(starts):
    assert_same_tree(sw.member(stacked, i), start)
  assert_same_tree(sw.stack(starts), stacked)
  key = jax.random.PRNGKey(0)
  for bi in kronjax.batch_schedule(key, N, BATCH, 3):
    stacked, m = _vmapped_step(stacked, dataset, jnp.asarray(bi))
    assert m["loss"].shape == (8,)
  for i in (0, 5):
    ref, _ = _separate(starts[i], dataset, {"key": i}, key, steps=3)
    assert rel_err(stacked.P[i], ref.P) < 1e-12 and rel_err(stacked.A[i], ref.A) < 1e-12


def test_vmapped_train_step_over_a_sweep_state_equals_separate_runs(x64):
  """``jax.vmap(kronjax.train_step, in_axes=(0, None, None))`` over ``sweep.init``'s state
  (members differing in learning rate, threshold and seed) is ``sweep.train_step``, bit for
  bit, and equals the separate runs."""
  dataset = _task()
  members = _eight_members("sgd")
  key = jax.random.PRNGKey(9)
  start = sw.init(_equivalence_config(), dataset, members, tx=TX["sgd"],
                  plan=_equivalence_plan("sgd", "scan"))
  vmapped, stepped = start, sw.stack([sw.member(start, i) for i in range(len(members))])
  losses = []
  for bi in kronjax.batch_schedule(key, N, BATCH, STEPS):
    vmapped, m = _vmapped_step(vmapped, dataset, jnp.asarray(bi))
    stepped, m_sweep = sw.train_step(stepped, dataset, jnp.asarray(bi))   # donates its input
    assert m["loss"].shape == (len(members),)
    np.testing.assert_array_equal(m["loss"], m_sweep["loss"])
    losses.append(np.asarray(m["loss"]))
  assert_same_tree(vmapped, stepped)
  losses = np.stack(losses, axis=1)
  for i, member in enumerate(members):
    ref, ref_losses = _separate(sw.member(start, i), dataset, member, key)
    _assert_member_equals(vmapped, i, ref)
    assert rel_err(losses[i], ref_losses) < 1e-10
  assert np.ptp(losses[:, -1]) > 1e-3


@pytest.mark.slow
def test_masked_members_keep_their_state_bit_for_bit(x64):
  dataset = _task()
  start = _overflow_sweep(True)   # the steps fit compiles for it in the overflow tests
  mask = np.array([True, False, True, False])
  batch = jnp.arange(BATCH)
  out, metrics = sw.train_step(jax.tree.map(jnp.copy, start), dataset, batch, mask=mask)
  assert metrics["loss"].shape == (4,)
  np.testing.assert_array_equal(np.asarray(out.step), [1, 0, 0, 0])   # member 2 overflowed
  assert bool(metrics["overflow"][2]) and not bool(metrics["overflow"][0])
  everyone, _ = sw.train_step(jax.tree.map(jnp.copy, start), dataset, batch)
  for i in range(4):
    assert_same_tree(sw.member(out, i), sw.member(everyone if mask[i] else start, i))


@pytest.mark.parametrize("axis", ["seed", "threshold"])
def test_sweep_without_injected_hyperparameters(x64, axis):
  """Item 8: a plain ``optax.sgd`` tx sweeps seeds and thresholds (no hyperparameter state)."""
  dataset = _task()
  tx = PLAIN_TX
  config, plan = _equivalence_config(), _equivalence_plan("sgd", "scan")
  members = sw.grid(**{axis: [0, 1] if axis == "seed" else [0.5, 0.8]})
  states = sw.init(config, dataset, members, tx=tx, plan=plan)
  assert sw.size(states) == 2
  for i, member in enumerate(members):
    _assert_initial_state_is_init(states, dataset, i, member)
  key = jax.random.PRNGKey(1)
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=4, progress=False)
  for i, member in enumerate(members):
    ref, losses = _separate(sw.member(states, i), dataset, member, key, steps=4)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10


def _overflow_setup():
  dataset = _task()
  # Member 2's threshold b = 0 makes about half of the 64 neurons fire: it overflows capacity 24
  # at once, while the others (b = 1.5, ~4 active) fit. The reference runs use capacity 48.
  members = [{"learning_rate": 0.5, "threshold": 1.5, "seed": 0},
             {"learning_rate": 1.0, "threshold": 1.5, "seed": 1},
             {"learning_rate": 0.5, "threshold": 0.0, "seed": 2},
             {"learning_rate": 0.2, "threshold": 1.5, "seed": 3}]
  big = _equivalence_plan("sgd", "scan")
  return dataset, members, big.replace(active_capacity=24), big


@functools.cache
def _overflow_sweep(x64):
  del x64  # cache key
  dataset, members, small, _ = _overflow_setup()
  return sw.init(_equivalence_config(), dataset, members, tx=TX["sgd"], plan=small)


def _reference(states, dataset, i, big, members, key, steps=STEPS):
  start = kronjax.with_plan(sw.member(states, i), active_capacity=big.active_capacity)
  assert start.plan == big and start.config == _equivalence_config().resolve()
  return _separate(start, dataset, members[i], key, steps)


@pytest.mark.slow
def test_overflowing_member_is_replayed_without_corrupting_others(x64):
  dataset, members, _, big = _overflow_setup()
  key = jax.random.PRNGKey(5)
  states = _overflow_sweep(True)   # fit does not modify it
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False)
  assert history["replays"] and history["replays"][0][0] == 0 and history["replays"][0][2] == [2]
  assert trained.resolved_plan.active_capacity > 24
  assert np.all(np.asarray(trained.step) == STEPS)
  for i in range(len(members)):   # every member took every batch exactly once
    ref, losses = _reference(states, dataset, i, big, members, key)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10


def test_overflowing_member_stopped_or_raised(x64):
  dataset, members, _, big = _overflow_setup()
  key = jax.random.PRNGKey(5)
  states = _overflow_sweep(True)   # fit does not modify it
  with pytest.raises(kronjax.CapacityError, match=r"step 0 \(sweep member\(s\) \[2\]\)"):
    sw.fit(states, dataset, key, batch_size=BATCH, steps=2, progress=False, on_overflow="raise")
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False,
                            on_overflow="stop")
  assert history["stopped"] == [None, None, "overflow at step 0", None]
  assert np.all(np.isnan(history["loss"][2])) and not np.isnan(history["loss"][[0, 1, 3]]).any()
  assert_same_tree(sw.member(trained, 2), sw.member(states, 2))   # frozen at its init
  for i in (0, 1, 3):
    ref, _ = _reference(states, dataset, i, big, members, key)
    _assert_member_equals(trained, i, ref)
  # A stopped member stays frozen when training continues.
  more, history = sw.fit(trained, dataset, key, batch_size=BATCH, steps=2, progress=False,
                         on_overflow="stop")
  assert int(sw.member(more, 2).step) == 0 and int(sw.member(more, 0).step) == STEPS + 2
  assert history["stopped"][2] == "stopped earlier, at step 0" and history["stopped"][0] is None
  assert_same_tree(sw.member(more, 2), sw.member(states, 2))


def _diverging_sweep():
  dataset, members, small, big = _overflow_setup()
  members = [dict(m) for m in members]
  members[1]["learning_rate"] = 1e200   # finite loss at step 0, inf at step 1
  return dataset, members, sw.init(_equivalence_config(), dataset, members, tx=TX["sgd"],
                                   plan=small), big


def test_diverging_member_raises_by_default(x64):
  dataset, _, states, _ = _diverging_sweep()
  before = jax.tree.map(jnp.copy, states)
  key = jax.random.PRNGKey(5)
  for options in ({}, {"on_overflow": "stop"}):   # member 2 replayed / stopped: 1 still raises
    with pytest.raises(FloatingPointError,
                       match=r"non-finite \(inf\) at step 1 for sweep member\(s\) \[1\]"):
      sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False, **options)
  assert_same_tree(states, before)   # the caller's state is untouched


def test_diverging_member_is_frozen_at_its_last_finite_state(x64):
  """on_nonfinite="stop": the step whose loss was non-finite is skipped, so the member keeps
  the state before it; the others train on as the separate runs do."""
  dataset, members, states, big = _diverging_sweep()
  key = jax.random.PRNGKey(5)
  trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False,
                            on_overflow="stop", on_nonfinite="stop")
  assert history["stopped"] == [None, "non-finite loss at step 1", "overflow at step 0", None]
  assert np.isfinite(history["loss"][1, 0]) and np.all(np.isnan(history["loss"][1, 1:]))
  for i in (0, 3):
    ref, _ = _reference(states, dataset, i, big, members, key)
    _assert_member_equals(trained, i, ref)
  # Bit for bit the sweep after its first step (the last one member 1 took).
  after_one, _ = sw.train_step(jax.tree.map(jnp.copy, states), dataset,
                               jnp.asarray(kronjax.batch_schedule(key, N, BATCH, 1)[0]))
  frozen = sw.member(trained, 1)
  assert int(frozen.step) == 1 and np.all(np.isfinite(np.asarray(frozen.P)))
  assert_same_tree(frozen, sw.member(after_one, 1))
  # Alone, the same member's second step is skipped as well: the same state.
  start = kronjax.with_plan(sw.member(states, 1), active_capacity=big.active_capacity)
  alone = start
  for t, bi in enumerate(kronjax.batch_schedule(key, N, BATCH, 2)):
    alone, m = _step(alone, dataset, jnp.asarray(bi))
    assert bool(m["skipped"]) == (t == 1) and np.isfinite(float(m["loss"])) == (t == 0)
  assert int(alone.step) == 1
  for f in ("P", "A", "a"):
    assert rel_err(getattr(frozen, f), getattr(alone, f)) < 1e-10


@pytest.mark.parametrize("name,value", [("width", 128), ("active_capacity", 32), ("loss", "softmax"),
                                        ("num_classes", 2), ("index", "bucketed"), ("update", "full")])
def test_static_settings_cannot_vary(name, value):
  dataset = _task()
  members = [{"learning_rate": 0.1}, {"learning_rate": 0.2, name: value}]
  with pytest.raises(ValueError, match=rf"'{name}'.*static.*Run separate sweeps"):
    sw.init(kronjax.Config(width=64), dataset, members)


def test_static_setting_error_comes_before_the_learning_rate_one():
  """Item 8: sweeping width with no learning rate (and no tx) names the static setting."""
  with pytest.raises(ValueError, match=r"'width', a static setting.*Run separate sweeps") as err:
    sw.init(kronjax.Config(width=64), _task(), sw.grid(width=[64, 128]))
  assert "learning_rate" not in str(err.value).split("Inside one sweep")[0]


def test_stack_accepts_equal_optimizers_built_separately():
  """Optimizers are compared by structure: two ``inject_hyperparams(optax.sgd)`` objects built
  alike stack (one compiled sweep step), while a different optimizer is still refused."""
  dataset = _task()
  config, plan = kronjax.Config(width=64), kronjax.Plan(active_capacity=24)
  tx_a = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx_b = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  assert tx_a is not tx_b
  a = kronjax.init(jax.random.PRNGKey(0), config, dataset, tx_a, plan=plan)
  b = kronjax.init(jax.random.PRNGKey(1), config, dataset, tx_b, plan=plan)
  assert a.tx == b.tx
  stacked = sw.stack([a, b])
  assert sw.size(stacked) == 2
  assert_same_tree(sw.member(stacked, 0), a)
  assert_same_tree(sw.member(stacked, 1), b)
  for other in (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
                optax.inject_hyperparams(optax.sgd)(learning_rate=0.2), optax.sgd(0.1)):
    c = kronjax.init(jax.random.PRNGKey(1), config, dataset, other, plan=plan)
    with pytest.raises(ValueError, match="different optax transformation"):
      sw.stack([a, c])


def test_stack_rejects_states_that_differ_statically():
  dataset = _task()
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  config = kronjax.Config(width=64)
  small, large = kronjax.Plan(active_capacity=24), kronjax.Plan(active_capacity=32)
  a = kronjax.init(jax.random.PRNGKey(0), config, dataset, tx, plan=small)
  b = kronjax.init(jax.random.PRNGKey(1), config, dataset, tx, plan=large)
  with pytest.raises(ValueError, match=r"'plan.active_capacity'.*24 vs 32.*Run separate sweeps"):
    sw.stack([a, b])
  c = kronjax.init(jax.random.PRNGKey(1), config, dataset,
                   optax.inject_hyperparams(optax.sgd)(learning_rate=0.2), plan=small)
  with pytest.raises(ValueError, match="different optax transformation"):
    sw.stack([a, c])
  other = kronjax.Dataset(dataset.data, dataset.labels + 1.0)
  d = kronjax.init(jax.random.PRNGKey(1), a.config, other, tx, plan=small)
  with pytest.raises(ValueError, match="another dataset"):
    sw.stack([a, d])
  with pytest.raises(TypeError, match="non-empty list of kronjax.TrainState"):
    sw.stack([])


@pytest.mark.parametrize("members,match", [
    ([{"learning_rate": 0.1, "learning_rte": 0.1}], "Did you mean 'learning_rate'"),
    ([{"learning_rate": 0.1, "momentum": 0.9}, {"learning_rate": 0.1, "momentum": None}], "momentum=None"),
    ([{"learning_rate": float("nan")}], "learning_rate must be a finite"),
    ([{"learning_rate": 0.1, "threshold": float("inf")}], "threshold must be a finite"),
    ([{"learning_rate": 0.1, "seed": 1, "key": jax.random.PRNGKey(0)}], "both seed and key"),
    ([{"learning_rate": 0.1, "seed": -1}], "seed must be a non-negative int"),
    ([{"threshold": 0.5}], "pass tx= or give the members a learning_rate"),
    ([], "non-empty list"),
])
def test_bad_members(members, match):
  with pytest.raises(ValueError, match=match):
    sw.init(kronjax.Config(width=64), _task(), members)


def test_bad_arguments(x64):
  dataset = _task()
  with pytest.raises(ValueError, match="no injected hyperparameters"):
    sw.init(kronjax.Config(width=64), dataset, [{"learning_rate": 0.1}], tx=optax.sgd(0.1))
  with pytest.raises(TypeError, match="dataset must be a kronjax.Dataset"):
    sw.init(kronjax.Config(width=64), dataset.data, [{"learning_rate": 0.1}])
  with pytest.raises(ValueError, match="grid axis 'seed'"):
    sw.grid(seed=[])
  assert sw.grid(a=[1, 2], b=[3]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  states = _overflow_sweep(True)
  with pytest.raises(IndexError, match=r"member index must be an int in \[0, 4\)"):
    sw.member(states, 4)
  single = sw.member(states, 0)
  with pytest.raises(ValueError, match="not a stacked sweep state"):
    sw.fit(single, dataset, jax.random.PRNGKey(0), batch_size=4, steps=1)
  with pytest.raises(ValueError, match="takes no mesh"):
    sw.fit(states, dataset, jax.random.PRNGKey(0), batch_size=4, steps=1, mesh=None)
  other = kronjax.Dataset(dataset.data, dataset.labels + 1.0)
  with pytest.raises(ValueError, match="not the dataset this state was built from"):
    sw.fit(states, other, jax.random.PRNGKey(0), batch_size=4, steps=1)
  # The jitted sweep step compares fingerprints inside the step (no host round trip): another
  # dataset of the same shapes is a flagged no-op (test_sweep_train_step_checks_the_dataset_...);
  # one of other shapes is refused on the host.
  smaller = kronjax.Dataset(dataset.data.subset(jnp.arange(dataset.n - 1)), dataset.labels[:-1])
  with pytest.raises(ValueError, match="the state was built for"):
    sw.train_step(states, smaller, jnp.arange(4))
  with pytest.raises(ValueError, match=r"on_nonfinite"):
    sw.fit(states, dataset, jax.random.PRNGKey(0), batch_size=4, steps=1, on_nonfinite="skip")


def test_fit_rejects_what_is_not_a_state():
  with pytest.raises(TypeError, match="state must be"):
    sw.fit(kronjax.Config(width=4), _task(), jax.random.PRNGKey(0), batch_size=4, steps=1)


def _docs_blocks():
  return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


@pytest.mark.slow
def test_docs_sweep_example_runs(capsys):
  blocks = [b for b in _docs_blocks() if "kronjax.sweep.init" in b]
  assert len(blocks) == 1, "README.md: one sweep example"
  namespace = {}
  exec(compile(blocks[0], str(DOCS), "exec"), namespace)
  assert "best member" in capsys.readouterr().out
  history = namespace["history"]
  assert history["loss"].shape == (8, 40)
  assert np.nanmean(history["loss"][:, -10:]) < np.nanmean(history["loss"][:, :5])


def _full_path_sweep(optimizer, layout):
  config = kronjax.Config(width=64, threshold=0.6)
  states = sw.init(config, _task(), _eight_members(optimizer), tx=TX[optimizer],
                   plan=kronjax.Plan(update="full", layout=layout))
  assert states.layout == layout
  return states


@pytest.fixture
def product_rule(monkeypatch):
  """Sets the sweep's P-update rule for the test: ``"native"`` (the native kernel, all members in
  one call), ``"loop"`` (XLA's rule, forced to loop over the members) or ``"batched"`` (XLA's
  rule, batched). ``LOOP_MIN_BYTES`` is read at trace time and is not part of the jit cache key
  (the native switch is): JAX's caches are cleared before and after, so no step is traced or
  compiled under another setting than the test's."""
  @contextlib.contextmanager
  def use(product):
    if product == "native" and not native.available():
      pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
    monkeypatch.setattr(products, "LOOP_MIN_BYTES", 0 if product == "loop" else 2**62)
    jax.clear_caches()
    try:
      with dispatch.using(product == "native"):
        yield
    finally:
      jax.clear_caches()
  return use


@pytest.mark.slow
# Last: the product rule clears JAX's caches, which would recompile the steps of the tests above.
@pytest.mark.parametrize("product,optimizer,layout", [
    ("native", "sgd", "points"), ("loop", "sgd", "points"), ("batched", "sgd", "points"),
    ("loop", "momentum", "points"), ("batched", "momentum", "points"),
    ("native", "sgd", "neurons"), ("loop", "momentum", "neurons")])
def test_full_path_sweep_equals_separate_runs(x64, product_rule, product, optimizer, layout):
  """The full path in both layouts. With sgd the P update is
  products.add_product: on CPU the native kernel (all members in one call), or
  XLA's rule, which loops over the members above a size (forced here) and batches
  below it; momentum takes the factored trace form (products.trace_product). (The compiled step's rule
  is pinned in test_full_path_sweep_step_uses_the_product_rule.)"""
  with product_rule(product):
    dataset = _task()
    members = _eight_members(optimizer)
    key = jax.random.PRNGKey(3)
    states = _full_path_sweep(optimizer, layout)
    trained, history = sw.fit(states, dataset, key, batch_size=BATCH, steps=STEPS, progress=False)
    _assert_equals_separate_runs(states, trained, history, dataset, members, key)


@pytest.mark.perf
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule of products.add_product")
@pytest.mark.parametrize("layout", ["points", "neurons"])
@pytest.mark.parametrize("product", ["native", "loop", "batched"])
def test_full_path_sweep_step_uses_the_product_rule(x64, product_rule, product, layout):
  """The sweep step's HLO on CPU, sgd: the member loop (a while) only when forced, the native
  kernel's custom call only with the native kernels on."""
  with product_rule(product):
    states = _full_path_sweep("sgd", layout)
    hlo = runners.sweep_step.lower(states, _task(), jnp.arange(BATCH, dtype=jnp.int32)).as_text()
    assert ("while" in hlo) == (product == "loop")
    assert ("kronjax_add_product" in hlo) == (product == "native")


@pytest.mark.perf
@pytest.mark.parametrize("layout", ["points", "neurons"])
def test_momentum_sweep_step_does_not_copy_its_traces(layout):
  """The masked optimizer state is written over the traces in place: the compiled, donated
  sweep step holds the gradients of A and P as temporaries, not also a copy of a trace."""
  m, n, S = 512, 256, 8
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), n, (16, 16), task="regression")
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=m)
  members = sw.grid(learning_rate=[0.5, 1.0, 2.0, 4.0], seed=[0, 1], momentum=[0.9])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  states = sw.init(config, dataset, members, tx=tx, plan=kronjax.Plan(update="full", layout=layout))
  step = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, None, None)), donate_argnums=0)
  compiled = step.lower(states, dataset, jnp.arange(16)).compile()
  full = S * m * n * 4  # bytes of one (S, m, n) float32 array
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 2.5 * full, f"{temp / full:.2f} full-size temporaries"


def test_sweep_train_step_checks_the_dataset_inside_the_step():
  """No host round trip per step: another dataset of the same shapes is a no-op, flagged."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 40, dims=(4, 4))
  dataset = kronjax.Dataset(data, labels)
  other = kronjax.Dataset(data, labels + 1.0)
  members = kronjax.sweep.grid(learning_rate=[0.1, 0.2])
  states = kronjax.sweep.init(kronjax.Config(width=16), dataset, members)
  before = jax.tree.map(np.array, states)   # copies: the step donates its input
  after, metrics = kronjax.sweep.train_step(states, other, jnp.arange(4))
  assert np.asarray(metrics["wrong_dataset"]).all() and np.asarray(metrics["skipped"]).all()
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, after))):
    np.testing.assert_array_equal(x, y)
