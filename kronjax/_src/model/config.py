"""``Config``: what defines a network and its training problem (hashable, static).

Two runs with equal resolved configs, the same optimizer and the same data compute
the same function. How a step runs (capacities, index kind, update path, layout,
chunk sizes) is not here: that is the execution plan, ``kronjax.Plan``, which may
change between runs and on resume without changing any number beyond rounding order.

Anything a sweep may vary (learning rate, threshold ``b``, keys) lives in the
``TrainState`` as arrays instead, so ``jax.vmap`` compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping

from kronjax._src.base import checks
from kronjax._src.model import losses

LOSSES = ("mse", "softmax")
INITS = ("kronecker", "implicit", "explicit")

DEFAULT_INIT_RANK = 4
"""Kronecker terms per neuron of ``init="kronecker"`` when ``init_rank`` is None."""


def default_threshold(width: int) -> float:
  """The paper's shift ``b = sqrt(0.4 ln m)``: ``o(m)`` neurons fire per point."""
  return math.sqrt(0.4 * math.log(width)) if width > 1 else 0.0


def gaussian_tail(b: float) -> float:
  """``Q(b) = P[N(0, 1) > b]``: the firing probability of one neuron at init."""
  return 0.5 * math.erfc(b / math.sqrt(2.0))


@dataclasses.dataclass(frozen=True)
class Config:
  """The network: width, threshold, loss, outputs, init and whether ``a`` trains.

  Attributes:
    width: number of hidden neurons ``m``.
    threshold: the ReLU shift ``b`` of ``relu(w.x - b)``, any finite real; None
      (derived) means ``sqrt(0.4 ln m)``. A larger ``b`` fires fewer neurons per point
      (cheaper steps, a kernel concentrated on near-identical points); ``b = 0`` is the
      arc-cosine kernel; ``b < 0`` fires most neurons (every step then touches every
      neuron), and as ``b -> -inf`` the hidden layer's kernel tends to the linear kernel
      ``x.x'`` (Kronecker ridge regression's).
    loss: ``"mse"`` (batch mean of ``1/2 ||f - y||^2``), ``"softmax"``
      (batch mean cross-entropy with integer labels), or a loss of one's own: a
      function ``fn(outputs, labels) -> scalar`` of the batch outputs ``(B, C)`` and
      the batch's labels (the dataset's labels, an array or any pytree whose leaves
      have leading axis ``n``: targets, per-point weights, group ids, indexed per
      batch as ``jax.tree.map(lambda x: x[idx], labels)``). The step takes
      ``jax.value_and_grad`` of ``fn`` with respect to the outputs, so any
      differentiable ``fn`` works, one that couples the batch's points (a pairwise
      ranking loss) included. A function is compared and hashed by identity: two
      different function objects (two ``lambda``s with the same body) are two
      networks and compile two steps; define ``fn`` once and reuse it.
      ``identity()`` (what checkpoints store) holds its qualified name,
      ``"module.qualname"``.
    num_classes: outputs ``C`` (classes for softmax, targets for mse, the
      outputs ``fn`` receives for a callable loss).
    init: how ``W0`` is drawn (see ``kronjax._src.model.initializers``):
      ``"kronecker"`` (each row a sum of ``init_rank`` Kronecker products of
      Gaussian factors: no ``d`` anywhere, predicts on any input), ``"implicit"``
      (``P0`` sampled from ``N(0, K)`` on the registered points only) or
      ``"explicit"`` (exact Gaussian ``W0`` drawn in ``d`` dimensions:
      ``O(m n d)``, for comparisons).
    init_rank: terms per neuron of the kronecker init; None (derived) means
      ``DEFAULT_INIT_RANK``. Only with ``init="kronecker"``.
    train_output: also train the output layer ``a``.
    output_bias: add a trainable bias per output, ``f(x) = a^T relu(W x - b) / sqrt(m) + c``
      (zeros at init).
    centered: the mirrored start: neurons ``r`` and ``r + m/2`` share their initial
      weights and have opposite output weights, so the network's output at init is zero on
      every input up to float rounding (the training signal is not swamped by a random
      initial function).
      Needs an even width.

  Derived fields stay None as given; ``resolve()`` fills them in (a state holds
  the resolved config), so ``Config(width=128).replace(width=1024)`` gets the
  threshold of width 1024.
  """

  width: int
  threshold: float | None = None
  loss: str | Callable[..., Any] = "mse"
  num_classes: int = 1
  init: str = "kronecker"
  init_rank: int | None = None
  train_output: bool = False
  output_bias: bool = False
  centered: bool = False

  def __post_init__(self):
    checks.check_positive_int("width", self.width)
    if self.threshold is not None:
      if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real):
        raise TypeError(
            f"threshold must be a real number or None, got {type(self.threshold).__name__}; "
            "to sweep over thresholds pass them to kronjax.init(..., threshold=b) instead.")
      if not math.isfinite(self.threshold):
        raise ValueError(
            f"threshold must be a finite number (the shift b of relu(z - b)), got "
            f"{self.threshold}; pass a finite b, or None for the default sqrt(0.4 ln m).")
      object.__setattr__(self, "threshold", float(self.threshold))
    if isinstance(self.loss, str) or not callable(self.loss):
      if not isinstance(self.loss, str):
        raise TypeError(
            f"loss must be one of {LOSSES} or a function fn(outputs, labels) -> scalar, got "
            f"{type(self.loss).__name__}.")
      if self.loss not in LOSSES and "." in self.loss:
        raise ValueError(
            f"loss={self.loss!r} is the name of a function (how Config.identity() and checkpoints "
            "record a loss of one's own); a Config needs the function itself: pass "
            "loss=<that function>.")
      checks.check_choice("loss", self.loss, LOSSES)
    else:
      try:
        hash(self.loss)
      except TypeError:
        raise TypeError(
            f"loss must be hashable (a Config is static data), but the callable "
            f"{type(self.loss).__name__} is not; pass a plain function.") from None
    checks.check_positive_int("num_classes", self.num_classes,
                              minimum=2 if self.loss == "softmax" else 1)
    checks.check_choice("init", self.init, INITS)
    if self.init_rank is not None:
      checks.check_positive_int("init_rank", self.init_rank)
      if self.init != "kronecker":
        raise ValueError(
            f"init_rank={self.init_rank!r} was given with init={self.init!r}; init_rank is the "
            "number of Kronecker terms per neuron of init='kronecker'. Drop it or use "
            "init='kronecker'.")
      object.__setattr__(self, "init_rank", int(self.init_rank))
    for name in ("train_output", "output_bias", "centered"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")
    if self.centered and self.width % 2:
      raise ValueError(f"centered=True pairs neuron r with neuron r + m/2, so width must be even, "
                       f"got {self.width}; use width={self.width + 1}.")

  def resolve(self) -> "Config":
    """This config with its derived fields (``threshold``, ``init_rank``) filled in."""
    return dataclasses.replace(
        self,
        threshold=default_threshold(self.width) if self.threshold is None else self.threshold,
        init_rank=(DEFAULT_INIT_RANK if self.init == "kronecker" and self.init_rank is None
                   else self.init_rank))

  @property
  def is_resolved(self) -> bool:
    return self == self.resolve()

  @property
  def firing_probability(self) -> float:
    """``Q(b)``: the chance that one neuron fires on a unit-norm point at init."""
    return gaussian_tail(self.resolve().threshold)

  def identity(self) -> dict[str, Any]:
    """What defines the network, resolved: two configs with equal identities are one network.

    Checkpoints, resume and ``kronjax.with_plan`` compare this. It is JSON: a
    callable ``loss`` appears as its qualified name (``"module.qualname"``), so two
    functions of one name count as one loss here.
    """
    values = _fields(self.resolve())
    values["loss"] = losses.loss_name(self.loss)
    return values

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Config":
    """Builds a Config from a mapping, rejecting unknown keys with the closest match.

    A key of the execution plan (``active_capacity``, ``index``, ...) is named as such.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        raise ValueError(_unknown_field_message("config key", key, names))
    return cls(**values)

  def replace(self, **changes: Any) -> "Config":
    """A copy with ``changes`` applied (derived fields still None are derived afresh)."""
    return Config.from_dict({**_fields(self), **changes})


def _fields(config: Config) -> dict[str, Any]:
  """The fields as given (shallow: a callable loss stays the same object)."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _init_with_hint(init):
  @functools.wraps(init)
  def wrapped(self, *args, **kwargs):
    misplaced = [k for k in kwargs if k in PLAN_FIELDS]
    if misplaced:
      raise TypeError(_unknown_field_message("Config field", misplaced[0], ()))
    init(self, *args, **kwargs)
  return wrapped


Config.__init__ = _init_with_hint(Config.__init__)


PLAN_FIELDS = ("active_capacity", "candidate_capacity", "index_delta", "index", "update",
               "layout", "init_chunk")


def _unknown_field_message(what: str, key: str, valid) -> str:
  if key in PLAN_FIELDS:
    return (f"{key!r} is not a {what}: it says how the step runs, not what the network is. "
            f"Pass it in the execution plan: kronjax.init(..., plan=kronjax.Plan({key}=...)) "
            "(or kronjax.with_plan(state, ...) for a built state).")
  return checks.unknown_key_message(what, key, valid)
