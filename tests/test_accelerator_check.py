"""`make accelerator-check` (experiments/accelerator_check.py): on a CPU-only machine it says so
and exits 0 quickly; its plan stays within the 8-minute budget."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "accelerator_check.py"


def _module():
  spec = importlib.util.spec_from_file_location("kronjax_accelerator_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="this machine has an accelerator")
def test_cpu_only_machine_prints_one_line_and_exits_0(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "accelerator")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1 and "no accelerator" in lines[0], proc.stdout
  assert not (tmp_path / "accelerator").exists()   # nothing run, nothing written
  assert seconds < 60


def test_plan_runs_the_accelerator_tests_and_benchmarks_within_budget(tmp_path):
  module = _module()
  parts = module.plan(tmp_path)
  assert [p["name"] for p in parts] == ["tests", "bench_step", "bench_sweep", "bench_predict",
                                            "hlo_costs"]
  assert sum(p["limit_s"] for p in parts) <= module.BUDGET_S <= 8 * 60
  tests = parts[0]["cmd"]
  assert "not slow" in tests and all(f in tests for f in module.TEST_FILES)
  for f in module.TEST_FILES:
    assert (ROOT / f).is_file(), f
  for part in parts[1:]:
    assert str(tmp_path) in " ".join(part["cmd"])     # results go under --out
    assert (ROOT / part["cmd"][1]).is_file()
