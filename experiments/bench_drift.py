"""How far float32 ``P`` drifts from ``P0 + A K`` over long runs, and what ``kronjax.resync`` costs.

The step updates ``P`` incrementally (``P += dA K[S, :]``), so float32 rounding
accumulates; ``kronjax.resync`` recomputes ``P`` from ``A``. For sgd and
momentum, on the sparse and the full update path, this trains ``--steps``
steps (default 10^5) at m = 1024, n = 256, batch 16, and every ``--every``
steps records the relative drift ``max |P - (P0 + A K)| / max |P0 + A K|``
with the reference computed in float64 from the run's own ``A``. It also
times one ``resync`` against one step (medians after compilation).

    python experiments/bench_drift.py [--steps 100000] [--every 10000] [--out experiments/results/drift.json]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import kronjax
from kronjax.experiments import timing

TXS = {"sgd": lambda: optax.sgd(0.5), "momentum": lambda: optax.sgd(0.1, momentum=0.9)}


def drift(state, P0: np.ndarray, K: np.ndarray) -> float:
  exact = P0 + np.asarray(state.A, np.float64) @ K
  return float(np.max(np.abs(np.asarray(state.P, np.float64) - exact)) / np.max(np.abs(exact)))


def median_seconds(fn, repeats: int = 5) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100_000)
  parser.add_argument("--every", type=int, default=10_000)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--out", default="experiments/results/drift.json")
  args = parser.parse_args(argv)

  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, args.n, (16, 16), task="regression")
  dataset = kronjax.Dataset(data, labels)
  K = np.asarray(data.gram(), np.float64)
  batches = kronjax.batch_schedule(jax.random.PRNGKey(1), args.n, args.batch, args.steps)
  resync = jax.jit(kronjax.resync)
  runs = []
  for tx_name, make_tx in TXS.items():
    for update in ("sparse", "full"):
      config = kronjax.Config(width=args.width)
      state = kronjax.init(key, config, dataset, make_tx(),
                           plan=kronjax.Plan(update=update, layout="neurons"))
      P0 = np.asarray(state.P, np.float64)
      curve = [(0, 0.0)]
      t0 = time.perf_counter()
      for t in range(args.steps):
        state, _ = kronjax.jit_train_step(state, dataset, batches[t])
        if (t + 1) % args.every == 0:
          curve.append((t + 1, drift(state, P0, K)))
          print(f"{tx_name:9s} {update:6s} step {t + 1:7d}: drift {curve[-1][1]:.3e}", flush=True)
      train_s = time.perf_counter() - t0
      resynced = kronjax.resync(state, dataset)
      step_s = median_seconds(lambda: jax.jit(kronjax.train_step)(state, dataset, batches[0])[0].P)
      resync_s = median_seconds(lambda: resync(state, dataset).P)
      runs.append({"optimizer": tx_name, "update": update, "drift": curve,
                   "drift_after_resync": drift(resynced, P0, K),
                   "seconds_per_step": train_s / args.steps, "step_median_s": step_s,
                   "resync_median_s": resync_s})
  payload = {"benchmark": "drift", **timing.provenance(),
             "settings": {"width": args.width, "n": args.n, "batch": args.batch,
                          "steps": args.steps, "dtype": "float32"},
             "runs": runs}
  out = timing.write_json(args.out, payload)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
