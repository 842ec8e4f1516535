"""Smoke run of experiments/bench_contention.py: every setting timed quiet and beside a busy
process, the JSON's schema, and the busy process gone afterwards."""

import json
import pathlib

from kronjax._src.kernels import native
from kronjax.experiments import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
  return runner.load_module(ROOT / "experiments" / "bench_contention.py")


def test_busy_process_spins_and_is_gone_after():
  bench = _bench()
  with bench.busy_process() as proc:
    assert proc.poll() is None
    bench._set_busy(proc, True)
    bench._set_busy(proc, False)
  assert proc.poll() is not None


def test_bench_contention_smoke_writes_every_setting(tmp_path):
  out = tmp_path / "contention.json"
  res = _bench().main(["--smoke", "--out", str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk["command"].endswith(f"--smoke --out {out}")
  assert "environment" in on_disk and "date" in on_disk
  settings = set(res["settings"])
  assert "auto" in settings
  if native.available(warn=False):
    threads = {res["pool_threads"], 1}
    assert settings == {"auto", "points/blas"} | {f"{layout}/{t}" for layout in ("points", "neurons")
                                                  for t in threads}
    assert res["auto_runs_as"] == f"neurons/{res['pool_threads']}"  # Plan(): neuron-major P
    assert res["blas_split"] is True
    assert res["layout"]["neurons/1"] == "neurons" and res["layout"]["points/1"] == "points"
  for condition in ("quiet", "busy"):
    assert set(res["median_s"][condition]) == settings
    assert all(t > 0 for t in res["median_s"][condition].values())
    assert set(res["cpu_s_per_step"][condition]) == settings
    assert res["best_explicit"][condition] in settings - {"auto"}
    assert res["auto_over_best"][condition] > 0
  assert set(res["busy_over_quiet"]) == settings
  assert res["auto_runs_as"] in settings | {None}
  assert set(res["update_path"].values()) == {"full"}
