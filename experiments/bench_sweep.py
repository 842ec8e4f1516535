"""Benchmark: a vmapped sweep of 16 members against 16 sequential runs (issue 6).

Claim measured: at m = 1024, n = 512, batch 32 (float32, CPU) one step of a
16-member sweep (``kronjax.sweep.train_step``: vmap over the members, one dataset
and Gram shared) costs <= 0.5x the 16 steps of the members run one after the other
(``jax.jit(kronjax.train_step, donate_argnums=0)`` per member), and compiles once.

All variants are timed in interleaved rounds (``timing.time_steps_interleaved``).
Also, run against run: ``kronjax.sweep.fit`` of the sweep against ``kronjax.fit``
of each member one after the other, the same steps and batches, compiled
beforehand, in alternating rounds (``runs``): the loops' own per-step work
(batches, the metrics fetch, the checks) is part of what the sweep shares.
Also measured: the update floor (every member's ``P + G @ K_rows``, nothing else:
no schedule of the members can go below it); the fully stacked variant
``jax.vmap(kronjax.train_step, in_axes=(0, 0, None))`` (the dataset and its Gram
copied per member); the memory of the stacked state and of the shared dataset;
the minor page faults per sweep step and XLA's temporaries per step (the sweep's
and one member's: a momentum sweep's full-shape gradients are ``(S, m, n)``);
and the sequential runs, the sweep and the floor once more with XLA's product
and add instead of the native CPU kernel (the default), compiled in the same
process (``*_xla``). The floor's kernel and the native switch are internals with
no public API (``kronjax._src``).

    .venv/bin/python experiments/bench_sweep.py            # -> experiments/results/sweep.json
    .venv/bin/python experiments/bench_sweep.py --smoke    # tiny sizes -> experiments/results/sweep_smoke.json
    .venv/bin/python experiments/bench_sweep.py --retain-freed-memory --out experiments/results/sweep_retain.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax import sweep as sw
from kronjax._src.kernels import dispatch  # the floor's kernel and the native switch
from kronjax._src.kernels import native  # the floor's kernel and the native switch
from kronjax._src.kernels import products  # the floor's kernel and the native switch
from kronjax._src.train import runners  # the sweep's jitted step, for its temporaries
from kronjax.experiments import heap
from kronjax.experiments import timing as bench

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _copy(tree):
  """A fresh copy of every array (the steps donate their state)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def run(m: int, n: int, dims: tuple[int, ...], batch: int, steps: int, optimizer: str,
        rounds: int = 5, update: str = "full", layout: str = "auto", run_steps: int = 40) -> dict:
  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, n, dims, task="regression")
  dataset = kronjax.Dataset(data, labels)
  b0 = kronjax.Config(width=m).resolve().threshold  # the paper's sqrt(0.4 ln m)
  thresholds = [b0, b0 - 0.25]
  config = kronjax.Config(width=m, threshold=b0)
  # Every member carries the capacity the smallest threshold needs.
  capacity = kronjax.Plan().resolve(config.replace(threshold=min(thresholds))).active_capacity
  plan = kronjax.Plan(update=update, layout=layout, active_capacity=capacity)
  hyper = dict(learning_rate=[0.5, 1.0, 2.0, 4.0], threshold=thresholds, seed=[0, 1])
  if optimizer == "momentum":
    hyper["momentum"] = [0.9]
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  else:
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  members = sw.grid(**hyper)
  S = len(members)
  batches = [jnp.asarray(b) for b in kronjax.batch_schedule(key, n, batch, steps)]

  t0 = time.perf_counter()
  sweep = sw.init(config, dataset, members, tx=tx, plan=plan)  # the stacked state: (S,) on every leaf
  jax.block_until_ready(sweep)
  init_s = time.perf_counter() - t0

  # 16 sequential runs: the same members as separate states, one jitted donated step.
  starts = [sw.member(sweep, i) for i in range(S)]
  single = jax.jit(kronjax.train_step, donate_argnums=0)  # = kronjax.jit_train_step, lowerable

  def sequential(states, batch_idx, single=single):
    out = [single(s, dataset, batch_idx) for s in states]
    return [s for s, _ in out], [mt for _, mt in out]

  t0 = time.perf_counter()
  jax.block_until_ready(sequential([_copy(starts[0])], batches[0])[0])
  seq_compile_s = time.perf_counter() - t0
  states = [_copy(s) for s in starts]

  # The sweep: vmap over the members, dataset / Gram / batch shared (kronjax.sweep.train_step).
  def step(state, batch_idx):
    return sw.train_step(state, dataset, batch_idx)

  first = _copy(sweep)
  t0 = time.perf_counter()
  with bench.count_compilations() as compiled:
    _, metrics = step(first, batches[0])  # compiles; the result is discarded
    jax.block_until_ready(metrics)
  sweep_compile_s = time.perf_counter() - t0
  state = _copy(sweep)  # the same start as the sequential runs
  overflow = bool(np.any(np.asarray(metrics["overflow"])))

  # Everything stacked: vmap(train_step, in_axes=(0, 0, None)) with the dataset (and its
  # Gram) copied per member, against the shared dataset of the sweep.
  stacked_state = sw.stack([_copy(s) for s in starts])
  stacked_dataset = jax.tree.map(lambda x: jnp.stack([x] * S), dataset)
  stacked_vmap = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, 0, None)), donate_argnums=0)

  def stacked_step(state, batch_idx):
    return stacked_vmap(state, stacked_dataset, batch_idx)

  # The floor no schedule of the members avoids: each member's P + G @ K_rows,
  # here as the in-place per-member loop add_product runs on CPU.
  rng = np.random.default_rng(0)
  floor_args = [(jnp.asarray(rng.normal(size=(S, m, batch)).astype(np.float32)),
                 jnp.asarray(rng.normal(size=(batch, n)).astype(np.float32))) for _ in batches]
  floor = jax.jit(lambda P, a: (jax.vmap(products.add_product, in_axes=(0, 0, None))(P, *a), None),
                  donate_argnums=0)

  # The same three with XLA's product and add instead of the native kernel
  # (kronjax._src.kernels.native), compiled ahead so both run interleaved in this process.
  xla = {}
  if native.available(warn=False):
    single_xla = dispatch.compile_with(single, starts[0], dataset, batches[0], use_native=False)
    sweep_vmap = jax.jit(jax.vmap(kronjax.train_step, in_axes=(0, None, None)), donate_argnums=0)
    sweep_xla = dispatch.compile_with(sweep_vmap, sweep, dataset, batches[0], use_native=False)
    floor_xla = dispatch.compile_with(floor, jnp.zeros((S, m, n), jnp.float32), floor_args[0],
                                      use_native=False)
    xla = {
        "sequential_xla": (lambda st, b: sequential(st, b, single_xla), [_copy(s) for s in starts],
                           batches),
        "sweep_xla": (lambda st, b: sweep_xla(st, dataset, b), _copy(sweep), batches),
        "update_floor_xla": (floor_xla, jnp.zeros((S, m, n), jnp.float32), floor_args),
    }

  # Interleaved rounds: the machine's drift hits every variant alike.
  timings, finals = bench.time_steps_interleaved({
      "sequential": (sequential, states, batches),
      "sweep": (step, state, batches),
      "stacked": (stacked_step, stacked_state, batches),
      "update_floor": (floor, jnp.zeros((S, m, n), jnp.float32), floor_args),
      **xla,
  }, rounds=rounds)
  seq, shared, stacked = timings["sequential"], timings["sweep"], timings["stacked"]
  states, state = finals["sequential"], finals["sweep"]

  # Both layouts end in the same place (same batches, same members).
  agree = float(jnp.max(jnp.abs(state.P - jnp.stack([s.P for s in states]))))
  faults = _minor_faults_per_step(step, state, batches)
  temps = {"sweep": _temp_bytes(runners.sweep_step, state, dataset, batches[0]),
           "member": _temp_bytes(single, states[0], dataset, batches[0])}

  runs = _time_runs(sweep, dataset, key, batch, run_steps, rounds)
  return {
      "optimizer": optimizer, "m": m, "n": n, "dims": list(dims), "batch": batch, "members": S,
      "update_path": sweep.update_path(batch),
      "layout": sweep.layout,
      "index": sweep.index_kind, "active_capacity": sweep.resolved_plan.active_capacity,
      "mean_active": float(np.mean(np.asarray(metrics["active"]))),
      "overflow_seen": overflow,
      "init_sweep_s": init_s, "compile_sequential_s": seq_compile_s, "compile_sweep_s": sweep_compile_s,
      "sequential_16_steps": seq, "sweep_step_shared_data": shared,
      "sweep_step_stacked_data": stacked,
      "ratio_shared_vs_sequential": shared["median_s"] / seq["median_s"],
      "ratio_stacked_vs_sequential": stacked["median_s"] / seq["median_s"],
      "sweep_compilations": len(compiled), "sweep_compiled": list(compiled),
      "update_floor": timings["update_floor"],
      "ratio_update_floor_vs_sequential": timings["update_floor"]["median_s"] / seq["median_s"],
      "member_state_bytes": _bytes(sweep), "shared_bytes": _bytes(dataset),
      "stacked_state_bytes": _bytes(stacked_state) + _bytes(stacked_dataset),
      **({} if not xla else {
          "xla_product": {k: timings[k] for k in xla},
          "ratio_shared_vs_sequential_xla": (timings["sweep_xla"]["median_s"]
                                             / timings["sequential_xla"]["median_s"]),
          "speedup_native_sequential": (timings["sequential_xla"]["median_s"]
                                        / seq["median_s"]),
          "speedup_native_sweep": timings["sweep_xla"]["median_s"] / shared["median_s"],
          "speedup_native_update_floor": (timings["update_floor_xla"]["median_s"]
                                          / timings["update_floor"]["median_s"]),
      }),
      "max_abs_diff_sweep_vs_sequential_P": agree,
      "runs": runs,
      "sweep_minor_page_faults_per_step": faults,
      # XLA's temporaries per step (memory_analysis): the sweep's against 16 x one member's.
      "temp_bytes_sweep_step": temps["sweep"], "temp_bytes_member_step": temps["member"],
      "loadavg_1min": os.getloadavg()[0],
  }


def _time_runs(sweep, dataset, key, batch: int, steps: int, rounds: int) -> dict:
  """Seconds per step of ``kronjax.sweep.fit`` and of ``kronjax.fit`` for each member in turn.

  Both loops are compiled first (two steps each); the member states are taken
  out of the sweep before timing. Rounds alternate which goes first.
  """
  members = [sw.member(sweep, i) for i in range(sw.size(sweep))]

  # The stored arrays, untouched: ``.P`` of a point-major state is a transposed copy.
  def sweep_run():
    out, _ = sw.fit(sweep, dataset, key, batch_size=batch, steps=steps, progress=False)
    return out.projections

  def sequential_runs():
    return [kronjax.fit(s, dataset, key, batch_size=batch, steps=steps, progress=False)[0].projections
            for s in members]

  sw.fit(sweep, dataset, key, batch_size=batch, steps=2, progress=False)
  kronjax.fit(members[0], dataset, key, batch_size=batch, steps=2, progress=False)
  times = {"sweep_fit": [], "sequential_fits": []}
  finals = {}
  for r in range(rounds):
    order = ("sweep_fit", "sequential_fits") if r % 2 == 0 else ("sequential_fits", "sweep_fit")
    for name in order:
      t0 = time.perf_counter()
      finals[name] = jax.block_until_ready(sweep_run() if name == "sweep_fit" else sequential_runs())
      times[name].append((time.perf_counter() - t0) / steps)
  out = {k: bench.summarize(v) for k, v in times.items()}
  ratios = [a / b for a, b in zip(times["sweep_fit"], times["sequential_fits"])]
  return {"steps": steps, **out,
          "ratio_sweep_fit_vs_sequential_fits": out["sweep_fit"]["median_s"]
          / out["sequential_fits"]["median_s"],
          "ratio_per_round": ratios,
          "max_abs_diff_P": float(jnp.max(jnp.abs(finals["sweep_fit"]
                                                  - jnp.stack(finals["sequential_fits"]))))}


def _temp_bytes(jitted, *args) -> int | None:
  """Bytes of temporaries XLA allocates per call of ``jitted(*args)`` (None if not reported)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _minor_faults_per_step(step, state, batches) -> float:
  """Minor page faults per sweep step (``getrusage``): fresh pages the OS maps for
  the step's temporaries (see ``kronjax.experiments.heap``). Runs after the timings."""
  import resource  # pylint: disable=import-outside-toplevel  (POSIX only)
  state, _ = step(state, batches[0])
  jax.block_until_ready(state)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for b in batches:
    state, _ = step(state, b)
    jax.block_until_ready(state)
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(batches)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--out", default=None, help="JSON path (default experiments/results/sweep[_smoke].json)")
  p.add_argument("--steps", type=int, default=None, help="steps per timing (first 3 are warm-up)")
  p.add_argument("--optimizers", default="sgd,momentum")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--run-steps", type=int, default=40, help="steps of each timed fit (the runs comparison)")
  p.add_argument("--update", default="full", choices=("auto", "full", "sparse"),
                 help="update path (full: P stored point-major; the path auto picks at these "
                 "sizes)")
  p.add_argument("--retain-freed-memory", action="store_true",
                 help="call kronjax.experiments.heap.retain_freed_memory() first (glibc: reuse "
                 "large freed blocks)")
  p.add_argument("--layout", default="auto", choices=("auto", "neurons", "points"),
                 help="how P is stored (auto: point-major on the dense path)")
  args = p.parse_args(argv)
  retained = heap.retain_freed_memory() if args.retain_freed_memory else False
  optimizers = args.optimizers.split(",")
  if args.smoke:
    sizes = [(128, 64, (8, 8), 8, args.steps or 8)]
  else:  # the claim's size, then a small one where per-call overhead dominates
    sizes = [(1024, 512, (16, 32), 32, args.steps or 23), (128, 64, (8, 8), 8, args.steps or 23)]
  rounds = 2 if args.smoke else args.rounds
  run_steps = 6 if args.smoke else args.run_steps
  results = [run(m, n, dims, batch, steps, o, rounds, args.update, args.layout, run_steps)
             for m, n, dims, batch, steps in sizes for o in optimizers]
  for r in results:
    print(f"m={r['m']:>5} n={r['n']:>4} {r['optimizer']:>8}: 16 sequential {1e3 * r['sequential_16_steps']['median_s']:.2f} ms, "
          f"sweep (shared data) {1e3 * r['sweep_step_shared_data']['median_s']:.2f} ms "
          f"(ratio {r['ratio_shared_vs_sequential']:.3f}), stacked data "
          f"{1e3 * r['sweep_step_stacked_data']['median_s']:.2f} ms "
          f"(ratio {r['ratio_stacked_vs_sequential']:.3f}); update floor "
          f"{1e3 * r['update_floor']['median_s']:.2f} ms (ratio {r['ratio_update_floor_vs_sequential']:.3f}); "
          f"compilations {r['sweep_compilations']}; "
          f"path {r['update_path']}, layout {r['layout']}, active {r['mean_active']:.1f}; "
          f"sweep page faults/step {r['sweep_minor_page_faults_per_step']:.0f}, temporaries "
          f"{(r['temp_bytes_sweep_step'] or 0) / 2**20:.1f} MiB (one member "
          f"{(r['temp_bytes_member_step'] or 0) / 2**20:.1f} MiB)")
    w = r["runs"]
    print(f"    runs ({w['steps']} steps): sweep.fit {1e3 * w['sweep_fit']['median_s']:.2f} ms/step, "
          f"16 x kronjax.fit {1e3 * w['sequential_fits']['median_s']:.2f} ms/step "
          f"(ratio {w['ratio_sweep_fit_vs_sequential_fits']:.3f}; max |dP| {w['max_abs_diff_P']:.1e})")
    if "xla_product" in r:
      x = r["xla_product"]
      print(f"    with XLA's product instead of the native kernel: 16 sequential "
            f"{1e3 * x['sequential_xla']['median_s']:.2f} ms, sweep {1e3 * x['sweep_xla']['median_s']:.2f} ms "
            f"(ratio {r['ratio_shared_vs_sequential_xla']:.3f}), update floor "
            f"{1e3 * x['update_floor_xla']['median_s']:.2f} ms; native speedup: sequential "
            f"{r['speedup_native_sequential']:.2f}x, sweep {r['speedup_native_sweep']:.2f}x, "
            f"floor {r['speedup_native_update_floor']:.2f}x")
  out = args.out or RESULTS / ("sweep_smoke.json" if args.smoke else "sweep.json")
  command = None if argv is None else " ".join(["python", "experiments/bench_sweep.py", *argv])
  bench.write_json(out, {**bench.provenance(command), "results": results,
                         "retain_freed_memory": retained})
  print("wrote", out)
  return results


if __name__ == "__main__":
  main()
