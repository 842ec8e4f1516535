"""kronjax._src.kernels.products.trace_product (and trace_product_t): the momentum step
``t' = mu t + nu X + G @ R``, ``X' = X + c t'`` equals its expression under every batching
(float64), with the native kernel (gemm and zero-skipping loop) and with XLA only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import products


def _expression(t, X, G, R, coef):
  mu, nu, c = (coef[..., i, None, None] for i in range(3))
  t = mu * t + nu * X + G @ R
  return t, X + c * t


def _operands(S=3, m=20, B=4, n=9, sparse=False, seed=0):
  rng = np.random.default_rng(seed)
  G = rng.normal(size=(S, m, B))
  if sparse:  # about 5 % nonzero: the kernel's zero-skipping loop
    G = np.where(rng.random(G.shape) < 0.05, G, 0.0)
  return tuple(jnp.asarray(a) for a in (rng.normal(size=(S, m, n)), rng.normal(size=(S, m, n)),
                                        G, rng.normal(size=(S, B, n)),
                                        rng.normal(size=(S, 3))))


OPS = {"trace_product": products.trace_product,
       "trace_product_t": lambda t, X, G, R, c: products.trace_product_t(
           t, X, jnp.swapaxes(G, -1, -2), R, c)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["native", "native_sparse", "xla"])
@pytest.mark.parametrize("in_axes", [(0, 0, 0, 0, 0), (0, 0, 0, None, 0), (0, 0, None, None, None),
                                     (0, 0, 0, None, None)])
def test_vmap_equals_the_expression(x64, op, impl, in_axes):
  if impl != "xla" and not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  args = _operands(sparse=impl == "native_sparse")
  args = tuple(a if ax == 0 else a[0] for a, ax in zip(args, in_axes))
  with dispatch.using(impl != "xla"):
    got = jax.jit(jax.vmap(OPS[op], in_axes=in_axes))(*args)
    one = jax.jit(OPS[op])(*(a if ax is None else a[1] for a, ax in zip(args, in_axes)))
  want = jax.vmap(_expression, in_axes=in_axes)(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
  for g, w in zip(one, want):  # unbatched: member 1
    np.testing.assert_allclose(np.asarray(g), np.asarray(w[1]), rtol=1e-12, atol=1e-12)


def test_the_kernel_runs_in_place_under_vmap():
  if not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  t, X, G, R, coef = (a.astype(jnp.float32) for a in _operands(S=4, m=64, n=48))
  step = jax.jit(jax.vmap(products.trace_product, in_axes=(0, 0, 0, None, 0)),
                 donate_argnums=(0, 1))
  text = step.lower(t, X, G, R[0], coef).as_text()
  assert "kronjax_trace_product" in text
  compiled = step.lower(t, X, G, R[0], coef).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < t.size * t.dtype.itemsize
