"""Synthetic Kronecker data and a planted-teacher task.

Shapes: n points, p factors with dims d_q, rank R, latent size k, C classes.

``planted`` draws every factor from a ``k``-dimensional latent subspace plus a
little isotropic noise, so the points of a ``d = 2**20`` tensor space carry
structure that ``n ~ 10**3`` samples can learn, and labels them with a teacher
network whose weights are themselves Kronecker products (so labels cost
``O(n sum_q d_q)``, never ``O(d)``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kronjax import _checks
from kronjax.kron import KronData


def _check_dims(dims: Sequence[int]) -> tuple[int, ...]:
  if isinstance(dims, int) or len(dims) == 0:
    raise ValueError(f"dims must be a non-empty sequence of factor sizes, got {dims!r}.")
  return tuple(_checks.check_positive_int(f"dims[{q}]", d) for q, d in enumerate(dims))


def synthetic(key: jax.Array, n: int, dims: Sequence[int], *, rank: int = 1,
              normalize: bool = True, dtype=None) -> KronData:
  """``n`` points with i.i.d. Gaussian factors; unit-norm when ``normalize``.

  Returns rank-1 factors ``(n, d_q)`` when ``rank == 1`` else ``(n, rank, d_q)``.
  """
  n = _checks.check_positive_int("n", n)
  rank = _checks.check_positive_int("rank", rank)
  dims = _check_dims(dims)
  dtype = dtype or jnp.result_type(float)
  keys = jax.random.split(key, len(dims))
  shape = (n,) if rank == 1 else (n, rank)
  factors = tuple(jax.random.normal(k, shape + (d,), dtype) for k, d in zip(keys, dims))
  data = KronData(factors)
  return data.normalize() if normalize else data


def planted(key: jax.Array, n: int, dims: Sequence[int], *, task: str = "regression",
            num_classes: int = 2, rank: int = 1, latent_dim: int = 4, noise: float = 0.1,
            teacher_width: int = 8, dtype=None) -> tuple[KronData, jax.Array]:
  """A learnable task on unit-norm Kronecker inputs.

  Factor ``q`` of point ``i`` is ``normalize(B_q z + noise * e)`` with a fixed
  orthonormal ``B_q`` of shape ``(d_q, k)``, ``z ~ N(0, I_k)``, ``e ~ N(0, I_{d_q})``.
  The teacher has ``teacher_width`` neurons with weights ``⊗_q B_q t_r^(q)``.

  Returns:
    ``(data, labels)``: labels ``(n, 1)`` float standardized targets for
    ``task="regression"``, ``(n,)`` int32 class ids in ``[0, num_classes)`` for
    ``task="classification"``.
  """
  n = _checks.check_positive_int("n", n)
  dims = _check_dims(dims)
  rank = _checks.check_positive_int("rank", rank)
  latent_dim = _checks.check_positive_int("latent_dim", latent_dim)
  teacher_width = _checks.check_positive_int("teacher_width", teacher_width)
  _checks.check_choice("task", task, ("regression", "classification"))
  if task == "classification":
    num_classes = _checks.check_positive_int("num_classes", num_classes, minimum=2)
  dtype = dtype or jnp.result_type(float)
  k_basis, k_z, k_e, k_t, k_mix = jax.random.split(key, 5)
  factors, teacher_proj = [], []
  shape = (n,) if rank == 1 else (n, rank)
  out_dim = 1 if task == "regression" else num_classes
  for q, d in enumerate(dims):
    k = min(latent_dim, d)
    basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(k_basis, q), (d, k), dtype))
    z = jax.random.normal(jax.random.fold_in(k_z, q), shape + (k,), dtype)
    e = jax.random.normal(jax.random.fold_in(k_e, q), shape + (d,), dtype)
    u = z @ basis.T + noise * e
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    factors.append(u)
    t = jax.random.normal(jax.random.fold_in(k_t, q), (teacher_width, k), dtype)
    teacher_proj.append(u @ (basis @ t.T))  # <u_i^(q), B_q t_r^(q)>: shape + (teacher_width,)
  pre = teacher_proj[0]
  for tp in teacher_proj[1:]:
    pre = pre * tp
  if rank > 1:
    pre = jnp.sum(pre, axis=1)  # (n, teacher_width): <x_i, v_r> summed over rank terms
  pre = pre / jnp.std(pre)
  mix = jax.random.normal(k_mix, (teacher_width, out_dim), dtype)
  target = jax.nn.relu(pre) @ mix
  data = KronData(tuple(factors)).normalize()
  if task == "regression":
    target = (target - target.mean()) / (target.std() + 1e-12)
    return data, target.astype(dtype)
  return data, jnp.argmax(target, axis=-1).astype(jnp.int32)
