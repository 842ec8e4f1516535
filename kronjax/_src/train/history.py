"""The training loop's record: per-step and evaluation metrics, and the progress bar.

Shapes: S members (1 for a single run), T recorded steps, T_e evaluations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

HISTORY_KEYS = ("loss", "active", "max_active", "index_rebuilds")


class History:
  """Per-step metrics ``(S, T)`` and eval metrics ``(S, T_e)``; NaN / -1 for stopped members."""

  def __init__(self, members: int):
    self.members = members
    self.step: list[int] = []
    self.values: dict[str, list[np.ndarray]] = {k: [] for k in HISTORY_KEYS}
    self.eval_step: list[int] = []
    self.eval_values: dict[str, list[np.ndarray]] = {}
    self.replays: list[tuple] = []

  def add(self, step_no: int, metrics: dict[str, np.ndarray], live: np.ndarray) -> None:
    self.step.append(step_no)
    for k in HISTORY_KEYS:
      v = metrics[k].astype(np.float64)
      self.values[k].append(np.where(live, v, np.nan if k in ("loss", "active") else -1))

  def add_eval(self, step_no: int, values: dict[str, Any], live: np.ndarray) -> None:
    self.eval_step.append(step_no)
    for k, v in values.items():
      self.eval_values.setdefault(k, []).append(
          np.where(live, np.atleast_1d(np.asarray(v, np.float64)), np.nan))

  def result(self, squeeze: bool) -> dict[str, Any]:
    def stacked(rows):
      arr = np.stack(rows, axis=1) if rows else np.zeros((self.members, 0))
      return arr[0] if squeeze else arr

    out: dict[str, Any] = {"step": np.asarray(self.step, np.int64)}
    for k in HISTORY_KEYS:
      out[k] = stacked(self.values[k])
      if k in ("max_active", "index_rebuilds") and squeeze:
        out[k] = out[k].astype(np.int64)
    if self.eval_step:
      out["eval_step"] = np.asarray(self.eval_step, np.int64)
      out.update({k: stacked(v) for k, v in self.eval_values.items()})
    out["replays"] = list(self.replays)
    return out

  def encode(self) -> dict[str, Any]:
    """The history so far as checkpoint metadata (arrays and JSON values)."""
    return {"step": np.asarray(self.step, np.int64),
            "values": {k: np.asarray(v).reshape(len(self.step), self.members)
                       for k, v in self.values.items()},
            "eval_step": np.asarray(self.eval_step, np.int64),
            "eval_values": {k: np.asarray(v).reshape(len(self.eval_step), self.members)
                            for k, v in self.eval_values.items()},
            "replays": [list(r) for r in self.replays]}

  @classmethod
  def restore(cls, members: int, saved: dict[str, Any]) -> "History":
    out = cls(members)
    if not saved:
      return out
    out.step = [int(s) for s in np.asarray(saved["step"])]
    out.values = {k: list(np.asarray(v)) for k, v in saved["values"].items()}
    out.eval_step = [int(s) for s in np.asarray(saved["eval_step"])]
    out.eval_values = {k: list(np.asarray(v)) for k, v in saved["eval_values"].items()}
    out.replays = [tuple(r) for r in saved["replays"]]
    return out


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


