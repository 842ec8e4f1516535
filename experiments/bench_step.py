"""Benchmark of the kernel-space train step (issue: training step performance).

Measures, in one process on the same data, steady-state medians after compilation:
  1. kronjax step time vs d in {2**10, 2**14, 2**20} (flat in d);
  2. kronjax vs the dense baseline at d = 2**16 (dense skipped where W does not fit);
  3. the floor: the bare P update of the path the step takes, same static shapes;
  4. batch 1, m = 65536, n = 512: the sparse update path vs the dense path;
  5. the step and the floor of 3 again, each inside a compiled loop of 20 steps per call:
     the step as ``kronjax.fit`` runs it (its chunk loop, metrics and stop test
     included), the floor as a ``lax.scan`` of its passes.
The steps of 1 and 2 and the floor of 3 run in interleaved rounds
(``timing.time_steps_interleaved``), so the machine's drift hits them alike; so do
the two loops of 5. The steps of 1-4 are ``kronjax.jit_train_step``, one call
(and one wait) per step: each call also pays a fixed cost for the dispatch and for
starting the compiled program, more for the step's dozen operations than for the
floor's two, which ``fit``'s loop pays once per chunk. The floor, the update path a step
takes and ``fit``'s chunk loop are internals with no public API, so they come from
``kronjax._src`` (``products``, ``rows``, ``runners``).

    .venv/bin/python experiments/bench_step.py [--smoke] [--rounds 10] [--out experiments/results/step.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax import dense
from kronjax._src.kernels import products  # the floor's kernel: internal, timed on its own
from kronjax._src.kernels import rows  # add_rows_product: the sparse floor, internal
from kronjax._src.train import runners  # fit's compiled chunk loop, internal
from kronjax.experiments import timing as bench


def _dims_for(log2_d: int) -> tuple[int, int]:
  return (2 ** (log2_d // 2), 2 ** (log2_d - log2_d // 2))


def _batches(n, batch, count, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.choice(n, batch, replace=False).astype(np.int32)) for _ in range(count)]


def kron_state(key, m, n, log2_d, *, update="auto", gram="precomputed", lr=0.5, plan_kw=None):
  """A plain-SGD state on the planted regression task with ``d = 2**log2_d``, and the
  jitted donated step on its dataset: ``(step(state, batch), state)``."""
  data, labels = kronjax.data.planted(key, n, _dims_for(log2_d), task="regression")
  dataset = kronjax.Dataset(data, labels, gram=gram)
  config = kronjax.Config(width=m, init="implicit")
  plan = kronjax.Plan(update=update, **(plan_kw or {}))
  state = kronjax.init(key, config, dataset, optax.sgd(lr), plan=plan)
  step = lambda s, b: kronjax.jit_train_step(s, dataset, b)
  step.dataset = dataset
  return step, state


def chunk_run(key, m, n, batch, log2_d, *, loop, calls, **state_kw):
  """The step as ``kronjax.fit`` runs it: ``loop`` steps per call of fit's compiled chunk
  loop (``runners.run_chunk``: every metric stacked, the stop test after each step), as
  ``(fn, state, batches)`` for ``bench.time_steps_interleaved``; ``batches`` ``(loop, B)``."""
  step, state = kron_state(key, m, n, log2_d, **state_kw)
  limit, live = np.float32(np.inf), np.ones((), bool)

  def chunk(state, batches):
    state, packed, _ = runners._chunk(state, step.dataset, batches, np.int32(loop), live, limit)
    return state, packed

  groups = np.asarray(_batches(n, batch, loop * calls, seed=log2_d)).reshape(calls, loop, batch)
  return chunk, state, list(groups)


def _describe(state, step, batch, timing):
  """Adds the active count, overflow flag and update path of one more step to ``timing``."""
  _, metrics = step(state, _batches(state.n, batch, 1, seed=1)[0])
  timing.update(active=float(metrics["active"]), overflow=bool(metrics["overflow"]),
                active_capacity=state.resolved_plan.active_capacity,
                path=state.update_path(batch))
  return {k: v for k, v in timing.items() if k not in ("times_s",)}


def kron_step_time(key, m, n, batch, log2_d, *, steps=60, **state_kw):
  step, state = kron_state(key, m, n, log2_d, **state_kw)
  timing, state = bench.time_steps(step, state, _batches(n, batch, steps))
  return _describe(state, step, batch, timing)


def floor_run(key, m, n, batch, capacity, path, layout, firing_probability, steps=20, loop=0):
  """The bare P update a step of this path and layout cannot avoid, same static shapes,
  as ``(fn, P, args)`` for ``bench.time_steps_interleaved``; with ``loop``, ``fn`` runs
  ``loop`` of them per call in a ``lax.scan`` (``steps // loop`` calls).

  full, ``P (m, n)`` neuron-major: reading the batch's columns ``P[:, idx]``
  (``rows.take_cols``) and ``P + U^T @ K_rows`` (``products.add_product``, which skips
  the neurons whose coefficients are all zero: here the neurons none of the batch's ``B``
  points fires, each point firing a random ``firing_probability`` of them, as at init);
  full, ``P (n, m)`` point-major: ``P + K_rows^T @ U`` (``products.add_product_t``, every
  neuron; the batch's rows are contiguous and cheap to read), as the step calls them;
  sparse: the update of the
  ``T = min(m, B K)`` touched rows, ``P[T] += U @ K_rows`` (``rows.add_rows_product``, as the
  step calls it).
  """
  rng = np.random.default_rng(0)
  K_rows = [jnp.asarray(rng.normal(size=(batch, n)).astype(np.float32)) for _ in range(steps)]
  if path == "full" and layout == "points":  # the op the step runs (the native kernel on CPU)
    P = jax.random.normal(key, (n, m))
    U = [jnp.asarray(rng.normal(size=(batch, m)).astype(np.float32)) for _ in range(steps)]
    body = lambda P, a: (products.add_product_t(P, a[0], a[1]), None)
    args = list(zip(K_rows, U))
  elif path == "full":
    P = jax.random.normal(key, (m, n))
    fires = [rng.random((m, batch)) < firing_probability for _ in range(steps)]
    U_T = [jnp.asarray((rng.normal(size=(m, batch)) * f).astype(np.float32)) for f in fires]
    idx = _batches(n, batch, steps, seed=2)

    def read_then_add(P, a):
      # The product's coefficients depend on the columns read, as the step's do: so the
      # read comes first and the product updates P in place (no copy of P).
      cols = rows.take_cols(P, a[2])                                   # (B, m)
      U_T = jnp.where(cols.T > -jnp.inf, a[0], 0.0)
      return products.add_product(P, U_T, a[1]), None

    body = read_then_add
    args = list(zip(U_T, K_rows, idx))
  else:
    P = jax.random.normal(key, (m, n))
    T_cap = min(m, batch * capacity)
    T = [jnp.asarray(np.sort(rng.choice(m, T_cap, replace=False)).astype(np.int32)) for _ in range(steps)]
    U = [jnp.asarray(rng.normal(size=(T_cap, batch)).astype(np.float32)) for _ in range(steps)]
    body = lambda P, a: (rows.add_rows_product(P, a[0], a[1], a[2])[0], None)
    args = list(zip(T, U, K_rows))
  if not loop:
    return jax.jit(body, donate_argnums=0), P, args
  groups = [jax.tree.map(lambda *x: jnp.stack(x), *args[i:i + loop])
            for i in range(0, len(args) - loop + 1, loop)]
  return jax.jit(lambda P, g: jax.lax.scan(body, P, g), donate_argnums=0), P, groups


def dense_step_time(key, m, n, batch, log2_d, *, steps=8, max_bytes=4 * 2**30):
  d = 2**log2_d
  need = 4 * (m * d * 3 + n * d)  # W, its gradient, the update, and X
  if need > max_bytes:
    return {"skipped": f"dense needs ~{need / 2**30:.1f} GiB > {max_bytes / 2**30:.1f} GiB cap"}
  data, labels = kronjax.data.planted(key, n, _dims_for(log2_d), task="regression")
  X = data.materialize()
  config = kronjax.Config(width=m)
  tx = optax.sgd(0.5)
  state = dense.init(key, config, _dims_for(log2_d), tx, dtype=X.dtype)
  step = dense.make_step(config, tx)
  batches = [(X[b], labels[b]) for b in _batches(n, batch, steps)]
  timing, _ = bench.time_steps(lambda s, xy: step(s, *xy), state, batches, warmup=2)
  return timing


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  parser.add_argument("--out", default="experiments/results/step.json")
  parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
  parser.add_argument("--update", default="full", choices=("auto", "full", "sparse"),
                      help="update path of the m x n steps (full: P stored point-major)")
  args = parser.parse_args(argv)
  key = jax.random.PRNGKey(0)
  if args.smoke:
    m, n, batch, log2_ds, dense_log2_d, big_m, big_n = 256, 64, 8, (6, 8, 10), 8, 1024, 64
    rounds, steps_per_round = 2, 5
  else:
    m, n, batch, log2_ds, dense_log2_d, big_m, big_n = 4096, 1024, 32, (10, 14, 20), 16, 65536, 512
    rounds, steps_per_round = args.rounds, 20
  out = {**bench.provenance(), "m": m, "n": n, "batch": batch}

  # The steps at every d, the step at the dense comparison's d and the floor are
  # timed in interleaved rounds: ratios of medians taken minutes apart swung by
  # 20 % with the machine's drift.
  # The steps run with update=args.update (default "full": the path auto picks
  # here) in the default layout (neuron-major P); the d = 2**16 step is also run with
  # P stored the other way (same path) to show what the layout buys.
  log2_d_all = sorted(set(log2_ds) | {dense_log2_d})
  runs = {f"d=2^{d}": (*kron_state(key, m, n, d, update=args.update),
                       _batches(n, batch, steps_per_round + 3, seed=d)) for d in log2_d_all}
  path = runs[f"d=2^{dense_log2_d}"][1].update_path(batch)
  layout = runs[f"d=2^{dense_log2_d}"][1].layout
  other = "points" if layout == "neurons" and path == "full" else "neurons"
  cap = kronjax.Plan().resolve(kronjax.Config(width=m)).active_capacity
  runs["other"] = (*kron_state(key, m, n, dense_log2_d, update=args.update,
                               plan_kw={"layout": other}),
                   _batches(n, batch, steps_per_round + 3, seed=dense_log2_d))
  runs["floor"] = floor_run(key, m, n, batch, cap, path, layout,
                            kronjax.Config(width=m).firing_probability, steps=steps_per_round + 3)
  timings, states = bench.time_steps_interleaved(runs, rounds=rounds)
  kron = {d: _describe(states[f"d=2^{d}"], runs[f"d=2^{d}"][0], batch, timings[f"d=2^{d}"])
          for d in log2_d_all}
  kron_other = _describe(states["other"], runs["other"][0], batch, timings["other"])
  out["update"], out["layout"] = args.update, layout

  rows = []
  for log2_d in log2_ds:
    t = kron[log2_d]
    rows.append({"log2_d": log2_d, **t})
    print(f"kronjax  d=2^{log2_d:<2d} step {t['median_s'] * 1e3:8.3f} ms  active {t['active']:.1f}  path {t['path']}")
  medians = [r["median_s"] for r in rows]
  out["flat_in_d"] = {"rows": rows, "max_over_min": max(medians) / min(medians)}
  print(f"flat in d: max/min = {out['flat_in_d']['max_over_min']:.3f}")

  kron_d16 = kron[dense_log2_d]
  fl = {k: v for k, v in timings["floor"].items() if k != "times_s"}
  fl["path"] = path
  ratios = [s_ / f_ for s_, f_ in zip(kron_d16["round_medians_s"], fl["round_medians_s"])]
  out["floor"] = {"capacity": cap, "floor": fl, "kronjax": kron_d16, "rounds": rounds,
                  "steps_per_round": steps_per_round,
                  "ratio": kron_d16["median_s"] / fl["median_s"],
                  "ratio_per_round": ratios}
  print(f"floor ({path} P update, same shapes): {fl['median_s'] * 1e3:.3f} ms; "
        f"step/floor = {out['floor']['ratio']:.2f} (per round {min(ratios):.2f}-{max(ratios):.2f}; "
        f"layout {out['layout']})")
  out["floor"]["other_layout"] = {
      "kronjax": kron_other, "layout": states["other"].layout,
      "ratio": kron_other["median_s"] / fl["median_s"]}
  print(f"same step with layout={other!r} (path {kron_other['path']}): "
        f"{kron_other['median_s'] * 1e3:.3f} ms; "
        f"step/floor = {out['floor']['other_layout']['ratio']:.2f}")

  # 5. The same pair inside compiled loops: what fit's chunks run, without a dispatch per step.
  loop, calls = (4, 5) if args.smoke else (20, 7)
  loop_runs = {
      "step": chunk_run(key, m, n, batch, dense_log2_d, loop=loop, calls=calls,
                        update=args.update),
      "floor": floor_run(key, m, n, batch, cap, path, layout,
                         kronjax.Config(width=m).firing_probability, steps=loop * calls,
                         loop=loop)}
  loop_timings, _ = bench.time_steps_interleaved(loop_runs, rounds=rounds)
  per_step = {k: {"median_s": t["median_s"] / loop,
                  "round_medians_s": [r / loop for r in t["round_medians_s"]]}
              for k, t in loop_timings.items()}
  loop_ratios = [s_ / f_ for s_, f_ in zip(per_step["step"]["round_medians_s"],
                                           per_step["floor"]["round_medians_s"])]
  out["floor"]["in_loop"] = {"steps_per_call": loop, "step": per_step["step"],
                             "floor": per_step["floor"],
                             "ratio": per_step["step"]["median_s"] / per_step["floor"]["median_s"],
                             "ratio_per_round": loop_ratios}
  print(f"in compiled loops of {loop} steps: step {per_step['step']['median_s'] * 1e3:.3f} ms, "
        f"floor {per_step['floor']['median_s'] * 1e3:.3f} ms; step/floor = "
        f"{out['floor']['in_loop']['ratio']:.2f} (per round {min(loop_ratios):.2f}-"
        f"{max(loop_ratios):.2f})")

  dense_d16 = dense_step_time(key, m, n, batch, dense_log2_d)
  out["vs_dense"] = {"log2_d": dense_log2_d, "kronjax": kron_d16, "dense": dense_d16}
  if "median_s" in dense_d16:
    out["vs_dense"]["speedup"] = dense_d16["median_s"] / kron_d16["median_s"]
    print(f"d=2^{dense_log2_d}: dense {dense_d16['median_s'] * 1e3:.1f} ms vs kronjax "
          f"{kron_d16['median_s'] * 1e3:.3f} ms: {out['vs_dense']['speedup']:.0f}x")
  else:
    print(f"d=2^{dense_log2_d}: dense {dense_d16['skipped']}")

  sparse = kron_step_time(key, big_m, big_n, 1, 10, update="sparse", steps=40)
  dense_path = kron_step_time(key, big_m, big_n, 1, 10, update="full", steps=20)
  out["batch1_paths"] = {"m": big_m, "n": big_n, "sparse": sparse, "dense": dense_path,
                         "speedup": dense_path["median_s"] / sparse["median_s"]}
  print(f"batch 1, m={big_m}, n={big_n}: sparse {sparse['median_s'] * 1e3:.3f} ms, dense "
        f"{dense_path['median_s'] * 1e3:.3f} ms: {out['batch1_paths']['speedup']:.1f}x")
  bench.write_json(args.out, out)
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
