"""The training loop's record: per-step, evaluation and callback metrics, and the progress bar.

Shapes: S members (1 for a single run), T recorded steps, T_e evaluations,
T_c callback calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

HISTORY_KEYS = ("loss", "active", "max_active", "index_rebuilds")


class History:
  """Per-step metrics ``(S, T)`` and eval metrics ``(S, T_e)``; NaN / -1 for stopped members.

  The per-step values are kept as blocks of rows ``(T_i, S)`` (a chunk of steps
  adds one block), joined when read.
  """

  def __init__(self, members: int):
    self.members = members
    self.step_blocks: list[np.ndarray] = []   # (T_i,) int64: the step counts, a block per add
    self.recorded = 0
    self.values: dict[str, list[np.ndarray]] = {k: [] for k in HISTORY_KEYS}
    self.eval_step: list[int] = []
    self.eval_values: dict[str, list[np.ndarray]] = {}
    self.replays: list[tuple] = []
    # Callback metrics: one entry per callback call (None where a name was not reported).
    self.callback_step: list[int] = []
    self.callback_values: dict[str, list[np.ndarray | None]] = {}

  def add(self, step_no: int, metrics: dict[str, np.ndarray], live: np.ndarray) -> None:
    """Records the metrics ``(S,)`` of the step ending at ``step_no``."""
    self.add_rows(np.array([step_no]), {k: metrics[k][None] for k in HISTORY_KEYS}, live)

  def add_rows(self, step_nos: np.ndarray, metrics: dict[str, np.ndarray],
               live: np.ndarray) -> None:
    """Records several steps at once: ``step_nos`` ``(T,)``, metrics ``(T, S)``."""
    if not len(step_nos):
      return
    self.step_blocks.append(np.asarray(step_nos, np.int64))
    self.recorded += len(step_nos)
    for k in HISTORY_KEYS:
      v = metrics[k].astype(np.float64)
      self.values[k].append(np.where(live, v, np.nan if k in ("loss", "active") else -1))

  def steps(self) -> np.ndarray:
    """The recorded step counts so far, ``(T,)`` int64."""
    if len(self.step_blocks) > 1:   # joined once, as ``rows``
      self.step_blocks[:] = [np.concatenate(self.step_blocks)]
    return self.step_blocks[0] if self.step_blocks else np.zeros((0,), np.int64)

  def last_step(self) -> int | None:
    """The last recorded step count (None before the first)."""
    return int(self.steps()[-1]) if self.recorded else None

  def rows(self, k: str) -> np.ndarray:
    """The per-step values of metric ``k`` so far, ``(T, S)`` float64."""
    blocks = self.values[k]
    if len(blocks) > 1:   # joined once: later reads find one block
      blocks[:] = [np.concatenate(blocks)]
    return blocks[0] if blocks else np.zeros((0, self.members))

  def add_eval(self, step_no: int, values: dict[str, Any], live: np.ndarray) -> None:
    self.eval_step.append(step_no)
    for k, v in values.items():
      self.eval_values.setdefault(k, []).append(
          np.where(live, np.atleast_1d(np.asarray(v, np.float64)), np.nan))

  def add_callback(self, step_no: int, values: dict[str, np.ndarray]) -> None:
    """Records one callback call at ``step_no`` with the metrics the callbacks returned.

    Names reported at some calls only are NaN at the others; a name must keep its shape.
    """
    self.callback_step.append(step_no)
    for name, column in self.callback_values.items():
      value = values.get(name)
      if value is not None:
        _check_same_shape(name, column, value)
      column.append(value)
    for name, value in values.items():
      if name not in self.callback_values:
        self.callback_values[name] = [None] * (len(self.callback_step) - 1) + [value]

  def callback_arrays(self) -> dict[str, np.ndarray]:
    """``{name: (T_c,) + value shape}`` float64, NaN where the name was not reported."""
    out = {}
    for name, column in self.callback_values.items():
      shape = next(np.shape(v) for v in column if v is not None)
      out[name] = np.stack([np.full(shape, np.nan) if v is None else np.asarray(v, np.float64)
                            for v in column])
    return out

  def marks(self) -> tuple[int, int, int, int]:
    """Where the record stands now (the lists only grow): for ``upto``."""
    return self.recorded, len(self.eval_step), len(self.replays), len(self.callback_step)

  def upto(self, marks: tuple[int, int, int, int]) -> "History":
    """The record as it stood at ``marks`` (a copy; this one goes on growing)."""
    t, t_e, r, t_c = marks
    out = History(self.members)
    out.step_blocks, out.recorded = [self.steps()[:t]], t
    out.values = {k: [self.rows(k)[:t]] for k in self.values}
    out.eval_step = self.eval_step[:t_e]
    out.eval_values = {k: v[:t_e] for k, v in self.eval_values.items() if t_e}
    out.replays = self.replays[:r]
    out.callback_step = self.callback_step[:t_c]
    out.callback_values = {k: v[:t_c] for k, v in self.callback_values.items()
                           if any(x is not None for x in v[:t_c])}
    return out

  def result(self, squeeze: bool) -> dict[str, Any]:
    def stacked(rows):
      arr = np.stack(rows, axis=1) if rows else np.zeros((self.members, 0))
      return arr[0] if squeeze else arr

    out: dict[str, Any] = {"step": self.steps().copy()}
    for k in HISTORY_KEYS:
      out[k] = np.array(self.rows(k).T[0] if squeeze else self.rows(k).T)   # a copy, (S, T)
      if k in ("max_active", "index_rebuilds") and squeeze:
        out[k] = out[k].astype(np.int64)
    if self.eval_step:
      out["eval_step"] = np.asarray(self.eval_step, np.int64)
      out.update({k: stacked(v) for k, v in self.eval_values.items()})
    out["replays"] = list(self.replays)
    if self.callback_step:
      out["callback_step"] = np.asarray(self.callback_step, np.int64)
      out["callback"] = self.callback_arrays()
    return out

  def encode(self) -> dict[str, Any]:
    """The history so far as checkpoint metadata (arrays and JSON values)."""
    return {"step": self.steps().copy(),
            "values": {k: self.rows(k).reshape(self.recorded, self.members)
                       for k in self.values},
            "eval_step": np.asarray(self.eval_step, np.int64),
            "eval_values": {k: np.asarray(v).reshape(len(self.eval_step), self.members)
                            for k, v in self.eval_values.items()},
            "replays": [list(r) for r in self.replays],
            "callback_step": np.asarray(self.callback_step, np.int64),
            "callback_values": self.callback_arrays()}

  @classmethod
  def restore(cls, members: int, saved: dict[str, Any]) -> "History":
    out = cls(members)
    if not saved:
      return out
    steps = np.asarray(saved["step"], np.int64).reshape(-1)
    out.step_blocks, out.recorded = [steps], len(steps)
    out.values = {k: [np.asarray(v).reshape(len(steps), members)]
                  for k, v in saved["values"].items()}
    out.eval_step = [int(s) for s in np.asarray(saved["eval_step"])]
    out.eval_values = {k: list(np.asarray(v)) for k, v in saved["eval_values"].items()}
    out.replays = [tuple(r) for r in saved["replays"]]
    # Checkpoints written before callbacks existed hold no callback record.
    out.callback_step = [int(s) for s in np.asarray(saved.get("callback_step", []))]
    out.callback_values = {k: list(np.asarray(v, np.float64))
                           for k, v in saved.get("callback_values", {}).items()}
    return out


def _check_same_shape(name: str, column: list, value: np.ndarray) -> None:
  before = next((v for v in column if v is not None), None)
  if before is not None and np.shape(before) != np.shape(value):
    raise ValueError(f"the callback metric {name!r} changed shape from {np.shape(before)} to "
                     f"{np.shape(value)}; a metric must keep one shape for the whole run.")


class _NoBar:
  def update(self, k):
    pass

  def set_postfix(self, **kw):
    pass

  def write(self, msg):
    print(msg)

  def close(self):
    pass


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
  if not enabled:
    return _NoBar()
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


