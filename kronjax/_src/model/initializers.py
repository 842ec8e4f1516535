"""Initial projections ``P0 = W0 X^T`` without holding ``W0`` (m x d) in memory.

Shapes: m neurons, n points, d = prod_q d_q, C outputs, c neurons per chunk.

* ``explicit``: row ``r`` of ``W0`` is ``N(0, I_d)`` drawn from its own key
  ``split(key, m)[r]``, so the same key gives bit-for-bit the same ``W0`` whether
  it is drawn whole or ``chunk`` rows at a time. ``P0`` is built chunk by chunk
  with mode products: time ``O(m n d)``, memory ``O(chunk * d + m * n)``.
* ``implicit``: the columns of ``W0`` are never drawn. The rows of ``P0`` are
  i.i.d. ``N(0, K)``; we sample them as ``Z @ L^T`` with ``L L^T = K`` from
  ``psd_factor`` (Cholesky, or ``eigh`` when ``K`` is singular: duplicates,
  ``n > d``). Time ``O(n^3 + m n^2)``, no ``d``; ``W0`` exists only on these points.
* ``kronecker``: ``kronjax._src.model.kronecker_init``: every row of ``W0`` is a sum of
  ``init_rank`` Kronecker products of Gaussian factors. Time ``O(m R0 n R sum_q d_q)``,
  no ``d``, and ``W0 x'`` exists for every input.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.model import kronecker_init as kronecker
from kronjax._src.base.keys import init_keys, neuron_keys
from kronjax._src.data.kron_data import KronData, check_compatible


def w0_rows(keys: jax.Array, dim: int, dtype=None) -> jax.Array:
  """Rows of ``W0`` for the given neuron keys: ``(c, d)``."""
  dtype = dtype or jnp.result_type(float)
  return jax.vmap(lambda k: jax.random.normal(k, (dim,), dtype))(keys)


def explicit_weights(key: jax.Array, width: int, dim: int, dtype=None) -> jax.Array:
  """The full ``W0`` ``(m, d)`` that ``explicit_projections`` uses, for small ``d``.

  The dense baseline starts from this matrix, so both runs begin at the same network.
  """
  checks.check_positive_int("width", width)
  return w0_rows(neuron_keys(key, width), dim, dtype)


def explicit_projections(key: jax.Array, width: int, data: KronData, *, chunk: int = 256,
                         extra: tuple[KronData, ...] = ()) -> tuple[jax.Array, ...]:
  """``W0 X^T`` ``(m, n)`` (and ``W0 Y^T`` for each ``extra`` dataset), ``W0`` drawn in chunks.

  Returns a tuple: the projections of ``data`` followed by one per ``extra``.
  """
  width = checks.check_positive_int("width", width)
  chunk = checks.check_positive_int("chunk", chunk)
  for j, other in enumerate(extra):
    check_compatible(f"extra[{j}]", data, other)
  return _explicit_projections(key, (data,) + tuple(extra), width=width, chunk=min(chunk, width))


@functools.partial(jax.jit, static_argnames=("width", "chunk"))
def _explicit_projections(key, sets, *, width, chunk):
  data = sets[0]
  keys = neuron_keys(key, width)
  pad = (-width) % chunk
  # Pad with copies of the first key so every chunk has a static shape; the padded
  # rows are dropped below, and no real row's key changes.
  keys_padded = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)]) if pad else keys
  key_chunks = keys_padded.reshape((-1, chunk) + keys.shape[1:])

  def one_chunk(kc):
    W = w0_rows(kc, data.dim, data.dtype)
    return tuple(s.inner(W) for s in sets)

  outs = jax.lax.map(one_chunk, key_chunks)  # each (num_chunks, chunk, n_s)
  return tuple(o.reshape(-1, o.shape[-1])[:width] for o in outs)


def implicit_projections(key: jax.Array, width: int, data: KronData, *,
                         extra: tuple[KronData, ...] = (), gram: jax.Array | None = None
                         ) -> tuple[jax.Array, ...]:
  """Samples ``P0`` rows jointly for ``data`` and ``extra`` points from ``N(0, K_joint)``.

  Args:
    gram: optional precomputed ``K`` of ``data`` ``(n, n)`` (reused, not recomputed).

  Returns:
    A tuple ``(P0 (m, n), P0_extra_0 (m, n_0), ...)``, consistent with one
    implicit Gaussian ``W0``.
  """
  width = checks.check_positive_int("width", width)
  for j, other in enumerate(extra):
    check_compatible(f"extra[{j}]", data, other)
  if gram is not None:
    if not hasattr(gram, "shape") or tuple(gram.shape) != (data.n, data.n):
      raise ValueError(f"gram must be the ({data.n}, {data.n}) Gram of data, got shape "
                       f"{tuple(getattr(gram, 'shape', ()))}; pass data.gram() or omit it.")
    checks.check_finite("gram", gram)
    gram = jnp.asarray(gram, data.dtype)
  return _implicit_projections(key, data, tuple(extra), gram, width=width)


@functools.partial(jax.jit, static_argnames=("width",))
def _implicit_projections(key, data, extra, gram, *, width):
  K = data.gram() if gram is None else gram
  if extra:
    blocks = [[K] + [data.gram(other=o) for o in extra]]
    for j, oj in enumerate(extra):
      row = [data.gram(other=oj).T]
      for ok in extra:
        row.append(oj.gram(other=ok))
      blocks.append(row)
    K = jnp.block(blocks)
  L = psd_factor(K)
  Z = jax.random.normal(key, (width, K.shape[0]), K.dtype)
  P = Z @ L.T
  sizes = [data.n] + [o.n for o in extra]
  splits = [int(x) for x in np.cumsum(sizes)[:-1]]
  return tuple(jnp.split(P, splits, axis=1)) if splits else (P,)


def psd_factor(K: jax.Array) -> jax.Array:
  """``L`` with ``L L^T = K`` for a symmetric PSD (possibly singular) ``K``; ``(n, n)``.

  Cholesky (``n^3 / 3`` flops) when ``K`` is positive definite; when it is not
  (duplicate points, ``n > d``: a pivot is not positive and Cholesky returns
  NaN) the exact fallback is the eigendecomposition ``V sqrt(max(λ, 0))``
  (about 10x the flops), with eigenvalues below zero (round-off) clipped.
  Both give ``L L^T = K`` to rounding, so ``Z L^T`` is ``N(0, K)`` either way.
  """
  K = 0.5 * (K + K.T)
  L = jnp.linalg.cholesky(K)

  def eigen_factor(K):
    lam, V = jnp.linalg.eigh(K)
    return V * jnp.sqrt(jnp.clip(lam, 0.0, None))[None, :]

  return jax.lax.cond(jnp.all(jnp.isfinite(L)), lambda K: L, eigen_factor, K)


class Projections(NamedTuple):
  """Initial projections of a dataset's points."""
  train: jax.Array          # (m, n)
  eval: jax.Array | None    # (m, n_e), or None without eval points


def _drawn(config: Any) -> tuple[Any, int]:
  """``(config, rows drawn)``: a centered network draws ``m/2`` rows of ``W0`` and mirrors them."""
  config = config.resolve()
  return config, config.width // 2 if config.centered else config.width


def _mirrored(config: Any, rows: jax.Array) -> jax.Array:
  """``rows`` ``(m/2, ...)`` twice for a centered network (neuron ``r + m/2`` copies ``r``)."""
  return jnp.concatenate([rows, rows], axis=0) if config.centered else rows


def initial_projections(key: jax.Array, config: Any, dataset: Any, *,
                        chunk: int = 256) -> Projections:
  """``P0 = W0 X^T`` of the dataset's training and eval points under ``config.init``.

  ``key`` is the state's key; ``W0`` is drawn from ``init_keys(key)["W0"]``; ``chunk``
  neurons at a time (the plan's ``init_chunk``: memory, never values).
  """
  config, m = _drawn(config)
  key_w = init_keys(key)["W0"]
  data = dataset.data
  extra = () if dataset.eval_data is None else (dataset.eval_data,)
  if config.init == "explicit":
    out = explicit_projections(key_w, m, data, chunk=chunk, extra=extra)
  elif config.init == "kronecker":
    out = kronecker.kronecker_projections(key_w, m, config.init_rank, (data,) + extra,
                                          chunk=chunk)
  else:
    out = implicit_projections(key_w, m, data, extra=extra, gram=dataset.full_gram())
  out = [_mirrored(config, P) for P in out]
  return Projections(out[0], out[1] if extra else None)


def new_point_projections(key_w: jax.Array, config: Any, data: KronData, *,
                          chunk: int = 256) -> tuple[jax.Array]:
  """``(W0 X'^T,)`` ``(m, n')`` for any points ``data`` (explicit or kronecker init)."""
  config, m = _drawn(config)
  if config.init == "kronecker":
    (P0,) = kronecker.kronecker_projections(key_w, m, config.init_rank, (data,), chunk=chunk)
    return (_mirrored(config, P0),)
  if config.init == "explicit":
    (P0,) = explicit_projections(key_w, m, data, chunk=chunk)
    return (_mirrored(config, P0),)
  raise ValueError(f"init={config.init!r} draws no W0; only 'kronecker' and 'explicit' do.")


def initial_weights(key_w: jax.Array, config: Any, dims: tuple[int, ...], dtype=None) -> jax.Array:
  """The dense ``W0`` ``(m, d)`` of ``initial_projections`` (explicit or kronecker), for small ``d``."""
  config, m = _drawn(config)
  if config.init == "kronecker":
    return _mirrored(config, kronecker.kronecker_weights(key_w, m, config.init_rank, dims, dtype))
  if config.init == "explicit":
    return _mirrored(config, explicit_weights(key_w, m, math.prod(dims), dtype))
  raise ValueError(f"init={config.init!r} draws no W0; only 'kronecker' and 'explicit' do.")


def output_layer(key: jax.Array, width: int, num_outputs: int, dtype=None, *,
                 centered: bool = False) -> jax.Array:
  """Rademacher ``±1`` output weights ``a``, shape ``(m, C)``; ``centered``: the second half
  is the first half negated (``a[r + m/2] = -a[r]``), so mirrored neurons cancel."""
  dtype = dtype or jnp.result_type(float)
  if centered:
    half = jax.random.rademacher(key, (width // 2, num_outputs), dtype)
    return jnp.concatenate([half, -half], axis=0)
  return jax.random.rademacher(key, (width, num_outputs), dtype)
