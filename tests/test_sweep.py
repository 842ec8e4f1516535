"""kronjax.sweep: one vmapped sweep equals the separate runs (float64), overflow, bad input."""

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
from kronjax.loop import batch_schedule
from reference import rel_err

N, BATCH, STEPS = 32, 8, 8
INDEX_KINDS = [k for k in ("dense", "bucketed") if k in kronjax.threshold.KINDS]
DOCS = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# One transformation object per optimizer, shared by the sweeps and the reference runs, so
# the jitted steps compile once per config (tx is static metadata of the state).
TX = {"sgd": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      "momentum": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)}
_step = jax.jit(kronjax.train_step)


def _task(n=N):
  return _cached_task(n, bool(jax.config.jax_enable_x64))


@functools.cache
def _cached_task(n, x64):
  del x64  # part of the cache key: float64 and float32 data differ
  return kronjax.data.planted(jax.random.PRNGKey(0), n, (4, 6), task="regression")


def _separate(start, data, labels, member, key, steps=STEPS):
  """One member trained alone, from its initial state, with the plain jitted train_step."""
  state = jax.tree.map(lambda x: x, start)
  losses = []
  for bi in batch_schedule(key, data.n, BATCH, steps):
    state, m = _step(state, jnp.asarray(bi))
    assert not bool(m["overflow"]), f"reference run of {member} overflowed"
    losses.append(float(m["loss"]))
  return state, np.asarray(losses)


def _assert_initial_state_is_init(sweep, i, member):
  """Member i of a fresh sweep is ``kronjax.init`` with its key, threshold and hyperparameters."""
  config, tx = sweep.state.config, sweep.state.tx
  data, labels = sweep.state.data, sweep.state.labels
  alone = kronjax.init(jax.random.PRNGKey(member.get("seed", 0)), config, data, labels, tx,
                       threshold=member.get("threshold"))
  hp = {k: v for k, v in member.items() if k in ("learning_rate", "momentum")}
  alone = alone.replace(opt_state=sw.set_hyperparams(alone.opt_state, **hp))
  got = sweep.member(i)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(alone)):
    np.testing.assert_array_equal(x, y)


def _assert_member_equals(sweep, i, ref, tol=1e-10):
  member = sweep.member(i)
  for f in ("P", "A", "a"):
    assert rel_err(getattr(member, f), getattr(ref, f)) < tol, (i, f)
  assert int(member.step) == int(ref.step)


def _equivalence_config(optimizer, kind):
  return kronjax.Config(width=64, threshold=0.6, active_capacity=48, candidate_capacity=56,
                        index=kind, update="sparse" if optimizer == "sgd" else "dense")


@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_sweep_equals_separate_runs(x64, optimizer, kind):
  data, labels = _task()
  config = _equivalence_config(optimizer, kind)
  axes = dict(learning_rate=[0.2, 0.5, 1.0, 2.0], threshold=[0.5, 0.8], seed=[0, 1])
  if optimizer == "momentum":
    axes["momentum"] = [0.9]
  members = sw.grid(**axes)
  assert len(members) == 16
  key = jax.random.PRNGKey(7)
  sweep = sw.init(config, data, labels, members, tx=TX[optimizer])
  assert sweep.state.P.shape == (16, 64, N)
  assert sweep.state.gram.shape == (N, N)          # shared, not copied per member
  for i in (0, 13):                                # b = 0.5 / 0.8, seeds 0 / 1, two learning rates
    _assert_initial_state_is_init(sweep, i, members[i])
  before = sw.compiled_step().cache_size()
  trained, history = sw.fit(sweep, key, batch_size=BATCH, steps=STEPS, progress=False)
  assert sw.compiled_step().cache_size() - before <= 1   # one compilation for all members
  assert history["loss"].shape == (16, STEPS) and not history["replays"]
  assert trained.stopped == (None,) * 16
  for i, member in enumerate(members):
    ref, losses = _separate(sweep.member(i), data, labels, member, key)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10
  # The members really differ (a sweep that ignored its hyperparameters would match trivially).
  assert np.ptp(history["loss"][:, -1]) > 1e-3


@pytest.mark.parametrize("product,optimizer", [("native", "sgd"), ("loop", "sgd"), ("batched", "sgd"),
                                               ("loop", "momentum"), ("batched", "momentum")])
def test_dense_path_sweep_equals_separate_runs(x64, monkeypatch, product, optimizer):
  """The dense path in the point-major layout. With sgd the P update is
  products.add_product: on CPU the native kernel (all members in one call), or
  XLA's rule, which loops over the members above a size (forced here) and batches
  below it; momentum takes the full-shape optimizer path."""
  if product == "native" and not kronjax.native.available():
    pytest.skip(f"native kernel unavailable: {kronjax.native.info()['reason']}")
  monkeypatch.setattr(kronjax.products, "USE_NATIVE", product == "native")
  monkeypatch.setattr(kronjax.products, "LOOP_MIN_BYTES", 0 if product == "loop" else 2**62)
  jax.clear_caches()  # the rule runs at trace time: no step compiled under the other setting
  monkeypatch.setattr(sw, "_STEP_CACHE", {})
  data, labels = _task()
  config = kronjax.Config(width=64, threshold=0.6, update="dense")
  axes = dict(learning_rate=[0.5, 2.0], threshold=[0.5, 0.8], seed=[0, 1])
  if optimizer == "momentum":
    axes.update(learning_rate=[0.1, 0.4], momentum=[0.5, 0.9])
  members = sw.grid(**axes)
  key = jax.random.PRNGKey(3)
  sweep = sw.init(config, data, labels, members, tx=TX[optimizer])
  step = sw.compiled_step()
  hlo = step.lower(sweep.state, jnp.arange(BATCH)).as_text()
  if optimizer == "sgd" and jax.default_backend() == "cpu":
    assert ("while" in hlo) == (product == "loop")
    assert ("kronjax_add_product" in hlo) == (product == "native")
  trained, history = sw.fit(sweep, key, batch_size=BATCH, steps=STEPS, progress=False)
  for i, member in enumerate(members):
    ref, losses = _separate(sweep.member(i), data, labels, member, key)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10
  jax.clear_caches()


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


def test_init_vmaps_over_key_and_train_step_over_stacked_state(x64):
  """The literal API: vmap(init) over keys, vmap(train_step, in_axes=(0, None)) on the result."""
  data, labels = _task()
  config, tx = _equivalence_config("sgd", "dense"), TX["sgd"]
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  stacked = jax.vmap(lambda k: kronjax.init(k, config, data, labels, tx))(keys)
  assert stacked.P.shape == (3, 64, N) and stacked.gram.shape == (3, N, N)   # everything stacked
  starts = [kronjax.init(k, config, data, labels, tx) for k in keys]
  for i, start in enumerate(starts):
    for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(stacked)):
      np.testing.assert_array_equal(x, y[i])
  step = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, None)))
  key = jax.random.PRNGKey(0)
  for bi in batch_schedule(key, N, BATCH, 3):
    stacked, m = step(stacked, jnp.asarray(bi))
    assert m["loss"].shape == (3,)
  for i, start in enumerate(starts):
    ref, _ = _separate(start, data, labels, {"key": i}, key, steps=3)
    assert rel_err(stacked.P[i], ref.P) < 1e-12 and rel_err(stacked.A[i], ref.A) < 1e-12


def _overflow_setup():
  data, labels = _task()
  # Member 2's threshold b = 0 makes about half of the 64 neurons fire: it overflows capacity 24
  # at once, while the others (b = 1.5, ~4 active) fit. The reference runs use capacity 48.
  members = [{"learning_rate": 0.5, "threshold": 1.5, "seed": 0},
             {"learning_rate": 1.0, "threshold": 1.5, "seed": 1},
             {"learning_rate": 0.5, "threshold": 0.0, "seed": 2},
             {"learning_rate": 0.2, "threshold": 1.5, "seed": 3}]
  big = _equivalence_config("sgd", "dense")
  return data, labels, members, big.replace(active_capacity=24), big


@functools.cache
def _overflow_sweep(x64):
  del x64  # cache key
  data, labels, members, small, _ = _overflow_setup()
  return sw.init(small, data, labels, members, tx=TX["sgd"])


def _reference(sweep, i, big, members, key, steps=STEPS):
  start = kronjax.with_config(sweep.member(i), active_capacity=big.active_capacity)
  assert start.config == big
  return _separate(start, sweep.state.data, sweep.state.labels, members[i], key, steps)


def test_overflowing_member_is_replayed_without_corrupting_others(x64):
  _, _, members, _, big = _overflow_setup()
  key = jax.random.PRNGKey(5)
  sweep = _overflow_sweep(True)   # fit does not modify it
  trained, history = sw.fit(sweep, key, batch_size=BATCH, steps=STEPS, progress=False)
  assert history["replays"] and history["replays"][0][0] == 0 and history["replays"][0][2] == [2]
  assert trained.state.config.active_capacity > 24
  assert np.all(np.asarray(trained.state.step) == STEPS)
  for i in range(len(members)):   # every member took every batch exactly once
    ref, losses = _reference(sweep, i, big, members, key)
    _assert_member_equals(trained, i, ref)
    assert rel_err(history["loss"][i], losses) < 1e-10


def test_overflowing_member_stopped_or_raised(x64):
  _, _, members, _, big = _overflow_setup()
  key = jax.random.PRNGKey(5)
  sweep = _overflow_sweep(True)   # fit does not modify it
  with pytest.raises(kronjax.CapacityError, match=r"member\(s\) \[2\]"):
    sw.fit(sweep, key, batch_size=BATCH, steps=2, progress=False, on_overflow="raise")
  trained, history = sw.fit(sweep, key, batch_size=BATCH, steps=STEPS, progress=False,
                            on_overflow="stop")
  assert trained.stopped[2] == "overflow at step 0" and history["stopped"][2] == trained.stopped[2]
  assert np.all(np.isnan(history["loss"][2]))
  assert rel_err(trained.member(2).P, sweep.member(2).P) == 0.0   # frozen at its init
  for i in (0, 1, 3):
    ref, _ = _reference(sweep, i, big, members, key)
    _assert_member_equals(trained, i, ref)
  # A stopped member stays frozen when training continues.
  more, _ = sw.fit(trained, key, batch_size=BATCH, steps=2, progress=False, on_overflow="stop")
  assert int(more.member(2).step) == 0 and int(more.member(0).step) == STEPS + 2


def test_diverging_member_is_stopped_others_go_on(x64):
  data, labels, members, small, big = _overflow_setup()
  members = [dict(m) for m in members]
  members[1]["learning_rate"] = 1e200
  key = jax.random.PRNGKey(5)
  sweep = sw.init(small, data, labels, members, tx=TX["sgd"])
  trained, history = sw.fit(sweep, key, batch_size=BATCH, steps=STEPS, progress=False,
                            on_overflow="stop")
  assert trained.stopped[1] is not None and trained.stopped[0] is None and trained.stopped[3] is None
  assert np.isnan(history["loss"][1, -1])
  for i in (0, 3):
    ref, _ = _reference(sweep, i, big, members, key)
    _assert_member_equals(trained, i, ref)
  with pytest.raises(FloatingPointError, match=r"member\(s\) \[1\]"):
    sw.fit(sweep.replace(stopped=(None, None, "stop", None)), key, batch_size=BATCH, steps=STEPS,
           progress=False, on_nonfinite="raise", on_overflow="stop")


@pytest.mark.parametrize("name,value", [("width", 128), ("active_capacity", 32), ("loss", "softmax"),
                                        ("num_classes", 2), ("index", "bucketed"), ("update", "dense")])
def test_static_settings_cannot_vary(name, value):
  data, labels = _task()
  members = [{"learning_rate": 0.1}, {"learning_rate": 0.2, name: value}]
  with pytest.raises(ValueError, match=rf"'{name}'.*static.*Run separate sweeps"):
    sw.init(kronjax.Config(width=64), data, labels, members)


def test_stack_rejects_states_that_differ_statically():
  data, labels = _task()
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  a = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=64, active_capacity=24), data, labels, tx)
  b = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=64, active_capacity=32), data, labels, tx)
  with pytest.raises(ValueError, match=r"'active_capacity'.*24 vs 32.*Run separate sweeps"):
    sw.stack([a, b])
  c = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=64, active_capacity=24), data, labels,
                   optax.inject_hyperparams(optax.sgd)(learning_rate=0.2))
  with pytest.raises(ValueError, match="different optax transformation"):
    sw.stack([a, c])
  other_labels = labels + 1.0
  d = kronjax.init(jax.random.PRNGKey(1), a.config, data, other_labels, tx)
  with pytest.raises(ValueError, match="different labels"):
    sw.stack([a, d])


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
  data, labels = _task()
  with pytest.raises(ValueError, match=match):
    sw.init(kronjax.Config(width=64), data, labels, members)


def test_bad_arguments():
  data, labels = _task()
  with pytest.raises(ValueError, match="no injected hyperparameters"):
    sw.init(kronjax.Config(width=64), data, labels, [{"learning_rate": 0.1}], tx=optax.sgd(0.1))
  with pytest.raises(TypeError, match="sweep must be"):
    sw.fit(kronjax.Config(width=4), jax.random.PRNGKey(0), batch_size=4, steps=1)
  with pytest.raises(ValueError, match="grid axis 'seed'"):
    sw.grid(seed=[])
  assert sw.grid(a=[1, 2], b=[3]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def _docs_blocks():
  return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_sweep_example_runs(capsys):
  blocks = [b for b in _docs_blocks() if "kronjax.sweep.init" in b]
  assert len(blocks) == 1, "README.md: one sweep example"
  namespace = {}
  exec(compile(blocks[0], str(DOCS), "exec"), namespace)
  assert "best member" in capsys.readouterr().out
  history = namespace["history"]
  assert history["loss"].shape == (8, 40)
  assert np.nanmean(history["loss"][:, -10:]) < np.nanmean(history["loss"][:, :5])
