"""kronjax._src.kernels.rows: the dense step's row ops equal their plain expressions (float64).

Each op runs with the native CPU kernels (``kronjax._src.kernels.native``) and with XLA's
plain expression (``dispatch.set_enabled(False)``), unbatched and under every
batching a sweep produces, including jax.numpy's index semantics (negative
indices, reads clamped, out-of-range writes dropped, repeats accumulated).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronjax
from kronjax._src.kernels import dispatch
from kronjax._src.kernels import native
from kronjax._src.kernels import rows

pytestmark = pytest.mark.slow  # left out of make test-fast

# Negative, repeated and out-of-range entries: every index rule at once.
IDX = np.array([3, -1, 0, 3, 9, -9, 5], np.int32)
N, M, S = 7, 37, 3   # m = 37: a vectorized body and a remainder


@pytest.fixture(params=["native", "xla"])
def impl(request):
  if request.param == "native" and not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  previous = dispatch.set_enabled(request.param == "native")
  yield request.param
  dispatch.set_enabled(previous)


def _fresh(fn):
  """A new function object: the switch is read at trace time."""
  return lambda *args: fn(*args)


def _operands(C, seed=0, S=S):
  rng = np.random.default_rng(seed)
  B = len(IDX)
  return dict(X=jnp.asarray(rng.normal(size=(S, N, M))), U=jnp.asarray(rng.normal(size=(S, B, M))),
              b=jnp.asarray(rng.uniform(0.2, 0.8, size=(S,))), a=jnp.asarray(rng.normal(size=(S, M, C))),
              g=jnp.asarray(rng.normal(size=(S, B, C))), idx=jnp.asarray(IDX))


# op, its operands (in order), and the plain expression it must equal
OPS = {
    "take_rows": (rows.take_rows, ("X", "idx"), lambda X, i: X[i]),
    "take_cols": (rows.take_cols, ("X", "idx"), lambda X, i: X[:, i].T),
    "add_rows": (rows.add_rows, ("X", "idx", "U"), lambda X, i, U: X.at[i].add(U)),
    "relu_rows": (rows.relu_rows, ("X", "idx", "b", "a"),
                  lambda X, i, b, a: rows.HiddenRows(jax.nn.relu(X[i] - b) @ a,
                                                     jnp.sum(X[i] > b, axis=1) * 1.0)),
    "relu_rows_grad": (rows.relu_rows_grad, ("X", "idx", "b", "a", "g"),
                       lambda X, i, b, a, g: jnp.where(X[i] > b, g @ a.T, 0.0)),
}


def _close(got, want, tol=1e-13):
  chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("name", list(OPS))
def test_unbatched_equals_expression(x64, impl, name, C):
  op, names, plain = OPS[name]
  args = [v if k == "idx" else v[0] for k, v in ((k, _operands(C)[k]) for k in names)]
  _close(jax.jit(_fresh(op))(*args), plain(*args))


@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("name", list(OPS))
def test_vmap_over_members_with_a_shared_batch(x64, impl, name, C):
  """The sweep's batching: X and some operands per member, idx shared; the
  unbatched operands broadcast."""
  op, names, plain = OPS[name]
  ops = _operands(C)
  for batched_rest in (True, False):
    in_axes = tuple(None if k == "idx" or (k != "X" and not batched_rest) else 0 for k in names)
    args = [ops[k] if ax == 0 or k == "idx" else ops[k][0] for k, ax in zip(names, in_axes)]
    _close(jax.jit(jax.vmap(op, in_axes=in_axes))(*args), jax.vmap(plain, in_axes=in_axes)(*args))


@pytest.mark.parametrize("name", list(OPS))
def test_nested_vmap_and_unbatched_X(x64, impl, name):
  op, names, plain = OPS[name]
  ops = _operands(3, S=6)
  args = [ops[k] if k == "idx" else ops[k].reshape(2, 3, *ops[k].shape[1:]) for k in names]
  in_axes = tuple(None if k == "idx" else 0 for k in names)
  twice = lambda f: jax.vmap(jax.vmap(f, in_axes=in_axes), in_axes=in_axes)
  _close(jax.jit(twice(op))(*args), twice(plain)(*args))
  if len(names) == 2:  # take_rows, take_cols: nothing else to batch
    return
  # X shared by the members (the other operands batched): broadcast, not an error.
  axes = tuple(None if k in ("idx", "X") else 0 for k in names)
  args = [ops[k] if k not in ("X",) else ops[k][0] for k in names]
  _close(jax.jit(jax.vmap(op, in_axes=axes))(*args), jax.vmap(plain, in_axes=axes)(*args))


def test_take_cols_of_one_column(x64, impl):
  """B = 1 (XLA's expression gathers two columns there, see rows._take_cols_of)."""
  X = _operands(1)["X"]
  for i in (jnp.array([5], jnp.int32), jnp.array([-2], jnp.int32)):
    _close(jax.jit(_fresh(rows.take_cols))(X[0], i), X[0][:, i].T)
    _close(jax.jit(jax.vmap(rows.take_cols, in_axes=(0, None)))(X, i),
           jax.vmap(lambda x: x[:, i].T)(X))


@pytest.mark.parametrize("name", list(OPS))
def test_vmap_over_per_member_batches_falls_back(x64, impl, name):
  op, names, plain = OPS[name]
  ops = _operands(2)
  idx = jnp.stack([ops["idx"], ops["idx"][::-1], jnp.roll(ops["idx"], 2)])
  args = [idx if k == "idx" else ops[k] for k in names]
  _close(jax.jit(jax.vmap(op))(*args), jax.vmap(plain)(*args))


@pytest.mark.perf  # reads the lowered HLO text
@pytest.mark.parametrize("name", list(OPS))
def test_the_native_kernel_runs_on_cpu_and_not_on_gpu(impl, name):
  op, names, _ = OPS[name]
  ops = _operands(2)
  args = [ops[k] if k == "idx" else ops[k].astype(jnp.float32) for k in names]
  in_axes = tuple(None if k == "idx" else 0 for k in names)
  batched = jax.jit(jax.vmap(op, in_axes=in_axes))
  single = jax.jit(_fresh(op))
  single_args = [a if k == "idx" else a[0] for k, a in zip(names, args)]
  target = f"kronjax_{name}_f32"
  for fn, fn_args in ((batched, args), (single, single_args)):
    assert (target in fn.lower(*fn_args).as_text()) == (impl == "native")
  text = jax.export.export(batched, platforms=["cuda"])(*args).mlir_module()
  assert "kronjax_" not in text


@pytest.mark.parametrize("C", [1, 3])
def test_float32_matches_float64(impl, C):
  with jax.enable_x64(True):
    ops = _operands(C)
    want = OPS["relu_rows"][2](ops["X"][0], ops["idx"], ops["b"][0], ops["a"][0])
    want_grad = OPS["relu_rows_grad"][2](ops["X"][0], ops["idx"], ops["b"][0], ops["a"][0], ops["g"][0])
  f32 = {k: v if k == "idx" else jnp.asarray(v, jnp.float32) for k, v in ops.items()}
  got = jax.jit(_fresh(rows.relu_rows))(f32["X"][0], f32["idx"], f32["b"][0], f32["a"][0])
  got_grad = jax.jit(_fresh(rows.relu_rows_grad))(f32["X"][0], f32["idx"], f32["b"][0],
                                                     f32["a"][0], f32["g"][0])
  assert got[0].dtype == got_grad.dtype == jnp.float32
  chex.assert_trees_all_close(got, jax.tree.map(lambda x: x.astype(jnp.float32), want),
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_grad, want_grad.astype(jnp.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C", [1, 3])
def test_nan_rows_propagate_like_relu(x64, impl, C):
  """A diverged projection must reach the loss (fit stops on non-finite losses)."""
  ops = _operands(C)
  X = ops["X"][0].at[3, 5].set(jnp.nan)
  out, count = jax.jit(_fresh(rows.relu_rows))(X, ops["idx"], ops["b"][0], ops["a"][0])
  read = np.asarray(IDX) % N
  assert np.all(np.isnan(np.asarray(out)[read == 3]))
  assert np.all(np.isfinite(np.asarray(out)[read != 3])) and np.all(np.isfinite(np.asarray(count)))
  grad = jax.jit(_fresh(rows.relu_rows_grad))(X, ops["idx"], ops["b"][0], ops["a"][0], ops["g"][0])
  assert np.all(np.isfinite(np.asarray(grad)))   # where(NaN > b, ...) is 0, as in jnp.where


@pytest.mark.parametrize("name", list(OPS))
def test_gradients_equal_the_expression(x64, impl, name):
  op, names, plain = OPS[name]
  ops = _operands(2)
  args = [ops[k] if k == "idx" else ops[k][0] for k in names]
  float_args = [i for i, k in enumerate(names) if k != "idx"]

  def loss(fn, *a):
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(fn(*a)))

  got = jax.grad(lambda *a: loss(op, *a), argnums=float_args)(*args)
  want = jax.grad(lambda *a: loss(plain, *a), argnums=float_args)(*args)
  _close(got, want, 1e-12)


def test_dtypes_follow_X(impl):
  X = jnp.ones((4, 8), jnp.float32)
  U = jnp.ones((2, 8), jnp.bfloat16)
  out = jax.jit(_fresh(rows.add_rows))(X, [0, 0], U)
  assert out.dtype == jnp.float32 and float(out[0, 0]) == 3.0
  h, count = rows.relu_rows(X, np.array([1, 2]), 0.5, jnp.ones((8, 1), jnp.bfloat16))
  assert h.dtype == count.dtype == jnp.float32 and float(count[0]) == 8.0


def test_native_wrappers_reject_mismatched_operands():
  if not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  X, idx = jnp.ones((4, 8), jnp.float32), jnp.arange(2, dtype=jnp.int32)
  with pytest.raises(TypeError, match="native.take_rows needs .* idx int32"):
    native.take_rows(X, idx.astype(jnp.float32))
  with pytest.raises(TypeError, match="native.take_cols needs .* idx int32"):
    native.take_cols(X, idx.reshape(1, 2))
  with pytest.raises(TypeError, match="native.add_rows needs .* U"):
    native.add_rows(X, idx, jnp.ones((3, 8), jnp.float32))
  with pytest.raises(TypeError, match="native.relu_rows needs .* a float32"):
    native.relu_rows(X, idx, jnp.zeros((), jnp.float32), jnp.ones((7, 1), jnp.float32))
  with pytest.raises(TypeError, match="native.relu_rows_grad needs .* g"):
    native.relu_rows_grad(X, idx, jnp.zeros((), jnp.float32), jnp.ones((8, 2), jnp.float32),
                          jnp.ones((2, 3), jnp.float32))


def _full_step_text(plan: kronjax.Plan) -> tuple[kronjax.TrainState, str]:
  """A full-path state under ``plan`` and its lowered train step's HLO text (B = 8)."""
  data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 32, (4, 8))
  dataset = kronjax.Dataset(data, labels)
  state = kronjax.init(jax.random.PRNGKey(1), kronjax.Config(width=64), dataset, optax.sgd(0.1),
                       plan=plan)
  return state, jax.jit(_fresh(kronjax.train_step)).lower(state, dataset, jnp.arange(8)).as_text()


@pytest.mark.perf  # reads the lowered HLO text
def test_the_neuron_major_full_step_reads_its_columns_with_take_cols(impl):
  state, text = _full_step_text(kronjax.Plan(update="full"))
  assert state.layout == "neurons"
  assert ("kronjax_take_cols_f32" in text) == (impl == "native")


@pytest.mark.perf  # reads the lowered HLO text
def test_the_full_step_uses_the_row_kernels(impl):
  """The point-major full step reads P's batch rows through kronjax._src.kernels.rows: no
  XLA gather of P and no (B, m) ReLU is left in the compiled step."""
  state, text = _full_step_text(kronjax.Plan(layout="points"))
  assert state.layout == "points"
  for name in ("relu_rows", "relu_rows_grad", "add_rows"):
    assert (f"kronjax_{name}_f32" in text) == (impl == "native")


def test_the_kernels_check_shapes_themselves():
  """A direct FFI call with inconsistent shapes fails with the kernel's message
  (the Python wrappers check first; this guards other callers)."""
  if not native.available():
    pytest.skip(f"native kernel unavailable: {native.info()['reason']}")
  X, idx = jnp.ones((4, 8), jnp.float32), jnp.arange(2, dtype=jnp.int32)
  take = jax.ffi.ffi_call("kronjax_take_rows_f32", jax.ShapeDtypeStruct((3, 8), jnp.float32))
  with pytest.raises(Exception, match="kronjax take_rows: X .* do not match"):
    jax.block_until_ready(take(X, idx))
  cols = jax.ffi.ffi_call("kronjax_take_cols_f32", jax.ShapeDtypeStruct((2, 8), jnp.float32))
  with pytest.raises(Exception, match="kronjax take_cols: P .* do not match"):
    jax.block_until_ready(cols(X, idx))          # the result is (2, 4): P's 4 rows
  relu = jax.ffi.ffi_call("kronjax_relu_rows_f32", (jax.ShapeDtypeStruct((2, 1), jnp.float32),
                                                    jax.ShapeDtypeStruct((2,), jnp.float32)))
  with pytest.raises(Exception, match="kronjax relu_rows: b .* do not match"):
    jax.block_until_ready(relu(X, idx, jnp.zeros((1,), jnp.float32), jnp.ones((8, 1), jnp.float32)))
