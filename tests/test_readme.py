"""The README: its quick start runs as written, and every code block is run or says why not.

The README's python blocks are run by the tests: the quick start here, the sweep
example by ``tests/test_sweep.py`` and the neuron-sharded example by
``tests/test_sharding.py`` (on 8 simulated devices). Every other fenced block is
preceded by ``<!-- not-run: REASON -->`` (the rule of ``tests/test_docs.py``).
"""

import pathlib
import re

import numpy as np

from test_docs import check_blocks_marked, fenced_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_blocks():
  return [b["code"] for b in fenced_blocks(README.read_text())
          if b["lang"] == "python" and b["not_run"] is None]


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


def test_every_python_block_is_run_by_a_test():
  """The quick start (here), the sweep (test_sweep.py) and the mesh example (test_sharding.py)."""
  blocks = _python_blocks()
  others = blocks[1:]
  assert len([b for b in others if "kronjax.sweep.init" in b]) == 1
  assert len([b for b in others if "mesh=mesh" in b]) == 1
  assert len(others) == 2, "a new README python block needs a test that runs it"


def test_every_other_block_says_why_it_is_not_run():
  assert not check_blocks_marked(README)


def test_readme_is_short_and_points_to_the_docs():
  text = README.read_text()
  assert len(text.splitlines()) <= 160
  assert "arXiv:2305.08001" in text and "Song" in text
  for target in re.findall(r"\]\((docs/[^)#]+)", text):
    assert (ROOT / target).exists(), target
  assert "<!-- generated: " in text   # numbers come from docs/gen_tables.py
