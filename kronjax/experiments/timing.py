"""Timing and environment helpers shared by every benchmark and experiment.

Benchmarks time steady-state calls after compilation (``block_until_ready``),
report medians with spreads, and record the environment next to the numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import numpy as np

import kronjax


def block(tree: Any) -> Any:
  """Waits for every array in ``tree``."""
  return jax.block_until_ready(tree)


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10,
            min_seconds: float = 0.0) -> dict[str, Any]:
  """Median wall time of ``fn(*args)`` after ``warmup`` calls (compilation excluded).

  Returns ``{"median_s", "p10_s", "p90_s", "min_s", "repeats", "times_s"}``.
  Keeps repeating (beyond ``repeats``) until ``min_seconds`` of samples exist.
  """
  for _ in range(warmup):
    block(fn(*args))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return summarize(times)


def summarize(times: list[float]) -> dict[str, Any]:
  """Median, 10th/90th percentiles and minimum of wall times in seconds."""
  arr = np.asarray(times)
  return {"median_s": float(np.median(arr)), "p10_s": float(np.percentile(arr, 10)),
          "p90_s": float(np.percentile(arr, 90)), "min_s": float(arr.min()),
          "repeats": len(times), "times_s": [float(t) for t in times]}


def time_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batches: list[Any], *,
               warmup: int = 3) -> tuple[dict[str, Any], Any]:
  """Times a state-threading ``step(state, batch) -> (state, aux)`` per call.

  The step may donate its state; the returned state is the last one.
  Returns ``(timing dict as in time_fn, final state)``.
  """
  for b in batches[:warmup]:
    state, aux = step(state, b)
  if warmup:
    block((state, aux))
  times = []
  for b in batches[warmup:]:
    t0 = time.perf_counter()
    state, aux = step(state, b)
    block((state, aux))
    times.append(time.perf_counter() - t0)
  return summarize(times), state


def time_steps_interleaved(runs: dict[str, tuple[Callable[[Any, Any], tuple[Any, Any]], Any, list[Any]]],
                           *, rounds: int = 10, warmup: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
  """Times several state-threading steps in alternating rounds.

  ``runs[name] = (step, state, batches)``. Each round runs every step over its
  ``batches[warmup:]`` in turn, so drift in the machine's speed (other
  processes, thermal state) hits all of them alike; comparing medians taken at
  different moments is what made single-shot ratios swing by 20 %.

  Returns ``(timings, states)``: per name a timing dict as in ``time_fn`` over
  all rounds' calls, plus ``round_medians_s``; and the final states.
  """
  states, times, round_medians = {}, {k: [] for k in runs}, {k: [] for k in runs}
  for name, (step, state, batches) in runs.items():
    for b in batches[:warmup]:
      state, aux = step(state, b)
    states[name] = block(state)
  for _ in range(rounds):
    for name, (step, _, batches) in runs.items():
      state, this_round = states[name], []
      for b in batches[warmup:]:
        t0 = time.perf_counter()
        state, aux = step(state, b)
        block((state, aux))
        this_round.append(time.perf_counter() - t0)
      states[name] = state
      times[name].extend(this_round)
      round_medians[name].append(float(np.median(this_round)))
  timings = {k: dict(summarize(v), round_medians_s=round_medians[k]) for k, v in times.items()}
  return timings, states


def batch_schedule(key: jax.Array, n: int, batch_size: int, steps: int, *,
                   start: int = 0) -> np.ndarray:
  """The index batches ``(steps, batch_size)`` int32 that ``kronjax.fit(state, dataset, key,
  batch_size=batch_size)`` trains on at global steps ``start .. start + steps - 1``.

  For timed step loops and for baselines that must see fit's batches. Uses the
  library's ``kronjax.batch_schedule`` where it is public; otherwise the same
  rule: epoch ``e`` is the permutation ``jax.random.permutation(fold_in(key, e), n)``
  cut into ``n // batch_size`` full batches (the remainder dropped).
  """
  public = getattr(kronjax, "batch_schedule", None)
  if callable(public):
    return np.asarray(public(key, n, batch_size, steps, start=start), np.int32)
  per_epoch = n // batch_size
  first, last = start // per_epoch, (start + steps - 1) // per_epoch
  epochs = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
            [:per_epoch * batch_size].reshape(per_epoch, batch_size) for e in range(first, last + 1)]
  offset = start - first * per_epoch
  return np.concatenate(epochs)[offset:offset + steps].astype(np.int32)


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "x64": bool(jax.config.jax_enable_x64),
      "native": native_info(),
  }


def native_info() -> dict[str, Any]:
  """The native CPU kernels' status, for the record next to the numbers.

  Asks the library's ``kronjax.native_info()`` where it exists (``{"mode",
  "available", "library", "reason"}``). Without it, reports what the
  environment says (``KRONJAX_NATIVE``, default ``auto``) and ``available``
  None: unknown.
  """
  public = getattr(kronjax, "native_info", None)
  if callable(public):
    return dict(public())
  return {"mode": os.environ.get("KRONJAX_NATIVE", "auto").strip().lower() or "auto",
          "available": None, "library": None,
          "reason": "not reported: kronjax has no public native_info()"}


def write_json(path: str | os.PathLike, payload: Any) -> pathlib.Path:
  """Writes ``payload`` (numpy/jax scalars and arrays allowed) as pretty JSON."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=_to_jsonable) + "\n")
  return path


def _to_jsonable(x: Any) -> Any:
  if isinstance(x, (np.generic,)):
    return x.item()
  if hasattr(x, "tolist"):
    return np.asarray(x).tolist()
  if isinstance(x, pathlib.Path):
    return str(x)
  raise TypeError(f"not JSON serializable: {type(x).__name__}")
