"""Benchmark: the train step on a machine that another process keeps busy.

Each setting of the step runs quiet and beside a busy process (a subprocess
spinning on one core, started by this script and paused, resumed and stopped by
it), in interleaved rounds: in every round each condition runs every setting
once, so the machine's drift hits all of them alike. Medians after compilation.

Settings, at the full update path (``kronjax.jit_train_step``, plain SGD):
  * ``auto``: ``Plan()`` and the native kernels' default threads (XLA's intra-op pool;
    ``Plan()`` stores ``P`` neuron-major);
  * ``points/T``, ``neurons/T``: ``Plan(layout=...)`` with the kernels capped at
    ``T`` threads, ``T`` the pool's size and 1 (``native.set_max_threads``; the
    internal knob, read per call);
  * ``points/blas``: ``Plan(layout="points")`` with the kernel's own split off
    (``native.set_blas_split``): the gemm is one BLAS call on BLAS's own threads.

Reported per condition and setting: the median step and this process's CPU time per
step (its threads' work, spinning included, whatever the load); per setting ``busy / quiet``
(at most 2 for a step that gets its fair share of two cores); per condition
``auto / best`` (the best explicit setting under the same load).

    .venv/bin/python experiments/bench_contention.py            # -> experiments/results/contention.json
    .venv/bin/python experiments/bench_contention.py --smoke    # tiny sizes, one round
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax._src.kernels import native  # the thread cap and the split switch: internal knobs
from kronjax.experiments import timing as bench

# OpenBLAS's threads spin for up to 2**28 cycles after a gemm before they sleep (its
# THREAD_TIMEOUT): left to run into the next setting they took its CPU time.
BLAS_SETTLE_S = 0.3

# Spins on one core until killed, or until its parent is gone (no orphan spinner).
SPIN = """
import os
parent = os.getppid()
while os.getppid() == parent:
  for _ in range(1 << 20):
    pass
"""


@contextlib.contextmanager
def busy_process() -> Iterator[subprocess.Popen]:
  """A subprocess spinning on one core, paused (SIGSTOP) until ``resume``d; killed on exit."""
  proc = subprocess.Popen([sys.executable, "-c", SPIN])
  try:
    os.kill(proc.pid, signal.SIGSTOP)
    yield proc
  finally:
    proc.kill()
    proc.wait()


def _set_busy(proc: subprocess.Popen, busy: bool) -> None:
  os.kill(proc.pid, signal.SIGCONT if busy else signal.SIGSTOP)
  if busy:
    time.sleep(0.05)  # let it take its core


def _settings(pool: int | None) -> dict[str, dict[str, Any]]:
  """name -> {layout, threads (0: the pool's), split (the kernel's own gemm split)}; ``pool``:
  XLA's intra-op pool size, None without the native kernels."""
  native_on = pool is not None
  settings = {"auto": dict(layout="auto", threads=0, split=True)}
  for layout in ("points", "neurons"):
    for threads in (sorted({pool, 1}, reverse=True) if native_on else (0,)):
      settings[f"{layout}/{threads}" if native_on else layout] = dict(
          layout=layout, threads=threads, split=True)
  if native_on:
    settings["points/blas"] = dict(layout="points", threads=0, split=False)
  return settings


@contextlib.contextmanager
def _kernel_knobs(threads: int, split: bool, native_on: bool) -> Iterator[None]:
  if not native_on:
    yield
    return
  previous = native.set_blas_split(split)
  try:
    with native.max_threads(threads):
      yield
  finally:
    native.set_blas_split(previous)


def run(m: int, n: int, batch: int, steps: int, rounds: int) -> dict[str, Any]:
  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, n, (32, max(1, n // 32)), task="regression")
  dataset = kronjax.Dataset(data, labels, gram="precomputed")
  config = kronjax.Config(width=m, init="implicit")
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.choice(n, batch, replace=False).astype(np.int32))
             for _ in range(steps)]
  native_on = native.available(warn=False)
  pool = native.pool_threads() if native_on else None
  settings = _settings(pool)
  states, paths, layouts = {}, {}, {}
  for name, s in settings.items():
    state = kronjax.init(key, config, dataset, optax.sgd(0.5), plan=kronjax.Plan(layout=s["layout"]))
    paths[name], layouts[name] = state.update_path(batch), state.layout
    with _kernel_knobs(s["threads"], s["split"], native_on):
      for b in batches[:3]:  # compile and warm up
        state, _ = kronjax.jit_train_step(state, dataset, b)
    states[name] = jax.block_until_ready(state)

  times = {c: {k: [] for k in settings} for c in ("quiet", "busy")}
  cpu = {c: {k: [] for k in settings} for c in ("quiet", "busy")}
  with busy_process() as proc:
    try:
      for r in range(rounds):
        # Alternate which condition goes first, so neither always follows the other.
        for condition in (("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")):
          _set_busy(proc, condition == "busy")
          # Rotate which setting goes first (the first after a switch meets a colder cache).
          names = list(settings)
          for name in names[r % len(names):] + names[:r % len(names)]:
            s = settings[name]
            state = states[name]
            with _kernel_knobs(s["threads"], s["split"], native_on):
              c0 = time.process_time()
              for b in batches[3:]:
                t0 = time.perf_counter()
                state, metrics = kronjax.jit_train_step(state, dataset, b)
                jax.block_until_ready((state, metrics))
                times[condition][name].append(time.perf_counter() - t0)
              cpu[condition][name].append((time.process_time() - c0) / len(batches[3:]))
            states[name] = state
            if not s["split"]:  # BLAS's threads spin on after a gemm: not into the next setting
              time.sleep(BLAS_SETTLE_S)
          _set_busy(proc, False)
    finally:
      _set_busy(proc, False)

  med = {c: {k: float(np.median(v)) for k, v in t.items()} for c, t in times.items()}
  # The explicit setting that runs auto's program (same layout, the pool's threads): their
  # difference is this benchmark's own spread (the arrays are separate allocations).
  twin = f"{layouts['auto']}/{pool}" if native_on else layouts["auto"]
  explicit = [k for k in settings if k != "auto"]
  best = {c: min(explicit, key=med[c].__getitem__) for c in med}
  return {
      "m": m, "n": n, "batch": batch, "steps_per_round": steps - 3, "rounds": rounds,
      "update_path": paths, "layout": layouts, "settings": settings,
      "pool_threads": pool,
      "auto_runs_as": twin if twin in settings else None,
      "blas_split": native.blas_split() if native_on else None,
      "timings": {c: {k: bench.summarize(v) | {"times_s": None} for k, v in t.items()}
                  for c, t in times.items()},
      "median_s": med,
      # This process's CPU time per step (all its threads, spinning included): the work a
      # setting asks of the machine, whatever the load.
      "cpu_s_per_step": {c: {k: float(np.median(v)) for k, v in t.items()} for c, t in cpu.items()},
      "busy_over_quiet": {k: med["busy"][k] / med["quiet"][k] for k in settings},
      "best_explicit": best,
      "auto_over_best": {c: med[c]["auto"] / med[c][best[c]] for c in med},
      "loadavg_1min_end": os.getloadavg()[0],
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.smoke:
    shape = dict(m=256, n=128, batch=8, steps=5, rounds=2)
  else:
    shape = dict(m=4096, n=1024, batch=32, steps=15, rounds=args.rounds)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "contention_smoke.json" if args.smoke else "contention.json")
  command = None if argv is None else " ".join(["python", "experiments/bench_contention.py", *argv])
  result = {**bench.provenance(command), **run(**shape)}
  bench.write_json(out, result)
  for condition in ("quiet", "busy"):
    row = "  ".join(f"{k} {v * 1e3:.2f}" for k, v in result["median_s"][condition].items())
    print(f"{condition:5s} ms: {row}")
  print("cpu ms/step (quiet): " + "  ".join(
      f"{k} {v * 1e3:.2f}" for k, v in result["cpu_s_per_step"]["quiet"].items()))
  print("busy/quiet: " + "  ".join(f"{k} {v:.2f}" for k, v in result["busy_over_quiet"].items()))
  print("auto/best:  " + "  ".join(f"{c} {v:.2f} ({result['best_explicit'][c]})"
                                    for c, v in result["auto_over_best"].items()))
  return result


if __name__ == "__main__":
  main()
