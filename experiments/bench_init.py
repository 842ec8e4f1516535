"""Benchmark of d-free (implicit) and explicit initialization of ``P0 = W0 X^T``.

Claims measured (issue 3, "Performance"):
  * implicit init, n = 1024, m = 4096, d = 2**20 (two factors of 1024), float32:
    median wall time after a jit warm-up (target < 1 s) and peak memory (target < 1 GiB);
  * the Gram ``K = X X^T`` on its own (it is part of the implicit init);
  * explicit init at d = 2**14 (n = 1024, m = 4096) and its linear extrapolation to d = 2**20.

Initialization is timed as ``jax.jit`` of ``kronjax.init(key, Config(init=...), dataset,
tx).projections`` on a ``kronjax.Dataset(..., gram="factors")``, so the implicit
init computes the Gram of the factors itself (as a dataset too large to store
its Gram would have it do) and the other outputs of ``init`` (zeros, optimizer
state) are not timed.

Every measurement runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``) is its own: we report the peak and the rise of the peak over the
process's state after ``import jax`` and data creation (the interpreter, XLA and the
inputs). tracemalloc cannot see XLA's buffers, hence the subprocess.

    .venv/bin/python experiments/bench_init.py                 # full sizes -> experiments/results/init.json
    .venv/bin/python experiments/bench_init.py --smoke         # tiny sizes -> experiments/results/init_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from kronjax.experiments import timing

GIB = 2**30


def _timed(fn, args, repeats):
  """Median / min wall time of ``fn(*args)`` after one warm-up call (which compiles)."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  # CPU seconds (all threads) tell contention apart from work on a shared machine:
  # wall ~ cpu / cores when the process had the cores to itself.
  return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
          "median_cpu_s": statistics.median(cpu), "repeats": repeats,
          "loadavg_1min": os.getloadavg()[0]}


def worker(kind: str, n: int, m: int, dims: tuple[int, ...], chunk: int, repeats: int) -> dict:
  """One measurement, meant to run alone in its own process."""
  import jax
  import jax.numpy as jnp
  import optax

  import kronjax

  data = kronjax.data.synthetic(jax.random.key(0), n, dims, dtype=jnp.float32)
  dataset = kronjax.Dataset(data, jnp.zeros((n, 1), jnp.float32), gram="factors")
  jax.block_until_ready(dataset)
  key = jax.random.key(1)
  tx = optax.sgd(1.0)
  rss_before = timing.peak_rss_bytes()
  if kind in ("implicit", "explicit"):
    config = kronjax.Config(width=m, init=kind)  # static: closed over
    plan = kronjax.Plan(init_chunk=chunk)
    fn = jax.jit(lambda k, ds: kronjax.init(k, config, ds, tx, plan=plan).projections)
    args = (key, dataset)
  elif kind == "gram":
    fn = jax.jit(lambda d: d.gram())
    args = (data,)
  else:
    raise ValueError(f"kind must be implicit, gram or explicit, got {kind!r}")
  out = _timed(fn, args, repeats)
  result = jax.tree_util.tree_leaves(fn(*args))[0]
  rss_after = timing.peak_rss_bytes()
  out.update(
      kind=kind, n=n, m=m, dims=list(dims), d=data.dim, chunk=chunk if kind == "explicit" else None,
      dtype=str(result.dtype), out_shape=list(result.shape), finite=bool(jnp.all(jnp.isfinite(result))),
      peak_rss_bytes=rss_after, peak_rss_before_bytes=rss_before,
      peak_rss_rise_bytes=rss_after - rss_before)
  return out


def run_in_subprocess(kind, n, m, dims, chunk, repeats, timeout, max_load=None):
  timing.wait_for_quiet(max_load)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--n", str(n), "--m", str(m),
         "--dims", ",".join(map(str, dims)), "--chunk", str(chunk), "--repeats", str(repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {kind} failed:\n{proc.stderr[-4000:]}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"  {kind:9s} n={n} m={m} d={res['d']:>8d}: median {res['median_s']:.4f} s "
        f"(min {res['min_s']:.4f} s, cpu {res['median_cpu_s']:.3f} s, first call "
        f"{res['first_call_s']:.2f} s, load {res['loadavg_1min']:.1f}), peak RSS {res['peak_rss_bytes'] / GIB:.3f} GiB "
        f"(rise {res['peak_rss_rise_bytes'] / GIB:.3f} GiB)", flush=True)
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None,
                 help="results JSON (default experiments/results/init.json, init_smoke.json with --smoke)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
  p.add_argument("--explicit-m", type=int, default=None,
                 help="width for the explicit measurement (scaled linearly to m if smaller)")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  p.add_argument("--max-load", type=float, default=None,
                 help="shared machine: wait (up to 10 min) for the 1-min load average to drop "
                 "below this before each measurement")
  # internal: one measurement in this process
  p.add_argument("--worker", choices=("implicit", "gram", "explicit"), help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, help=argparse.SUPPRESS)
  p.add_argument("--dims", help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, default=256, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    dims = tuple(int(x) for x in args.dims.split(","))
    print(json.dumps(worker(args.worker, args.n, args.m, dims, args.chunk, args.repeats)))
    return 0

  here = os.path.dirname(os.path.abspath(__file__))
  out = args.out or os.path.join(here, "results", "init_smoke.json" if args.smoke else "init.json")
  if args.smoke:
    n, m, big, small, chunk = 64, 128, (32, 32), (8, 16), 32
  else:
    n, m, big, small, chunk = 1024, 4096, (1024, 1024), (128, 128), 256
  m_exp = min(args.explicit_m or m, m)
  repeats = args.repeats
  print(f"bench_init: n={n} m={m} big dims={big} explicit dims={small}", flush=True)

  results = {**timing.provenance(),
             "smoke": args.smoke, "targets": {"implicit_time_s": 1.0, "implicit_peak_bytes": GIB}}
  t_start = time.perf_counter()
  implicit = run_in_subprocess("implicit", n, m, big, chunk, repeats, args.timeout, args.max_load)
  gram = run_in_subprocess("gram", n, m, big, chunk, repeats, args.timeout, args.max_load)
  # explicit is O(m n d): fewer repeats, and two d's to check the linear scaling
  exp_repeats = max(1, min(repeats, 3))
  half = (small[0] // 2, small[1])
  explicit_half = run_in_subprocess("explicit", n, m_exp, half, chunk, exp_repeats, args.timeout, args.max_load)
  explicit = run_in_subprocess("explicit", n, m_exp, small, chunk, exp_repeats, args.timeout, args.max_load)

  d_small = small[0] * small[1]
  d_big = big[0] * big[1]
  t_exp = explicit["median_s"] * (m / m_exp)  # linear in m when a smaller width was measured
  results.update(
      implicit=implicit,
      gram=gram,
      explicit_half_d=explicit_half,
      explicit=explicit,
      summary={
          "implicit_median_s": implicit["median_s"],
          "implicit_peak_rss_gib": implicit["peak_rss_bytes"] / GIB,
          "implicit_peak_rss_rise_gib": implicit["peak_rss_rise_bytes"] / GIB,
          "implicit_meets_time_target": implicit["median_s"] < 1.0,
          "implicit_meets_memory_target": implicit["peak_rss_bytes"] < GIB,
          "implicit_min_s": implicit["min_s"],
          "implicit_median_cpu_s": implicit["median_cpu_s"],
          "gram_median_s": gram["median_s"],
          "explicit_width_measured": m_exp,
          "explicit_scaled_from_smaller_width": m_exp != m,
          "explicit_median_s_at_d_small": t_exp,
          "d_small": d_small,
          "explicit_time_ratio_d_vs_d_over_2": explicit["median_s"] / explicit_half["median_s"],
          "explicit_extrapolated_s_at_d_big": t_exp * d_big / d_small,
          "d_big": d_big,
          "explicit_over_implicit_at_d_big": t_exp * d_big / d_small / implicit["median_s"],
      },
      total_wall_s=time.perf_counter() - t_start,
      loadavg_at_end=list(os.getloadavg()),
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  s = results["summary"]
  print(f"implicit: {s['implicit_median_s']:.3f} s, peak RSS {s['implicit_peak_rss_gib']:.3f} GiB; "
        f"gram {s['gram_median_s']:.3f} s; explicit at d={d_small}: {s['explicit_median_s_at_d_small']:.2f} s "
        f"(x{s['explicit_time_ratio_d_vs_d_over_2']:.2f} from d/2), extrapolated to d={d_big}: "
        f"{s['explicit_extrapolated_s_at_d_big']:.0f} s. Wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
