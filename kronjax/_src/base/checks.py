"""Input validation shared by every public entry point.

Checks on *values* (NaN, index ranges) only run on concrete arrays: under
``jit``/``vmap`` tracing the values are unknown, and the caller that holds the
concrete arrays (``fit``, ``init`` on real data) has already checked them.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError when a concrete array holds NaN or inf."""
  if not is_concrete(x):
    return
  arr = np.asarray(x)
  if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    raise ValueError(
        f"{name} contains {bad} non-finite value(s) (NaN or inf); "
        "clean or drop those entries before passing them to kronjax.")


def check_indices(name: str, idx: Any, size: int, *, allow_empty: bool = False) -> None:
  """Validates an index array against ``[0, size)``.

  JAX clamps out-of-range gathers silently, so a bad index would train on the
  wrong point without any error; we refuse it while the values are known.
  """
  if not is_concrete(idx):
    dtype = getattr(idx, "dtype", None)
    if dtype is not None and not np.issubdtype(dtype, np.integer):
      raise TypeError(f"{name} must be an integer array, got dtype {dtype}.")
    return
  arr = np.asarray(idx)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(
        f"{name} must be an integer array of point indices, got dtype {arr.dtype}; "
        "cast it with .astype(int) if the values are whole numbers.")
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D (a list of point indices), got shape {arr.shape}.")
  if arr.size == 0 and not allow_empty:
    raise ValueError(f"{name} is empty; pass at least one point index.")
  if arr.size and (arr.min() < 0 or arr.max() >= size):
    raise ValueError(
        f"{name} must hold indices in [0, {size}), got values in "
        f"[{int(arr.min())}, {int(arr.max())}].")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def check_nonnegative(name: str, value: Any, hint: str = "") -> float:
  """A finite number ``>= 0`` as a float: TypeError for anything not a number (bools
  included), ValueError for a negative, NaN, infinite or too-large value (``hint`` says what
  0 means, or the fix)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__} ({value!r}).")
  try:
    number = float(value)
  except OverflowError:   # an int too large for a float
    number = math.inf
  if not (math.isfinite(number) and number >= 0):
    raise ValueError(f"{name} must be a finite number >= 0{hint}, got {value!r}.")
  return number


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
  return value


def unknown_key_message(what: str, key: str, valid: Iterable[str]) -> str:
  """'unknown key' error text with the closest valid key, if any."""
  valid = sorted(valid)
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"Unknown {what} {key!r}.{hint} Valid keys: {', '.join(valid)}."


def check_label_tree(labels: Any, n: int, name: str = "labels") -> Any:
  """Labels of a loss of one's own: any pytree whose leaves have leading axis ``n``.

  Every leaf must be an array with ``shape[0] == n`` (one entry per point) and, if
  float, finite; nothing else about the shapes is checked. Errors name ``name`` and
  the leaf's path (``labels['w']``). Returns the tree with its leaves as arrays.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      labels, is_leaf=lambda x: isinstance(x, list))
  if not leaves:
    raise ValueError(f"{name} holds no arrays (got {labels!r}); pass an array or a pytree of "
                     f"arrays with leading axis {n}.")
  out = []
  for path, leaf in leaves:
    where = name + jax.tree_util.keystr(path)
    if leaf is None or not (hasattr(leaf, "shape") or isinstance(leaf, (list, int, float, bool))):
      raise TypeError(f"{where} must be an array with leading axis {n}, got "
                      f"{type(leaf).__name__}.")
    if not hasattr(leaf, "shape"):
      leaf = np.asarray(leaf)
    if leaf.ndim == 0 or leaf.shape[0] != n:
      raise ValueError(f"{where} must have leading axis {n} (one entry per point), got shape "
                       f"{tuple(leaf.shape)}.")
    if np.dtype(leaf.dtype).kind not in "fiub":
      raise TypeError(f"{where} must hold floats, integers or bools, got dtype {leaf.dtype}.")
    check_finite(where, leaf)
    out.append(jnp.asarray(leaf))
  return jax.tree_util.tree_unflatten(treedef, out)
