"""The kronecker init: ``W0`` rows that are sums of ``R0`` random tensor products.

Shapes: m neurons (``width``), c neurons per chunk, n_s points of data set s,
p factors with dims d_q, d = prod_q d_q, R the data rank, R0 the init rank
(``init_rank``, independent of R), D = sum_q d_q.

Neuron ``r`` has the initial weight

    W0_r = (1 / sqrt(R0)) sum_{s < R0} g_{r,s}^(1) ⊗ ... ⊗ g_{r,s}^(p)

(``np.kron`` order) with every ``g_{r,s}^(q) ~ N(0, I_{d_q})`` independent. Then
``E[W0_r W0_r^T] = I_d``, so ``<w_r, x>`` has mean 0 and covariance
``K = X X^T`` across points, like the Gaussian (explicit) init; its law is not
Gaussian for small ``R0`` (for a unit rank-1 ``x``, ``E<w_r, x>^4 = 3 + (3^p - 3) / R0``)
and tends to ``N(0, K)`` as ``R0`` grows.

Draws: ``keys = split(key, m)`` (``keys.neuron_keys``, as the explicit
init); neuron ``r`` draws all its ``g``'s in one ``normal(keys[r], (R0, D))``
call, and ``g_{r,s}^(q)`` is row ``s``, columns ``[D_<q, D_<q + d_q)``. A neuron's
factors depend on its own key only, so any chunking of neurons gives the same
factors bit for bit, and the projections of new points (``predict`` on unseen
inputs) use exactly the ``W0`` the training projections used.

Projections never form ``W0`` (size ``d``):

    <W0_r, x_i> = (1 / sqrt(R0)) sum_{s < R0} sum_{t < R} prod_q <g_{r,s}^(q), u_{i,t}^(q)>

Cost (kronecker_gram_free_cost), for ``kronecker_projections`` over all sets
(``N = sum_s n_s``), with ``b = gemm_block(m, R0) ~ GEMM_ROWS / R0`` neurons per GEMM:

* time ``O(m R0 N R sum_q d_q)`` for the factor inner products (GEMMs
  ``(b R0, d_q) x (d_q, n_s R)``, one per factor, set and block) plus
  ``O(m R0 N R p)`` for their products and sums, plus ``O(m R0 sum_q d_q)`` normal
  draws; nothing in ``d``;
* memory ``O(c R0 sum_q d_q + b R0 n_s R + m N)``: one chunk's factors, one block's
  inner products (``(b, R0, n_s, R)`` per factor, about ``GEMM_ROWS n_s R`` numbers)
  and the output ``P0``.

Bit for bit: a GEMM's rounding depends on its shape (k-blocking, splitting k across
threads, matrix-vector kernels, the library's choice of algorithm), so every inner
product comes from a GEMM of the one block shape, which depends on ``m`` and ``R0``
only; ``chunk`` groups whole blocks. Chunked and whole runs, and a set passed alone
or with others, agree exactly.

Entity-indexed sets (``KronData(tables, index)``, pairs of entities) project every
entity once and gather: ``E_q = <g^(q), F_q>`` ``(m, R0, N_q)`` for the ``N_q``
rows of table ``q``, then ``P0[r, i] = (1 / sqrt(R0)) sum_s prod_q E_q[r, s, I[i, q]]``:
time ``O(m R0 sum_q N_q d_q + m R0 n p)`` instead of ``O(m R0 n sum_q d_q)``.

Compared with the explicit init (``O(m N d)`` time, ``O(c d + m N)`` memory) it is
about ``d / (R0 R sum_q d_q)`` times cheaper. Unlike the implicit init (``O(N^3)``,
all points sampled jointly up front), new points can be projected at any time, at
``O(m R0 n_new R sum_q d_q)``, onto the same ``W0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.data.synthetic import check_dims
from kronjax._src.base.keys import neuron_keys
from kronjax._src.data.kron_data import KronData, check_compatible

# Defaults chosen by experiments/bench_kronecker_init.py (results in
# experiments/results/kronecker_init.json).
DEFAULT_CHUNK = 64
GEMM_ROWS = 256  # see gemm_block


def _check_init_rank(init_rank: Any) -> int:
  return checks.check_positive_int("init_rank", init_rank)


def _check_dtype(dtype: Any) -> jnp.dtype:
  dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a real floating dtype, got {dtype}.")
  return dtype


def kronecker_factor_rows(keys: jax.Array, init_rank: int, dims: tuple[int, ...],
                          dtype=None) -> tuple[jax.Array, ...]:
  """Factors for the neurons whose keys are given: a tuple of ``(c, R0, d_q)`` arrays.

  Entry ``[q][r, s]`` is ``g_{r,s}^(q)``, unscaled (``W0_r`` carries ``1/sqrt(R0)``).

  The chunked accessor: ``keys`` is a slice of ``neuron_keys(key, m)`` (shape
  ``(c,)``); row ``r`` depends on ``keys[r]`` only, so slices of the whole agree
  bit for bit. No validation (it runs under ``jit``); ``init_rank`` and ``dims``
  must be static.
  """
  dtype = jnp.result_type(float) if dtype is None else dtype
  total = sum(dims)
  z = jax.vmap(lambda k: jax.random.normal(k, (init_rank, total), dtype))(keys)  # (c, R0, D)
  offsets = np.cumsum((0,) + tuple(dims))
  factors = tuple(z[:, :, int(o):int(o) + d] for o, d in zip(offsets[:-1], dims))
  return factors


def kronecker_factors(key: jax.Array, width: int, init_rank: int, dims: Sequence[int],
                      dtype=None) -> tuple[jax.Array, ...]:
  """All ``m`` neurons' factors: a tuple of ``(m, R0, d_q)`` arrays, unscaled.

  Memory ``O(m R0 sum_q d_q)``: for small problems and tests; the projections draw
  the same factors a chunk at a time.
  """
  width = checks.check_positive_int("width", width)
  init_rank = _check_init_rank(init_rank)
  dims = check_dims(dims)
  return kronecker_factor_rows(neuron_keys(key, width), init_rank, dims, _check_dtype(dtype))


def kronecker_weights(key: jax.Array, width: int, init_rank: int, dims: Sequence[int],
                      dtype=None) -> jax.Array:
  """The dense ``W0`` ``(m, d)`` in ``np.kron`` order, for small ``d`` only.

  Row ``r`` is ``(1/sqrt(R0)) sum_s np.kron(g_{r,s}^(1), np.kron(g_{r,s}^(2), ...))``;
  memory ``O(m R0 d)``. The dense baseline starts from this matrix, so both runs
  begin at the same network as ``kronecker_projections`` with the same key.
  """
  factors = kronecker_factors(key, width, init_rank, dims, dtype)
  # KronData.materialize sums the rank axis of (m, R0, d_q) factors in np.kron order.
  return KronData.tree_unflatten(None, factors).materialize() * (1.0 / math.sqrt(init_rank))


def kronecker_projections(key: jax.Array, width: int, init_rank: int,
                          sets: Sequence[KronData], *, chunk: int = DEFAULT_CHUNK
                          ) -> tuple[jax.Array, ...]:
  """``P0 = W0 X_s^T`` for each data set, from factor inner products (no ``d``).

  Args:
    key: the ``W0`` key (``keys.init_keys(key)["W0"]``).
    width: ``m``, the number of neurons.
    init_rank: ``R0 >= 1``, tensor terms per neuron (not the data rank).
    sets: non-empty tuple of ``KronData`` with the same factor dims (e.g. the
      training points, then held-out or new points); any data rank.
    chunk: neurons whose factors are drawn per step of the loop (rounded up to a
      multiple of ``gemm_block(width, init_rank)``; the fewer than one block of
      padded neurons this may add are computed and dropped); bounds the factors'
      memory.
      The result does not depend on it, bit for bit, nor on which other sets are
      passed along with a set.

  Returns:
    A tuple with one ``(m, n_s)`` array per set, in the sets' common dtype.
  """
  width = checks.check_positive_int("width", width)
  init_rank = _check_init_rank(init_rank)
  chunk = checks.check_positive_int("chunk", chunk)
  if isinstance(sets, KronData) or not isinstance(sets, (tuple, list)):
    raise TypeError(f"sets must be a tuple of kronjax.KronData, got {type(sets).__name__}; "
                    "wrap a single data set as (data,).")
  if not sets:
    raise ValueError("sets is empty; pass at least one KronData.")
  if not isinstance(sets[0], KronData):
    raise TypeError(f"sets[0] must be a kronjax.KronData, got {type(sets[0]).__name__}.")
  for j, other in enumerate(sets[1:], start=1):
    check_compatible(f"sets[{j}]", sets[0], other)
  block = gemm_block(width, init_rank)
  chunk = block * -(-min(chunk, width) // block)
  return _kronecker_projections(key, tuple(sets), width=width, init_rank=init_rank,
                                chunk=chunk, block=block)


def gemm_block(width: int, init_rank: int) -> int:
  """Neurons per factor GEMM: about ``GEMM_ROWS`` rows of ``(rows, d_q) x (d_q, n_s R)``.

  A GEMM's rounding depends on its shape (k-blocking, k-sharding across threads,
  matrix-vector paths, cuBLAS algorithms), so every neuron's inner products come
  from a GEMM of this one shape, which depends on ``width`` and ``init_rank`` only:
  the chunk size groups whole blocks and cannot change a bit of the result.
  """
  return min(width, -(-GEMM_ROWS // init_rank))


@functools.partial(jax.jit, static_argnames=("width", "init_rank", "chunk", "block"))
def _kronecker_projections(key, sets, *, width, init_rank, chunk, block):
  dims = sets[0].dims
  dtype = jnp.result_type(*(s.dtype for s in sets))
  keys = neuron_keys(key, width)
  pad = (-width) % chunk
  # Pad with copies of the first key so every chunk has the same static shape; the
  # padded rows are dropped below, and no real row's key changes.
  keys_padded = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)]) if pad else keys
  key_chunks = keys_padded.reshape((-1, chunk) + keys.shape[1:])
  # Per-point sets: (n_s, R, d_q) factors; indexed sets: (N_q, d_q) tables and (n_s, p) index.
  sources = tuple((tuple(f.astype(dtype) for f in s.factors), s.index) if s.is_indexed
                  else (tuple(f.astype(dtype) for f in s._ranked()), None) for s in sets)
  scale = 1.0 / math.sqrt(init_rank)

  def one_block(factors):  # factors[q]: (block, R0, d_q) -> one (block, n_s) per set
    outs = []
    for us, index in sources:
      prod = None
      for q, (g, u) in enumerate(zip(factors, us)):
        if index is None:
          ip = jnp.einsum("csd,ntd->csnt", g, u)  # (block, R0, n_s, R) inner products
        else:  # every entity once, then gathered: (block, R0, N_q) -> (block, R0, n_s, 1)
          ip = jnp.einsum("csd,Nd->csN", g, u)[:, :, index[:, q], None]
        prod = ip if prod is None else prod * ip
      outs.append(jnp.sum(prod, axis=(1, 3)) * scale)
    return tuple(outs)

  def one_chunk(kc):  # (chunk,) keys -> one (chunk // block, block, n_s) per set
    factors = kronecker_factor_rows(kc, init_rank, dims, dtype)
    blocks = tuple(f.reshape((chunk // block, block) + f.shape[1:]) for f in factors)
    return jax.lax.map(one_block, blocks)  # sequential: every GEMM has the block's shape

  outs = jax.lax.map(one_chunk, key_chunks)  # each (num_chunks, chunk // block, block, n_s)
  return tuple(o.reshape(-1, o.shape[-1])[:width] for o in outs)
