"""Smoke runs of the scaling_m, sparsity, norms, sweep_grid and digit_pairs experiments.

Each runs its config's ``[smoke]`` scale through the module's ``run`` and checks
the result schema, that the plots are non-empty PNGs, and numbers that must hold
whatever the scale (not accuracies that a smoke run cannot promise).
"""

import dataclasses
import json
import math
import pathlib
import typing

import numpy as np

import kronjax
from kronjax.experiments import runner as experiment

import pytest

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def smoke_params(name: str):
  """The resolved ``Params`` of ``configs/<name>.toml`` at ``--smoke`` scale."""
  config = ROOT / "configs" / f"{name}.toml"
  resolved = experiment.resolve(experiment.read_config(config), smoke=True, config_path=config)
  assert resolved.name == name
  return resolved.module, resolved.params


def run_smoke(name: str, tmp_path: pathlib.Path) -> tuple[typing.Any, dict]:
  """``kronjax run configs/<name>.toml --smoke --out tmp_path``; returns (params, results.json)."""
  _, params = smoke_params(name)
  experiment.run_config(ROOT / "configs" / f"{name}.toml", smoke=True, out_dir=tmp_path,
                        progress=False, echo=False)
  result = json.loads((tmp_path / "results.json").read_text())
  assert set(result) >= {"config", "environment", "metrics", "table", "plots", "timings"}
  assert result["config"]["params"] == json.loads(json.dumps(dataclasses.asdict(params)))
  assert result["config"]["plan"] == dataclasses.asdict(kronjax.Plan())
  assert isinstance(result["metrics"], dict) and result["metrics"]
  assert isinstance(result["table"], list) and result["table"]
  assert all(isinstance(row, dict) for row in result["table"])
  assert result["plots"]
  for plot in result["plots"]:
    data = (tmp_path / plot).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot
  return params, result


def test_scaling_m_smoke(tmp_path):
  params, result = run_smoke("scaling_m", tmp_path)
  rows = result["metrics"]["rows"]
  assert [r["m"] for r in rows] == [2**k for k in range(params.log2_m_min, params.log2_m_max + 1)]
  for r in rows:
    # At Gaussian init the per-point count is Binomial(m, Q(b)) (points nearly orthogonal).
    assert abs(r["active_mean"] - r["expected"]) < 5 * r["sigma_point"] / math.sqrt(params.n) + 1
    assert r["expected"] < r["bound_m45"] < r["m"]
    assert r["active_max"] < r["m"]
    assert r["overflow_steps"] == 0
    assert r["step_ms"] > 0 and r["step_ms_p10"] <= r["step_ms"] <= r["step_ms_p90"]
  assert result["metrics"]["all_below_m45"]


def test_sparsity_smoke(tmp_path):
  params, result = run_smoke("sparsity", tmp_path)
  widths = result["metrics"]["widths"]
  assert [w["m"] for w in widths] == list(params.widths)
  for w in widths:
    probes = w["probes"]
    assert probes[0]["step"] == 0 and probes[-1]["step"] == params.steps
    assert len(w["batch_active_every_step"]) == params.steps
    assert 0 < w["active_init"] < w["m"] and 0 < w["active_final"] < w["m"]
    assert all(math.isfinite(p["loss"]) for p in probes)
    sigma = math.sqrt(w["m_Q_b"])
    assert abs(w["active_init"] - w["m_Q_b"]) < 5 * sigma / math.sqrt(params.n) + 1


def test_norms_smoke(tmp_path):
  params, result = run_smoke("norms", tmp_path)
  runs = result["metrics"]["runs"]
  assert [(r["scale"], r["normalized"]) for r in runs] == (
      [(s, False) for s in params.scales] + [(max(params.scales), True)])
  unit, big, fixed = runs[0], runs[-2], runs[-1]
  assert unit["scale"] == 1.0 and abs(unit["median_sq_norm"] - 1) < 1e-4
  assert abs(big["median_sq_norm"] - big["scale"] ** 2) < 0.05 * big["scale"] ** 2
  # Norm s fires about m Q(b / s) neurons at init: far more than the m Q(b) at unit norm.
  assert big["active_init"] > 3 * unit["active_init"]
  for r in runs:
    tol = 5 * math.sqrt(r["m_Q_b_over_s"]) / math.sqrt(params.n) + 0.15 * r["m_Q_b_over_s"] + 1
    assert abs(r["active_init"] - r["m_Q_b_over_s"]) < tol, r
  # normalize=True on the scaled points is the unit-norm run: same key, same numbers.
  for k in ("median_sq_norm", "active_init", "active_final", "loss_init", "loss_final"):
    assert fixed[k] == pytest.approx(unit[k], rel=1e-4, abs=1e-6), k


def test_sweep_grid_smoke(tmp_path):
  params, result = run_smoke("sweep_grid", tmp_path)
  m = result["metrics"]
  shape = (len(params.thresholds), len(params.learning_rates))
  for key in ("train_loss", "eval_loss", "single_ms_per_step"):
    assert np.asarray(m[key]).shape == shape
  assert m["members"] == shape[0] * shape[1]
  assert m["final_overflowed_members"] == 0
  assert np.all(np.isfinite(m["train_loss"])) and np.all(np.asarray(m["single_ms_per_step"]) > 0)
  assert len(result["table"]) == m["members"]
  # Members differ: a larger learning rate at the same b moves the loss further from init.
  assert np.ptp(np.asarray(m["train_loss"])) > 0


def test_digit_pairs_smoke(tmp_path):
  params, result = run_smoke("digit_pairs", tmp_path)
  m = result["metrics"]
  assert m["d"] == 64 ** params.images_per_input
  assert m["disjoint_images"]
  assert abs(m["train_same_fraction"] - params.same_fraction) < 0.05
  assert abs(m["test_same_fraction"] - params.same_fraction) < 0.05
  for model in m["models"]:
    acc = model["test_accuracy"]
    assert acc is None or 0.0 <= acc <= 1.0
  # Explicit init: kronjax and the dense baseline start from the same W0, see the same
  # batches and compute the same SGD steps, so they predict the same on the test pairs.
  assert m["kronjax"]["init"] == "explicit"
  assert abs(m["kronjax"]["test_loss"] - m["dense"]["test_loss"]) < 1e-4
  assert abs(m["kronjax_minus_dense_test_accuracy"]) <= 2.0 / params.test_inputs
  timed = [r for r in m["models"] if r["seconds_per_epoch"] is not None]
  assert len(timed) == 4 and all(r["seconds_per_epoch"] > 0 for r in timed)


def test_digit_pairs_pairs_balanced_and_disjoint():
  digit_pairs = experiment.import_experiment("digit_pairs", ROOT / "experiments")
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 20)
  idx, y = digit_pairs.sample_inputs(labels, 400, 3, 0.5, rng)
  assert idx.shape == (400, 3) and y.mean() == 0.5
  same = np.array([len(set(labels[r])) == 1 for r in idx])
  np.testing.assert_array_equal(same, y.astype(bool))
  assert all(len(set(r)) == 3 for r in idx)  # never the same image twice in one input
