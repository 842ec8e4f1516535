"""Smoke run of experiments/bench_pairwise.py: the JSON's schema and consistent, positive numbers
(behaviour, never wall time)."""

import json
import math
import pathlib

import pytest

from kronjax.experiments import runner

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, once_per_run):
  bench = runner.load_module(ROOT / "experiments" / "bench_pairwise.py")

  def run():
    out = tmp_path_factory.mktemp("pairwise") / "pairwise_smoke.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    return {"out": str(out), "result": json.loads(out.read_text())}
  ran = once_per_run("test_bench_pairwise.smoke", run)
  return bench, ran["result"], ran["out"]


def test_provenance_and_completeness(smoke):
  bench, res, out = smoke
  assert {"date", "command", "environment", "settings", "goals", "summary"} <= set(res)
  assert res["command"] == f"python experiments/bench_pairwise.py --smoke --out {out}"
  assert res["smoke"] is True and res["partial"] is False and res["missing"] == []
  for key in ("init_default_plan", "init_points_layout", "steps", "large", "curve"):
    assert res[key]["completed"] is True, key
    assert res[key]["loadavg_1min_before"] >= 0 and res[key]["loadavg_1min_after"] >= 0
  assert res["goals"] == bench.GOALS


def test_init_no_n_squared_array_and_memory_at_least_the_state(smoke):
  _, res, _ = smoke
  for key, layout in (("init_default_plan", "neurons"), ("init_points_layout", "points")):
    r = res[key]
    n, m = r["n"], r["m"]
    assert r["layout"] == layout and r["init"] == "kronecker"
    assert r["gram_mode"] == "entities" and r["dataset_gram_is_none"] and r["no_n_squared_leaf"]
    assert r["largest_leaf_dataset"]["elements"] < n * n
    assert r["largest_leaf_state"]["elements"] == n * m < n * n
    b = r["state_bytes"]
    assert b["P"] == b["A_T"] == 4 * n * m and b["opt_state"] == 0  # plain sgd: no traces
    assert b["P_A_T_opt_state"] == b["P"] + b["A_T"] + b["opt_state"] <= b["all_leaves"]
    assert r["dataset_and_init_s"] > 0 and r["dataset_and_init_compiled_s"] > 0
    assert r["peak_rss_bytes"] >= r["peak_rss_before_bytes"] > 0
    assert r["peak_rss_over_state"] == pytest.approx(r["peak_rss_bytes"] / b["P_A_T_opt_state"])
    assert r["peak_rss_over_state"] >= 1.0  # the state lives in this process
  s = res["summary"]
  assert s["init_s"] == res["init_default_plan"]["dataset_and_init_s"]
  assert s["init_meets_goal"] == (s["init_s"] < res["goals"]["init_s"])


def test_steps_paths_and_floor(smoke):
  _, res, _ = smoke
  st = res["steps"]
  n, m = st["n"], st["m"]
  bw = st["bandwidth"]["bytes_per_s"]
  assert bw > 1e8  # a copy moves at least 100 MB/s
  rows = {r["batch"]: r for r in st["rows"]}
  assert sorted(rows) == [1, 8, 64]
  assert rows[1]["path"] == rows[8]["path"] == "sparse"
  assert rows[64]["path"] == rows[64]["auto_path"]
  for B, r in rows.items():
    rows_touched = r["touched_rows_mean"]
    assert 0 < rows_touched <= m
    if r["path"] == "full" and r["layout"] == "points":
      assert rows_touched == m
    assert r["floor_bytes"] == pytest.approx(2 * rows_touched * n * 4 + B * n * 4)
    assert r["bytes_floor_s"] == pytest.approx(r["floor_bytes"] / bw)
    assert r["flops"] == pytest.approx(2 * rows_touched * B * n)
    assert r["flops_floor_s"] == pytest.approx(r["flops"] / st["gemm"]["flops_per_s"])
    assert r["floor_s"] == max(r["bytes_floor_s"], r["flops_floor_s"])
    assert r["floor_kind"] == ("bytes" if r["floor_s"] == r["bytes_floor_s"] else "flops")
    assert r["over_floor"] == pytest.approx(r["median_s"] / r["floor_s"])
    assert r["median_s"] > 0 and r["over_floor"] > 0.05  # no step beats its floor by 20x


def test_large_and_curve_consistent(smoke):
  _, res, _ = smoke
  lg = res["large"]
  assert lg["path"] == "sparse" and lg["layout"] == "neurons" and lg["batch"] == 1
  assert lg["completed_steps"] == lg["steps"] and lg["dataset_gram_is_none"]
  assert lg["largest_leaf_state"]["elements"] < lg["n"] ** 2
  assert lg["epoch_s"] == pytest.approx(lg["n"] * lg["median_s"])
  assert lg["peak_rss_bytes"] >= lg["state_bytes"]["P_A_T_opt_state"]

  cv = res["curve"]
  B = cv["batch"]
  ns = [r["n"] for r in cv["rows"]]
  assert ns == sorted(ns) and len(ns) >= 3
  for r in cv["rows"]:
    assert r["sparse"]["path"] == "sparse" and r["full"]["path"] == "full"
    for path in ("sparse", "full"):
      assert r[path]["median_s"] > 0
      assert r[path]["epoch_s"] == pytest.approx(r["n"] / B * r[path]["median_s"])
    assert r["best_median_s"] == min(r["sparse"]["median_s"], r["full"]["median_s"])
  dense = res["crossing"]["dense"]
  assert len(dense) == 2
  for key, v in dense.items():
    assert v["d"] == int(key) and v["median_s"] > 0
    for n in ns:
      assert v["epoch_s"][str(n)] == pytest.approx(n / B * v["median_s"])
    c = v["crossing"]
    assert c["n"] is None or (isinstance(c["n"], float) and math.isfinite(c["n"]))
    assert v["count_model_crossing_n"] == pytest.approx(
        3 * cv["m"] * v["d"] * B / res["crossing"]["touched_rows_mean"])
  measured = [v for v in dense.values() if v["measured"]]
  assert measured and measured[0]["d"] == res["settings"]["d"]


def test_crossing_interpolates_and_extrapolates():
  bench = runner.load_module(ROOT / "experiments" / "bench_pairwise.py")
  inside = bench.crossing([100, 200, 400], [1.0, 2.0, 4.0], 3.0)
  assert inside == {"n": pytest.approx(300.0), "extrapolated": False}
  beyond = bench.crossing([100, 200, 400], [1.0, 2.0, 4.0], 8.0)
  assert beyond["extrapolated"] and beyond["n"] == pytest.approx(800.0)
  below = bench.crossing([100, 200, 400], [1.0, 2.0, 4.0], -1.0)
  assert below["n"] is None
