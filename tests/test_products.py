"""kronjax.products.add_product: exactly X + G @ R, under every batching (float64)."""

import chex
import jax
import jax.numpy as jnp
import pytest

from kronjax import products


def _operands(S=3, m=6, B=4, n=5, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (S, m, n)), jax.random.normal(k2, (S, m, B)),
          jax.random.normal(k3, (S, B, n)))


def _reference(X, G, R):
  return X + G @ R


@pytest.fixture(params=["loop", "batched"])
def rule(request, monkeypatch):
  """Runs the test with the CPU loop forced (threshold 0) and with it never taken."""
  monkeypatch.setattr(products, "LOOP_MIN_BYTES", 0 if request.param == "loop" else 2**62)
  return request.param


def test_unbatched_equals_expression(x64):
  X, G, R = (x[0] for x in _operands())
  chex.assert_trees_all_close(jax.jit(products.add_product)(X, G, R), _reference(X, G, R),
                              rtol=1e-14, atol=0)


@pytest.mark.parametrize("in_axes", [(0, 0, None), (0, 0, 0), (None, 0, None), (0, None, None)])
def test_vmap_equals_vmap_of_expression(x64, rule, in_axes):
  X, G, R = _operands()
  args = [x if ax == 0 else x[0] for x, ax in zip((X, G, R), in_axes)]
  got = jax.jit(jax.vmap(products.add_product, in_axes=in_axes))(*args)
  want = jax.vmap(_reference, in_axes=in_axes)(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


def test_nested_vmap_and_donation(x64, rule):
  X, G, R = _operands(S=6)
  X, G = X.reshape(2, 3, *X.shape[1:]), G.reshape(2, 3, *G.shape[1:])
  inner = jax.vmap(products.add_product, in_axes=(0, 0, None))
  want = jax.vmap(jax.vmap(_reference, in_axes=(0, 0, None)), in_axes=(0, 0, None))(X, G, R[0])
  got = jax.jit(jax.vmap(inner, in_axes=(0, 0, None)), donate_argnums=0)(jnp.array(X, copy=True),
                                                                        G, R[0])
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


def test_loop_is_what_runs_on_cpu(rule):
  X, G, R = _operands()
  hlo = jax.jit(jax.vmap(products.add_product, in_axes=(0, 0, None))).lower(X, G, R[0]).as_text()
  assert ("while" in hlo) == (rule == "loop" and jax.default_backend() == "cpu")


def test_mixed_dtypes_promote_like_the_expression(x64, rule):
  X, G, R = _operands()
  X = X.astype(jnp.float32)
  got = jax.jit(jax.vmap(products.add_product, in_axes=(0, 0, None)))(X, G, R[0])
  want = jax.vmap(_reference, in_axes=(0, 0, None))(X, G, R[0])
  assert got.dtype == want.dtype == jnp.float64
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("batched", [False, True])
def test_gradients_equal_the_expression(x64, rule, batched):
  X, G, R = _operands()

  def loss(fn, X, G, R):
    out = jax.vmap(fn, in_axes=(0, 0, None))(X, G, R[0]) if batched else fn(X[0], G[0], R[0])
    return jnp.sum(jnp.sin(out))

  got = jax.grad(lambda *a: loss(products.add_product, *a), argnums=(0, 1, 2))(X, G, R)
  want = jax.grad(lambda *a: loss(_reference, *a), argnums=(0, 1, 2))(X, G, R)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
  tangent = jax.jvp(lambda x: loss(products.add_product, x, G, R), (X,), (jnp.ones_like(X),))[1]
  want_t = jax.jvp(lambda x: loss(_reference, x, G, R), (X,), (jnp.ones_like(X),))[1]
  chex.assert_trees_all_close(tangent, want_t, rtol=1e-12, atol=1e-12)
