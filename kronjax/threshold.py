"""The threshold index: which neurons fire (``P[r, j] > b``) for the points of a batch.

The paper keeps a tree per data point over the ``m`` values ``P[:, j]``; pointer
trees do not jit, so kronjax offers the same service as static-shaped arrays
behind one interface (an optax-style NamedTuple of pure functions):

  ``build(P, b) -> state``
  ``query(state, P, batch_idx, b) -> QueryResult``
  ``update(state, P, b, rows, row_change) -> state``   (after P changed)

Shapes: m neurons, n points, B batch, K_cap active capacity, R touched rows.

``update`` receives ``rows`` ``(R,)`` int32 (the neurons whose ``P`` row changed;
entries equal to ``m`` are padding) and ``row_change`` ``(R,)``: an upper bound on
``max_j |dP[r, j]|`` for each listed row (a row listed twice contributes twice).
``rows=None`` means every row, with ``row_change`` of shape ``(m,)``.

Kinds:
  * ``dense``: scan ``P[:, S] > b`` and compact. The reference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class QueryResult(NamedTuple):
  """Active neurons of each batch point."""
  idx: jax.Array       # (B, K_cap) int32, ascending, padded with m
  count: jax.Array     # (B,) int32, active neurons found (the true count unless overflowed
                       #   in a way that hides it; always > capacity when overflow is set)
  overflow: jax.Array  # (B,) bool, True when the point's active set did not fit


class ThresholdIndex(NamedTuple):
  """A threshold index kind: pure functions, static capacities in the closure."""
  kind: str
  build: Callable
  query: Callable
  update: Callable


class DenseIndexState(NamedTuple):
  rebuilds: jax.Array  # shape=(), int32; always 0 (the dense scan keeps nothing)


def compact(mask: jax.Array, capacity: int, fill: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the True entries of each row of ``mask`` ``(B, m)``, ascending.

  Returns ``(idx (B, capacity) int32 padded with fill, count (B,) int32)``;
  ``count`` is the full number of True entries even when it exceeds ``capacity``.
  """
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  idx = jax.vmap(lambda row: jnp.nonzero(row, size=capacity, fill_value=fill)[0])(mask)
  return idx.astype(jnp.int32), count


def dense_scan(*, active_capacity: int) -> ThresholdIndex:
  """The reference index: reads the whole ``(m, B)`` slice of ``P`` every query."""

  def build(P, b):
    del P, b
    return DenseIndexState(rebuilds=jnp.zeros((), jnp.int32))

  def query(state, P, batch_idx, b):
    del state
    m = P.shape[0]
    mask = P[:, batch_idx].T > b  # (B, m)
    idx, count = compact(mask, active_capacity, m)
    return QueryResult(idx, count, count > active_capacity)

  def update(state, P, b, rows, row_change):
    del P, b, rows, row_change
    return state

  return ThresholdIndex("dense", build, query, update)


KINDS = ("dense",)


def choose_kind(width: int, n: int) -> str:
  """The kind ``index="auto"`` picks for ``m = width`` neurons and ``n`` points."""
  del width, n
  return "dense"


def make_index(kind: str, *, width: int, active_capacity: int, candidate_capacity: int,
               delta: float, n: int) -> ThresholdIndex:
  """The index of the given kind (``"auto"`` resolved with ``choose_kind``)."""
  del candidate_capacity, delta
  if kind == "auto":
    kind = choose_kind(width, n)
  if kind == "dense":
    return dense_scan(active_capacity=active_capacity)
  raise ValueError(f"index kind {kind!r} is not available; choose one of {('auto',) + KINDS}.")
