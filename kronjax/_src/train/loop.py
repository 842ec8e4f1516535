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
  * divergence (``divergence_factor``, default 1e6): a finite loss past that
    many times its largest value over the run's first ``DIVERGENCE_WINDOW``
    steps is treated as ``on_nonfinite`` says (the step was taken).
  * a member that stopped is frozen (masked steps) and reported in
    ``history["stopped"]``; when every member has stopped the loop ends early.

Chunks: the runner's ``chunk`` takes up to ``chunk`` steps (default ``"auto"``:
``runners.CHUNK_LIMIT``, paced to about ``_SECONDS_PER_DISPATCH``) in one
compiled ``lax.while_loop``. A chunk never
crosses a step the host must see the state at (``_Chunks``: evaluation,
verification, callbacks, checkpoints, resync, the end of the divergence window),
and the loop inside ends after the first step a live member skipped or diverged
at, so the host handles that step exactly as one step per dispatch would. Each
step in the loop is the same compiled step, so the run is bit-identical to
``chunk=1``. The sharded runner steps one batch per dispatch.

Hooks: ``callbacks`` are called every ``callback_every`` global steps (and at
the end) with a ``StepInfo``; one returning ``STOP`` (or True) ends the run after
that step, one returning a dict has it recorded in ``history["callback"]``.
``verify_every`` checks ``P`` against the weights (``kronjax.verify``) and raises
``FloatingPointError`` when they disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.base import compilations
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
  chunk: int | str = "auto"
  divergence_factor: float = 1e6

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
    if self.chunk != "auto":
      if isinstance(self.chunk, str):
        raise ValueError(f"chunk must be 'auto' or a positive int (the most steps per "
                         f"dispatch; 1 steps one batch at a time), got {self.chunk!r}.")
      checks.check_positive_int("chunk", self.chunk)
    _check_divergence_factor(self.divergence_factor)
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


def _check_divergence_factor(factor: Any) -> None:
  if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)):
    raise TypeError(f"divergence_factor must be a number (0 turns the check off), got "
                    f"{type(factor).__name__} ({factor!r}).")
  if not (factor == 0 or 1 < factor < np.inf):
    raise ValueError(f"divergence_factor must be 0 (no check) or a finite number > 1 (how many "
                     f"times its early largest value the loss may grow to), got {factor!r}.")


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
  orders = _epoch_orders(key, np.arange(first, last + 1), n)
  out = orders[:, :per_epoch * batch_size].reshape(-1, batch_size)
  offset = start - first * per_epoch
  return out[offset:offset + steps].astype(np.int32)


_ORDERS_PER_DISPATCH = 64


def _epoch_orders(key: jax.Array, epochs: np.ndarray, n: int) -> np.ndarray:
  """``(E, n)``: epoch ``e``'s order is ``jax.random.permutation(fold_in(key, e), n)``.

  Computed as that function defines it: ``rounds`` stable sorts of the order by fresh
  32-bit keys (``_sort_rounds``), each round's keys from ``split``. The keys are drawn
  on the device, up to 64 epochs per dispatch (padded to a power of two: one
  compilation per size and ``n``); the sorts run on the host, where a stable argsort
  of 32-bit keys costs a fraction of XLA CPU's comparator sort (which made the
  schedule a few per cent of a batch-1 run's time).
  """
  rounds = _sort_rounds(n)
  order = np.broadcast_to(np.arange(n, dtype=np.int32), (len(epochs), n))
  parts = []
  for lo in range(0, len(epochs), _ORDERS_PER_DISPATCH):
    part = epochs[lo:lo + _ORDERS_PER_DISPATCH]
    padded = np.resize(part, 1 << (len(part) - 1).bit_length())
    parts.append(_sort_keys(key, padded.astype(np.int32), n, rounds)[:len(part)])
  keys = np.concatenate([np.asarray(p) for p in parts])             # (E, rounds, n)
  for r in range(rounds):
    order = np.take_along_axis(order, np.argsort(keys[:, r], axis=-1, kind="stable"), axis=-1)
  return order


def _sort_rounds(n: int) -> int:
  """The sorts ``jax.random.permutation`` makes of ``n`` items (random 32-bit keys may
  collide; each round's fresh keys make a tie that survives all rounds unlikely)."""
  return int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sort_keys(key: jax.Array, epochs: jax.Array, n: int, rounds: int) -> jax.Array:
  """``(E, rounds, n)`` uint32: the sort keys of each epoch's rounds."""
  def epoch(e):
    k, out = jax.random.fold_in(key, e), []
    for _ in range(rounds):
      k, sub = jax.random.split(k)
      out.append(jax.random.bits(sub, (n,), jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0, n), jnp.uint32)
  return jax.vmap(epoch)(epochs)


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


def _replay_overflow(run: _Run, state: TrainState, dataset: Dataset, batch: np.ndarray,
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
    state, again = runner.step(state, dataset, jnp.asarray(batch),
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


# ----------------------------------------------------------------------------- divergence

DIVERGENCE_WINDOW = 10
"""Steps whose largest loss is the reference of the divergence check."""


class _Divergence:
  """The divergence check: a member's loss past ``factor`` times its largest finite
  loss over the first ``DIVERGENCE_WINDOW`` steps of the run (``(S,)`` reference).

  ``until`` is the global step count that ends the reference window; the check
  applies to the steps after it. The reference rides in the checkpoints, so a
  resumed run checks against the uninterrupted run's.
  """

  def __init__(self, factor: float, members: int, start: int, saved: Any = None):
    self.factor = float(factor)
    self.until = start + DIVERGENCE_WINDOW
    self.reference = np.zeros(members)
    if saved:
      self.until = int(np.asarray(saved["until"]))
      self.reference = np.asarray(saved["reference"], np.float64).reshape(members)

  def observe(self, counts: np.ndarray, loss: np.ndarray, live: np.ndarray) -> None:
    """Takes in the losses ``(T, S)`` of the steps ending at ``counts`` ``(T,)``."""
    inside = (counts <= self.until)[:, None] & live & np.isfinite(loss)
    if inside.any():
      self.reference = np.maximum(self.reference, np.max(np.where(inside, loss, 0.0), axis=0))

  def limit(self, count: int, dtype: Any) -> np.ndarray:
    """``(S,)``: the loss past which a member diverges at the step ending at ``count``."""
    if not self.factor or count <= self.until:
      return np.full(self.reference.shape, np.inf, dtype)
    return np.where(self.reference > 0, self.factor * self.reference, np.inf).astype(dtype)

  def encode(self) -> dict[str, Any]:
    return {"until": self.until, "reference": self.reference}


def _check_divergence(run: _Run, check: _Divergence, metrics: dict[str, np.ndarray],
                      global_step: int, options: Options, dtype: Any) -> None:
  loss = metrics["loss"]
  limit = check.limit(global_step + 1, dtype)   # the chunk's own limit, compared alike
  bad = run.live & np.isfinite(loss) & (loss > limit)
  if not bad.any():
    return
  who = np.flatnonzero(bad).tolist()
  if options.on_nonfinite == "raise":
    i = who[0]
    raise FloatingPointError(
        f"the loss grew to {loss[i]:.4g} at step {global_step}{run.members(who, ' for ')}, more "
        f"than divergence_factor={check.factor:g} times its largest value over the first "
        f"{DIVERGENCE_WINDOW} steps ({check.reference[i]:.4g}): training is diverging. The "
        "learning rate is most likely too large for this width and threshold, or the inputs "
        "are not unit-norm: build the Dataset with normalize=True, or lower the learning "
        "rate, and start again from the state you passed in; on_nonfinite='stop' freezes "
        "such members instead, divergence_factor=0 turns this check off.")
  run.stop(bad, f"diverging loss at step {global_step}")


# ----------------------------------------------------------------------------- chunks

_MAX_CHUNK_INDICES = 1 << 16
"""Cap on a chunk's stacked batch indices ``(K, B)`` (256 KiB of int32)."""


class _Chunks:
  """How many steps each dispatch takes: up to ``size`` (the compiled chunk's
  static length), never past a step the host must see the state at (evaluation,
  verification, callbacks, checkpoints, resync, the end of the divergence window),
  so every cadence lands on the global step it lands on one step at a time.

  With ``chunk="auto"`` a dispatch also takes about ``_SECONDS_PER_DISPATCH`` of
  steps at most (``observe`` paces it from the last chunk's time), so that the
  progress bar and an interrupt are answered within that time whatever a step
  costs; the chunk's step count is an argument of the compiled loop, so pacing
  never recompiles.
  """

  def __init__(self, runner: runners.Runner, options: Options, steps: int, batch_size: int,
               until: int, checkpointing: bool):
    most = min(runners.CHUNK_LIMIT if options.chunk == "auto" else options.chunk,
               runner.chunk_limit)
    most = min(most, max(1, _MAX_CHUNK_INDICES // batch_size))
    # Rounded up to a power of two so runs of other lengths share one compilation.
    self.size = max(1, min(most, 1 << max(steps - 1, 0).bit_length()))
    self.paced = options.chunk == "auto"
    self.pace = self.size
    self.every = [e for e, on in ((options.eval_every, True), (options.verify_every, True),
                                  (options.resync_every, True),
                                  (options.checkpoint_every, checkpointing),
                                  (options.callback_every, bool(options.callbacks))) if on and e]
    self.until = until if options.divergence_factor else 0

  def length(self, done: int, left: int) -> int:
    """Steps in the chunk after global step count ``done`` with ``left`` steps to go."""
    end = done + min(self.pace, left)
    for e in self.every:
      end = min(end, (done // e + 1) * e)
    if done < self.until:
      end = min(end, self.until)
    return end - done

  def observe(self, taken: int, seconds: float, compiled: bool) -> None:
    """A chunk of ``taken`` steps took ``seconds`` (dispatch to metrics on the host);
    ``compiled``: XLA compiled something meanwhile, so its time says nothing of a step's."""
    if self.paced and not compiled:
      per_step = max(seconds, 1e-9) / taken
      # At least 2: a chunk of 1 would run the single compiled step, another compilation.
      self.pace = int(min(self.size, max(2.0, _SECONDS_PER_DISPATCH / per_step)))


_SECONDS_PER_DISPATCH = 0.25
"""``chunk="auto"``: the most time one dispatch of steps should take."""


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
  """``rows`` ``(k, B)`` as ``(size, B)``: the rows past ``k`` are never read."""
  out = np.zeros((size,) + rows.shape[1:], rows.dtype)
  out[:len(rows)] = rows
  return out


def _take_chunk(runner: runners.Runner, state: TrainState, dataset: Dataset,
                batches: np.ndarray, size: int, mask: jax.Array | None, limit: np.ndarray
                ) -> tuple[TrainState, dict[str, np.ndarray]]:
  """Up to ``len(batches)`` steps in one dispatch; the metrics of the steps run ``(T, S)``."""
  if len(batches) == 1:
    state, metrics = runner.step(state, dataset, jnp.asarray(batches[0]), mask)
    return state, {k: v[None] for k, v in _fetch(metrics).items()}
  state, stacked, taken = runner.chunk(state, dataset, _padded(batches, size),
                                       np.int32(len(batches)), mask, limit)
  stacked, taken = jax.device_get((stacked, taken))
  return state, {k: v[:int(taken)].reshape(int(taken), -1)
                 for k, v in runners.unpack(stacked).items()}


def _check_early_rows(rows: dict[str, np.ndarray], live: np.ndarray, limit: np.ndarray) -> None:
  """The chunk's steps before its last ended OK for every live member (the compiled loop
  ends after the first that did not): else the loop's invariant is broken, say so."""
  bad = live & ((rows["status"] != 0) | (rows["loss"] > limit))
  if bad.any():
    raise RuntimeError("kronjax internal error: a chunk of steps ran on past a step that "
                       f"needed the host (step {int(np.argwhere(bad)[0, 0])} of the chunk); "
                       "train with chunk=1 and report this.")


# ----------------------------------------------------------------------------- the loop

def train(runner: runners.Runner, state: TrainState, dataset: Dataset, key: jax.Array,
          options: Options) -> tuple[TrainState, dict[str, Any]]:
  """The loop behind ``kronjax.fit`` and ``kronjax.sweep.fit`` (see ``fit`` for the options).

  Steps run in chunks (``options.chunk``): the steps of a chunk but its last all
  ended ``OK`` for every live member and sit between two cadence points, so only
  their metrics reach the history; the last step is handled as one step at a time
  would (replay, policies, evaluation, callbacks, checkpoints).
  """
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
  saved_divergence = None
  state, dataset = runner.prepare(state, dataset)
  checkpoint_dir = None
  if options.checkpoint_dir is not None:
    checkpoint_dir = pathlib.Path(options.checkpoint_dir)
    if options.resume and checkpoint.latest_step(checkpoint_dir) is not None:
      # Straight into the runner's layout (sharded: each process reads its own shards).
      state, meta = checkpoint.load(checkpoint_dir, like=state)
      _check_resumable(meta, key, batch_size, checkpoint_dir)
      log = History.restore(S, meta.get("history", {}))
      saved_divergence = meta.get("divergence")
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
  divergence = _Divergence(options.divergence_factor, S, start, saved_divergence)
  chunks = _Chunks(runner, options, steps, batch_size, divergence.until, writer is not None)
  limit_dtype = np.dtype(state.a.dtype)
  bar = progress_bar(target, start, options.progress, runner.name)
  t_start = time.perf_counter()
  done = 0
  t = 0
  try:
    while t < steps:
      k = chunks.length(start + t, steps - t)
      live = run.live
      limit = divergence.limit(start + t + 1, limit_dtype)
      t_chunk, compiled = time.perf_counter(), compilations.count()
      state, rows = _take_chunk(runner, state, dataset, batches[t:t + k], chunks.size,
                                None if live.all() else jnp.asarray(live), limit)
      taken = len(rows["loss"])
      chunks.observe(taken, time.perf_counter() - t_chunk, compilations.count() != compiled)
      # Steps before the chunk's last: taken by every live member, no cadence among them.
      counts = np.arange(start + t + 1, start + t + taken)
      if taken > 1:
        early = {name: v[:-1] for name, v in rows.items()}
        _check_early_rows(early, live, limit)
        divergence.observe(counts, early["loss"], live)
        logged = (counts % options.log_every == 0)
        log.add_rows(counts[logged], {name: v[logged] for name, v in early.items()}, live)
        done += taken - 1
      t += taken
      global_step = start + t - 1
      metrics = {name: v[-1] for name, v in rows.items()}
      batch = batches[t - 1]
      if metrics["invalid_batch"].any():
        raise ValueError(f"step {global_step}: batch holds indices outside [0, {n}): "
                         f"{sorted(set(batch[(batch < 0) | (batch >= n)].tolist()))}.")
      if metrics["wrong_dataset"].any():
        raise ValueError(f"step {global_step}: the dataset is not the one the state was built "
                         "from (fingerprints differ); pass the dataset given to kronjax.init.")
      state, metrics = _replay_overflow(run, state, dataset, batch, metrics, global_step,
                                        options, log, bar)
      _check_finite(run, metrics, global_step, options)
      _check_divergence(run, divergence, metrics, global_step, options, limit_dtype)
      divergence.observe(np.array([global_step + 1]), metrics["loss"][None], run.live)
      done += 1
      if options.resync_every and (global_step + 1) % options.resync_every == 0:
        state = runner.resync(state, dataset)
      # Cadences follow the global step: a resumed run logs and evaluates where
      # the uninterrupted run does.
      last = t == steps
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
        if log.last_step() != global_step + 1:
          log.add(global_step + 1, metrics, run.live)
        if options.eval_every and (not log.eval_step or log.eval_step[-1] != global_step + 1):
          log.add_eval(global_step + 1, jax.device_get(runner.evaluate(state, dataset)),
                       run.live)
        run.stop(run.live.copy(), f"stopped by callback at step {global_step + 1}")
      if writer is not None and (last or stop or (
          options.checkpoint_every and (global_step + 1) % options.checkpoint_every == 0)):
        writer.save(state, {"fit_key": key, "batch_size": batch_size, "history": log.encode(),
                            "divergence": divergence.encode()})
      if stop:
        bar.write(f"{runner.name}: stopped by callback at step {global_step + 1}.")
        break
      bar.update(taken)
      if t // 10 != (t - taken) // 10 or last:
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
        verify_every: int = 0, chunk: int | str = "auto",
        divergence_factor: float = 1e6) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``state`` on ``dataset`` with shuffled mini-batches; returns ``(state, history)``.

  Steps run in chunks of up to 4096 inside one compiled loop (``chunk``), ending
  where evaluation, verification, callbacks, checkpoints or resyncs fall due, so
  every cadence lands on the global step it names. The result is bit for bit
  that of one step per dispatch (``chunk=1``).

  Args:
    state: From ``kronjax.init`` for this dataset. It is not modified (the loop
      trains a copy).
    dataset: The ``kronjax.Dataset`` the state was built from.
    key: PRNG key for the batch order (``batch_schedule``). Batches are indexed
      by the state's global step, so calling ``fit`` again on the returned
      state (or a restored checkpoint) with the same key continues the sequence.
    batch_size: Points per step, in ``[1, n]``.
    steps: How many more steps to train. Pass exactly one of ``steps`` and ``epochs``.
    epochs: How many more epochs to train (an epoch is ``n // batch_size`` steps).
    progress: Show a tqdm bar with loss, active neurons and steps per second.
    eval_every: Evaluate every this many steps (and at the end); 0 disables.
    log_every: Record the metrics every this many steps (and at the end).
    on_overflow: When a point of the batch has more active neurons than the
      capacity (the step was skipped): ``"replay"`` (grow the capacity, one
      recompilation, and re-run the batch from the unchanged state),
      ``"raise"`` (``CapacityError``) or ``"stop"`` (end the run there).
    on_nonfinite: When the loss becomes NaN/inf or diverges (``divergence_factor``):
      ``"raise"`` (``FloatingPointError``) or ``"stop"`` (end the run there).
    mesh: A ``jax.sharding.Mesh``: train with neurons sharded over its devices
      (``kronjax.sharding``); the returned state is sharded. Steps one batch per
      dispatch (``chunk`` must be ``"auto"`` or 1).
    checkpoint_dir: Directory to save checkpoints into (``kronjax.checkpoint``);
      the history so far rides along. Saves run in the background while training
      goes on (``fit`` returns once the last one is committed); under a mesh every
      process writes its own shards.
    checkpoint_every: Save the state every this many global steps (and at the end).
    keep: How many of the newest checkpoints to keep.
    resume: Continue from the newest checkpoint in ``checkpoint_dir`` if there
      is one (it must come from a run with this key and batch size, and
      ``state`` serves as its template): the run ends at the step it would
      have reached uninterrupted, ``state.step + steps``, bit for bit, and the
      history covers every step. A checkpoint written on another number of
      devices or processes is restored onto this run's layout.
    resync_every: Recompute ``P`` exactly from ``A`` (``kronjax.resync``) every
      this many global steps; 0 (default) never. Worth it only for long float32
      runs (``kronjax.resync`` says what it costs and when it helps).
    callbacks: A tuple of callables, each called as ``cb(info)`` with a
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
    callback_every: Call the callbacks every this many global steps.
    verify_every: Check ``P`` against ``s W0 X^T + A K`` (``kronjax.verify``, 256
      sampled points) every this many global steps and at the end; raises
      ``FloatingPointError`` naming the step when the relative error passes
      ``1e-3`` (float32) / ``1e-9`` (float64). 0 (default) never.
    chunk: The most steps per dispatch: ``"auto"`` (up to 4096, and about 0.25 s
      of steps at most; fewer where a cadence above falls due or the stacked
      batch indices would pass 256 KiB)
      or a positive int (1: one compiled step per Python iteration). A chunk
      ends early after a step that overflowed, was skipped or diverged, which
      is then handled as on its own.
    divergence_factor: The loss may grow to at most this many times its
      largest value over the first 10 steps of the run; past it the run is
      diverging and ``on_nonfinite`` applies. 0 turns the check off.

  Returns:
    ``(state, history)``: the trained state and a dict of numpy arrays
      and values. ``step``, ``loss``, ``active``, ``max_active``,
      ``index_rebuilds`` are ``(T,)``; with ``eval_every``, ``eval_step`` and one
      array per ``kronjax.evaluate`` metric; ``replays`` is a list of
      ``(global step, changes)``; ``stopped`` is None or why training stopped;
      ``seconds``, ``steps_per_second`` and ``resumed_from``; with
      ``callbacks``, ``callback_step`` ``(T_c,)`` and ``callback``
      (``{name: (T_c, ...)}``).

  Raises:
    FloatingPointError: The loss became non-finite or diverged
      (``on_nonfinite="raise"``), or ``verify_every`` found ``P`` off. The
      caller's state is untouched.
    CapacityError: A batch overflowed with ``on_overflow="raise"``.
    TypeError: A stacked sweep state (``kronjax.sweep.fit`` trains those), or an
      argument of the wrong type.
    ValueError: An argument out of range, or a checkpoint to resume from that
      another run wrote.
  """
  network.check_single_state(state)
  options = Options(batch_size=batch_size, steps=steps, epochs=epochs, progress=progress,
                    eval_every=eval_every, log_every=log_every, on_overflow=on_overflow,
                    on_nonfinite=on_nonfinite, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, keep=keep, resume=resume,
                    resync_every=resync_every, callbacks=callbacks,
                    callback_every=callback_every, verify_every=verify_every, chunk=chunk,
                    divergence_factor=divergence_factor)
  if mesh is not None and verify_every:
    raise ValueError("verify_every is not available with mesh= (the check needs the whole P on "
                     "one device); verify the result with "
                     "kronjax.verify(kronjax.sharding.unshard_state(state), dataset).")
  if mesh is not None and chunk not in ("auto", 1):
    raise ValueError(f"chunk={chunk!r} is not available with mesh=: a neuron-sharded run steps "
                     "one batch per dispatch (every process must stay in lockstep); pass "
                     "chunk='auto' or 1.")
  runner = runners.Single() if mesh is None else runners.Sharded(mesh)
  return train(runner, state, dataset, key, options)
