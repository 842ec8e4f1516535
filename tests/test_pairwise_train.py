"""Training and predicting on entity-indexed (pairwise) data, exact against dense SGD (float64).

Indexed data trains through the entity Grams (no ``n x n`` matrix) and the kronecker init
through entity projections; both must give dense SGD's step on the materialized pairs, and
``predict`` on new pairs (known entities, and a cold-start entity given by new tables) must
equal the dense network's outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax import KronData, dense
from kronjax._src.model import kronecker_init

pytestmark = pytest.mark.usefixtures("x64_module")

DIMS = {2: (3, 5), 3: (2, 3, 4)}
ENTITIES = {2: (9, 6), 3: (5, 4, 6)}
TXS = {"sgd": lambda: optax.sgd(0.4), "momentum": lambda: optax.sgd(0.3, momentum=0.8)}


def _pairs(p, n, seed=0):
  rng = np.random.default_rng(seed)
  tables = tuple(rng.standard_normal((N, d)) for N, d in zip(ENTITIES[p], DIMS[p]))
  index = np.stack([rng.integers(0, N, n) for N in ENTITIES[p]], axis=1)
  return tables, index


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


@pytest.mark.parametrize("p", [2, 3])
def test_kronecker_init_through_entities_equals_per_point(p):
  tables, index = _pairs(p, 80)
  data = KronData(tables, index=index)
  got, want = kronecker_init.kronecker_projections(jax.random.PRNGKey(0), 40, 3,
                                                   (data, data.per_point()))
  assert _rel(got, want) < 1e-13


@pytest.mark.parametrize("p,tx_name,plan", [
    (2, "sgd", None), (2, "momentum", kronjax.Plan(update="sparse")),
    (3, "sgd", kronjax.Plan(update="full")), (3, "momentum", None)])
def test_indexed_training_matches_dense_sgd_with_eval_pairs_and_cold_start(p, tx_name, plan):
  tables, index = _pairs(p, 70)
  rng = np.random.default_rng(1)
  data = KronData(tables, index=index).normalize()
  eval_data = KronData(data.factors, index=np.stack(
      [rng.integers(0, N, 9) for N in ENTITIES[p]], axis=1))
  y = jnp.asarray(rng.standard_normal(70))
  y_eval = jnp.asarray(rng.standard_normal(9))
  dataset = kronjax.Dataset(data, y, eval_data=eval_data, eval_labels=y_eval)
  assert dataset.gram_mode == "entities" and dataset.gram is None
  config = kronjax.Config(width=48, threshold=0.3, output_bias=True)
  key = jax.random.PRNGKey(2)
  state = kronjax.init(key, config, dataset, TXS[tx_name](), plan=plan)
  X = data.materialize()
  dstate = dense.init(key, config, data.dims, TXS[tx_name](), dtype=X.dtype)
  dstep = dense.make_step(config, TXS[tx_name](), donate=False)
  step = jax.jit(kronjax.train_step)
  for _ in range(20):
    bi = rng.choice(70, 5, replace=False).astype(np.int32)
    state, m = step(state, dataset, jnp.asarray(bi))
    assert not bool(m["skipped"])
    dstate, _ = dstep(dstate, X[bi], dataset.labels[bi].reshape(-1, 1))
  W = dstate.params["W"]
  assert _rel(state.P, W @ X.T) < 1e-9
  assert _rel(state.P_eval, W @ eval_data.materialize().T) < 1e-9

  # New pairs: known entities, and a cold-start entity (a new last row in table 0).
  new_row = rng.standard_normal((1, DIMS[p][0]))
  new_tables = (np.concatenate([np.asarray(data.factors[0]), new_row / np.linalg.norm(new_row)]),
                ) + tuple(np.asarray(f) for f in data.factors[1:])
  new_index = np.stack([rng.integers(0, f.shape[0], 11) for f in new_tables], axis=1)
  new_index[:3, 0] = new_tables[0].shape[0] - 1
  new = KronData(new_tables, index=new_index)
  want = dense.forward(W, dstate.a, dstate.b, new.materialize(), dstate.bias)
  assert _rel(kronjax.predict(state, dataset, new), want) < 1e-9


def test_predict_tells_indexed_points_apart_by_their_index(tmp_path):
  tables, index = _pairs(2, 30)
  data = KronData(tables, index=index).normalize()
  dataset = kronjax.Dataset(data, jnp.asarray(np.linspace(-1, 1, 30)))
  state = kronjax.init(jax.random.PRNGKey(0), kronjax.Config(width=32, threshold=0.3), dataset,
                       optax.sgd(0.3))
  state, _ = kronjax.fit(state, dataset, jax.random.PRNGKey(1), batch_size=5, steps=8,
                         progress=False)
  other = KronData(data.factors, index=np.roll(np.asarray(index), 1, axis=0))
  X_other = other.materialize()
  params = kronjax.dense_params(state, dataset)
  want = dense.forward(params["W"], params["a"], state.b, X_other, params["bias"])
  assert _rel(kronjax.predict(state, dataset, other), want) < 1e-9
  path = kronjax.network.save(tmp_path / "net.npz", state, dataset)
  loaded = kronjax.network.load(path)
  assert loaded.data.is_indexed
  assert _rel(loaded.predict(other), want) < 1e-9
