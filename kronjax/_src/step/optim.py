"""Which optax transformations the kernel-space step can run, and how.

The step keeps ``W = s W0 + A X`` and ``P = W X^T = s P0 + A K``. An optimizer keeps
both identities exactly iff its update is a *linear* function of the gradient
history and the parameters, with one scalar coefficient per step and past gradient:
then updating ``A``, ``P`` and the scale ``s`` of ``W0`` leafwise equals updating ``W``
and multiplying by ``X^T``. Adam, clipping and normalization are not: the weights
would leave ``span(W0, X)`` and ``P`` would stop being ``W X^T``.

Linearity is decided from the transformation's structure, never from a probe of a few
steps (which an Adam behind a zero-learning-rate warmup, or inside ``optax.MultiSteps``,
passes). An optax transformation is a pair of closures; ``update.__qualname__`` (such as
``scale_by_schedule.<locals>.update_fn``) names its building block and the closure cells
hold its arguments and inner transformations. ``check_linear`` walks that tree: the
known-linear blocks (``_LINEAR``) are accepted, the combinators (``chain``,
``named_chain``, ``masked``, ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``)
are opened, and anything else is refused with a message naming the part and where it
sits. A transformation that sees only the output layer (``"a"``, ``"bias"``: plain
gradients, no kernel-space identity) may be anything. ``assume_linear`` lets a user
vouch for a transformation of their own; a short probe still catches gross mistakes.

An optimizer that reads the parameters (weight decay) gets them: the step then passes
the full-shape trainable tree, ``"W0"`` (the scale ``s``, zero gradient) included.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.transforms import _masking

WORKING = ("optax.sgd (plain, momentum, nesterov), learning-rate schedules, optax.scale, "
           "optax.scale_by_learning_rate, optax.scale_by_schedule, optax.trace, "
           "optax.add_decayed_weights, optax.identity, and optax.chain, optax.named_chain, "
           "optax.inject_hyperparams and optax.MultiSteps(...).gradient_transformation() of "
           "these; optax.masked and optax.multi_transform where A, P, P_eval and W0 share one "
           "transformation (the output layer 'a' and 'bias' may have any optimizer); a linear "
           "transformation of your own wrapped in kronjax.assume_linear")

_TIED = ("A", "P", "P_eval", "W0")  # one and the same linear map (P = s P0 + A K)
# Leaves whose optimizer must be linear: the kernel-space ones and the dense baseline's W.
# "a" and "bias" get their plain gradients, so any optimizer on them is exact.
_LINEAR_KEYS = _TIED + ("W",)
# Ranks of the trainable leaves, for evaluating masks and labels on a stand-in tree.
_STAND_IN_SHAPES = {"A": (6, 4), "P": (4, 6), "P_eval": (4, 3), "W0": (), "W": (4, 5),
                    "a": (4, 2), "bias": (2,)}


def check_linear(tx: optax.GradientTransformation, keys=("A", "P", "a"), *, steps: int = 3,
                 rtol: float = 1e-4) -> None:
  """Raises ValueError unless ``tx`` is one linear map of the gradient history, with one
  scalar per step, for every entry of ``A``, ``P``, ``P_eval`` (and ``W0``).

  Decided from ``tx``'s structure (the module docstring); a transformation wrapped in
  ``assume_linear`` is taken on trust, checked only by a probe of ``steps`` steps
  (additivity, homogeneity at 1e-3, 1e3 and 1e8 to relative ``rtol``, one scalar per step).

  Args:
    tx: the optax transformation.
    keys: the keys of the tree the optimizer will see (``TrainState.trainable``), so that
      masks and ``multi_transform`` labels are read as they will run.
    steps: probe steps for ``assume_linear`` parts (and the diagnosis of a refusal).
    rtol: the probe's relative tolerance.

  Raises:
    TypeError: ``tx`` is not a transformation.
    ValueError: ``tx`` is not linear, or kronjax cannot tell that it is; the message
      names the offending part (``optax.scale_by_adam inside optax.chain inside
      optax.inject_hyperparams(optax.adam)``) and lists what works.
  """
  if not isinstance(tx, optax.GradientTransformation) and not (
      hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  with jax.ensure_compile_time_eval():
    keys = tuple(keys)
    with_params = needs_params(tx)
    if with_params and "W0" not in keys:
      keys += ("W0",)
    try:
      walk = _walk_tree(tx, _stand_in(keys))
    except _Refused as refusal:
      why = refusal.describe()
      if refusal.unknown:  # say what a probe sees, so the user knows where to look
        failure = _probe(tx, keys, with_params, steps=steps, rtol=rtol)
        why += f"; a probe finds that {failure}" if failure else ""
      raise ValueError(_nonlinear_message(why) if refusal.linearity
                       else f"tx cannot be used by kronjax: {why}.") from None
    if walk.assumed:
      failure = _probe(tx, keys, with_params, steps=steps, rtol=rtol)
      if failure:
        raise ValueError(_nonlinear_message(
            f"{walk.assumed[0]} is asserted linear, but a probe finds that {failure}"))


def assume_linear(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx``, marked as linear: kronjax accepts it without the structural check.

  For a transformation of your own (or one kronjax does not know) whose update is a
  linear function of the gradient history and the parameters with **one scalar
  coefficient per step and past gradient**, the same for every leaf of ``A``, ``P``,
  ``P_eval`` and the ``W0`` scale (such as ``u -> 0.5 u``, or a momentum of your own).
  You are responsible for that: a transformation that is not linear trains something
  other than the dense network, with no error. kronjax only runs a short probe
  (a few steps of additivity, homogeneity and one scalar per leaf) that catches gross
  mistakes such as Adam or a permutation.

  Args:
    tx: the transformation (anything with ``init`` and ``update``, e.g. an
      ``optax.MultiSteps`` object).

  Returns:
    A ``GradientTransformationExtraArgs`` with ``tx``'s ``init`` and ``update``, which
    ``kronjax.init`` accepts on its own or inside ``optax.chain`` and the other
    combinators.

  Raises:
    TypeError: ``tx`` has no ``init`` and ``update``.
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"tx must be an optax.GradientTransformation (with init and update), got "
                    f"{type(tx).__name__}.")
  inner = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def needs_params(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx.update`` reads the parameters (``optax.add_decayed_weights`` and co)."""
  with jax.ensure_compile_time_eval():
    g = {"x": jnp.zeros((2,), jnp.float32)}
    try:
      tx.update(g, tx.init(g), None)
    except Exception:  # noqa: BLE001 -- optax raises various errors for missing params
      try:
        tx.update(g, tx.init(g), g)
      except Exception:  # noqa: BLE001 -- it fails with params too: not our case
        return False
      return True
  return False


def _nonlinear_message(why: str) -> str:
  return (
      f"tx cannot be used by kronjax: {why}. The kernel-space step keeps W = s W0 + A X "
      "and P = W X^T exactly only for optimizers whose update is linear in the "
      "gradient history and parameters, with one scalar per step; adam, clipping or "
      "normalization would move the weights out of span(W0, X), so P would no longer "
      f"equal W X^T. Use one of: {WORKING}.")


# --- The structural walk --------------------------------------------------------------


class _Refused(Exception):
  """A part of the transformation that is not (known to be) linear."""

  def __init__(self, part: str, reason: str, *, unknown: bool = False, linearity: bool = True):
    super().__init__(part)
    self.path = [part]      # innermost first; each enclosing combinator appends itself
    self.reason = reason
    self.unknown = unknown  # not known to optax's vocabulary: a probe may say more
    self.linearity = linearity  # a question of linearity (else the message needs no lecture)

  def describe(self) -> str:
    return f"{' inside '.join(self.path)} {self.reason}"


@dataclasses.dataclass
class _Walk:
  assumed: list = dataclasses.field(default_factory=list)   # assume_linear parts, by name
  masks: list = dataclasses.field(default_factory=list)     # per-key flags of each mask/label
  blocks: list = dataclasses.field(default_factory=list)    # (name, cells) of each leaf block
  combinators: list = dataclasses.field(default_factory=list)  # MultiSteps and co, by name


def _walk_tree(tx, tree: dict) -> _Walk:
  """Walks ``tx`` as it would run on ``tree`` (a dict of the trainable keys); raises
  ``_Refused`` at the first part that is not linear where it has to be."""
  walk = _Walk()
  _walk(tx, tree, walk)
  return walk


def _walk(tx, tree: dict, walk: _Walk) -> None:
  visible = [k for k, v in tree.items() if not isinstance(v, _masking.MaskedNode)]
  if not any(k in _LINEAR_KEYS for k in visible):
    return  # sees the output layer only (or nothing): plain gradients, anything is exact
  fn = getattr(tx.update, "__func__", tx.update)  # MultiSteps.update is a bound method
  block = _block_name(fn)
  handler = _HANDLERS.get(block) if _is_optax(fn) else None
  if handler is None and block == "assume_linear" and fn.__module__ == __name__:
    walk.assumed.append(f"kronjax.assume_linear({_tx_name(_cells(fn)['inner'])})")
    return
  if handler is None:
    raise _unknown(fn, block)
  name = f"optax.{block}"
  try:
    name = _combinator_name(block, tx)
    handler(tx, _cells(fn), tree, walk, name)
  except (KeyError, AttributeError, TypeError) as e:  # an optax of another layout
    raise _Refused(name, f"could not be read by kronjax ({type(e).__name__}: {e}); this "
                   "version of optax may lay it out differently", unknown=True) from e


def _inner(name: str, tx, tree: dict, walk: _Walk) -> None:
  """Walks a part of the combinator ``name``; a refusal inside says where it sits."""
  try:
    _walk(tx, tree, walk)
  except _Refused as refusal:
    if name:
      refusal.path.append(name)
    raise


def _is_optax(fn) -> bool:
  module = getattr(fn, "__module__", None) or ""
  return module == "optax" or module.startswith("optax.")


def _block_name(fn) -> str:
  """``scale_by_adam`` for ``scale_by_adam.<locals>.update_fn``; ``MultiSteps.update``
  for a method."""
  qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
  return qualname.split(".<locals>")[0]


def _cells(fn) -> dict:
  """The closure variables of ``fn`` by name (none for a method or a callable object)."""
  code = getattr(fn, "__code__", None)
  cells = dict(zip(code.co_freevars, fn.__closure__ or ())) if code is not None else {}
  return {name: c.cell_contents for name, c in cells.items() if _filled(c)}


def _tx_name(tx) -> str:
  fn = getattr(tx.update, "__func__", tx.update)
  block = _block_name(fn)
  if block == "with_extra_args_support" and _is_optax(fn):
    return _tx_name(_cells(fn)["tx"])
  return f"optax.{block}" if _is_optax(fn) else _user_name(fn)


def _user_name(fn) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _combinator_name(block: str, tx) -> str:
  if block == "inject_hyperparams":
    factory = _cells(tx.update)["inner_factory"]
    inner = (f"optax.{getattr(factory, '__name__', '?')}" if _is_optax(factory)
             else _user_name(factory))
    return f"optax.inject_hyperparams({inner})"
  if block == "partition":
    return "optax.multi_transform"
  if block == "MultiSteps.update":
    return "optax.MultiSteps"
  if block == "with_extra_args_support":
    return ""  # an internal wrapper: not worth naming
  return f"optax.{block}"


# Why the common non-linear blocks are refused, by the start of their name.
_REASONS = (
    ("clip_by_global_norm", "is not linear in the gradient: it rescales by the global norm of "
     "the tree it sees (of A, P and P_eval, not of W)"),
    ("clip", "is not linear in the gradient: it clips by the gradient's size"),
    ("adaptive_grad_clip", "is not linear in the gradient: it clips by the gradient's size"),
    ("scale_by_trust_ratio", "is not linear in the gradient: it normalizes by norms"),
    ("normalize", "is not linear in the gradient: it normalizes by norms"),
    ("scale_by_sign", "is not linear in the gradient: it takes signs"),
    ("scale_by_lion", "is not linear in the gradient: it takes signs"),
    ("scale_by_", "is not linear in the gradient: it rescales each entry by statistics of "
     "the gradients (an adaptive method)"),
)


def _unknown(fn, block: str) -> _Refused:
  if not _is_optax(fn):
    return _Refused(f"the transformation of your own {_user_name(fn)}",
                    "is not an optax building block kronjax knows (if it is linear with one "
                    "scalar per step, wrap it in kronjax.assume_linear)", unknown=True)
  if block == "stateless":
    inner = _cells(fn).get("f")
    name = f"optax.stateless({_user_name(inner)})" if inner is not None else "optax.stateless"
    return _Refused(name, "is not an optax building block kronjax knows to be linear (if it is "
                    "linear with one scalar per step, wrap it in kronjax.assume_linear)",
                    unknown=True)
  for prefix, reason in _REASONS:
    if block.startswith(prefix):
      return _Refused(f"optax.{block}", reason)
  return _Refused(f"optax.{block}", "is not one of the optax building blocks kronjax knows to "
                  "be linear with one scalar per step", unknown=True)


def _stand_in(keys) -> dict:
  """A small tree with the trainable keys, each of its leaf's rank."""
  return {k: jnp.zeros(_STAND_IN_SHAPES.get(k, (3, 5)), jnp.float32) for k in keys}


# --- Handlers: (tx, closure cells, tree, walk) -> None, raising _Refused ----------------


def _scalar(name: str, value: Any, what: str) -> None:
  """``value`` must be one number per step: a scalar, or a schedule returning one."""
  if isinstance(value, jax.core.Tracer):
    raise _Refused(name, f"holds a traced {what} (it was built inside jit or vmap); the "
                   "optimizer is static data of the state, so build it outside and vary the "
                   "value as a hyperparameter in its state: optax.inject_hyperparams("
                   "optax.sgd)(learning_rate=...) (kronjax.sweep does that)", linearity=False)
  if callable(value):
    try:
      shape = jax.eval_shape(value, jax.ShapeDtypeStruct((), jnp.int32)).shape
    except Exception as e:  # noqa: BLE001 -- any failure of the user's schedule
      raise _Refused(name, f"has a {what} schedule that cannot be evaluated at step 0 "
                     f"({type(e).__name__}: {e})") from e
  else:
    shape = jnp.shape(value)
  if shape != ():
    raise _Refused(name, f"is not a scalar map: its {what} has shape {shape}; one scalar per "
                   "step is needed")


def _linear(tx, cells, tree, walk, name):
  del tx, tree
  walk.blocks.append((name, cells))


def _scalar_block(cell: str, what: str) -> Callable:
  """The handler of a block that is linear with the one scalar (or schedule) in ``cell``."""
  def handler(tx, cells, tree, walk, name):
    del tx, tree
    _scalar(name, cells[cell], what)
    walk.blocks.append((name, cells))
  return handler


def _with_extra_args(tx, cells, tree, walk, name):
  del tx
  _inner(name, cells["tx"], tree, walk)


def _chain(tx, cells, tree, walk, name):
  update_fns = cells["update_fns"]
  init_fns = _cells(tx.init).get("init_fns", (None,) * len(update_fns))
  for init, update in zip(init_fns, update_fns):
    _inner(name, optax.GradientTransformation(init, update), tree, walk)


def _named_chain(tx, cells, tree, walk, name):
  del tx
  for _, inner in cells["transforms"]:
    _inner(name, inner, tree, walk)


def _per_key(name: str, what: str, value: Any, tree: dict) -> dict:
  """The per-key entries of a mask or label tree (optax broadcasts a prefix)."""
  if not isinstance(value, Mapping):
    value = {k: value for k in tree}
  out = {}
  for k, v in tree.items():
    if isinstance(v, _masking.MaskedNode):
      continue
    entry = value[k]
    if np.ndim(entry) != 0:
      raise _Refused(name, f"gives {k!r} a {what} entry of shape {np.shape(entry)}; optax "
                     "and kronjax need one per leaf", linearity=False)
    out[k] = entry.item() if hasattr(entry, "item") else entry
  return out


def _read(name: str, what: str, fn_or_tree: Any, tree: dict) -> dict:
  try:
    value = fn_or_tree(tree) if callable(fn_or_tree) else fn_or_tree
    return _per_key(name, what, value, tree)
  except _Refused:
    raise
  except Exception as e:  # noqa: BLE001 -- the user's mask function
    raise _Refused(name, f"fails: its {what} cannot be read on the trainable tree "
                   f"{list(tree)} ({type(e).__name__}: {e})", linearity=False) from e


def _tied(name: str, per_key: dict, what: str) -> None:
  """A, P, P_eval and W0 must get one and the same transformation."""
  tied = [k for k in _TIED if k in per_key]
  for k in tied[1:]:
    if per_key[k] != per_key[tied[0]]:
      raise _Refused(name, f"updates {k!r} differently from {tied[0]!r} (its {what}: "
                     f"{per_key[tied[0]]!r} for {tied[0]!r}, {per_key[k]!r} for {k!r}); A, P, "
                     "P_eval and W0 must share one map")


def _masked(tx, cells, tree, walk, name):
  del tx
  flags = _read(name, "mask", cells["mask"], tree)
  walk.masks.append(flags)
  _tied(name, flags, "mask")
  _inner(name, cells["inner"], {k: v if flags.get(k) else _masking.MaskedNode()
                                for k, v in tree.items()}, walk)


def _partition(tx, cells, tree, walk, name):
  del tx
  labels = _read(name, "labels", cells["param_labels"], tree)
  walk.masks.append(labels)
  _tied(name, labels, "labels")
  for label, inner in cells["transforms"].items():
    _inner(f"{name} (label {label!r})", inner,
           {k: v if labels.get(k) == label else _masking.MaskedNode() for k, v in tree.items()},
           walk)


def _inject(tx, cells, tree, walk, name):
  # The inner transformation is rebuilt on every update from the hyperparameters in the
  # state: build it once from the initial ones, as update does.
  try:
    hyperparams = {k: _stand_in_value(v) for k, v in tx.init(tree).hyperparams.items()}
    inner = cells["inner_factory"](**cells["other_hps"], **hyperparams)
  except Exception as e:  # noqa: BLE001 -- the user's factory
    raise _Refused(name, f"cannot build its inner transformation "
                   f"({type(e).__name__}: {e})", unknown=True) from e
  _inner(name, inner, tree, walk)


def _stand_in_value(value):
  """A hyperparameter of the state as the walk sees it: itself, or for a traced one
  (``jax.vmap`` over learning rates) a concrete array of its shape and dtype."""
  if isinstance(value, jax.core.Tracer):
    return jnp.ones(jnp.shape(value), jnp.result_type(value))
  return value


_DEFAULT_SKIP = "MultiSteps.__init__.<locals>.should_skip_update_fn"


def _multi_steps(tx, cells, tree, walk, name):
  """Mean (or sum) of k gradients, then the inner transformation: linear iff the inner is,
  as long as no step is skipped by a test on the gradient's values."""
  del cells
  multi = tx.update.__self__
  skip = multi._should_skip_update_fn  # pylint: disable=protected-access
  if getattr(skip, "__qualname__", "") != _DEFAULT_SKIP:
    raise _Refused(f"{name} with should_skip_update_fn={_user_name(skip)}",
                   "is not linear in the gradient: it skips steps by the values of A, P and "
                   "P_eval's gradients, not of W's; leave should_skip_update_fn at its default")
  walk.combinators.append(name)
  _inner(name, multi._opt, tree, walk)  # pylint: disable=protected-access


_HANDLERS: dict[str, Callable] = {
    "identity": _linear,
    "set_to_zero": _linear,
    "scale": _scalar_block("step_size", "step size"),
    "scale_by_schedule": _scalar_block("step_size_fn", "step size"),
    "trace": _scalar_block("decay", "decay"),
    "add_decayed_weights": _scalar_block("weight_decay", "weight decay"),
    "with_extra_args_support": _with_extra_args,
    "chain": _chain,
    "named_chain": _named_chain,
    "masked": _masked,
    "partition": _partition,
    "inject_hyperparams": _inject,
    "MultiSteps.update": _multi_steps,
}


# --- The probe (assume_linear parts, and the diagnosis of an unknown part) --------------


def _probe_tree(key, scale, shapes):
  keys = jax.random.split(key, len(shapes))
  return {name: scale * jax.random.normal(k, s, jnp.float32)
          for k, (name, s) in zip(keys, sorted(shapes.items()))}


def _probe(tx, keys, with_params, *, steps, rtol) -> str | None:
  """What a few random steps show against linearity with one scalar per step, or None.

  The *same* random gradient goes to the ``A``, ``P``, ``P_eval`` (and ``W0``) entries,
  which must get identical updates; the update must be additive on O(1) gradients,
  homogeneous at 1e-3, 1e3 and 1e8 (clipping, normalization, adam-style rescaling), and
  a constant gradient must give updates parallel to it (scalar coefficients).
  """
  shapes = {k: (3, 5) for k in keys}
  tied = [k for k in keys if k in _TIED]
  checked = [k for k in keys if k in _LINEAR_KEYS]
  zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}

  def probe(key, scale):
    tree = _probe_tree(key, scale, shapes)
    for k in tied[1:]:
      tree[k] = tree[tied[0]]
    return tree

  def flat(u):
    return np.concatenate([np.ravel(np.asarray(u[k], np.float64)) for k in checked])

  def close(x, y):
    return np.max(np.abs(x - y)) <= rtol * (np.max(np.abs(y)) + 1e-30)

  def scaled(c, tree):
    return jax.tree.map(lambda x: c * x, tree)

  scales = (1e3, 1e-3, 1e8)
  try:
    # Sequences of (gradient, params): a, b, a + b, c * a for each scale, and two
    # constant ones, (g, 0) and (0, p), whose updates must be parallel to g and p.
    n_seq = 3 + len(scales) + 2
    states = [tx.init(zeros) for _ in range(n_seq)]
    update = jax.jit(tx.update)  # compiled once: op by op, a lax.cond costs seconds a call
    key, k0, k1 = jax.random.split(jax.random.PRNGKey(1234), 3)
    constant, constant_p = probe(k0, 1.0), probe(k1, 1.0)
    for t in range(steps):
      key, k1, k2, k3, k4 = jax.random.split(key, 5)
      ga, gb = probe(k1, 1.0), probe(k2, 1.0)
      pa, pb = (probe(k3, 1.0), probe(k4, 1.0)) if with_params else (zeros, zeros)
      inputs = [(ga, pa), (gb, pb), (jax.tree.map(jnp.add, ga, gb), jax.tree.map(jnp.add, pa, pb))]
      inputs += [(scaled(c, ga), scaled(c, pa)) for c in scales]
      inputs += [(constant, zeros), (zeros, constant_p if with_params else zeros)]
      outs = [update(g, st, p if with_params else None) for st, (g, p) in zip(states, inputs)]
      states = [st for _, st in outs]
      ua, ub, usum, *rest = (flat(u) for u, _ in outs)
      scaled_u = rest[:len(scales)]
      if not close(ua + ub, usum) or not all(close(u, c * ua) for u, c in zip(scaled_u, scales)):
        return f"its update is not linear in the gradient and parameters (probe step {t})"
      # Scalar coefficients: a constant gradient (parameter) sequence must give updates
      # parallel to it (the step relies on L(G @ K) = L(G) @ K; a permutation or
      # per-entry scaling is linear but breaks P = W X^T).
      for out, given in ((outs[-2][0], constant), (outs[-1][0], constant_p if with_params else None)):
        if given is None:
          continue
        for k in tied:
          u, g = (np.ravel(np.asarray(x[k], np.float64)) for x in (out, given))
          if not close(u, (u @ g) / (g @ g) * g):
            return (f"its update of {k!r} is not a scalar multiple of the gradient and "
                    f"parameters (probe step {t}); A, P, P_eval and the W0 scale need one "
                    "scalar per step and past gradient")
      first = np.asarray(outs[0][0][tied[0]], np.float64) if tied else None
      for k in tied[1:]:
        if not close(np.asarray(outs[0][0][k], np.float64), first):
          return (f"it updates {k!r} differently from {tied[0]!r}; A, P, P_eval and W0 must "
                  "share one map")
  except Exception as e:  # noqa: BLE001 -- e.g. a transform that needs something else
    return f"it cannot update ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
  return None


def is_shape_free(tx: optax.GradientTransformation, params: Any) -> bool:
  """True when ``tx``'s state does not depend on the parameter shapes (no moments).

  Such a linear transformation is elementwise and stateless in the parameters,
  so it can be applied to the compact (touched entries only) gradient: the
  sparse update path. That path hands it ``A``, ``P`` and ``P_eval`` as scalars, so a
  mask or label function that reads the leaves' shapes (``x.ndim > 1``) and would
  read them differently there makes ``tx`` not shape-free.
  """
  small = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) * x.ndim, x.dtype), params)
  a = jax.eval_shape(tx.init, params)
  b = jax.eval_shape(tx.init, small)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.shape == y.shape for x, y in zip(la, lb))
          and _masks_read_alike(tx, params))


# Blocks that multiply by one scalar per step (the factored forms' scalars).
_SCALAR_BLOCKS = ("optax.identity", "optax.scale", "optax.scale_by_schedule")
_DECAY = "optax.add_decayed_weights"


def update_form(tx: optax.GradientTransformation) -> str | None:
  """``"trace"``, ``"decay"`` or None: whether the step may apply ``tx`` from the gradient's
  factors (``step._apply_factored``), without forming any full-shape gradient.

  ``"trace"``: on every key, scalars and at most one ``optax.add_decayed_weights``, then one
  ``optax.trace`` (not Nesterov), then scalars: heavy-ball momentum (``optax.sgd(lr,
  momentum)``, with schedules, under ``inject_hyperparams``), with or without decay before
  it. Per leaf one trace ``s`` and per step scalars with ``s' = mu s + beta g + nu w`` and
  ``update = c s'``.

  ``"decay"``: scalars and at least one ``optax.add_decayed_weights``, no state:
  ``update = beta g + nu w`` (sgd with weight decay).

  None: anything else (shape-free sgd has its own path; masks, ``multi_transform``,
  ``MultiSteps``, Nesterov, two traces and transformations of one's own get the full-shape
  gradient tree).
  """
  with jax.ensure_compile_time_eval():
    try:
      walk = _walk_tree(tx, _stand_in(("A", "P", "a")))
    except _Refused:
      return None
  if walk.assumed or walk.masks or walk.combinators:
    return None
  names = [name for name, _ in walk.blocks]
  if any(n not in _SCALAR_BLOCKS + (_DECAY, "optax.trace") for n in names):
    return None
  if "optax.trace" not in names:
    return "decay" if _DECAY in names else None
  at = names.index("optax.trace")
  after = names[at + 1:]
  if any(n not in _SCALAR_BLOCKS for n in after) or names[:at].count(_DECAY) > 1:
    return None
  return "trace" if walk.blocks[at][1].get("nesterov") is False else None


def tied_leaf_paths(opt_state: Any, keys: Sequence[str]) -> dict[str, tuple]:
  """``{key: path}`` of the one state leaf of each tied ``key`` (the trace of a
  ``"trace"``-form optimizer, ``update_form``), found by the key in its tree path."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    for k in keys:
      if any(isinstance(e, jax.tree_util.DictKey) and e.key == k for e in path):
        if k in out:
          raise ValueError(f"the optimizer state holds more than one array for {k!r}")
        out[k] = path
  missing = [k for k in keys if k not in out]
  if missing:
    raise ValueError(f"the optimizer state holds no array for {missing}")
  return out


def _masks_read_alike(tx, params: Any) -> bool:
  """Whether ``tx``'s masks and labels give each key the same entry on ``params`` and on
  the shape-free step's tree (``A``, ``P``, ``P_eval`` as scalars)."""
  if not isinstance(params, Mapping):
    return True
  unit = {k: jnp.zeros((), v.dtype) if k in _TIED else v for k, v in params.items()}
  with jax.ensure_compile_time_eval():
    try:
      return _walk_tree(tx, dict(params)).masks == _walk_tree(tx, unit).masks
    except _Refused:  # not walkable (an assume_linear inside is fine; this is not): be safe
      return False


class StaticTx:
  """An optax transformation as static data of a pytree, compared by structure.

  ``optax.sgd(0.5)`` builds new closures on every call, so two equal optimizers are
  different objects; compared by identity, each would compile its own step. Two
  ``StaticTx`` are equal when their transformations have the same code and equal
  captured values (numbers, strings, nested transformations, small concrete
  arrays); anything else captured (a traced value, an unknown object) is compared
  by identity. ``init`` and ``update`` are the transformation's.

  Attributes:
    tx: the optax transformation.
    shape_free: its state does not depend on the parameter shapes (no moments) and it
      does not read the parameters: the sparse update path may apply it to compact
      gradients (``is_shape_free``).
    needs_params: ``update`` reads the parameters (weight decay, ``needs_params``).
    form: ``"trace"`` (momentum), ``"decay"`` (sgd with weight decay) or None
      (``update_form``): the step applies the first two from the gradient's factors.
  """

  __slots__ = ("tx", "shape_free", "needs_params", "form", "_key")

  def __init__(self, tx: optax.GradientTransformation, shape_free: bool):
    self.tx = tx
    self.needs_params = needs_params(tx)
    # An optimizer that reads the parameters needs the full-shape tree: never shape-free.
    self.shape_free = bool(shape_free) and not self.needs_params
    self.form = None if self.shape_free else update_form(tx)
    self._key = (structure_key(tx), self.shape_free)

  @property
  def init(self):
    return self.tx.init

  @property
  def update(self):
    return self.tx.update

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, StaticTx) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __repr__(self) -> str:
    return f"StaticTx({self.tx!r}, shape_free={self.shape_free})"


class _Identity:
  """Compares by identity (for captured values with no structural equality)."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.obj is self.obj

  def __hash__(self):
    return id(self.obj)


_SMALL_ARRAY = 1024  # captured arrays up to this many elements are compared by value


def structure_key(obj: Any, depth: int = 0) -> Any:
  """A hashable key equal for transformations built alike (``StaticTx``)."""
  if depth > 40:
    return _Identity(obj)
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
    return (type(obj).__name__, obj)
  if isinstance(obj, (tuple, list)):
    return (type(obj).__name__,) + tuple(structure_key(x, depth + 1) for x in obj)
  if isinstance(obj, dict):
    try:
      items = sorted(obj.items())
    except TypeError:
      return _Identity(obj)
    return ("dict",) + tuple((k, structure_key(v, depth + 1)) for k, v in items)
  if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
    if isinstance(obj, jax.core.Tracer) or np.size(obj) > _SMALL_ARRAY:
      return _Identity(obj)
    arr = np.asarray(obj)
    return ("array", arr.dtype.str, arr.shape, arr.tobytes())
  if isinstance(obj, functools.partial):
    return ("partial", structure_key(obj.func, depth + 1), structure_key(obj.args, depth + 1),
            structure_key(obj.keywords, depth + 1))
  if isinstance(obj, types.FunctionType):
    cells = tuple(structure_key(c.cell_contents, depth + 1) if _filled(c) else ("empty",)
                  for c in (obj.__closure__ or ()))
    return ("function", obj.__code__, cells, structure_key(obj.__defaults__, depth + 1),
            structure_key(obj.__kwdefaults__, depth + 1))
  if isinstance(obj, types.BuiltinFunctionType):
    return ("builtin", obj)
  return _Identity(obj)


def _filled(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:
    return False
