"""The training state and its constructor ``kronjax.init``.

Shapes: m neurons, n training points, n_e eval points, C outputs.

The state holds what training changes and nothing else: the dataset lives
beside it (``kronjax.Dataset``), and the state keeps the dataset's fingerprint
(an array leaf) so that every entry point refuses another one. Arrays are pytree
leaves (so ``jax.vmap`` maps them and ``jit`` traces them); the static metadata is
what fixes the compiled code and nothing else: the resolved ``Config`` (the
network), the ``Plan`` as given (how the step runs) and the optax transformation
(compared by structure, ``optim.StaticTx``). Two states of equal static data and
shapes share one compiled step.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kronjax._src.base import checks
from kronjax._src.model import initializers
from kronjax._src.model import losses
from kronjax._src.step import optim
from kronjax._src.step import index as index_lib
from kronjax._src.model.config import Config
from kronjax._src.data.dataset import Dataset, check_dataset
from kronjax._src.step.plan import Plan


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything one training run carries from step to step.

  Attributes:
    projections: the projections ``P[r, j] = <w_r, x_j>`` of the training points,
      stored as the resolved plan's ``layout`` says: ``(m, n)`` (``"neurons"``) or
      ``(n, m)`` (``"points"``). ``state.P`` is the ``(m, n)`` view either way.
    A_T: ``(n, m)`` coefficients, transposed: ``W = W0 + A X`` with ``A = A_T.T``
      (zeros at init). Stored point-major because a step writes the ``B`` batch
      *columns* of ``A``: rows of ``A_T`` are contiguous, columns of ``A`` are not.
      ``state.A`` is the ``(m, n)`` view.
    a: ``(m, C)`` output layer.
    bias: ``(C,)`` output bias (zeros; trained with ``config.output_bias``).
    w0_scale: ``()`` the scale ``s`` of the init's weights, ``W = s W0 + A X`` (1 at
      init; only an optimizer that reads the parameters, weight decay, changes it).
    b: ``()`` ReLU threshold (an array so sweeps can vmap it).
    opt_state: the optax state over the tree ``{"A", "P"[, "a"][, "P_eval"]}``
      (its ``"A"`` leaf is ``A_T``-shaped, ``(n, m)``; its ``"P"`` leaf is
      shaped as ``projections``).
    step: ``()`` int32, number of applied steps.
    key: the key the state was initialized from (``W0`` and ``a`` derive from it).
    index: the threshold index state (kind ``index_kind``).
    P_eval: ``(m, n_e)`` maintained projections of the dataset's eval points, or None.
    fingerprint: ``(8,)`` uint32, the fingerprint of the dataset the state was built from.
    config: the network (a resolved ``Config``; static).
    plan: how the step runs (``Plan`` as given; static). ``resolved_plan`` fills it in.
    tx: the optimizer (``optim.StaticTx``: ``tx.init``, ``tx.update``; static).

  Saving: ``kronjax.checkpoint.save`` (orbax; resume with ``fit``). ``pickle`` is
  refused (TypeError): the state holds its optax transformation, whose functions
  are closures that cannot be pickled. ``flax.serialization`` works where flax is
  installed (it is not a kronjax dependency): ``to_bytes(state)`` /
  ``to_state_dict(state)`` hold the array leaves, and ``from_bytes(template,
  data)`` restores them into a ``template`` state built by ``kronjax.init`` with
  the same config, dataset, optimizer and plan (the static fields come from it).
  ``copy.copy`` and ``copy.deepcopy`` work.
  """

  projections: jax.Array
  A_T: jax.Array
  a: jax.Array
  b: jax.Array
  opt_state: Any
  step: jax.Array
  key: jax.Array
  index: Any
  P_eval: jax.Array | None
  bias: jax.Array
  w0_scale: jax.Array
  fingerprint: jax.Array
  config: Config = dataclasses.field(metadata=dict(static=True))
  plan: Plan = dataclasses.field(metadata=dict(static=True))
  tx: optim.StaticTx = dataclasses.field(metadata=dict(static=True))

  def __reduce__(self):
    raise TypeError(
        "a kronjax.TrainState cannot be pickled: it holds its optax transformation, whose "
        "init/update functions are closures. Save it with kronjax.checkpoint.save (orbax; "
        "kronjax.fit resumes from it), or its arrays with flax.serialization.to_bytes(state) "
        "where flax is installed; for inference, kronjax.network.save.")

  def __copy__(self) -> "TrainState":
    return dataclasses.replace(self)

  def __deepcopy__(self, memo: dict) -> "TrainState":
    return jax.tree.map(lambda x: copy.deepcopy(x, memo), self)

  def replace(self, **changes: Any) -> "TrainState":
    """A copy with ``changes``; ``P=`` takes the ``(m, n)`` view and is stored in
    this state's layout (``(S, m, n)`` in a sweep)."""
    if "P" in changes:
      if "projections" in changes:
        raise ValueError("replace got both P and projections; pass one of them.")
      P = changes.pop("P")
      changes["projections"] = P if self.layout == "neurons" else jnp.swapaxes(P, -1, -2)
    return dataclasses.replace(self, **changes)

  @property
  def resolved_plan(self) -> Plan:
    """``plan`` with every derived field filled in for ``config``."""
    return resolve_plan(self.plan, self.config)

  @property
  def layout(self) -> str:
    """``"neurons"`` (``projections`` is ``(m, n)``) or ``"points"`` (``(n, m)``)."""
    return self.resolved_plan.layout

  @property
  def index_kind(self) -> str:
    """The threshold index kind the resolved plan runs (``"scan"`` or ``"bucketed"``)."""
    return self.resolved_plan.index

  def update_path(self, batch_size: int) -> str:
    """``"sparse"`` or ``"full"``: the path a step on ``batch_size`` points takes."""
    return self.plan.update_path(self.config, batch_size)

  @property
  def P(self) -> jax.Array:
    """``(m, n)`` projections of the training points (``(S, m, n)`` in a sweep); a
    transposed view of ``projections`` in the ``"points"`` layout."""
    if self.layout == "neurons" or not hasattr(self.projections, "ndim"):
      return self.projections  # (also a spec tree's PartitionSpec, as stored)
    return jnp.swapaxes(self.projections, -1, -2)

  @property
  def width(self) -> int:
    return self.config.width

  @property
  def n(self) -> int:
    """Number of training points the state was built for."""
    return int(self.A_T.shape[-2])

  @property
  def n_eval(self) -> int:
    """Number of eval points whose projections the state maintains (0 if none)."""
    return 0 if self.P_eval is None else int(self.P_eval.shape[-1])

  @property
  def A(self) -> jax.Array:
    """``(m, n)`` coefficients, ``W = W0 + A X`` (a view of ``A_T``; ``(S, m, n)`` in a sweep)."""
    return jnp.swapaxes(self.A_T, -1, -2)

  def trainable(self) -> dict[str, jax.Array]:
    """The tree the optimizer acts on: ``{"A", "P"[, "a"][, "P_eval"]}``."""
    return trainable_tree(self.A_T, self.projections, self.a, self.P_eval, self.config,
                          bias=self.bias, w0_scale=self.w0_scale if self.tx.needs_params else None)

  def check_dataset(self, dataset: Any, name: str = "dataset", *,
                    compare_fingerprint: bool = True) -> Dataset:
    """Raises TypeError / ValueError unless ``dataset`` is the one this state was built from.

    The fingerprints are compared on the host when both are concrete and
    ``compare_fingerprint`` (the jitted step compares them itself, with no host round trip).
    """
    fingerprint = self.fingerprint
    if compare_fingerprint and getattr(fingerprint, "ndim", 1) > 1 and checks.is_concrete(fingerprint):
      fingerprint = fingerprint.reshape(-1, fingerprint.shape[-1])[0]  # a sweep's members share one
    return check_dataset(name, dataset, n=self.n, n_eval=self.n_eval,
                         fingerprint=fingerprint if compare_fingerprint else None)


@functools.lru_cache(maxsize=256)
def resolve_plan(plan: Plan, config: Config) -> Plan:
  return plan.resolve(config)


jax.tree_util.register_dataclass(
    TrainState,
    data_fields=[f.name for f in dataclasses.fields(TrainState) if not f.metadata.get("static")],
    meta_fields=[f.name for f in dataclasses.fields(TrainState) if f.metadata.get("static")],
)


def trainable_tree(A_T, P, a, P_eval, config: Config, *, bias=None,
                   w0_scale=None) -> dict[str, jax.Array]:
  """The tree the optimizer acts on: ``{"A", "P"[, "a"][, "bias"][, "P_eval"][, "W0"]}``.

  ``"a"`` with ``config.train_output``, ``"bias"`` with ``config.output_bias``, ``"W0"``
  (the scale of the init's weights) when ``w0_scale`` is given: for an optimizer that
  reads the parameters (weight decay), whose update of ``W = s W0 + A X`` scales ``s``.
  """
  tree = {"A": A_T, "P": P}
  if config.train_output:
    tree["a"] = a
  if config.output_bias:
    tree["bias"] = bias
  if P_eval is not None:
    tree["P_eval"] = P_eval
  if w0_scale is not None:
    tree["W0"] = w0_scale
  return tree


def threshold_index(state: "TrainState") -> index_lib.ThresholdIndex:
  """The threshold index functions of ``state``'s resolved plan (kind and capacities)."""
  return make_index(state.config, state.resolved_plan)


def make_index(config: Config, plan: Plan) -> index_lib.ThresholdIndex:
  """The threshold index of the resolved ``plan`` for the network ``config``."""
  return index_lib.make_index(
      plan.index, width=config.width, active_capacity=plan.active_capacity,
      candidate_capacity=plan.candidate_capacity, delta=plan.index_delta)


def check_key(name: str, key: Any) -> jax.Array:
  """A PRNG key (typed ``jax.random.key`` or raw ``jax.random.PRNGKey``), else TypeError."""
  if isinstance(key, jax.Array) or hasattr(key, "dtype"):
    dtype = key.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      return key
    if dtype == jnp.uint32 and key.shape[-1:] == (2,):
      return key
  raise TypeError(
      f"{name} must be a JAX PRNG key, got {type(key).__name__}"
      f"{' ' + repr(key) if isinstance(key, (int, float)) else ''}; build one with "
      "jax.random.key(seed) (or jax.random.PRNGKey(seed)).")


def check_init_args(key: Any, config: Any, dataset: Any, tx: Any, threshold: Any = None,
                    plan: Any = None) -> tuple[jax.Array, Plan]:
  """Every check ``init`` makes before any work: types, labels against the loss, the
  optimizer contract, the threshold, the plan. Returns the checked key and plan."""
  if not isinstance(config, Config):
    raise TypeError(f"config must be a kronjax.Config, got {type(config).__name__}.")
  plan = Plan() if plan is None else plan
  if not isinstance(plan, Plan):
    raise TypeError(f"plan must be a kronjax.Plan (or None for the automatic plan), got "
                    f"{type(plan).__name__}.")
  resolve_plan(plan, config.resolve())  # capacities against the width, before any work
  if not isinstance(dataset, Dataset):
    raise TypeError(f"dataset must be a kronjax.Dataset, got {type(dataset).__name__}; build it "
                    "with kronjax.Dataset(data, labels, eval_data=..., eval_labels=...).")
  key = check_key("key", key)
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation (e.g. optax.sgd(0.5)), got "
                    f"{type(tx).__name__}.")
  losses.check_labels(config.loss, config.num_classes, dataset.labels, dataset.n, "labels")
  if dataset.eval_labels is not None:
    losses.check_labels(config.loss, config.num_classes, dataset.eval_labels, dataset.n_eval,
                        "eval_labels")
  optim.check_linear(tx, keys=trainable_tree(0, 0, 0, None if dataset.eval_data is None else 0,
                                             config))
  if threshold is not None and checks.is_concrete(threshold):
    value = float(jnp.asarray(threshold))
    if not math.isfinite(value):
      raise ValueError(f"threshold must be a finite number (the shift b of relu(z - b)), got "
                       f"{threshold}; pass a finite b, or None for config.threshold.")
  return key, plan


def memory_estimate(config: Config, dataset: Dataset, tx: optax.GradientTransformation,
                    plan: Plan | None = None) -> dict[str, int]:
  """Bytes ``kronjax.init(key, config, dataset, tx, plan=plan)`` allocates, by term.

  From shapes only (``jax.eval_shape``: nothing is allocated), for one state:

  * ``"projections"``: ``P`` ``(m, n)`` and ``P_eval`` ``(m, n_e)``;
  * ``"coefficients"``: ``A`` ``(n, m)``;
  * ``"optimizer"``: the optax state over them (momentum keeps one more copy of
    each ``m x n`` term, Adam-like traces two);
  * ``"index"``: the threshold index state;
  * ``"init"``: the init's temporaries: the ``(m, n + n_e)`` projections before
    they are stored, and for ``init="implicit"`` the ``(n + n_e)^2`` Gram and its
    factorization;
  * ``"gram"``: what the dataset already holds (the ``(n, n)`` and ``(n, n_e)``
    Grams of ``gram="precomputed"``, the entity Grams of ``"entities"``, nothing
    ``n x n`` for ``"factors"``): reported, not allocated by ``init``.

  ``config`` and ``plan`` are resolved here; ``dataset`` may be large, nothing of
  its size is computed.
  """
  config = config.resolve()
  resolved = resolve_plan(Plan() if plan is None else plan, config)
  m, n, n_e, C = config.width, dataset.n, dataset.n_eval, config.num_classes
  dtype = jnp.dtype(dataset.dtype)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)   # pylint: disable=unnecessary-lambda-assignment
  P = spec(m, n) if resolved.layout == "neurons" else spec(n, m)
  P_eval = spec(m, n_e) if n_e else None
  params = trainable_tree(spec(n, m), P, spec(m, C), P_eval, config, bias=spec(C),
                          w0_scale=spec() if optim.needs_params(tx) else None)
  opt = jax.eval_shape(tx.init, params)
  index = jax.eval_shape(make_index(config, resolved).build, spec(m, n), spec())
  extra = n + n_e
  init_temp = m * extra + (2 * extra * extra if config.init == "implicit" else 0)
  grams = [x for x in (dataset.gram, dataset.gram_eval) if x is not None]
  grams += list(dataset.entity_grams or ()) + list(dataset.entity_grams_eval or ())
  return {"projections": (m * n + m * n_e) * dtype.itemsize,
          "coefficients": n * m * dtype.itemsize,
          "optimizer": _tree_bytes(opt), "index": _tree_bytes(index),
          "init": init_temp * dtype.itemsize, "gram": _tree_bytes(grams)}


def _size(nbytes: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if nbytes >= scale:
      return f"{nbytes / scale:.3g} {unit}"
  return f"{nbytes / 2**10:.3g} KiB" if nbytes >= 2**10 else f"{nbytes} bytes"


def _tree_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and hasattr(x, "dtype"))


def available_memory() -> tuple[int | None, str]:
  """``(bytes, where)``: free memory on the default device (its allocator's limit minus
  what is in use, where the backend reports it), else the host's available RAM
  (``psutil``, which orbax-checkpoint requires); None when neither is known."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device}"
  try:
    import psutil  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, "host"
  return int(psutil.virtual_memory().available), "host memory (available)"


def _check_memory(config: Config, dataset: Dataset, tx: optax.GradientTransformation,
                 plan: Plan | None) -> None:
  """ValueError naming the bytes and the knobs when ``init``'s arrays exceed the free memory."""
  terms = memory_estimate(config, dataset, tx, plan)
  need = sum(v for k, v in terms.items() if k != "gram")
  free, where = available_memory()
  if free is None or need <= free:
    return
  parts = ", ".join(f"{k} {_size(v)}" for k, v in terms.items() if k != "gram" and v)
  m, n = config.width, dataset.n
  knobs = [f"a smaller width (m={m}: every m x n term scales with it)",
           f"fewer points (n={n}; dataset.take(indices) takes a subset)"]
  if jnp.dtype(dataset.dtype).itemsize > 4:
    knobs.append("float32 factors instead of float64 (half the bytes)")
  if terms["optimizer"]:
    knobs.append(f"an optimizer with fewer traces (its state is {_size(terms['optimizer'])}; "
                 "plain optax.sgd keeps none)")
  if terms["gram"]:
    knobs.append(f"Dataset(gram='factors') (the dataset's Grams hold {_size(terms['gram'])}, "
                 "already allocated; 'factors' stores nothing n x n)")
  if config.init == "implicit":
    knobs.append("init='kronecker' (no (n + n_e)^2 temporaries)")
  knobs.append("Plan(init_chunk=...) and Plan(layout=...) change the step's temporaries, "
               "not these arrays")
  raise ValueError(
      f"kronjax.init would allocate about {_size(need)} ({parts}) but only {_size(free)} is free "
      f"on {where}. Reduce it with: " + "; ".join(knobs) + ". Pass check_memory=False to "
      "skip this check.")


def init(key: jax.Array, config: Config, dataset: Dataset, tx: optax.GradientTransformation, *,
         threshold: Any = None, plan: Plan | None = None, check_memory: bool = True) -> TrainState:
  """Builds the initial ``TrainState`` for ``dataset``.

  Args:
    key: PRNG key; ``W0`` and ``a`` are drawn from it exactly as
      ``kronjax.dense_params`` and ``kronjax.dense.init`` draw them, so the dense
      baseline starts from the same network. May be traced:
      ``jax.vmap(lambda k: kronjax.init(k, ...))(keys)`` works.
    config: static settings (``kronjax.Config``).
    dataset: the ``kronjax.Dataset`` to train on; its eval points' projections
      are initialized consistently with ``W0`` and maintained every step.
    tx: an optax transformation linear in the gradient history (sgd, momentum, nesterov,
      schedules, ``inject_hyperparams``, ``MultiSteps``, weight decay; any optimizer on the
      output layer); others raise ValueError naming the part; ``kronjax.assume_linear``
      vouches for one's own.
    threshold: optional ``b`` overriding ``config.threshold``; may be a traced
      scalar (sweeps over ``b``).
    plan: how the step runs (``kronjax.Plan``: capacities, index, update path,
      layout, chunk sizes); None is ``Plan()``, every field automatic. It never
      changes the numbers; ``kronjax.with_plan`` changes it later.
    check_memory: estimate the bytes the state needs (``memory_estimate``: the
      ``m x n`` terms, the optimizer's traces, the index, the init's temporaries)
      from shapes and compare them with the free memory (the device's allocator
      where it reports one, else the host's available RAM) before allocating
      anything. False skips it (under ``jax.vmap`` it counts one member; with
      the free memory unknown it is skipped).

  Raises:
    TypeError: an argument of the wrong type (a key that is not a PRNG key, ...).
    ValueError: labels that do not fit the config's loss, a non-linear optimizer,
      a non-finite threshold, a state that does not fit in memory (the message
      names the bytes and what to change); raised before any work is done.
  """
  key, plan = check_init_args(key, config, dataset, tx, threshold, plan)
  if not isinstance(check_memory, bool):
    raise TypeError(f"check_memory must be a bool, got {check_memory!r}.")
  if check_memory:
    _check_memory(config, dataset, tx, plan)
  config = config.resolve()
  resolved = resolve_plan(plan, config)

  # The state owns fresh buffers: a step jitted with donate_argnums=0 must not
  # delete the caller's key.
  key = fresh(key)
  data = dataset.data
  dtype = data.dtype
  m, n, C = config.width, data.n, config.num_classes
  P, P_eval = initializers.initial_projections(  # (m, n), (m, n_e) | None
      key, config, dataset, chunk=resolved.init_chunk)
  stored = P if resolved.layout == "neurons" else jnp.array(P.T)
  a = initializers.output_layer(initializers.init_keys(key)["a"], m, C, dtype,
                                centered=config.centered)
  bias = jnp.zeros((C,), dtype)
  w0_scale = jnp.ones((), dtype)
  b = jnp.asarray(config.threshold if threshold is None else threshold, dtype)
  A_T = jnp.zeros((n, m), dtype)
  params = trainable_tree(A_T, stored, a, P_eval, config, bias=bias,
                          w0_scale=w0_scale if optim.needs_params(tx) else None)
  opt_state = tx.init(params)
  index_state = fresh(make_index(config, resolved).build(P, b))
  return TrainState(
      projections=stored, A_T=A_T, a=a, b=b, opt_state=opt_state, bias=bias, w0_scale=w0_scale,
      step=jnp.zeros((), jnp.int32), key=key, index=index_state, P_eval=P_eval,
      fingerprint=fresh(dataset.fingerprint), config=config, plan=plan,
      tx=optim.StaticTx(tx, optim.is_shape_free(tx, params)))


def resync(state: TrainState, dataset: Dataset) -> TrainState:
  """``state`` with ``P`` and ``P_eval`` recomputed exactly from ``A``: ``P = s W0 X^T + A K``.

  The step updates ``P`` incrementally, so in float32 it drifts from ``W X^T``
  by rounding (``experiments/bench_drift.py`` measures how far over long
  runs). This recomputes the projections from the init's ``W0`` (regenerated
  from the key: exact for every init kind) and the coefficients ``A``, and
  rebuilds the threshold index. Cost: one ``P0`` (the init's cost: ``O(m R n
  sum_q d_q)`` for ``kronecker``, ``O(n^3 + m n^2)`` for ``implicit``,
  ``O(m n d)`` for ``explicit``) plus ``O(m n (n + n_e))`` for ``A K``; the
  ``(n, n)`` Gram is formed from the factors when the dataset does not store
  it. Optimizer state, ``a``, ``b`` and the step are unchanged. Jit-able.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  state.check_dataset(dataset)
  P0, P0_eval = initializers.initial_projections(state.key, state.config, dataset,
                                                 chunk=state.resolved_plan.init_chunk)
  dtype = state.projections.dtype
  K = dataset.full_gram()
  rows = state.P.shape[0]
  if rows != state.config.width:
    raise ValueError("resync needs an unsharded state; call kronjax.sharding.unshard_state first.")
  P = (state.w0_scale * P0 + state.A @ K).astype(dtype)
  P_eval = None
  if state.P_eval is not None:
    K_eval = dataset.full_gram_eval()
    P_eval = (state.w0_scale * P0_eval + state.A @ K_eval).astype(dtype)
  index = threshold_index(state).build(P, state.b)
  return state.replace(P=P, P_eval=P_eval, index=carry_rebuild_count(state.index, index))


def with_plan(state: TrainState, plan: Plan | None = None, **changes: Any) -> TrainState:
  """The same state under another execution plan, with the threshold index rebuilt from ``P``.

  ``plan`` replaces the state's plan (None keeps it); ``changes`` then replace
  single fields (``with_plan(state, active_capacity=64)``). Used to grow
  capacities after an overflow (``fit`` replays the step with it) or to switch
  index kind, update path or layout (``P`` and the optimizer's ``"P"`` leaves are
  transposed when the layout changes: exact). The network (``state.config``) is
  not touched: a plan never changes the numbers.
  """
  base = state.plan if plan is None else plan
  if not isinstance(base, Plan):
    raise TypeError(f"plan must be a kronjax.Plan or None, got {type(base).__name__}.")
  new_plan = base.replace(**changes)
  resolved = resolve_plan(new_plan, state.config)
  if resolved.layout != state.layout:
    state = _transpose_projections(state)
  state = state.replace(plan=new_plan)
  new_index = fresh(make_index(state.config, resolved).build(state.P, state.b))
  return state.replace(index=carry_rebuild_count(state.index, new_index))


TRAINABLE_KEYS = ("A", "P", "a", "bias", "P_eval", "W0")


def trainable_key(path: Any) -> str | None:
  """Which trainable leaf (``"A"``, ``"P"``, ``"a"``, ``"P_eval"``) an optimizer-state
  leaf mirrors: the innermost such dict key of its path (a ``multi_transform``
  label named ``"P"`` further out does not count), or None."""
  for k in reversed(tuple(path)):
    if getattr(k, "key", None) in TRAINABLE_KEYS:
      return k.key
  return None


def _transpose_projections(state: TrainState) -> TrainState:
  """``projections`` and the optimizer leaves mirroring ``P`` with their last two axes swapped."""
  def swap(path, x):
    mirrors_P = trainable_key(path) == "P"
    return jnp.swapaxes(x, -1, -2) if mirrors_P and getattr(x, "ndim", 0) >= 2 else x

  return dataclasses.replace(
      state, projections=jnp.swapaxes(state.projections, -1, -2),
      opt_state=jax.tree_util.tree_map_with_path(swap, state.opt_state))


def fresh(tree):
  """Copies of the leaves: an index state may hold an input (``b``) as is, and two
  leaves sharing one buffer cannot both be donated to a jitted step."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def carry_rebuild_count(old, new):
  if hasattr(old, "rebuilds") and hasattr(new, "rebuilds") and hasattr(new, "_replace"):
    return new._replace(rebuilds=old.rebuilds)
  return new


def _register_flax() -> None:
  """``flax.serialization`` support, where flax is installed (not a kronjax dependency)."""
  if importlib.util.find_spec("flax") is None:
    return
  try:
    from flax import serialization  # pylint: disable=import-outside-toplevel
  except ImportError:   # a flax that does not import with this jax: kronjax works without it
    return
  arrays = [f.name for f in dataclasses.fields(TrainState) if not f.metadata.get("static")]

  def to_state_dict(state: TrainState) -> dict[str, Any]:
    return {name: serialization.to_state_dict(_key_data(getattr(state, name)))
            for name in arrays}

  def from_state_dict(template: TrainState, values: dict[str, Any]) -> TrainState:
    if not isinstance(template, TrainState):
      raise TypeError(f"the template must be a kronjax.TrainState, got {type(template).__name__}.")
    missing = [name for name in arrays if name not in values]
    if missing:
      raise ValueError(f"the state dict has no {missing}: it was not written from a TrainState "
                       "by flax.serialization.")
    restored = {}
    for name in arrays:
      old = getattr(template, name)
      new = serialization.from_state_dict(_key_data(old), values[name], name=name)
      restored[name] = _wrap_key(old, new)
    return dataclasses.replace(template, **restored)

  serialization.register_serialization_state(TrainState, to_state_dict, from_state_dict,
                                             override=True)


def _key_data(x: Any) -> Any:
  """A typed PRNG key as its raw ``uint32`` data (msgpack holds plain arrays only)."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _wrap_key(template: Any, x: Any) -> Any:
  if isinstance(template, jax.Array) and jnp.issubdtype(template.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(template))
  return x


_register_flax()
