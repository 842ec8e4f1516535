"""Benchmark: the default (kronecker) init in d and in n, against the implicit init.

Claims measured (issue "a d-free initialization that scales in n", performance):

(a) ``d = 2**30`` (three factors of 1024), ``m = 4096``, ``n = 1024``, float32, the
    default ``kronjax.Config(width=m)`` (``init="kronecker"``, the default
    ``init_rank``): ``kronjax.init`` wall time, median of 3 after a warm-up call
    that compiles (target < 10 s), and ``kronjax.predict`` on 256 unseen points
    (target < 2 s), each with its peak resident memory. Also ``kronjax.init`` at
    every ``init_rank`` of ``--ranks`` (the cost of the rank).
(b) ``n = 20000``, ``d = 2**20`` (two factors of 1024), ``m = 4096``: every init
    kind that completes within ``--timeout``: the kronecker init at the default
    rank (target < 60 s) and the implicit init (Gram ``O(n^2 sum_q d_q)``,
    Cholesky ``O(n^3)``, ``Z L^T`` ``O(m n^2)``), plus the implicit init's parts
    timed one by one (Gram, bare Cholesky, the init's ``psd_factor`` = Cholesky in a
    ``lax.cond`` with the ``eigh`` fallback, the draw of ``Z``, ``Z L^T``) and, at ``--eigh-n`` points, the
    ``eigh`` fallback next to Cholesky (the fallback runs only when ``K`` is
    singular; it is extrapolated to ``n`` by ``n^3``). The explicit init is
    ``O(m n d)`` ~ 8.6e16 multiply-adds: not run; recorded as skipped with a time
    estimated from the explicit init's measured rate in
    ``experiments/results/init.json``. The datasets of (b) are built with
    ``gram="factors"``: no stored ``(n, n)`` Gram (1.6 GB at n = 20000), which the
    kronecker init never needs; the implicit init computes it inside its own call.
    The datasets of (a) use the default ``gram="precomputed"`` (n = 1024: 4 MB).

Every measurement runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``) is its own; ``peak_rss_before_bytes`` is the peak after the imports
and the data (before the timed work). tracemalloc cannot see XLA's buffers.
``kronjax.init`` is timed as users call it (the whole call, ``block_until_ready``
on the state). ``predict`` is timed on a state fresh from ``init`` (``A = 0``: the
same work as a trained state, ``W0 X'^T + A K(X, X')``).

    .venv/bin/python experiments/bench_init_scaling.py            # -> experiments/results/init_scaling.json
    .venv/bin/python experiments/bench_init_scaling.py --smoke    # tiny sizes -> init_scaling_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

GIB = 2**30
HERE = pathlib.Path(__file__).resolve().parent


def _maxrss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _timed(fn, repeats: int, warmup: bool = True) -> dict:
  """Wall (and process CPU) time of ``fn()``: first call (compiles), then ``repeats`` calls."""
  import jax
  out = {}
  if warmup:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out["first_call_s"] = time.perf_counter() - t0
  times, cpu = [], []
  result = None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  out.update(median_s=statistics.median(times), min_s=min(times), times_s=times,
             median_cpu_s=statistics.median(cpu), repeats=repeats,
             loadavg_1min=os.getloadavg()[0])
  return out, result


# ----------------------------------------------------------------------------- workers


def worker(args) -> dict:
  """One measurement, alone in its own process."""
  import jax
  import jax.numpy as jnp
  import optax

  import kronjax

  dims = tuple(int(x) for x in args.dims.split(","))
  n, m = args.n, args.m
  data = kronjax.data.synthetic(jax.random.key(0), n, dims, dtype=jnp.float32)
  rank = None if args.rank <= 0 else args.rank
  info = {"kind": args.worker, "n": n, "m": m, "dims": list(dims), "d": math.prod(dims),
          "dtype": "float32"}

  if args.worker in ("init", "predict"):
    dataset = kronjax.Dataset(data, jnp.zeros((n, 1), jnp.float32), gram=args.gram)
    jax.block_until_ready(dataset)
    if args.init == "kronecker":
      config = kronjax.Config(width=m, init="kronecker", init_rank=rank)
    else:
      config = kronjax.Config(width=m, init=args.init)
    tx = optax.sgd(1.0)
    key = jax.random.key(1)
    info.update(init=config.init, init_rank=config.resolve().init_rank, gram=args.gram)
    if args.worker == "init":
      rss_before = _maxrss_bytes()
      timing, state = _timed(lambda: kronjax.init(key, config, dataset, tx), args.repeats)
      P = state.P
      info.update(out_shape=list(P.shape), finite=bool(jnp.all(jnp.isfinite(P))),
                  active_mean=float(jnp.mean(jnp.sum(P > state.b, axis=0))),
                  m_Q_b=m * config.firing_probability)
    else:
      state = jax.block_until_ready(kronjax.init(key, config, dataset, tx))
      new = kronjax.data.synthetic(jax.random.key(2), args.n_new, dims, dtype=jnp.float32)
      jax.block_until_ready(new)
      rss_before = _maxrss_bytes()
      timing, out = _timed(lambda: kronjax.predict(state, dataset, new), args.repeats)
      info.update(n_new=args.n_new, out_shape=list(out.shape), finite=bool(jnp.all(jnp.isfinite(out))))
  elif args.worker == "implicit_parts":
    # The implicit init's steps, each compiled ahead of time and run on its own:
    # K = X X^T, L = cholesky(K) (eigh when K is singular), Z ~ N(0, 1), P0 = Z L^T.
    gram = jax.jit(lambda d: d.gram()).lower(data).compile()
    rss_before = _maxrss_bytes()
    t_gram, K = _timed(lambda: gram(data), args.repeats, warmup=False)
    chol = jax.jit(lambda K: jnp.linalg.cholesky(0.5 * (K + K.T))).lower(K).compile()
    t_chol, L = _timed(lambda: chol(K), args.repeats, warmup=False)
    chol_finite = bool(jnp.all(jnp.isfinite(L)))
    Z = jax.block_until_ready(jax.random.normal(jax.random.key(3), (m, n), jnp.float32))
    mm = jax.jit(lambda Z, L: Z @ L.T).lower(Z, L).compile()
    t_mm, P = _timed(lambda: mm(Z, L), args.repeats, warmup=False)
    parts = {"gram": t_gram, "cholesky": t_chol, "z_lt": t_mm}
    # What the init runs instead of the bare Cholesky: psd_factor (symmetrize, Cholesky, and a
    # lax.cond that keeps L or falls back to eigh), and the Gaussian draw of Z.
    from kronjax._src.model.initializers import psd_factor  # pylint: disable=g-import-not-at-top
    del L, P, Z
    psd = jax.jit(psd_factor).lower(K).compile()
    parts["psd_factor"], _ = _timed(lambda: psd(K), args.repeats, warmup=False)
    draw = jax.jit(lambda k: jax.random.normal(k, (m, n), jnp.float32)).lower(
        jax.random.key(4)).compile()
    parts["normal_z"], _ = _timed(lambda: draw(jax.random.key(4)), args.repeats, warmup=False)
    if args.eigh:
      eigh = jax.jit(lambda K: jnp.linalg.eigh(0.5 * (K + K.T))).lower(K).compile()
      t_eigh, _ = _timed(lambda: eigh(K), args.repeats, warmup=False)
      parts["eigh"] = t_eigh
    timing = {"parts": parts, "cholesky_finite": chol_finite}
  else:
    raise ValueError(f"unknown worker {args.worker!r}")
  rss_after = _maxrss_bytes()
  info.update(timing)
  info.update(peak_rss_bytes=rss_after, peak_rss_before_bytes=rss_before,
              peak_rss_rise_bytes=rss_after - rss_before)
  return info


# ----------------------------------------------------------------------------- driver


def wait_for_quiet(max_load, patience_s=600.0):
  """On a shared machine, wait (at most ``patience_s``) for the 1-min load average to drop."""
  if max_load is None:
    return
  t0 = time.perf_counter()
  while os.getloadavg()[0] >= max_load and time.perf_counter() - t0 < patience_s:
    time.sleep(5.0)


def measure(label: str, worker_args: list[str], timeout: float, max_load) -> dict:
  wait_for_quiet(max_load)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve())] + worker_args
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"  {label}: did not complete within {timeout:.0f} s", flush=True)
    return {"label": label, "completed": False, "reason": f"timeout after {timeout:.0f} s",
            "wall_s": time.perf_counter() - t0}
  if proc.returncode != 0:
    print(f"  {label}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
    return {"label": label, "completed": False, "reason": f"exit {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:], "wall_s": time.perf_counter() - t0}
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res.update(label=label, completed=True, wall_s=time.perf_counter() - t0)
  if "median_s" in res:
    print(f"  {label}: median {res['median_s']:.3f} s (min {res['min_s']:.3f}, cpu "
          f"{res['median_cpu_s']:.2f} s, first call {res.get('first_call_s', float('nan')):.2f} s, "
          f"load {res['loadavg_1min']:.1f}), peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB "
          f"(rise {res['peak_rss_rise_bytes'] / GIB:.2f})", flush=True)
  else:
    parts = ", ".join(f"{k} {v['median_s']:.2f} s" for k, v in res["parts"].items())
    print(f"  {label}: {parts}; peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
  return res


def explicit_estimate(n: int, m: int, d: int) -> dict:
  """The explicit init's time at (n, m, d) from its measured multiply-add rate (init.json)."""
  macs = float(m) * n * d
  out = {"label": "explicit", "completed": False, "multiply_adds": macs,
         "reason": f"not run: O(m n d) = {macs:.2e} multiply-adds"}
  ref_path = HERE / "results" / "init.json"
  try:
    ref = json.loads(ref_path.read_text())["explicit"]
    rate = ref["m"] * ref["n"] * ref["d"] / ref["median_s"]
    out.update(estimated_s=macs / rate, rate_multiply_adds_per_s=rate,
               rate_from=f"experiments/results/init.json: explicit init, n={ref['n']}, m={ref['m']}, "
                         f"d={ref['d']}, {ref['median_s']:.2f} s")
  except (OSError, KeyError, ValueError):
    out["estimated_s"] = None
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None,
                 help="results JSON (default experiments/results/init_scaling.json; "
                 "init_scaling_smoke.json with --smoke)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--ranks", default="1,2,4,8,16",
                 help="init_rank values timed at the size of (a) ('' for none)")
  p.add_argument("--implicit-repeats", type=int, default=1,
                 help="timed implicit init calls at n = 20000 after the warm-up (each takes minutes)")
  p.add_argument("--eigh-n", type=int, default=4096, help="n of the eigh-vs-Cholesky comparison")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement (the bound)")
  p.add_argument("--max-load", type=float, default=None,
                 help="shared machine: wait (up to 10 min) for the 1-min load average to drop "
                 "below this before each measurement")
  # internal: one measurement in this process
  p.add_argument("--worker", choices=("init", "predict", "implicit_parts"), help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, help=argparse.SUPPRESS)
  p.add_argument("--m", type=int, help=argparse.SUPPRESS)
  p.add_argument("--dims", help=argparse.SUPPRESS)
  p.add_argument("--init", default="kronecker", help=argparse.SUPPRESS)
  p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--gram", default="precomputed", help=argparse.SUPPRESS)
  p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
  p.add_argument("--n-new", type=int, default=256, help=argparse.SUPPRESS)
  p.add_argument("--eigh", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    print(json.dumps(worker(args)))
    return 0

  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  default_rank = kronjax.Config(width=8).resolve().init_rank  # the default init's rank

  out = pathlib.Path(args.out or HERE / "results" / (
      "init_scaling_smoke.json" if args.smoke else "init_scaling.json"))
  if args.smoke:
    a = dict(n=64, m=128, dims=(16, 16, 16), n_new=16)
    b = dict(n=512, m=128, dims=(32, 32))
    eigh_n = 128
  else:
    a = dict(n=1024, m=4096, dims=(1024, 1024, 1024), n_new=256)
    b = dict(n=20000, m=4096, dims=(1024, 1024))
    eigh_n = args.eigh_n
  ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
  targets = {"a_init_s": 10.0, "a_predict_s": 2.0, "b_default_init_s": 60.0}

  def common(size, **extra):
    argv_ = ["--n", str(size["n"]), "--m", str(size["m"]), "--dims", ",".join(map(str, size["dims"]))]
    for k, v in extra.items():
      argv_ += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv_

  results = {
      **timing.provenance(),
      "smoke": args.smoke, "default_init_rank": default_rank, "targets": targets,
      "settings": {"a": {k: list(v) if isinstance(v, tuple) else v for k, v in a.items()},
                   "b": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()},
                   "a_gram": "precomputed", "b_gram": "factors", "timeout_s": args.timeout,
                   "ranks": ranks, "eigh_n": eigh_n, "implicit_repeats": args.implicit_repeats},
  }
  t_start = time.perf_counter()
  L = lambda s: f"n={s['n']} m={s['m']} d={math.prod(s['dims'])}"  # noqa: E731
  print(f"bench_init_scaling (a): {L(a)}", flush=True)
  a_init = measure("a: kronjax.init (default)", ["--worker", "init"] + common(a), args.timeout,
                   args.max_load)
  a_pred = measure(f"a: kronjax.predict ({a['n_new']} new points)",
                   ["--worker", "predict"] + common(a, n_new=a["n_new"]), args.timeout, args.max_load)
  rank_rows = []
  for r in ranks:
    rank_rows.append(measure(f"a: kronjax.init (init_rank={r})",
                             ["--worker", "init"] + common(a, rank=r), args.timeout, args.max_load))
  print(f"bench_init_scaling (b): {L(b)}", flush=True)
  b_kron = measure("b: kronjax.init (default, kronecker)",
                   ["--worker", "init"] + common(b, gram="factors"), args.timeout, args.max_load)
  b_impl = measure("b: kronjax.init (implicit)",
                   ["--worker", "init"] + common(b, gram="factors", init="implicit",
                                                 repeats=args.implicit_repeats),
                   args.timeout, args.max_load)
  b_parts = measure("b: implicit init parts", ["--worker", "implicit_parts"] + common(
      b, repeats=1), args.timeout, args.max_load)
  small = dict(b, n=eigh_n)
  eigh_parts = measure(f"eigh vs Cholesky at n={eigh_n}", ["--worker", "implicit_parts"] + common(
      small, repeats=1, eigh=True), args.timeout, args.max_load)
  b_expl = explicit_estimate(b["n"], b["m"], math.prod(b["dims"]))

  summary = {}
  def record(name: str, res: dict, target: float | None = None) -> None:
    """``summary[name_median_s]`` (and whether it meets ``target``) and its peak memory."""
    if not res.get("completed"):
      return
    summary[f"{name}_median_s"] = res["median_s"]
    if target is not None:
      summary[f"{name}_meets_target"] = res["median_s"] < target
    summary[f"{name}_peak_rss_gib"] = res["peak_rss_bytes"] / GIB

  record("a_init", a_init, targets["a_init_s"])
  record("a_predict", a_pred, targets["a_predict_s"])
  summary["a_init_median_s_by_rank"] = {str(r["init_rank"]): r["median_s"] for r in rank_rows
                                        if r.get("completed")}
  record("b_kronecker", b_kron, targets["b_default_init_s"])
  record("b_implicit", b_impl)
  if b_parts.get("completed"):
    parts = {k: v["median_s"] for k, v in b_parts["parts"].items()}
    summary["b_implicit_parts_s"] = parts
    steps = {k: parts[k] for k in ("gram", "psd_factor", "normal_z", "z_lt")}
    summary["b_implicit_steps_sum_s"] = sum(steps.values())
    summary["b_implicit_bottleneck"] = max(steps, key=steps.get)
    summary["b_cholesky_succeeded"] = b_parts["cholesky_finite"]
  if eigh_parts.get("completed"):
    e = eigh_parts["parts"]
    ratio = e["eigh"]["median_s"] / e["cholesky"]["median_s"]
    summary["eigh_over_cholesky_at_eigh_n"] = ratio
    summary["eigh_extrapolated_s_at_b_n"] = e["eigh"]["median_s"] * (b["n"] / eigh_n) ** 3
  summary["b_explicit_estimated_s"] = b_expl.get("estimated_s")
  results.update(
      a={"init": a_init, "predict": a_pred, "init_by_rank": rank_rows},
      b={"kronecker": b_kron, "implicit": b_impl, "implicit_parts": b_parts,
         "eigh_vs_cholesky": eigh_parts, "explicit": b_expl},
      summary=summary, total_wall_s=time.perf_counter() - t_start,
      loadavg_at_end=list(os.getloadavg()))
  timing.write_json(out, results)
  print(json.dumps(summary, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
