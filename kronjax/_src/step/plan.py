"""``Plan``: how the training step runs, apart from what the network is (``Config``).

Capacities, the threshold index kind, the update path, the storage layout of ``P``
and chunk sizes change how fast a step runs and how much memory it takes, never
which numbers it computes (beyond float rounding order). A plan may change between
runs and on resume (``kronjax.with_plan``) without touching the network's identity.

Every field defaults to ``"auto"`` or None (derived); ``resolve(config)`` fills
them in from the network. A state holds the plan as given and resolves it when a
step is traced (both are static and hashable).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from kronjax._src.base import checks
from kronjax._src.model.config import Config, gaussian_tail

INDEX_KINDS = ("auto", "scan", "bucketed")
UPDATES = ("auto", "sparse", "full")
LAYOUTS = ("auto", "neurons", "points")

def default_active_capacity(width: int, threshold: float) -> int:
  """Room for the active neurons of one point: twice the mean plus 8 sigma, rounded to 8.

  At Gaussian init with unit-norm points the count is Binomial(m, Q(b)); training
  can raise it, and ``fit`` grows the capacity (replay) when it is exceeded.
  """
  mean = width * gaussian_tail(threshold)
  cap = int(math.ceil(2.0 * mean + 8.0 * math.sqrt(mean) + 16))
  return min(width, -(-cap // 8) * 8)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the step runs (hashable). Fields left ``"auto"`` / None are derived by ``resolve``.

  Attributes:
    active_capacity: static room ``K_cap`` for active neurons per point (sparse
      path); None derives it from the width and threshold.
    candidate_capacity: room per point in the bucketed index; None derives it.
    index_delta: value margin of the bucketed index (candidates are neurons
      above ``b - index_delta`` at the last rebuild).
    index: threshold index kind: ``"auto"`` (``"scan"``), ``"scan"`` (the
      reference scan of ``P[:, S] > b``) or ``"bucketed"``.
    update: P-update path: ``"auto"``, ``"sparse"`` (touched rows only) or
      ``"full"`` (one ``(m, B) @ (B, n)`` product over every neuron); see
      ``update_path``.
    layout: how ``P`` is stored (``state.P`` is the ``(m, n)`` view either way):
      ``"neurons"`` (``(m, n)``: a neuron's row is contiguous, what the sparse
      path's row updates need; both paths run on it), ``"points"`` (``(n, m)``: a
      batch's columns are contiguous rows; full path only) or ``"auto"``
      (``"neurons"``; see ``resolve``).
    init_chunk: neurons per chunk when drawing ``W0`` explicitly.
  """

  active_capacity: int | None = None
  candidate_capacity: int | None = None
  index_delta: float = 0.25
  index: str = "auto"
  update: str = "auto"
  layout: str = "auto"
  init_chunk: int = 256

  def __post_init__(self):
    for name in ("active_capacity", "candidate_capacity"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, checks.check_positive_int(name, getattr(self, name)))
    if not isinstance(self.index_delta, (int, float)) or isinstance(self.index_delta, bool) \
        or not (math.isfinite(self.index_delta) and self.index_delta > 0):
      raise ValueError(f"index_delta must be a positive finite float, got {self.index_delta!r}.")
    object.__setattr__(self, "index_delta", float(self.index_delta))
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
    object.__setattr__(self, "init_chunk", checks.check_positive_int("init_chunk", self.init_chunk))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Plan":
    """Builds a Plan from a mapping, rejecting unknown keys with the closest match."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        raise ValueError(checks.unknown_key_message("plan key", key, names))
    return cls(**values)

  def replace(self, **changes: Any) -> "Plan":
    """A copy with ``changes`` applied."""
    return Plan.from_dict({**dataclasses.asdict(self), **changes})

  def resolve(self, config: Config) -> "Plan":
    """Every derived field filled in for the network ``config``.

    * capacities: ``default_active_capacity`` at ``b`` (active) and
      ``b - index_delta`` (candidates), at most ``width``;
    * ``layout="auto"``: ``"neurons"``. Both update paths run on neuron-major
      ``P``, so each step can pick its path by its batch size; and the full path
      on it is as fast as on point-major ``P`` on a quiet machine and faster
      beside a busy process (single-threaded row kernels need no second core;
      the contention and auto benchmarks in the performance page). ``"points"``
      is kept as an explicit choice;
    * ``index="auto"``: ``"scan"`` (the bucketed index does not win the train
      step on CPU: the threshold benchmark in the performance page).

    Raises:
      ValueError: a capacity above ``width``.
    """
    config = config.resolve()
    m, b = config.width, config.threshold
    active = (default_active_capacity(m, b) if self.active_capacity is None
              else self.active_capacity)
    candidate = (default_active_capacity(m, b - self.index_delta)
                 if self.candidate_capacity is None else self.candidate_capacity)
    for name, value in (("active_capacity", active), ("candidate_capacity", candidate)):
      if value > m:
        raise ValueError(
            f"{name} must be in [1, width={m}], got {value}; a point cannot have more active "
            "neurons than the network has.")
    layout = "neurons" if self.layout == "auto" else self.layout
    index = "scan" if layout == "points" or self.index == "auto" else self.index
    return dataclasses.replace(self, active_capacity=active, candidate_capacity=candidate,
                               layout=layout, index=index)

  def update_path(self, config: Config, batch_size: int) -> str:
    """The update path a step on ``batch_size`` points runs: ``"sparse"`` or ``"full"``.

    * ``layout="points"``: ``"full"``, the only path that reads point-major ``P``;
    * ``update`` given: that one;
    * ``"auto"``: ``"sparse"`` while the rows a step may touch, ``B * active_capacity``,
      stay under a third of ``width``, else ``"full"``: the sparse path updates
      ``T <= B K_cap`` rows of ``n`` through a sorted unique row scatter, which
      costs about twice a full row per row on CPU, and the full path pays one
      ``(m, B) @ (B, n)`` product with no index query.
    """
    plan = self.resolve(config)
    if plan.layout == "points":
      return "full"
    if plan.update != "auto":
      return plan.update
    return "full" if 3 * batch_size * plan.active_capacity > config.width else "sparse"
