"""Checking the maintained projections against the weights they stand for: ``kronjax.verify``.

Shapes: m neurons, n training points, S sampled points, p factors with dims d_q,
R the data rank, R0 the init rank.

The step never forms the weights ``W = s W0 + A X``: it updates the projections
``P = W X^T`` ``(m, n)`` in place. ``verify`` recomputes the columns of ``P`` for
``S`` sampled points ``j`` from scratch, ``s W0 x_j + A K[:, j]``, and compares:
a state that drifted (float32 rounding over long runs), was edited by hand or
was corrupted by a bug shows up as a large error instead of silently wrong
predictions. Cost, for the ``S`` points only:

* ``W0 X_S^T``: ``kronecker`` ``O(m R0 R S sum_q d_q)`` from the factors;
  ``explicit`` ``O(m d S)``; ``implicit`` (``W0`` exists only jointly on the
  dataset's points) the init's whole ``P0``, ``O(n^3 + m n^2)``;
* the Gram columns ``K[:, S]`` ``(n, S)``: a gather when the dataset stores the
  Gram, else ``O(n S R^2 sum_q d_q)`` from the factors;
* ``A K[:, S]``: ``O(m n S)``.

Never ``O(m n^2)`` unless ``S = n``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.data.dataset import Dataset
from kronjax._src.inference import network
from kronjax._src.model import initializers
from kronjax._src.step.state import TrainState, check_key

TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
"""The relative error above which ``fit(..., verify_every=k)`` raises, by the state's dtype."""


def tolerance(dtype: Any) -> float:
  """``TOLERANCE`` for ``dtype`` (the float32 one for lower precisions)."""
  return TOLERANCE["float64"] if jnp.dtype(dtype) == jnp.float64 else TOLERANCE["float32"]


def reference_columns(state: TrainState, dataset: Dataset, cols: jax.Array) -> jax.Array:
  """``s W0 X_S^T + A K[:, S]`` ``(m, S)``: the columns ``cols`` of ``P`` recomputed exactly.

  ``state`` is one (unstacked, unsharded) state; jit- and vmap-able (``cols`` ``(S,)`` int).
  """
  config = state.config
  chunk = state.resolved_plan.init_chunk
  if config.init == "implicit":
    P0, _ = initializers.initial_projections(state.key, config, dataset, chunk=chunk)
    P0 = P0[:, cols]
  else:
    key_w = initializers.init_keys(state.key)["W0"]
    (P0,) = initializers.new_point_projections(key_w, config, dataset.data.subset(cols),
                                               chunk=chunk)
  K_cols = dataset.gram_rows(cols)[0].T   # K is symmetric: K[:, S] = K[S, :]^T
  dtype = state.projections.dtype
  return (state.w0_scale * P0.astype(dtype) + state.A @ K_cols.astype(dtype)).astype(dtype)


def errors(state: TrainState, dataset: Dataset, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(max_abs_error, relative_error)`` of ``P[:, cols]`` against ``reference_columns``.

  ``relative_error`` is ``max_abs_error / max |reference|``; NaN when ``P`` holds NaN.
  """
  ref = reference_columns(state, dataset, cols)
  got = state.P[:, cols]
  max_abs = jnp.max(jnp.abs(got - ref))
  scale = jnp.maximum(jnp.max(jnp.abs(ref)), jnp.finfo(ref.dtype).tiny)
  return max_abs, max_abs / scale


errors_jit = jax.jit(errors)
errors_sweep = jax.jit(jax.vmap(errors, in_axes=(0, None, None)))


def sample_columns(n: int, sample: int, key: Any, step: int) -> jax.Array:
  """``(min(sample, n),)`` sorted distinct point indices: all of them when ``sample >= n``,
  else drawn with ``key`` (None: ``fold_in(PRNGKey(0), step)``, a new sample at each step)."""
  if sample >= n:
    return jnp.arange(n, dtype=jnp.int32)
  key = jax.random.fold_in(jax.random.PRNGKey(0), step) if key is None else key
  return jnp.sort(jax.random.choice(key, n, (sample,), replace=False)).astype(jnp.int32)


def verify(state: TrainState, dataset: Dataset, *, sample: int = 256,
           key: jax.Array | None = None) -> dict[str, Any]:
  """Checks ``state.P`` against ``s W0 X^T + A K`` recomputed exactly on sampled points.

  Args:
    state: a single (not stacked, not neuron-sharded) ``TrainState``.
    dataset: the ``kronjax.Dataset`` it was built from.
    sample: how many training points (columns of ``P``) to check; all ``n`` when
      ``sample >= n``. The cost grows linearly with it (module docstring).
    key: PRNG key choosing the points; None draws them from the state's step
      (deterministic, another sample at each step).

  Returns:
    ``{"max_abs_error", "relative_error", "points_checked"}``: the largest
    ``|P - (s W0 X^T + A K)|`` over the checked columns, that divided by the largest
    ``|s W0 X^T + A K|`` there (NaN when ``P`` holds NaN), and how many points were
    checked. A healthy state is at rounding level: about ``1e-6`` in float32 after
    thousands of steps, ``1e-12`` in float64; ``kronjax.fit(..., verify_every=k)``
    raises above ``1e-3`` / ``1e-9`` (``TOLERANCE``).

  Raises:
    TypeError: not a ``TrainState``, a stacked sweep state, a bad ``sample`` or ``key``.
    ValueError: another dataset, or a padded neuron-sharded state.
  """
  network.check_single_state(state)
  state.check_dataset(dataset)
  if state.P.shape[0] != state.config.width:
    raise ValueError("verify needs an unsharded state (this one is padded for a mesh); call "
                     "kronjax.sharding.unshard_state(state) first.")
  sample = checks.check_positive_int("sample", sample)
  if key is not None:
    key = check_key("key", key)
  cols = sample_columns(state.n, sample, key, int(state.step))
  max_abs, rel = jax.device_get(errors_jit(state, dataset, cols))
  return {"max_abs_error": float(max_abs), "relative_error": float(rel),
          "points_checked": int(cols.shape[0])}


def check(state: TrainState, dataset: Dataset, step_no: int, *, members: bool = False) -> None:
  """``fit(..., verify_every=k)``: raises FloatingPointError when the relative error of
  ``state`` (each member of a stacked sweep with ``members``) passes ``tolerance``."""
  n = int(state.A_T.shape[-2])
  cols = sample_columns(n, 256, None, step_no)
  max_abs, rel = (np.atleast_1d(x) for x in jax.device_get(
      (errors_sweep if members else errors_jit)(state, dataset, cols)))
  tol = tolerance(state.projections.dtype)
  bad = ~(rel <= tol)   # NaN counts as bad
  if not bad.any():
    return
  who = np.flatnonzero(bad).tolist()
  i = who[0]
  label = f" for sweep member(s) {who}" if members else ""
  raise FloatingPointError(
      f"step {step_no}: the maintained projections P no longer match the weights{label}: "
      f"relative error {rel[i]:.3g} > {tol:g} (max abs error {max_abs[i]:.3g}, "
      f"{int(cols.shape[0])} points checked by kronjax.verify). Rounding drift in a long "
      "float32 run is fixed by resync_every=... (kronjax.resync); an error this large after "
      "few steps means P was changed by hand or by a bug.")
