"""The HLO kernel accounting behind the performance page's accelerator table."""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from kronjax.experiments import hlo
from kronjax.experiments import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _costs(f, *args):
  return hlo.kernel_costs(jax.jit(f).lower(*args).compile().as_text())


def test_one_elementwise_kernel_moves_its_operand_and_result():
  costs = _costs(lambda x: jnp.tanh(x) + 1.0, jnp.ones((1000,), jnp.float32))
  assert costs["kernels"] == 1
  assert costs["bytes"] == 2 * 4000
  assert costs["loops"] == []


def test_a_loop_body_counts_once_per_iteration():
  def body(c, x):
    return c + jnp.tanh(x * c).sum(), None

  def f(xs):
    return jax.lax.scan(body, 1.0, xs)[0]

  k8 = _costs(f, jnp.ones((8, 256), jnp.float32))
  k16 = _costs(f, jnp.ones((16, 256), jnp.float32))
  assert k8["loops"] == [8] and k16["loops"] == [16]
  # Same program but the trip count: the difference is eight more runs of the body.
  body, rest = divmod(k16["kernels"] - k8["kernels"], 8)
  assert rest == 0 and body >= 1
  assert k8["kernels"] >= 8 * body


def test_no_entry_computation_is_refused():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo.kernel_costs("HloModule empty")


@pytest.mark.slow
def test_hlo_costs_smoke(tmp_path):
  script = runner.load_module(ROOT / "experiments" / "hlo_costs.py")
  out = tmp_path / "hlo.json"
  assert script.main(["--smoke", "--out", str(out)]) == 0
  record = json.loads(out.read_text())
  assert {"date", "command", "environment", "model", "results"} <= set(record)
  for r in record["results"]:
    assert r["kernels"] > 0
    assert r["dominant"] in ("kernel launches", "memory traffic")
    if r["plan"]["update"] == "full":  # the full path reads and writes all of P at least once
      assert r["bytes"] >= 2 * r["width"] * r["n"] * 4
