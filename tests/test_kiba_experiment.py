"""The KIBA experiment at smoke scale, on the DeepDTA-format fixture kept with the tests.

Checks the result schema, that kronjax, KronRLS and the published rows are all in the table,
that the sweep's rows cover every member and epoch, and that the metrics are finite.
"""

import json
import math
import pathlib

import pytest

from kronjax.experiments import runner as experiment

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kiba_smoke(tmp_path, monkeypatch):
  pytest.importorskip("rdkit")
  monkeypatch.chdir(ROOT)   # the smoke config names the fixture relative to the checkout
  config = ROOT / "configs" / "kiba.toml"
  experiment.run_config(config, smoke=True, out_dir=tmp_path, progress=False, echo=False)
  result = json.loads((tmp_path / "results.json").read_text())
  methods = [row["method"] for row in result["table"]]
  assert methods[0].startswith("kronjax") and methods[1].startswith("KronRLS")
  assert sum("published" in m for m in methods) == 3
  m = result["metrics"]
  for learner in ("kronjax", "kronrls"):
    assert math.isfinite(m[learner]["mse"]) and 0.0 <= m[learner]["ci"] <= 1.0
  params = result["config"]["params"]
  members = len(params["learning_rates"]) * len(params["thresholds"])
  assert len(m["sweep"]) == members * params["tune_epochs"]
  assert m["kronjax"]["chosen"] in m["sweep"]
  # The ridge grid is extended until the chosen lambda has a tried value on either side.
  lams = sorted(r["lambda"] for r in m["ridge_tuning"])
  chosen = [r for r in m["ridge_tuning"] if r["lambda"] == m["kronrls"]["lambda"]]
  assert len(chosen) == 1 and chosen[0]["at_edge"] == (chosen[0]["lambda"] in (lams[0], lams[-1]))
  assert chosen[0]["at_edge"] or lams[0] < chosen[0]["lambda"] < lams[-1]
  assert (tmp_path / result["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
