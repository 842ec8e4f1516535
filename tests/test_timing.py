"""The benchmark helpers and a smoke run of the step benchmark (behaviour, never wall time)."""

import json

import jax.numpy as jnp
import pytest

from kronjax import bench


def test_time_steps_interleaved_threads_each_state_through_every_round():
  def add(state, x):
    return state + x, None

  runs = {"one": (add, jnp.zeros(()), [1.0] * 5), "ten": (add, jnp.zeros(()), [10.0] * 5)}
  timings, states = bench.time_steps_interleaved(runs, rounds=3, warmup=2)
  # warm-up steps once, then 3 rounds of the remaining 3 batches
  assert float(states["one"]) == 2 * 1 + 3 * 3 * 1
  assert float(states["ten"]) == 2 * 10 + 3 * 3 * 10
  for t in timings.values():
    assert t["repeats"] == 9 and len(t["round_medians_s"]) == 3
    assert t["p10_s"] <= t["median_s"] <= t["p90_s"]


@pytest.mark.slow
def test_bench_step_smoke_writes_every_section(tmp_path):
  from experiments import bench_step
  out = bench_step.main(["--smoke", "--out", str(tmp_path / "step.json")])
  written = json.loads((tmp_path / "step.json").read_text())
  assert set(written) >= {"environment", "flat_in_d", "floor", "vs_dense", "batch1_paths"}
  assert len(written["floor"]["ratio_per_round"]) == out["floor"]["rounds"]
  assert all(not r["overflow"] for r in written["flat_in_d"]["rows"])


@pytest.mark.slow
def test_bench_sweep_smoke_compiles_once_and_agrees(tmp_path):
  from experiments import bench_sweep
  results = bench_sweep.main(["--smoke", "--out", str(tmp_path / "sweep.json")])
  assert json.loads((tmp_path / "sweep.json").read_text())["results"]
  for r in results:
    assert r["sweep_compilations"] == 1 and not r["overflow_seen"]
    assert r["max_abs_diff_sweep_vs_sequential_P"] < 1e-4   # same members, same batches
    assert r["update_floor"]["median_s"] > 0
    # sweep.fit and kronjax.fit per member: the same batches, the same end
    assert r["runs"]["max_abs_diff_P"] < 1e-4 and r["runs"]["ratio_sweep_fit_vs_sequential_fits"] > 0
