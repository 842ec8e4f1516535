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
