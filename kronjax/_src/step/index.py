"""The threshold index: which neurons fire (``P[r, j] > b``) for the points of a batch.

The paper keeps a tree per data point over the ``m`` values ``P[:, j]``; pointer
trees do not jit, so kronjax offers the same service as static-shaped arrays
behind one interface (an optax-style NamedTuple of pure functions):

  ``build(P, b) -> state``
  ``query(state, P, batch_idx, b) -> QueryResult``
  ``update(state, P, b, rows, row_change) -> state``   (after P changed)

Shapes: m neurons, n points, B batch, K_cap active capacity, C_cap candidate
capacity, R touched rows.

``update`` receives ``rows`` ``(R,)`` int32 (the neurons whose ``P`` row changed;
entries ``>= m`` are padding) and ``row_change`` ``(R,)``: an upper bound on
``max_j |dP[r, j]|`` for each listed row (a row listed twice contributes twice).
``rows=None`` means every row, with ``row_change`` of shape ``(m,)``.

Kinds:
  * ``scan``: scan ``P[:, S] > b`` and compact. The reference.
  * ``bucketed``: buckets over *values* (see the design page of the docs). At a (re)build, point ``j``'s
    candidate bucket is ``{r : P[r, j] > lo}`` with ``lo = b - delta``, stored
    ascending in ``(n, C_cap)``. Every other neuron is certified ``<= b`` while the
    drift accumulated on its row since the rebuild (the sum of ``row_change``,
    plus a float rounding margin) stays within ``b - lo``. A query reads only the
    batch points' buckets, so it costs ``O(B C_cap)`` instead of ``O(B m)``. When
    an update spends the drift budget, the index rebuilds itself inside jit
    (``lax.cond``); ``rebuilds`` counts it. A query whose ``b`` differs from the
    one the index was built for, or that finds the budget spent (only possible
    when ``update`` was skipped), falls back to the dense scan: never a missed
    neuron. Under ``jax.vmap`` both ``lax.cond`` branches run (correct, slower).

Exactness and overflow. ``count`` is the number of neurons with ``P > b``
(strictly: a value equal to ``b`` is inactive), ``overflow`` is True exactly when
that count exceeds ``K_cap`` or, for ``bucketed``, when the point had more than
``C_cap`` candidates at the last rebuild (its bucket was truncated, so its active
set is unknown). For such a point ``count`` is ``max(candidates, K_cap + 1)``: an
upper bound on the active count, above ``K_cap`` so callers see it; the capacity
the bucket needs is ``needed_candidate_capacity(state)``. Nothing is silently
truncated.

Float safety. The drift bound ``D_r`` must dominate what the ``P`` updates really
did, including the rounding of ``fl(P + dP)``: every nonzero contribution adds
``c + 4 eps (|lo| + |b| + c) + tiny`` (``eps`` the dtype's machine epsilon, ``tiny``
its smallest normal, covering flush-to-zero), and the certificate
``lo + D_max <= b`` is checked with a ``4 eps`` margin as well. The margins are
~1e-6 in float32: they never change a result, only make a rebuild a hair earlier.

Cost (``experiments/bench_threshold.py``; the performance page's table is generated from
``experiments/results/threshold.json``): on CPU a bucketed query beats the scan, more the
wider the network, but a whole sparse-path step is dominated by the update of the active
rows, and XLA CPU copies the ``(n, C_cap)`` buckets through the ``lax.cond`` of ``update``
(a ``while_loop`` avoids the copy but is far slower on XLA CPU), so the bucketed index does
not make the step faster there.

So ``index="auto"`` (``Plan.resolve``, which serves the train step) picks ``scan``
on every measured shape; ``bucketed`` is for query-bound use and for backends
where the measurement comes out the other way (rerun the benchmark there).
"""

from __future__ import annotations

import math
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


class BucketedIndexState(NamedTuple):
  cand: jax.Array        # shape=(n, C_cap), int32; point j's candidates at the last rebuild,
                         #   ascending, padded with m
  cand_count: jax.Array  # shape=(n,), int32; full candidate count (may exceed C_cap)
  drift: jax.Array       # shape=(m,), float; drift bound per row since the last rebuild
  max_drift: jax.Array   # shape=(), float; max of drift
  b: jax.Array           # shape=(), float; the threshold the index was built for
  lo: jax.Array          # shape=(), float; the candidate cut b - delta used at the rebuild
  rebuilds: jax.Array    # shape=(), int32; rebuilds since build (inside update)


# ----------------------------------------------------------------------------- compaction

_BLOCK = 256  # block of the two-level prefix sum (XLA CPU's flat cumsum is slower)


def _prefix_count(mask: jax.Array) -> jax.Array:
  """Inclusive prefix count of ``mask`` ``(L, B)`` along axis 0, int32 ``(L, B)``."""
  L = mask.shape[0]
  if L <= _BLOCK or L % _BLOCK:
    return jnp.cumsum(mask, axis=0, dtype=jnp.int32)
  local = jnp.cumsum(mask.reshape(L // _BLOCK, _BLOCK, *mask.shape[1:]), axis=1, dtype=jnp.int32)
  totals = local[:, -1]
  offsets = jnp.cumsum(totals, axis=0, dtype=jnp.int32) - totals
  return (local + offsets[:, None]).reshape(mask.shape)


def compact_columns(mask: jax.Array, capacity: int, fill: int,
                    values: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The True entries of each column of ``mask`` ``(L, B)``, in order.

  Returns ``(out (B, capacity) int32, count (B,) int32)``: ``out[i, k]`` is the row
  of the ``k``-th True entry of column ``i`` (or ``values[row, i]`` when ``values``
  ``(L, B)`` is given), padded with ``fill``; ``count`` is the full number of True
  entries, even when it exceeds ``capacity``.

  Binary search of ``k = 1..capacity`` in the column prefix counts: ``O(L)`` for the
  prefix sum plus ``O(capacity log L)`` gathers, faster on XLA CPU than
  ``jnp.nonzero`` and than a cumsum scatter, with identical results.
  """
  L, B = mask.shape
  csum = _prefix_count(mask)                                    # (L, B)
  count = csum[-1]                                              # (B,)
  target = jnp.arange(1, capacity + 1, dtype=jnp.int32)[None]  # (1, cap)
  cols = jnp.arange(B, dtype=jnp.int32)[:, None]                # (B, 1)
  lo = jnp.zeros((B, capacity), jnp.int32)
  hi = jnp.full((B, capacity), L, jnp.int32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    below = (csum[jnp.minimum(mid, L - 1), cols] < target) & (lo < hi)
    return jnp.where(below, mid + 1, lo), jnp.where(below | (lo >= hi), hi, mid)

  pos, _ = jax.lax.fori_loop(0, max(1, math.ceil(math.log2(L + 1))), halve, (lo, hi))
  found = target <= count[:, None]                              # (B, cap)
  if values is None:
    out = pos
  else:
    out = values[jnp.minimum(pos, L - 1), cols]
  return jnp.where(found, out, fill).astype(jnp.int32), count


# ----------------------------------------------------------------------------- dense scan

def _scan(P: jax.Array, batch_idx: jax.Array, b: jax.Array, capacity: int) -> QueryResult:
  m = P.shape[0]
  mask = jnp.take(P, batch_idx, axis=1) > b                     # (m, B): no transpose
  idx, count = compact_columns(mask, capacity, m)
  return QueryResult(idx, count, count > capacity)


def dense_scan(*, active_capacity: int) -> ThresholdIndex:
  """The reference index: reads the whole ``(m, B)`` slice of ``P`` every query."""

  def build(P, b):
    del P, b
    return DenseIndexState(rebuilds=jnp.zeros((), jnp.int32))

  def query(state, P, batch_idx, b):
    del state
    return _scan(P, batch_idx, b, active_capacity)

  def update(state, P, b, rows, row_change):
    del P, b, rows, row_change
    return state

  return ThresholdIndex("scan", build, query, update)


# ----------------------------------------------------------------------------- bucketed

_REBUILD_CHUNK = 8  # columns compacted together at a rebuild (measured: 4-8 best on CPU)


def _candidates(P: jax.Array, lo: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """``(cand (n, capacity), cand_count (n,))``: rows with ``P[r, j] > lo`` per column."""
  m, n = P.shape
  g = min(_REBUILD_CHUNK, n)
  chunks = -(-n // g)
  # The last chunk is shifted left to stay in bounds; overlapping columns agree.
  starts = jnp.minimum(jnp.arange(chunks, dtype=jnp.int32) * g, n - g)

  def one(start):
    return compact_columns(jax.lax.dynamic_slice_in_dim(P, start, g, axis=1) > lo, capacity, m)

  cand, count = jax.lax.map(one, starts)                        # (chunks, g, cap), (chunks, g)
  cols = (starts[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]).reshape(-1)
  return (jnp.zeros((n, capacity), jnp.int32).at[cols].set(cand.reshape(-1, capacity)),
          jnp.zeros((n,), jnp.int32).at[cols].set(count.reshape(-1)))


def _rounding_scale(dtype) -> tuple[float, float]:
  info = jnp.finfo(dtype)
  return 4.0 * float(info.eps), float(info.tiny)


def bucketed(*, active_capacity: int, candidate_capacity: int, delta) -> ThresholdIndex:
  """Value buckets per point, certified by per-row drift, rebuilt lazily inside jit.

  ``delta`` (the value margin) may be a Python float or a traced scalar.
  """

  def rebuild(P, b, rebuilds):
    dtype = jnp.result_type(P.dtype, jnp.asarray(b).dtype)
    b = jnp.array(b, dtype)  # a copy: the caller's b may be donated alongside this state
    lo = b - jnp.asarray(delta, dtype)
    cand, cand_count = _candidates(P, lo, candidate_capacity)
    return BucketedIndexState(
        cand=cand, cand_count=cand_count, drift=jnp.zeros((P.shape[0],), dtype),
        max_drift=jnp.zeros((), dtype), b=b, lo=lo, rebuilds=jnp.asarray(rebuilds, jnp.int32))

  def certified(state, b):
    """True when every non-candidate is provably ``<= b`` (exact arithmetic)."""
    eps4, tiny = _rounding_scale(state.drift.dtype)
    b = jnp.asarray(b, state.b.dtype)
    margin = eps4 * (jnp.abs(b) + jnp.abs(state.lo) + state.max_drift) + tiny
    return (b == state.b) & (state.max_drift + margin <= b - state.lo)

  def build(P, b):
    return rebuild(P, b, 0)

  def bucket_query(state, P, batch_idx, b):
    m = P.shape[0]
    cand = state.cand[batch_idx].T                              # (C_cap, B)
    real = cand < m
    vals = P[jnp.where(real, cand, 0), batch_idx[None, :]]      # (C_cap, B)
    idx, count = compact_columns(real & (vals > b), active_capacity, m, values=cand)
    truncated = state.cand_count[batch_idx] > candidate_capacity
    count = jnp.where(truncated, jnp.maximum(state.cand_count[batch_idx], active_capacity + 1),
                      count)
    return QueryResult(idx, count, truncated | (count > active_capacity))

  def query(state, P, batch_idx, b):
    return jax.lax.cond(certified(state, b), bucket_query,
                        lambda s, P, i, b: _scan(P, i, b, active_capacity),
                        state, P, batch_idx, b)

  def update(state, P, b, rows, row_change):
    eps4, tiny = _rounding_scale(state.drift.dtype)
    c = jnp.abs(jnp.asarray(row_change, state.drift.dtype))
    # fl(P + dP) may overshoot dP by half an ulp of the result: bound it (module docstring).
    c = jnp.where(c > 0, c + eps4 * (jnp.abs(state.lo) + jnp.abs(state.b) + c) + tiny, c)
    if rows is None:
      drift = state.drift + c
      max_drift = jnp.max(drift)
    else:
      drift = state.drift.at[rows].add(c, mode="drop")
      touched = drift.at[rows].get(mode="fill", fill_value=0)
      max_drift = jnp.maximum(state.max_drift, jnp.max(touched, initial=0))
    state = state._replace(drift=drift, max_drift=max_drift)
    return jax.lax.cond(certified(state, b), lambda s, P, b: s,
                        lambda s, P, b: rebuild(P, b, s.rebuilds + 1), state, P, b)

  return ThresholdIndex("bucketed", build, query, update)


def needed_candidate_capacity(state, points=None) -> jax.Array:
  """The candidate capacity the last rebuild needed (``0`` for kinds without buckets).

  Over all points, or over ``points`` (e.g. the batch that overflowed). When a
  query overflows and this exceeds ``config.candidate_capacity``, growing
  ``active_capacity`` alone cannot help: grow ``candidate_capacity`` to at least this.
  """
  if isinstance(state, BucketedIndexState):
    counts = state.cand_count if points is None else state.cand_count[..., points]
    return jnp.max(counts)
  return jnp.zeros((), jnp.int32)


KINDS = ("scan", "bucketed")


def make_index(kind: str, *, width: int, active_capacity: int, candidate_capacity: int,
               delta: float) -> ThresholdIndex:
  """The index of the given kind (``Plan.resolve`` says which kind ``"auto"`` is)."""
  del width  # the kinds size themselves from the projections they are built on
  if kind == "scan":
    return dense_scan(active_capacity=active_capacity)
  if kind == "bucketed":
    return bucketed(active_capacity=active_capacity, candidate_capacity=candidate_capacity,
                    delta=delta)
  raise ValueError(f"index kind {kind!r} is not available; choose one of {KINDS}.")
