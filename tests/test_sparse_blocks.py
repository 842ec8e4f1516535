"""The sparse path's touched-row update (``rows.add_rows_product``): the native kernel row by
row, and XLA's expression in blocks of rows.

At large n the whole ``(T, n)`` update would be mapped fresh every step, so neither forms it
whole. Neither may change anything: float64 against dense SGD with the native kernel and with
XLA's blocks of a few rows (the block size patched down), the bucketed index (which reads each
row's change), eval points and schedules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import rows
from reference import rel_err, run_pair


def _blocked(block_bytes: int) -> bool:
  """Whether the compiled update loops over blocks (a trace cached before the block size
  changed would not: the fixtures clear JAX's caches)."""
  X, K = jnp.zeros((11, 40)), jnp.zeros((3, 40))
  T, U = jnp.arange(9, dtype=jnp.int32), jnp.zeros((9, 3))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rows, "_BLOCK_BYTES", block_bytes)
    jax.clear_caches()
    text = jax.jit(rows._rows_product_of).lower(X, T, U, K).as_text()
  jax.clear_caches()
  return "while" in text


@pytest.fixture
def tiny_blocks(monkeypatch):
  """Blocks of three rows for the n = 40 points of these tests (float64)."""
  monkeypatch.setattr(rows, "_BLOCK_BYTES", 3 * 40 * 8)
  jax.clear_caches()   # traces from earlier tests were made with the real block size
  yield
  jax.clear_caches()


def test_blocks_equal_one_product(x64):
  rng = np.random.default_rng(0)
  m, n, B, cap = 11, 40, 3, 9
  X = jnp.asarray(rng.normal(size=(m, n)))
  T = jnp.asarray([0, 2, 3, 7, 10, 11, 12, 13, 14], jnp.int32)   # five rows, then padding
  U = jnp.asarray(rng.normal(size=(cap, B))).at[5:].set(0.0)
  K = jnp.asarray(rng.normal(size=(B, n)))
  want_X = X.at[T[:5]].add(U[:5] @ K)
  exact_change = jnp.concatenate([jnp.max(jnp.abs(U[:5] @ K), axis=1), jnp.zeros(4)])
  bound = jnp.abs(U) @ jnp.max(jnp.abs(K), axis=1)

  def check(got_X, got_change):
    np.testing.assert_allclose(got_X, want_X, rtol=1e-14, atol=1e-14)
    assert np.all(np.asarray(got_change) >= np.asarray(exact_change))   # a bound on the change
    np.testing.assert_allclose(got_change, bound, rtol=1e-12)

  check(*jax.jit(rows.add_rows_product)(X, T, U, K))                  # the native kernel on CPU
  for block_bytes in (1, 2 * n * 8, 4 * n * 8, 10**9):  # one row, two, four, one block
    assert _blocked(block_bytes) == (block_bytes < cap * n * 8)
    with pytest.MonkeyPatch.context() as mp, dispatch.disabled():
      mp.setattr(rows, "_BLOCK_BYTES", block_bytes)
      jax.clear_caches()
      got = jax.jit(rows.add_rows_product)(X, T, U, K)
    jax.clear_caches()
    check(*got)


@pytest.mark.parametrize("use_native,index,batch", [
    (True, "scan", 1), (True, "bucketed", 4), (True, "bucketed", 1), (False, "scan", 4),
    (False, "bucketed", 1)])
def test_sparse_steps_match_dense_sgd(x64, tiny_blocks, index, batch, use_native):
  if use_native and not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  with dispatch.using(use_native):
    _check_sparse_steps(index, batch)


def _check_sparse_steps(index, batch):
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


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("in_axes", [(0, 0, 0, None), (0, 0, 0, 0), (None, 0, 0, None),
                                     (0, None, 0, None)])
def test_vmapped_members_each_update_their_own_rows(x64, use_native, in_axes):
  """A sweep's members: their own touched rows and coefficients, the Gram rows shared."""
  if use_native and not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  rng = np.random.default_rng(1)
  S, m, n, B, cap = 3, 13, 40, 4, 6
  X = jnp.asarray(rng.normal(size=(S, m, n)))
  T = jnp.asarray([np.concatenate([np.sort(rng.choice(m, 4, replace=False)), m + np.arange(2)])
                   for _ in range(S)], jnp.int32)
  U = jnp.asarray(rng.normal(size=(S, cap, B))).at[:, 4:].set(0.0)
  K = jnp.asarray(rng.normal(size=(S, B, n)))
  args = tuple(a if ax == 0 else a[0] for a, ax in zip((X, T, U, K), in_axes))
  with dispatch.using(use_native):
    got_X, _ = jax.jit(jax.vmap(rows.add_rows_product, in_axes=in_axes))(*args)
  want = jax.vmap(lambda x, t, u, k: x.at[t].add(u @ k, mode="drop"), in_axes=in_axes)(*args)
  np.testing.assert_allclose(got_X, want, rtol=1e-13, atol=1e-13)
