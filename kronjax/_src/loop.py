"""``kronjax.fit``: the training loop users call.

Shuffled batches from an explicit key, a jit-compiled donated step, a progress
bar, periodic evaluation, overflow replay, and a history of plain numpy arrays.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src import checks
from kronjax._src import index as index_lib
from kronjax._src.inference import evaluate
from kronjax._src.state import TrainState, with_config
from kronjax._src.step import _step


class CapacityError(RuntimeError):
  """A batch had more active neurons (or index candidates) than the static capacity."""


_STEP_CACHE: dict[Any, Any] = {}


def compiled_step(donate: bool = True):
  """The jit-compiled step (donating the state's buffers unless ``donate=False``)."""
  key = ("step", donate)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(_step, donate_argnums=(0,) if donate else ())
  return _STEP_CACHE[key]


_evaluate_jit = jax.jit(evaluate)


def batch_schedule(key: jax.Array, n: int, batch_size: int, steps: int, *, start: int = 0) -> np.ndarray:
  """Index batches ``(steps, batch_size)`` for global steps ``start .. start+steps-1``.

  Epoch ``e`` is a permutation drawn from ``fold_in(key, e)``, cut into
  ``n // batch_size`` full batches (the remainder of each epoch is dropped so every
  batch has the same static shape). Batch ``s`` depends only on ``(key, s)``, so a
  run resumed at step ``s`` sees exactly the batches the uninterrupted run saw.
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


def grown_capacity(state: TrainState, metrics: dict[str, Any], batch: Any = None) -> dict[str, int]:
  """Capacities that fit the batch that overflowed: at least doubled, capped at m.

  A point's active set may have outgrown ``active_capacity``, or (bucketed
  index) its candidate list may have outgrown ``candidate_capacity`` at the last
  rebuild; the index says which, and only that capacity grows.
  """
  config = state.config
  m = config.width
  changes = {}
  need_cand = int(index_lib.needed_candidate_capacity(state.index, batch))
  if need_cand > config.candidate_capacity:
    changes["candidate_capacity"] = min(m, max(2 * config.candidate_capacity, _round8(need_cand)))
  else:
    need = int(metrics["max_active"])
    changes["active_capacity"] = min(m, max(2 * config.active_capacity, _round8(need)))
  return changes


def _round8(x: int) -> int:
  return -(-x // 8) * 8


def _overflow_message(state: TrainState, step: int, metrics: dict[str, Any], batch: Any = None) -> str:
  config = state.config
  need = int(metrics["max_active"])
  need_cand = int(index_lib.needed_candidate_capacity(state.index, batch))
  if need_cand <= config.candidate_capacity:
    return (f"step {step}: a point of the batch has {need} active neurons, more than "
            f"active_capacity={config.active_capacity}. Use Config(active_capacity>={need}) "
            "or fit(..., on_overflow='replay') to grow it automatically.")
  return (f"step {step}: a point's candidate list in the {state.index_kind!r} threshold index "
          f"holds {need_cand} neurons, more than candidate_capacity={config.candidate_capacity}. "
          f"Use Config(candidate_capacity>={need_cand}), a smaller index_delta, or "
          "on_overflow='replay'.")


def fit(state: TrainState, key: jax.Array, *, batch_size: int, steps: int | None = None,
        epochs: int | None = None, progress: bool = True, eval_every: int = 0,
        on_overflow: str = "replay", log_every: int = 1, mesh: Any = None,
        checkpoint_dir: Any = None, checkpoint_every: int = 0) -> tuple[TrainState, dict[str, Any]]:
  """Trains ``state`` with shuffled mini-batches; returns ``(state, history)``.

  Args:
    state: from ``kronjax.init``. It is not modified (the loop trains a copy).
    key: PRNG key for the batch order (see ``batch_schedule``). Batches are
      indexed by the state's global step, so calling ``fit`` again on the
      returned state (or on a restored checkpoint) with the same key continues
      the same sequence.
    batch_size: points per step, in ``[1, n]``.
    steps / epochs: how many more steps to train (exactly one of them).
    progress: show a tqdm bar with loss, active neurons and steps per second.
    eval_every: evaluate every this many steps (and at the end); 0 disables.
    on_overflow: ``"replay"`` re-runs an overflowing step from the unchanged
      state with grown capacity (one recompilation); ``"raise"`` raises
      ``CapacityError`` with the count and capacity needed.
    log_every: record loss/active in the history every this many steps.
    mesh: a ``jax.sharding.Mesh``: train with neurons sharded over its devices
      (see ``kronjax.sharding``).
    checkpoint_dir / checkpoint_every: save the state (atomically) every this
      many steps and at the end (see ``kronjax.checkpoint``).

  Returns:
    The trained state and a history dict of numpy arrays: ``step``, ``loss``,
    ``active``, ``max_active``, ``index_rebuilds``; ``eval_step`` plus one array
    per ``kronjax.evaluate`` metric when ``eval_every``; ``replays`` (a list of
    ``(global step, changes)``), ``seconds`` and ``steps_per_second``.

  Raises:
    FloatingPointError when the loss becomes non-finite (naming the step);
    CapacityError on overflow with ``on_overflow="raise"``. The caller's state
    is untouched either way.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  n = state.data.n
  batch_size, steps = resolve_schedule(n, batch_size, steps, epochs)
  checks.check_choice("on_overflow", on_overflow, ("replay", "raise"))
  eval_every = checks.check_positive_int("eval_every", eval_every, minimum=0)
  log_every = checks.check_positive_int("log_every", log_every)
  checkpoint_every = checks.check_positive_int("checkpoint_every", checkpoint_every, minimum=0)
  if checkpoint_every and checkpoint_dir is None:
    raise ValueError("checkpoint_every was set without checkpoint_dir; pass the directory to save into.")

  start = int(state.step)
  batches = batch_schedule(key, n, batch_size, steps, start=start)
  if mesh is not None:
    from kronjax import sharding  # pylint: disable=g-import-not-at-top
    state = sharding.shard_state(state, mesh)
    step_fn = sharding.compiled_step(mesh)
  else:
    # The step donates its input; copy once so the caller's state stays valid.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    step_fn = compiled_step(donate=True)
  if checkpoint_dir is not None:
    from kronjax import checkpoint  # pylint: disable=g-import-not-at-top
  history: dict[str, list] = {k: [] for k in ("step", "loss", "active", "max_active", "index_rebuilds")}
  eval_hist: dict[str, list] = {"eval_step": []}
  replays: list[tuple[int, dict[str, int]]] = []
  bar = _progress_bar(steps, progress)
  t_start = time.perf_counter()
  try:
    t = 0
    while t < steps:
      batch = jnp.asarray(batches[t])
      new_state, metrics = step_fn(state, batch)
      metrics = jax.device_get(metrics)  # one transfer: each scalar's own cost ~0.4 ms on CPU
      if bool(metrics["overflow"]):
        state = new_state  # the skipped step returned the unchanged state
        if on_overflow == "raise":
          raise CapacityError(_overflow_message(state, start + t, metrics, batch))
        changes = grown_capacity(state, metrics, batch)
        replays.append((start + t, changes))
        bar.write(f"kronjax.fit: overflow at step {start + t}; replaying with {changes}")
        state = with_config(state, **changes)
        if mesh is not None:
          state = sharding.shard_state(state, mesh)
        continue
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        err = FloatingPointError(
            f"loss became non-finite ({loss}) at step {start + t}; the learning rate is most likely "
            "too large for this width/threshold (or the labels are badly scaled). Lower "
            "the learning rate and start again from the state you passed to fit.")
        raise err
      state = new_state
      t += 1
      if t % log_every == 0 or t == steps:
        history["step"].append(start + t)
        history["loss"].append(loss)
        history["active"].append(float(metrics["active"]))
        history["max_active"].append(int(metrics["max_active"]))
        history["index_rebuilds"].append(int(metrics["index_rebuilds"]))
      if eval_every and (t % eval_every == 0 or t == steps):
        ev = jax.device_get(_evaluate_jit(state))
        eval_hist["eval_step"].append(start + t)
        for k, v in ev.items():
          eval_hist.setdefault(k, []).append(float(v))
      if checkpoint_dir is not None and (t == steps or (checkpoint_every and t % checkpoint_every == 0)):
        # Saved unsharded (no padding, one index), so kronjax.checkpoint.load(like=init(...))
        # restores it whatever mesh wrote it.
        saved = state if mesh is None else sharding.unshard_state(state)
        checkpoint.save(checkpoint_dir, saved, {"fit_key": key, "batch_size": batch_size})
      bar.update(1)
      if t % 10 == 0 or t == steps:
        rate = t / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(loss=f"{loss:.4g}", active=f"{float(metrics['active']):.1f}",
                        steps_s=f"{rate:.1f}", refresh=False)
  finally:
    bar.close()
  seconds = time.perf_counter() - t_start
  out = {k: np.asarray(v) for k, v in history.items()}
  if eval_every:
    out.update({k: np.asarray(v) for k, v in eval_hist.items()})
  out["replays"] = replays
  out["seconds"] = seconds
  out["steps_per_second"] = steps / seconds if seconds > 0 else float("inf")
  return state, out


class _NoBar:
  def update(self, k):
    pass

  def set_postfix(self, **kw):
    pass

  def write(self, msg):
    print(msg)

  def close(self):
    pass


def _progress_bar(total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=total, desc="kronjax.fit", unit="step", dynamic_ncols=True)
