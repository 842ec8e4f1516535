"""Which optax transformations the kernel-space step can run, and how.

The step keeps ``W = W0 + A X`` and ``P = W X^T = P0 + A K``. An optimizer keeps
both identities exactly iff its update is a *linear* function of the gradient
history with scalar coefficients (sgd, momentum, nesterov, schedules,
``inject_hyperparams``): then updating ``A`` and ``P`` leafwise equals updating
``W`` and multiplying by ``X^T``. Adam, clipping, normalization, weight decay are
not: the weights would leave ``span(X)`` and ``P`` would stop being ``W X^T``.

We detect linearity by probing: additivity and homogeneity of the update over
a few steps on random gradients (large and small scales, to catch clipping).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

WORKING = ("optax.sgd (with or without momentum / nesterov), learning-rate schedules, "
           "optax.inject_hyperparams(optax.sgd), optax.chain of optax.trace and "
           "optax.scale / optax.scale_by_schedule")

_PROBE_SHAPES = {"A": (3, 5), "P": (3, 5), "a": (3, 2)}


def _probe_tree(key, scale, shapes):
  keys = jax.random.split(key, len(shapes))
  return {name: scale * jax.random.normal(k, s, jnp.float32)
          for k, (name, s) in zip(keys, sorted(shapes.items()))}


def check_linear(tx: optax.GradientTransformation, *, steps: int = 3, rtol: float = 1e-4) -> None:
  """Raises ValueError when ``tx`` is not linear in the gradient sequence.

  The probe runs on concrete arrays even when called under ``jit``/``vmap``
  (e.g. ``jax.jit(kronjax.init)``): its inputs do not depend on the traced ones.
  """
  with jax.ensure_compile_time_eval():
    _check_linear(tx, steps=steps, rtol=rtol)


def _check_linear(tx, *, steps, rtol):
  if not isinstance(tx, optax.GradientTransformation) and not (
      hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  shapes = dict(_PROBE_SHAPES)
  zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  try:
    states = [tx.init(zeros) for _ in range(5)]
    key = jax.random.PRNGKey(1234)
    for t in range(steps):
      key, k1, k2 = jax.random.split(key, 3)
      ga, gb = _probe_tree(k1, 1.0, shapes), _probe_tree(k2, 1.0, shapes)
      # Additivity on O(1) gradients; homogeneity at 1e3 and 1e-3 catches clipping,
      # normalization and adam-style rescaling.
      grads = (ga, gb, jax.tree.map(jnp.add, ga, gb),
               jax.tree.map(lambda x: 1e3 * x, ga), jax.tree.map(lambda x: 1e-3 * x, ga))
      outs = [tx.update(g, st, None) for st, g in zip(states, grads)]
      states = [s for _, s in outs]
      ua, ub, usum, ubig, usmall = (
          np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(u)])
          for u, _ in outs)
      def close(x, y):
        return np.max(np.abs(x - y)) <= rtol * (np.max(np.abs(y)) + 1e-30)
      if not (close(ua + ub, usum) and close(ubig, 1e3 * ua) and close(usmall, 1e-3 * ua)):
        failure = f"its update is not linear in the gradient (probe step {t})"
        break
    else:
      failure = None
  except Exception as e:  # e.g. a transform that needs params (weight decay)
    raise ValueError(_nonlinear_message(
        f"it cannot update without parameters ({type(e).__name__}: {str(e).splitlines()[0]})")) from e
  if failure is not None:
    raise ValueError(_nonlinear_message(failure))


def _nonlinear_message(why: str) -> str:
  return (
      f"tx cannot be used by kronjax: {why}. The kernel-space step keeps W = W0 + A X "
      "and P = W X^T exactly only for optimizers whose update is linear in the "
      "gradient history; adam, clipping, normalization or weight decay would move the "
      "weights out of span(X), so P would no longer equal W X^T. Use one of: "
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
