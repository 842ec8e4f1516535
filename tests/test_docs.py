"""The documentation: its code runs, its tables are current, and it builds with no warning.

* Every fenced code block of ``docs/*.md`` is either a ``python`` block, run
  here (the blocks of a page in order, in one namespace per page, in a fresh
  temporary directory), or is preceded by ``<!-- not-run: REASON -->`` (shell
  commands, config files, formulas, code that needs several processes). The
  README follows the same rule; ``tests/test_readme.py`` runs its blocks.
* The measured numbers are written by ``docs/gen_tables.py`` from
  ``experiments/results/``: re-running it on the committed pages must change
  nothing (so a table cannot go stale, and no page holds a number the JSON
  does not).
* ``mkdocs build --strict`` (what ``make docs`` runs) succeeds, and the API
  reference has an entry for every public name of ``kronjax`` and its
  namespaces. Skipped only when mkdocs is not installed (``make test`` installs
  the ``docs`` extra).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import kronjax

pytestmark = pytest.mark.slow  # left out of make test-fast

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NAMESPACES = ("sweep", "sharding", "checkpoint", "network", "data", "dense")

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def fenced_blocks(text: str) -> list[dict]:
  """Each fenced block: ``lang``, ``code`` (dedented), ``line``, ``not_run`` (the reason or None)."""
  blocks = []
  for match in FENCE.finditer(text):
    before = text[:match.start()].rstrip("\n ").splitlines()
    marker = NOT_RUN.search(before[-1]) if before else None
    indent = len(match.group("indent"))
    code = "".join(line[indent:] if line.strip() else "\n"
                   for line in match.group("body").splitlines(keepends=True))
    blocks.append({"lang": match.group("lang"), "code": code,
                   "line": text.count("\n", 0, match.start()) + 1,
                   "not_run": marker.group("reason") if marker else None})
  return blocks


def check_blocks_marked(path: pathlib.Path) -> list[str]:
  """Problems: blocks that are neither python nor marked not-run, markers without a reason."""
  problems = []
  for block in fenced_blocks(path.read_text()):
    where = f"{path.relative_to(ROOT)}:{block['line']}"
    if block["not_run"] is not None and not block["not_run"]:
      problems.append(f"{where}: not-run marker without a reason")
    if block["lang"] != "python" and block["not_run"] is None:
      problems.append(f"{where}: a ```{block['lang']} block is neither python (run by the tests) "
                      "nor preceded by <!-- not-run: REASON -->")
  return problems


def run_page(path: pathlib.Path, tmp_path: pathlib.Path) -> dict:
  """Runs the page's python blocks in order in one namespace, in ``tmp_path``; returns it."""
  namespace = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    for block in fenced_blocks(path.read_text()):
      if block["lang"] != "python" or block["not_run"] is not None:
        continue
      source = "\n" * (block["line"]) + block["code"]  # tracebacks point at the page's line
      exec(compile(source, str(path), "exec"), namespace)  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  return namespace


def test_pages_exist():
  names = {p.name for p in PAGES}
  for page in ("index.md", "getting-started.md", "concepts.md", "inference.md", "sweeps.md",
               "multi-process.md", "checkpoints.md", "cli.md", "performance.md", "results.md",
               "troubleshooting.md", "design.md", "migrating.md", "pairwise.md", "composing.md"):
    assert page in names, page


@pytest.mark.parametrize("path", PAGES + [ROOT / "README.md"], ids=lambda p: p.name)
def test_every_block_runs_or_says_why_not(path):
  assert not check_blocks_marked(path)


RUNNABLE = [p for p in PAGES if any(b["lang"] == "python" and b["not_run"] is None
                                    for b in fenced_blocks(p.read_text()))]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_page_code_runs(path, tmp_path, capsys):
  with warnings.catch_warnings():
    warnings.simplefilter("error", kronjax.NormWarning)  # the examples use unit-norm data
    run_page(path, tmp_path)
  capsys.readouterr()


def _load_generator():
  spec = importlib.util.spec_from_file_location("kronjax_docs_gen_tables", DOCS / "gen_tables.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_generated_tables_are_current():
  gen = _load_generator()
  stale = gen.stale_pages()
  assert not stale, (f"generated tables are stale in {stale}: run `python docs/gen_tables.py` "
                     "(make docs) and commit the pages")
  for page in ("docs/performance.md", "docs/results.md", "README.md"):
    assert "<!-- generated: " in (ROOT / page).read_text(), page
  assert gen.FIGURE.is_file()


def test_generator_formats_small_numbers_in_scientific_notation():
  gen = _load_generator()
  assert gen.num(3.2e-7) == "3.200e-07"
  assert gen.num(0.0) == "0"
  assert gen.num(0.5121) == "0.5121"
  assert gen.num(655246.2) == "6.552e+05"


def test_generator_marks_what_a_result_does_not_record():
  gen = _load_generator()
  line = gen.provenance("x.json", {"environment": {"backend": "cpu", "cpu_count": 2}})
  assert "*Date:* *not recorded*" in line and "*Command:* *not recorded*" in line
  assert "cpu backend" in line
  assert "*Machine:* *not recorded*" in gen.provenance("x.json", {})


def test_generator_shows_the_plan_a_result_was_run_with():
  gen = _load_generator()
  assert gen.AUTOMATIC_PLAN == dataclasses.asdict(kronjax.Plan())
  planned = {"config": {"params": {"width": 8},
                        "plan": dataclasses.asdict(kronjax.Plan(update="full", active_capacity=16))}}
  assert gen.params_line(planned) == (
      '*Parameters:* `width=8`. *Plan:* `active_capacity=16`, `update="full"`.')
  automatic = {"config": {"params": {"width": 8}, "plan": dataclasses.asdict(kronjax.Plan())}}
  assert gen.params_line(automatic) == gen.params_line({"config": {"params": {"width": 8}}})


def test_migration_page_is_in_the_navigation():
  nav = (ROOT / "mkdocs.yml").read_text()
  assert "migrating.md" in nav
  text = (DOCS / "migrating.md").read_text()
  for topic in ("Plan", "with_plan", "fingerprint", "wrong_dataset", "v4", "format v2", '"dense"',
                "kronjax._src."):
    assert topic in text, topic


def test_no_session_history_in_pages():
  for path in PAGES + [ROOT / "README.md"]:
    text = path.read_text()
    assert not re.search(r"\bsession \d", text, re.I), path
    assert "DESIGN §" not in text and "shared/DESIGN" not in text, path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  if importlib.util.find_spec("mkdocs") is None:
    pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
  out = tmp_path_factory.mktemp("site")
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return out


def test_docs_build_strict(site):
  assert (site / "index.html").is_file()


def test_api_reference_covers_every_public_name(site):
  html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
  missing = [f"kronjax.{name}" for name in kronjax.__all__
             if name not in NAMESPACES and f'id="kronjax.{name}"' not in html]
  for namespace in NAMESPACES:
    module = getattr(kronjax, namespace)
    missing += [f"kronjax.{namespace}.{name}" for name in module.__all__
                if f'id="kronjax.{namespace}.{name}"' not in html]
  assert not missing, f"no API reference entry for {missing}"
