"""The kernel-space SGD step: dense SGD's step, computed on ``P = W X^T`` only.

Shapes: m neurons, n training points, n_e eval points, B batch, K = K_cap
(active capacity per point), C outputs.

One step on batch S (DESIGN §2):
  1. query the threshold index for the active neurons of each point: ``idx (B, K)``;
  2. forward from the active entries: ``f = relu(P[idx, S] - b) · a[idx] / sqrt(m)``;
  3. coefficients ``c[i, k] = <dl/df_i, a_r> / sqrt(m)`` for ``r = idx[i, k]``;
  4. the optax update on ``{"A": c, "P": c K[S, :], "a": grad_a, "P_eval": c K[S, E]}``;
  5. maintenance of A, P, P_eval and the index.

On the sparse path, if any point of the batch has more active neurons than the
capacity, the step is *skipped* (the returned state equals the input state) and
``metrics["overflow"]`` is True; ``kronjax.fit`` replays it with more capacity.

Update paths (``config.update``, ``auto`` picks by ``resolve_update``):
  * sparse: query the threshold index, then update only the union of the
    batch's active rows, ``O(T B n)`` with ``T <= B K``; no ``O(m n)`` pass with
    a shape-free optimizer (plain sgd, schedules). Momentum and co. keep
    full-shape traces, so they add ``O(m n)`` elementwise work.
  * dense: no index query and no capacity: the whole ``(m, B)`` slice of ``P``,
    and ``G (m, B) @ K[S, :] (B, n)``. Right when the batch touches a large part
    of the network.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from kronjax._src import checks, losses, products, rows
from kronjax._src.state import TrainState, index_for, trainable_tree


def resolve_update(state: TrainState, batch_size: int) -> str:
  """The update path for this state and batch size (static)."""
  choice = state.config.update
  if state.layout == "points":  # P is stored point-major: only the dense path reads it
    return "dense"
  if choice != "auto":
    return choice
  m, K = state.config.width, state.config.active_capacity
  # The sparse path updates T <= B*K rows of n (a (T, B) @ (B, n) product and a
  # copy-free scatter); the dense one sweeps all m rows. Measured on CPU
  # (experiments/bench_step.py) the sorted unique row scatter costs about twice
  # a dense row per row, so sparse pays while the rows it may touch stay under m/3.
  return "sparse" if 3 * batch_size * K <= m else "dense"


def train_step(state: TrainState, batch_idx: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the points ``batch_idx`` ``(B,)``. Pure; jit- and vmap-able.

  Returns ``(new_state, metrics)`` with metrics ``loss`` (batch loss before the
  step; NaN when skipped), ``active`` (mean active neurons per point),
  ``max_active``, ``overflow`` (bool: the step was skipped for lack of capacity),
  ``index_rebuilds`` (rebuilds of the threshold index so far) and ``step``.

  Concrete ``batch_idx`` are range-checked here (JAX would clamp them silently).
  Use ``jax.jit(kronjax.train_step, donate_argnums=0)`` for speed: without
  donation every step copies the ``(m, n)`` arrays.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  if not hasattr(batch_idx, "shape"):
    batch_idx = jnp.asarray(batch_idx)
  checks.check_indices("batch_idx", batch_idx, state.data.n)
  if batch_idx.ndim != 1 or batch_idx.shape[0] == 0:
    raise ValueError(f"batch_idx must be a non-empty 1-D index array, got shape {batch_idx.shape}.")
  return _step(state, jnp.asarray(batch_idx, jnp.int32))


def _gram_rows(state: TrainState, batch_idx: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """``K[S, :]`` ``(B, n)`` and ``K[S, E]`` ``(B, n_e)`` (None without eval data)."""
  if state.gram is not None:
    rows = state.gram[batch_idx]
    rows_eval = None if state.gram_eval is None else state.gram_eval[batch_idx]
    return rows, rows_eval
  rows = state.data.gram(rows=batch_idx)
  rows_eval = None if state.eval_data is None else state.data.gram(rows=batch_idx, other=state.eval_data)
  return rows, rows_eval


def _step(state: TrainState, batch_idx: jax.Array, axis_name: str | None = None):
  """The step body. With ``axis_name`` it runs on one neuron shard inside
  ``shard_map``: ``P``, ``A``, ``a`` hold this device's rows, and the only
  communication is the all-reduce of the ``(B, C)`` outputs (plus scalars)."""
  if resolve_update(state, batch_idx.shape[0]) == "dense":
    return _dense_step(state, batch_idx, axis_name)
  index = index_for(state)
  q = index.query(state.index, state.P, batch_idx, state.b)
  counts = q.count
  overflow = jnp.any(q.overflow)
  if axis_name is not None:  # every shard must take the same branch
    counts = jax.lax.psum(counts, axis_name)
    overflow = jax.lax.psum(overflow.astype(jnp.int32), axis_name) > 0
  metrics_common = {
      "active": jnp.mean(counts.astype(state.P.dtype)),
      "max_active": jnp.max(q.count) if axis_name is None else jax.lax.pmax(jnp.max(q.count), axis_name),
      "overflow": overflow,
  }

  # A skipped step is a masked one, not a lax.cond: both branches of a cond
  # returning the state make XLA copy every (m, n) array on every step.
  new_state, loss = _apply(state, batch_idx, q.idx, index, ~overflow, axis_name)
  metrics = dict(metrics_common, loss=loss, step=new_state.step,
                 index_rebuilds=getattr(new_state.index, "rebuilds", jnp.zeros((), jnp.int32)))
  return new_state, metrics


def _apply(state: TrainState, batch_idx: jax.Array, idx: jax.Array, index, ok: jax.Array,
           axis_name: str | None = None):
  """Steps 2-5 of the sparse path for active sets ``idx (B, K)``.

  ``ok`` ``()`` bool: False (an active set overflowed) turns the step into an
  exact no-op: zero coefficients, zero updates, the old optimizer state and
  step count, and a NaN loss.
  """
  config = state.config
  rows = state.P.shape[0]  # this shard's neurons (= width unsharded); also the pad value
  B = batch_idx.shape[0]
  inv_sqrt_m = 1.0 / math.sqrt(config.width)
  valid = idx < rows                                                # (B, K)
  safe = jnp.where(valid, idx, 0)
  z = state.P[safe, batch_idx[:, None]]                             # (B, K)
  h = jnp.where(valid, losses.hidden(z, state.b), 0.0)              # (B, K)
  a_rows = jnp.where(valid[..., None], state.a[safe], 0.0)          # (B, K, C)
  outputs = jnp.einsum("bk,bkc->bc", h, a_rows) * inv_sqrt_m        # (B, C)
  if axis_name is not None:
    outputs = jax.lax.psum(outputs, axis_name)                      # the one all-reduce
  loss, g = losses.loss_and_output_grad(config.loss, outputs, state.labels[batch_idx])
  # dL/dw_r = sum_i c[i, k] x_i: relu' is 1 on the active set (z > b strictly).
  c = jnp.where(valid & ok, jnp.einsum("bc,bkc->bk", g, a_rows) * inv_sqrt_m, 0.0)   # (B, K)
  grad_a_rows = jnp.where(ok, h[..., None] * g[:, None, :] * inv_sqrt_m, 0.0)        # (B, K, C)
  K_rows, K_rows_eval = _gram_rows(state, batch_idx)

  if state.shape_free_tx:  # the only path with no O(m n) pass
    new = _sparse_update(state, batch_idx, idx, c, grad_a_rows, K_rows, K_rows_eval, ok)
    A_T, P, a, P_eval, opt_state, rows, row_change = new
  else:  # momentum & co: full-shape gradients, P's built from the touched rows only
    G_T = jnp.zeros((B, rows), c.dtype).at[jnp.arange(B)[:, None], idx].add(c, mode="drop")
    T, U = touched_rows(idx, c, rows)
    gP = _add_rows(jnp.zeros_like(state.P), T, U @ K_rows)
    gP_eval = (None if K_rows_eval is None
               else _add_rows(jnp.zeros_like(state.P_eval), T, U @ K_rows_eval))
    ga = jnp.zeros_like(state.a).at[idx].add(grad_a_rows, mode="drop")
    A_T, P, a, P_eval, opt_state, row_change = _full_update(
        state, batch_idx, lambda scale: scale * G_T, K_rows, K_rows_eval, ga, ok,
        gP=gP, gP_eval=gP_eval)
    rows = None
  index_state = index.update(state.index, P, state.b, rows, row_change)
  new_state = state.replace(A_T=A_T, projections=P, a=a, P_eval=P_eval, opt_state=opt_state,
                            index=index_state, step=state.step + ok.astype(state.step.dtype))
  return new_state, jnp.where(ok, loss, jnp.nan)


def _optimize(state: TrainState, grads: dict, ok: jax.Array):
  """The optax update, masked: when ``ok`` is False the updates are zero and the
  optimizer state is the old one (momentum must not decay on a skipped step)."""
  updates, opt_state = state.tx.update(grads, state.opt_state, None)
  updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
  opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, state.opt_state)
  return updates, opt_state


def touched_rows(idx: jax.Array, c: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """The union of the batch's active sets and each point's coefficient on it.

  Args:
    idx: ``(B, K)`` active neurons per point (ascending, padded with ``rows``).
    c: ``(B, K)`` coefficients (zero on padding).
    rows: number of neurons (the padding value).

  Returns:
    ``T (T_cap,)`` int32 sorted unique neuron ids, padded with the distinct
    out-of-range ids ``rows, rows + 1, ...`` (so scatters may promise sorted,
    unique indices, which XLA turns into a copy-free loop several times faster
    than a general scatter-add), and ``U (T_cap, B)`` with
    ``U[t, i] = c[i, k]`` where ``idx[i, k] == T[t]``. ``T_cap = min(rows, B*K)``.
  """
  B, K = idx.shape
  if B == 1:  # one active set is already sorted and unique
    T = jnp.where(idx[0] < rows, idx[0], rows + jnp.arange(K, dtype=idx.dtype))
    return T, c.T
  cap = min(rows, B * K)
  flat = jnp.sort(idx.reshape(-1))
  first = jnp.concatenate([jnp.ones((1,), bool), flat[1:] != flat[:-1]]) & (flat < rows)
  (pos,) = jnp.nonzero(first, size=cap, fill_value=0)
  n_unique = jnp.sum(first)
  slot = jnp.arange(cap)
  T = jnp.where(slot < n_unique, flat[pos], rows + slot).astype(idx.dtype)
  where = jnp.searchsorted(T, idx)                                  # (B, K) slot of each entry
  U = jnp.zeros((cap, B), c.dtype).at[where, jnp.arange(B)[:, None]].add(
      jnp.where(idx < rows, c, 0.0), mode="drop")
  return T, U


def _add_rows(X: jax.Array, T: jax.Array, rows_update: jax.Array) -> jax.Array:
  """``X[T] += rows_update`` for the sorted unique (padded) ids of ``touched_rows``."""
  return X.at[T].add(rows_update, mode="drop", indices_are_sorted=True, unique_indices=True)


def _sparse_update(state, batch_idx, idx, c, grad_a_rows, K_rows, K_rows_eval, ok):
  """Touched rows only: the optimizer acts on the compact gradient entries.

  Work ``O(T B n)`` with ``T <= B K`` the union of the active sets, plus one
  copy-free scatter of ``T`` rows: no ``O(m n)`` pass.
  """
  config = state.config
  T, U = touched_rows(idx, c, state.P.shape[0])                     # (T,), (T, B)
  grads = {"A": c, "P": U @ K_rows}                                 # (B, K), (T, n)
  if config.train_output:
    grads["a"] = grad_a_rows                                        # (B, K, C)
  if state.P_eval is not None:
    grads["P_eval"] = U @ K_rows_eval                               # (T, n_e)
  updates, opt_state = _optimize(state, grads, ok)
  A_T = state.A_T.at[batch_idx[:, None], idx].add(updates["A"], mode="drop")
  P = _add_rows(state.P, T, updates["P"])
  a = state.a.at[idx].add(updates["a"], mode="drop") if config.train_output else state.a
  P_eval = _add_rows(state.P_eval, T, updates["P_eval"]) if state.P_eval is not None else None
  row_change = jnp.max(jnp.abs(updates["P"]), axis=-1)              # (T,)
  return A_T, P, a, P_eval, opt_state, T, row_change


def _dense_step(state: TrainState, batch_idx: jax.Array, axis_name: str | None = None):
  """The dense path: the whole ``(m, B)`` slice of ``P``, no index query, no capacity.

  When the batch touches a large part of the network (or the optimizer's traces
  make every step ``O(m n)`` anyway) the ``(m, B) @ (B, n)`` product is the floor,
  and compacting active sets would only add work. Nothing can overflow here.
  Works in ``(B, m)`` orientation: in the ``"points"`` layout the batch's
  projections are ``B`` contiguous rows of ``state.projections``, and the
  hidden layer and its coefficients are computed on those rows in place
  (``kronjax.hidden``: one pass each, nothing ``(B, m)`` materialized but the
  coefficients); in the ``"neurons"`` layout they are ``B`` strided columns
  (~B cache lines per row), gathered once.
  """
  config = state.config
  inv_sqrt_m = 1.0 / math.sqrt(config.width)
  if state.layout == "points":
    P = state.projections                                           # (n, m)
    raw, counts = rows.relu_rows(P, batch_idx, state.b, state.a)  # (B, C), (B,)

    def coefficients(g):                                            # (B, C) -> (B, m)
      return rows.relu_rows_grad(P, batch_idx, state.b, state.a, g)

    def hidden_rows():
      return losses.hidden(rows.take_rows(P, batch_idx), state.b)
  else:
    Ps_T = state.projections[:, batch_idx].T                        # (B, m)
    raw, counts = rows.relu_of(Ps_T, state.b, state.a)

    def coefficients(g):
      return rows.relu_grad_of(Ps_T, state.b, state.a, g)

    def hidden_rows():
      return losses.hidden(Ps_T, state.b)
  outputs = raw * inv_sqrt_m                                        # (B, C)
  if axis_name is not None:
    outputs = jax.lax.psum(outputs, axis_name)                      # the one all-reduce
    counts = jax.lax.psum(counts, axis_name)
  max_count = jnp.max(counts).astype(jnp.int32)
  loss, g = losses.loss_and_output_grad(config.loss, outputs, state.labels[batch_idx])
  g = g * inv_sqrt_m                                                # (B, C)
  # dL/dw_r = sum_i G_T[i, r] x_i; relu' is 1 on the active set (z > b strictly).
  ga = hidden_rows().T @ g if config.train_output else None        # (m, C)
  K_rows, K_rows_eval = _gram_rows(state, batch_idx)
  ok = jnp.ones((), bool)
  A_T, P, a, P_eval, opt_state, row_change = _full_update(
      state, batch_idx, lambda scale: coefficients(g * scale), K_rows, K_rows_eval, ga, ok)
  index_state = index_for(state).update(state.index, P, state.b, None, row_change)
  new_state = state.replace(A_T=A_T, projections=P, a=a, P_eval=P_eval, opt_state=opt_state,
                            index=index_state, step=state.step + 1)
  metrics = {"active": jnp.mean(counts), "max_active": max_count,
             "overflow": jnp.zeros((), bool), "loss": loss, "step": new_state.step,
             "index_rebuilds": getattr(index_state, "rebuilds", jnp.zeros((), jnp.int32))}
  return new_state, metrics


def _full_update(state, batch_idx, coefficients, K_rows, K_rows_eval, ga, ok, gP=None,
                 gP_eval=None):
  """Applies the optimizer to the batch's coefficients ``G_T (B, m)`` (the
  batch's rows of ``A_T``'s gradient), the ``P`` gradient ``G_T^T @ K_rows`` and
  ``ga (m, C)`` (None unless the output layer trains); returns the new stored arrays.

  ``coefficients(scale)`` gives ``scale * G_T`` for a traced scalar ``scale``,
  so that the caller may compute it in one pass (``kronjax.hidden``).

  A shape-free optimizer (sgd, schedules) is one scalar per step, the same for
  ``A``, ``P`` and ``P_eval`` (``optim.check_linear``), so it commutes with the
  product: the step applies it to unit scalars to read that scalar ``c``, gets
  the update ``U = c G_T`` as ``coefficients(c)``, writes only the ``B`` rows of
  ``A_T``, and adds ``U`` to ``P`` as one ``P + K_rows^T @ U`` in its stored
  layout (``products.add_product``: no ``(m, n)`` gradient is formed). A
  stateful one (momentum) needs the full-shape ``(n, m)`` gradient of ``A_T``
  and the full gradient of ``P`` because its traces are full-shape: ``gP`` and
  ``gP_eval`` when the caller built them (the sparse path, from touched rows),
  else the product.
  """
  config = state.config
  points = state.layout == "points"
  if state.shape_free_tx:
    one = jnp.ones((), state.projections.dtype)
    grads = trainable_tree(one, one, ga, None if K_rows_eval is None else one, config)
    updates, opt_state = _optimize(state, grads, ok)
    U = coefficients(updates["P"])                                  # (B, m)
    A_T = rows.add_rows(state.A_T, batch_idx, U)
    if points:   # (n, m) + (B, n)^T @ (B, m)
      P = products.add_product_t(state.projections, K_rows, U)
    else:        # (m, n) + (m, B) @ (B, n)
      P = products.add_product(state.projections, U.T, K_rows)
    P_eval = (None if K_rows_eval is None
              else products.add_product(state.P_eval, U.T, K_rows_eval))
    # An upper bound on max_j |dP[r, j]| for the threshold index (dead code for
    # kinds that ignore it): |sum_i u_ir K_ij| <= sum_i |u_ir| max_j |K_ij|, widened
    # by the rounding of both float sums.
    eps = jnp.finfo(K_rows.dtype).eps
    bound = jnp.max(jnp.abs(K_rows), axis=1) @ jnp.abs(U)
    row_change = bound * (1 + 4 * (K_rows.shape[0] + 1) * eps)    # (m,)
  else:
    G_T = coefficients(jnp.ones((), state.projections.dtype))       # (B, m)
    gA = jnp.zeros_like(state.A_T).at[batch_idx].add(G_T)  # XLA fuses the zeros in
    if gP is None:
      gP = K_rows.T @ G_T if points else G_T.T @ K_rows             # as stored
      gP_eval = None if K_rows_eval is None else G_T.T @ K_rows_eval
    grads = trainable_tree(gA, gP, ga, gP_eval, config)
    updates, opt_state = _optimize(state, grads, ok)
    A_T = state.A_T + updates["A"]
    P = state.projections + updates["P"]
    P_eval = state.P_eval + updates["P_eval"] if state.P_eval is not None else None
    row_change = jnp.max(jnp.abs(updates["P"]), axis=0 if points else 1)   # (m,)
  a = state.a + updates["a"] if config.train_output else state.a
  return A_T, P, a, P_eval, opt_state, row_change
