"""Runs kronjax and the plain dense baseline side by side on the same batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kronjax
from kronjax import dense


def batches(n: int, batch: int, steps: int, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.choice(n, batch, replace=False).astype(np.int32) for _ in range(steps)]


def run_pair(key, config, tx, data, labels, *, plan=None, steps=50, batch=8, seed=0, jit=True,
             eval_data=None, eval_labels=None, gram="precomputed"):
  """Trains kronjax and the dense baseline from the same key on the same batches.

  Builds the ``kronjax.Dataset`` from ``data``, ``labels``, the optional eval
  split and ``gram`` (``"precomputed"`` or ``"factors"``), and the kronjax state
  under the execution plan ``plan`` (a ``kronjax.Plan``; None is the automatic
  one; the dense baseline has no plan). Returns ``(state, dense_state, history,
  dataset)`` with per-step losses and active counts of both runs under
  ``history["kron"]`` and ``history["dense"]``.
  """
  dataset = kronjax.Dataset(data, labels, eval_data=eval_data, eval_labels=eval_labels,
                            gram=gram)
  state = kronjax.init(key, config, dataset, tx, plan=plan)
  X = data.materialize()
  y = dataset.labels
  dstate = dense.init(key, config, data.dims, tx, dtype=X.dtype)
  dstep = dense.make_step(config, tx, donate=False)
  step = jax.jit(kronjax.train_step) if jit else kronjax.train_step
  hist = {"kron": {"loss": [], "active": []}, "dense": {"loss": [], "active": []}}
  for bi in batches(data.n, batch, steps, seed):
    state, m = step(state, dataset, jnp.asarray(bi))
    assert not bool(m["overflow"]), "capacity overflow in an equivalence run"
    dstate, dm = dstep(dstate, X[bi], y[bi])
    hist["kron"]["loss"].append(float(m["loss"]))
    hist["kron"]["active"].append(float(m["active"]))
    hist["dense"]["loss"].append(float(dm["loss"]))
    hist["dense"]["active"].append(float(dm["active"]))
  return state, dstate, hist, dataset


def rel_err(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def assert_same_tree(x, y) -> None:
  """Bit-identical pytrees: the same structure, and every leaf of the same dtype, shape and
  bits (typed PRNG keys compared by their key data)."""
  lx, tx = jax.tree.flatten(x)
  ly, ty = jax.tree.flatten(y)
  assert tx == ty
  for a, b in zip(lx, ly):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
