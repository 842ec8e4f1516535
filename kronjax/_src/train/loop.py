"""The training loop: ``kronjax.fit``, ``kronjax.sweep.fit`` and the experiment runner all run it.

One driver, ``train``, owns everything around the compiled step: the batch
schedule, overflow replay, the non-finite-loss and invalid-batch policies,
evaluation and checkpoint cadence, resuming, the progress bar and the history.
What differs between a single run, a sweep of ``S`` stacked members and a
neuron-sharded run is a small ``Runner`` (how to prepare the state, step it,
evaluate it, change its static config and save it), in the spirit of diffrax's
policy objects: the loop itself is written once.

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
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.step import index as index_lib
from kronjax._src.data.dataset import Dataset
from kronjax._src.inference.inference import evaluate
from kronjax._src.step.state import TrainState, check_key, resync, with_config
from kronjax._src.step.step import check_batch, step

ON_OVERFLOW = ("replay", "raise", "stop")
ON_NONFINITE = ("raise", "stop")
HISTORY_KEYS = ("loss", "active", "max_active", "index_rebuilds")


class CapacityError(RuntimeError):
  """A batch had more active neurons (or index candidates) than the static capacity."""


# ----------------------------------------------------------------------------- the compiled step

def _unchecked_step(state: TrainState, dataset: Dataset, batch_idx: jax.Array):
  return step(state, dataset, batch_idx)


_jitted_step = jax.jit(_unchecked_step, donate_argnums=0)


def jit_train_step(state: TrainState, dataset: Dataset,
                   batch_idx: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """``kronjax.train_step``, jit-compiled, with ``state``'s buffers donated: the fast step.

  The input ``state`` is consumed (its arrays are reused for the output); keep
  using the returned one. Arguments are checked as ``train_step`` checks them.
  Compiles once per static configuration (config, optimizer, shapes).
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset)
  return _jitted_step(state, dataset, check_batch("batch_idx", batch_idx, state.n))


evaluate_jit = jax.jit(evaluate)
resync_jit = jax.jit(resync)


# ----------------------------------------------------------------------------- runners

class Runner(NamedTuple):
  """How the loop drives one kind of state (a single run, a sweep, a sharded run).

  ``members`` is None for a single state (metrics are scalars) or ``S`` for a
  stacked sweep (metrics are ``(S,)``). ``step(state, dataset, batch, mask)``
  runs the compiled step; ``mask`` ``(S,)`` bool (None: every member) says who
  takes it, the others keep their state bit for bit.
  """
  members: int | None
  prepare: Callable[[TrainState, Dataset], tuple[TrainState, Dataset]]
  step: Callable[..., tuple[TrainState, dict[str, Any]]]
  evaluate: Callable[[TrainState, Dataset], dict[str, Any]]
  with_config: Callable[..., TrainState]
  saveable: Callable[[TrainState], TrainState]
  resync: Callable[[TrainState, Dataset], TrainState]
  name: str = "kronjax.fit"


def copy_state(state: TrainState, dataset: Dataset) -> tuple[TrainState, Dataset]:
  # The compiled step donates its input: train a copy so the caller's state stays valid.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state), dataset


def single_runner() -> Runner:
  def run_step(state, dataset, batch, mask):
    del mask  # one member: the loop only steps it while it trains
    return _jitted_step(state, dataset, batch)

  return Runner(members=None, prepare=copy_state, step=run_step, evaluate=evaluate_jit,
                with_config=with_config, saveable=lambda s: s, resync=resync_jit)


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


def resolve_schedule(n: int, batch_size: Any, steps: Any, epochs: Any) -> tuple[int, int]:
  """Validates ``batch_size`` in ``[1, n]`` and exactly one of ``steps``/``epochs``;
  returns ``(batch_size, steps)`` (an epoch is ``n // batch_size`` steps)."""
  batch_size = checks.check_positive_int("batch_size", batch_size)
  if batch_size > n:
    raise ValueError(f"batch_size must be in [1, n={n}], got {batch_size}.")
  if (steps is None) == (epochs is None):
    raise ValueError("pass exactly one of steps= or epochs=.")
  if steps is None:
    return batch_size, checks.check_positive_int("epochs", epochs) * (n // batch_size)
  return batch_size, checks.check_positive_int("steps", steps)


# ----------------------------------------------------------------------------- overflow

def grown_capacity(state: TrainState, max_active: int, batch: Any = None) -> dict[str, int]:
  """Capacities that fit the batch that overflowed: at least doubled, capped at m.

  A point's active set may have outgrown ``active_capacity``, or (bucketed
  index) its candidate list may have outgrown ``candidate_capacity`` at the last
  rebuild; the index says which, and only that capacity grows.
  """
  config = state.config
  m = config.width
  need_cand = int(np.max(index_lib.needed_candidate_capacity(state.index, batch)))
  if need_cand > config.candidate_capacity:
    return {"candidate_capacity": min(m, max(2 * config.candidate_capacity, _round8(need_cand)))}
  return {"active_capacity": min(m, max(2 * config.active_capacity, _round8(max_active)))}


def _round8(x: int) -> int:
  return -(-x // 8) * 8


def _overflow_message(state: TrainState, step_no: int, who: list[int] | None, max_active: int,
                      batch: Any) -> str:
  config = state.config
  members = "" if who is None else f" (sweep members {who})"
  need_cand = int(np.max(index_lib.needed_candidate_capacity(state.index, batch)))
  if need_cand <= config.candidate_capacity:
    return (f"step {step_no}{members}: a point of the batch has {max_active} active neurons, "
            f"more than active_capacity={config.active_capacity}. Use "
            f"Config(active_capacity>={max_active}) or on_overflow='replay' to grow it "
            "automatically.")
  return (f"step {step_no}{members}: a point's candidate list in the {state.index_kind!r} "
          f"threshold index holds {need_cand} neurons, more than candidate_capacity="
          f"{config.candidate_capacity}. Use Config(candidate_capacity>={need_cand}), a smaller "
          "index_delta, or on_overflow='replay'.")


# ----------------------------------------------------------------------------- the driver

def train(runner: Runner, state: TrainState, dataset: Dataset, key: jax.Array, *,
          batch_size: int, steps: int | None = None, epochs: int | None = None,
          progress: bool = True, eval_every: int = 0, log_every: int = 1,
          on_overflow: str = "replay", on_nonfinite: str = "raise",
          checkpoint_dir: Any = None, checkpoint_every: int = 0, keep: int = 2,
          resume: bool = False, resync_every: int = 0) -> tuple[TrainState, dict[str, Any]]:
  """The loop behind ``kronjax.fit`` and ``kronjax.sweep.fit`` (see ``fit`` for the arguments)."""
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset)
  key = check_key("key", key)
  n = dataset.n
  batch_size, steps = resolve_schedule(n, batch_size, steps, epochs)
  checks.check_choice("on_overflow", on_overflow, ON_OVERFLOW)
  checks.check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
  eval_every = checks.check_positive_int("eval_every", eval_every, minimum=0)
  log_every = checks.check_positive_int("log_every", log_every)
  checkpoint_every = checks.check_positive_int("checkpoint_every", checkpoint_every, minimum=0)
  resync_every = checks.check_positive_int("resync_every", resync_every, minimum=0)
  if (checkpoint_every or resume) and checkpoint_dir is None:
    raise ValueError("checkpoint_every / resume were set without checkpoint_dir; pass the "
                     "directory to save into (and resume from).")
  S = runner.members or 1
  # Members behind the others stopped in an earlier run (on_*="stop"): they stay frozen.
  target = int(np.max(np.asarray(state.step))) + steps
  log = _History(S)
  state, dataset = runner.prepare(state, dataset)
  if checkpoint_dir is not None:
    from kronjax._src.dist import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    if resume and checkpoint.latest_step(checkpoint_dir) is not None:
      # Straight into the runner's layout (sharded: each process reads its own shards).
      state, meta = checkpoint.load(checkpoint_dir, like=state)
      _check_resumable(meta, key, batch_size, checkpoint_dir)
      log = _History.restore(S, meta.get("history", {}))
  start = int(np.max(np.asarray(state.step)))
  if start > target:
    raise ValueError(f"the checkpoint in {str(checkpoint_dir)!r} is at step {start}, past the "
                     f"{target} steps asked for.")
  steps = target - start
  batches = batch_schedule(key, n, batch_size, steps, start=start) if steps else None
  # Saves are asynchronous; the manager is closed (every save committed) before train returns.
  writer = None if checkpoint_dir is None else checkpoint.Manager(checkpoint_dir, keep=keep)
  member_steps = np.atleast_1d(np.asarray(state.step))
  live = member_steps == start
  stopped: list[str | None] = [None if ok else f"stopped earlier, at step {s}"
                               for ok, s in zip(live, member_steps)]
  bar = _progress_bar(target, start, progress, runner.name)
  t_start = time.perf_counter()
  done = 0
  try:
    for t in range(steps):
      global_step = start + t
      batch = jnp.asarray(batches[t])
      state, metrics = runner.step(state, dataset, batch, None if live.all() else jnp.asarray(live))
      # One transfer for all metrics: each scalar's own fetch costs ~0.4 ms on CPU.
      metrics = {k: np.atleast_1d(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
      if metrics["invalid_batch"].any():
        bad = np.asarray(batches[t])
        raise ValueError(f"step {global_step}: batch holds indices outside [0, {n}): "
                         f"{sorted(set(bad[(bad < 0) | (bad >= n)].tolist()))}.")
      pending = metrics["overflow"] & live
      while pending.any():  # the overflowing members skipped the step; the others took it
        who = np.flatnonzero(pending).tolist()
        max_active = int(metrics["max_active"][pending].max())
        if on_overflow == "raise":
          raise CapacityError(_overflow_message(state, global_step, _who(runner, who),
                                                max_active, batch))
        if on_overflow == "stop":
          for i in who:
            stopped[i] = f"overflow at step {global_step}"
          live &= ~pending
          break
        changes = grown_capacity(state, max_active, batch)
        if all(getattr(state.config, k) == v for k, v in changes.items()):
          raise CapacityError(f"step {global_step}: {_members_text(runner, who)} overflow(s) at "
                              f"the largest capacity ({changes}).")
        log.replays.append((global_step, changes) if runner.members is None
                           else (global_step, changes, who))
        bar.write(f"{runner.name}: overflow at step {global_step}{_members_text(runner, who, ' of ')}; "
                  f"replaying with {changes}")
        state = runner.with_config(state, **changes)
        state, again = runner.step(state, dataset, batch,
                                   None if pending.all() else jnp.asarray(pending))
        again = {k: np.atleast_1d(np.asarray(v)) for k, v in jax.device_get(again).items()}
        for k, v in again.items():
          metrics[k] = np.where(pending, v, metrics[k])
        pending = again["overflow"] & pending
      bad = live & ~np.isfinite(metrics["loss"])
      if bad.any():
        who = np.flatnonzero(bad).tolist()
        if on_nonfinite == "raise":
          raise FloatingPointError(
              f"the loss became non-finite ({metrics['loss'][bad][0]}) at step {global_step}"
              f"{_members_text(runner, who, ' for ')}; the learning rate is most likely too large "
              "for this width and threshold, or the inputs are not unit-norm (see "
              "KronData.normalize). Lower the learning rate and start again from the state you "
              "passed in; on_nonfinite='stop' freezes such members instead.")
        for i in who:
          stopped[i] = f"non-finite loss at step {global_step}"
        live &= ~bad
      done += 1
      if resync_every and (global_step + 1) % resync_every == 0:
        state = runner.resync(state, dataset)
      # Cadences follow the global step: a resumed run logs and evaluates where
      # the uninterrupted run does.
      if (global_step + 1) % log_every == 0 or t + 1 == steps:
        log.add(global_step + 1, metrics, live)
      if not live.any():
        bar.write(f"{runner.name}: every member stopped at step {global_step}.")
        break
      if eval_every and ((global_step + 1) % eval_every == 0 or t + 1 == steps):
        log.add_eval(global_step + 1, jax.device_get(runner.evaluate(state, dataset)), live)
      if checkpoint_dir is not None and (t + 1 == steps or (
          checkpoint_every and (global_step + 1) % checkpoint_every == 0)):
        writer.save(runner.saveable(state),
                    {"fit_key": key, "batch_size": batch_size, "history": log.encode()})
      bar.update(1)
      if (t + 1) % 10 == 0 or t + 1 == steps:
        loss = np.nanmin(np.where(live, metrics["loss"], np.nan)) if live.any() else np.nan
        rate = done / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(loss=f"{loss:.4g}", active=f"{float(np.mean(metrics['active'])):.1f}",
                        steps_s=f"{rate:.1f}", refresh=False)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  seconds = time.perf_counter() - t_start
  out = log.result(squeeze=runner.members is None)
  out["stopped"] = stopped if runner.members is not None else stopped[0]
  out["seconds"] = seconds
  out["steps_per_second"] = done / seconds if seconds > 0 else float("inf")
  out["resumed_from"] = start
  return state, out


def _who(runner: Runner, who: list[int]) -> list[int] | None:
  return None if runner.members is None else who


def _members_text(runner: Runner, who: list[int], prefix: str = "") -> str:
  return "" if runner.members is None else f"{prefix}sweep member(s) {who}"


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


class _History:
  """Per-step metrics ``(S, T)`` and eval metrics ``(S, T_e)``; NaN / -1 for stopped members."""

  def __init__(self, members: int):
    self.members = members
    self.step: list[int] = []
    self.values: dict[str, list[np.ndarray]] = {k: [] for k in HISTORY_KEYS}
    self.eval_step: list[int] = []
    self.eval_values: dict[str, list[np.ndarray]] = {}
    self.replays: list[tuple] = []

  def add(self, step_no: int, metrics: dict[str, np.ndarray], live: np.ndarray) -> None:
    self.step.append(step_no)
    for k in HISTORY_KEYS:
      v = metrics[k].astype(np.float64)
      self.values[k].append(np.where(live, v, np.nan if k in ("loss", "active") else -1))

  def add_eval(self, step_no: int, values: dict[str, Any], live: np.ndarray) -> None:
    self.eval_step.append(step_no)
    for k, v in values.items():
      self.eval_values.setdefault(k, []).append(
          np.where(live, np.atleast_1d(np.asarray(v, np.float64)), np.nan))

  def result(self, squeeze: bool) -> dict[str, Any]:
    def stacked(rows):
      arr = np.stack(rows, axis=1) if rows else np.zeros((self.members, 0))
      return arr[0] if squeeze else arr

    out: dict[str, Any] = {"step": np.asarray(self.step, np.int64)}
    for k in HISTORY_KEYS:
      out[k] = stacked(self.values[k])
      if k in ("max_active", "index_rebuilds") and squeeze:
        out[k] = out[k].astype(np.int64)
    if self.eval_step:
      out["eval_step"] = np.asarray(self.eval_step, np.int64)
      out.update({k: stacked(v) for k, v in self.eval_values.items()})
    out["replays"] = list(self.replays)
    return out

  def encode(self) -> dict[str, Any]:
    """The history so far as checkpoint metadata (arrays and JSON values)."""
    return {"step": np.asarray(self.step, np.int64),
            "values": {k: np.asarray(v).reshape(len(self.step), self.members)
                       for k, v in self.values.items()},
            "eval_step": np.asarray(self.eval_step, np.int64),
            "eval_values": {k: np.asarray(v).reshape(len(self.eval_step), self.members)
                            for k, v in self.eval_values.items()},
            "replays": [list(r) for r in self.replays]}

  @classmethod
  def restore(cls, members: int, saved: dict[str, Any]) -> "_History":
    out = cls(members)
    if not saved:
      return out
    out.step = [int(s) for s in np.asarray(saved["step"])]
    out.values = {k: list(np.asarray(v)) for k, v in saved["values"].items()}
    out.eval_step = [int(s) for s in np.asarray(saved["eval_step"])]
    out.eval_values = {k: list(np.asarray(v)) for k, v in saved["eval_values"].items()}
    out.replays = [tuple(r) for r in saved["replays"]]
    return out


class _NoBar:
  def update(self, k):
    pass

  def set_postfix(self, **kw):
    pass

  def write(self, msg):
    print(msg)

  def close(self):
    pass


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- kronjax.fit

def fit(state: TrainState, dataset: Dataset, key: jax.Array, *, batch_size: int,
        steps: int | None = None, epochs: int | None = None, progress: bool = True,
        eval_every: int = 0, log_every: int = 1, on_overflow: str = "replay",
        on_nonfinite: str = "raise", mesh: Any = None, checkpoint_dir: Any = None,
        checkpoint_every: int = 0, keep: int = 2, resume: bool = False,
        resync_every: int = 0) -> tuple[TrainState, dict[str, Any]]:
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

  Returns:
    The trained state and a history of numpy arrays: ``step``, ``loss``,
    ``active``, ``max_active``, ``index_rebuilds`` ``(T,)``; with
    ``eval_every``, ``eval_step`` plus one array per ``kronjax.evaluate``
    metric; ``replays`` (list of ``(global step, changes)``), ``stopped``
    (None, or why training stopped), ``seconds``, ``steps_per_second`` and
    ``resumed_from``.

  Raises:
    FloatingPointError when the loss becomes non-finite (``on_nonfinite="raise"``);
    CapacityError on overflow with ``on_overflow="raise"``. The caller's state
    is untouched either way.
  """
  if mesh is not None:
    from kronjax._src.dist import sharding  # pylint: disable=g-import-not-at-top
    runner = sharding.sharded_runner(mesh)
  else:
    runner = single_runner()
  return train(runner, state, dataset, key, batch_size=batch_size, steps=steps, epochs=epochs,
               progress=progress, eval_every=eval_every, log_every=log_every,
               on_overflow=on_overflow, on_nonfinite=on_nonfinite, checkpoint_dir=checkpoint_dir,
               checkpoint_every=checkpoint_every, keep=keep, resume=resume,
               resync_every=resync_every)
