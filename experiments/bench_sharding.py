"""Benchmark: communication of the neuron-sharded step on 8 simulated CPU devices (issue 6).

Claim measured: one sharded step (``kronjax.sharding.compiled_step``) moves only the
``(B, C)`` all-reduce of the outputs plus a few counters — no ``P``-sized transfer. The
collectives are read from the compiled HLO (``kronjax.experiments.hlo``:
``jit(...).lower(...).compile().as_text()``:
every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute and its
shapes) and compared with ``kronjax.sharding.estimated_bytes`` for the step's update path
(docs/scaling.md).

Step times on simulated devices (8 "devices" sharing this CPU's cores) are recorded
next to the single-device step for completeness; they are not a speed-up measurement.

    .venv/bin/python experiments/bench_sharding.py           # -> experiments/results/sharding.json
    .venv/bin/python experiments/bench_sharding.py --smoke   # -> experiments/results/sharding_smoke.json
"""

from __future__ import annotations

import os

# The simulated devices must exist before jax initializes its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib

import jax
import jax.numpy as jnp
import optax

import kronjax
from kronjax import sharding
from kronjax.experiments import hlo
from kronjax.experiments import timing as bench

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run(m: int, n: int, dims, batch: int, loss: str, classes: int, optimizer: str, devices: int,
        steps: int) -> dict:
  key = jax.random.PRNGKey(0)
  task = "regression" if loss == "mse" else "classification"
  data, labels = kronjax.data.planted(key, n, dims, task=task, num_classes=max(classes, 2))
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=m, loss=loss, num_classes=classes, init="implicit")
  tx = optax.sgd(1.0, momentum=0.9) if optimizer == "momentum" else optax.sgd(1.0)
  state = kronjax.init(key, config, dataset, tx)
  mesh = sharding.neuron_mesh(jax.devices()[:devices])
  batches = [jnp.asarray(b) for b in kronjax.batch_schedule(key, n, batch, steps)]

  sharded = sharding.shard_state(state, mesh)
  ops = hlo.step_collectives(sharded, dataset, batches[0], mesh)
  measured = sum(op["bytes"] for op in ops)
  float_bytes = jnp.zeros((), state.P.dtype).dtype.itemsize
  update = state.update_path(batch)   # the estimate depends on the update path
  estimate = sharding.estimated_bytes(batch, classes, float_bytes=float_bytes, update=update)
  p_bytes = int(state.P.size * state.P.dtype.itemsize)

  step = sharding.compiled_step(mesh)
  sharded_t, _ = bench.time_steps(lambda s, b: step(s, dataset, b), sharded, batches)
  single_t, _ = bench.time_steps(lambda s, b: kronjax.jit_train_step(s, dataset, b),
                                 jax.tree.map(lambda x: jnp.array(x, copy=True), state), batches)
  return {
      "m": m, "n": n, "dims": list(dims), "batch": batch, "loss": loss, "classes": classes,
      "optimizer": optimizer, "devices": devices, "dtype": str(state.P.dtype),
      "update_path": update,
      "collectives": ops, "collective_ops": sorted({op["op"] for op in ops}),
      "measured_bytes": measured, "estimated_bytes": estimate,
      "matches_estimate": measured == estimate["total"],
      "only_all_reduce": all(op["op"] == "all-reduce" for op in ops),
      "largest_collective_bytes": max((op["bytes"] for op in ops), default=0),
      "P_bytes": p_bytes, "P_bytes_over_collective_bytes": p_bytes / max(measured, 1),
      "ring_bytes_sent_per_device": 2 * (devices - 1) / devices * measured,
      "step_sharded_simulated": sharded_t, "step_single_device": single_t,
      "loadavg_1min": os.getloadavg()[0],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds to run")
  p.add_argument("--out", default=None, help="JSON path (default experiments/results/sharding[_smoke].json)")
  args = p.parse_args()
  if jax.device_count() < 8:
    raise SystemExit(f"need 8 devices, found {jax.device_count()}: run in a fresh process "
                     "(XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before jax starts)")
  if args.smoke:
    cases = [dict(m=250, n=64, dims=(8, 8), batch=8, loss="mse", classes=1, optimizer="sgd")]
    steps = 6
  else:
    cases = [dict(m=m, n=512, dims=(16, 32), batch=32, loss=loss, classes=c, optimizer=o)
             for m in (1024, 4096) for loss, c, o in (("mse", 1, "sgd"), ("softmax", 10, "momentum"))]
    cases.append(dict(m=4000, n=512, dims=(16, 32), batch=32, loss="mse", classes=1, optimizer="sgd"))
    steps = 13
  results = [run(**c, devices=8, steps=steps) for c in cases]
  for r in results:
    print(f"m={r['m']:>5} C={r['classes']:>2} {r['optimizer']:>8}: collectives {r['collective_ops']} "
          f"{r['measured_bytes']} B/step (estimate {r['estimated_bytes']['total']} B, match "
          f"{r['matches_estimate']}), P is {r['P_bytes'] / 2**20:.1f} MiB; step sharded(sim) "
          f"{1e3 * r['step_sharded_simulated']['median_s']:.2f} ms, single "
          f"{1e3 * r['step_single_device']['median_s']:.2f} ms")
  out = args.out or RESULTS / ("sharding_smoke.json" if args.smoke else "sharding.json")
  bench.write_json(out, {**bench.provenance(), "results": results})
  print("wrote", out)


if __name__ == "__main__":
  main()
