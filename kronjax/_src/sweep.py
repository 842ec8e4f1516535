"""Hyperparameter sweeps as one vmapped computation over a shared dataset.

Shapes: S members, m neurons, n points, B batch, C outputs.

A sweep is one ``TrainState`` whose *member* leaves (``P``, ``A``, ``a``, ``b``,
optimizer state, index, key, step) carry a leading ``S`` axis and whose *shared*
leaves (``data``, ``labels``, ``gram``, ``gram_eval``, ``eval_data``,
``eval_labels``) do not: the step is ``jax.vmap(kronjax.train_step)`` over the
members with the shared part and the batch unbatched (``in_axes=None``), so the
``n x n`` Gram exists once, not ``S`` times, and one compilation serves every
member.

What may vary between members (traced values, DESIGN §6):

  * ``learning_rate`` and any other hyperparameter injected with
    ``optax.inject_hyperparams`` (``momentum`` for ``optax.sgd``): written into
    ``opt_state.hyperparams`` per member;
  * ``threshold``: the ReLU shift ``b`` (``kronjax.init(..., threshold=b)``; the
    index is built with the member's ``b``);
  * ``seed`` or ``key``: the init key (``W0`` and ``a``).

Everything in ``kronjax.Config`` other than ``threshold`` (width, capacities,
loss, classes, index kind, update path, ...) fixes shapes or code paths: a sweep
over it is a set of separate sweeps, and asking for one raises ValueError.

Overflow. Capacities are static, so they are shared. When some members overflow
on a batch, the others have taken the step and the overflowing ones skipped it
(the step is a no-op for them). ``fit`` then grows the shared capacity and
replays the batch for the overflowing members only (a masked step), so every
member sees the same batch sequence exactly once.

Example::

    members = kronjax.sweep.grid(learning_rate=[0.5, 1.0], threshold=[0.5, 0.8], seed=[0, 1])
    sweep = kronjax.sweep.init(config, data, labels, members)
    sweep, history = kronjax.sweep.fit(sweep, key, batch_size=16, steps=100)
    history["loss"]          # (S, steps)
    sweep.member(3)          # a plain TrainState: kronjax.evaluate / predict / fit
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronjax._src import checks, losses
from kronjax._src import state as state_lib
from kronjax._src import step as step_lib
from kronjax._src.config import Config
from kronjax._src.inference import evaluate
from kronjax._src.kron import KronData
from kronjax._src.loop import CapacityError, _progress_bar, batch_schedule, grown_capacity, resolve_schedule
from kronjax._src.state import TrainState

SHARED_FIELDS = ("data", "labels", "gram", "gram_eval", "eval_data", "eval_labels")
"""TrainState fields every member shares (stored once, unbatched)."""

MEMBER_KEYS = ("threshold", "seed", "key")
"""Member settings besides the optimizer's injected hyperparameters."""

_STATIC_FIELDS = ("config", "tx", "shape_free_tx", "index_kind")


# ----------------------------------------------------------------------------- the container

@dataclasses.dataclass(frozen=True)
class Sweep:
  """S training runs stacked into one state.

  Attributes:
    state: a ``TrainState`` whose member leaves have a leading ``(S,)`` axis and
      whose shared leaves (``SHARED_FIELDS``) are stored once.
    members: the settings of each member (tuple of dicts, as given).
    stopped: per member, ``None`` while it trains, else why it stopped
      (``"diverged at step t"``, ``"overflow at step t"``); stopped members are
      frozen by ``fit``.
  """

  state: TrainState
  members: tuple[Mapping[str, Any], ...]
  stopped: tuple[str | None, ...]

  @property
  def size(self) -> int:
    return len(self.members)

  def member(self, i: int) -> TrainState:
    """Member ``i`` as a plain ``TrainState`` (for evaluate, predict, fit, ...)."""
    if not 0 <= i < self.size:
      raise IndexError(f"member index must be in [0, {self.size}), got {i}.")
    part, shared = split(self.state)
    return merge(jax.tree.map(lambda x: x[i], part), shared)

  def replace(self, **changes: Any) -> "Sweep":
    return dataclasses.replace(self, **changes)


def split(state: TrainState) -> tuple[TrainState, dict[str, Any]]:
  """``(member part, shared part)``: the state with the shared fields set to None, and those fields."""
  shared = {f: getattr(state, f) for f in SHARED_FIELDS}
  return state.replace(**{f: None for f in SHARED_FIELDS}), shared


def merge(part: TrainState, shared: Mapping[str, Any]) -> TrainState:
  """Inverse of ``split``."""
  return part.replace(**shared)


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """The cartesian product of the given value lists, one dict per member (last axis fastest).

  ``grid(learning_rate=[0.1, 0.2], seed=[0, 1])`` gives 4 members.
  """
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
      raise ValueError(f"grid axis {name!r} must be a non-empty list of values, got {values!r}.")
  names = list(axes)
  return [dict(zip(names, combo)) for combo in itertools.product(*(axes[k] for k in names))]


# ----------------------------------------------------------------------------- validation

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
  config_fields = {f.name for f in dataclasses.fields(Config)} - {"threshold"}
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
    static = sorted(k for k in m if k in config_fields)
    if static:
      raise _static_setting_error(where, static, " of kronjax.Config")
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

def init(config: Config, data: KronData, labels: Any, members: Sequence[Mapping[str, Any]], *,
         tx: optax.GradientTransformation | None = None, eval_data: KronData | None = None,
         eval_labels: Any = None) -> Sweep:
  """Builds a stacked sweep state: ``kronjax.init`` vmapped over the members.

  Args:
    config: static settings shared by every member (``kronjax.Config``).
    data, labels, eval_data, eval_labels: as in ``kronjax.init``; stored once.
    members: list of dicts (``grid`` builds one) with keys among ``learning_rate``
      (and the other hyperparameters ``tx`` injects), ``threshold``, ``seed`` /
      ``key``. Missing keys take ``tx``'s value, ``config.threshold`` and seed 0.
    tx: an ``optax.inject_hyperparams(...)`` transformation; default
      ``optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=...)``
      (momentum only when a member sets it).

  Raises:
    ValueError when a member sets a static setting (width, capacities, loss,
    classes, index, update, ...): run separate sweeps for those. TypeError /
    ValueError as ``kronjax.init`` for bad data.
  """
  if not isinstance(config, Config):
    raise TypeError(f"config must be a kronjax.Config, got {type(config).__name__}.")
  members, tx, hp_names = _normalize_members(members, config, tx)
  keys = _member_keys(members)
  thresholds = np.asarray([m.get("threshold", config.threshold) for m in members], np.float64)
  hp_values = {k: np.asarray([m.get(k, np.nan) for m in members], np.float64) for k in hp_names}
  hp_given = {k: np.asarray([k in m for m in members]) for k in hp_names}

  # Value checks need concrete arrays (inside the jit below only shapes are checked).
  labels = losses.check_labels(config.loss, config.num_classes, labels, _data_n(data), "labels")
  if eval_data is not None and eval_labels is not None:
    eval_labels = losses.check_labels(config.loss, config.num_classes, eval_labels,
                                      _data_n(eval_data), "eval_labels")
  part, shared = _init_members(config, tx, keys, thresholds, hp_values, hp_given,
                               data, labels, eval_data, eval_labels)
  return Sweep(state=merge(part, shared), members=members, stopped=(None,) * len(members))


def _data_n(data: Any) -> int:
  if not isinstance(data, KronData):
    raise TypeError(f"data must be a kronjax.KronData, got {type(data).__name__}; "
                    "wrap your factors with kronjax.KronData((u, v, ...)).")
  return data.n


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_members(config, tx, keys, thresholds, hp_values, hp_given, data, labels, eval_data,
                  eval_labels):
  def one(key, b, hp, given):
    s = state_lib.init(key, config, data, labels, tx, eval_data=eval_data,
                       eval_labels=eval_labels, threshold=b)
    current = s.opt_state.hyperparams
    s = s.replace(opt_state=set_hyperparams(
        s.opt_state, **{k: jnp.where(given[k], hp[k], current[k]) for k in hp}))
    return split(s)

  return jax.vmap(one, out_axes=(0, None))(keys, thresholds, hp_values, hp_given)


def stack(states: Sequence[TrainState], members: Sequence[Mapping[str, Any]] | None = None) -> Sweep:
  """Stacks separately built states (same data, config and tx object) into a sweep.

  Raises ValueError naming the static settings that differ (run separate sweeps),
  or when the states do not share the data, labels or optimizer transformation.
  """
  states = list(states)
  if not states or not all(isinstance(s, TrainState) for s in states):
    raise TypeError("states must be a non-empty list of kronjax.TrainState.")
  first = states[0]
  for i, s in enumerate(states[1:], 1):
    differ = [f.name for f in dataclasses.fields(Config)
              if getattr(s.config, f.name) != getattr(first.config, f.name)]
    differ += [f for f in ("index_kind", "shape_free_tx") if getattr(s, f) != getattr(first, f)]
    if differ:
      detail = "; ".join(f"{f}: {_static_value(first, f)!r} vs {_static_value(s, f)!r}" for f in differ)
      raise _static_setting_error(f"state {i}", differ, f" ({detail})")
    if s.tx is not first.tx:
      raise ValueError(
          f"state {i} was built with a different optax transformation than state 0; a sweep "
          "steps every member with one tx. Build all states with the same "
          "optax.inject_hyperparams(...) object and set each member's values with "
          "kronjax.sweep.set_hyperparams (kronjax.sweep.init does this for you).")
    for f in SHARED_FIELDS:
      a, b = getattr(first, f), getattr(s, f)
      if not _same_tree(a, b):
        raise ValueError(f"state {i} has different {f} than state 0; the members of a sweep "
                         "share one dataset. Run separate sweeps per dataset.")
  parts = [split(s)[0] for s in states]
  structures = {jax.tree.structure(p) for p in parts}
  if len(structures) > 1:
    raise ValueError("the states' optimizer or index states differ in structure; they cannot be "
                     "stacked. Run separate sweeps.")
  part = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
  members = tuple(dict(m) for m in members) if members is not None else tuple({} for _ in states)
  if len(members) != len(states):
    raise ValueError(f"members has {len(members)} entries for {len(states)} states.")
  return Sweep(state=merge(part, split(first)[1]), members=members, stopped=(None,) * len(states))


def _static_value(state: TrainState, name: str) -> Any:
  return getattr(state.config, name) if hasattr(state.config, name) else getattr(state, name)


def _same_tree(a: Any, b: Any) -> bool:
  if a is b:
    return True
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def with_config(state: TrainState, **changes: Any) -> TrainState:
  """``kronjax.with_config`` for a stacked sweep state (each member's index rebuilt)."""
  part, shared = split(state)

  def one(p):
    return split(state_lib.with_config(merge(p, shared), **changes))[0]

  return merge(jax.vmap(one)(part), shared)


# ----------------------------------------------------------------------------- the step

def _member_step(part, shared, batch_idx):
  new, metrics = step_lib.train_step(merge(part, shared), batch_idx)
  return split(new)[0], metrics


def _masked_member_step(part, shared, batch_idx, mask):
  new, metrics = _member_step(part, shared, batch_idx)
  return jax.tree.map(lambda x, y: jnp.where(mask, x, y), new, part), metrics


_STEP_CACHE: dict[Any, Any] = {}


def compiled_step(*, masked: bool = False, donate: bool = True):
  """The jitted sweep step ``step(state, batch_idx[, mask]) -> (state, metrics)``.

  ``state`` is a stacked sweep state (``Sweep.state``), ``batch_idx`` ``(B,)``
  is shared by every member, every metric has shape ``(S,)``. It is
  ``jax.vmap(kronjax.train_step)`` over the member part with the shared part
  and the batch unbatched. With ``masked=True`` the step takes a ``(S,)`` bool
  ``mask`` and members with ``mask[i] == False`` keep their state (their metrics
  are still computed). The member part is donated unless ``donate=False``.
  ``step.cache_size()`` counts compilations; ``step.lower(state, batch_idx)``
  lowers it for inspection (``.as_text()``, ``.compile()``).
  """
  key = (masked, donate)
  if key not in _STEP_CACHE:
    if masked:
      body = jax.vmap(_masked_member_step, in_axes=(0, None, None, 0))
    else:
      body = jax.vmap(_member_step, in_axes=(0, None, None))
    jitted = jax.jit(body, donate_argnums=(0,) if donate else ())

    def step(state, batch_idx, *mask):
      part, shared = split(state)
      new, metrics = jitted(part, shared, jnp.asarray(batch_idx, jnp.int32), *mask)
      return merge(new, shared), metrics

    def lower(state, batch_idx, *mask):
      part, shared = split(state)
      return jitted.lower(part, shared, jnp.asarray(batch_idx, jnp.int32), *mask)

    step.cache_size = jitted._cache_size  # pylint: disable=protected-access
    step.lower = lower
    _STEP_CACHE[key] = step
  return _STEP_CACHE[key]


def _eval_members(part, shared):
  return evaluate(merge(part, shared))


_evaluate_sweep = jax.jit(jax.vmap(_eval_members, in_axes=(0, None)))


# ----------------------------------------------------------------------------- the loop

def fit(sweep: Sweep, key: jax.Array, *, batch_size: int, steps: int | None = None,
        epochs: int | None = None, progress: bool = True, on_overflow: str = "replay",
        on_nonfinite: str = "stop", eval_every: int = 0, log_every: int = 1) -> tuple[Sweep, dict[str, Any]]:
  """Trains every member of ``sweep`` on the same batch sequence; one progress bar.

  The batches are ``kronjax.loop.batch_schedule(key, ...)`` from the members'
  step, exactly the ones ``kronjax.fit(member, key, ...)`` would use.

  Args:
    sweep: from ``init`` or ``stack``; not modified.
    key, batch_size, steps / epochs, progress, eval_every, log_every: as ``kronjax.fit``.
    on_overflow: when a member's batch has more active neurons than the shared
      capacity: ``"replay"`` grows the capacity for the sweep (one recompile) and
      re-runs the batch for the overflowing members only (the others already took
      it); ``"stop"`` freezes the overflowing members (recorded in
      ``Sweep.stopped``; the others go on); ``"raise"`` raises ``CapacityError``.
    on_nonfinite: a member whose loss is NaN/inf (learning rate too large):
      ``"stop"`` freezes it and goes on; ``"raise"`` raises FloatingPointError.

  Returns:
    The trained sweep and a history: ``step`` ``(T,)``; ``loss``, ``active``,
    ``max_active``, ``index_rebuilds`` ``(S, T)`` (NaN / -1 for stopped members);
    with ``eval_every``: ``eval_step`` and one ``(S, T_e)`` array per
    ``kronjax.evaluate`` metric; ``replays`` (list of ``(step, changes,
    members)``), ``stopped``, ``seconds``, ``steps_per_second`` (sweep steps).
  """
  if not isinstance(sweep, Sweep):
    raise TypeError(f"sweep must be a kronjax.sweep.Sweep, got {type(sweep).__name__}.")
  checks.check_choice("on_overflow", on_overflow, ("replay", "stop", "raise"))
  checks.check_choice("on_nonfinite", on_nonfinite, ("stop", "raise"))
  eval_every = checks.check_positive_int("eval_every", eval_every, minimum=0)
  log_every = checks.check_positive_int("log_every", log_every)
  state, S, n = sweep.state, sweep.size, sweep.state.data.n
  batch_size, steps = resolve_schedule(n, batch_size, steps, epochs)
  live = np.array([s is None for s in sweep.stopped])
  member_steps = np.asarray(state.step)
  if not live.any():
    raise ValueError("every member of the sweep has stopped; nothing to train.")
  if len(set(member_steps[live].tolist())) > 1:
    raise ValueError(f"the training members are at different steps {sorted(set(member_steps[live].tolist()))}; "
                     "a sweep trains them on one shared batch sequence.")
  start = int(member_steps[live][0])
  batches = batch_schedule(key, n, batch_size, steps, start=start)
  stopped = list(sweep.stopped)

  part, shared = split(state)
  state = merge(jax.tree.map(lambda x: jnp.array(x, copy=True), part), shared)  # the step donates
  plain, masked = compiled_step(), compiled_step(masked=True)
  names = ("loss", "active", "max_active", "index_rebuilds")
  hist: dict[str, list] = {k: [] for k in ("step",) + names}
  eval_hist: dict[str, list] = {"eval_step": []}
  replays: list[tuple[int, dict[str, int], list[int]]] = []
  bar = _progress_bar(steps, progress)
  t_start = time.perf_counter()
  done = 0
  try:
    for t in range(steps):
      batch = jnp.asarray(batches[t])
      if live.all():
        state, metrics = plain(state, batch)
      else:
        state, metrics = masked(state, batch, jnp.asarray(live))
      # One transfer for all metrics: one np.array per metric cost ~0.3 ms each on CPU.
      metrics = {k: np.array(v) for k, v in jax.device_get(metrics).items()}
      pending = metrics["overflow"] & live
      while pending.any():  # the others took the step; the pending ones skipped it
        who = np.flatnonzero(pending).tolist()
        if on_overflow == "raise":
          raise CapacityError(
              f"step {start + t}: sweep member(s) {who} overflowed the shared capacity "
              f"(active_capacity={state.config.active_capacity}, candidate_capacity="
              f"{state.config.candidate_capacity}; max active {int(metrics['max_active'][pending].max())}). "
              "Use a larger Config capacity or fit(..., on_overflow='replay').")
        if on_overflow == "stop":
          for i in who:
            stopped[i] = f"overflow at step {start + t}"
          live &= ~pending
          break
        changes = grown_capacity(state, {"max_active": int(metrics["max_active"][pending].max())})
        if all(getattr(state.config, k) == v for k, v in changes.items()):
          raise CapacityError(f"step {start + t}: members {who} overflow at the largest capacity.")
        replays.append((start + t, changes, who))
        bar.write(f"kronjax.sweep.fit: members {who} overflowed at step {start + t}; "
                  f"replaying them with {changes}")
        state = with_config(state, **changes)
        state, again = masked(state, batch, jnp.asarray(pending))
        for k, v in again.items():
          metrics[k] = np.where(pending, np.asarray(v), metrics[k])
        pending = np.asarray(again["overflow"]) & pending
      bad = live & ~np.isfinite(metrics["loss"])
      if bad.any():
        who = np.flatnonzero(bad).tolist()
        if on_nonfinite == "raise":
          raise FloatingPointError(
              f"step {start + t}: the loss of sweep member(s) {who} became non-finite; their "
              "learning rate is most likely too large. Use on_nonfinite='stop' to freeze them.")
        for i in who:
          stopped[i] = f"diverged at step {start + t}"
      if (t + 1) % log_every == 0 or t + 1 == steps:
        hist["step"].append(start + t + 1)
        for k in names:
          v = metrics[k].astype(np.float64)
          hist[k].append(np.where(live, v, np.nan if k in ("loss", "active") else -1))
      live &= ~bad
      if not live.any():
        bar.write(f"kronjax.sweep.fit: every member stopped at step {start + t}.")
        break
      if eval_every and ((t + 1) % eval_every == 0 or t + 1 == steps):
        part, shared = split(state)
        ev = jax.device_get(_evaluate_sweep(part, shared))
        eval_hist["eval_step"].append(start + t + 1)
        for k, v in ev.items():
          eval_hist.setdefault(k, []).append(np.where(live, v, np.nan))
      done += 1
      bar.update(1)
      if (t + 1) % 10 == 0 or t + 1 == steps:
        best = np.nanmin(np.where(live, metrics["loss"], np.nan)) if live.any() else np.nan
        bar.set_postfix(best_loss=f"{best:.4g}", live=f"{int(live.sum())}/{S}", refresh=False)
  finally:
    bar.close()
  seconds = time.perf_counter() - t_start
  out: dict[str, Any] = {"step": np.asarray(hist["step"])}
  for k in names:
    out[k] = np.stack(hist[k], axis=1) if hist[k] else np.zeros((S, 0))
  if eval_every:
    out["eval_step"] = np.asarray(eval_hist.pop("eval_step"))
    out.update({k: np.stack(v, axis=1) for k, v in eval_hist.items()})
  out["replays"] = replays
  out["stopped"] = list(stopped)
  out["seconds"] = seconds
  out["steps_per_second"] = done / seconds if seconds > 0 else float("inf")
  return sweep.replace(state=state, stopped=tuple(stopped)), out
