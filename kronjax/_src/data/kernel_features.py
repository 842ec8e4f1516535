"""Entity features: from a similarity (kernel) matrix, and with main effects.

Glossary of shape letters used in this module:
  N   number of entities (rows and columns of the similarity matrix)
  r   rank kept: eigenvalues above the relative tolerance

A similarity matrix ``K`` that is not positive semidefinite has no exact
feature map; ``kernel_features`` returns ``F = V sqrt(max(Λ, 0))`` from ``eigh``
of the symmetrized matrix, rows normalized to unit norm, so ``F F^T`` is the
nearest PSD matrix to ``K`` with unit diagonal (up to the normalization), and
reports how much negative eigenvalue mass was clipped. ``main_effect_features``
centers a feature table and appends a constant direction, so that the product kernel of
pairs also holds each entity's effect alone.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from kronjax._src.base import checks


class KernelFeatures(NamedTuple):
  """Row features of a similarity matrix.

  Attributes:
    features: ``(N, r)`` float64, unit-norm rows; ``features @ features.T`` is
      the PSD part of the symmetrized ``K`` with unit diagonal.
    clipped: the negative eigenvalue mass clipped, ``sum |λ_-| / sum |λ|``, in
      ``[0, 1]`` (0 for a PSD input).
    rank: ``r``, the number of eigenvalues kept.
  """
  features: np.ndarray  # shape=(N, r), dtype=float64
  clipped: float
  rank: int


def kernel_features(K: Any, *, name: str = "K", rtol: float | None = None) -> KernelFeatures:
  """Unit-norm features ``F (N, r)`` with ``F F^T`` the nearest PSD ``K`` with unit diagonal.

  Symmetrizes ``(K + K^T) / 2``, takes ``eigh``, keeps the eigenvalues above
  ``rtol * max|λ|`` (``F = V sqrt(Λ)`` on those columns: the negative part is
  clipped, near-zero columns dropped) and normalizes every row of ``F`` to unit
  norm. For a PSD ``K`` with positive diagonal, ``F F^T = D^{-1/2} K D^{-1/2}``
  with ``D = diag(K)``. Runs on the host in float64 (once per entity table).

  Args:
    K: ``(N, N)`` real similarity matrix, finite.
    name: the argument's name in error messages.
    rtol: relative eigenvalue tolerance; default ``N * eps(float64)``.

  Returns:
    ``KernelFeatures(features (N, r), clipped, rank)``.

  Raises:
    TypeError: ``K`` is not a real array, or ``rtol`` is not a number.
    ValueError: ``K`` is not square 2-D, is empty, holds NaN/inf, ``rtol`` is negative or
      not finite, or a row of ``F`` is zero after clipping (no unit-norm row exists; the
      message names the row).
  """
  arr = np.asarray(K)
  if arr.dtype.kind not in "biuf":
    raise TypeError(
        f"{name} must be a real array (a similarity matrix), got dtype {arr.dtype}; "
        "pass the real part or a float array.")
  if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
    raise ValueError(
        f"{name} must be a square 2-D similarity matrix (N, N), got shape {arr.shape}.")
  if arr.shape[0] == 0:
    raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one entity.")
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)):
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    raise ValueError(
        f"{name} contains {bad} non-finite value(s) (NaN or inf); fill or drop those "
        "entities before computing features.")
  if rtol is not None:
    checks.check_nonnegative("rtol", rtol)
  n = arr.shape[0]
  sym = 0.5 * (arr + arr.T)
  lam, vec = np.linalg.eigh(sym)
  total = float(np.sum(np.abs(lam)))
  clipped = float(np.sum(-lam[lam < 0]) / total) if total > 0 else 0.0
  tol = (n * np.finfo(np.float64).eps if rtol is None else float(rtol)) * float(np.max(np.abs(lam)))
  keep = lam > tol
  feats = vec[:, keep] * np.sqrt(lam[keep])
  norms = np.linalg.norm(feats, axis=1)
  # A row whose squared norm is at the eigenvalue noise level has no direction.
  zero = np.flatnonzero(norms**2 <= max(tol, np.finfo(np.float64).tiny))
  if zero.size:
    i = int(zero[0])
    raise ValueError(
        f"{name}: row {i} has no positive-eigenvalue component after clipping "
        f"({name}[{i}, {i}] = {arr[i, i]!r}; {zero.size} such row(s)), so it cannot be "
        "normalized to unit norm; drop that entity or give it a positive self-similarity.")
  return KernelFeatures(features=feats / norms[:, None], clipped=clipped, rank=int(keep.sum()))


def main_effect_features(features: Any, weight: float, *, name: str = "features") -> np.ndarray:
  """Entity features whose pair kernel also holds each entity's effect alone.

  The pair kernel of ``x = u ⊗ v`` is the product ``k_u k_v``: a function of one entity alone
  (a drug's mean affinity, a user's mean rating) is not in its span unless the features hold a
  constant direction. This map centers the rows on their mean row, scales them to unit norm,
  appends the constant ``sqrt(weight)`` and scales the rows to unit norm again:
  ``u' = [c(u), sqrt(w)] / sqrt(1 + w)`` with ``c(u) = (u - mean) / |u - mean|``. With both
  tables mapped, the pair kernel is ``(k~_u + w)(k~_v + w) / (1 + w)^2`` with ``k~`` the cosine
  of the centered features: the interaction ``k~_u k~_v``, each entity's main effect
  (``w k~_u``, ``w k~_v``) and a constant, for any kernel learner (KronRLS as much as
  kronjax). Centering keeps the shared direction of the rows (every similarity being positive)
  from dominating the kernel, which would otherwise force a smaller learning rate on SGD.
  The rows stay unit-norm, so the threshold keeps its scale. Runs on the host in float64;
  the result has the input's floating dtype (float64 for integer input).

  Args:
    features: ``(N, r)`` real entity features (every entity of the kind, so the mean row
      involves no labels), finite.
    weight: ``w >= 0``, the constant's weight against the centered features.
    name: the argument's name in error messages.

  Returns:
    ``(N, r + 1)`` unit-norm rows. A row equal to the mean row keeps only the constant.

  Raises:
    TypeError: ``features`` is not a real array, or ``weight`` is not a number.
    ValueError: ``features`` is not 2-D with at least one row and column, holds NaN/inf,
      ``weight`` is negative or not finite, or ``weight`` is 0 and a row equals the mean row.
  """
  arr = np.asarray(features)
  if arr.dtype.kind not in "biuf":
    raise TypeError(f"{name} must be a real (N, r) array of entity features, got dtype "
                    f"{arr.dtype}; pass a float array (the real part, or the features of a "
                    "real kernel through kernel_features).")
  if arr.ndim != 2 or 0 in arr.shape:
    raise ValueError(f"{name} must be a 2-D (N, r) array with at least one row and column, "
                     f"got shape {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains non-finite values (NaN or inf); fill or drop those "
                     "entities first.")
  weight = checks.check_nonnegative("weight", weight, " (0 keeps only the centered features)")
  dtype = arr.dtype if arr.dtype.kind == "f" else np.float64
  centered = arr.astype(np.float64)
  centered -= centered.mean(axis=0)
  norms = np.linalg.norm(centered, axis=1, keepdims=True)
  # A row at the mean (norm at the rounding level of the mean over r columns) has no
  # direction: only the constant is left.
  tiny = (16 * np.finfo(np.float64).eps * math.sqrt(arr.shape[1])
          * max(float(np.max(np.abs(arr))), 1.0))
  unit = np.where(norms > tiny, centered / np.where(norms > tiny, norms, 1.0), 0.0)
  out = np.concatenate([unit, np.full((len(arr), 1), math.sqrt(weight))], axis=1)
  lengths = np.linalg.norm(out, axis=1, keepdims=True)
  if np.any(lengths == 0):   # only with weight 0
    i = int(np.flatnonzero(lengths[:, 0] == 0)[0])
    raise ValueError(f"{name}: row {i} equals the mean row, so with weight 0 nothing of it is "
                     "left to normalize; pass weight > 0 or drop that entity.")
  out /= lengths
  return out.astype(dtype)
