"""Smoke scale of the quickstart, scaling_d and convergence experiments: schema, PNGs, sane numbers."""

import dataclasses
import json
import math
import pathlib

import pytest

import kronjax
from kronjax.experiments import runner as xp

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _smoke(name, tmp_path, *overrides):
  out = tmp_path / name
  payload = xp.run_config(ROOT / "configs" / f"{name}.toml", smoke=True, out_dir=out,
                          progress=False, overrides=list(overrides), echo=False)
  on_disk = json.loads((out / "results.json").read_text())
  assert set(on_disk) == {"date", "command", "config", "environment", "metrics", "timings", "plots",
                          "table"}
  assert on_disk["config"]["experiment"]["name"] == name and on_disk["config"]["smoke"] is True
  assert on_disk["config"]["plan"] == dataclasses.asdict(kronjax.Plan())  # no [plan]: automatic
  assert {"jax", "backend", "device"} <= set(on_disk["environment"])
  assert on_disk["command"].startswith("kronjax run ") and on_disk["command"].endswith(
      f" --smoke --out {out}") and all(f"--set {o}" in on_disk["command"] for o in overrides)
  assert on_disk["table"] and all(isinstance(row, dict) for row in on_disk["table"])
  assert on_disk["plots"]
  for plot in on_disk["plots"]:
    blob = (out / plot).read_bytes()
    assert blob.startswith(PNG_MAGIC) and len(blob) > 1000
  assert on_disk["metrics"] == json.loads(json.dumps(xp.to_jsonable(payload["metrics"])))
  return on_disk


def test_quickstart_smoke(tmp_path):
  res = _smoke("quickstart", tmp_path)
  m, t = res["metrics"], res["timings"]
  assert m["steps"] == 4 * (64 // 8) and m["d"] == 256
  assert m["train_loss_end"] < m["train_loss_start"]
  assert 0 < m["active_mean"] <= m["width"]
  assert m["dense_weight_bytes"] == 128 * 256 * 4
  assert m["dense_step_s_extrapolated"] > 0 and t["step"]["median_s"] > 0
  assert {"quantity", "value"} == set(res["table"][0])
  assert (tmp_path / "quickstart" / "checkpoints").is_dir()


def test_scaling_d_smoke(tmp_path):
  res = _smoke("scaling_d", tmp_path)
  m = res["metrics"]
  assert m["log2_d"] == [4, 6] and len(m["kronjax_ms"]) == 2
  assert all(x > 0 for x in m["kronjax_ms"])
  assert m["dense_ms"][0] > 0 and m["dense_ms"][1] is None  # skipped above the memory cap
  assert m["dense_skipped_log2_d"] == [6] and m["dense_largest_log2_d"] == 4
  assert m["init_explicit_ms"][1] is None and all(x > 0 for x in m["init_implicit_ms"])
  assert "skipped" in res["table"][1]["dense ms/step"]


def test_convergence_smoke_explicit_sits_on_dense(tmp_path):
  res = _smoke("convergence", tmp_path)
  m = res["metrics"]
  assert m["max_abs_diff_explicit_vs_dense_all"] < 1e-4  # float32
  curves = m["curves"]
  for name in ("explicit", "implicit", "kronecker"):
    assert curves[name]["eval_step"] == curves["dense"]["eval_step"]
  for name in ("dense", "explicit", "implicit", "kronecker"):
    assert all(math.isfinite(x) for x in curves[name]["batch_loss"])
    assert m["final"][name]["train_loss"] < m["start"][name]["train_loss"]
  assert [row["run"] for row in res["table"]] == ["dense baseline", "kronjax explicit init",
                                                  "kronjax implicit init", "kronjax kronecker init"]


def test_run_contract_is_checked(tmp_path):
  with pytest.raises(TypeError, match="must return 'plots'"):
    xp.check_result({"metrics": {}, "table": []}, tmp_path, "x")
  with pytest.raises(TypeError, match="not a file"):
    xp.check_result({"metrics": {}, "table": [], "plots": ["nope.png"]}, tmp_path, "x")
  with pytest.raises(TypeError, match="Did you mean 'timings'"):
    xp.check_result({"metrics": {}, "table": [], "plots": [], "timing": {}}, tmp_path, "x")
