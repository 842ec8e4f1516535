"""The kernel-space SGD step: dense SGD's step, computed on ``P = W X^T`` only.

Shapes: m neurons, n training points, n_e eval points, B batch, K = K_cap
(active capacity per point), C outputs, T touched rows.

One step on batch S:
  1. query the threshold index for the active neurons of each point: ``idx (B, K)``;
  2. forward from the active entries: ``f = relu(P[idx, S] - b) · a[idx] / sqrt(m)``;
  3. coefficients ``c[i, k] = <dl/df_i, a_r> / sqrt(m)`` for ``r = idx[i, k]``;
  4. the optax update on ``{"A": c, "P": c K[S, :], "a": grad_a, "P_eval": c K[S, E]}``;
  5. maintenance of A, P, P_eval and the index.

A step that cannot be taken exactly is *skipped*: the returned state is the
input state, bit for bit, and a metric says why. ``overflow``: a point of the
batch has more active neurons than the static capacity (sparse path);
``invalid_batch``: an index of the batch is outside ``[0, n)`` (under ``jit``
the values are not known until the step runs); ``wrong_dataset``: the dataset's
fingerprint is not the state's; a non-finite ``loss``. ``metrics["status"]`` is
one int32 code for all of them (``Status``: the first that applies, in that
order), and ``check_status`` turns it into a ``checkify`` error inside a loop of
one's own. The training loop (``kronjax.fit``) replays overflows with more capacity and
raises on the others. A skip is a mask, not a ``lax.cond``: both branches of a
cond returning the state make XLA copy every ``(m, n)`` array on every step.

Update paths (``Plan.update``; ``Plan.update_path`` says what ``auto`` picks):
  * sparse: query the threshold index, then update only the union of the
    batch's active rows, ``O(T B n)`` with ``T <= B K``; no ``O(m n)`` pass with
    a shape-free optimizer (plain sgd, schedules). Momentum and co. keep
    full-shape traces, so they add ``O(m n)`` elementwise work.
  * full: no index query and no capacity: the whole ``(m, B)`` slice of ``P``,
    and ``G (m, B) @ K[S, :] (B, n)``. Right when the batch touches a large part
    of the network.
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from kronjax._src.base import checks
from kronjax._src.model import losses
from kronjax._src.kernels import products
from kronjax._src.kernels import rows
from kronjax._src.data.dataset import Dataset, same_fingerprint
from kronjax._src.step import optim
from kronjax._src.step.state import TrainState, threshold_index, trainable_tree


class Updated(NamedTuple):
  """The stored arrays after the optimizer's update, and what the index needs to know."""
  A_T: jax.Array                 # (n, m)
  projections: jax.Array         # (m, n) or (n, m), as stored
  a: jax.Array                   # (m, C)
  P_eval: jax.Array | None       # (m, n_e)
  bias: jax.Array                # (C,)
  w0_scale: jax.Array            # ()
  opt_state: Any
  rows: jax.Array | None         # (T,) neurons whose P row changed; None: every row
  row_change: jax.Array          # (T,) or (m,): bound on max_j |dP[r, j]| per listed row


class Status(enum.IntEnum):
  """``metrics["status"]``: how a step ended (int32). The first that applies, in this order.

  A step with a status other than ``OK`` was skipped: the state came back unchanged.
  """
  OK = 0              # the step was taken
  OVERFLOW = 1        # a point has more active neurons than the capacity (sparse path)
  INVALID_BATCH = 2   # a batch index is outside [0, n)
  WRONG_DATASET = 3   # the dataset's fingerprint is not the state's
  NONFINITE_LOSS = 4  # the batch loss is NaN or inf


STATUS_TEXT = ", ".join(f"{int(s)} {s.name.lower().replace('_', ' ')}" for s in Status
                        if s != Status.OK)


def status_code(overflow: jax.Array, valid: jax.Array, same_data: jax.Array,
                finite: jax.Array) -> jax.Array:
  """``()`` int32 ``Status`` from the step's flags (the first failure, in ``Status``'s order)."""
  return jnp.select([overflow, ~valid, ~same_data, ~finite],
                    [jnp.int32(Status.OVERFLOW), jnp.int32(Status.INVALID_BATCH),
                     jnp.int32(Status.WRONG_DATASET), jnp.int32(Status.NONFINITE_LOSS)],
                    jnp.int32(Status.OK))


def check_status(metrics: dict[str, jax.Array]) -> None:
  """A ``checkify`` error unless the step whose ``metrics`` these are was taken.

  The opt-in raise for a loop of one's own: call it on each step's metrics inside
  the function you wrap with ``jax.experimental.checkify.checkify``; the error
  names the step (``metrics["step"]``, the state's count of applied steps, i.e.
  the step that was attempted) and the ``Status`` code. Without ``checkify`` it
  is not functionalized: under ``jit`` tracing fails, eagerly it raises at once.
  Works on a sweep's stacked metrics (any member failing fails).

  Example::

    from jax.experimental import checkify

    def run(state, batches):                       # batches: (steps, B) int32
      def body(state, batch_idx):
        state, metrics = kronjax.train_step(state, dataset, batch_idx)
        kronjax.check_status(metrics)
        return state, metrics["loss"]
      return jax.lax.scan(body, state, batches)

    err, (state, losses) = jax.jit(checkify.checkify(run))(state, batches)
    err.throw()   # JaxRuntimeError: ... at step 3: status 2 (...invalid batch...)
  """
  status = jnp.asarray(metrics["status"])
  checkify.check(jnp.all(status == Status.OK),
                 "kronjax step skipped (the state is unchanged) at step {step}: status {status} "
                 f"({STATUS_TEXT})", step=metrics["step"], status=status)


class Batch(NamedTuple):
  """What the step reads from the dataset for one batch."""
  idx: jax.Array                 # (B,) int32, in [0, n) when ``valid``
  valid: jax.Array               # () bool: every index is in [0, n)
  same_data: jax.Array           # () bool: the dataset is the state's (fingerprints agree)
  labels: Any                    # (B, C) float (mse), (B,) int32 (softmax), or the
                                 # batch's rows of every leaf (a callable loss)
  K_rows: jax.Array              # (B, n) Gram rows K[S, :]
  K_rows_eval: jax.Array | None  # (B, n_e) cross Gram rows K[S, E]


def train_step(state: TrainState, dataset: Dataset,
               batch_idx: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the points ``batch_idx`` ``(B,)`` of ``dataset``. Pure; jit- and vmap-able.

  ``jax.vmap(train_step, in_axes=(0, None, None))`` over a stacked state is a
  sweep. For speed use ``kronjax.jit_train_step``, which donates the state:
  without donation every step copies the ``(m, n)`` arrays.

  Returns:
    ``(new_state, metrics)`` with metrics ``loss`` (batch loss before the step;
    NaN when skipped for overflow or an invalid batch), ``active`` (mean
    active neurons per point), ``max_active``, ``overflow``, ``invalid_batch``,
    ``wrong_dataset`` (bools: the step was skipped, see the module docstring), ``skipped`` (the
    state was returned unchanged, for any reason, a non-finite loss included), ``status``
    (int32 ``Status``: 0 ok, 1 overflow, 2 invalid batch, 3 wrong dataset, 4 non-finite
    loss; the first that applies; ``check_status`` raises on it under ``checkify``),
    ``index_rebuilds`` (rebuilds of the threshold index so far) and ``step``.

  Raises:
    TypeError: ``state`` is not a TrainState, ``batch_idx`` is not integer.
    ValueError: another dataset than the state's, or concrete ``batch_idx``
      that are not a non-empty 1-D array in ``[0, n)``.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset)
  batch_idx = check_batch("batch_idx", batch_idx, state.n)
  return step(state, dataset, batch_idx)


_jitted_step = jax.jit(train_step, donate_argnums=0)


def jit_train_step(state: TrainState, dataset: Dataset,
                   batch_idx: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """``train_step``, jit-compiled, with ``state``'s buffers donated: the fast step.

  The input ``state`` is consumed (its arrays are reused for the output); keep
  using the returned one. Types, shapes and concrete batch indices are checked on
  the host; the dataset's fingerprint is compared inside the step (no host
  round trip): another dataset of the same shapes makes the step a no-op with
  ``metrics["wrong_dataset"]`` set. Compiles once per static data (config, plan,
  optimizer structure) and shapes.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset, compare_fingerprint=False)
  return _jitted_step(state, dataset, check_batch("batch_idx", batch_idx, state.n))


def check_batch(name: str, batch_idx: Any, n: int) -> jax.Array:
  """``batch_idx`` as an int32 array; its values are checked when they are concrete."""
  if not hasattr(batch_idx, "shape"):
    batch_idx = jnp.asarray(batch_idx)
  checks.check_indices(name, batch_idx, n)
  if batch_idx.ndim != 1 or batch_idx.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty 1-D index array, got shape {batch_idx.shape}.")
  return jnp.asarray(batch_idx, jnp.int32)


def read_batch(state: TrainState, dataset: Dataset, batch_idx: jax.Array) -> Batch:
  """The batch's labels and Gram rows; out-of-range indices read point 0 (and mark it invalid)."""
  n = state.n
  valid = jnp.all((batch_idx >= 0) & (batch_idx < n))
  idx = jnp.where(valid, batch_idx, 0)
  if not losses.is_named(state.config.loss):
    labels = jax.tree.map(lambda x: x[idx], dataset.labels)
  else:
    labels = dataset.labels[idx]
    if state.config.loss == "mse":
      labels = labels.reshape(idx.shape[0], -1).astype(state.a.dtype)
  K_rows, K_rows_eval = dataset.gram_rows(idx)
  same = same_fingerprint(state.fingerprint, dataset.fingerprint)
  return Batch(idx, valid, same, labels, K_rows, K_rows_eval)


def step(state: TrainState, dataset: Dataset, batch_idx: jax.Array,
         axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """The step body, no argument checks. With ``axis_name`` it runs on one neuron
  shard inside ``shard_map``: ``P``, ``A``, ``a`` hold this device's rows, and the
  only communication is the all-reduce of the ``(B, C)`` outputs (plus scalars)."""
  batch = read_batch(state, dataset, batch_idx)
  if state.update_path(batch_idx.shape[0]) == "full":
    return _full_step(state, batch, axis_name)
  return _sparse_step(state, batch, axis_name)


def _metrics(state, new_state, loss, counts, max_count, overflow, batch, ok, finite):
  # Counts stay exact at any dtype: averaged in at least float32 (bfloat16 holds
  # integers exactly only up to 256).
  count_dtype = jnp.promote_types(state.projections.dtype, jnp.float32)
  return {"loss": loss, "active": jnp.mean(counts.astype(count_dtype)),
          "max_active": max_count.astype(jnp.int32), "overflow": overflow,
          "invalid_batch": ~batch.valid, "wrong_dataset": ~batch.same_data, "skipped": ~ok,
          "status": status_code(overflow, batch.valid, batch.same_data, finite),
          "step": new_state.step,
          "index_rebuilds": getattr(new_state.index, "rebuilds", jnp.zeros((), jnp.int32))}


def _sparse_step(state: TrainState, batch: Batch, axis_name: str | None):
  """Steps 1-5 on the active sets only."""
  config = state.config
  index = threshold_index(state)
  q = index.query(state.index, state.P, batch.idx, state.b)
  counts, max_count = q.count, jnp.max(q.count)
  overflow = jnp.any(q.overflow)
  if axis_name is not None:  # every shard must take the same branch
    counts = jax.lax.psum(counts, axis_name)
    max_count = jax.lax.pmax(max_count, axis_name)
    overflow = jax.lax.psum(overflow.astype(jnp.int32), axis_name) > 0
  idx = q.idx                                                       # (B, K)
  n_rows = state.P.shape[0]  # this shard's neurons (= width unsharded); also the pad value
  inv_sqrt_m = 1.0 / math.sqrt(config.width)
  valid = idx < n_rows
  safe = jnp.where(valid, idx, 0)
  z = state.P[safe, batch.idx[:, None]]                             # (B, K)
  h = jnp.where(valid, losses.hidden(z, state.b), 0.0)              # (B, K)
  a_rows = jnp.where(valid[..., None], state.a[safe], 0.0)          # (B, K, C)
  outputs = jnp.einsum("bk,bkc->bc", h, a_rows) * inv_sqrt_m        # (B, C)
  if axis_name is not None:
    outputs = jax.lax.psum(outputs, axis_name)                      # the one all-reduce
  outputs = outputs + state.bias[None, :]                            # zeros unless output_bias
  loss, g = losses.loss_and_output_grad(config.loss, outputs, batch.labels)
  finite = jnp.isfinite(loss)
  ok = batch.valid & batch.same_data & ~overflow & finite
  g = jnp.where(ok, g, 0.0)  # a skipped step must not carry NaN into the masked updates
  # dL/dw_r = sum_i c[i, k] x_i: relu' is 1 on the active set (z > b strictly).
  c = jnp.where(valid, jnp.einsum("bc,bkc->bk", g, a_rows) * inv_sqrt_m, 0.0)   # (B, K)
  grad_a_rows = h[..., None] * g[:, None, :] * inv_sqrt_m                         # (B, K, C)
  grad_bias = jnp.sum(g, axis=0)                                                  # (C,)

  if state.tx.shape_free:  # the only path with no O(m n) pass
    new = _sparse_update(state, batch, idx, c, grad_a_rows, grad_bias, ok)
  elif state.tx.form:  # momentum, weight decay: applied from G's factors, in place
    new = _apply_factored(state, batch, *_dense_coefficients(state, idx, c, grad_a_rows),
                          grad_bias, ok)
  else:  # other stateful optimizers: full-shape gradients, P's from the touched rows only
    new = _apply_full_shape(state, _sparse_full_shape_grads(state, batch, idx, c, grad_a_rows,
                                                            grad_bias), ok)
  new_state = _finish(state, index, new, ok)
  loss = jnp.where(batch.valid & ~overflow, loss, jnp.nan)
  return new_state, _metrics(state, new_state, loss, counts, max_count, overflow, batch, ok,
                             finite)


def _finish(state: TrainState, index, new: Updated, ok: jax.Array) -> TrainState:
  """The new state from the updated arrays: index maintained, step counted when taken."""
  index_state = index.update(state.index, new.projections if state.layout == "neurons"
                             else new.projections.T, state.b, new.rows, new.row_change)
  return state.replace(A_T=new.A_T, projections=new.projections, a=new.a, P_eval=new.P_eval,
                       bias=new.bias, w0_scale=new.w0_scale,
                       opt_state=new.opt_state, index=index_state,
                       step=state.step + ok.astype(state.step.dtype))


def _optimize(state: TrainState, grads: dict, ok: jax.Array):
  """The optax update, masked: when ``ok`` is False the updates are zero and the
  optimizer state is the old one (momentum must not decay on a skipped step).
  Every path applies the optimizer exactly once per step, here."""
  # An optimizer that reads the parameters (weight decay) gets the full-shape tree.
  params = state.trainable() if state.tx.needs_params else None
  updates, opt_state = state.tx.update(grads, state.opt_state, params)
  # Updates keep their gradient's dtype (the data's): an optimizer scalar of a
  # wider dtype (a float64 learning rate under x64) must not promote the state.
  updates = jax.tree.map(lambda u, g: jnp.where(ok, u, jnp.zeros_like(u)).astype(g.dtype),
                         updates, grads)
  opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), opt_state, state.opt_state)
  return updates, opt_state


def _ordered_after(opt_state: Any, updated: Any) -> Any:
  """``opt_state`` made to depend on the ``updated`` arrays: one element of each, times
  zero, is added to every float leaf (exact: the step keeps the arrays finite).

  The ordering trick. A stateful optimizer's full-size traces are both read by the
  arrays' update (``P += lr * trace_new``) and written back in place (donated).
  Without a dependency, XLA recomputes ``trace_new`` in the fusion that updates the
  array and in the one that writes the trace, cannot order the two, and copies the
  trace on every step (fresh pages every step in a vmapped momentum sweep; the
  sweep tests check the compiled temporaries). The zero ties the traces' writes
  to after the arrays' updates.
  """
  zero = sum(jnp.zeros((), x.dtype) * x[(0,) * x.ndim] for x in jax.tree.leaves(updated))
  return jax.tree.map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      opt_state)


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


def _sparse_update(state, batch, idx, c, grad_a_rows, grad_bias, ok) -> Updated:
  """Touched rows only: the optimizer acts on the compact gradient entries.

  Work ``O(T B n)`` with ``T <= B K`` the union of the active sets, written into ``P`` row
  by row (``rows.add_rows_product``): no ``O(m n)`` pass and no ``(T, n)`` temporary.
  """
  config = state.config
  T, U = touched_rows(idx, c, state.P.shape[0])                     # (T,), (T, B)
  # A shape-free linear optimizer multiplies every gradient entry by one scalar per step, so
  # it may act on the coefficients U: L(U K_rows) = L(U) K_rows. The (T, n) rows of the
  # gradient are then formed block by block inside the update, never whole.
  grads = {"A": c, "P": U}                                          # (B, K), (T, B)
  if config.train_output:
    grads["a"] = grad_a_rows                                        # (B, K, C)
  if config.output_bias:
    grads["bias"] = grad_bias                                       # (C,)
  if state.P_eval is not None:
    grads["P_eval"] = U                                             # (T, B)
  updates, opt_state = _optimize(state, grads, ok)
  A_T = state.A_T.at[batch.idx[:, None], idx].add(updates["A"], mode="drop")
  P, row_change = rows.add_rows_product(state.P, T, updates["P"], batch.K_rows)
  a = state.a.at[idx].add(updates["a"], mode="drop") if config.train_output else state.a
  P_eval = (rows.add_rows_product(state.P_eval, T, updates["P_eval"], batch.K_rows_eval)[0]
            if state.P_eval is not None else None)
  return Updated(A_T, P, a, P_eval, _new_bias(state, updates), state.w0_scale, opt_state, T,
                 row_change)


def _new_bias(state: TrainState, updates: dict) -> jax.Array:
  return state.bias + updates["bias"] if state.config.output_bias else state.bias


def _full_step(state: TrainState, batch: Batch, axis_name: str | None = None):
  """The full path: the whole ``(m, B)`` slice of ``P``, no index query, no capacity.

  When the batch touches a large part of the network (or the optimizer's traces
  make every step ``O(m n)`` anyway) the ``(m, B) @ (B, n)`` product is the floor,
  and compacting active sets would only add work. Nothing can overflow here.
  Works in ``(B, m)`` orientation: in the ``"points"`` layout the batch's
  projections are ``B`` contiguous rows of ``state.projections``, and the
  hidden layer and its coefficients are computed on those rows in place
  (``rows``: one pass each, nothing ``(B, m)`` materialized but the
  coefficients); in the ``"neurons"`` layout they are ``B`` strided columns
  (~B cache lines per row), gathered once.
  """
  config = state.config
  inv_sqrt_m = 1.0 / math.sqrt(config.width)
  idx = batch.idx
  if state.layout == "points":
    P = state.projections                                           # (n, m)
    raw, counts = rows.relu_rows(P, idx, state.b, state.a)          # (B, C), (B,)

    def coefficients(g):                                            # (B, C) -> (B, m)
      return rows.relu_rows_grad(P, idx, state.b, state.a, g)

    def hidden_rows():
      return losses.hidden(rows.take_rows(P, idx), state.b)
  else:
    Ps_T = rows.take_cols(state.projections, idx)                   # (B, m)
    raw, counts = rows.relu_of(Ps_T, state.b, state.a)

    def coefficients(g):
      return rows.relu_grad_of(Ps_T, state.b, state.a, g)

    def hidden_rows():
      return losses.hidden(Ps_T, state.b)
  outputs = raw * inv_sqrt_m                                        # (B, C)
  if axis_name is not None:
    outputs = jax.lax.psum(outputs, axis_name)                      # the one all-reduce
    counts = jax.lax.psum(counts, axis_name)
  outputs = outputs + state.bias[None, :]                            # zeros unless output_bias
  max_count = jnp.max(counts)
  loss, g = losses.loss_and_output_grad(config.loss, outputs, batch.labels)
  finite = jnp.isfinite(loss)
  ok = batch.valid & batch.same_data & finite
  g = jnp.where(ok, g, 0.0)
  grad_bias = jnp.sum(g, axis=0)                                   # (C,)
  g = g * inv_sqrt_m                                               # (B, C)
  # dL/dw_r = sum_i G_T[i, r] x_i; relu' is 1 on the active set (z > b strictly).
  ga = hidden_rows().T @ g if config.train_output else None        # (m, C)
  if state.tx.shape_free:
    # One scalar per step for A, P and P_eval (optim.check_linear): read it from the
    # optimizer applied to unit gradients, then scale g by it so that the update
    # U = scalar * G_T comes out of one pass over the batch's rows.
    one = jnp.ones((), state.projections.dtype)
    unit = trainable_tree(one, one, ga, None if batch.K_rows_eval is None else one, config,
                          bias=grad_bias)
    updates, opt_state = _optimize(state, unit, ok)
    new = _apply_scalar(state, batch, coefficients(g * updates["P"]), updates, opt_state)
  elif state.tx.form:  # momentum, weight decay: applied from G's factors, in place
    new = _apply_factored(state, batch, coefficients(g), ga, grad_bias, ok)
  else:
    G_T = coefficients(g)                                           # (B, m)
    K_rows, K_rows_eval = batch.K_rows, batch.K_rows_eval
    grads = trainable_tree(
        jnp.zeros_like(state.A_T).at[idx].add(G_T),   # (n, m); XLA fuses the zeros in
        K_rows.T @ G_T if state.layout == "points" else G_T.T @ K_rows,   # as stored
        ga, None if K_rows_eval is None else G_T.T @ K_rows_eval, config, bias=grad_bias,
        w0_scale=jnp.zeros_like(state.w0_scale) if state.tx.needs_params else None)
    new = _apply_full_shape(state, grads, ok)
  new_state = _finish(state, threshold_index(state), new, ok)
  loss = jnp.where(batch.valid, loss, jnp.nan)
  return new_state, _metrics(state, new_state, loss, counts, max_count, jnp.zeros((), bool),
                             batch, ok, finite)


def _dense_coefficients(state: TrainState, idx: jax.Array, c: jax.Array,
                        grad_a_rows: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """The full path's coefficients from the sparse path's active sets ``idx (B, K)`` and
  coefficients ``c (B, K)``: ``G_T (B, m)``, and the output layer's gradient ``(m, C)``
  (None unless it trains)."""
  B, n_rows = idx.shape[0], state.P.shape[0]
  G_T = jnp.zeros((B, n_rows), c.dtype).at[jnp.arange(B)[:, None], idx].add(c, mode="drop")
  ga = (jnp.zeros_like(state.a).at[idx].add(grad_a_rows, mode="drop")
        if state.config.train_output else None)
  return G_T, ga


def _sparse_full_shape_grads(state: TrainState, batch: Batch, idx: jax.Array, c: jax.Array,
                             grad_a_rows: jax.Array, grad_bias: jax.Array) -> dict[str, jax.Array]:
  """The full-shape gradient tree a stateful optimizer needs, from the sparse path's
  active sets ``idx (B, K)`` and coefficients ``c (B, K)``: ``P``'s built from the
  touched rows only (``O(T B n)``), the rest scattered into zeros."""
  G_T, ga = _dense_coefficients(state, idx, c, grad_a_rows)
  T, U = touched_rows(idx, c, state.P.shape[0])
  gP = rows.add_sorted_rows(jnp.zeros_like(state.P), T, U @ batch.K_rows)
  gP_eval = (None if batch.K_rows_eval is None
             else rows.add_sorted_rows(jnp.zeros_like(state.P_eval), T, U @ batch.K_rows_eval))
  return trainable_tree(jnp.zeros_like(state.A_T).at[batch.idx].add(G_T), gP, ga, gP_eval,
                        state.config, bias=grad_bias,
                        w0_scale=jnp.zeros_like(state.w0_scale) if state.tx.needs_params else None)


def _apply_scalar(state: TrainState, batch: Batch, U: jax.Array, updates: dict,
                  opt_state: Any) -> Updated:
  """A shape-free optimizer's step on the full path: ``U (B, m)`` is the update of the
  batch's rows of ``A_T``; ``P`` gets ``K_rows^T @ U`` added in its stored layout
  (``products.add_product``: no ``(m, n)`` gradient is formed)."""
  K_rows, K_rows_eval = batch.K_rows, batch.K_rows_eval
  A_T = rows.add_rows(state.A_T, batch.idx, U)
  if state.layout == "points":   # (n, m) + (B, n)^T @ (B, m)
    P = products.add_product_t(state.projections, K_rows, U)
  else:                          # (m, n) + (m, B) @ (B, n)
    P = products.add_product(state.projections, U.T, K_rows)
  P_eval = (None if K_rows_eval is None
            else products.add_product(state.P_eval, U.T, K_rows_eval))
  # For the threshold index (dead code for kinds that ignore it).
  row_change = products.change_bound(U, K_rows)                    # (m,)
  a = state.a + updates["a"] if state.config.train_output else state.a
  return Updated(A_T, P, a, P_eval, _new_bias(state, updates), state.w0_scale, opt_state, None,
                 row_change)


def _apply_full_shape(state: TrainState, grads: dict, ok: jax.Array) -> Updated:
  """A stateful optimizer's step (momentum & co, whose traces are full-shape) on the
  full-shape gradient tree ``grads`` (``A`` as ``(n, m)``, ``P`` as stored)."""
  updates, opt_state = _optimize(state, grads, ok)
  A_T = state.A_T + updates["A"]
  P = state.projections + updates["P"]
  P_eval = state.P_eval + updates["P_eval"] if state.P_eval is not None else None
  row_change = jnp.max(jnp.abs(updates["P"]), axis=0 if state.layout == "points" else 1)  # (m,)
  a = state.a + updates["a"] if state.config.train_output else state.a
  w0_scale = state.w0_scale + updates["W0"] if "W0" in updates else state.w0_scale
  return Updated(A_T, P, a, P_eval, _new_bias(state, updates), w0_scale,
                 _ordered_after(opt_state, (A_T, P, P_eval)), None, row_change)


class Factored(NamedTuple):
  """The scalars of a factored-form step (``_factored_coefficients``), masked by ``ok``."""
  mu: jax.Array      # () trace decay: s' = mu s + beta g + nu w   ("trace" form)
  beta: jax.Array    # () gradient coefficient
  nu: jax.Array      # () parameter (weight decay) coefficient
  c: jax.Array       # () update = c s' ("trace"); unused for "decay" (update = beta g + nu w)


def _factored_coefficients(state: TrainState, ga: jax.Array | None, grad_bias: jax.Array,
                           ok: jax.Array, keys: tuple[str, ...]):
  """One optax update of a factored-form optimizer (``optim.update_form``) with the tied
  leaves (``keys``) replaced by three-entry probes.

  Each tied trace enters as ``[1, 0, 0]``, its gradient as ``[0, 1, 0]`` and its parameter as
  ``[0, 0, 1]``. The optimizer being linear, a ``"trace"`` form returns ``s' = [mu, beta, nu]``
  and ``update = c s'``, a ``"decay"`` form ``update = [0, beta, nu]``, with its real step
  count and hyperparameters (schedules, swept momenta). The output layer's leaves
  (``"a"``, ``"bias"``) go through with their real gradients and parameters.

  Returns:
    ``(coefficients, updates, opt_state, paths)``: the ``Factored`` scalars (a skipped step,
    ``ok`` False, gets ``mu = 1`` and zeros: every array and trace kept), the masked updates
    of the output layer, the new optimizer state with the probes still in the tied traces'
    places, and those places (``optim.tied_leaf_paths``; empty for ``"decay"``).
  """
  traced = state.tx.form == "trace"
  paths = optim.tied_leaf_paths(state.opt_state, keys) if traced else {}
  dtype = state.projections.dtype
  probe = lambda k: jnp.zeros((3,), dtype).at[k].set(1)  # noqa: E731
  leaves = dict(jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
  probe_state = jax.tree_util.tree_map_with_path(
      lambda path, x: probe(0) if path in paths.values() else x, state.opt_state)
  grads = {k: probe(1) for k in keys}
  params = {k: probe(2) for k in keys}
  if ga is not None:
    grads["a"], params["a"] = ga, state.a
  if state.config.output_bias:
    grads["bias"], params["bias"] = grad_bias, state.bias
  updates, opt_state = state.tx.update(grads, probe_state,
                                       params if state.tx.needs_params else None)
  zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
  if traced:
    s_new, u = dict(jax.tree_util.tree_flatten_with_path(opt_state)[0])[paths["P"]], updates["P"]
    # c from the largest entry of s' (each entry of update is c times it); c = 0 when s' = 0.
    k = jnp.argmax(jnp.abs(s_new))
    c = jnp.where(s_new[k] != 0, u[k] / jnp.where(s_new[k] != 0, s_new[k], 1), 0)
    mu, beta, nu = s_new[0], s_new[1], s_new[2]
  else:
    mu, beta, nu, c = one, updates["P"][1], updates["P"][2], zero
  coefficients = Factored(*(jnp.where(ok, x, default).astype(dtype) for x, default in
                            ((mu, one), (beta, zero), (nu, zero), (c, zero))))
  out = {k: jnp.where(ok, v, jnp.zeros_like(v)).astype(grads[k].dtype)
         for k, v in updates.items() if k not in keys}
  opt_state = jax.tree_util.tree_map_with_path(
      lambda path, new: new if path in paths.values()
      else jnp.where(ok, new, leaves[path]), opt_state)
  return coefficients, out, opt_state, paths


def _apply_factored(state: TrainState, batch: Batch, G_T: jax.Array, ga: jax.Array | None,
                    grad_bias: jax.Array, ok: jax.Array) -> Updated:
  """A factored-form optimizer's step (momentum, weight decay; ``optim.update_form``) from
  the gradient's factors: ``G_T (B, m)``, the coefficients of the batch's points.

  The gradients are never formed. With the scalars of ``_factored_coefficients``, each tied
  array ``X`` (``A``, ``P``, ``P_eval``; the init's scale ``s`` has no gradient) and its
  trace ``t`` become

  * ``"trace"``: ``t' = (mu t + nu X) + beta g``, ``X' = X + c t'``;
  * ``"decay"``: ``X' = (X + nu X) + beta g``;

  where ``+ beta g`` is one product in place for ``P`` and ``P_eval`` (``K_rows^T (beta G)``;
  with a trace, ``products.trace_product`` does all three piece by piece, so ``t`` and ``X``
  cross memory once) and a scatter into the batch's rows for ``A`` (``rows.add_rows``). No
  ``(m, n)`` temporary: a vmapped momentum sweep otherwise allocates two per member (the
  gradients of ``A`` and ``P``), mapped fresh every step.
  """
  keys = (("A", "P") + (("P_eval",) if state.P_eval is not None else ())
          + (("W0",) if state.tx.needs_params else ()))
  f, updates, opt_state, paths = _factored_coefficients(state, ga, grad_bias, ok, keys)
  leaves = dict(jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
  dtype = state.projections.dtype
  U = (f.beta * G_T).astype(dtype)                                  # (B, m)
  K_rows, K_rows_eval = batch.K_rows, batch.K_rows_eval

  def add_gradient(key, X):
    if key == "P" and state.layout == "points":   # (n, m) + (B, n)^T @ (B, m)
      return products.add_product_t(X, K_rows, U)
    if key == "P":                                 # (m, n) + (m, B) @ (B, n)
      return products.add_product(X, U.T, K_rows)
    if key == "P_eval":
      return products.add_product(X, U.T, K_rows_eval)
    if key == "A":
      return rows.add_rows(X, batch.idx, U)        # (n, m): the batch's rows
    return X                                       # W0: no gradient

  arrays = {"A": state.A_T, "P": state.projections, "P_eval": state.P_eval,
            "W0": state.w0_scale}
  coef = jnp.stack([f.mu, f.nu, f.c])                               # (3,)

  def trace_step(key, t, X):  # (t', X'): one crossing of both (products.trace_product)
    if key == "P" and state.layout == "points":
      return products.trace_product_t(t, X, K_rows, U, coef)
    if key in ("P", "P_eval"):
      return products.trace_product(t, X, U.T, K_rows if key == "P" else K_rows_eval, coef)
    t = add_gradient(key, f.mu * t + f.nu * X)     # A: beta G into the batch's rows
    return t, X + f.c * t

  new, traces = {}, {}
  for k in keys:
    X = arrays[k]
    if paths:
      traces[k], new[k] = trace_step(k, leaves[paths[k]], X)
    else:
      new[k] = add_gradient(k, X + f.nu * X)
  if paths:
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, x: next((traces[k] for k, p in paths.items() if p == path), x), opt_state)
    change = jnp.abs(f.c) * jnp.abs(traces["P"])
  else:  # a bound: |nu P| plus the product's; reads the old P, only where the index uses it
    axis = 0 if state.layout == "points" else 1
    change = (jnp.abs(f.nu) * jnp.max(jnp.abs(state.projections), axis=axis)
              + products.change_bound(U, K_rows))
  row_change = (jnp.max(change, axis=0 if state.layout == "points" else 1)
                if change.ndim == 2 else change)
  a = state.a + updates["a"] if state.config.train_output else state.a
  return Updated(new["A"], new["P"], a, new.get("P_eval"), _new_bias(state, updates),
                 new.get("W0", state.w0_scale), opt_state, None, row_change)
