"""kronjax.fit(..., callbacks=..., callback_every=...): hooks that stop a run or record metrics."""

import functools
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from reference import assert_same_tree
from kronjax import checkpoint

N, M, DIMS = 32, 96, (4, 5)


@functools.cache
def _dataset():
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), N + 16, DIMS, task="regression")
  held = jnp.arange(N, N + 16)
  return kronjax.Dataset(data.subset(jnp.arange(N)), labels[:N], eval_data=data.subset(held),
                         eval_labels=labels[held])


def _init():
  return kronjax.init(jax.random.PRNGKey(3), kronjax.Config(width=M), _dataset(), optax.sgd(4.0))


def _fit(state, **options):
  return kronjax.fit(state, _dataset(), jax.random.PRNGKey(1), batch_size=4, progress=False,
                     **options)


MIN_DELTA = 5e-4


class EarlyStopping:
  """Stops when the held-out loss has not improved on its best by ``MIN_DELTA`` for
  ``patience`` calls."""

  def __init__(self, patience):
    self.patience, self.best, self.waited, self.calls = patience, np.inf, 0, []

  def __call__(self, info):
    loss = float(kronjax.evaluate(info.state, _dataset())["eval_loss"])
    self.calls.append(info.step)
    if loss < self.best - MIN_DELTA:
      self.best, self.waited = loss, 0
    else:
      self.waited += 1
    if self.waited >= self.patience:
      return kronjax.STOP
    return {"eval_loss": loss}


def _expected_stop(eval_losses, patience):
  best, waited = np.inf, 0
  for t, loss in enumerate(eval_losses):
    if loss < best - MIN_DELTA:
      best, waited = loss, 0
    else:
      waited += 1
    if waited >= patience:
      return t + 1
  return None


def test_early_stopping_on_held_out_loss_stops_at_the_expected_step():
  steps, patience = 40, 2
  _, full = _fit(_init(), steps=steps, eval_every=1)
  expected = _expected_stop(full["eval_loss"], patience)
  assert expected is not None and expected < steps, full["eval_loss"]
  stopper = EarlyStopping(patience)
  state, h = _fit(_init(), steps=steps, callbacks=(stopper,))
  assert h["stopped"] == f"stopped by callback at step {expected}"
  assert int(state.step) == expected and stopper.calls == list(range(1, expected + 1))
  assert list(h["step"]) == list(range(1, expected + 1))
  np.testing.assert_array_equal(h["loss"], full["loss"][:expected])
  # The state is the one of that step: the run that was asked for exactly that many steps.
  exact, _ = _fit(_init(), steps=expected)
  assert_same_tree(state, exact)
  # The metrics returned before the stop were recorded; the stopping call reported none (NaN).
  assert list(h["callback_step"]) == list(range(1, expected + 1))
  np.testing.assert_allclose(h["callback"]["eval_loss"][:-1], full["eval_loss"][:expected - 1],
                             rtol=1e-6)
  assert np.isnan(h["callback"]["eval_loss"][-1])


def test_stop_off_the_log_cadence_records_that_step_and_saves_it(tmp_path):
  # log_every=4 and eval_every=4 would not record step 6: the stop records it.
  state, h = _fit(_init(), steps=12, log_every=4, eval_every=4, checkpoint_dir=tmp_path,
                  callbacks=(lambda info: info.step == 6,))
  assert int(state.step) == 6 and list(h["step"]) == [4, 6] and list(h["eval_step"]) == [4, 6]
  assert h["stopped"] == "stopped by callback at step 6"
  assert checkpoint.latest_step(tmp_path) == 6


def test_custom_metric_is_recorded_every_k_steps():
  seen = []

  def record(info):
    seen.append(info)
    out = {"loss_again": info.metrics["loss"], "twice": np.full(2, info.step)}
    if info.step % 2 == 0:
      out["even"] = 1.0
    return out

  state, h = _fit(_init(), steps=10, callbacks=(record,), callback_every=3)
  assert [i.step for i in seen] == [3, 6, 9, 10]
  assert list(h["callback_step"]) == [3, 6, 9, 10]
  np.testing.assert_array_equal(h["callback"]["loss_again"],
                                h["loss"][np.asarray([3, 6, 9, 10]) - 1].astype(np.float64))
  assert h["callback"]["twice"].shape == (4, 2)
  np.testing.assert_array_equal(h["callback"]["even"], [np.nan, 1.0, np.nan, 1.0])
  # StepInfo: a frozen NamedTuple; metrics are host numpy scalars; history as fit returns it,
  # as it stood at the call even when read later.
  info = seen[1]
  with pytest.raises(AttributeError):
    info.step = 0
  assert isinstance(info.metrics["loss"], np.floating) and info.metrics["loss"] == h["loss"][5]
  assert list(info.history["step"]) == list(range(1, 7))
  assert list(info.history["callback_step"]) == [3]
  assert info.history["stopped"] is None and info.history["resumed_from"] == 0
  assert h["stopped"] is None
  assert repr(kronjax.STOP) == "kronjax.STOP"
  assert pickle.loads(pickle.dumps(kronjax.STOP)) is kronjax.STOP
  # Without callbacks the history has no callback entries.
  _, plain = _fit(_init(), steps=2)
  assert "callback" not in plain and "callback_step" not in plain


def _interrupted_and_resumed(directory, **options):
  """A run of 10 steps killed after its step-4 checkpoint, started again with resume=True."""
  _fit(_init(), **{**options, "steps": 6}, checkpoint_dir=directory, checkpoint_every=4)
  assert checkpoint.steps(directory) == [4, 6]
  shutil.rmtree(checkpoint.checkpoint_path(directory, 6))
  return _fit(_init(), **options, checkpoint_dir=directory, checkpoint_every=4, resume=True)


def test_resume_keeps_the_callback_history_and_cadence(tmp_path):
  calls = []

  def record(info):
    calls.append(info.step)
    return {"loss": info.metrics["loss"], "step_sq": float(info.step) ** 2}

  options = dict(steps=10, callbacks=(record,), callback_every=3)
  full, h_full = _fit(_init(), **options)
  calls.clear()
  resumed, h = _interrupted_and_resumed(tmp_path, **options)
  # The killed run called at 3 and 6; the resumed one from step 4 on: at 6, 9 and 10.
  assert calls == [3, 6, 6, 9, 10]
  assert h["resumed_from"] == 4
  assert_same_tree(resumed, full)
  assert list(h["callback_step"]) == list(h_full["callback_step"]) == [3, 6, 9, 10]
  assert set(h["callback"]) == set(h_full["callback"]) == {"loss", "step_sq"}
  for name in h_full["callback"]:
    np.testing.assert_array_equal(h["callback"][name], h_full["callback"][name], err_msg=name)


def test_sweep_fit_takes_callbacks_and_a_stop_ends_every_member():
  members = kronjax.sweep.grid(learning_rate=[1.0, 4.0])
  states = kronjax.sweep.init(kronjax.Config(width=M), _dataset(), members)
  seen = []

  def cb(info):
    seen.append(info.metrics["loss"].shape)
    return kronjax.STOP if info.step == 4 else {"mean_loss": info.metrics["loss"]}

  states, h = kronjax.sweep.fit(states, _dataset(), jax.random.PRNGKey(1), batch_size=4, steps=8,
                                progress=False, callbacks=[cb], callback_every=2)
  assert seen == [(2,), (2,)]
  assert list(np.asarray(states.step)) == [4, 4]
  assert h["stopped"] == ["stopped by callback at step 4"] * 2
  assert h["loss"].shape == (2, 4) and h["callback"]["mean_loss"].shape == (2, 2)


def test_bad_callback_arguments_raise_naming_the_argument():
  state = _init()
  cb = lambda info: None  # noqa: E731
  with pytest.raises(TypeError, match=r"callbacks must be a sequence.*callbacks=\("):
    _fit(state, steps=1, callbacks=cb)
  with pytest.raises(TypeError, match=r"callbacks\[1\] must be callable"):
    _fit(state, steps=1, callbacks=(cb, "not a function"))
  with pytest.raises(TypeError, match="callbacks must be a tuple or list"):
    _fit(state, steps=1, callbacks={"a": cb})
  with pytest.raises(ValueError, match="callback_every must be >= 1"):
    _fit(state, steps=1, callbacks=(cb,), callback_every=0)
  with pytest.raises(TypeError, match="callback_every must be an int"):
    _fit(state, steps=1, callbacks=(cb,), callback_every=1.5)
  with pytest.raises(TypeError, match=r"returned str .*kronjax.STOP"):
    _fit(state, steps=1, callbacks=(lambda info: "stop",))
  with pytest.raises(TypeError, match="metric 'x'.*not a number"):
    _fit(state, steps=1, callbacks=(lambda info: {"x": "high"},))
  with pytest.raises(ValueError, match="two callbacks returned the metric 'x'"):
    _fit(state, steps=1, callbacks=(lambda info: {"x": 1.0},) * 2)
  with pytest.raises(ValueError, match="metric 'x' changed shape"):
    _fit(state, steps=2, callbacks=(lambda info: {"x": np.zeros(info.step)},))
