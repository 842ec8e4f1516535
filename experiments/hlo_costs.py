"""What an accelerator will spend a training step on, read from the compiled XLA program.

On a GPU or TPU kronjax runs JAX's own operations (the native CPU kernels are CPU-only),
so the step is the XLA program compiled here with the native kernels switched off. For
each shape this script compiles ``kronjax.jit_train_step`` on the XLA path and counts,
from the optimized HLO (``kronjax.experiments.hlo.kernel_costs``), the kernels it
launches (a ``while`` loop's body once per iteration) and the bytes each moves, next to
XLA's own ``cost_analysis`` (flops, bytes accessed). A simple model turns the counts into
the two times that bound a step on an accelerator: ``launches x launch_us`` and
``bytes / bandwidth``; the larger one is what is expected to dominate. The model's
constants (an H100's HBM bandwidth and a few microseconds per launch) are recorded in the
JSON; the accelerator check measures the real times where a GPU is lent.

Shapes: the performance page's minibatch step (m = 4096, n = 1024, B = 32, full path,
both layouts), its batch-1 step (m = 65536, n = 512, B = 1, sparse path), and pairwise
entity-indexed data (n = 20,000 pairs of 2,000 x 250 entities, m = 1024, B = 64).

    python experiments/hlo_costs.py [--smoke] [--out experiments/results/hlo_costs.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax._src.kernels import dispatch
from kronjax.experiments import hlo
from kronjax.experiments import timing

BANDWIDTH = 3.35e12  # bytes/s: an H100 SXM's HBM3
LAUNCH_US = 4.0      # microseconds per kernel launch and its synchronization, typical on GPU

CASES = (
    {"name": "minibatch, point-major", "width": 4096, "n": 1024, "batch": 32,
     "plan": {"update": "full", "layout": "points"}},
    {"name": "minibatch, neuron-major", "width": 4096, "n": 1024, "batch": 32,
     "plan": {"update": "full", "layout": "neurons"}},
    {"name": "batch 1, sparse", "width": 65536, "n": 512, "batch": 1,
     "plan": {"update": "sparse", "layout": "neurons"}},
    {"name": "pairs of entities", "width": 1024, "n": 20000, "batch": 64,
     "entities": (2000, 250), "dims": (64, 32), "plan": {"update": "full", "layout": "points"}},
)
SMOKE = (
    {"name": "minibatch, point-major", "width": 64, "n": 32, "batch": 4,
     "plan": {"update": "full", "layout": "points"}},
    {"name": "pairs of entities", "width": 32, "n": 40, "batch": 4, "entities": (6, 5),
     "dims": (4, 3), "plan": {"update": "sparse", "layout": "neurons"}},
)


def dataset_for(case: dict) -> kronjax.Dataset:
  """Unit-norm random data of the case's shape: per point, or entity-indexed pairs."""
  n = case["n"]
  labels = np.random.default_rng(3).normal(size=(n, 1)).astype(np.float32)
  if "entities" not in case:
    return kronjax.Dataset(kronjax.data.synthetic(jax.random.PRNGKey(0), n, (32, 32)), labels)
  rng = np.random.default_rng(1)
  tables = []
  for N, d in zip(case["entities"], case["dims"]):
    F = rng.normal(size=(N, d)).astype(np.float32)
    tables.append(F / np.linalg.norm(F, axis=1, keepdims=True))
  index = np.stack([rng.integers(0, N, size=n, dtype=np.int32) for N in case["entities"]], 1)
  return kronjax.Dataset(kronjax.KronData(tuple(tables), index=index), labels)


def measure(case: dict) -> dict:
  """The compiled XLA step's kernels, bytes and flops for one case, and the model's times."""
  dataset = dataset_for(case)
  m, n, B = case["width"], case["n"], case["batch"]
  state = kronjax.init(jax.random.PRNGKey(2), kronjax.Config(width=m), dataset, optax.sgd(0.5),
                       plan=kronjax.Plan(**case["plan"]))
  batch = jnp.arange(B, dtype=jnp.int32)
  with dispatch.disabled():
    # Donated, as kronjax.jit_train_step runs it: P is updated in place, not copied.
    compiled = jax.jit(kronjax.train_step, donate_argnums=0).lower(state, dataset, batch).compile()
  text = compiled.as_text()
  if 'custom_call_target="kronjax_' in text:
    raise RuntimeError("the native kernels were compiled into the XLA-path step")
  costs = hlo.kernel_costs(text)
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  itemsize = np.dtype(state.P.dtype).itemsize
  # The bytes floor of the step: the P entries it must read and write (all of P on the full
  # path; the active neurons' rows of the batch on the sparse one) and the Gram rows it reads.
  touched_P = m * n if case["plan"]["update"] == "full" else m * B
  floor = (2 * touched_P + B * n) * itemsize
  launch_s = costs["kernels"] * LAUNCH_US * 1e-6
  memory_s = costs["bytes"] / BANDWIDTH
  return {
      "case": case["name"], "width": m, "n": n, "batch": B, "plan": case["plan"],
      "entities": list(case.get("entities", ())),
      "kernels": costs["kernels"], "bytes": costs["bytes"], "floor_bytes": floor,
      "xla_flops": float(analysis.get("flops", 0.0)),
      "xla_bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
      "by_category": costs["by_category"],
      "largest": [{"bytes": b, "op": op, "category": cat, "type": t}
                  for b, op, cat, t in costs["largest"]],
      "loops": costs["loops"], "unknown_trip_loops": costs["unknown_trip_loops"],
      "model_launch_ms": 1e3 * launch_s, "model_memory_ms": 1e3 * memory_s,
      "dominant": "kernel launches" if launch_s > memory_s else "memory traffic",
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (seconds)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out or ("experiments/results/hlo_costs_smoke.json" if args.smoke
                                  else "experiments/results/hlo_costs.json"))
  results = [measure(case) for case in (SMOKE if args.smoke else CASES)]
  record = {**timing.provenance(), "model": {"bandwidth_bytes_per_s": BANDWIDTH,
                                              "launch_us": LAUNCH_US},
            "results": results}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1) + "\n")
  for r in results:
    print(f"{r['case']:>24}: {r['kernels']:6d} kernels, {r['bytes'] / 2**20:9.2f} MiB "
          f"(floor {r['floor_bytes'] / 2**20:8.2f} MiB); model: launches {r['model_launch_ms']:.3f} ms, "
          f"memory {r['model_memory_ms']:.3f} ms -> {r['dominant']}")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
