"""Synthetic Kronecker data and a planted-teacher task.

Shapes: n points, p factors with dims d_q, rank R, latent size k, C classes.

``planted`` draws every factor from a ``k``-dimensional latent subspace plus a
little isotropic noise, so the points of a ``d = 2**20`` tensor space carry
structure that ``n ~ 10**3`` samples can learn, and labels them with a teacher
network whose weights are themselves Kronecker products (so labels cost
``O(n sum_q d_q)``, never ``O(d)``).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.data.kron_data import KronData


def check_dims(dims: Sequence[int]) -> tuple[int, ...]:
  if isinstance(dims, int) or len(dims) == 0:
    raise ValueError(f"dims must be a non-empty sequence of factor sizes, got {dims!r}.")
  return tuple(checks.check_positive_int(f"dims[{q}]", d) for q, d in enumerate(dims))


def synthetic(key: jax.Array, n: int, dims: Sequence[int], *, rank: int = 1,
              normalize: bool = True, dtype=None) -> KronData:
  """``n`` points with i.i.d. Gaussian factors; unit-norm when ``normalize``.

  Returns rank-1 factors ``(n, d_q)`` when ``rank == 1`` else ``(n, rank, d_q)``.
  """
  n = checks.check_positive_int("n", n)
  rank = checks.check_positive_int("rank", rank)
  dims = check_dims(dims)
  dtype = jnp.dtype(dtype or jnp.result_type(float))
  return _synthetic(key, n=n, dims=dims, rank=rank, normalize=normalize, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("n", "dims", "rank", "normalize", "dtype"))
def _synthetic(key, *, n, dims, rank, normalize, dtype):
  shape = (n,) if rank == 1 else (n, rank)
  flat = jax.random.normal(key, (math.prod(shape) * sum(dims),), dtype)  # one threefry call site
  offsets = np.cumsum([0] + [math.prod(shape) * d for d in dims])
  factors = tuple(flat[o:o + math.prod(shape) * d].reshape(shape + (d,))
                  for o, d in zip(offsets, dims))
  data = KronData(factors)
  return data.normalize() if normalize else data


def planted(key: jax.Array, n: int, dims: Sequence[int], *, task: str = "regression",
            num_classes: int = 2, rank: int = 1, latent_dim: int = 4, noise: float = 0.1,
            teacher_width: int = 8, dtype=None) -> tuple[KronData, jax.Array]:
  """A learnable task on unit-norm Kronecker inputs.

  Factor ``q`` of point ``i`` is ``normalize(B_q z + noise * e)`` with a fixed
  Gaussian basis ``B_q`` of shape ``(d_q, k)`` (scaled by ``1/sqrt(d_q)``: near-orthonormal),
  ``z ~ N(0, I_k)``, ``e ~ N(0, I_{d_q})``.
  The teacher has ``teacher_width`` neurons with weights ``⊗_q B_q t_r^(q)``.

  Returns:
    ``(data, labels)``: labels ``(n, 1)`` float standardized targets for
    ``task="regression"``, ``(n,)`` int32 class ids in ``[0, num_classes)`` for
    ``task="classification"``.
  """
  n = checks.check_positive_int("n", n)
  dims = check_dims(dims)
  rank = checks.check_positive_int("rank", rank)
  latent_dim = checks.check_positive_int("latent_dim", latent_dim)
  teacher_width = checks.check_positive_int("teacher_width", teacher_width)
  checks.check_choice("task", task, ("regression", "classification"))
  if task == "classification":
    num_classes = checks.check_positive_int("num_classes", num_classes, minimum=2)
  dtype = jnp.dtype(dtype or jnp.result_type(float))
  return _planted(key, n=n, dims=dims, task=task, num_classes=num_classes, rank=rank,
                  latent_dim=latent_dim, noise=float(noise), teacher_width=teacher_width,
                  dtype=dtype)


@functools.partial(jax.jit, static_argnames=(
    "n", "dims", "task", "num_classes", "rank", "latent_dim", "noise", "teacher_width", "dtype"))
def _planted(key, *, n, dims, task, num_classes, rank, latent_dim, noise, teacher_width, dtype):
  factors, teacher_proj = [], []
  shape = (n,) if rank == 1 else (n, rank)
  out_dim = 1 if task == "regression" else num_classes
  # One Gaussian draw sliced into every piece: each random call site costs a
  # separate threefry compilation, which dominated this function's run time.
  pieces = []
  for d in dims:
    k = min(latent_dim, d)
    pieces += [(d, k), shape + (k,), shape + (d,), (teacher_width, k)]
  pieces.append((teacher_width, out_dim))
  sizes = [math.prod(s) for s in pieces]
  flat = jax.random.normal(key, (sum(sizes),), dtype)
  offsets = np.cumsum([0] + sizes)
  draws = [flat[o:o + s].reshape(p) for o, s, p in zip(offsets, sizes, pieces)]
  for q, d in enumerate(dims):
    basis, z, e, t = draws[4 * q: 4 * q + 4]
    basis = basis / jnp.sqrt(d)  # a Gaussian basis, close to orthonormal
    u = z @ basis.T + noise * e
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    factors.append(u)
    teacher_proj.append(u @ (basis @ t.T))  # <u_i^(q), B_q t_r^(q)>: shape + (teacher_width,)
  pre = teacher_proj[0]
  for tp in teacher_proj[1:]:
    pre = pre * tp
  if rank > 1:
    pre = jnp.sum(pre, axis=1)  # (n, teacher_width): <x_i, v_r> summed over rank terms
  pre = pre / jnp.std(pre)
  mix = draws[-1]
  target = jax.nn.relu(pre) @ mix
  data = KronData(tuple(factors)).normalize()
  if task == "regression":
    target = (target - target.mean()) / (target.std() + 1e-12)
    return data, target.astype(dtype)
  return data, jnp.argmax(target, axis=-1).astype(jnp.int32)
