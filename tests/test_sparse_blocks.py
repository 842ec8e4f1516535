"""The sparse path's touched-row update in blocks (``step.add_touched_rows_product``).

At large n the whole ``(T, n)`` update would be mapped fresh every step, so the step forms
it a block of rows at a time. The blocks must change nothing: float64 against dense SGD with
blocks of a few rows (the block size patched down), the bucketed index (which reads each
row's change), eval points, schedules and sweeps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.step import step as step_lib
from reference import rel_err, run_pair


def _blocked(block_bytes: int) -> bool:
  """Whether the compiled update loops over blocks (a trace cached before the block size
  changed would not: the fixtures clear JAX's caches)."""
  X, K = jnp.zeros((11, 40)), jnp.zeros((3, 40))
  T, U = jnp.arange(9, dtype=jnp.int32), jnp.zeros((9, 3))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(step_lib, "_BLOCK_BYTES", block_bytes)
    jax.clear_caches()
    text = jax.jit(step_lib.add_touched_rows_product).lower(X, T, U, K).as_text()
  jax.clear_caches()
  return "while" in text


@pytest.fixture
def tiny_blocks(monkeypatch):
  """Blocks of three rows for the n = 40 points of these tests (float64)."""
  monkeypatch.setattr(step_lib, "_BLOCK_BYTES", 3 * 40 * 8)
  jax.clear_caches()   # traces from earlier tests were made with the real block size
  yield
  jax.clear_caches()


def test_blocks_equal_one_product():
  rng = np.random.default_rng(0)
  m, n, B, cap = 11, 40, 3, 9
  X = jnp.asarray(rng.normal(size=(m, n)))
  T = jnp.asarray([0, 2, 3, 7, 10, 11, 12, 13, 14], jnp.int32)   # five rows, then padding
  U = jnp.asarray(rng.normal(size=(cap, B))).at[5:].set(0.0)
  K = jnp.asarray(rng.normal(size=(B, n)))
  want_X = X.at[T[:5]].add(U[:5] @ K)
  want_change = jnp.concatenate([jnp.max(jnp.abs(U[:5] @ K), axis=1), jnp.zeros(4)])
  for block_bytes in (1, 2 * n * 8, 4 * n * 8, 10**9):  # one row, two, four, one block
    assert _blocked(block_bytes) == (block_bytes < cap * n * 8)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(step_lib, "_BLOCK_BYTES", block_bytes)
      jax.clear_caches()
      got_X, got_change = jax.jit(step_lib.add_touched_rows_product)(X, T, U, K)
    jax.clear_caches()
    np.testing.assert_allclose(got_X, want_X, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(got_change, want_change, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("index", ["scan", "bucketed"])
@pytest.mark.parametrize("batch", [1, 4])
def test_sparse_steps_in_blocks_match_dense_sgd(x64, tiny_blocks, index, batch):
  key = jax.random.PRNGKey(0)
  data, labels = kronjax.data.planted(key, 60, (4, 6), task="regression", rank=1)
  train, held = data.subset(np.arange(40)), data.subset(np.arange(40, 60))
  config = kronjax.Config(width=96, threshold=0.6)
  tx = optax.sgd(optax.linear_schedule(2.0, 0.5, 30))
  state, dstate, hist, dataset = run_pair(
      jax.random.PRNGKey(4), config, tx, train, labels[:40], steps=30, batch=batch,
      plan=kronjax.Plan(update="sparse", index=index), eval_data=held, eval_labels=labels[40:])
  assert state.update_path(batch) == "sparse"
  assert rel_err(hist["kron"]["loss"], hist["dense"]["loss"]) < 1e-9
  assert rel_err(kronjax.dense_params(state, dataset)["W"], dstate.params["W"]) < 1e-9
  held_W = dstate.params["W"] @ held.materialize().T                 # (m, n_e)
  assert rel_err(state.P_eval, held_W) < 1e-9
  assert float(jnp.max(jnp.abs(state.A))) > 1e-3
