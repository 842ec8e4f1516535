"""kronjax._src.kernels.products.add_product (and add_product_t, the same with G given transposed):
exactly X + G @ R, under every batching (float64).

Every test runs with each CPU implementation: the native kernel (``kronjax._src.kernels.native``)
with a dense ``G`` (its gemm) and with a mostly-zero ``G`` (its zero-skipping
loop: 2 nonzeros in 24 entries per member, under its 10 % switch), and XLA's
in-place member loop and batched product (``dispatch.set_enabled(False)``).
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import products

pytestmark = pytest.mark.slow  # left out of make test-fast


SPARSE = {"sparse": True}


def _operands(S=3, m=6, B=4, n=5, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  G = jax.random.normal(k2, (S, m, B))
  if SPARSE["sparse"]:  # two nonzeros per member (one a negative zero's neighbour), rows of zeros
    keep = jnp.zeros((m, B), bool).at[0, 0].set(True).at[m - 1, B - 2].set(True)
    G = jnp.where(keep, G, -0.0)
  return (jax.random.normal(k1, (S, m, n)), G, jax.random.normal(k3, (S, B, n)))


def _reference(X, G, R):
  return X + G @ R


OPS = {"add_product": products.add_product,
       # add_product_t takes G transposed; these tests hand it G's transpose.
       "add_product_t": lambda X, G, R: products.add_product_t(X, jnp.swapaxes(G, -1, -2), R)}


@pytest.fixture(params=list(OPS))
def op(request):
  return OPS[request.param]


@pytest.fixture(params=["native", "native_sparse", "loop", "batched"])
def rule(request, monkeypatch):
  """The native kernel (dense / mostly-zero G), XLA's loop forced, XLA's batched product."""
  use_native = request.param.startswith("native")
  if use_native and not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  monkeypatch.setattr(products, "LOOP_MIN_BYTES", 0 if request.param == "loop" else 2**62)
  monkeypatch.setitem(SPARSE, "sparse", request.param == "native_sparse")
  previous = dispatch.set_enabled(use_native)
  yield request.param
  dispatch.set_enabled(previous)


def _fresh(fn):
  """A new function object: the switches are read at trace time, and jit would
  reuse a trace that another rule made of the same function."""
  return lambda *args: fn(*args)


def test_unbatched_equals_expression(x64, rule, op):
  X, G, R = (x[0] for x in _operands())
  chex.assert_trees_all_close(jax.jit(_fresh(op))(X, G, R), _reference(X, G, R),
                              rtol=1e-14, atol=0)


@pytest.mark.parametrize("in_axes", [(0, 0, None), (0, 0, 0), (None, 0, None), (0, None, None)])
def test_vmap_equals_vmap_of_expression(x64, rule, in_axes, op):
  X, G, R = _operands()
  args = [x if ax == 0 else x[0] for x, ax in zip((X, G, R), in_axes)]
  got = jax.jit(jax.vmap(op, in_axes=in_axes))(*args)
  want = jax.vmap(_reference, in_axes=in_axes)(*args)
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


def test_nested_vmap_and_donation(x64, rule, op):
  X, G, R = _operands(S=6)
  X, G = X.reshape(2, 3, *X.shape[1:]), G.reshape(2, 3, *G.shape[1:])
  inner = jax.vmap(op, in_axes=(0, 0, None))
  want = jax.vmap(jax.vmap(_reference, in_axes=(0, 0, None)), in_axes=(0, 0, None))(X, G, R[0])
  got = jax.jit(jax.vmap(inner, in_axes=(0, 0, None)), donate_argnums=0)(jnp.array(X, copy=True),
                                                                        G, R[0])
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.perf  # reads the lowered HLO text
@pytest.mark.parametrize("batched", [False, True])
def test_the_chosen_implementation_is_what_runs_on_cpu(rule, batched, op):
  X, G, R = _operands()
  fn = jax.vmap(op, in_axes=(0, 0, None)) if batched else _fresh(op)
  args = (X, G, R[0]) if batched else (X[0], G[0], R[0])
  hlo = jax.jit(fn).lower(*args).as_text()
  cpu = jax.default_backend() == "cpu"
  assert ("kronjax_add_product" in hlo) == (rule.startswith("native") and cpu)
  assert ("while" in hlo) == (rule == "loop" and batched and cpu)


def test_float32_native_matches_float64_expression(rule, op):
  X, G, R = _operands(S=4, m=64, B=8, n=48)
  got = jax.jit(jax.vmap(op, in_axes=(0, 0, None)))(
      *(x.astype(jnp.float32) for x in (X, G, R[0])))
  assert got.dtype == jnp.float32
  want = jax.vmap(_reference, in_axes=(0, 0, None))(X, G, R[0])
  chex.assert_trees_all_close(got, want.astype(jnp.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.perf  # reads the lowered module text
def test_no_native_call_when_lowered_for_gpu(op):
  """The kernel is CPU-only: a cross-platform lowering for CUDA keeps XLA's product."""
  X, G, R = _operands()
  fn = jax.jit(jax.vmap(op, in_axes=(0, 0, None)))
  text = jax.export.export(fn, platforms=["cuda"])(X, G, R[0]).mlir_module()
  assert "kronjax_add_product" not in text and "dot_general" in text


def test_mixed_dtypes_promote_like_the_expression(x64, rule, op):
  X, G, R = _operands()
  X = X.astype(jnp.float32)
  got = jax.jit(jax.vmap(op, in_axes=(0, 0, None)))(X, G, R[0])
  want = jax.vmap(_reference, in_axes=(0, 0, None))(X, G, R[0])
  assert got.dtype == want.dtype == jnp.float64
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("batched", [False, True])
def test_gradients_equal_the_expression(x64, rule, batched, op):
  X, G, R = _operands()

  def loss(fn, X, G, R):
    out = jax.vmap(fn, in_axes=(0, 0, None))(X, G, R[0]) if batched else _fresh(fn)(X[0], G[0], R[0])
    return jnp.sum(jnp.sin(out))

  got = jax.grad(lambda *a: loss(op, *a), argnums=(0, 1, 2))(X, G, R)
  want = jax.grad(lambda *a: loss(_reference, *a), argnums=(0, 1, 2))(X, G, R)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)
  tangent = jax.jvp(lambda x: loss(op, x, G, R), (X,), (jnp.ones_like(X),))[1]
  want_t = jax.jvp(lambda x: loss(_reference, x, G, R), (X,), (jnp.ones_like(X),))[1]
  chex.assert_trees_all_close(tangent, want_t, rtol=1e-12, atol=1e-12)
