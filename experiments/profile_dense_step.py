"""Where the dense-path step's time goes (m = 4096, n = 1024, batch 32, plain SGD).

Times, in one process, medians after compilation: the full donated train step;
the bare update floor ``P + G @ K_rows``; the forward's strided read ``P[:, S]``;
and the read plus the update in one jitted function.

    .venv/bin/python -m experiments.profile_dense_step
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronjax
from kronjax.bench import time_steps


def main(m=4096, n=1024, batch=32, rounds=2):
  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, n, (32, 32), task="regression")
  state = kronjax.init(key, kronjax.Config(width=m, init="implicit"), data, labels, optax.sgd(0.5))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.choice(n, batch, replace=False).astype(np.int32)) for _ in range(60)]
  step = jax.jit(kronjax.train_step, donate_argnums=0)
  for _ in range(rounds):
    t, state = time_steps(step, state, batches)
    print(f"full step          {t['median_s'] * 1e3:7.3f} ms")
  P, K, a = state.P, state.gram, state.a

  def floor(P, b):
    return P + (P[:, :batch] * 1e-3) @ K[b], None

  def read(P, b):
    return P, P[:, b]

  def read_and_update(P, b):
    G = jnp.where(P[:, b] > 1.8, a @ jnp.ones((1, batch), P.dtype), 0.0) * 1e-3
    return P + G @ K[b], None

  for name, f in (("floor", floor), ("read P[:, S]", read), ("read + update", read_and_update)):
    fn = jax.jit(f, donate_argnums=0)
    for _ in range(rounds):
      t, P = time_steps(fn, P, batches)
      print(f"{name:18s} {t['median_s'] * 1e3:7.3f} ms")


if __name__ == "__main__":
  main()
