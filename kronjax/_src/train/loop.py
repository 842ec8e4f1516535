"""The training loop: ``kronjax.fit``, ``kronjax.sweep.fit`` and the experiment runner all run it.

One driver, ``train``, owns everything around the compiled step: the batch
schedule, overflow replay, the non-finite-loss and invalid-batch policies,
evaluation and checkpoint cadence, resuming, the progress bar and the history.
What differs between a single run, a sweep of ``S`` stacked members and a
neuron-sharded run is a runner (``runners.Single``, ``Sweep``, ``Sharded``: how to
prepare the state, step it, evaluate it, regrow its plan and resync it); the
loop's options are one frozen ``Options`` value with the policies as fields, in
the manner of diffrax's ``diffeqsolve``: the loop itself is written once.

Policies:
  * ``on_overflow`` (a point of the batch had more active neurons than the
    static capacity; the step was skipped): ``"replay"`` (default) grows the
    capacity (one recompilation) and re-runs the batch from the unchanged
    state, for the members that overflowed only; ``"raise"`` raises
    ``CapacityError``; ``"stop"`` freezes the overflowing members.
  * ``on_nonfinite`` (the batch loss was NaN/inf; the step was skipped, so the
    state is the last finite one): ``"raise"`` (default) raises
    ``FloatingPointError`` naming the step and members; ``"stop"`` freezes
    those members (an explicit choice for sweeps where some learning rates
    diverge) and trains the others on.
  * a member that stopped is frozen (masked steps) and reported in
    ``history["stopped"]``; when every member has stopped the loop ends early.

Hooks: ``callbacks`` are called every ``callback_every`` global steps (and at
the end) with a ``StepInfo``; one returning ``STOP`` (or True) ends the run after
that step, one returning a dict has it recorded in ``history["callback"]``.
``verify_every`` checks ``P`` against the weights (``kronjax.verify``) and raises
``FloatingPointError`` when they disagree.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.data.dataset import Dataset
from kronjax._src.distributed import checkpoint
from kronjax._src.inference import network
from kronjax._src.inference import verify as verify_lib
from kronjax._src.step import index as index_lib
from kronjax._src.step.state import TrainState, check_key
from kronjax._src.train import runners
from kronjax._src.train.history import History, progress_bar

ON_OVERFLOW = ("replay", "raise", "stop")
ON_NONFINITE = ("raise", "stop")


class CapacityError(RuntimeError):
  """A batch had more active neurons (or index candidates) than the static capacity."""


class _Stop:
  """The type of ``STOP`` (one instance)."""

  __slots__ = ()

  def __repr__(self) -> str:
    return "kronjax.STOP"

  def __reduce__(self) -> str:
    return "STOP"   # unpickles as the one instance


STOP = _Stop()
"""What a ``fit`` callback returns to end the run after the current step (``True`` does too)."""


class StepInfo(NamedTuple):
  """What a ``fit`` callback is called with, every ``callback_every`` global steps.

  Attributes:
    step: the global step count after the step just taken (``state.step``; the
      history records the step under this number).
    state: the state after that step. Valid until the next step, which donates
      its buffers: keep a copy (``jax.tree.map(jnp.copy, info.state)``) to hold
      on to it. Stacked for ``kronjax.sweep.fit``.
    metrics: that step's metrics as host numpy values (``loss``, ``active``,
      ``max_active``, ...; ``(S,)`` arrays for a sweep).
    history: the history so far as ``fit`` would return it (a read-only
      mapping, built on first access, as it stood at this call).
  """

  step: int
  state: TrainState
  metrics: dict[str, Any]
  history: Mapping[str, Any]


class _LazyHistory(Mapping):
  """A read-only mapping that builds the history only when a callback reads it."""

  def __init__(self, build: Callable[[], dict[str, Any]]):
    self._build, self._value = build, None

  def _get(self) -> dict[str, Any]:
    if self._value is None:
      self._value = self._build()
    return self._value

  def __getitem__(self, k):
    return self._get()[k]

  def __iter__(self):
    return iter(self._get())

  def __len__(self):
    return len(self._get())

  def __repr__(self) -> str:
    return f"StepInfo.history({self._get()!r})"


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything ``train`` is told besides the state, dataset and key (``fit``'s arguments).

  Validated on construction; ``steps`` is resolved from ``epochs`` by ``schedule``.
  """

  batch_size: int
  steps: int | None = None
  epochs: int | None = None
  progress: bool = True
  eval_every: int = 0
  log_every: int = 1
  on_overflow: str = "replay"
  on_nonfinite: str = "raise"
  checkpoint_dir: Any = None
  checkpoint_every: int = 0
  keep: int = 2
  resume: bool = False
  resync_every: int = 0
  callbacks: Any = ()
  callback_every: int = 1
  verify_every: int = 0

  def __post_init__(self):
    checks.check_positive_int("batch_size", self.batch_size)
    if (self.steps is None) == (self.epochs is None):
      raise ValueError("pass exactly one of steps= or epochs=.")
    for name in ("steps", "epochs"):
      if getattr(self, name) is not None:
        checks.check_positive_int(name, getattr(self, name))
    checks.check_choice("on_overflow", self.on_overflow, ON_OVERFLOW)
    checks.check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
    for name in ("eval_every", "checkpoint_every", "resync_every", "verify_every"):
      checks.check_positive_int(name, getattr(self, name), minimum=0)
    checks.check_positive_int("log_every", self.log_every)
    checks.check_positive_int("callback_every", self.callback_every)
    object.__setattr__(self, "callbacks", check_callbacks(self.callbacks))
    checks.check_positive_int("keep", self.keep)
    for name in ("progress", "resume"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")
    if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
      raise ValueError("checkpoint_every / resume were set without checkpoint_dir; pass the "
                       "directory to save into (and resume from).")

  def schedule(self, n: int) -> tuple[int, int]:
    """``(batch_size, steps)`` for ``n`` points (an epoch is ``n // batch_size`` steps)."""
    if self.batch_size > n:
      raise ValueError(f"batch_size must be in [1, n={n}], got {self.batch_size}.")
    return self.batch_size, (self.steps if self.epochs is None
                             else self.epochs * (n // self.batch_size))


def check_callbacks(callbacks: Any) -> tuple[Callable[[StepInfo], Any], ...]:
  """``callbacks`` as a tuple of callables, else TypeError saying how to pass them."""
  if callable(callbacks):
    raise TypeError(f"callbacks must be a sequence of callables, got the single callable "
                    f"{_callback_name(callbacks)}; pass callbacks=({_callback_name(callbacks)},).")
  if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, (tuple, list)):
    raise TypeError(f"callbacks must be a tuple or list of callables (each called as cb(info) "
                    f"with a kronjax.StepInfo), got {type(callbacks).__name__}.")
  for i, cb in enumerate(callbacks):
    if not callable(cb):
      raise TypeError(f"callbacks[{i}] must be callable (called as cb(info) with a "
                      f"kronjax.StepInfo), got {type(cb).__name__} ({cb!r}).")
  return tuple(callbacks)


def _callback_name(cb: Any) -> str:
  return getattr(cb, "__qualname__", None) or getattr(cb, "__name__", None) or repr(cb)


# ----------------------------------------------------------------------------- schedule

def batch_schedule(key: jax.Array, n: int, batch_size: int, steps: int, *,
                   start: int = 0) -> np.ndarray:
  """Index batches ``(steps, batch_size)`` for global steps ``start .. start+steps-1``.

  Epoch ``e`` is a permutation drawn from ``fold_in(key, e)``, cut into
  ``n // batch_size`` full batches (the remainder of each epoch is dropped so every
  batch has the same static shape). Batch ``s`` depends only on ``(key, s)``, so a
  run resumed at step ``s`` sees exactly the batches the uninterrupted run saw,
  and every process of a multi-process run derives the same batches.
  """
  per_epoch = n // batch_size
  first, last = start // per_epoch, (start + steps - 1) // per_epoch
  out = []
  for e in range(first, last + 1):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
    out.append(perm[: per_epoch * batch_size].reshape(per_epoch, batch_size))
  offset = start - first * per_epoch
  return np.concatenate(out)[offset:offset + steps].astype(np.int32)


# ----------------------------------------------------------------------------- overflow

def grown_capacity(state: TrainState, max_active: int, batch: Any = None) -> dict[str, int]:
  """Capacities that fit the batch that overflowed: at least doubled, capped at m.

  A point's active set may have outgrown ``active_capacity``, or (bucketed
  index) its candidate list may have outgrown ``candidate_capacity`` at the last
  rebuild; the index says which, and only that capacity grows.
  """
  plan, m = state.resolved_plan, state.config.width
  need_cand = int(np.max(index_lib.needed_candidate_capacity(state.index, batch)))
  if need_cand > plan.candidate_capacity:
    return {"candidate_capacity": min(m, max(2 * plan.candidate_capacity, _round8(need_cand)))}
  return {"active_capacity": min(m, max(2 * plan.active_capacity, _round8(max_active)))}


def _round8(x: int) -> int:
  return -(-x // 8) * 8


def _overflow_message(state: TrainState, step_no: int, members: str, max_active: int,
                      batch: Any) -> str:
  plan = state.resolved_plan
  need_cand = int(np.max(index_lib.needed_candidate_capacity(state.index, batch)))
  if need_cand <= plan.candidate_capacity:
    return (f"step {step_no}{members}: a point of the batch has {max_active} active neurons, "
            f"more than active_capacity={plan.active_capacity}. Use "
            f"Plan(active_capacity>={max_active}) or on_overflow='replay' to grow it "
            "automatically.")
  return (f"step {step_no}{members}: a point's candidate list in the {state.index_kind!r} "
          f"threshold index holds {need_cand} neurons, more than candidate_capacity="
          f"{plan.candidate_capacity}. Use Plan(candidate_capacity>={need_cand}), a smaller "
          "index_delta, or on_overflow='replay'.")


# ----------------------------------------------------------------------------- the driver

class _Run:
  """The loop's mutable bookkeeping: which members still train and why the others stopped."""

  def __init__(self, runner: runners.Runner, member_steps: np.ndarray, start: int):
    self.runner = runner
    self.live = member_steps == start
    self.stopped: list[str | None] = [None if ok else f"stopped earlier, at step {s}"
                                      for ok, s in zip(self.live, member_steps)]

  def members(self, who: list[int], prefix: str = "") -> str:
    return "" if self.runner.members is None else f"{prefix}sweep member(s) {who}"

  def stop(self, mask: np.ndarray, why: str) -> None:
    for i in np.flatnonzero(mask):
      self.stopped[i] = why
    self.live &= ~mask


def _fetch(metrics: dict[str, Any]) -> dict[str, np.ndarray]:
  # One transfer for all metrics: each scalar's own fetch costs a round trip.
  return {k: np.atleast_1d(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _replay_overflow(run: _Run, state: TrainState, dataset: Dataset, batch: jax.Array,
                     metrics: dict[str, np.ndarray], global_step: int, options: Options,
                     log: History, bar: Any) -> tuple[TrainState, dict[str, np.ndarray]]:
  """Handles the members whose step overflowed (they skipped it; the others took it):
  raise, stop them, or grow the plan's capacity and re-run the batch for them only
  from their unchanged state, until none overflows."""
  runner = run.runner
  pending = metrics["overflow"] & run.live
  while pending.any():
    who = np.flatnonzero(pending).tolist()
    max_active = int(metrics["max_active"][pending].max())
    if options.on_overflow == "raise":
      label = "" if runner.members is None else f" ({run.members(who)})"
      raise CapacityError(_overflow_message(state, global_step, label, max_active, batch))
    if options.on_overflow == "stop":
      run.stop(pending, f"overflow at step {global_step}")
      break
    changes = grown_capacity(state, max_active, batch)
    plan = state.resolved_plan
    if all(getattr(plan, k) == v for k, v in changes.items()):
      raise CapacityError(f"step {global_step}: {run.members(who)} overflow(s) at "
                          f"the largest capacity ({changes}).")
    log.replays.append((global_step, changes) if runner.members is None
                       else (global_step, changes, who))
    bar.write(f"{runner.name}: overflow at step {global_step}{run.members(who, ' of ')}; "
              f"replaying with {changes}")
    state = runner.regrow(state, changes)
    state, again = runner.step(state, dataset, batch,
                               None if pending.all() else jnp.asarray(pending))
    again = _fetch(again)
    metrics = {k: np.where(pending, again[k], v) for k, v in metrics.items()}
    pending = again["overflow"] & pending
  return state, metrics


def _check_finite(run: _Run, metrics: dict[str, np.ndarray], global_step: int,
                  options: Options) -> None:
  bad = run.live & ~np.isfinite(metrics["loss"])
  if not bad.any():
    return
  who = np.flatnonzero(bad).tolist()
  if options.on_nonfinite == "raise":
    raise FloatingPointError(
        f"the loss became non-finite ({metrics['loss'][bad][0]}) at step {global_step}"
        f"{run.members(who, ' for ')}; the learning rate is most likely too large "
        "for this width and threshold, or the inputs are not unit-norm (see "
        "KronData.normalize). Lower the learning rate and start again from the state you "
        "passed in; on_nonfinite='stop' freezes such members instead.")
  run.stop(bad, f"non-finite loss at step {global_step}")


def train(runner: runners.Runner, state: TrainState, dataset: Dataset, key: jax.Array,
          options: Options) -> tuple[TrainState, dict[str, Any]]:
  """The loop behind ``kronjax.fit`` and ``kronjax.sweep.fit`` (see ``fit`` for the options)."""
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset)
  key = check_key("key", key)
  n = dataset.n
  batch_size, steps = options.schedule(n)
  S = runner.members or 1
  # Members behind the others stopped in an earlier run (on_*="stop"): they stay frozen.
  target = int(np.max(np.asarray(state.step))) + steps
  log = History(S)
  state, dataset = runner.prepare(state, dataset)
  checkpoint_dir = None
  if options.checkpoint_dir is not None:
    checkpoint_dir = pathlib.Path(options.checkpoint_dir)
    if options.resume and checkpoint.latest_step(checkpoint_dir) is not None:
      # Straight into the runner's layout (sharded: each process reads its own shards).
      state, meta = checkpoint.load(checkpoint_dir, like=state)
      _check_resumable(meta, key, batch_size, checkpoint_dir)
      log = History.restore(S, meta.get("history", {}))
  start = int(np.max(np.asarray(state.step)))
  if start > target:
    raise ValueError(f"the checkpoint in {str(checkpoint_dir)!r} is at step {start}, past the "
                     f"{target} steps asked for.")
  steps = target - start
  batches = batch_schedule(key, n, batch_size, steps, start=start) if steps else None
  # Saves are asynchronous; the manager is closed (every save committed) before train returns.
  writer = None if checkpoint_dir is None else checkpoint.Manager(checkpoint_dir,
                                                                  keep=options.keep)
  run = _Run(runner, np.atleast_1d(np.asarray(state.step)), start)
  bar = progress_bar(target, start, options.progress, runner.name)
  t_start = time.perf_counter()
  done = 0
  try:
    for t in range(steps):
      global_step = start + t
      batch = jnp.asarray(batches[t])
      live = run.live
      state, metrics = runner.step(state, dataset, batch, None if live.all() else jnp.asarray(live))
      metrics = _fetch(metrics)
      if metrics["invalid_batch"].any():
        bad = np.asarray(batches[t])
        raise ValueError(f"step {global_step}: batch holds indices outside [0, {n}): "
                         f"{sorted(set(bad[(bad < 0) | (bad >= n)].tolist()))}.")
      if metrics["wrong_dataset"].any():
        raise ValueError(f"step {global_step}: the dataset is not the one the state was built "
                         "from (fingerprints differ); pass the dataset given to kronjax.init.")
      state, metrics = _replay_overflow(run, state, dataset, batch, metrics, global_step,
                                        options, log, bar)
      _check_finite(run, metrics, global_step, options)
      done += 1
      if options.resync_every and (global_step + 1) % options.resync_every == 0:
        state = runner.resync(state, dataset)
      # Cadences follow the global step: a resumed run logs and evaluates where
      # the uninterrupted run does.
      last = t + 1 == steps
      if (global_step + 1) % options.log_every == 0 or last:
        log.add(global_step + 1, metrics, run.live)
      if not run.live.any():
        bar.write(f"{runner.name}: every member stopped at step {global_step}.")
        break
      if options.eval_every and ((global_step + 1) % options.eval_every == 0 or last):
        log.add_eval(global_step + 1, jax.device_get(runner.evaluate(state, dataset)), run.live)
      if options.verify_every and ((global_step + 1) % options.verify_every == 0 or last):
        verify_lib.check(state, dataset, global_step + 1, members=runner.members is not None)
      stop = False
      if options.callbacks and ((global_step + 1) % options.callback_every == 0 or last):
        def history(marks=log.marks(), stopped=list(run.stopped), done=done,
                    seconds=time.perf_counter() - t_start):
          return _history(log.upto(marks), run, start, done, seconds, stopped)
        info = StepInfo(step=global_step + 1, state=state, metrics=_host_metrics(runner, metrics),
                        history=_LazyHistory(history))
        stop = _call_callbacks(options.callbacks, info, log)
      if stop:
        # The run ends here: the history is that of this step, as if it were the last.
        if not log.step or log.step[-1] != global_step + 1:
          log.add(global_step + 1, metrics, run.live)
        if options.eval_every and (not log.eval_step or log.eval_step[-1] != global_step + 1):
          log.add_eval(global_step + 1, jax.device_get(runner.evaluate(state, dataset)),
                       run.live)
        run.stop(run.live.copy(), f"stopped by callback at step {global_step + 1}")
      if writer is not None and (last or stop or (
          options.checkpoint_every and (global_step + 1) % options.checkpoint_every == 0)):
        writer.save(state, {"fit_key": key, "batch_size": batch_size, "history": log.encode()})
      if stop:
        bar.write(f"{runner.name}: stopped by callback at step {global_step + 1}.")
        break
      bar.update(1)
      if (t + 1) % 10 == 0 or last:
        loss = (np.nanmin(np.where(run.live, metrics["loss"], np.nan)) if run.live.any()
                else np.nan)
        rate = done / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(loss=f"{loss:.4g}", active=f"{float(np.mean(metrics['active'])):.1f}",
                        steps_s=f"{rate:.1f}", refresh=False)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  return state, _history(log, run, start, done, time.perf_counter() - t_start)


def _history(log: History, run: _Run, start: int, done: int, seconds: float,
             stopped: list | None = None) -> dict[str, Any]:
  """The history ``fit`` returns (and a callback's ``StepInfo.history``)."""
  members = run.runner.members
  stopped = run.stopped if stopped is None else stopped
  out = log.result(squeeze=members is None)
  out["stopped"] = list(stopped) if members is not None else stopped[0]
  out["seconds"] = seconds
  out["steps_per_second"] = done / seconds if seconds > 0 else float("inf")
  out["resumed_from"] = start
  return out


def _host_metrics(runner: runners.Runner, metrics: dict[str, np.ndarray]) -> dict[str, Any]:
  """A step's metrics for a callback: numpy scalars for one run, ``(S,)`` arrays for a sweep."""
  if runner.members is not None:
    return {k: v.copy() for k, v in metrics.items()}
  return {k: v[0] for k, v in metrics.items()}


def _is_bool_scalar(x: Any) -> bool:
  """A numpy or JAX boolean scalar (``info.metrics["loss"] < 0.01``)."""
  return (isinstance(x, (np.ndarray, np.bool_, jax.Array)) and np.ndim(x) == 0
          and np.dtype(x.dtype) == np.bool_)


def _call_callbacks(callbacks: tuple, info: StepInfo, log: History) -> bool:
  """Calls every callback with ``info``, records the metrics they return; True to stop."""
  stop = False
  recorded: dict[str, np.ndarray] = {}
  for cb in callbacks:
    out = cb(info)
    if out is None or out is False:
      continue
    if out is STOP or out is True or _is_bool_scalar(out):
      stop = stop or bool(out)
      continue
    if isinstance(out, Mapping):
      for name, value in out.items():
        if not isinstance(name, str):
          raise TypeError(f"callback {_callback_name(cb)} returned a metric named {name!r}; "
                          "metric names must be str.")
        if name in recorded:
          raise ValueError(f"two callbacks returned the metric {name!r} at step {info.step}; "
                           "give each metric its own name.")
        try:
          recorded[name] = np.asarray(jax.device_get(value), np.float64)
        except (TypeError, ValueError) as e:
          raise TypeError(f"callback {_callback_name(cb)} returned the metric {name!r} = "
                          f"{value!r}, which is not a number or numeric array.") from e
      continue
    raise TypeError(f"callback {_callback_name(cb)} returned {type(out).__name__} ({out!r}); a "
                    "callback returns None (go on), kronjax.STOP or True (stop after this step), "
                    "or a dict of metrics to record in history['callback'].")
  log.add_callback(info.step, recorded)
  return stop


def _check_resumable(meta: dict, key: jax.Array, batch_size: int, directory: pathlib.Path) -> None:
  saved = np.asarray(_key_data(meta.get("fit_key")))
  if not np.array_equal(saved, np.asarray(_key_data(key))) or meta.get("batch_size") != batch_size:
    raise ValueError(f"the checkpoint in {str(directory)!r} was written by a run with another "
                     "batch key or batch size; resume with the run's own key and batch_size "
                     "(or start afresh in another directory).")


def _key_data(key: Any) -> Any:
  if hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


# ----------------------------------------------------------------------------- kronjax.fit

def fit(state: TrainState, dataset: Dataset, key: jax.Array, *, batch_size: int,
        steps: int | None = None, epochs: int | None = None, progress: bool = True,
        eval_every: int = 0, log_every: int = 1, on_overflow: str = "replay",
        on_nonfinite: str = "raise", mesh: Any = None, checkpoint_dir: Any = None,
        checkpoint_every: int = 0, keep: int = 2, resume: bool = False,
        resync_every: int = 0, callbacks: Any = (), callback_every: int = 1,
        verify_every: int = 0) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``state`` on ``dataset`` with shuffled mini-batches; returns ``(state, history)``.

  Args:
    state: from ``kronjax.init`` for this dataset. It is not modified (the loop
      trains a copy).
    dataset: the ``kronjax.Dataset`` the state was built from.
    key: PRNG key for the batch order (``batch_schedule``). Batches are indexed
      by the state's global step, so calling ``fit`` again on the returned
      state (or a restored checkpoint) with the same key continues the sequence.
    batch_size: points per step, in ``[1, n]``.
    steps / epochs: how many more steps to train (exactly one of them).
    progress: show a tqdm bar with loss, active neurons and steps per second.
    eval_every: evaluate every this many steps (and at the end); 0 disables.
    log_every: record the metrics every this many steps (and at the end).
    on_overflow / on_nonfinite: the policies of the module docstring
      (defaults ``"replay"`` and ``"raise"``).
    mesh: a ``jax.sharding.Mesh``: train with neurons sharded over its devices
      (``kronjax.sharding``); the returned state is sharded.
    checkpoint_dir / checkpoint_every / keep: save the state every this many
      global steps and at the end, keeping the newest ``keep`` checkpoints
      (``kronjax.checkpoint``); the history so far rides along. Saves run in
      the background while training goes on (``fit`` returns once the last one
      is committed); under a mesh every process writes its own shards.
    resume: continue from the newest checkpoint in ``checkpoint_dir`` if there
      is one (it must come from a run with this key and batch size, and
      ``state`` serves as its template): the run ends at the step it would
      have reached uninterrupted, ``state.step + steps``, bit for bit, and the
      history covers every step. A checkpoint written on another number of
      devices or processes is restored onto this run's layout.
    resync_every: recompute ``P`` exactly from ``A`` (``kronjax.resync``) every
      this many global steps; 0 (default) never. Worth it only for long float32
      runs (``kronjax.resync`` says what it costs and when it helps).
    callbacks: a tuple of callables, each called as ``cb(info)`` with a
      ``kronjax.StepInfo`` (``step``, ``state``, ``metrics``, ``history``) every
      ``callback_every`` global steps and after the last step. A callback returns
      None to go on, ``kronjax.STOP`` (or True) to end the run after this step
      (the state and history returned are this step's; ``history["stopped"]``
      says ``"stopped by callback at step k"``; with a ``checkpoint_dir`` it is
      saved), or a dict of numbers (or arrays) recorded under
      ``history["callback"][name]``, one row per call at ``history["callback_step"]``
      (NaN where a name was not returned). The cadence follows the global step and
      the record rides in the checkpoints, so a resumed run calls and records as
      the uninterrupted one.
    callback_every: call the callbacks every this many global steps (default 1).
    verify_every: check ``P`` against ``s W0 X^T + A K`` (``kronjax.verify``, 256
      sampled points) every this many global steps and at the end; raises
      ``FloatingPointError`` naming the step when the relative error passes
      ``1e-3`` (float32) / ``1e-9`` (float64). 0 (default) never.

  Returns:
    The trained state and a history of numpy arrays: ``step``, ``loss``,
    ``active``, ``max_active``, ``index_rebuilds`` ``(T,)``; with
    ``eval_every``, ``eval_step`` plus one array per ``kronjax.evaluate``
    metric; ``replays`` (list of ``(global step, changes)``), ``stopped``
    (None, or why training stopped), ``seconds``, ``steps_per_second`` and
    ``resumed_from``; with ``callbacks``, ``callback_step`` ``(T_c,)`` and
    ``callback`` (``{name: (T_c, ...)}``).

  Raises:
    FloatingPointError when the loss becomes non-finite (``on_nonfinite="raise"``)
    or ``verify_every`` finds ``P`` off; CapacityError on overflow with
    ``on_overflow="raise"``. The caller's state is untouched either way.
    TypeError for a stacked sweep state (``kronjax.sweep.fit`` trains those).
  """
  network.check_single_state(state)
  options = Options(batch_size=batch_size, steps=steps, epochs=epochs, progress=progress,
                    eval_every=eval_every, log_every=log_every, on_overflow=on_overflow,
                    on_nonfinite=on_nonfinite, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, keep=keep, resume=resume,
                    resync_every=resync_every, callbacks=callbacks,
                    callback_every=callback_every, verify_every=verify_every)
  if mesh is not None and verify_every:
    raise ValueError("verify_every is not available with mesh= (the check needs the whole P on "
                     "one device); verify the result with "
                     "kronjax.verify(kronjax.sharding.unshard_state(state), dataset).")
  runner = runners.Single() if mesh is None else runners.Sharded(mesh)
  return train(runner, state, dataset, key, options)
