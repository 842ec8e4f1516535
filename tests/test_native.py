"""kronjax.native: the build-on-first-use CPU kernel, its modes and its fallback.

The kernel's arithmetic is tested against ``X + G @ R`` in test_products.py and,
inside training, in test_train.py and test_sweep.py. Here: the environment
switches, the build cache, and what happens when the build fails. The module
keeps one load result per process, so the failure cases swap it for a fresh one
(``monkeypatch`` puts the real one back).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import kronjax
from kronjax._src import native, products

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """A process state with nothing loaded yet and an empty cache directory."""
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("KRONJAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("", "auto"), ("OFF", "off"),
                                        ("0", "off"), ("require", "require"), ("1", "require")])
def test_mode_reads_the_environment(monkeypatch, value, want):
  monkeypatch.setenv("KRONJAX_NATIVE", value)
  assert native.mode() == want


def test_bad_mode_names_the_variable(monkeypatch):
  monkeypatch.setenv("KRONJAX_NATIVE", "fast")
  with pytest.raises(ValueError, match=r"KRONJAX_NATIVE must be one of .*'fast'"):
    native.mode()


def test_off_never_builds_and_does_not_warn(fresh, monkeypatch, recwarn):
  monkeypatch.setenv("KRONJAX_NATIVE", "off")
  assert not native.available()
  assert native.info() == {"mode": "off", "available": False, "library": None,
                           "reason": "KRONJAX_NATIVE=off"}
  assert not (fresh / "cache").exists() and not recwarn.list


def test_failed_build_warns_once_and_falls_back_to_xla(fresh, monkeypatch):
  monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
  with pytest.warns(RuntimeWarning, match="native CPU kernel unavailable.*KRONJAX_NATIVE=off"):
    assert not native.available()
  assert "no-such-compiler" in native.info()["reason"]
  X, G, R = jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2))
  fn = jax.vmap(products.add_product, in_axes=(0, 0, None))
  hlo = jax.jit(fn).lower(X[None], G[None], R).as_text()  # no second warning here
  assert "kronjax_add_product" not in hlo
  assert float(jnp.max(jnp.abs(fn(X[None], G[None], R)[0] - (X + G @ R)))) == 0.0


def test_require_raises_when_the_build_fails(fresh, monkeypatch):
  monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
  monkeypatch.setenv("KRONJAX_NATIVE", "require")
  with pytest.raises(RuntimeError, match="KRONJAX_NATIVE=require but the native kernel"):
    native.available()


def test_compiler_errors_are_reported(fresh, monkeypatch):
  fake = fresh / "fake-cxx"
  fake.write_text("#!/bin/sh\necho 'fake-cxx: broken on purpose' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  with pytest.warns(RuntimeWarning):
    native.available()
  assert "broken on purpose" in native.info()["reason"]
  assert list((fresh / "cache").iterdir()) == []  # no half-written library left behind


def test_build_is_cached_by_source_and_reused(fresh, monkeypatch):
  if native._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  first = native._build(native._compiler())
  stamp = first.stat().st_mtime_ns
  assert first.parent == fresh / "cache" and first.name.startswith("kronjax_native_")
  assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == stamp


def test_require_mode_trains_in_a_fresh_process(tmp_path):
  """A new process with an empty cache builds the kernel, and a float64 dense
  sweep step with it equals the XLA product's (the CI machine has g++: this is
  the check that the kernel really builds there)."""
  if native._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  script = """
import jax, jax.numpy as jnp, optax
jax.config.update("jax_enable_x64", True)
import kronjax
from kronjax import sweep as sw
data, labels = kronjax.data.planted(jax.random.PRNGKey(0), 40, (4, 6), task="regression")
config = kronjax.Config(width=64, threshold=0.6, update="dense")
members = sw.grid(learning_rate=[0.5, 1.0], seed=[0, 1])
s = sw.init(config, data, labels, members, tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
step = sw.compiled_step()
assert "kronjax_add_product" in step.lower(s.state, jnp.arange(8)).as_text()
state, _ = step(jax.tree.map(jnp.copy, s.state), jnp.arange(8))  # the step donates
kronjax.products.USE_NATIVE = False
jax.clear_caches()
sw._STEP_CACHE.clear()  # compiled under the other setting
assert "kronjax_add_product" not in sw.compiled_step().lower(s.state, jnp.arange(8)).as_text()
ref, _ = sw.compiled_step()(jax.tree.map(jnp.copy, s.state), jnp.arange(8))
err = float(jnp.max(jnp.abs(state.P - ref.P)) / jnp.max(jnp.abs(ref.P)))
print("RESULT", kronjax.native.info()["available"], err)
"""
  env = dict(os.environ, KRONJAX_NATIVE="require", KRONJAX_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  _, available, err = lines[-1].split()
  assert available == "True" and float(err) < 1e-13
  assert len(list((tmp_path / "cache").glob("kronjax_native_*.so"))) == 1
