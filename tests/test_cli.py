"""The `kronjax` command and the config framework: errors exit 2 in one line; run, list, resume."""

import dataclasses
import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time
import typing

import numpy as np
import pytest

from kronjax import checkpoint
from kronjax import cli
from kronjax import experiment as xp

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _write(tmp_path, text, name="c.toml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


GOOD = """
[experiment]
name = "quickstart"
[params]
width = 64
"""


@pytest.mark.parametrize("argv, match", [
    (["run", "{tmp}/missing.toml"], "not found"),
    (["run", "{good}", "--set", "params.widht=3"], "Did you mean 'width'"),
    (["run", "{good}", "--set", "params.width=\"big\""], "params.width must be an integer"),
    (["run", "{good}", "--set", "params.lr=true"], "params.lr must be a number"),
    (["run", "{good}", "--set", "params.dims=[1, \"a\"]"], r"params.dims\[1\] must be an integer"),
    (["run", "{good}", "--set", "params.width"], "expected section.key=value"),
    (["run", "{good}", "--set", "width=3"], "must be section.key"),
    (["run", "{good}", "--set", "params.width=[1,"], "not a TOML value"),
    (["run", "{good}", "--set", "experiment.name=quickstrat"], "Did you mean 'quickstart'"),
    (["run", "{good}", "--set", "experiment.sede=1"], "Did you mean 'seed'"),
    (["run", "{good}", "--set", "parms.width=1"], "Did you mean 'params'"),
    (["run", "{good}", "--set", "smoke.widht=1"], "Did you mean 'width'"),
    (["run", "{good}", "--set", "params.batch_size=0"], "batch_size must be >= 1"),
    (["run", "{bad_toml}"], "invalid TOML"),
    (["run", "--resume", "{tmp}"], "not a kronjax run directory"),
    (["run", "{good}", "--resume", "{tmp}"], "takes no CONFIG"),
    (["run"], "give a CONFIG"),
    (["run", "{good}", "--bogus"], "unrecognized arguments"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, argv, match):
  good = _write(tmp_path, GOOD)
  bad_toml = _write(tmp_path, "[experiment\nname=", "bad.toml")
  argv = [a.format(tmp=tmp_path, good=good, bad_toml=bad_toml) for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("kronjax: error: ") and err.count("\n") == 1, err
  assert re.search(match, err), err


def test_error_from_the_installed_command_has_no_traceback(tmp_path):
  good = _write(tmp_path, GOOD)
  proc = subprocess.run([sys.executable, "-m", "kronjax.cli", "run", good, "--set", "params.withd=1"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "Did you mean 'width'" in proc.stderr


def test_list_shows_configs_and_experiments(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "configs/quickstart.toml" in out and "quickstart " in out
  for name in ("scaling_d", "convergence"):
    assert name in out


def test_parse_override_values():
  assert xp.parse_override("params.lr=1e-3") == (("params", "lr"), 1e-3)
  assert xp.parse_override("params.dims=[2, 3]") == (("params", "dims"), [2, 3])
  assert xp.parse_override("params.flag=true") == (("params", "flag"), True)
  assert xp.parse_override("params.name=\"a b\"") == (("params", "name"), "a b")
  assert xp.parse_override("params.init=implicit") == (("params", "init"), "implicit")


@dataclasses.dataclass(frozen=True)
class _P:
  n: int
  lr: float = 1.0
  dims: tuple[int, ...] = (2,)
  pair: tuple[int, str] = (1, "a")
  kind: typing.Literal["a", "b"] = "a"
  cap: int | None = None


def test_build_params_types():
  p = xp.build_params(_P, {"n": 3, "lr": 2, "dims": [4, 5], "pair": [2, "b"], "kind": "b", "cap": 7})
  assert p == _P(3, 2.0, (4, 5), (2, "b"), "b", 7) and isinstance(p.lr, float)
  with pytest.raises(xp.ConfigError, match="missing required key"):
    xp.build_params(_P, {})
  with pytest.raises(xp.ConfigError, match="must be one of"):
    xp.build_params(_P, {"n": 1, "kind": "c"})
  with pytest.raises(xp.ConfigError, match="2 entries"):
    xp.build_params(_P, {"n": 1, "pair": [1]})
  with pytest.raises(xp.ConfigError, match="params.n must be an integer"):
    xp.build_params(_P, {"n": 1.5})


def test_smoke_and_set_precedence():
  raw = {"experiment": {"name": "quickstart", "seed": 3},
         "params": {"width": 64, "lr": 1.0}, "smoke": {"width": 32, "lr": 2.0}}
  r = xp.resolve(raw, overrides=["params.lr=5.0"], smoke=True)
  assert (r.params.width, r.params.lr, r.params.seed) == (32, 5.0, 3)
  r = xp.resolve(raw, overrides=["smoke.width=16"], smoke=False)
  assert r.params.width == 64
  with pytest.raises(xp.ConfigError, match="both"):
    xp.resolve(raw, overrides=["params.seed=1"])


# -- the kill / resume test -------------------------------------------------------------------

_SMALL = ["--smoke", "--no-progress", "--set", "params.epochs=12", "--set", "params.checkpoint_every=8",
          "--set", "params.dense_probe_dims=[]", "--set", "params.timing_steps=2",
          "--set", "params.eval_every=8"]


def _final(out):
  ckpt = out / "checkpoints"
  step = checkpoint.latest_step(ckpt)
  with np.load(checkpoint.checkpoint_path(ckpt, step)) as npz:
    manifest = json.loads(bytes(npz["__manifest__"]).decode())
    arrays = {e["path"]: npz[e["name"]] for e in manifest["leaves"]}
    hist = {k: npz[v["__ndarray__"]] for k, v in manifest["metadata"]["history"].items()
            if isinstance(v, dict) and "__ndarray__" in v}
  return step, arrays, hist


def _kronjax(args, cache):
  # A shared persistent compilation cache: the resumed run compiles nothing new.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-m", "kronjax.cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_then_resume_is_bit_for_bit(tmp_path):
  killed, full, cache = tmp_path / "killed", tmp_path / "full", tmp_path / "jax_cache"
  reference = _kronjax(["run", QUICKSTART, "--out", str(full), *_SMALL], cache)
  proc = _kronjax(["run", QUICKSTART, "--out", str(killed), *_SMALL], cache)
  try:
    deadline = time.monotonic() + 120
    while checkpoint.latest_step(killed / "checkpoints") is None:
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = checkpoint.latest_step(killed / "checkpoints")
  assert killed_at < 96 and not (killed / "results.json").exists()  # really interrupted

  resumed_proc = _kronjax(["run", "--resume", str(killed), "--no-progress"], cache)
  assert resumed_proc.wait(timeout=300) == 0, resumed_proc.stderr.read().decode()[-2000:]
  assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
  step_a, resumed, hist_a = _final(killed)
  step_b, uninterrupted, hist_b = _final(full)
  assert step_a == step_b == 96
  for leaf in (".projections", ".A_T", ".a", ".P_eval"):
    np.testing.assert_array_equal(resumed[leaf], uninterrupted[leaf])
  assert resumed.keys() == uninterrupted.keys()
  for k in resumed:  # and everything else: optimizer and index state, step, key
    np.testing.assert_array_equal(resumed[k], uninterrupted[k])
  np.testing.assert_array_equal(hist_a["step"], np.arange(1, 97))  # continuous history
  for k in ("loss", "active", "eval_step", "eval_loss"):
    np.testing.assert_array_equal(hist_a[k], hist_b[k])
  res = json.loads((killed / "results.json").read_text())
  assert res["metrics"]["resumed_from_step"] == killed_at
  assert res["config"]["params"] == json.loads((full / "results.json").read_text())["config"]["params"]


def test_resume_refuses_a_corrupt_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["run", QUICKSTART, "--out", str(out), *_SMALL, "--set", "params.epochs=2"]) == 0
  last = checkpoint.checkpoint_path(out / "checkpoints", checkpoint.latest_step(out / "checkpoints"))
  last.write_bytes(last.read_bytes()[:100])
  capsys.readouterr()
  assert cli.main(["run", "--resume", str(out)]) == 2
  err = capsys.readouterr().err
  assert "corrupt" in err and err.count("\n") == 1
