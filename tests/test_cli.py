"""The `kronjax` command and the config framework: errors exit 2 in one line; run, list, resume;
where the experiment modules are found; the layer's imports and packaging."""

import ast
import dataclasses
import importlib.metadata
import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time
import tomllib
import typing

import jax
import numpy as np
import pytest

import kronjax
from kronjax import checkpoint
from kronjax.experiments import cli
from kronjax.experiments import runner as xp

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
CLI = [sys.executable, "-m", "kronjax.experiments.cli"]


@pytest.fixture(autouse=True)
def _no_experiments_override(monkeypatch):
  """Tests choose where experiments are found; a KRONJAX_EXPERIMENTS from outside must not."""
  monkeypatch.delenv(xp.ENV_VAR, raising=False)


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
    (["run", "{good}", "--set", "params.active_capacity=64"],
     r"'active_capacity' is not a params key: it says how the step runs.*\[plan\] table"),
    (["run", "{good}", "--set", "smoke.update=full"], r"not a smoke key.*--set plan.update="),
    (["run", "{good}", "--set", "plan.updat=full"], "Unknown plan key 'updat'. Did you mean 'update'"),
    (["run", "{good}", "--set", "plan.width=3"], "Unknown plan key 'width'"),
    (["run", "{good}", "--set", "plan.active_capacity=\"x\""],
     "plan.active_capacity must be int, got 'x'"),
    (["run", "{good}", "--set", "plan.index=dense"], "plan: .*index"),
    (["run", "{good}", "--set", "plan.layout=points", "--set", "plan.update=sparse"],
     "plan: layout='points'"),
    (["run", "{bad_toml}"], "invalid TOML"),
    (["run", "--resume", "{tmp}"], "not a kronjax run directory"),
    (["run", "{good}", "--resume", "{tmp}"], "takes no CONFIG"),
    (["run"], "give a CONFIG"),
    (["run", "{good}", "--bogus"], "unrecognized arguments"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, match):
  monkeypatch.setenv(xp.ENV_VAR, str(EXPERIMENTS))  # the configs below live in tmp_path
  good = _write(tmp_path, GOOD)
  bad_toml = _write(tmp_path, "[experiment\nname=", "bad.toml")
  argv = [a.format(tmp=tmp_path, good=good, bad_toml=bad_toml) for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("kronjax: error: ") and err.count("\n") == 1, err
  assert re.search(match, err), err


def test_error_from_the_installed_command_has_no_traceback(tmp_path):
  good = _write(tmp_path, GOOD)
  proc = subprocess.run([*CLI, "run", good, "--set", "params.withd=1"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "Did you mean 'width'" in proc.stderr


def test_version(capsys):
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out == f"kronjax {kronjax.__version__}\n" == "kronjax 0.3.0\n"


def test_version_from_the_command(tmp_path):
  proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, cwd=tmp_path,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout == "kronjax 0.3.0\n", proc.stderr


def test_list_shows_configs_and_experiments(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "configs/quickstart.toml" in out and "quickstart " in out
  for name in ("scaling_d", "convergence"):
    assert name in out


def test_list_gives_every_config_a_description(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert cli.main(["list"]) == 0
  lines = capsys.readouterr().out.splitlines()
  configs = sorted((ROOT / "configs").glob("*.toml"))
  assert configs
  for path in configs:
    line = next((l for l in lines if l.split() and l.split()[0] == f"configs/{path.name}"), None)
    assert line is not None, f"{path.name} not listed"
    _, _, rest = line.partition(" experiment=")
    name, _, description = rest.partition(" ")
    assert name == xp.read_config(path)["experiment"]["name"]
    assert description.strip(), f"configs/{path.name} has no description"


# -- where the experiment modules are found ---------------------------------------------------

_FAKE = '''"""A stand-in experiment."""
import dataclasses



@dataclasses.dataclass(frozen=True)
class Params:
  width: int = 1


def run(params, out_dir, *, progress):
  return {"metrics": {"width": params.width, "where": __file__}, "table": [{"w": params.width}],
          "plots": []}
'''


_FAKE_WITH_PLAN = '''"""An experiment that takes a plan."""
import dataclasses

import kronjax


@dataclasses.dataclass(frozen=True)
class Params:
  width: int = 1


def run(params, out_dir, *, progress, plan: kronjax.Plan | None = None):
  return {"metrics": {"plan": repr(plan)}, "table": [{"w": params.width}], "plots": []}
'''


def _fake_experiments(folder: pathlib.Path, name: str = "quickstart", text: str = _FAKE
                      ) -> pathlib.Path:
  folder.mkdir(parents=True)
  (folder / f"{name}.py").write_text(text)
  return folder


def test_experiments_beside_the_configs_folder_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no ./experiments here
  resolved = xp.resolve(xp.read_config(QUICKSTART), smoke=True, config_path=QUICKSTART)
  assert pathlib.Path(resolved.module.__file__) == EXPERIMENTS / "quickstart.py"
  assert resolved.module.__name__ == xp.MODULE_PREFIX + "quickstart"
  assert "experiments" not in sys.modules  # loaded from its file, not as a package


def test_environment_variable_comes_first(tmp_path, monkeypatch):
  (tmp_path / "a" / "configs").mkdir(parents=True)
  config = _write(tmp_path / "a" / "configs", GOOD)
  beside = _fake_experiments(tmp_path / "a" / "experiments")
  fake = _fake_experiments(tmp_path / "elsewhere")
  monkeypatch.chdir(ROOT)  # ./experiments exists too
  payload = xp.run_config(config, out_dir=tmp_path / "run1", progress=False, echo=False)
  assert payload["metrics"] == {"width": 64, "where": str(beside / "quickstart.py")}
  monkeypatch.setenv(xp.ENV_VAR, str(fake))
  payload = xp.run_config(config, out_dir=tmp_path / "run2", progress=False, echo=False)
  assert payload["metrics"] == {"width": 64, "where": str(fake / "quickstart.py")}
  assert xp.list_experiments() == [{"name": "quickstart", "description": "A stand-in experiment."}]


def test_current_directory_is_the_last_resort(tmp_path, monkeypatch):
  (tmp_path / "a" / "configs").mkdir(parents=True)
  config = _write(tmp_path / "a" / "configs", GOOD)  # no a/experiments beside it
  (tmp_path / "work").mkdir()
  monkeypatch.chdir(tmp_path / "work")
  with pytest.raises(xp.ConfigError, match="no experiments folder found.*KRONJAX_EXPERIMENTS"):
    xp.resolve(xp.read_config(config), config_path=config)
  _fake_experiments(tmp_path / "work" / "experiments")
  resolved = xp.resolve(xp.read_config(config), config_path=config)
  assert resolved.params.width == 64
  assert resolved.module.__file__ == str(tmp_path / "work" / "experiments" / "quickstart.py")


def test_a_missing_environment_folder_is_an_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(xp.ENV_VAR, str(tmp_path / "nope"))
  assert cli.main(["run", QUICKSTART, "--smoke"]) == 2
  assert "KRONJAX_EXPERIMENTS" in capsys.readouterr().err


# -- the [plan] table: how the steps run (kronjax.Plan) ------------------------------------------

_PLANNED = GOOD + '''
[plan]
update = "full"
active_capacity = 32
'''


def test_plan_table_reaches_run_and_is_recorded(tmp_path, monkeypatch):
  monkeypatch.setenv(xp.ENV_VAR, str(_fake_experiments(tmp_path / "x", text=_FAKE_WITH_PLAN)))
  config = _write(tmp_path, _PLANNED)
  payload = xp.run_config(config, overrides=["plan.index_delta=0.5"], out_dir=tmp_path / "run",
                          progress=False, echo=False)
  plan = kronjax.Plan(update="full", active_capacity=32, index_delta=0.5)
  assert payload["metrics"] == {"plan": repr(plan)}
  on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
  assert on_disk["config"]["plan"] == dataclasses.asdict(plan)
  assert on_disk["config"]["params"] == {"width": 64}
  # No [plan] table: the automatic plan, recorded in full.
  payload = xp.run_config(_write(tmp_path, GOOD, "d.toml"), out_dir=tmp_path / "auto",
                          progress=False, echo=False)
  assert payload["metrics"] == {"plan": repr(kronjax.Plan())}
  assert payload["config"]["plan"] == dataclasses.asdict(kronjax.Plan())


def test_plan_table_refused_by_an_experiment_that_takes_none(tmp_path, monkeypatch):
  monkeypatch.setenv(xp.ENV_VAR, str(_fake_experiments(tmp_path / "x")))
  with pytest.raises(xp.ConfigError, match=r"takes no \[plan\].*update, active_capacity"):
    xp.resolve(xp.read_config(_write(tmp_path, _PLANNED)))
  resolved = xp.resolve(xp.read_config(_write(tmp_path, GOOD, "d.toml")))
  assert resolved.plan is None and resolved.config["plan"] is None


def test_every_experiment_takes_a_plan():
  for name in xp.experiment_names(EXPERIMENTS):
    module = xp.import_experiment(name, EXPERIMENTS)
    assert xp.takes_plan(module), name


def test_plan_of_a_smoke_run():
  resolved = xp.resolve(xp.read_config(QUICKSTART), smoke=True, config_path=QUICKSTART,
                        overrides=["plan.layout=neurons", "plan.init_chunk=64"])
  assert resolved.plan == kronjax.Plan(layout="neurons", init_chunk=64)
  state, _, _ = resolved.module.make_problem(resolved.params, resolved.plan)
  assert state.plan == resolved.plan and state.layout == "neurons"


def test_unknown_experiment_lists_the_folder(tmp_path, monkeypatch):
  monkeypatch.setenv(xp.ENV_VAR, str(EXPERIMENTS))
  with pytest.raises(xp.ConfigError, match="Did you mean 'sparsity'.*Available experiments in"):
    xp.resolve({"experiment": {"name": "sparsty"}})


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return names


def test_experiment_layer_uses_the_public_api_only():
  layer = sorted((ROOT / "kronjax" / "experiments").glob("*.py"))
  modules = [EXPERIMENTS / f"{name}.py" for name in xp.experiment_names(EXPERIMENTS)]
  assert len(layer) >= 5 and len(modules) >= 8
  for path in layer + modules:
    private = sorted(n for n in _imports(path) if n.startswith("kronjax._src") or n == "kronjax._src")
    assert not private, f"{path.relative_to(ROOT)} imports {private}"


def test_installed_distribution_has_no_top_level_experiments_package(tmp_path):
  # What pyproject packages: every package it finds is kronjax or under it.
  setuptools = pytest.importorskip("setuptools")
  find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
  finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
  found = finder(str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
  assert found and all(p == "kronjax" or p.startswith("kronjax.") for p in found), found
  # What is installed (the distributions with a RECORD: not a source tree's egg-info): no
  # installed file, no editable mapping and no top-level name is `experiments`.
  installed = [d for d in importlib.metadata.distributions(name="kronjax") if d.read_text("RECORD")]
  assert installed
  for dist in installed:
    files = dist.files or []
    assert "experiments" not in {f.parts[0] for f in files}
    for f in files:
      if f.name.startswith("__editable__") and f.suffix == ".py":
        mapping = ast.literal_eval(re.search(r"MAPPING[^=]*=\s*(\{[^}]*\})", f.read_text()).group(1))
        assert "kronjax" in mapping and "experiments" not in mapping, mapping
    assert "experiments" not in (dist.read_text("top_level.txt") or "").split()
  # And a fresh interpreter outside the checkout cannot import it.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", "import importlib.util; "
                         "print(importlib.util.find_spec('experiments'))"],
                        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr


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
  """The newest checkpoint of a quickstart run: (step, state leaves by path, history)."""
  resolved = xp.resolve(xp.read_config(QUICKSTART), overrides=_SMALL[3::2], smoke=True,
                        config_path=QUICKSTART)
  like, _, _ = resolved.module.make_problem(resolved.params, resolved.plan)
  ckpt = out / "checkpoints"
  state, meta = checkpoint.load(ckpt, like=like)
  leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  return checkpoint.latest_step(ckpt), leaves, meta["history"]


def _kronjax(args, cache, cwd=ROOT):
  # A shared persistent compilation cache: the resumed run compiles nothing new.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(xp.ENV_VAR, None)
  return subprocess.Popen([*CLI, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)


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

  # Resumed from another directory: run_config.json leads back to the experiments.
  resumed_proc = _kronjax(["run", "--resume", str(killed), "--no-progress"], cache, cwd=tmp_path)
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
  np.testing.assert_array_equal(hist_a["eval_step"], hist_b["eval_step"])
  for k in ("loss", "active"):
    np.testing.assert_array_equal(hist_a["values"][k], hist_b["values"][k])
  np.testing.assert_array_equal(hist_a["eval_values"]["eval_loss"], hist_b["eval_values"]["eval_loss"])
  res = json.loads((killed / "results.json").read_text())
  assert res["metrics"]["resumed_from_step"] == killed_at
  assert res["config"]["params"] == json.loads((full / "results.json").read_text())["config"]["params"]


def test_resume_refuses_a_corrupt_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["run", QUICKSTART, "--out", str(out), *_SMALL, "--set", "params.epochs=2"]) == 0
  last = checkpoint.checkpoint_path(out / "checkpoints", checkpoint.latest_step(out / "checkpoints"))
  manifest = last / "manifest" / "manifest.json"
  manifest.write_bytes(manifest.read_bytes()[:100])
  capsys.readouterr()
  assert cli.main(["run", "--resume", str(out)]) == 2
  err = capsys.readouterr().err
  assert "corrupt" in err and err.count("\n") == 1
