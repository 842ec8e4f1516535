"""Smoke run of the init_law experiment (configs/init_law.toml at ``--smoke`` scale).

Checks the result schema and the PNG, and numbers that hold at any scale: the
measured excess kurtosis of ``<w, x>`` follows ``(3^p - 3) / R`` (0 for the
Gaussian init), the Gaussian init fires ``m Q(b)`` times per point on average,
and every training run ran its steps from the same batches with finite losses.
"""

import dataclasses
import json
import math
import pathlib

import pytest

from kronjax.experiments import runner as experiment

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "init_law.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_init_law_smoke(tmp_path):
  resolved = experiment.resolve(experiment.read_config(CONFIG), smoke=True, config_path=CONFIG)
  assert resolved.name == "init_law"
  params = resolved.params
  experiment.run_config(CONFIG, smoke=True, out_dir=tmp_path, progress=False, echo=False)
  result = json.loads((tmp_path / "results.json").read_text())
  assert set(result) >= {"config", "environment", "metrics", "table", "plots", "timings"}
  assert result["config"]["params"] == json.loads(json.dumps(dataclasses.asdict(params)))
  assert result["plots"] == ["init_law.png"]
  png = (tmp_path / "init_law.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 1000

  m = result["metrics"]
  law = m["law"]
  assert len(law) == 2 * len(params.widths) * (len(params.ranks) + 1)
  for row in law:
    assert row["Q_b"] == 0.5 * math.erfc(row["b"] / math.sqrt(2.0))
    assert abs(row["second_moment"] - 1.0) < 0.2  # unit-norm points: E<w, x>^2 = 1 for every law
    expected = 0.0 if row["init"] == "explicit" else (3 ** row["p"] - 3) / row["init_rank"]
    assert row["excess_kurtosis_theory"] == expected
    # The sample kurtosis of m * n draws: loose bounds (heavy tails at R = 1, p = 3).
    assert abs(row["excess_kurtosis"] - expected) < 0.5 + 0.5 * expected, row
    if row["init"] == "explicit":  # the Gaussian law: m Q(b) active per point on average
      assert abs(row["ratio"] - 1.0) < 5 * row["ratio_se"] + 0.05, row
    assert 0 < row["active_mean"] < row["m"]

  for task in ("planted", "digits"):
    curves = m[task]["curves"]
    assert list(curves) == ["explicit"] + [f"kronecker_R{r}" for r in params.train_ranks]
    assert len({c["steps"] for c in curves.values()}) == 1
    for c in curves.values():
      assert c["eval_step"][0] == 0 and c["eval_step"][-1] == c["steps"]
      assert len(c["seeds"]) == params.init_seeds
      for s in c["seeds"]:
        assert len(s["eval_loss"]) == len(c["eval_step"])
        assert all(math.isfinite(v) for v in s["train_loss"] + s["eval_loss"])
        assert s["stopped"] is None
    # Same key: the kronecker runs start from the same a and batches but another W0.
    kron = curves[f"kronecker_R{params.train_ranks[0]}"]
    assert kron["seeds"][0]["train_loss"][0] != curves["explicit"]["seeds"][0]["train_loss"][0]
    summary = m[task]["summary"]
    assert summary["explicit"]["eval_loss_minus_explicit_mean"] == 0.0
  for c in m["digits"]["curves"].values():
    assert all(0.0 <= v <= 1.0 for s in c["seeds"] for v in s["eval_accuracy"])
