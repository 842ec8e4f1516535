"""KronRLS: Kronecker kernel ridge regression on (drug, target) pairs, and its metrics.

Glossary of shape letters used in this module:
  N_d, N_t   entities of each kind in the training kernels
  M_d, M_t   entities of each kind at prediction time (rows of the cross kernels)
  n          training pairs          m   pairs to predict

The pair kernel is ``K_pairs[i, j] = Kd[d_i, d_j] * Kt[t_i, t_j]`` (the kernel of
``x = u ⊗ v`` when ``Kd``, ``Kt`` are the entities' Grams). ``fit_kronrls`` solves
``(K_pairs + lam I) alpha = y`` by conjugate gradients without forming the
``(n, n)`` matrix: ``K_pairs v`` scatters ``v`` onto the ``(N_d, N_t)`` grid (``V``,
duplicate pairs summed), computes ``Kd V Kt`` and gathers it at the pairs, in
``O(N_d^2 N_t + N_d N_t^2)``. Predictions are ``f = (Kd' V Kt'^T)[d, t]`` with the
cross kernels. Computations run in JAX in the inputs' dtype (float64 when
``jax_enable_x64`` is on and the inputs are float64).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_finite(name: str, x: Any) -> None:
  arr = np.asarray(x)
  bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
  if bad:
    raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); clean or drop "
                     "those entries first.")


def _check_indices(name: str, idx: Any, size: int) -> None:
  idx = np.asarray(idx)
  if idx.size and (idx.min() < 0 or idx.max() >= size):
    raise ValueError(f"{name} must hold indices in [0, {size}), got values in "
                     f"[{int(idx.min())}, {int(idx.max())}].")


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}.")
  return int(value)



class KronRLS(NamedTuple):
  """A fitted KronRLS model and how its conjugate-gradient solve ended.

  Attributes:
    dual: ``(N_d, N_t)`` the dual coefficients ``alpha`` scattered onto the
      (drug, target) grid, duplicate pairs summed.
    alpha: ``(n,)`` the solution of ``(K_pairs + lam I) alpha = y``.
    iterations: ``()`` int32, CG iterations run.
    residual: ``()`` ``||y - (K_pairs + lam I) alpha|| / ||y||`` (recomputed).
    converged: ``()`` bool, the CG residual reached ``tol`` within ``maxiter``.
  """
  dual: jax.Array  # shape=(N_d, N_t)
  alpha: jax.Array  # shape=(n,)
  iterations: jax.Array  # shape=(), dtype=int32
  residual: jax.Array  # shape=()
  converged: jax.Array  # shape=(), dtype=bool


def _check_kernel(name: str, K: Any) -> jax.Array:
  arr = np.asarray(K)
  if arr.dtype.kind not in "iuf":
    raise TypeError(f"{name} must be a real kernel matrix, got dtype {arr.dtype}.")
  if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty square (N, N) kernel matrix, got shape {arr.shape}.")
  _check_finite(name, arr)
  scale = max(float(np.max(np.abs(arr))), 1e-300)
  if float(np.max(np.abs(arr - arr.T))) > 1e-6 * scale:
    raise ValueError(
        f"{name} must be symmetric (conjugate gradients needs a symmetric system); "
        f"pass ({name} + {name}.T) / 2, or features from kronjax.data.kernel_features.")
  return jnp.asarray(K)


def _check_cross(name: str, K: Any, n_train: int, train_name: str) -> jax.Array:
  arr = np.asarray(K)
  if arr.dtype.kind not in "iuf":
    raise TypeError(f"{name} must be a real kernel matrix, got dtype {arr.dtype}.")
  if arr.ndim != 2 or arr.shape[1] != n_train:
    raise ValueError(
        f"{name} must be (M, {n_train}): similarities of the entities to predict (rows) to "
        f"the {n_train} entities of {train_name} (columns), got shape {arr.shape}.")
  _check_finite(name, arr)
  return jnp.asarray(K)


def _check_pairs(name: str, pairs: Any, n_rows: int, n_cols: int) -> jax.Array:
  arr = np.asarray(pairs)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(
        f"{name} must be an integer (n, 2) array of (drug, target) indices, got dtype {arr.dtype}.")
  if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
    raise ValueError(
        f"{name} must be a non-empty (n, 2) array of (drug, target) indices, got shape {arr.shape}.")
  _check_indices(f"{name}[:, 0]", arr[:, 0], n_rows)
  _check_indices(f"{name}[:, 1]", arr[:, 1], n_cols)
  return jnp.asarray(arr, jnp.int32)


def _scatter(d: jax.Array, t: jax.Array, v: jax.Array, shape: tuple[int, int]) -> jax.Array:
  return jnp.zeros(shape, v.dtype).at[d, t].add(v)


def pair_kernel_matvec(Kd: jax.Array, Kt: jax.Array, pairs: jax.Array, v: jax.Array) -> jax.Array:
  """``K_pairs @ v`` for ``K_pairs[i, j] = Kd[d_i, d_j] Kt[t_i, t_j]``, shape ``(n,)``.

  ``Kd (N_d, N_d)``, ``Kt (N_t, N_t)``, ``pairs (n, 2)``, ``v (n,)``; never forms
  ``(n, n)``. Jit-able (no checks).
  """
  d, t = pairs[:, 0], pairs[:, 1]
  V = _scatter(d, t, v, (Kd.shape[0], Kt.shape[0]))
  return ((Kd @ V) @ Kt.T)[d, t]


@jax.jit
def _solve(Kd, Kt, pairs, y, lam, tol, maxiter):
  """Conjugate gradients on ``(K_pairs + lam I) x = y`` from ``x = 0``."""
  matvec = lambda v: pair_kernel_matvec(Kd, Kt, pairs, v) + lam * v
  b2 = jnp.vdot(y, y)
  stop = (tol * tol) * b2

  def cond(state):
    _, _, _, rs, k = state
    return (k < maxiter) & (rs > stop)

  def body(state):
    x, r, p, rs, k = state
    Ap = matvec(p)
    a = rs / jnp.vdot(p, Ap)
    x = x + a * p
    r = r - a * Ap
    rs_new = jnp.vdot(r, r)
    p = r + (rs_new / rs) * p
    return x, r, p, rs_new, k + 1

  x0 = jnp.zeros_like(y)
  state = (x0, y, y, b2, jnp.zeros((), jnp.int32))
  x, _, _, rs, k = jax.lax.while_loop(cond, body, state)
  true_res = jnp.linalg.norm(y - matvec(x)) / jnp.sqrt(b2)
  dual = _scatter(pairs[:, 0], pairs[:, 1], x, (Kd.shape[0], Kt.shape[0]))
  return KronRLS(dual=dual, alpha=x, iterations=k, residual=true_res, converged=rs <= stop)


def fit_kronrls(Kd: Any, Kt: Any, pairs: Any, y: Any, lam: float, *, tol: float = 1e-6,
                maxiter: int = 1000) -> KronRLS:
  """Kronecker kernel ridge regression: solves ``(K_pairs + lam I) alpha = y`` by CG.

  Args:
    Kd: ``(N_d, N_d)`` symmetric PSD drug kernel.
    Kt: ``(N_t, N_t)`` symmetric PSD target kernel.
    pairs: ``(n, 2)`` int ``(drug, target)`` training pairs (repeats allowed:
      each is its own equation).
    y: ``(n,)`` labels.
    lam: ridge, ``> 0``.
    tol: stop when ``||residual|| <= tol ||y||``.
    maxiter: most CG iterations.

  Returns:
    ``KronRLS(dual (N_d, N_t), alpha (n,), iterations, residual, converged)``;
    look at ``converged`` (no error is raised when ``maxiter`` is reached).

  Raises:
    TypeError, ValueError: an argument has the wrong dtype, shape or values
      (the message names it).
  """
  Kd = _check_kernel("Kd", Kd)
  Kt = _check_kernel("Kt", Kt)
  pairs = _check_pairs("pairs", pairs, Kd.shape[0], Kt.shape[0])
  y_np = np.asarray(y)
  if y_np.dtype.kind not in "iuf" or y_np.shape != (pairs.shape[0],):
    raise ValueError(
        f"y must be a real ({pairs.shape[0]},) array, one label per row of pairs, "
        f"got shape {y_np.shape} and dtype {y_np.dtype}.")
  _check_finite("y", y_np)
  if not np.isfinite(lam) or lam <= 0:
    raise ValueError(f"lam must be a finite ridge > 0, got {lam!r}.")
  if not np.isfinite(tol) or tol <= 0:
    raise ValueError(f"tol must be a finite relative tolerance > 0, got {tol!r}.")
  maxiter = _check_positive_int("maxiter", maxiter)
  dtype = jnp.result_type(Kd.dtype, Kt.dtype, jnp.asarray(y).dtype, jnp.float32)
  return _solve(Kd.astype(dtype), Kt.astype(dtype), pairs, jnp.asarray(y, dtype),
                jnp.asarray(lam, dtype), jnp.asarray(tol, dtype), jnp.asarray(maxiter, jnp.int32))


@jax.jit
def _predict(dual, Kd_cross, Kt_cross, pairs):
  F = (Kd_cross @ dual) @ Kt_cross.T
  return F[pairs[:, 0], pairs[:, 1]]


def predict_kronrls(model: KronRLS, Kd_cross: Any, Kt_cross: Any, pairs: Any) -> jax.Array:
  """Predictions ``f[i] = (Kd_cross V Kt_cross^T)[d_i, t_i]``, shape ``(m,)``.

  Args:
    model: from ``fit_kronrls``; ``V = model.dual (N_d, N_t)``.
    Kd_cross: ``(M_d, N_d)`` kernel between the drugs to predict and the
      training kernel's drugs (the training ``Kd`` itself for known drugs).
    Kt_cross: ``(M_t, N_t)`` likewise for targets.
    pairs: ``(m, 2)`` int ``(drug, target)`` indices into the rows of
      ``Kd_cross`` and ``Kt_cross``.
  """
  n_d, n_t = model.dual.shape
  Kd_cross = _check_cross("Kd_cross", Kd_cross, n_d, "Kd")
  Kt_cross = _check_cross("Kt_cross", Kt_cross, n_t, "Kt")
  pairs = _check_pairs("pairs", pairs, Kd_cross.shape[0], Kt_cross.shape[0])
  dtype = model.dual.dtype
  return _predict(model.dual, Kd_cross.astype(dtype), Kt_cross.astype(dtype), pairs)


# --------------------------------------------------------------------------- metrics


def _check_pair_of_vectors(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
  yt = np.asarray(y_true, np.float64)
  yp = np.asarray(y_pred, np.float64)
  if yt.ndim != 1 or yt.size == 0:
    raise ValueError(f"y_true must be a non-empty 1-D array, got shape {yt.shape}.")
  if yp.shape != yt.shape:
    raise ValueError(f"y_pred must have the shape of y_true {yt.shape}, got {yp.shape}.")
  _check_finite("y_true", yt)
  _check_finite("y_pred", yp)
  return yt + 0.0, yp + 0.0  # + 0.0 turns -0.0 into 0.0, so ties compare bytewise too


def mse(y_true: Any, y_pred: Any) -> float:
  """Mean squared error of ``(n,)`` predictions."""
  yt, yp = _check_pair_of_vectors(y_true, y_pred)
  return float(np.mean((yt - yp) ** 2))


def _tied_pairs(*keys: np.ndarray) -> int:
  """Number of unordered pairs equal in every key."""
  _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
  return int(np.sum(counts * (counts - 1) // 2))


def _increasing_pairs(r: np.ndarray) -> int:
  """Number of positions ``a < b`` with ``r[a] < r[b]`` for ints ``r`` in ``[0, n)``.

  Bottom-up merge counting, one vectorized ``searchsorted`` per level:
  ``O(n log^2 n)``.
  """
  n = r.size
  r = r.astype(np.int64)
  pos = np.arange(n, dtype=np.int64)
  total = 0
  s = 1
  while s < n:
    block = pos // (2 * s)
    right = (pos // s) % 2 == 1
    left_keys = np.sort(block[~right] * n + r[~right])
    base = block[right] * n
    total += int(np.sum(np.searchsorted(left_keys, base + r[right], side="left")
                        - np.searchsorted(left_keys, base, side="left")))
    s *= 2
  return total


def concordance_index(y_true: Any, y_pred: Any) -> float:
  """Concordance index: the fraction of pairs ranked as their labels are.

  Over all pairs ``(i, j)`` with ``y_true[i] > y_true[j]``, a pair counts 1 when
  ``y_pred[i] > y_pred[j]``, 0.5 when the predictions tie, 0 otherwise. Pairs
  tied in ``y_true`` are not compared. ``O(n log^2 n)``.

  Raises:
    ValueError: the inputs are not two finite 1-D arrays of one length, or
      ``y_true`` has a single distinct value (no pair to compare).
  """
  yt, yp = _check_pair_of_vectors(y_true, y_pred)
  n = yt.size
  comparable = n * (n - 1) // 2 - _tied_pairs(yt)
  if comparable == 0:
    raise ValueError(
        "y_true holds a single distinct value, so no pair can be compared and the "
        "concordance index is undefined; pass labels with at least two values.")
  # Sorted by label, ties by decreasing prediction: a pair of positions a < b
  # with prediction rank r[a] < r[b] is then exactly a concordant pair.
  order = np.lexsort((-yp, yt))
  _, ranks = np.unique(yp[order], return_inverse=True)
  concordant = _increasing_pairs(ranks.reshape(-1))
  pred_ties = _tied_pairs(yp) - _tied_pairs(yt, yp)
  return (concordant + 0.5 * pred_ties) / comparable


# --------------------------------------------------------------------------- tuning


def tune_lambda(score, lambdas, *, step: float = 3.0, max_extensions: int = 6
                ) -> tuple[float, list[dict]]:
  """The ridge with the lowest validation score, the grid extended past its edges.

  Scores every ``lambdas`` (sorted), then, while the best is the smallest (largest)
  tried, scores ``best / step`` (``best * step``), at most ``max_extensions``
  times: the returned optimum is then bracketed by tried values on both sides
  unless the extensions ran out (its row then says ``"at_edge": True``).

  Args:
    score: ``lam -> float`` (lower is better), or ``lam -> (float, dict)`` whose
      dict is added to that lambda's row.
    lambdas: a non-empty sequence of ridges ``> 0``.
    step: factor between an edge and the next value tried, ``> 1``.
    max_extensions: most values tried beyond the grid.

  Returns:
    ``(best lambda, rows)``, one row ``{"lambda", "score", ...}`` per value tried,
    in the order tried.
  """
  lams = sorted(float(lam) for lam in lambdas)
  if not lams or lams[0] <= 0 or not all(np.isfinite(lams)):
    raise ValueError(f"lambdas must be a non-empty list of finite ridges > 0, got {lambdas!r}.")
  if not np.isfinite(step) or step <= 1:
    raise ValueError(f"step must be a finite factor > 1, got {step!r}.")
  rows: dict[float, dict] = {}

  def run(lam: float) -> None:
    out = score(lam)
    value, extra = out if isinstance(out, tuple) else (out, {})
    rows[lam] = {"lambda": lam, "score": float(value), **extra}

  for lam in lams:
    run(lam)
  for _ in range(max_extensions):
    tried = sorted(rows)
    best = min(tried, key=lambda lam: rows[lam]["score"])
    if best == tried[0]:
      run(best / step)
    elif best == tried[-1]:
      run(best * step)
    else:
      break
  tried = sorted(rows)
  best = min(tried, key=lambda lam: rows[lam]["score"])
  rows[best]["at_edge"] = best in (tried[0], tried[-1])
  return best, list(rows.values())
