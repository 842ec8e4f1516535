"""kronjax.fit(..., chunk=...): many steps per dispatch, bit for bit the one-step-at-a-time run.

``chunk="auto"`` runs up to 4096 steps in one compiled ``lax.while_loop`` (about a
quarter second of steps at most, paced from the last chunk's time); a chunk
ends where a cadence (evaluation, verification, callbacks, checkpoints, resync,
the divergence window) falls due and after the first step that overflowed, was
skipped or diverged. Every comparison with ``chunk=1`` is exact
(``np.testing.assert_array_equal``); the dense comparison is float64.
"""

import dataclasses
import functools
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from reference import assert_same_tree
from kronjax import checkpoint
from kronjax import dense
from kronjax import sweep as sw
from kronjax._src.base import compilations
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.train import loop
from kronjax._src.train import runners

N, M, DIMS = 48, 64, (4, 5)
TIMING = {"seconds", "steps_per_second", "resumed_from"}
ROOT = pathlib.Path(__file__).resolve().parents[1]
# The diverging runs train on points of norm 9 on purpose (the dataset warns about them).
UNNORMALIZED = pytest.mark.filterwarnings("ignore::kronjax.NormWarning")


@functools.cache
def _dataset(scale=1.0):
  """48 training points (factors times ``scale``: 3 makes them far from unit norm), 16 held out."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), N + 16, DIMS, task="regression")
  data = kronjax.KronData([f * scale for f in data.factors])
  held = jnp.arange(N, N + 16)
  return kronjax.Dataset(data.subset(jnp.arange(N)), labels[:N], eval_data=data.subset(held),
                         eval_labels=labels[held])


def _init(lr=1.0, plan=None, **config):
  config = kronjax.Config(**{"width": M, "threshold": 0.3, **config})
  return kronjax.init(jax.random.PRNGKey(3), config, _dataset(), optax.sgd(lr), plan=plan)


def _fit(state, dataset=None, **options):
  options = {"batch_size": 4, "progress": False, **options}
  return kronjax.fit(state, dataset or _dataset(), jax.random.PRNGKey(1), **options)


def _assert_same_history(got, want):
  assert set(got) == set(want)
  for k in set(want) - TIMING:
    if isinstance(want[k], np.ndarray):
      assert got[k].dtype == want[k].dtype, k
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    elif isinstance(want[k], dict):
      assert set(got[k]) == set(want[k]), k
      for name in want[k]:
        np.testing.assert_array_equal(got[k][name], want[k][name], err_msg=f"{k}[{name}]")
    else:
      assert got[k] == want[k], k


@pytest.fixture
def dispatches(monkeypatch):
  """The steps each dispatch of ``fit`` asked for, in order (1: a single compiled step).
  Chunks are not paced by time here (a first chunk that compiles would shorten the next)."""
  monkeypatch.setattr(loop, "_SECONDS_PER_DISPATCH", float("inf"))
  asked = []
  for cls in (runners.Single, runners.Sweep):
    step, chunk = cls.step, cls.chunk

    def spy_step(self, *args, _step=step):
      asked.append(1)
      return _step(self, *args)

    def spy_chunk(self, state, dataset, batches, count, *rest, _chunk=chunk):
      asked.append(int(count))
      return _chunk(self, state, dataset, batches, count, *rest)

    monkeypatch.setattr(cls, "step", spy_step)
    monkeypatch.setattr(cls, "chunk", spy_chunk)
  return asked


# ----------------------------------------------------------------------------- bit for bit

@pytest.mark.parametrize("update", ["sparse", "full"])
def test_chunked_fit_is_bit_identical_to_one_step_per_dispatch(update, dispatches):
  options = dict(steps=37, eval_every=10, log_every=3)
  plan = kronjax.Plan(update=update)
  one, h_one = _fit(_init(plan=plan), chunk=1, **options)
  assert dispatches == [1] * 37
  dispatches.clear()
  many, h_many = _fit(_init(plan=plan), **options)
  # Chunks end at the evaluations (10, 20, 30), at the divergence window (10) and at the end.
  assert dispatches == [10, 10, 10, 7]
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)
  assert list(h_many["step"]) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 37]


@pytest.mark.perf  # reads the compiled HLO text
# XLA's point-major full step copies P (the transposed update of its batch rows): without the
# native kernels only the default, neuron-major layout is checked.
@pytest.mark.parametrize("layout,use_native", [("neurons", True), ("points", True),
                                               ("neurons", False)])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("members", [None, 2])
def test_a_full_path_chunk_updates_P_in_place(layout, use_native, batch, members):
  """fit's and sweep.fit's compiled loops add to ``P`` in place: no copy of ``P`` per step,
  at ``B = 1`` too (where a column of neuron-major ``P`` is a slice XLA would fuse into every
  reader), with the native kernels and with XLA's expressions."""
  if use_native and not native.available(warn=False):
    pytest.skip(f"native kernels unavailable: {native.info()['reason']}")
  plan = kronjax.Plan(update="full", layout=layout)
  config = kronjax.Config(width=M, threshold=0.3)
  batches = jnp.zeros((8, batch), jnp.int32)
  if members is None:
    state, chunk, live = _init(plan=plan), runners._chunk_of(kronjax.train_step), jnp.bool_(True)
  else:
    state = sw.init(config, _dataset(), sw.grid(learning_rate=[0.5, 1.0][:members]),
                    tx=optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), plan=plan)
    chunk, live = runners._sweep_chunk, jnp.ones((members,), bool)
  shape = ",".join(map(str, state.projections.shape))
  with dispatch.using(use_native):
    text = chunk.lower(state, _dataset(), batches, jnp.int32(8), live,
                       jnp.full(live.shape, jnp.inf, jnp.float32)).compile().as_text()
  copies = [line for line in text.splitlines() if f"f32[{shape}]" in line and " copy(" in line]
  assert not copies, copies


def test_chunk_size_caps_the_steps_per_dispatch(dispatches):
  one, h_one = _fit(_init(), steps=30, chunk=1)
  dispatches.clear()
  many, h_many = _fit(_init(), steps=30, chunk=4)
  assert dispatches == [4, 4, 2, 4, 4, 4, 4, 4]   # the divergence window ends at step 10
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)


def test_chunks_end_on_every_cadence():
  options = loop.Options(batch_size=4, steps=100, eval_every=7, verify_every=9, resync_every=11,
                         checkpoint_every=13, checkpoint_dir="unused", callbacks=(print,),
                         callback_every=17, divergence_factor=0)
  chunks = loop._Chunks(runners.Single(), options, 100, 4, until=10, checkpointing=True)
  assert chunks.size == 128   # a power of two: runs of 65 to 128 steps share one compilation
  done, ends = 0, []
  while done < 100:
    done += chunks.length(done, 100 - done)
    ends.append(done)
  cadences = {s for e in (7, 9, 11, 13, 17) for s in range(e, 100, e)} | {100}
  assert ends == sorted(cadences)
  # Without a checkpoint directory or callbacks their cadences do not split chunks; the
  # divergence window does while the check is on.
  options = loop.Options(batch_size=4, steps=5000, checkpoint_every=0, callback_every=3)
  chunks = loop._Chunks(runners.Single(), options, 5000, 4, until=10, checkpointing=False)
  assert chunks.size == runners.CHUNK_LIMIT == 4096
  lengths = [chunks.length(0, 5000), chunks.length(10, 4990), chunks.length(4974, 26)]
  assert lengths == [10, 4096, 26]
  # An explicit chunk may pass the automatic limit; the stacked batch indices stay small.
  explicit = dataclasses.replace(options, chunk=8192)
  assert loop._Chunks(runners.Single(), explicit, 10000, 4, 0, False).size == 8192
  assert loop._Chunks(runners.Single(), options, 5, 4, 0, False).size == 8
  assert loop._Chunks(runners.Single(), options, 5000, 2**15, 0, False).size == 2


@pytest.mark.perf  # reads the compiled HLO text
@pytest.mark.parametrize("index", ["scan", "bucketed"])
@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_sparse_path_chunk_updates_P_in_place(index, use_native, batch):
  """The sparse path's compiled loop (the index query reads the batch's columns of ``P``, the
  update writes the touched rows) adds to ``P`` in place: no copy of ``P`` per step."""
  if use_native and not native.available(warn=False):
    pytest.skip(f"native kernels unavailable: {native.info()['reason']}")
  state = _init(plan=kronjax.Plan(update="sparse", index=index))
  shape = ",".join(map(str, state.projections.shape))
  with dispatch.using(use_native):
    text = runners._chunk_of(kronjax.train_step).lower(
        state, _dataset(), jnp.zeros((8, batch), jnp.int32), jnp.int32(8), jnp.bool_(True),
        jnp.float32(jnp.inf)).compile().as_text()
  copies = [line for line in text.splitlines() if f"f32[{shape}]" in line and " copy(" in line]
  assert not copies, copies


def test_auto_chunks_are_paced_by_the_time_a_chunk_took():
  """``chunk="auto"`` takes about ``_SECONDS_PER_DISPATCH`` of steps per dispatch (from the
  last chunk's time), at least 2 (one step would run the single compiled step) and never more
  than the compiled size; a chunk that compiled is not timed; an explicit chunk is not paced."""
  options = loop.Options(batch_size=4, steps=5000, divergence_factor=0)
  chunks = loop._Chunks(runners.Single(), options, 5000, 4, until=0, checkpointing=False)
  assert chunks.length(0, 5000) == chunks.size == 4096      # nothing timed yet
  per_step = loop._SECONDS_PER_DISPATCH / 25
  chunks.observe(100, 100 * per_step, compiled=False)         # 25 steps fill a dispatch
  assert chunks.length(0, 5000) == 25
  assert chunks.length(4990, 10) == 10
  chunks.observe(25, 60.0, compiled=True)                     # a compilation: not a step's time
  assert chunks.length(0, 5000) == 25
  chunks.observe(25, 1e-7, compiled=False)                    # fast again: the compiled size
  assert chunks.length(25, 4975) == 4096
  chunks.observe(1, 60.0, compiled=False)                     # slower than a dispatch: 2 steps
  assert chunks.length(0, 5000) == 2
  explicit = loop._Chunks(runners.Single(), dataclasses.replace(options, chunk=64), 5000, 4,
                          until=0, checkpointing=False)
  explicit.observe(1, 60.0, compiled=False)
  assert explicit.length(0, 5000) == 64


def test_paced_chunks_train_bit_for_bit_as_one_step_at_a_time(monkeypatch, dispatches):
  one, h_one = _fit(_init(), steps=30, chunk=1)
  monkeypatch.setattr(loop, "_SECONDS_PER_DISPATCH", 0.0)   # every timed chunk: 2 steps
  before = compilations.count()
  _fit(_init(), steps=30)   # compiles (and its chunks are not timed), so that those below are
  assert compilations.count() > before
  dispatches.clear()
  paced, h_paced = _fit(_init(), steps=30)
  assert dispatches == [10] + [2] * 10   # the divergence window, then 2s
  assert_same_tree(paced, one)
  _assert_same_history(h_paced, h_one)


@pytest.mark.parametrize("batch,update", [(4, "auto"), (1, "full")])
def test_chunked_fit_equals_dense_sgd_float64(x64, batch, update):
  """The chunked loop against the plain dense network on the same batches (fit's schedule);
  at B = 1 on the full path a neuron-major ``P``'s column is gathered on its own."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), N, DIMS, task="regression",
                                      dtype=jnp.float64)
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=M, threshold=0.3, init="kronecker")
  tx = optax.sgd(1.0)
  state = kronjax.init(jax.random.PRNGKey(3), config, dataset, tx,
                       plan=kronjax.Plan(update=update))
  trained, history = kronjax.fit(state, dataset, jax.random.PRNGKey(1), batch_size=batch,
                                 steps=40, progress=False)
  assert not history["replays"]
  W0 = kronjax.dense_params(state, dataset)["W"]
  dstate = dense.init(jax.random.PRNGKey(3), config, DIMS, tx, dtype=jnp.float64)
  np.testing.assert_array_equal(np.asarray(dstate.params["W"]), np.asarray(W0))
  dstep = dense.make_step(config, tx, donate=False)
  X = data.materialize()
  losses = []
  for idx in loop.batch_schedule(jax.random.PRNGKey(1), N, batch, 40):
    dstate, dm = dstep(dstate, X[idx], labels[idx])
    losses.append(float(dm["loss"]))
  W = kronjax.dense_params(trained, dataset)["W"]
  err = float(jnp.max(jnp.abs(W - dstate.params["W"])) / jnp.max(jnp.abs(dstate.params["W"])))
  assert err < 1e-9
  np.testing.assert_allclose(history["loss"], losses, rtol=1e-9)


# ----------------------------------------------------------------------------- failures

def test_overflow_in_a_chunk_replays_exactly_that_step(dispatches):
  """A tiny capacity overflows at several steps: the chunk ends at each, the replay re-runs
  that step only, and the run equals the step-by-step one (replays at the same steps)."""
  plan = kronjax.Plan(active_capacity=8, update="sparse")
  one, h_one = _fit(_init(plan=plan), steps=40, chunk=1)
  assert h_one["replays"], "the tiny capacity should have overflowed"
  dispatches.clear()
  many, h_many = _fit(_init(plan=plan), steps=40)
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)
  assert max(dispatches) > 1 and len(dispatches) < 40


def test_a_chunk_stops_after_the_first_skipped_step():
  """``run_chunk`` directly: the steps after an overflow do not run; the state is the
  step-by-step state after that (skipped) step."""
  state = _init(plan=kronjax.Plan(active_capacity=8, update="sparse"))
  batches = loop.batch_schedule(jax.random.PRNGKey(1), N, 4, 16)
  by_step, statuses = runners.fresh_copy(state), []
  for batch in batches:
    by_step, metrics = runners._step(by_step, _dataset(), jnp.asarray(batch))
    statuses.append(int(metrics["status"]))
    if statuses[-1]:
      break
  assert statuses[-1] == 1 and len(statuses) < 16   # an overflow, not the last step
  chunked, stacked, taken = runners._chunk(runners.fresh_copy(state), _dataset(), batches,
                                           np.int32(16), np.ones((), bool),
                                           np.asarray(np.inf, np.float32))
  assert int(taken) == len(statuses)
  stacked = runners.unpack(jax.device_get(stacked))
  np.testing.assert_array_equal(np.asarray(stacked["status"][:len(statuses)]), statuses)
  assert not np.any(np.asarray(stacked["step"][len(statuses):]))   # rows never written
  assert_same_tree(chunked, by_step)


def test_a_chunk_that_ran_past_a_failure_is_reported():
  """The host checks the chunk's invariant: no step before its last failed or diverged."""
  live, limit = np.array([True, False]), np.array([10.0, 10.0], np.float32)
  ok = {"status": np.zeros((3, 2), np.int32), "loss": np.ones((3, 2), np.float32)}
  loop._check_early_rows(ok, live, limit)
  stopped_member = {**ok, "status": np.array([[0, 1], [0, 0], [0, 0]], np.int32)}
  loop._check_early_rows(stopped_member, live, limit)       # member 1 is not live
  for rows in ({**ok, "status": np.array([[0, 0], [1, 0], [0, 0]], np.int32)},
               {**ok, "loss": np.array([[1, 1], [1, 1], [11, 1]], np.float32)}):
    with pytest.raises(RuntimeError, match="chunk=1"):
      loop._check_early_rows(rows, live, limit)


@UNNORMALIZED
def test_non_finite_loss_raises_at_the_same_step():
  dataset = _dataset(scale=3.0)
  state = kronjax.init(jax.random.PRNGKey(3), kronjax.Config(width=M), dataset, optax.sgd(0.6))
  messages = []
  for chunk in (1, "auto"):
    with pytest.raises(FloatingPointError, match="non-finite") as e:
      _fit(state, dataset, steps=60, chunk=chunk, divergence_factor=0)
    messages.append(str(e.value))
  assert messages[0] == messages[1]


def test_callback_stop_and_checkpoint_match_one_step_per_dispatch(tmp_path, dispatches):
  def stop_at_15(info):
    return kronjax.STOP if info.step == 15 else {"loss": info.metrics["loss"]}

  options = dict(steps=40, callbacks=(stop_at_15,), callback_every=5, checkpoint_every=6)
  one, h_one = _fit(_init(), chunk=1, checkpoint_dir=tmp_path / "one", **options)
  dispatches.clear()
  many, h_many = _fit(_init(), checkpoint_dir=tmp_path / "many", **options)
  assert dispatches == [5, 1, 4, 2, 3]   # ends at the cadences 5, 6, 10, 12 and 15 (the stop)
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)
  assert h_many["stopped"] == "stopped by callback at step 15"
  assert checkpoint.steps(tmp_path / "many") == checkpoint.steps(tmp_path / "one") == [12, 15]


def test_resume_from_a_checkpoint_inside_a_chunk_is_bit_identical(tmp_path):
  """Without checkpoints the run is one chunk of 10 then one of 20; the checkpoint at step
  16 falls inside the second. Killed after it, resumed, the run equals the uninterrupted
  one (and the one-step-at-a-time one)."""
  options = dict(steps=30, eval_every=0, log_every=2)
  full, h_full = _fit(_init(), **options)
  one, h_one = _fit(_init(), chunk=1, **options)
  assert_same_tree(full, one)
  _assert_same_history(h_full, h_one)
  _fit(_init(), **{**options, "steps": 20}, checkpoint_dir=tmp_path, checkpoint_every=16)
  assert checkpoint.steps(tmp_path) == [16, 20]
  shutil.rmtree(checkpoint.checkpoint_path(tmp_path, 20))
  resumed, h = _fit(_init(), **options, checkpoint_dir=tmp_path, checkpoint_every=16,
                    resume=True)
  assert h["resumed_from"] == 16
  assert_same_tree(resumed, full)
  _assert_same_history(h, h_full)


# ----------------------------------------------------------------------------- runners

def _sweep_states(lrs, dataset):
  members = sw.grid(learning_rate=lrs)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  return sw.init(kronjax.Config(width=M), dataset, members, tx=tx)


@UNNORMALIZED
def test_sweep_fit_chunks_bit_identical_with_a_member_stopped(dispatches):
  """Member 2 diverges (un-normalized data, a large learning rate) and is frozen there; the
  others train on in masked chunks. Equal to the step-by-step sweep, bit for bit."""
  dataset = _dataset(scale=3.0)
  states = _sweep_states([0.05, 0.1, 0.3], dataset)
  options = dict(batch_size=4, steps=60, progress=False, on_nonfinite="stop", eval_every=20)
  one, h_one = sw.fit(states, dataset, jax.random.PRNGKey(1), chunk=1, **options)
  assert h_one["stopped"][:2] == [None, None]
  assert h_one["stopped"][2].startswith("diverging loss at step")
  dispatches.clear()
  many, h_many = sw.fit(states, dataset, jax.random.PRNGKey(1), **options)
  assert max(dispatches) > 1 and len(dispatches) < 30
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)


def test_sharded_runner_steps_one_batch_per_dispatch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("neurons",))
  runner = runners.Sharded(mesh)
  assert runner.chunk_limit == 1
  for chunk in ("auto", 64):
    options = loop.Options(batch_size=4, steps=100, chunk=chunk)
    assert loop._Chunks(runner, options, 100, 4, until=10, checkpointing=False).size == 1
  with pytest.raises(ValueError, match=r"chunk=8 is not available with mesh=.*chunk='auto' or 1"):
    _fit(_init(), steps=4, mesh=mesh, chunk=8)


# ----------------------------------------------------------------------------- divergence

@UNNORMALIZED
def test_diverging_run_raises_naming_normalize_and_the_learning_rate():
  """Un-normalized inputs and a large learning rate: the loss climbs past 1e14 and stays
  finite. The default divergence check raises; divergence_factor=0 lets it run."""
  dataset = _dataset(scale=3.0)
  state = kronjax.init(jax.random.PRNGKey(3), kronjax.Config(width=M), dataset, optax.sgd(0.3))
  _, h = _fit(state, dataset, steps=60, divergence_factor=0)
  assert np.all(np.isfinite(h["loss"])) and h["loss"].max() > 1e12
  for chunk in (1, "auto"):
    with pytest.raises(FloatingPointError, match=r"(?s)divergence_factor=1e\+06.*learning rate.*"
                       r"normalize=True.*divergence_factor=0") as e:
      _fit(state, dataset, steps=60, chunk=chunk)
    step = int(str(e.value).split(" at step ")[1].split(",")[0])
    first = np.flatnonzero(h["loss"][10:] > 1e6 * h["loss"][:10].max())[0] + 10
    assert step == first
  # A tighter factor fires earlier; a healthy run never fires.
  with pytest.raises(FloatingPointError, match="divergence_factor=100"):
    _fit(state, dataset, steps=60, divergence_factor=100)
  _, h = _fit(_init(), steps=60)
  assert h["stopped"] is None


@UNNORMALIZED
def test_a_chunk_stops_at_the_diverging_step_of_a_sweep_member(dispatches):
  """After the reference window the chunk loop ends at the step a member's loss passes the
  limit, the member is frozen there (on_nonfinite="stop"), and the run is bit for bit the
  one-step-at-a-time run."""
  dataset = _dataset(scale=3.0)
  states = sw.init(kronjax.Config(width=M), dataset, sw.grid(learning_rate=[0.3, 0.01]),
                   tx=optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
  one, h_one = sw.fit(states, dataset, jax.random.PRNGKey(1), batch_size=4, steps=60,
                      progress=False, on_nonfinite="stop", chunk=1)
  stopped_at = int(h_one["stopped"][0].split(" at step ")[1])
  assert h_one["stopped"][1] is None and stopped_at > loop.DIVERGENCE_WINDOW
  dispatches.clear()
  many, h_many = sw.fit(states, dataset, jax.random.PRNGKey(1), batch_size=4, steps=60,
                        progress=False, on_nonfinite="stop")
  # The window; then a chunk asked for the rest that takes the steps up to the diverging one.
  assert dispatches == [10, 50, 60 - (stopped_at + 1)]
  assert h_many["stopped"] == h_one["stopped"]
  assert_same_tree(many, one)
  _assert_same_history(h_many, h_one)


@UNNORMALIZED
def test_divergence_reference_rides_in_the_checkpoint(tmp_path):
  """Resumed after the reference window, the run checks against the same reference: the
  resumed run raises at the step the uninterrupted one does."""
  dataset = _dataset(scale=3.0)
  state = kronjax.init(jax.random.PRNGKey(3), kronjax.Config(width=M), dataset, optax.sgd(0.3))
  with pytest.raises(FloatingPointError) as uninterrupted:
    _fit(state, dataset, steps=60)
  _fit(state, dataset, steps=12, checkpoint_dir=tmp_path, checkpoint_every=12)
  _, meta = checkpoint.load(tmp_path, like=state)
  assert meta["divergence"]["until"] == 10 and meta["divergence"]["reference"].shape == (1,)
  with pytest.raises(FloatingPointError) as resumed:
    _fit(state, dataset, steps=60, checkpoint_dir=tmp_path, checkpoint_every=12, resume=True)
  assert str(resumed.value) == str(uninterrupted.value)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, error, match", [
    ({"chunk": "fast"}, ValueError, "chunk must be 'auto' or a positive int"),
    ({"chunk": 0}, ValueError, "chunk must be >= 1"),
    ({"chunk": 2.0}, TypeError, "chunk must be an int"),
    ({"divergence_factor": 0.5}, ValueError, "divergence_factor must be 0 .* > 1"),
    ({"divergence_factor": float("inf")}, ValueError, "divergence_factor must be 0"),
    ({"divergence_factor": "big"}, TypeError, "divergence_factor must be a number"),
])
def test_bad_chunk_and_divergence_arguments_raise_naming_them(kwargs, error, match):
  state = _init()
  with pytest.raises(error, match=match):
    _fit(state, steps=4, **kwargs)
  assert int(state.step) == 0


def test_fit_docstring_renders_every_argument_and_one_return():
  """Google style as mkdocstrings parses it: one entry per argument, with its default, one
  return value, and typed Raises items."""
  griffe = pytest.importorskip("griffe")
  from griffe import Docstring
  doc = Docstring(kronjax.fit.__doc__, parser="google",
                  parser_options={"warn_unknown_params": False})
  sections = {s.kind.value: s.value for s in doc.parse()}
  documented = [p.name for p in sections["parameters"]]
  import inspect
  assert documented == list(inspect.signature(kronjax.fit).parameters)
  assert len(sections["returns"]) == 1
  assert {r.annotation for r in sections["raises"]} == {
      "FloatingPointError", "CapacityError", "TypeError", "ValueError"}
  del griffe


# ----------------------------------------------------------------------------- benchmark

def test_dispatch_benchmark_smoke(tmp_path):
  out = tmp_path / "dispatch.json"
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_dispatch.py"),
                         "--smoke", "--out", str(out)], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["date"] and result["command"] and result["environment"] and result["rows"]
  for row in result["rows"]:
    assert row["fit_ms_per_step"] > 0 and row["scan_ms_per_step"] > 0
