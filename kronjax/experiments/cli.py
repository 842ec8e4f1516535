"""The ``kronjax`` command.

    kronjax run CONFIG [--set section.key=value ...] [--out DIR] [--smoke] [--no-progress]
    kronjax run --resume DIR [--no-progress]
    kronjax list
    kronjax --version

``run`` loads a TOML config (see ``kronjax.experiments.runner`` for the format and
for where the experiment modules are found), runs its experiment, writes
``DIR/results.json`` and the plots, and prints the results table. ``--resume
DIR`` continues an interrupted run from the checkpoints in ``DIR`` (its config is
saved there). ``list`` shows the configs and experiments. ``--version`` prints
``kronjax <version>``.

Exit status: 0 on success, 2 for usage and config errors (unknown key, wrong
type, bad ``--set``, missing file, unknown experiment, corrupt or mismatched
checkpoint) with a one-line message on stderr, 1 when the experiment itself fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXIT_USAGE = 2


class _UsageError(Exception):
  pass


class _Parser(argparse.ArgumentParser):
  """argparse that reports usage errors as one line (and exit status 2)."""

  def error(self, message: str):
    raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="kronjax", description="Run kronjax experiments from TOML configs.")
  parser.add_argument("--version", action="store_true", help="print the kronjax version and exit")
  sub = parser.add_subparsers(dest="command", metavar="{run,list}", parser_class=_Parser)
  run = sub.add_parser("run", help="run an experiment from a config file",
                       description="Run an experiment from a TOML config file.")
  run.add_argument("config", nargs="?", help="TOML config file (e.g. configs/quickstart.toml)")
  run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value; VALUE is a TOML literal (repeatable)")
  run.add_argument("--out", help="output directory (default runs/<experiment>)")
  run.add_argument("--smoke", action="store_true", help="apply the config's [smoke] overrides")
  run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
  run.add_argument("--no-progress", action="store_true", help="no progress bar")
  sub.add_parser("list", help="list configs and experiments",
                 description="List the configs and the experiment modules.")
  return parser


def _fail(message: str) -> int:
  message = " ".join(str(message).split())  # one line
  print(f"kronjax: error: {message}", file=sys.stderr)
  return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``kronjax`` console script; returns the exit status."""
  from kronjax.experiments import runner as experiment  # pylint: disable=g-import-not-at-top  (no jax import)

  parser = _parser()
  try:
    args = parser.parse_args(argv)
  except _UsageError as e:
    return _fail(f"{e} (see `kronjax --help`)")
  if args.version:
    import kronjax  # pylint: disable=g-import-not-at-top  (imports jax: only when asked)
    print(f"kronjax {kronjax.__version__}")
    return 0
  if args.command is None:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
  if args.command == "list":
    return _list(experiment)
  if args.resume is not None and (args.config or args.overrides or args.smoke or args.out):
    return _fail("--resume DIR takes no CONFIG, --set, --smoke or --out: the run's own config "
                 "is read from DIR.")
  try:
    experiment.run_config(args.config, overrides=args.overrides, out_dir=args.out,
                          smoke=args.smoke, progress=not args.no_progress, resume=args.resume)
  except experiment.ConfigError as e:
    return _fail(e)
  except ValueError as e:
    # A refused checkpoint on --resume is a usage problem, not a crash.
    if args.resume is not None and "checkpoint" in str(e):
      return _fail(e)
    raise
  except KeyboardInterrupt:
    print("kronjax: interrupted", file=sys.stderr)
    return 130
  return 0


def _list(experiment) -> int:
  configs = experiment.list_configs()
  print("configs:")
  if not configs:
    print("  (none found in ./configs)")
  for row in configs:
    desc = f"  {row['description']}" if row["description"] else ""
    print(f"  {row['path']:<32s} experiment={row['experiment']}{desc}")
  print("experiments:")
  try:
    folder = experiment.experiments_dir()
  except experiment.ConfigError as e:
    print(f"  (none: {e})")
    return 0
  print(f"  (in {folder})")
  for row in experiment.list_experiments():
    print(f"  {row['name']:<16s} {row['description']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
