"""Which optax transformations the kernel-space step can run, and how.

The step keeps ``W = s W0 + A X`` and ``P = W X^T = s P0 + A K``. An optimizer keeps
both identities exactly iff its update is a *linear* function of the gradient
history and the parameters, with scalar coefficients (sgd, momentum, nesterov,
schedules, ``inject_hyperparams``, and L2 weight decay ``optax.add_decayed_weights``):
then updating ``A``, ``P`` and the scale ``s`` of ``W0`` leafwise equals updating ``W``
and multiplying by ``X^T``. Adam, clipping and normalization are not: the weights
would leave ``span(W0, X)`` and ``P`` would stop being ``W X^T``.

We detect linearity by probing: additivity and homogeneity of the update in
(gradient, parameters) over a few steps on random inputs (large and small scales,
to catch clipping). An optimizer that reads the parameters (weight decay) gets them:
the step then passes the full-shape trainable tree, ``"W0"`` (the scale ``s``, zero
gradient) included.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

WORKING = ("optax.sgd (with or without momentum / nesterov), learning-rate schedules, "
           "optax.inject_hyperparams(optax.sgd), optax.chain of optax.trace, "
           "optax.add_decayed_weights and optax.scale / optax.scale_by_schedule")

def _probe_tree(key, scale, shapes):
  keys = jax.random.split(key, len(shapes))
  return {name: scale * jax.random.normal(k, s, jnp.float32)
          for k, (name, s) in zip(keys, sorted(shapes.items()))}


def check_linear(tx: optax.GradientTransformation, keys=("A", "P", "a"), *, steps: int = 3,
                 rtol: float = 1e-4) -> None:
  """Raises ValueError unless ``tx`` is one linear map of the gradient sequence for
  every entry of ``A``, ``P`` and ``P_eval``.

  Args:
    tx: the optax transformation.
    keys: the keys of the tree the optimizer will see (``TrainState.trainable``),
      so that masks and ``multi_transform`` labels are probed as they will run.

  The probe feeds the *same* random gradient to the ``A``, ``P`` and ``P_eval``
  entries and requires identical updates (``a`` may have its own map), additivity
  on O(1) gradients, and homogeneity at 1e-3, 1e3 and 1e8 (clipping, normalization,
  adam-style rescaling). It runs on concrete arrays even under ``jit``/``vmap``.
  """
  with jax.ensure_compile_time_eval():
    _check_linear(tx, tuple(keys), steps=steps, rtol=rtol)


_TIED = ("A", "P", "P_eval", "W0")  # one and the same linear map (P = s P0 + A K)


def needs_params(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx.update`` reads the parameters (``optax.add_decayed_weights`` and co)."""
  with jax.ensure_compile_time_eval():
    g = {"x": jnp.zeros((2,), jnp.float32)}
    try:
      tx.update(g, tx.init(g), None)
    except Exception:  # noqa: BLE001 -- optax raises various errors for missing params
      try:
        tx.update(g, tx.init(g), g)
      except Exception:  # noqa: BLE001 -- it fails with params too: not our case
        return False
      return True
  return False


def _check_linear(tx, keys, *, steps, rtol):
  if not isinstance(tx, optax.GradientTransformation) and not (
      hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  with_params = needs_params(tx)
  if with_params:
    keys = tuple(keys) + ("W0",)
  shapes = {k: (3, 5) for k in keys}
  tied = [k for k in keys if k in _TIED]
  zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}

  def probe(key, scale):
    tree = _probe_tree(key, scale, shapes)
    for k in tied[1:]:
      tree[k] = tree[tied[0]]
    return tree

  def flat(u):
    return np.concatenate([np.ravel(np.asarray(u[k], np.float64)) for k in keys])

  def close(x, y):
    return np.max(np.abs(x - y)) <= rtol * (np.max(np.abs(y)) + 1e-30)

  def scaled(c, tree):
    return jax.tree.map(lambda x: c * x, tree)

  scales = (1e3, 1e-3, 1e8)
  failure = None
  try:
    # Sequences of (gradient, params): a, b, a + b, c * a for each scale, and two
    # constant ones, (g, 0) and (0, p), whose updates must be parallel to g and p.
    n_seq = 3 + len(scales) + 2
    states = [tx.init(zeros) for _ in range(n_seq)]
    key, k0, k1 = jax.random.split(jax.random.PRNGKey(1234), 3)
    constant, constant_p = probe(k0, 1.0), probe(k1, 1.0)
    for t in range(steps):
      key, k1, k2, k3, k4 = jax.random.split(key, 5)
      ga, gb = probe(k1, 1.0), probe(k2, 1.0)
      pa, pb = (probe(k3, 1.0), probe(k4, 1.0)) if with_params else (zeros, zeros)
      inputs = [(ga, pa), (gb, pb), (jax.tree.map(jnp.add, ga, gb), jax.tree.map(jnp.add, pa, pb))]
      inputs += [(scaled(c, ga), scaled(c, pa)) for c in scales]
      inputs += [(constant, zeros), (zeros, constant_p if with_params else zeros)]
      outs = [tx.update(g, st, p if with_params else None)
              for st, (g, p) in zip(states, inputs)]
      states = [st for _, st in outs]
      ua, ub, usum, *rest = (flat(u) for u, _ in outs)
      scaled_u = rest[:len(scales)]
      if not close(ua + ub, usum) or not all(close(u, c * ua) for u, c in zip(scaled_u, scales)):
        failure = f"its update is not linear in the gradient and parameters (probe step {t})"
        break
      # Scalar coefficients: a constant gradient (parameter) sequence must give updates
      # parallel to it (the step relies on L(G @ K) = L(G) @ K; a permutation or
      # per-entry scaling is linear but breaks P = W X^T).
      for out, given in ((outs[-2][0], constant), (outs[-1][0], constant_p if with_params else None)):
        if given is None:
          continue
        for k in tied:
          u, g = (np.ravel(np.asarray(x[k], np.float64)) for x in (out, given))
          if not close(u, (u @ g) / (g @ g) * g):
            failure = (f"its update of {k!r} is not a scalar multiple of the gradient and "
                       f"parameters (probe step {t}); A, P, P_eval and the W0 scale need one "
                       "scalar per step and past gradient")
            break
        if failure:
          break
      if failure:
        break
      first = np.asarray(outs[0][0][tied[0]]) if tied else None
      for k in tied[1:]:
        if not close(np.asarray(outs[0][0][k], np.float64), np.asarray(first, np.float64)):
          failure = (f"it updates {k!r} differently from {tied[0]!r} (a mask or multi_transform "
                     "label that separates them); A, P and P_eval must share one map")
          break
      if failure:
        break
  except Exception as e:  # e.g. a transform that needs something else
    raise ValueError(_nonlinear_message(
        f"it cannot update ({type(e).__name__}: {str(e).splitlines()[0]})")) from e
  if failure is not None:
    raise ValueError(_nonlinear_message(failure))


def _nonlinear_message(why: str) -> str:
  return (
      f"tx cannot be used by kronjax: {why}. The kernel-space step keeps W = W0 + A X "
      "and P = W X^T exactly only for optimizers whose update is linear in the "
      "gradient history and parameters; adam, clipping or normalization would move the "
      "weights out of span(W0, X), so P would no longer equal W X^T. Use one of: "
      f"{WORKING}.")


def is_shape_free(tx: optax.GradientTransformation, params: Any) -> bool:
  """True when ``tx``'s state does not depend on the parameter shapes (no moments).

  Such a linear transformation is elementwise and stateless in the parameters,
  so it can be applied to the compact (touched entries only) gradient: the
  sparse update path.
  """
  small = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) * x.ndim, x.dtype), params)
  a = jax.eval_shape(tx.init, params)
  b = jax.eval_shape(tx.init, small)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.shape == y.shape for x, y in zip(la, lb)))


class StaticTx:
  """An optax transformation as static data of a pytree, compared by structure.

  ``optax.sgd(0.5)`` builds new closures on every call, so two equal optimizers are
  different objects; compared by identity, each would compile its own step. Two
  ``StaticTx`` are equal when their transformations have the same code and equal
  captured values (numbers, strings, nested transformations, small concrete
  arrays); anything else captured (a traced value, an unknown object) is compared
  by identity. ``init`` and ``update`` are the transformation's.

  Attributes:
    tx: the optax transformation.
    shape_free: its state does not depend on the parameter shapes (no moments) and it
      does not read the parameters: the sparse update path may apply it to compact
      gradients (``is_shape_free``).
    needs_params: ``update`` reads the parameters (weight decay, ``needs_params``).
  """

  __slots__ = ("tx", "shape_free", "needs_params", "_key")

  def __init__(self, tx: optax.GradientTransformation, shape_free: bool):
    self.tx = tx
    self.needs_params = needs_params(tx)
    # An optimizer that reads the parameters needs the full-shape tree: never shape-free.
    self.shape_free = bool(shape_free) and not self.needs_params
    self._key = (structure_key(tx), self.shape_free)

  @property
  def init(self):
    return self.tx.init

  @property
  def update(self):
    return self.tx.update

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, StaticTx) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __repr__(self) -> str:
    return f"StaticTx({self.tx!r}, shape_free={self.shape_free})"


class _Identity:
  """Compares by identity (for captured values with no structural equality)."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.obj is self.obj

  def __hash__(self):
    return id(self.obj)


_SMALL_ARRAY = 1024  # captured arrays up to this many elements are compared by value


def structure_key(obj: Any, depth: int = 0) -> Any:
  """A hashable key equal for transformations built alike (``StaticTx``)."""
  if depth > 40:
    return _Identity(obj)
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
    return (type(obj).__name__, obj)
  if isinstance(obj, (tuple, list)):
    return (type(obj).__name__,) + tuple(structure_key(x, depth + 1) for x in obj)
  if isinstance(obj, dict):
    try:
      items = sorted(obj.items())
    except TypeError:
      return _Identity(obj)
    return ("dict",) + tuple((k, structure_key(v, depth + 1)) for k, v in items)
  if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
    if isinstance(obj, jax.core.Tracer) or np.size(obj) > _SMALL_ARRAY:
      return _Identity(obj)
    arr = np.asarray(obj)
    return ("array", arr.dtype.str, arr.shape, arr.tobytes())
  if isinstance(obj, functools.partial):
    return ("partial", structure_key(obj.func, depth + 1), structure_key(obj.args, depth + 1),
            structure_key(obj.keywords, depth + 1))
  if isinstance(obj, types.FunctionType):
    cells = tuple(structure_key(c.cell_contents, depth + 1) if _filled(c) else ("empty",)
                  for c in (obj.__closure__ or ()))
    return ("function", obj.__code__, cells, structure_key(obj.__defaults__, depth + 1),
            structure_key(obj.__kwdefaults__, depth + 1))
  if isinstance(obj, types.BuiltinFunctionType):
    return ("builtin", obj)
  return _Identity(obj)


def _filled(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:
    return False
