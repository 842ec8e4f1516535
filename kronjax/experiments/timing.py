"""Timing and environment helpers shared by every benchmark and experiment.

Benchmarks time steady-state calls after compilation (``block_until_ready``),
report medians with spreads, and record the environment next to the numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
import sys
import resource
import time
from typing import Any, Callable, Iterator

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


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
  """Records the XLA compilations inside the block: yields a list that receives the
  name of each compiled function (``jax.monitoring``'s backend-compile events).

      with count_compilations() as compiled:
        step(state, batch)
      assert len(compiled) == 1
  """
  compiled: list[str] = []
  active = [True]

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    del duration
    if active[0] and event == _BACKEND_COMPILE:
      compiled.append(str(kwargs.get("fun_name", "?")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    active[0] = False
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:  # older jax: the listener stays, inactive
      unregister(listener)


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "loadavg_at_start": list(os.getloadavg()),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "x64": bool(jax.config.jax_enable_x64),
      "native": native_info(),
  }


def provenance(command: str | None = None) -> dict[str, Any]:
  """Where a results JSON's numbers come from: ``date`` (UTC, ISO 8601), ``command`` (the
  command line that wrote it; default this process's, as ``python SCRIPT ARGS`` relative to the
  working directory) and ``environment``. Every benchmark and experiment records these three at
  the top of its JSON; ``docs/gen_tables.py`` prints them under each table."""
  if command is None:
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "-c"
    command = " ".join(["python", script] + sys.argv[1:])
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": command, "environment": environment()}


def native_info() -> dict[str, Any]:
  """The native CPU kernels' status (``kronjax.native_info()``), for the record next to the numbers."""
  return dict(kronjax.native_info())


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (what XLA's buffers and everything else
  took at most; run each measurement in its own process to separate their peaks)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def wait_for_quiet(max_load: float | None, patience_s: float = 600.0) -> None:
  """On a shared machine, wait (at most ``patience_s``) until the 1-min load average is
  below ``max_load`` (None: do not wait)."""
  if max_load is None:
    return
  t0 = time.perf_counter()
  while os.getloadavg()[0] >= max_load and time.perf_counter() - t0 < patience_s:
    time.sleep(5.0)


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
