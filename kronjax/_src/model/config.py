"""Static configuration: everything that fixes shapes or code paths.

Anything a sweep may vary (learning rate, threshold ``b``, keys) lives in the
``TrainState`` as arrays instead, so ``jax.vmap`` compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from kronjax._src.base import checks

LOSSES = ("mse", "softmax")
INITS = ("kronecker", "implicit", "explicit")
GRAMS = ("precomputed", "factors")
INDEX_KINDS = ("auto", "scan", "bucketed")
UPDATES = ("auto", "sparse", "full")
LAYOUTS = ("auto", "neurons", "points")

# Earlier names, still accepted: "dense" meant three things (the baseline, an
# update path and an index kind); each setting now has a name of its own.
ALIASES = {"index": {"dense": "scan"}, "update": {"dense": "full"}}

# Fields derived from others when left as None; ``replace`` derives them again
# (a copy with another width gets that width's capacities) unless given.
DERIVED = ("threshold", "active_capacity", "candidate_capacity")


def default_threshold(width: int) -> float:
  """The paper's shift ``b = sqrt(0.4 ln m)``: ``o(m)`` neurons fire per point."""
  return math.sqrt(0.4 * math.log(width)) if width > 1 else 0.0


def gaussian_tail(b: float) -> float:
  """``Q(b) = P[N(0, 1) > b]``: the firing probability of one neuron at init."""
  return 0.5 * math.erfc(b / math.sqrt(2.0))


def default_active_capacity(width: int, threshold: float) -> int:
  """Room for the active neurons of one point: twice the mean plus 8 sigma, rounded to 8.

  At Gaussian init with unit-norm points the count is Binomial(m, Q(b)); training
  can raise it, and ``fit`` grows the capacity (replay) when it is exceeded.
  """
  mean = width * gaussian_tail(threshold)
  cap = int(math.ceil(2.0 * mean + 8.0 * math.sqrt(mean) + 16))
  return min(width, -(-cap // 8) * 8)


MINIBATCH = 8
"""The batch size ``layout="auto"`` plans for (see ``Config.resolved_layout``)."""

DEFAULT_INIT_RANK = 4
"""Kronecker terms per neuron of ``init="kronecker"`` when ``init_rank`` is None."""


@dataclasses.dataclass(frozen=True)
class _Derived:
  threshold: float
  active_capacity: int
  candidate_capacity: int


@dataclasses.dataclass(frozen=True)
class Config:
  """Static settings of a kronjax network and its training step (hashable).

  Attributes:
    width: number of hidden neurons ``m``.
    threshold: the ReLU shift ``b``; ``None`` means ``sqrt(0.4 ln m)``.
    loss: ``"mse"`` (batch mean of ``1/2 ||f - y||^2``) or ``"softmax"``
      (batch mean cross-entropy with integer labels).
    num_classes: outputs ``C`` (classes for softmax, targets for mse).
    init: how ``W0`` is drawn (see ``kronjax.initializers``): ``"kronecker"``
      (each row a sum of ``init_rank`` Kronecker products of Gaussian factors:
      no ``d`` anywhere, predicts on any input), ``"implicit"`` (``P0`` sampled
      from ``N(0, K)`` on the registered points only) or ``"explicit"`` (exact
      Gaussian ``W0`` drawn in ``d`` dimensions: ``O(m n d)``, for comparisons).
    init_rank: terms per neuron of the kronecker init (``None``: the default,
      ``DEFAULT_INIT_RANK``); only with ``init="kronecker"``.
    train_output: also train the output layer ``a``.
    active_capacity: static room ``K_cap`` for active neurons per point;
      ``None`` derives it from ``width`` and ``threshold``.
    candidate_capacity: room per point in the bucketed index; ``None`` derives it.
    index_delta: value margin of the bucketed index (candidates are neurons
      above ``b - index_delta`` at the last rebuild).
    gram: accepted for older configs; the Gram now belongs to the dataset
      (``kronjax.Dataset(..., gram=...)``), which takes precedence.
    index: threshold index kind: ``"auto"``, ``"scan"`` (the reference scan of
      ``P[:, S] > b``; earlier name ``"dense"``) or ``"bucketed"``.
    update: P-update path: ``"auto"``, ``"sparse"`` (touched rows only) or
      ``"full"`` (one ``(m, B) @ (B, n)`` product over every neuron; earlier
      name ``"dense"``). ``"auto"`` is explained in ``kronjax.Config.resolved_update``.
    layout: how ``P`` is stored (``state.P`` is the ``(m, n)`` view either way):
      ``"neurons"`` (``(m, n)``: a neuron's row is contiguous, what the sparse
      path's row updates need), ``"points"`` (``(n, m)``: a batch's columns are
      contiguous rows, what the full path's forward reads; full path only) or
      ``"auto"``: ``"points"`` when the update path is ``"full"``, or is ``"auto"``
      and a minibatch of ``MINIBATCH`` points would take the full path (and the
      index is not ``"bucketed"``); else ``"neurons"``.
    init_chunk: neurons per chunk when drawing ``W0`` explicitly.
  """

  width: int
  threshold: float | None = None
  loss: str = "mse"
  num_classes: int = 1
  init: str = "kronecker"
  train_output: bool = False
  active_capacity: int | None = None
  candidate_capacity: int | None = None
  index_delta: float = 0.25
  gram: str = "precomputed"
  index: str = "auto"
  update: str = "auto"
  layout: str = "auto"
  init_chunk: int = 256
  init_rank: int | None = None

  def __post_init__(self):
    checks.check_positive_int("width", self.width)
    if self.threshold is not None:
      if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real):
        raise TypeError(
            f"threshold must be a real number or None, got {type(self.threshold).__name__}; "
            "to sweep over thresholds pass them to kronjax.init(..., threshold=b) instead.")
      if not math.isfinite(self.threshold):
        raise ValueError(f"threshold must be finite, got {self.threshold}.")
      object.__setattr__(self, "threshold", float(self.threshold))
    else:
      object.__setattr__(self, "threshold", default_threshold(self.width))
    checks.check_choice("loss", self.loss, LOSSES)
    checks.check_positive_int("num_classes", self.num_classes, minimum=2 if self.loss == "softmax" else 1)
    checks.check_choice("init", self.init, INITS)
    if self.init_rank is not None:
      checks.check_positive_int("init_rank", self.init_rank)
      if self.init != "kronecker":
        raise ValueError(
            f"init_rank={self.init_rank!r} was given with init={self.init!r}; init_rank is the "
            "number of Kronecker terms per neuron of init='kronecker'. Drop it or use "
            "init='kronecker'.")
      object.__setattr__(self, "init_rank", int(self.init_rank))
    elif self.init == "kronecker":
      object.__setattr__(self, "init_rank", DEFAULT_INIT_RANK)
    if not isinstance(self.train_output, bool):
      raise TypeError(f"train_output must be a bool, got {self.train_output!r}.")
    if self.active_capacity is None:
      object.__setattr__(self, "active_capacity", default_active_capacity(self.width, self.threshold))
    checks.check_positive_int("active_capacity", self.active_capacity)
    if self.active_capacity > self.width:
      raise ValueError(
          f"active_capacity must be in [1, width={self.width}], got {self.active_capacity}; "
          "a point cannot have more active neurons than the network has.")
    if not isinstance(self.index_delta, (int, float)) or isinstance(self.index_delta, bool) \
        or not (math.isfinite(self.index_delta) and self.index_delta > 0):
      raise ValueError(f"index_delta must be a positive finite float, got {self.index_delta!r}.")
    object.__setattr__(self, "index_delta", float(self.index_delta))
    if self.candidate_capacity is None:
      object.__setattr__(self, "candidate_capacity", default_active_capacity(
          self.width, self.threshold - self.index_delta))
    checks.check_positive_int("candidate_capacity", self.candidate_capacity)
    if self.candidate_capacity > self.width:
      raise ValueError(
          f"candidate_capacity must be in [1, width={self.width}], got {self.candidate_capacity}.")
    checks.check_choice("gram", self.gram, GRAMS)
    for name, aliases in ALIASES.items():
      value = getattr(self, name)
      if isinstance(value, str) and value in aliases:
        object.__setattr__(self, name, aliases[value])
    checks.check_choice("index", self.index, INDEX_KINDS)
    checks.check_choice("update", self.update, UPDATES)
    checks.check_choice("layout", self.layout, LAYOUTS)
    if self.layout == "points" and self.update == "sparse":
      raise ValueError(
          "layout='points' stores P point-major, which only the full update path uses, but "
          "update='sparse' was asked for; use layout='neurons' (or 'auto') with the sparse path, "
          "or update='full' (or 'auto') with layout='points'.")
    if self.layout == "points" and self.index == "bucketed":
      raise ValueError(
          "layout='points' runs the full update path, which needs no threshold index, so "
          "index='bucketed' would only cost time; use index='auto' or 'scan' with it.")
    checks.check_positive_int("init_chunk", self.init_chunk)

  def resolved_update(self, batch_size: int) -> str:
    """The update path a step on ``batch_size`` points runs: ``"sparse"`` or ``"full"``.

    What ``"auto"`` picks, and why (the one place that says it; measured by
    ``experiments/bench_auto.py``):

    * ``layout="points"`` (or ``update="full"`` with ``layout="auto"``): ``"full"``,
      the only path that reads point-major ``P``;
    * otherwise ``"sparse"`` while the rows a step may touch, ``B * active_capacity``,
      stay under a third of ``width``, else ``"full"``: the sparse path updates
      ``T <= B K_cap`` rows of ``n`` through a sorted unique row scatter, which
      costs about twice a full row per row on CPU, and the full path pays one
      ``(m, B) @ (B, n)`` product with no index query.

    The layout is chosen when the state is built (``resolved_layout``): ``"auto"``
    stores ``P`` point-major when a minibatch of ``MINIBATCH`` points would take
    the full path (the full path's fastest layout; it then runs at every batch
    size), else neuron-major, where each step picks by its own batch size. The
    index ``"auto"`` is ``"scan"`` (``kronjax``'s threshold index module says why
    the bucketed index does not win the train step on CPU). For batch 1 on a
    network with ``3 * 8 * active_capacity > width``, pass ``layout="neurons"``
    to keep the sparse path.
    """
    if self.resolved_layout == "points":
      return "full"
    if self.update != "auto":
      return self.update
    return "sparse" if 3 * batch_size * self.active_capacity <= self.width else "full"

  @property
  def firing_probability(self) -> float:
    """``Q(b)``: the chance that one neuron fires on a unit-norm point at init."""
    return gaussian_tail(self.threshold)

  @property
  def resolved_layout(self) -> str:
    """``"neurons"`` or ``"points"``: the layout ``layout="auto"`` stands for."""
    if self.layout != "auto":
      return self.layout
    if self.update == "sparse" or self.index == "bucketed":
      return "neurons"
    if self.update == "full":
      return "points"
    # update="auto": the layout is fixed when the state is built, before any batch size is
    # known. Point-major P is what the full path reads fastest (1.4 vs 2.1 ms a step at
    # m = 4096, n = 1024, B = 32, experiments/bench_step.py), but it rules out the sparse
    # path; so "points" when a minibatch of MINIBATCH points would already take the full path.
    return "points" if 3 * MINIBATCH * self.active_capacity > self.width else "neurons"

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Config":
    """Builds a Config from a mapping, rejecting unknown keys with the closest match."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        raise ValueError(checks.unknown_key_message("config key", key, names))
    return cls(**values)

  def replace(self, **changes: Any) -> "Config":
    """A copy with ``changes`` applied.

    Settings that were derived (``threshold``, ``active_capacity``,
    ``candidate_capacity`` left as None) are derived again from the new values:
    ``Config(width=128).replace(width=1024)`` gets the capacities of width 1024.
    A derived setting is recognized by its value equal to what derivation gives.
    """
    values = dataclasses.asdict(self)
    for name in DERIVED:
      if name not in changes and values[name] == getattr(self._derived_defaults(), name):
        values[name] = None
    if "init" in changes and "init_rank" not in changes and changes["init"] != "kronecker":
      values["init_rank"] = None
    return Config.from_dict({**values, **changes})

  def _derived_defaults(self) -> "Config":
    """This config with every derived setting derived afresh (from width, delta)."""
    threshold = default_threshold(self.width)
    active = default_active_capacity(self.width, threshold)
    candidate = default_active_capacity(self.width, threshold - self.index_delta)
    if self.threshold != threshold:  # an explicit threshold: capacities derive from it
      active = default_active_capacity(self.width, self.threshold)
      candidate = default_active_capacity(self.width, self.threshold - self.index_delta)
    return _Derived(threshold, active, candidate)
