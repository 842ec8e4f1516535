"""Benchmark of the threshold index kinds (issue: the threshold index).

Measures, in one process, steady-state medians after compilation (float32):
  1. query time of each kind vs the scan, m in {2**12, 2**16, 2**18},
     batch in {1, 32}, n = 256, at the paper's b = sqrt(0.4 ln m) with the
     capacities the default Plan derives (kinds are timed in interleaved rounds, so load
     from other processes hits both alike);
  2. the (re)build time of each kind;
  3. a real plain-SGD training run (update="sparse", batch 1, m = 2**18, n = 256,
     planted data with dims (16, 16)) with index="scan" vs
     "bucketed": per-step median and mean (the mean includes the lazy rebuilds),
     the number of rebuilds and the amortized rebuild cost per step.

The index kinds are internals with no public API (``kronjax._src.step.index``); the
training run uses the public ``kronjax.jit_train_step``.

    .venv/bin/python experiments/bench_threshold.py [--smoke] [--out experiments/results/threshold.json]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax._src.step import index as threshold  # the index kinds: internal, timed on their own
from kronjax.experiments import timing as bench


def _index(kind, config, plan):
  return threshold.make_index(kind, width=config.width, active_capacity=plan.active_capacity,
                              candidate_capacity=plan.candidate_capacity, delta=plan.index_delta)


def _interleaved(fns: dict, args: dict, rounds: int) -> dict:
  """Median seconds per call of each ``fns[k](*args[k])``, measured in alternating rounds."""
  for k, f in fns.items():
    for _ in range(2):
      bench.block(f(*args[k]))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      bench.block(f(*args[k]))
      times[k].append(time.perf_counter() - t0)
  return {k: bench.summarize(v) for k, v in times.items()}


def query_times(m: int, n: int, batches, rounds: int, seed: int = 0) -> dict:
  config = kronjax.Config(width=m).resolve()
  plan = kronjax.Plan().resolve(config)
  b = jnp.asarray(config.threshold, jnp.float32)
  P = jax.random.normal(jax.random.PRNGKey(seed), (m, n), jnp.float32)
  rng = np.random.default_rng(seed)
  out = {"m": m, "n": n, "threshold": config.threshold, "active_capacity": plan.active_capacity,
         "candidate_capacity": plan.candidate_capacity, "delta": plan.index_delta}
  states, queries, builds = {}, {}, {}
  for kind in threshold.KINDS:
    index = _index(kind, config, plan)
    builds[kind] = jax.jit(index.build)
    states[kind] = bench.block(builds[kind](P, b))
    queries[kind] = jax.jit(index.query)
  build = _interleaved(builds, {k: (P, b) for k in builds}, max(3, rounds // 10))
  out["build_ms"] = {k: v["median_s"] * 1e3 for k, v in build.items()}
  cand = np.asarray(states["bucketed"].cand_count)
  out["candidates_mean"], out["candidates_max"] = float(cand.mean()), int(cand.max())
  out["queries"] = []
  for B in batches:
    idx = jnp.asarray(rng.choice(n, B, replace=False).astype(np.int32))
    ref = queries["scan"](states["scan"], P, idx, b)
    for kind in threshold.KINDS:  # identical answers, or the timing means nothing
      got = queries[kind](states[kind], P, idx, b)
      for x, y in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    t = _interleaved(queries, {k: (states[k], P, idx, b) for k in queries}, rounds)
    row = {"batch": B, "active_mean": float(jnp.mean(ref.count))}
    for kind in threshold.KINDS:
      row[f"{kind}_ms"] = t[kind]["median_s"] * 1e3
      row[f"{kind}_p10_ms"] = t[kind]["p10_s"] * 1e3
      row[f"{kind}_p90_ms"] = t[kind]["p90_s"] * 1e3
      row[f"speedup_{kind}"] = t["scan"]["median_s"] / t[kind]["median_s"]
    out["queries"].append(row)
  return out


def train_times(m: int, n: int, steps: int, lr: float, dims=(16, 16), seed: int = 0) -> dict:
  """Plain SGD, sparse path, batch 1: the full step with each index kind, same batches."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(seed), n, dims, task="regression")
  dataset = kronjax.Dataset(data, labels)
  batches = [jnp.asarray(np.array([i], np.int32))
             for i in np.random.default_rng(seed).integers(0, n, steps + 3)]
  out = {"m": m, "n": n, "dims": list(dims), "batch": 1, "lr": lr, "steps": steps,
         "update": "sparse", "optimizer": "sgd"}
  states = {}
  for kind in threshold.KINDS:
    config = kronjax.Config(width=m, init="implicit")
    states[kind] = kronjax.init(jax.random.PRNGKey(seed), config, dataset, optax.sgd(lr),
                                plan=kronjax.Plan(update="sparse", index=kind))
  per_step = {k: [] for k in threshold.KINDS}
  history = {k: [] for k in threshold.KINDS}
  for i, bi in enumerate(batches):
    for kind in threshold.KINDS:  # interleaved: load from other processes hits both alike
      t0 = time.perf_counter()
      states[kind], metrics = kronjax.jit_train_step(states[kind], dataset, bi)
      bench.block((states[kind], metrics))
      if i >= 3:  # compilation and warm-up excluded
        per_step[kind].append(time.perf_counter() - t0)
        history[kind].append(jax.device_get(metrics))
  losses = {}
  for kind in threshold.KINDS:
    hist, times = history[kind], per_step[kind]
    rebuilds = int(hist[-1]["index_rebuilds"]) - int(hist[0]["index_rebuilds"])
    t = bench.summarize(times)
    rebuild_steps = [s for s, h0, h1 in zip(times[1:], hist, hist[1:])
                     if int(h1["index_rebuilds"]) > int(h0["index_rebuilds"])]
    out[kind] = {
        "median_ms": t["median_s"] * 1e3, "mean_ms": float(np.mean(times)) * 1e3,
        "p90_ms": t["p90_s"] * 1e3, "rebuilds": rebuilds,
        "steps_per_rebuild": (steps / rebuilds) if rebuilds else None,
        "rebuild_step_ms": float(np.median(rebuild_steps)) * 1e3 if rebuild_steps else None,
        # what the rebuild steps cost beyond a median step, spread over all steps
        "amortized_rebuild_ms": (sum(rebuild_steps) - len(rebuild_steps) * t["median_s"])
        / len(times) * 1e3 if rebuild_steps else 0.0,
        "active_mean": float(np.mean([h["active"] for h in hist])),
        "overflows": int(sum(bool(h["overflow"]) for h in hist)),
    }
    losses[kind] = [float(h["loss"]) for h in hist]
  out["same_losses"] = losses["scan"] == losses["bucketed"]
  out["speedup_median"] = out["scan"]["median_ms"] / out["bucketed"]["median_ms"]
  out["speedup_mean"] = out["scan"]["mean_ms"] / out["bucketed"]["mean_ms"]
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/threshold.json")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
  parser.add_argument("--rounds", type=int, default=40)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--lr", type=float, default=1.0)
  args = parser.parse_args(argv)
  widths = (2**8, 2**10) if args.smoke else (2**12, 2**16, 2**18)
  rounds = 5 if args.smoke else args.rounds
  payload = {**bench.provenance(), "smoke": args.smoke, "query": [], "train": None}
  print(f"{'m':>8} {'B':>3} {'active':>8} {'cands':>7} {'scan ms':>9} {'bucketed ms':>12} "
        f"{'speedup':>8} {'rebuild ms':>11}")
  for m in widths:
    row = query_times(m, 256, (1, 32), rounds)
    payload["query"].append(row)
    for q in row["queries"]:
      print(f"{m:>8} {q['batch']:>3} {q['active_mean']:>8.0f} {row['candidates_mean']:>7.0f} "
            f"{q['scan_ms']:>9.3f} {q['bucketed_ms']:>12.3f} {q['speedup_bucketed']:>7.2f}x "
            f"{row['build_ms']['bucketed']:>11.1f}")
  train_m = 2**10 if args.smoke else 2**18
  tr = train_times(train_m, 256, 20 if args.smoke else args.steps, args.lr)
  payload["train"] = tr
  print(f"\ntrain step, plain SGD sparse path, batch 1, m={train_m}, n=256, lr={args.lr}, "
        f"{tr['steps']} steps (same losses: {tr['same_losses']})")
  for kind in threshold.KINDS:
    r = tr[kind]
    print(f"  {kind:>9}: median {r['median_ms']:.2f} ms, mean {r['mean_ms']:.2f} ms, "
          f"rebuilds {r['rebuilds']}, amortized rebuild {r['amortized_rebuild_ms']:.2f} ms/step")
  print(f"  speedup: median {tr['speedup_median']:.2f}x, mean {tr['speedup_mean']:.2f}x")
  path = bench.write_json(args.out, payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
