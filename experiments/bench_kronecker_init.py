"""Benchmark of the kronecker init: ``P0 = W0 X^T`` from factor inner products, no ``d``.

Measured at d = 2**30 (three factors of 1024), m = 4096, n = 1024, rank-1 float32 data:
  * ``kronecker_projections`` for init_rank R0 in {1, 4, 8, 16}: median of 3 calls after
    a first (compiling) call, CPU seconds, peak RSS (target: < 10 s at the default R0);
  * the same for 256 new points (the W0 part of predict on unseen inputs);
  * at the default R0: the loop chunk and the GEMM block (``kronecker.GEMM_ROWS``),
    one varied at a time, to choose the defaults.

Every measurement runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``) is its own; ``rise`` is the peak minus the peak after ``import jax``
and data creation. CPU seconds (all threads) next to wall seconds tell contention on
the shared machine apart from work: wall ~ cpu / cores when the process had the cores.

    PYTHONPATH=. .venv/bin/python experiments/bench_kronecker_init.py            # -> experiments/results/kronecker_init.json
    PYTHONPATH=. .venv/bin/python experiments/bench_kronecker_init.py --smoke    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import kronjax
from kronjax._src.model import kronecker_init as kronecker
from kronjax.experiments import timing


GIB = 2**30


def worker(n: int, m: int, dims: tuple[int, ...], init_rank: int, chunk: int, gemm_rows: int,
           repeats: int) -> dict:
  """One measurement, meant to run alone in its own process."""
  import jax
  import jax.numpy as jnp

  import kronjax
  from kronjax._src.model import kronecker_init as kronecker

  kronecker.GEMM_ROWS = gemm_rows  # read by gemm_block at call time
  data = kronjax.data.synthetic(jax.random.key(0), n, dims, dtype=jnp.float32)
  jax.block_until_ready(data)
  key = jax.random.key(1)
  rss_before = timing.peak_rss_bytes()

  def fn():
    return kronecker.kronecker_projections(key, m, init_rank, (data,), chunk=chunk)[0]

  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  rss_after = timing.peak_rss_bytes()
  block = kronecker.gemm_block(m, init_rank)
  return {
      "n": n, "m": m, "dims": list(dims), "d": data.dim, "init_rank": init_rank,
      "chunk": chunk, "gemm_rows": gemm_rows, "gemm_block_neurons": block,
      "chunk_used": block * -(-min(chunk, m) // block),
      "first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
      "times_s": times, "median_cpu_s": statistics.median(cpu), "repeats": repeats,
      "loadavg_1min": os.getloadavg()[0], "dtype": str(out.dtype), "out_shape": list(out.shape),
      "finite": bool(jnp.all(jnp.isfinite(out))),
      "peak_rss_bytes": rss_after, "peak_rss_before_bytes": rss_before,
      "peak_rss_rise_bytes": rss_after - rss_before,
  }


def run(label, n, m, dims, init_rank, chunk, gemm_rows, args):
  timing.wait_for_quiet(args.max_load, args.patience)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--n", str(n), "--m", str(m),
         "--dims", ",".join(map(str, dims)), "--init-rank", str(init_rank), "--chunk", str(chunk),
         "--gemm-rows", str(gemm_rows), "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {label} failed:\n{proc.stderr[-4000:]}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["label"] = label
  print(f"  {label:8s} R0={init_rank:2d} n={n:5d} chunk={res['chunk_used']:5d} "
        f"gemm_rows={gemm_rows:4d}: median {res['median_s']:.3f} s (min {res['min_s']:.3f}, "
        f"cpu {res['median_cpu_s']:.2f} s, first {res['first_call_s']:.2f} s, load "
        f"{res['loadavg_1min']:.1f}), peak RSS {res['peak_rss_bytes'] / GIB:.3f} GiB "
        f"(rise {res['peak_rss_rise_bytes'] / GIB:.3f})", flush=True)
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None, help="results JSON (default experiments/results/"
                 "kronecker_init.json, kronecker_init_smoke.json with --smoke)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  p.add_argument("--max-load", type=float, default=None,
                 help="wait (up to --patience s) for the 1-min load average to drop below this "
                 "before each measurement")
  p.add_argument("--patience", type=float, default=600.0,
                 help="with --max-load: the longest wait (seconds) before measuring anyway")
  p.add_argument("--no-sweep", action="store_true", help="skip the chunk / GEMM block sweep")
  # internal: one measurement in this process
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, help=argparse.SUPPRESS)
  p.add_argument("--dims", help=argparse.SUPPRESS)
  p.add_argument("--init-rank", type=int, help=argparse.SUPPRESS)
  p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
  p.add_argument("--gemm-rows", type=int, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    dims = tuple(int(x) for x in args.dims.split(","))
    print(json.dumps(worker(args.n, args.m, dims, args.init_rank, args.chunk, args.gemm_rows,
                            args.repeats)))
    return 0

  here = os.path.dirname(os.path.abspath(__file__))
  out = args.out or os.path.join(
      here, "results", "kronecker_init_smoke.json" if args.smoke else "kronecker_init.json")
  if args.smoke:
    n, n_new, m, dims, ranks = 64, 16, 128, (16, 16, 16), (1, 4)
    chunks, gemm_rows_list = (16, 128), (32, 128)
  else:
    n, n_new, m, dims, ranks = 1024, 256, 4096, (1024, 1024, 1024), (1, 4, 8, 16)
    chunks, gemm_rows_list = (32, 64, 256, 1024, 4096), (64, 128, 256, 512)
  r0 = kronjax.Config(width=1).resolve().init_rank  # the default init_rank
  chunk0, rows0 = kronecker.DEFAULT_CHUNK, kronecker.GEMM_ROWS
  print(f"bench_kronecker_init: n={n} (new {n_new}) m={m} dims={dims} defaults: R0={r0} "
        f"chunk={chunk0} gemm_rows={rows0}", flush=True)
  t_start = time.perf_counter()
  results = {
      **timing.provenance(), "smoke": args.smoke,
      "defaults": {"init_rank": r0, "chunk": chunk0, "gemm_rows": rows0},
      "target": {"default_rank_time_s": 10.0}, "data": "kronjax.data.synthetic, rank 1, unit norm",
  }
  sweep = {"gemm_rows": [], "chunk": []}
  if not args.no_sweep:
    for rows in gemm_rows_list:
      sweep["gemm_rows"].append(run("rows", n, m, dims, r0, chunk0, rows, args))
    for chunk in chunks:
      sweep["chunk"].append(run("chunk", n, m, dims, r0, chunk, rows0, args))
  train, new = [], []
  for r in ranks:
    train.append(run("train", n, m, dims, r, chunk0, rows0, args))
    new.append(run("new", n_new, m, dims, r, chunk0, rows0, args))

  default = next((t for t in train if t["init_rank"] == r0), None)
  summary = {
      "train_median_s": {t["init_rank"]: t["median_s"] for t in train},
      "train_median_cpu_s": {t["init_rank"]: t["median_cpu_s"] for t in train},
      "new_points_median_s": {t["init_rank"]: t["median_s"] for t in new},
      "peak_rss_gib": {t["init_rank"]: t["peak_rss_bytes"] / GIB for t in train},
      "peak_rss_rise_gib": {t["init_rank"]: t["peak_rss_rise_bytes"] / GIB for t in train},
  }
  if default is not None:
    summary["default_rank_meets_target"] = default["median_s"] < 10.0
  for name in ("gemm_rows", "chunk"):
    if sweep[name]:
      best = min(sweep[name], key=lambda t: t["median_s"])
      summary[f"fastest_{name}"] = best["gemm_rows" if name == "gemm_rows" else "chunk_used"]
  results.update(sweep=sweep, train=train, new_points=new, summary=summary,
                 total_wall_s=time.perf_counter() - t_start, loadavg_at_end=list(os.getloadavg()))
  timing.write_json(out, results)
  print(json.dumps(summary, indent=1))
  print(f"Wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
