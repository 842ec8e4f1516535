"""Hyperparameter sweeps: ``S`` training runs stacked into one state, one compiled step.

Shapes: S members, m neurons, n points, B batch, C outputs.

A sweep is a ``TrainState`` whose leaves carry a leading ``(S,)`` axis; the
dataset is shared, unbatched: the step is ``jax.vmap(kronjax.train_step,
in_axes=(0, None, None))``, so the ``n x n`` Gram exists once, not ``S`` times,
and one compilation serves every member.

What may vary between members (traced values):

  * ``learning_rate`` and any other hyperparameter injected with
    ``optax.inject_hyperparams`` (``momentum`` for ``optax.sgd``): written into
    ``opt_state.hyperparams`` per member;
  * ``threshold``: the ReLU shift ``b`` (the index is built with the member's ``b``);
  * ``seed`` or ``key``: the init key (``W0`` and ``a``).

Everything in ``kronjax.Config`` other than ``threshold`` (width, capacities,
loss, classes, index kind, update path, ...) fixes shapes or code paths: a sweep
over it is a set of separate sweeps, and asking for one raises ValueError.

Training (``fit``) runs the same loop as ``kronjax.fit`` (``kronjax``'s loop
module): every member sees the same batch sequence; an overflow grows the shared
capacity and replays the batch for the overflowing members only; a member whose
loss turns non-finite raises by default, or is frozen with
``on_nonfinite="stop"``.

Example::

    members = kronjax.sweep.grid(learning_rate=[0.5, 1.0], threshold=[0.5, 0.8], seed=[0, 1])
    states = kronjax.sweep.init(config, dataset, members)
    states, history = kronjax.sweep.fit(states, dataset, key, batch_size=16, steps=100)
    history["loss"]                      # (S, steps)
    kronjax.sweep.member(states, 3)      # a plain TrainState: evaluate / predict / fit
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax._src.base import checks
from kronjax._src.data.dataset import Dataset, fingerprint_text
from kronjax._src.model.config import Config
from kronjax._src.step import state as state_lib
from kronjax._src.step import step as step_lib
from kronjax._src.step.plan import Plan
from kronjax._src.step.state import TrainState
from kronjax._src.train import loop
from kronjax._src.train import runners

MEMBER_KEYS = ("threshold", "seed", "key")
"""Member settings besides the optimizer's injected hyperparameters."""


def size(state: TrainState) -> int:
  """Number of members of a stacked sweep state."""
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState (a stacked sweep state from "
                    f"kronjax.sweep.init or stack), got {type(state).__name__}.")
  if np.ndim(state.step) != 1:
    raise ValueError(f"state is not a stacked sweep state (its step has shape "
                     f"{np.shape(state.step)}; a sweep's is (S,)).")
  return int(np.shape(state.step)[0])


def member(state: TrainState, i: int) -> TrainState:
  """Member ``i`` of a stacked sweep state as a plain ``TrainState``."""
  S = size(state)
  if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < S:
    raise IndexError(f"member index must be an int in [0, {S}), got {i!r}.")
  return jax.tree.map(lambda x: x[i], state)


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """The cartesian product of the given value lists, one dict per member (last axis fastest).

  ``grid(learning_rate=[0.1, 0.2], seed=[0, 1])`` gives 4 members.
  """
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
      raise ValueError(f"grid axis {name!r} must be a non-empty list of values, got {values!r}.")
  names = list(axes)
  return [dict(zip(names, combo)) for combo in itertools.product(*(axes[k] for k in names))]


def _static_setting_error(where: str, names: Sequence[str], detail: str = "") -> ValueError:
  listed = ", ".join(repr(n) for n in names)
  return ValueError(
      f"{where} varies {listed}, a static setting (it fixes array shapes or the compiled "
      f"code path){detail}, which cannot vary inside one vmapped sweep. Run separate sweeps, "
      f"one per value of {listed}. Inside one sweep only traced values may vary: the "
      "optimizer's injected hyperparameters (learning_rate, momentum via "
      "optax.inject_hyperparams), threshold, and seed/key.")


def _hyperparam_names(tx: optax.GradientTransformation) -> tuple[str, ...]:
  probe = jax.eval_shape(tx.init, {"A": jax.ShapeDtypeStruct((1, 1), jnp.float32)})
  hp = getattr(probe, "hyperparams", None)
  return tuple(sorted(hp)) if isinstance(hp, Mapping) else ()


def _check_number(where: str, name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{where}: {name} must be a finite real number, got {value!r}.")
  return float(value)


def _normalize_members(members: Any, config: Config, tx: optax.GradientTransformation | None):
  """Validates the member dicts; returns ``(members, tx, hyperparam names)``."""
  if isinstance(members, Mapping) or not isinstance(members, Sequence) or not len(members):
    raise ValueError("members must be a non-empty list of dicts (see kronjax.sweep.grid), "
                     f"got {type(members).__name__}.")
  members = tuple(dict(m) for m in members)
  config_fields = ({f.name for f in dataclasses.fields(Config)}
                   | {f.name for f in dataclasses.fields(Plan)}) - {"threshold"}
  for i, m in enumerate(members):  # static settings first: no other message hides this one
    static = sorted(k for k in m if k in config_fields)
    if static:
      raise _static_setting_error(f"sweep member {i}", static, " of kronjax.Config or Plan")
  if tx is None:
    if not any("learning_rate" in m for m in members):
      raise ValueError("pass tx= or give the members a learning_rate (the default tx is "
                       "optax.inject_hyperparams(optax.sgd)).")
    first = next(m for m in members if "learning_rate" in m)
    momentum = next((m["momentum"] for m in members if "momentum" in m), None)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=first["learning_rate"],
                                             momentum=momentum)
  hp_names = _hyperparam_names(tx)
  valid = set(hp_names) | set(MEMBER_KEYS)
  for i, m in enumerate(members):
    where = f"sweep member {i}"
    for k, v in m.items():
      if k == "momentum" and v is None:
        raise _static_setting_error(
            where, ["momentum"], " (momentum=None drops the optimizer's trace: a different "
            "state structure; momentum=0.0 is plain SGD inside a momentum sweep)")
      if k not in valid:
        if k in ("nesterov", "tx", "optimizer", "index_kind"):
          raise _static_setting_error(where, [k])
        hint = ("" if hp_names else " The optimizer has no injected hyperparameters: build tx "
                "with optax.inject_hyperparams(optax.sgd)(learning_rate=...) to sweep them.")
        raise ValueError(checks.unknown_key_message(f"setting of {where}", k, valid) + hint)
      if k in hp_names or k == "threshold":
        _check_number(where, k, v)
    if "seed" in m and "key" in m:
      raise ValueError(f"{where} sets both seed and key; pass one of them.")
    if "seed" in m and (isinstance(m["seed"], bool) or not isinstance(m["seed"], numbers.Integral)
                        or m["seed"] < 0):
      raise ValueError(f"{where}: seed must be a non-negative int, got {m['seed']!r}.")
  return members, tx, tuple(k for k in hp_names if any(k in m for m in members))


def _member_keys(members) -> jax.Array:
  keys = []
  for m in members:
    if "key" in m:
      keys.append(jnp.asarray(m["key"]))
    else:
      keys.append(jax.random.PRNGKey(int(m.get("seed", 0))))
  shapes = {(k.shape, k.dtype) for k in keys}
  if len(shapes) > 1:
    raise ValueError(f"member keys must all have the same shape and dtype, got {sorted(map(str, shapes))}.")
  return jnp.stack(keys)


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
  """``opt_state`` with ``hyperparams[name] = value`` (cast to the stored dtype).

  For states from ``optax.inject_hyperparams``; raises ValueError otherwise.
  """
  hp = getattr(opt_state, "hyperparams", None)
  if not isinstance(hp, Mapping):
    raise ValueError("the optimizer state has no injected hyperparameters; build tx with "
                     "optax.inject_hyperparams(optax.sgd)(learning_rate=...).")
  new = dict(hp)
  for k, v in values.items():
    if k not in hp:
      raise ValueError(checks.unknown_key_message("hyperparameter", k, hp))
    new[k] = jnp.asarray(v, jnp.asarray(hp[k]).dtype)
  return opt_state._replace(hyperparams=new)


# ----------------------------------------------------------------------------- construction

def init(config: Config, dataset: Dataset, members: Sequence[Mapping[str, Any]], *,
         tx: optax.GradientTransformation | None = None, plan: Plan | None = None) -> TrainState:
  """A stacked sweep state: ``kronjax.init`` vmapped over the members.

  Args:
    config: static settings shared by every member (``kronjax.Config``).
    dataset: the ``kronjax.Dataset`` every member trains on (shared, not stacked).
    members: list of dicts (``grid`` builds one) with keys among ``learning_rate``
      (and the other hyperparameters ``tx`` injects), ``threshold``, ``seed`` /
      ``key``. Missing keys take ``tx``'s value, ``config.threshold`` and seed 0.
    tx: the optimizer; default
      ``optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=...)``
      (momentum only when a member sets it). Members may set only the
      hyperparameters it injects.
    plan: the execution plan every member runs (``kronjax.Plan``; None: automatic).

  Raises:
    ValueError: a member sets a static setting (width, capacities, loss,
      classes, index, update, ...): run separate sweeps for those; or bad
      arguments, as ``kronjax.init``.
    TypeError: arguments of the wrong type, as ``kronjax.init``.
  """
  if not isinstance(config, Config):
    raise TypeError(f"config must be a kronjax.Config, got {type(config).__name__}.")
  if not isinstance(dataset, Dataset):
    raise TypeError(f"dataset must be a kronjax.Dataset, got {type(dataset).__name__}.")
  members, tx, hp_names = _normalize_members(members, config, tx)
  keys = _member_keys(members)
  thresholds = np.asarray([m.get("threshold", config.resolve().threshold) for m in members],
                          np.float64)
  hp_values = {k: np.asarray([m.get(k, np.nan) for m in members], np.float64) for k in hp_names}
  hp_given = {k: np.asarray([k in m for m in members]) for k in hp_names}
  # Checks that need concrete values run once, outside the vmapped init below.
  for b in thresholds:
    state_lib.check_init_args(keys[0], config, dataset, tx, threshold=float(b), plan=plan)
  return _init_members(config, plan, tx, keys, thresholds.astype(dataset.dtype), hp_values,
                       hp_given, dataset)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_members(config, plan, tx, keys, thresholds, hp_values, hp_given, dataset):
  def one(key, b, hp, given):
    s = state_lib.init(key, config, dataset, tx, threshold=b, plan=plan)
    if hp:
      current = s.opt_state.hyperparams
      s = s.replace(opt_state=set_hyperparams(
          s.opt_state, **{k: jnp.where(given[k], hp[k], current[k]) for k in hp}))
    return s

  return jax.vmap(one)(keys, thresholds, hp_values, hp_given)


def stack(states: Sequence[TrainState]) -> TrainState:
  """Stacks separately built states (same dataset, config, plan and optimizer) into a sweep state.

  Raises ValueError naming the static settings that differ (run separate sweeps),
  or when the states were built for different datasets or optimizers.
  """
  states = list(states)
  if not states or not all(isinstance(s, TrainState) for s in states):
    raise TypeError("states must be a non-empty list of kronjax.TrainState.")
  first = states[0]
  for i, s in enumerate(states[1:], 1):
    differ = [(f"config.{f.name}", getattr(first.config, f.name), getattr(s.config, f.name))
              for f in dataclasses.fields(Config)
              if getattr(s.config, f.name) != getattr(first.config, f.name)]
    differ += [(f"plan.{f.name}", getattr(first.plan, f.name), getattr(s.plan, f.name))
               for f in dataclasses.fields(Plan) if getattr(s.plan, f.name) != getattr(first.plan, f.name)]
    if differ:
      detail = "; ".join(f"{name}: {a!r} vs {b!r}" for name, a, b in differ)
      raise _static_setting_error(f"state {i}", [name for name, _, _ in differ], f" ({detail})")
    if s.tx != first.tx:
      raise ValueError(
          f"state {i} was built with a different optax transformation than state 0; a sweep "
          "steps every member with one tx. Build all states with equal optimizers "
          "(an optax.inject_hyperparams(...) one) and set each member's values with "
          "kronjax.sweep.set_hyperparams (kronjax.sweep.init does this for you).")
    if fingerprint_text(s.fingerprint) != fingerprint_text(first.fingerprint):
      raise ValueError(f"state {i} was built for another dataset than state 0; the members of a "
                       "sweep share one dataset. Run separate sweeps per dataset.")
  structures = {jax.tree.structure(s) for s in states}
  if len(structures) > 1:
    raise ValueError("the states' optimizer or index states differ in structure; they cannot be "
                     "stacked. Run separate sweeps.")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def with_plan(state: TrainState, plan: Plan | None = None, **changes: Any) -> TrainState:
  """``kronjax.with_plan`` for a stacked sweep state (each member's index rebuilt)."""
  return jax.vmap(lambda s: state_lib.with_plan(s, plan, **changes))(state)


# ----------------------------------------------------------------------------- the step

def train_step(state: TrainState, dataset: Dataset, batch_idx: Any,
               mask: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One step of every member on the shared batch ``(B,)``: jit-compiled, ``state`` donated.

  Every metric has shape ``(S,)``. With ``mask`` ``(S,)`` bool, members with
  ``mask[i] == False`` keep their state bit for bit (their metrics are still
  computed). As ``kronjax.jit_train_step``, the dataset's fingerprint is compared
  inside the step (no host round trip per step): another dataset of the same shapes
  makes every member's step a no-op with ``metrics["wrong_dataset"]`` set.
  """
  if not isinstance(state, TrainState):
    raise TypeError(f"state must be a kronjax.TrainState, got {type(state).__name__}.")
  size(state)
  state.check_dataset(dataset, compare_fingerprint=False)
  batch_idx = step_lib.check_batch("batch_idx", batch_idx, state.n)
  return runners.Sweep(size(state)).step(state, dataset, batch_idx,
                                         None if mask is None else jnp.asarray(mask, bool))


def fit(state: TrainState, dataset: Dataset, key: jax.Array, *, batch_size: int,
        steps: int | None = None, epochs: int | None = None, **options: Any
        ) -> tuple[TrainState, dict[str, Any]]:
  """Trains every member of a stacked sweep state on the same batch sequence.

  The batches are the ones ``kronjax.fit(member, dataset, key, ...)`` would use.
  Takes ``kronjax.fit``'s arguments and policies (not ``mesh``): an overflow
  is replayed for the overflowing members only; ``on_overflow="stop"`` and
  ``on_nonfinite="stop"`` freeze the members concerned and train the others on.
  Steps run in chunks of many steps per dispatch as in ``kronjax.fit``
  (``chunk``), bit-identical to one step per dispatch.

  Args:
    state: A stacked sweep state (``kronjax.sweep.init`` or ``kronjax.sweep.stack``).
    dataset: The ``kronjax.Dataset`` the members were built from.
    key: PRNG key for the batch order, as ``kronjax.fit``'s.
    batch_size: Points per step, in ``[1, n]``.
    steps: How many more steps to train. Pass exactly one of ``steps`` and ``epochs``.
    epochs: How many more epochs to train (an epoch is ``n // batch_size`` steps).
    **options: ``kronjax.fit``'s other keyword arguments (``progress``,
      ``eval_every``, ``log_every``, ``on_overflow``, ``on_nonfinite``,
      ``checkpoint_dir``, ``checkpoint_every``, ``keep``, ``resume``,
      ``resync_every``, ``callbacks``, ``callback_every``, ``verify_every``,
      ``chunk``, ``divergence_factor``), not ``mesh``.

  Returns:
    ``(state, history)``: the trained sweep state and ``kronjax.fit``'s history
      with ``(S, T)`` arrays (NaN / -1 for stopped members), ``replays`` as
      ``(step, changes, members)`` and ``stopped`` (one entry per member: None,
      or why it stopped).

  Raises:
    ValueError: ``mesh`` was given, or an option is out of range.
    TypeError: An option of the wrong type.
    FloatingPointError: A member's loss became non-finite or diverged (``on_nonfinite="raise"``).
    CapacityError: A member overflowed with ``on_overflow="raise"``.
  """
  if "mesh" in options:
    raise ValueError("kronjax.sweep.fit takes no mesh: a sweep is vmapped over its members, not "
                     "neuron-sharded. Shard members one by one with kronjax.fit(..., mesh=...).")
  return loop.train(runners.Sweep(size(state)), state, dataset, key,
                    loop.Options(batch_size=batch_size, steps=steps, epochs=epochs, **options))
