"""Static configuration: everything that fixes shapes or code paths.

Anything a sweep may vary (learning rate, threshold ``b``, keys) lives in the
``TrainState`` as arrays instead, so ``jax.vmap`` compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from kronjax._src import checks

LOSSES = ("mse", "softmax")
INITS = ("explicit", "implicit")
GRAMS = ("precomputed", "factors")
INDEX_KINDS = ("auto", "dense", "bucketed")
UPDATES = ("auto", "sparse", "dense")
LAYOUTS = ("auto", "neurons", "points")


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


@dataclasses.dataclass(frozen=True)
class Config:
  """Static settings of a kronjax network and its training step (hashable).

  Attributes:
    width: number of hidden neurons ``m``.
    threshold: the ReLU shift ``b``; ``None`` means ``sqrt(0.4 ln m)``.
    loss: ``"mse"`` (batch mean of ``1/2 ||f - y||^2``) or ``"softmax"``
      (batch mean cross-entropy with integer labels).
    num_classes: outputs ``C`` (classes for softmax, targets for mse).
    init: ``"explicit"`` (``W0`` drawn in ``d`` space; ``predict`` works on any
      data) or ``"implicit"`` (``P0`` sampled from ``N(0, K)``; no ``d`` at all).
    train_output: also train the output layer ``a``.
    active_capacity: static room ``K_cap`` for active neurons per point;
      ``None`` derives it from ``width`` and ``threshold``.
    candidate_capacity: room per point in the bucketed index; ``None`` derives it.
    index_delta: value margin of the bucketed index (candidates are neurons
      above ``b - index_delta`` at the last rebuild).
    gram: ``"precomputed"`` (store the ``n x n`` Gram) or ``"factors"``
      (recompute the ``B x n`` rows from the factors each step).
    index: threshold index kind: ``"auto"``, ``"dense"`` or ``"bucketed"``.
    update: P-update path: ``"auto"``, ``"sparse"`` (touched rows only) or
      ``"dense"`` (one ``(m, B) @ (B, n)`` product).
    layout: how ``P`` is stored (``state.P`` is the ``(m, n)`` view either way):
      ``"neurons"`` (``(m, n)``: a neuron's row is contiguous, what the sparse
      path's row updates need), ``"points"`` (``(n, m)``: a batch's columns are
      contiguous rows, what the dense path's forward reads; dense path only) or
      ``"auto"``: ``"points"`` when ``update == "dense"`` (and the index is not
      ``"bucketed"``), else ``"neurons"``.
    init_chunk: neurons per chunk when drawing ``W0`` explicitly.
  """

  width: int
  threshold: float | None = None
  loss: str = "mse"
  num_classes: int = 1
  init: str = "explicit"
  train_output: bool = False
  active_capacity: int | None = None
  candidate_capacity: int | None = None
  index_delta: float = 0.25
  gram: str = "precomputed"
  index: str = "auto"
  update: str = "auto"
  layout: str = "auto"
  init_chunk: int = 256

  def __post_init__(self):
    checks.check_positive_int("width", self.width)
    if self.threshold is not None:
      if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
        raise TypeError(
            f"threshold must be a Python float or None, got {type(self.threshold).__name__}; "
            "to sweep over thresholds pass them to kronjax.init(..., threshold=b) instead.")
      if not math.isfinite(self.threshold):
        raise ValueError(f"threshold must be finite, got {self.threshold}.")
      object.__setattr__(self, "threshold", float(self.threshold))
    else:
      object.__setattr__(self, "threshold", default_threshold(self.width))
    checks.check_choice("loss", self.loss, LOSSES)
    checks.check_positive_int("num_classes", self.num_classes, minimum=2 if self.loss == "softmax" else 1)
    checks.check_choice("init", self.init, INITS)
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
    checks.check_choice("index", self.index, INDEX_KINDS)
    checks.check_choice("update", self.update, UPDATES)
    checks.check_choice("layout", self.layout, LAYOUTS)
    if self.layout == "points" and self.update == "sparse":
      raise ValueError(
          "layout='points' stores P point-major, which only the dense update path uses, but "
          "update='sparse' was asked for; use layout='neurons' (or 'auto') with the sparse path, "
          "or update='dense' (or 'auto') with layout='points'.")
    if self.layout == "points" and self.index == "bucketed":
      raise ValueError(
          "layout='points' runs the dense update path, which needs no threshold index, so "
          "index='bucketed' would only cost time; use index='auto' or 'dense' with it.")
    checks.check_positive_int("init_chunk", self.init_chunk)

  @property
  def resolved_layout(self) -> str:
    """``"neurons"`` or ``"points"``: the layout ``layout="auto"`` stands for."""
    if self.layout != "auto":
      return self.layout
    return "points" if self.update == "dense" and self.index != "bucketed" else "neurons"

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

    Every other field keeps its resolved value, derived ones included: a copy with
    a new ``width`` or ``threshold`` keeps the old capacities unless they are given.
    """
    return Config.from_dict({**dataclasses.asdict(self), **changes})
