"""The README's quick start runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs_and_learns(capsys):
  blocks = _python_blocks()
  assert blocks, "README has no python block"
  quick_start = blocks[0]
  assert len(quick_start.strip().splitlines()) <= 16
  namespace = {}
  exec(compile(quick_start, str(README), "exec"), namespace)
  out = capsys.readouterr().out
  assert "held-out loss" in out
  metrics, history = namespace["metrics"], namespace["history"]
  assert float(metrics["train_loss"]) < 0.5 * float(np.mean(history["loss"][:20]))
  assert np.isfinite(float(metrics["eval_loss"]))
