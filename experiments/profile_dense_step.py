"""Where the dense-path step's time goes (m = 4096, n = 1024, batch 32, plain SGD).

Times, in one process and in interleaved rounds (``timing.time_steps_interleaved``),
medians after compilation: the full donated train step (``kronjax.jit_train_step``)
with ``P`` neuron-major (``Plan(layout="neurons")``) and point-major
(``Plan(update="full")``: ``Plan.layout``); the bare update floor ``P + G @ K_rows``; the neuron-major
forward's strided read ``P[:, S]``; and that read plus the update in one jitted
function.

    .venv/bin/python experiments/profile_dense_step.py [--rounds 10] [--smoke]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.experiments import timing as bench


def main(argv=None, m=4096, n=1024, batch=32):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (m=256, n=64, batch 8)")
  args = parser.parse_args(argv)
  if args.smoke:
    m, n, batch = 256, 64, 8
  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, n, (32, 32), task="regression")
  dataset = kronjax.Dataset(data, labels)
  config = kronjax.Config(width=m, init="implicit")
  state = kronjax.init(key, config, dataset, optax.sgd(0.5), plan=kronjax.Plan(layout="neurons"))
  points = kronjax.init(key, config, dataset, optax.sgd(0.5), plan=kronjax.Plan(update="full"))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.choice(n, batch, replace=False).astype(np.int32)) for _ in range(23)]
  K, a, P = (jnp.array(x, copy=True) for x in (dataset.gram, state.a, state.P))  # the step donates state

  def floor(P, b):
    return P + (P[:, :batch] * 1e-3) @ K[b], None

  def read(P, b):
    return P, P[:, b]

  def read_and_update(P, b):
    G = jnp.where(P[:, b] > 1.8, a @ jnp.ones((1, batch), P.dtype), 0.0) * 1e-3
    return P + G @ K[b], None

  def step(s, b):
    return kronjax.jit_train_step(s, dataset, b)

  runs = {"full step": (step, state, batches), "full step, points": (step, points, batches)}
  for name, f in (("floor", floor), ("read P[:, S]", read), ("read + update", read_and_update)):
    runs[name] = (jax.jit(f, donate_argnums=0), jnp.array(P, copy=True), batches)
  timings, _ = bench.time_steps_interleaved(runs, rounds=args.rounds)
  for name, t in timings.items():
    print(f"{name:18s} {t['median_s'] * 1e3:7.3f} ms  (p10 {t['p10_s'] * 1e3:.3f}, "
          f"p90 {t['p90_s'] * 1e3:.3f})")
  for name in ("full step", "full step, points"):
    print(f"{name} / floor: {timings[name]['median_s'] / timings['floor']['median_s']:.2f}")
  return timings


if __name__ == "__main__":
  main()
