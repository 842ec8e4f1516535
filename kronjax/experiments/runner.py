"""Config-driven experiments: TOML configs, typed parameters, one results.json per run.

The contract between a config, an experiment module and the ``kronjax run`` CLI:

**Config** (a TOML file, stdlib ``tomllib``)::

    [experiment]
    name = "quickstart"        # module <experiments folder>/<name>.py
    seed = 0                   # optional (default 0): sets Params.seed, if Params has one
    description = "..."        # optional, shown by `kronjax list`

    [params]                   # mapped onto the module's Params (frozen dataclass)
    width = 4096

    [plan]                     # optional: how the steps run (kronjax.Plan), never the numbers
    update = "full"

    [smoke]                    # optional: param overrides applied by `--smoke`
    width = 64

Top-level tables other than these, unknown keys (in any table), values of the
wrong type and missing required params are errors (``ConfigError``, a
``ValueError``) naming the key and, for unknown keys, the closest valid one.
``kronjax run`` turns them into a one-line message and exit status 2.

**Plan.** ``[plan]`` holds fields of ``kronjax.Plan`` (``active_capacity``,
``candidate_capacity``, ``index_delta``, ``index``, ``update``, ``layout``,
``init_chunk``): how the training steps run, which changes their speed and
memory but not what they compute. The experiment receives it as
``run(..., plan=kronjax.Plan(...))`` and passes it to ``kronjax.init`` /
``kronjax.sweep.init``; an experiment whose ``run`` takes no ``plan`` refuses a
non-empty ``[plan]``. A plan field in ``[params]`` or ``[smoke]`` (that the
module's ``Params`` does not define) is refused with a message that names
``[plan]``: a ``Params`` describes the experiment and its network, not how the
step runs.

Overrides: ``--set section.key=value`` with ``value`` a TOML literal (``3``,
``1e-3``, ``true``, ``"text"``, ``[1, 2]``); a bare word (``implicit``) is taken
as a string. The resolved params are, in order of precedence: ``--set
params.*``, then ``[smoke]`` (with ``--smoke``; ``--set smoke.*`` edits it), then
``[params]``, then the ``Params`` defaults.

**Params typing.** Fields of ``Params`` are annotated with ``int``, ``float``
(an int is accepted and converted), ``bool``, ``str``, ``X | None`` (TOML has no
null: only the default can be None), ``tuple[X, ...]`` / ``tuple[X, Y]`` (from
TOML arrays) or ``typing.Literal[...]``. ``Params.__post_init__`` may raise
``ValueError``/``TypeError`` for bad values; they are reported as config errors.

**Module** ``<name>.py`` in the experiments folder (see *Where experiments
live* below) exposes::

    @dataclasses.dataclass(frozen=True)
    class Params: ...

    def run(params: Params, out_dir: pathlib.Path, *, progress: bool[, resume: bool]
            [, plan: kronjax.Plan]) -> dict

``run`` returns ``{"metrics": {...}, "table": [row dicts], "plots": [file names
written into out_dir]}`` and may add ``"timings": {...}`` (medians and spreads
from ``kronjax.experiments.timing``). A module whose ``run`` accepts ``resume``
supports ``kronjax run --resume DIR``: it is called again with ``out_dir=DIR``
and ``resume=True`` and continues from the checkpoints it wrote there: it
passes ``checkpoint_dir=out_dir / CHECKPOINTS``, ``checkpoint_every`` and
``resume`` to ``kronjax.fit``, which restores the newest checkpoint and its
history and ends bit for bit where the uninterrupted run would have.

**Where experiments live.** The experiment modules are plain scripts in an
``experiments/`` folder of the source tree; installing kronjax does not install
them (no top-level ``experiments`` package). The folder is the first that
exists of: ``$KRONJAX_EXPERIMENTS``; ``experiments/`` beside the config file's
folder (``config_path.parent.parent / "experiments"``, i.e. the checkout of
``configs/x.toml``); ``./experiments`` (a ``$KRONJAX_EXPERIMENTS`` that is not a
folder is an error, never passed over). Modules are loaded from their files
(``load_module``), under the module name ``MODULE_PREFIX + name``. A run records
its config file's absolute path in ``run_config.json``, so ``--resume`` finds
the same folder from any working directory.

**Framework** (``run_config``): writes ``out_dir/run_config.json`` (so ``--resume``
can rebuild the run) before calling ``run``, then ``out_dir/results.json`` =
``{date, command, environment, config, metrics, timings, plots, table}`` with
``date``, ``command`` (the equivalent ``kronjax run`` command line) and
``environment`` from ``kronjax.experiments.timing.provenance``, ``config`` the
resolved config (experiment, params after smoke and overrides, ``plan``: every
field of the ``kronjax.Plan`` as given, None when the experiment takes no plan,
the file, the overrides, smoke flag), and prints the table.

Helpers for modules: ``pyplot`` + ``save_figure`` (small PNG), ``format_table``,
``markdown_table``, ``to_jsonable``, ``require_positive`` (Params checks),
``gaussian_tail`` (the firing probability ``Q(b)`` of one neuron at init).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import sys
import time
import tomllib
import types
import typing
from typing import Any, Iterable, Mapping, Sequence

SECTIONS = ("experiment", "params", "plan", "smoke")
EXPERIMENT_KEYS = ("name", "seed", "description")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
FOLDER = "experiments"
ENV_VAR = "KRONJAX_EXPERIMENTS"
MODULE_PREFIX = "kronjax_experiments."
"""Experiment modules are registered in ``sys.modules`` as ``MODULE_PREFIX + name``: they
are loaded from files, never imported as a top-level ``experiments`` package."""


class ConfigError(ValueError):
  """A bad config, override or experiment name: the CLI exits with status 2."""


def unknown_key_message(what: str, key: str, valid: Iterable[str], *,
                        listing: str = "Valid keys") -> str:
  """'Unknown <what> <key>.' with the closest valid key, if any, and the valid ones."""
  valid = sorted(valid)
  close = difflib.get_close_matches(str(key), valid, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"Unknown {what} {key!r}.{hint} {listing}: {', '.join(valid) or '(none)'}."


# ----------------------------------------------------------------------------- configs


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Parses a TOML config file; ``ConfigError`` when missing or not valid TOML."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} not found"
                      + (" (it is a directory)" if path.is_dir() else "")
                      + "; `kronjax list` shows the available configs.")
  try:
    with open(path, "rb") as f:
      return tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
  """``"section.key=value"`` -> ``(("section", "key"), value)`` with value a TOML literal."""
  if "=" not in text:
    raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. params.width=256).")
  lhs, rhs = text.split("=", 1)
  path = tuple(part.strip() for part in lhs.strip().split("."))
  if len(path) < 2 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in path):
    raise ConfigError(f"--set {text!r}: the key must be section.key (e.g. params.width), got {lhs!r}.")
  rhs = rhs.strip()
  try:
    value = tomllib.loads(f"v = {rhs}")["v"]
  except tomllib.TOMLDecodeError:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]*", rhs):
      value = rhs  # a bare word: a string (TOML would need quotes)
    else:
      raise ConfigError(f"--set {text!r}: {rhs!r} is not a TOML value (numbers, true/false, "
                        "\"strings\", [arrays]).") from None
  return path, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """A deep copy of ``raw`` with ``--set`` overrides applied (no validation of keys yet)."""
  out = json.loads(json.dumps(raw))  # deep copy; TOML values are JSON values (datetimes aside)
  for text in overrides:
    path, value = parse_override(text)
    node = out
    for part in path[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ConfigError(f"--set {text!r}: {part!r} is a value, not a table.")
      node = child
    node[path[-1]] = value
  return out


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A config resolved against its experiment module."""
  name: str
  module: types.ModuleType
  params: Any
  config: dict[str, Any]  # what results.json records under "config"
  plan: Any = None        # the kronjax.Plan run() receives; None when run() takes no plan


def resolve(raw: Mapping[str, Any], *, overrides: Sequence[str] = (), smoke: bool = False,
            source: str | None = None, config_path: str | os.PathLike | None = None) -> Resolved:
  """Validates a parsed config (plus overrides) and builds the module's ``Params``.

  ``config_path`` (the config file, if any) tells where to look for the
  experiment module (``experiments_dir``); ``source`` is what results.json
  records as the config's file.
  """
  cfg = apply_overrides(raw, overrides)
  for section in cfg:
    if section not in SECTIONS:
      raise ConfigError(unknown_key_message("config section", section, SECTIONS))
    if not isinstance(cfg[section], dict):
      raise ConfigError(f"config section {section!r} must be a table ([{section}]), "
                        f"got {type(cfg[section]).__name__}.")
  exp = cfg.get("experiment")
  if not exp or "name" not in exp:
    raise ConfigError("config needs an [experiment] table with name = \"<module>\" "
                      f"(one of: {', '.join(_names_or_none(config_path))}).")
  for key in exp:
    if key not in EXPERIMENT_KEYS:
      raise ConfigError(unknown_key_message("experiment key", key, EXPERIMENT_KEYS))
  name = exp["name"]
  if not isinstance(name, str):
    raise ConfigError(f"experiment.name must be a string, got {name!r}.")
  if "seed" in exp and (isinstance(exp["seed"], bool) or not isinstance(exp["seed"], int)):
    raise ConfigError(f"experiment.seed must be an integer, got {exp['seed']!r}.")
  module = import_experiment(name, experiments_dir(config_path))

  set_params = {}
  for text in overrides:
    path, value = parse_override(text)
    if path[0] == "params":
      set_params[path[1]] = value
  values = dict(cfg.get("params", {}))
  if smoke:
    values.update(cfg.get("smoke", {}))
  values.update(set_params)
  fields = {f.name for f in dataclasses.fields(module.Params)}
  for where, keys in (("params", values), ("smoke", cfg.get("smoke", {}))):
    for key in keys:
      if key not in fields and key in plan_fields():
        raise ConfigError(_plan_field_message(where, key))
  if "seed" in exp:
    if "seed" not in fields:
      raise ConfigError(f"experiment {name!r} takes no seed (its Params has no 'seed' field); "
                        "remove experiment.seed.")
    if "seed" in values:
      raise ConfigError("seed is set both in [experiment] and in [params]; keep one.")
    values["seed"] = exp["seed"]
  params = build_params(module.Params, values, where="params")
  for key in cfg.get("smoke", {}):  # [smoke] keys are checked even without --smoke
    if key not in fields:
      raise ConfigError(unknown_key_message("smoke key", key, fields))
  plan = build_plan(name, module, cfg.get("plan", {}))
  config = {
      "experiment": {"name": name, **{k: v for k, v in exp.items() if k != "name"}},
      "params": to_jsonable(dataclasses.asdict(params)),
      "plan": None if plan is None else to_jsonable(dataclasses.asdict(plan)),
      "smoke": smoke, "overrides": list(overrides), "file": source,
  }
  return Resolved(name=name, module=module, params=params, config=config, plan=plan)


def plan_fields() -> tuple[str, ...]:
  """The fields of ``kronjax.Plan`` (what a ``[plan]`` table may set)."""
  import kronjax  # pylint: disable=g-import-not-at-top  (imports jax: only once a config is resolved)
  return tuple(f.name for f in dataclasses.fields(kronjax.Plan))


def _plan_field_message(where: str, key: str) -> str:
  return (f"{key!r} is not a {where} key: it says how the step runs, not what the experiment or "
          f"its network is. Put it in the config's [plan] table (kronjax.Plan), e.g. "
          f"--set plan.{key}=...")


def takes_plan(module: types.ModuleType) -> bool:
  """Whether the experiment's ``run`` accepts ``plan=`` (a ``kronjax.Plan``)."""
  return "plan" in inspect.signature(module.run).parameters


def build_plan(name: str, module: types.ModuleType, values: Mapping[str, Any]) -> Any:
  """The ``kronjax.Plan`` of a ``[plan]`` table, or None when ``run`` takes no plan.

  ``ConfigError`` for an unknown key (with the closest match), a bad value, or a
  non-empty table given to an experiment that takes no plan.
  """
  if not takes_plan(module):
    if values:
      raise ConfigError(f"experiment {name!r} takes no [plan] (its run() has no plan argument); "
                        f"remove the [plan] table ({', '.join(values)}).")
    return None
  import kronjax  # pylint: disable=g-import-not-at-top
  valid = plan_fields()
  for key in values:
    if key not in valid:
      raise ConfigError(unknown_key_message("plan key", key, valid))
  hints = typing.get_type_hints(kronjax.Plan)
  kwargs = {key: _coerce(f"plan.{key}", value, hints[key]) for key, value in values.items()}
  try:
    return kronjax.Plan(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"plan: {e}") from None


def build_params(cls: type, values: Mapping[str, Any], *, where: str = "params") -> Any:
  """``cls(**values)`` for a frozen dataclass, with unknown-key and type checks."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in values:
    if key not in fields:
      raise ConfigError(unknown_key_message(f"{where} key", key, fields))
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in values.items():
    kwargs[key] = _coerce(f"{where}.{key}", value, hints[key])
  missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{where} is missing required key(s): {', '.join(missing)}.")
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(where: str, value: Any, tp: Any) -> Any:
  """Checks ``value`` against the annotation ``tp``; converts int->float and list->tuple."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is typing.Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(where, value, arg)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{where} must be {' or '.join(_type_name(a) for a in args if a is not type(None))}, "
                      f"got {value!r}.")
  if origin is typing.Literal:
    if value not in args:
      close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}.{hint}")
    return value
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where} must be an array (e.g. [1, 2]), got {value!r}.")
    if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
      if len(value) != len(args):
        raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}: {value!r}.")
      items = [_coerce(f"{where}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
    else:
      item_tp = args[0] if args else typing.Any
      items = [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where} must be true or false, got {value!r}.")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where} must be an integer, got {value!r}.")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where} must be a number, got {value!r}.")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value
  if isinstance(tp, type) and not isinstance(value, tp):
    raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}.")
  return value


# ----------------------------------------------------------------------------- discovery


def experiment_dirs(config_path: str | os.PathLike | None = None) -> list[tuple[str, pathlib.Path]]:
  """Where the experiments folder is looked for, in order: ``(why, folder)`` pairs.

  ``$KRONJAX_EXPERIMENTS``; ``experiments/`` beside the config file's folder
  (``config_path.parent.parent / "experiments"``); ``./experiments``.
  """
  out = []
  if os.environ.get(ENV_VAR):
    out.append((f"${ENV_VAR}", pathlib.Path(os.environ[ENV_VAR]).expanduser()))
  if config_path is not None:
    config_path = pathlib.Path(config_path).resolve()
    out.append(("beside the config's folder", config_path.parent.parent / FOLDER))
  out.append(("the current directory", pathlib.Path.cwd() / FOLDER))
  return out


def experiments_dir(config_path: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of experiment modules: the first of ``experiment_dirs`` that exists.

  Raises ``ConfigError`` when none does, or when ``$KRONJAX_EXPERIMENTS`` names
  a folder that does not exist (an explicit setting is never passed over).
  """
  candidates = experiment_dirs(config_path)
  for why, folder in candidates:
    if folder.is_dir():
      return folder.resolve()
    if why.startswith("$"):
      raise ConfigError(f"{ENV_VAR}={str(folder)!r} is not a directory; point it at the folder "
                        "of experiment modules (the checkout's experiments/) or unset it.")
  tried = "; ".join(f"{folder} ({why})" for why, folder in candidates)
  raise ConfigError(f"no experiments folder found (tried {tried}). The experiment modules are "
                    f"not installed with kronjax: run from a source checkout, or set {ENV_VAR}.")


def _module_summary(path: pathlib.Path) -> tuple[bool, str]:
  """(defines Params and run, first docstring line), read without importing."""
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError, UnicodeDecodeError):
    return False, ""
  names = {node.name for node in tree.body
           if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
  doc = (ast.get_docstring(tree) or "").strip().splitlines()
  return {"Params", "run"} <= names, doc[0] if doc else ""


def experiment_names(folder: str | os.PathLike | None = None) -> list[str]:
  """Modules in ``folder`` (default: ``experiments_dir()``) that follow the contract."""
  folder = experiments_dir() if folder is None else pathlib.Path(folder)
  return sorted(p.stem for p in folder.glob("*.py")
                if not p.stem.startswith("_") and _module_summary(p)[0])


def _names_or_none(config_path: str | os.PathLike | None) -> list[str]:
  try:
    return experiment_names(experiments_dir(config_path))
  except ConfigError:
    return []


def load_module(path: str | os.PathLike, name: str | None = None) -> types.ModuleType:
  """Loads the Python file ``path`` as module ``MODULE_PREFIX + stem`` (or ``name``).

  The module is registered in ``sys.modules`` before it runs (dataclasses and
  ``typing.get_type_hints`` look their module up there). Loading the same file
  again returns the loaded module; another file of the same name replaces it.
  """
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise ConfigError(f"{str(path)!r} is not a file.")
  name = name or MODULE_PREFIX + path.stem
  loaded = sys.modules.get(name)
  if loaded is not None and pathlib.Path(getattr(loaded, "__file__", "")).resolve() == path:
    return loaded
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


def import_experiment(name: str, folder: str | os.PathLike | None = None) -> types.ModuleType:
  """The experiment module ``<folder>/<name>.py``, checked for ``Params`` and ``run``.

  ``folder`` defaults to ``experiments_dir()``. ``ConfigError`` for an unknown name.
  """
  folder = experiments_dir() if folder is None else pathlib.Path(folder)
  valid = experiment_names(folder)
  if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name not in valid:
    raise ConfigError(unknown_key_message("experiment", name, valid,
                                          listing=f"Available experiments in {folder}"))
  module = load_module(folder / f"{name}.py")
  if not (dataclasses.is_dataclass(getattr(module, "Params", None)) and callable(getattr(module, "run", None))):
    raise ConfigError(f"{folder / name}.py must define a dataclass Params and a function run.")
  return module


def config_dirs() -> list[pathlib.Path]:
  """Where ``kronjax list`` looks for configs: ./configs and ``configs/`` beside the
  experiments folder (``$KRONJAX_EXPERIMENTS``'s checkout)."""
  dirs = [pathlib.Path.cwd() / "configs"]
  try:
    dirs.append(experiments_dir().parent / "configs")
  except ConfigError:
    pass
  out = []
  for d in dirs:
    if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
      out.append(d)
  return out


def list_configs() -> list[dict[str, str]]:
  """``[{"path", "experiment", "description"}]`` for every configs/*.toml found."""
  rows = []
  for d in config_dirs():
    for path in sorted(d.glob("*.toml")):
      try:
        exp = read_config(path).get("experiment", {})
      except ConfigError as e:
        exp = {"name": "?", "description": f"invalid: {e}"}
      try:
        shown = str(path.relative_to(pathlib.Path.cwd()))
      except ValueError:
        shown = str(path)
      rows.append({"path": shown, "experiment": str(exp.get("name", "?")),
                   "description": str(exp.get("description", ""))})
  return rows


def list_experiments() -> list[dict[str, str]]:
  """``[{"name", "description"}]`` for every experiment module (none without a folder)."""
  try:
    folder = experiments_dir()
  except ConfigError:
    return []
  return [{"name": name, "description": _module_summary(folder / f"{name}.py")[1]}
          for name in experiment_names(folder)]


# ----------------------------------------------------------------------------- running


def run_config(config: str | os.PathLike | None = None, *, overrides: Sequence[str] = (),
               out_dir: str | os.PathLike | None = None, smoke: bool = False,
               progress: bool = True, resume: str | os.PathLike | None = None,
               echo: bool = True) -> dict[str, Any]:
  """Runs one experiment from a config file (or resumes the run in ``resume``).

  Returns the results payload written to ``out_dir/results.json``.
  """
  if resume is not None:
    out = pathlib.Path(resume)
    saved_path = out / RUN_CONFIG
    if not saved_path.is_file():
      raise ConfigError(f"--resume {str(out)!r}: no {RUN_CONFIG} there; it is not a kronjax run "
                        "directory (give the --out directory of the interrupted run).")
    try:
      saved = json.loads(saved_path.read_text())
      raw, overrides, smoke, source = saved["raw"], saved["overrides"], saved["smoke"], saved["file"]
    except (ValueError, KeyError) as e:
      raise ConfigError(f"--resume {str(out)!r}: {RUN_CONFIG} is unreadable ({e}).") from None
    config_path = saved.get("config_path") or source
    resolved = resolve(raw, overrides=overrides, smoke=smoke, source=source, config_path=config_path)
    if "resume" not in inspect.signature(resolved.module.run).parameters:
      raise ConfigError(f"experiment {resolved.name!r} does not support --resume (its run() "
                        "takes no resume argument); start it again instead.")
  else:
    if config is None:
      raise ConfigError("give a CONFIG file (or --resume DIR).")
    raw = read_config(config)
    source = str(config)
    config_path = str(pathlib.Path(config).resolve())
    resolved = resolve(raw, overrides=overrides, smoke=smoke, source=source, config_path=config_path)
    out = pathlib.Path(out_dir) if out_dir is not None else default_out_dir(resolved.name, smoke)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # a fresh run never continues old state
    (out / RESULTS).unlink(missing_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(
        {"raw": raw, "overrides": list(overrides), "smoke": smoke, "file": source,
         "config_path": config_path}, indent=2) + "\n")

  from kronjax.experiments import timing  # pylint: disable=g-import-not-at-top  (imports jax)

  kwargs = {"progress": progress}
  if resume is not None:
    kwargs["resume"] = True
  if resolved.plan is not None:
    kwargs["plan"] = resolved.plan
  if echo:
    print(f"kronjax run: experiment {resolved.name!r}{' (smoke)' if smoke else ''}"
          f"{' resumed' if resume is not None else ''} -> {out}", flush=True)
  t0 = time.perf_counter()
  result = resolved.module.run(resolved.params, out, **kwargs)
  wall = time.perf_counter() - t0
  check_result(result, out, resolved.name)
  timings = dict(result.get("timings", {}))
  timings.setdefault("run_wall_s", wall)
  payload = {
      **timing.provenance(cli_command(source, overrides, smoke, out, resumed=resume is not None)),
      "config": resolved.config,
      "metrics": result["metrics"], "timings": timings, "plots": list(result["plots"]),
      "table": result["table"],
  }
  timing.write_json(out / RESULTS, to_jsonable(payload))
  if echo:
    print(format_table(result["table"]))
    for plot in result["plots"]:
      print(f"plot: {out / plot}")
    print(f"results: {out / RESULTS}", flush=True)
  return payload


def cli_command(config: str, overrides: Sequence[str], smoke: bool, out: pathlib.Path, *,
                resumed: bool) -> str:
  """The ``kronjax run`` command line that does what this run did (recorded in results.json)."""
  if resumed:
    return shlex.join(["kronjax", "run", "--resume", str(out)])
  argv = ["kronjax", "run", config]
  for override in overrides:
    argv += ["--set", override]
  return shlex.join(argv + (["--smoke"] if smoke else []) + ["--out", str(out)])


def default_out_dir(name: str, smoke: bool) -> pathlib.Path:
  return pathlib.Path("runs") / (f"{name}-smoke" if smoke else name)


def check_result(result: Any, out_dir: pathlib.Path, name: str) -> None:
  """Raises TypeError when an experiment's ``run`` broke the return contract."""
  where = f"experiment {name!r}: run()"
  if not isinstance(result, dict):
    raise TypeError(f"{where} must return a dict, got {type(result).__name__}.")
  allowed = {"metrics", "table", "plots", "timings"}
  for key in result:
    if key not in allowed:
      raise TypeError(unknown_key_message(f"key returned by {where}", key, allowed))
  for key in ("metrics", "table", "plots"):
    if key not in result:
      raise TypeError(f"{where} must return {key!r}.")
  if not isinstance(result["metrics"], dict) or not isinstance(result.get("timings", {}), dict):
    raise TypeError(f"{where}: metrics and timings must be dicts.")
  if not isinstance(result["table"], list) or not all(isinstance(r, dict) for r in result["table"]):
    raise TypeError(f"{where}: table must be a list of row dicts.")
  for plot in result["plots"]:
    if not isinstance(plot, str) or not (out_dir / plot).is_file():
      raise TypeError(f"{where}: plot {plot!r} is not a file name written into {out_dir}.")


# ----------------------------------------------------------------------------- helpers


def to_jsonable(x: Any) -> Any:
  """numpy/jax scalars and arrays -> Python numbers and lists, recursively; NaN/inf kept."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, pathlib.Path):
    return str(x)
  if isinstance(x, np.generic):
    return x.item()
  if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
    return np.asarray(x).tolist()
  return x


def gaussian_tail(b: float) -> float:
  """``Q(b) = P[N(0, 1) > b]``: the probability that one neuron fires on a unit-norm point
  at Gaussian init (``m Q(b)`` active neurons per point on average)."""
  return 0.5 * math.erfc(b / math.sqrt(2.0))


def read_checksums(path: str) -> dict[str, str] | None:
  """The JSON ``{file: "sha256:..."}`` at ``path`` (a data loader's ``checksums``), or None
  for ``""``: the loader's published checksums."""
  return json.loads(pathlib.Path(path).read_text()) if path else None


def require_positive(params: Any, *names: str) -> None:
  """For ``Params.__post_init__``: ValueError unless every named field is >= 1."""
  for name in names:
    value = getattr(params, name)
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}"
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Rows of dicts as an aligned text table (columns in first-seen order)."""
  if not rows:
    return "(empty table)"
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
             for c in columns]
  lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(columns, widths, numeric)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric))
            for r in cells]
  return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The same table as GitHub markdown (for docs)."""
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  def cell(v):
    return str(v).replace("|", "\\|").replace("*", "\\*")
  lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(_fmt(row.get(c))) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def save_figure(fig: Any, out_dir: str | os.PathLike, name: str, *, dpi: int = 90) -> str:
  """Saves a matplotlib figure as ``out_dir/name`` (PNG), closes it, returns ``name``."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(out_dir) / name
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return name


def pyplot():
  """``matplotlib.pyplot`` with the non-interactive Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


__all__ = (
    "CHECKPOINTS", "ConfigError", "Resolved", "apply_overrides", "build_params", "check_result",
    "build_plan", "experiment_dirs", "experiment_names", "experiments_dir", "format_table",
    "gaussian_tail", "import_experiment", "list_configs", "list_experiments", "load_module",
    "markdown_table", "parse_override", "plan_fields", "pyplot", "read_config", "require_positive",
    "resolve", "run_config", "save_figure", "takes_plan", "to_jsonable", "unknown_key_message",
)
