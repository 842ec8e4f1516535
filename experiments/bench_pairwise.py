"""Benchmark: entity-indexed (pairwise) data at real scale.

The data: two random unit-norm entity tables, ``F_1`` ``(N_1, d_1)`` and ``F_2``
``(N_2, d_2)`` (2,000 x 64 and 250 x 32, so ``d = 2048``), and an index of ``n``
pairs drawn uniformly (``kronjax.KronData((F_1, F_2), index=I)``); the dataset
keeps the entity Grams only (gram mode ``"entities"``: nothing ``n x n``); random
float32 targets; ``kronjax.Config(width=m)`` (the kronecker init), ``optax.sgd``.

1. ``init``: n = 10^5, m = 4096: the wall time of ``kronjax.Dataset(...)`` and
   ``kronjax.init(...)`` together in a fresh process, compilation included (goal
   under 20 s; a second, compiled call is recorded too), and the process's peak
   resident memory against the bytes of ``P``, ``A_T`` and the optimizer state
   (goal within 1.3x), with the default ``Plan()`` (``P`` stored neuron-major) and
   with ``Plan(layout="points")``. The largest array of the dataset and
   of the state is recorded: none has ``n^2`` elements (``dataset.gram`` is None).
2. ``steps``: the same data, ``kronjax.jit_train_step`` at B = 1 and 8 on the
   sparse path (``Plan(update="sparse")``: ``P`` neuron-major) and at B = 64 with the
   default plan (what ``"auto"`` picks), timed in interleaved rounds after
   compilation. Each step's bytes floor: the rows of ``P`` it must read and write
   (the touched rows ``T``, the union of the batch's active sets, on the sparse path and
   on the full path with ``P`` neuron-major, whose product skips the other neurons; all
   ``m`` with ``P`` point-major), ``2 x rows x n x 4`` bytes, plus the ``B x n`` Gram rows it gathers
   (``B x n x 4``), divided by the memory bandwidth of a numpy copy of a 256 MiB
   array in the same process (bytes read plus written per second); and the product's
   ``2 x rows x B x n`` flops at the rate of a compute-bound ``sgemm`` (1024 cubed) in the
   same process (at B = 64 on the full path the step is bound by arithmetic, not bytes).
   The floor time is the larger of the two; the step's median over it says how far the
   step is from its floor.
3. ``large``: n = 10^6, m = 1024 (``P`` and ``A_T`` 4 GiB each), ``Plan(update="sparse")``:
   ``Dataset`` + ``init``, then 1,000 sparse-path steps at B = 1; init seconds,
   ms per step, peak resident memory and the epoch time they imply (n steps).
4. ``curve``: n = 2^12 .. 2^17 at m = 1024, B = 8, both update paths: ms per
   step and the epoch seconds ``(n / B) x step`` (an epoch costs ``O(n^2)``: n/B
   steps of ``O(n)`` each), against the dense network's epoch at ``d = 2048`` (the
   tables' ``d``, measured) and ``d = 10^6`` (its step measured at ``d = 2^16`` and
   scaled linearly in ``d``): ``(n / B) x`` the dense step, ``O(n m d)``. The crossing
   ``n`` is where the kernel step (the faster path at each ``n``, interpolated
   between measured ``n``, a line fitted through them beyond) costs as much as the
   dense step. The operation-count model is recorded next to it: kernel
   ``(n / B) T n`` row-element updates, dense ``3 n m d`` multiply-adds (forward,
   gradient, update), equal at ``n = 3 m d B / T``.

Every part runs in its own subprocess, so its peak resident memory (``ru_maxrss``)
is its own; the 1-minute load average before and after each part is recorded with it
(other processes on the machine slow every timing). The results JSON is written after every part (``"partial": true``
with the parts still missing until the last one is in).

    .venv/bin/python experiments/bench_pairwise.py                # -> experiments/results/pairwise_scale.json
    .venv/bin/python experiments/bench_pairwise.py --smoke --out /tmp/pairwise_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
GIB = 2**30
F32 = 4  # bytes per float32 element

FULL = {
    "entities": (2000, 250), "dims": (64, 32), "lr": 0.5,
    "init": {"n": 100_000, "m": 4096},
    "steps": {"n": 100_000, "m": 4096, "batches": (1, 8, 64), "rounds": 5,
              "steps_per_round": {1: 20, 8: 8, 64: 3}},
    "large": {"n": 1_000_000, "m": 1024, "steps": 1000},
    "curve": {"ns": (2**12, 2**13, 2**14, 2**15, 2**16, 2**17), "m": 1024, "batch": 8,
              "rounds": 5, "steps_per_round": 6, "dense_dims": ((64, 32), (256, 256)),
              "dense_d_target": 10**6},
    "bandwidth_mib": 256,
}
SMOKE = {
    "entities": (200, 50), "dims": (16, 8), "lr": 0.5,
    "init": {"n": 2000, "m": 256},
    "steps": {"n": 2000, "m": 256, "batches": (1, 8, 64), "rounds": 2,
              "steps_per_round": {1: 3, 8: 3, 64: 2}},
    "large": {"n": 4000, "m": 128, "steps": 20},
    "curve": {"ns": (256, 512, 1024), "m": 128, "batch": 8, "rounds": 2, "steps_per_round": 2,
              "dense_dims": ((16, 8), (32, 32)), "dense_d_target": 4096},
    "bandwidth_mib": 32,
}
GOALS = {"init_s": 20.0, "peak_rss_over_state": 1.3}


# ----------------------------------------------------------------------------- helpers (worker side)


def _peak_rss() -> int:
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  return timing.peak_rss_bytes()


def tables(sizes: dict, seed: int = 0):
  """The two random unit-norm entity tables (numpy float32)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for N, d in zip(sizes["entities"], sizes["dims"]):
    F = rng.normal(size=(N, d)).astype(np.float32)
    out.append(F / np.linalg.norm(F, axis=1, keepdims=True))
  return tuple(out)


def pairs(sizes: dict, n: int, seed: int = 1):
  """``(index (n, 2) int32, labels (n,) float32)``: pairs drawn uniformly, random targets."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  index = np.stack([rng.integers(0, N, size=n, dtype=np.int32) for N in sizes["entities"]], axis=1)
  return index, rng.normal(size=n).astype(np.float32)


def build(F, index, labels, m, plan, lr):
  """``kronjax.Dataset`` and ``kronjax.init``, as a user calls them: ``(dataset, state)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import kronjax  # pylint: disable=g-import-not-at-top
  dataset = kronjax.Dataset(kronjax.KronData(F, index=index), labels)
  state = kronjax.init(jax.random.key(2), kronjax.Config(width=m), dataset, optax.sgd(lr), plan=plan)
  return jax.block_until_ready((dataset, state))


def largest_leaf(tree) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
  big = max(leaves, key=lambda x: x.size)
  return {"shape": list(big.shape), "elements": int(big.size), "bytes": int(big.nbytes)}


def state_bytes(state) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  opt = sum(int(x.nbytes) for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
  P, A_T = int(state.projections.nbytes), int(state.A_T.nbytes)
  every = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  return {"P": P, "A_T": A_T, "opt_state": opt, "P_A_T_opt_state": P + A_T + opt,
          "all_leaves": every}


def bandwidth(mib: int, repeats: int = 7) -> dict:
  """Bytes read plus written per second by ``numpy.copyto`` of a ``mib`` MiB float32 array."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  src = np.ones(mib * 2**20 // F32, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # touch the pages
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {"array_mib": mib, "copy_median_s": t, "bytes_per_s": 2 * src.nbytes / t,
          "times_s": times}


def gemm_rate(size: int = 1024, repeats: int = 5) -> dict:
  """Flops per second of a compute-bound BLAS ``sgemm`` (``size`` cubed, BLAS's own threads)
  in this process: what the step's arithmetic could run at, at best."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy.linalg import blas  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = np.asfortranarray(rng.normal(size=(size, size)).astype(np.float32))
  b = np.asfortranarray(rng.normal(size=(size, size)).astype(np.float32))
  blas.sgemm(1.0, a, b)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    blas.sgemm(1.0, a, b)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {"size": size, "median_s": t, "flops_per_s": 2 * size**3 / t, "times_s": times}


def _touched(state, batches) -> float:
  """Mean over ``batches`` of the rows a sparse step touches: neurons active on any batch point."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  count = jax.jit(lambda P, S, b: jnp.sum(jnp.any(P[:, S] > b, axis=1)))
  return float(statistics.mean(int(count(state.projections, S, state.b)) for S in batches))


def _batches(n: int, B: int, count: int, seed: int):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.choice(n, B, replace=False).astype(np.int32)) for _ in range(count)]


def _summary(times: list) -> dict:
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  return {k: v for k, v in timing.summarize(times).items() if k != "times_s"}


# ----------------------------------------------------------------------------- workers


def worker_init(sizes: dict, layout: str) -> dict:
  """Part 1: ``Dataset`` + ``init`` at n = 10^5, m = 4096, timed cold and compiled."""
  import jax  # pylint: disable=g-import-not-at-top
  import kronjax  # pylint: disable=g-import-not-at-top
  n, m = sizes["init"]["n"], sizes["init"]["m"]
  F = tables(sizes)
  index, labels = pairs(sizes, n)
  jax.block_until_ready(jax.numpy.zeros(()))  # the backend is up before the clock starts
  plan = kronjax.Plan(layout=layout)
  rss_before = _peak_rss()
  t0 = time.perf_counter()
  dataset, state = build(F, index, labels, m, plan, sizes["lr"])
  first_s = time.perf_counter() - t0
  rss = _peak_rss()
  nbytes = state_bytes(state)
  info = {
      "n": n, "m": m, "plan": {"layout": layout}, "layout": state.layout,
      "init": state.config.init, "init_rank": state.config.init_rank,
      "gram_mode": dataset.gram_mode, "dataset_gram_is_none": dataset.gram is None,
      "largest_leaf_dataset": largest_leaf(dataset), "largest_leaf_state": largest_leaf(state),
      "n_squared": n * n, "state_bytes": nbytes,
      "dataset_and_init_s": first_s, "peak_rss_bytes": rss, "peak_rss_before_bytes": rss_before,
      "peak_rss_over_state": rss / nbytes["P_A_T_opt_state"],
      "peak_rss_rise_over_state": (rss - rss_before) / nbytes["P_A_T_opt_state"],
  }
  info["no_n_squared_leaf"] = (info["dataset_gram_is_none"] and
                               info["largest_leaf_dataset"]["elements"] < n * n and
                               info["largest_leaf_state"]["elements"] < n * n)
  del dataset, state
  t0 = time.perf_counter()
  dataset, state = build(F, index, labels, m, plan, sizes["lr"])
  info["dataset_and_init_compiled_s"] = time.perf_counter() - t0
  return info


def worker_steps(sizes: dict) -> dict:
  """Part 2: the step at B = 1, 8 (sparse) and 64 (auto), interleaved, against its bytes floor."""
  import jax  # pylint: disable=g-import-not-at-top
  import kronjax  # pylint: disable=g-import-not-at-top
  s = sizes["steps"]
  n, m, Bs, rounds = s["n"], s["m"], s["batches"], s["rounds"]
  F = tables(sizes)
  index, labels = pairs(sizes, n)
  bw_start = bandwidth(sizes["bandwidth_mib"])
  dataset, sparse = build(F, index, labels, m, kronjax.Plan(update="sparse"), sizes["lr"])
  _, auto = build(F, index, labels, m, kronjax.Plan(), sizes["lr"])
  del _
  states = {"sparse": sparse, "auto": auto}
  del sparse, auto
  which = {B: ("sparse" if B < Bs[-1] else "auto") for B in Bs}
  warmup = 3
  batches = {B: _batches(n, B, warmup + rounds * s["steps_per_round"][B], seed=10 + B) for B in Bs}
  step = lambda st, b: kronjax.jit_train_step(st, dataset, b)  # noqa: E731
  metrics = {B: [] for B in Bs}
  for B in Bs:  # compile and warm up
    for b in batches[B][:warmup]:
      states[which[B]], _ = step(states[which[B]], b)
    jax.block_until_ready(states[which[B]])
  times = {B: [] for B in Bs}
  round_medians = {B: [] for B in Bs}
  k = s["steps_per_round"]
  for r in range(rounds):
    for B in Bs:
      this = []
      for b in batches[B][warmup + r * k[B]: warmup + (r + 1) * k[B]]:
        t0 = time.perf_counter()
        states[which[B]], out = step(states[which[B]], b)
        jax.block_until_ready((states[which[B]], out))
        this.append(time.perf_counter() - t0)
        metrics[B].append(out)
      times[B].extend(this)
      round_medians[B].append(statistics.median(this))
  bw_end = bandwidth(sizes["bandwidth_mib"])
  rate = gemm_rate()
  bw = statistics.median(bw_start["times_s"] + bw_end["times_s"])
  bytes_per_s = 2 * sizes["bandwidth_mib"] * 2**20 / bw
  rows = []
  for B in Bs:
    st = states[which[B]]
    path = st.update_path(B)
    # The neuron-major product skips the neurons none of the batch fires (zero coefficients):
    # it touches the rows the sparse path would; the point-major one runs over all m.
    touched = (_touched(st, batches[B][warmup:]) if path == "sparse" or st.layout == "neurons"
               else float(m))
    floor_bytes = 2 * touched * n * F32 + B * n * F32
    flops = 2.0 * touched * B * n   # the product K_rows^T U over the rows the step writes
    med = statistics.median(times[B])
    row = {"batch": B, "plan": {"update": "sparse"} if which[B] == "sparse" else {},
           "path": path, "layout": st.layout,
           "auto_path": kronjax.Plan().update_path(st.config, B),
           **_summary(times[B]), "round_medians_s": round_medians[B],
           "active_mean": float(statistics.mean(float(o["active"]) for o in metrics[B])),
           "overflow_steps": int(sum(bool(o["overflow"]) for o in metrics[B])),
           "touched_rows_mean": touched, "floor_bytes": floor_bytes,
           "bytes_floor_s": floor_bytes / bytes_per_s, "flops": flops,
           "flops_floor_s": flops / rate["flops_per_s"],
           "floor_s": max(floor_bytes / bytes_per_s, flops / rate["flops_per_s"])}
    row["floor_kind"] = "bytes" if row["floor_s"] == row["bytes_floor_s"] else "flops"
    row["over_floor"] = med / row["floor_s"]
    rows.append(row)
  return {"n": n, "m": m, "rounds": rounds, "steps_per_round": {str(b): k[b] for b in Bs},
          "warmup_steps": warmup,
          "bandwidth": {"array_mib": sizes["bandwidth_mib"], "copy_median_s": bw,
                        "bytes_per_s": bytes_per_s, "start": bw_start, "end": bw_end},
          "gemm": rate,
          "floor_bytes_formula": "2 x rows x n x 4 (P rows read and written; rows = touched rows "
                                 "on the sparse path and on the full path with P neuron-major, m "
                                 "with P point-major) + B x n x 4 (Gram rows)",
          "floor_formula": "max(floor bytes / copy bandwidth, 2 x rows x B x n flops / the flop "
                           "rate of a compute-bound sgemm)",
          "rows": rows, "peak_rss_bytes": _peak_rss()}


def worker_large(sizes: dict) -> dict:
  """Part 3: n = 10^6, m = 1024: init and 1,000 sparse steps at B = 1."""
  import jax  # pylint: disable=g-import-not-at-top
  import kronjax  # pylint: disable=g-import-not-at-top
  s = sizes["large"]
  n, m, steps = s["n"], s["m"], s["steps"]
  F = tables(sizes)
  index, labels = pairs(sizes, n)
  jax.block_until_ready(jax.numpy.zeros(()))
  rss_before = _peak_rss()
  t0 = time.perf_counter()
  dataset, state = build(F, index, labels, m, kronjax.Plan(update="sparse"), sizes["lr"])
  init_s = time.perf_counter() - t0
  rss_init = _peak_rss()
  nbytes = state_bytes(state)
  warmup = 3
  batches = _batches(n, 1, warmup + steps, seed=7)
  for b in batches[:warmup]:
    state, out = kronjax.jit_train_step(state, dataset, b)
  jax.block_until_ready(state)
  times, overflow, skipped = [], 0, 0
  t_all = time.perf_counter()
  for b in batches[warmup:]:
    t0 = time.perf_counter()
    state, out = kronjax.jit_train_step(state, dataset, b)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
    overflow += bool(out["overflow"])
    skipped += bool(out["skipped"])
  total_s = time.perf_counter() - t_all
  med = statistics.median(times)
  return {"n": n, "m": m, "batch": 1, "path": state.update_path(1), "layout": state.layout,
          "plan": {"update": "sparse"}, "gram_mode": dataset.gram_mode,
          "dataset_gram_is_none": dataset.gram is None,
          "largest_leaf_dataset": largest_leaf(dataset), "largest_leaf_state": largest_leaf(state),
          "state_bytes": nbytes, "dataset_and_init_s": init_s,
          "peak_rss_after_init_bytes": rss_init, "peak_rss_before_bytes": rss_before,
          "steps": steps, "completed_steps": len(times), "applied_steps": int(state.step),
          "overflow_steps": overflow, "skipped_steps": skipped,
          "steps_wall_s": total_s, **_summary(times),
          "epoch_s": n * med, "epoch_formula": "n x median step (n steps of batch 1)",
          "peak_rss_bytes": _peak_rss(), "peak_rss_over_state":
          _peak_rss() / nbytes["P_A_T_opt_state"]}


def worker_curve(sizes: dict) -> dict:
  """Part 4: ms per step at B = 8 for several n, both paths, and the dense step at two d."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import kronjax  # pylint: disable=g-import-not-at-top
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  c = sizes["curve"]
  m, B, k = c["m"], c["batch"], c["steps_per_round"]
  F = tables(sizes)
  warmup = 3
  runs, datasets = {}, {}
  for n in c["ns"]:
    index, labels = pairs(sizes, n, seed=100 + n % 997)
    for path in ("sparse", "full"):
      dataset, state = build(F, index, labels, m, kronjax.Plan(update=path), sizes["lr"])
      datasets[(n, path)] = dataset
      runs[f"{path} n={n}"] = ((lambda st, b, ds=dataset: kronjax.jit_train_step(st, ds, b)),
                               state, _batches(n, B, warmup + k, seed=n + (path == "full")))
  rng = np.random.default_rng(5)
  for dims in c["dense_dims"]:
    d = math.prod(dims)
    config = kronjax.Config(width=m)
    tx = optax.sgd(sizes["lr"])
    dstate = kronjax.dense.init(jax.random.key(2), config, tuple(dims), tx, dtype=jnp.float32)
    step = kronjax.dense.make_step(config, tx)
    xy = []
    for _ in range(warmup + k):
      X = rng.normal(size=(B, d)).astype(np.float32)
      xy.append((jnp.asarray(X / np.linalg.norm(X, axis=1, keepdims=True)),
                 jnp.asarray(rng.normal(size=(B, 1)).astype(np.float32))))
    runs[f"dense d={d}"] = ((lambda st, b, f=step: f(st, *b)), dstate, xy)
  timings, states = timing.time_steps_interleaved(runs, rounds=c["rounds"], warmup=warmup)
  rows = []
  for n in c["ns"]:
    row = {"n": n}
    for path in ("sparse", "full"):
      t = timings[f"{path} n={n}"]
      st = states[f"{path} n={n}"]
      row[path] = {"median_s": t["median_s"], "p10_s": t["p10_s"], "p90_s": t["p90_s"],
                   "path": st.update_path(B), "layout": st.layout,
                   "epoch_s": n / B * t["median_s"]}
      if path == "sparse":
        row[path]["touched_rows_mean"] = _touched(st, runs[f"{path} n={n}"][2][warmup:])
    row["auto_path"] = kronjax.Plan().update_path(states[f"full n={n}"].config, B)
    best = min(("sparse", "full"), key=lambda p: row[p]["median_s"])
    row.update(best_path=best, best_median_s=row[best]["median_s"], best_epoch_s=row[best]["epoch_s"])
    rows.append(row)
  dense = {}
  for dims in c["dense_dims"]:
    d = math.prod(dims)
    t = timings[f"dense d={d}"]
    dense[str(d)] = {"dims": list(dims), "d": d, "median_s": t["median_s"], "p10_s": t["p10_s"],
                     "p90_s": t["p90_s"], "measured": True}
  return {"m": m, "batch": B, "rounds": c["rounds"], "steps_per_round": k, "warmup_steps": warmup,
          "rows": rows, "dense_measured": dense, "peak_rss_bytes": _peak_rss()}


WORKERS = {"init": worker_init, "steps": worker_steps, "large": worker_large, "curve": worker_curve}


# ----------------------------------------------------------------------------- driver


def crossing(ns: list, step_s: list, dense_s: float) -> dict:
  """The ``n`` where the kernel step (``step_s`` at ``ns``, rising in ``n``) costs ``dense_s``.

  Interpolated linearly between the measured ``n`` that bracket it; outside them, from the
  least-squares line ``a + c n`` through every measured point (``"extrapolated": true``).
  Kernel space is cheaper below the crossing, the dense network above it.
  """
  for (n0, t0), (n1, t1) in zip(zip(ns, step_s), zip(ns[1:], step_s[1:])):
    if (t0 - dense_s) * (t1 - dense_s) <= 0 and t0 != t1:
      return {"n": n0 + (dense_s - t0) * (n1 - n0) / (t1 - t0), "extrapolated": False}
  mean_n, mean_t = statistics.mean(ns), statistics.mean(step_s)
  slope = (sum((a - mean_n) * (b - mean_t) for a, b in zip(ns, step_s)) /
           sum((a - mean_n) ** 2 for a in ns))
  intercept = mean_t - slope * mean_n
  out = {"extrapolated": True, "fit_intercept_s": intercept, "fit_slope_s_per_point": slope}
  if slope <= 0:
    out.update(n=None, note="the measured step does not rise with n")
  elif dense_s <= intercept:
    out.update(n=None, note="the dense step is cheaper than the fitted kernel step at every n")
  else:
    out["n"] = (dense_s - intercept) / slope
  return out


def dense_curve(curve: dict, sizes: dict) -> dict:
  """The dense epoch at the tables' ``d`` (measured) and at ``dense_d_target`` (scaled) and the
  crossing ``n`` of each, measured and by operation count."""
  c = sizes["curve"]
  m, B = curve["m"], curve["batch"]
  measured = curve["dense_measured"]
  d_tables = math.prod(c["dense_dims"][0])
  big = measured[str(math.prod(c["dense_dims"][-1]))]
  d_target = c["dense_d_target"]
  targets = {str(d_tables): dict(measured[str(d_tables)], source="measured"),
             str(d_target): {"d": d_target, "median_s": big["median_s"] * d_target / big["d"],
                             "measured": False,
                             "source": f"the step measured at d = {big['d']}, scaled by d "
                                       f"({d_target} / {big['d']})"}}
  ns = [r["n"] for r in curve["rows"]]
  best = [r["best_median_s"] for r in curve["rows"]]
  touched = statistics.mean(r["sparse"]["touched_rows_mean"] for r in curve["rows"])
  out = {}
  for key, t in targets.items():
    d = t["d"]
    out[key] = {**t, "epoch_s": {str(n): n / B * t["median_s"] for n in ns},
                "crossing": crossing(ns, best, t["median_s"]),
                "dense_epoch_multiply_adds_per_point": 3 * m * d,
                "count_model_crossing_n": 3 * m * d * B / touched}
  return {"dense": out, "touched_rows_mean": touched,
          "count_model": "kernel epoch (n / B) x T x n row-element updates; dense epoch 3 n m d "
                         "multiply-adds; equal at n = 3 m d B / T"}


def run_worker(part: str, argv: list, timeout: float, max_load: float | None = None) -> dict:
  """One part in its own process; its JSON line, with the 1-minute load average around it."""
  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  timing.wait_for_quiet(max_load)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", part] + argv
  load = {"loadavg_1min_before": os.getloadavg()[0]}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"  {part}: did not complete within {timeout:.0f} s", flush=True)
    return {"completed": False, "reason": f"timeout after {timeout:.0f} s",
            "wall_s": time.perf_counter() - t0, **load}
  load["loadavg_1min_after"] = os.getloadavg()[0]
  if proc.returncode != 0:
    print(f"  {part}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
    return {"completed": False, "reason": f"exit {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:], "wall_s": time.perf_counter() - t0, **load}
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res.update(completed=True, wall_s=time.perf_counter() - t0, **load)
  return res


def _print(part: str, res: dict) -> None:
  if not res.get("completed"):
    return
  if part.startswith("init"):
    print(f"  {part}: Dataset + init {res['dataset_and_init_s']:.2f} s (compiled "
          f"{res['dataset_and_init_compiled_s']:.2f} s), peak RSS {res['peak_rss_bytes'] / GIB:.2f} "
          f"GiB = {res['peak_rss_over_state']:.2f}x P + A_T + opt state, largest leaf "
          f"{res['largest_leaf_state']['shape']}", flush=True)
  elif part == "steps":
    for r in res["rows"]:
      print(f"  B={r['batch']:<3d} {r['path']:6s} {r['median_s'] * 1e3:9.3f} ms, touched "
            f"{r['touched_rows_mean']:.0f}, floor {r['floor_s'] * 1e3:.3f} ms: "
            f"{r['over_floor']:.2f}x", flush=True)
  elif part == "large":
    print(f"  n={res['n']} m={res['m']}: init {res['dataset_and_init_s']:.1f} s, "
          f"{res['median_s'] * 1e3:.2f} ms per step, epoch {res['epoch_s']:.0f} s, peak RSS "
          f"{res['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
  elif part == "curve":
    for r in res["rows"]:
      print(f"  n={r['n']:<7d} sparse {r['sparse']['median_s'] * 1e3:8.3f} ms, full "
            f"{r['full']['median_s'] * 1e3:8.3f} ms, epoch {r['best_epoch_s']:.3g} s", flush=True)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--out", default=None, help="results JSON (default "
                 "experiments/results/pairwise_scale.json; pairwise_scale_smoke.json with --smoke)")
  p.add_argument("--parts", default="init,steps,large,curve",
                 help="comma-separated parts to run (default all)")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per part")
  p.add_argument("--max-load", type=float, default=None,
                 help="shared machine: wait (up to 10 min) for the 1-min load average to drop "
                 "below this before each part")
  p.add_argument("--worker", choices=("init", "steps", "large", "curve"), help=argparse.SUPPRESS)
  p.add_argument("--layout", default="auto", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  sizes = SMOKE if args.smoke else FULL

  if args.worker:
    extra = {"layout": args.layout} if args.worker == "init" else {}
    print(json.dumps(WORKERS[args.worker](sizes, **extra)))
    return 0

  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out or HERE / "results" / (
      "pairwise_scale_smoke.json" if args.smoke else "pairwise_scale.json"))
  parts = [x.strip() for x in args.parts.split(",") if x.strip()]
  smoke = ["--smoke"] if args.smoke else []
  jobs = []  # (key, part, worker argv)
  if "init" in parts:
    jobs += [("init_default_plan", "init", smoke + ["--layout", "auto"]),
             ("init_points_layout", "init", smoke + ["--layout", "points"])]
  jobs += [(part, part, smoke) for part in ("steps", "large", "curve") if part in parts]
  results = {
      **timing.provenance(command=" ".join(["python", "experiments/bench_pairwise.py"] + argv)),
      "smoke": args.smoke, "partial": True, "missing": [key for key, _, _ in jobs],
      "goals": GOALS,
      "settings": {"entities": list(sizes["entities"]), "dims": list(sizes["dims"]),
                   "d": math.prod(sizes["dims"]), "dtype": "float32", "optimizer": "sgd",
                   "learning_rate": sizes["lr"], "init": "kronecker",
                   "parts": {k: v for k, v in sizes.items()
                             if k in ("init", "steps", "large", "curve")},
                   "bandwidth_mib": sizes["bandwidth_mib"], "timeout_s": args.timeout,
                   "max_load": args.max_load},
  }
  t_start = time.perf_counter()
  for key, part, worker_argv in jobs:
    print(f"bench_pairwise: {key}", flush=True)
    res = run_worker(part, worker_argv, args.timeout, args.max_load)
    _print(key, res)
    results[key] = res
    results["missing"] = [k for k in results["missing"] if k != key or not res.get("completed")]
    if part == "curve" and res.get("completed"):
      results["crossing"] = dense_curve(res, sizes)
    results["summary"] = summarize(results)
    results["total_wall_s"] = time.perf_counter() - t_start
    results["partial"] = bool(results["missing"]) or len(jobs) < 5  # failed or left-out parts
    timing.write_json(out, _jsonable(results))
  results["loadavg_at_end"] = list(os.getloadavg())
  timing.write_json(out, _jsonable(results))
  print(json.dumps(results["summary"], indent=2))
  print(f"wrote {out}")
  return 0


def _jsonable(x):
  """Dict keys as strings (the settings' ``steps_per_round`` is keyed by batch size)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def summarize(results: dict) -> dict:
  """The headline numbers and whether each goal is met."""
  s = {}
  init = results.get("init_default_plan", {})
  if init.get("completed"):
    s["init_s"] = init["dataset_and_init_s"]
    s["init_meets_goal"] = init["dataset_and_init_s"] < GOALS["init_s"]
    s["init_peak_rss_over_state"] = init["peak_rss_over_state"]
    s["init_rss_meets_goal"] = init["peak_rss_over_state"] <= GOALS["peak_rss_over_state"]
    s["init_no_n_squared_leaf"] = init["no_n_squared_leaf"]
  points = results.get("init_points_layout", {})
  if points.get("completed"):
    s["init_points_layout_s"] = points["dataset_and_init_s"]
    s["init_points_layout_peak_rss_over_state"] = points["peak_rss_over_state"]
    s["init_points_layout_rss_meets_goal"] = (
        points["peak_rss_over_state"] <= GOALS["peak_rss_over_state"])
  steps = results.get("steps", {})
  if steps.get("completed"):
    s["step_ms"] = {str(r["batch"]): 1e3 * r["median_s"] for r in steps["rows"]}
    s["step_path"] = {str(r["batch"]): r["path"] for r in steps["rows"]}
    s["step_over_floor"] = {str(r["batch"]): r["over_floor"] for r in steps["rows"]}
  large = results.get("large", {})
  if large.get("completed"):
    s["large_init_s"] = large["dataset_and_init_s"]
    s["large_step_ms"] = 1e3 * large["median_s"]
    s["large_epoch_s"] = large["epoch_s"]
    s["large_peak_rss_gib"] = large["peak_rss_bytes"] / GIB
  cross = results.get("crossing")
  if cross:
    s["crossing_n"] = {d: v["crossing"]["n"] for d, v in cross["dense"].items()}
  return s


if __name__ == "__main__":
  sys.exit(main())
