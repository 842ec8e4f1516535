"""Shared test setup: strict rank promotion everywhere, float64 only where asked."""

import contextlib
import fcntl
import json
import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@contextlib.contextmanager
def _float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
  """Enables float64 for one test (trajectory comparisons) and restores the default."""
  with _float64():
    yield


@pytest.fixture(scope="module")
def x64_module():
  """float64 for a whole module (``pytestmark = pytest.mark.usefixtures("x64_module")``)."""
  with _float64():
    yield


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
  """``once_per_run(name, compute)``: ``compute()`` computed once per test run, shared by the
  xdist workers; for fixtures whose result is a JSON value.

  A module fixture runs once in every worker that runs one of its tests; for the fixtures that
  launch whole runs in subprocesses and return JSON, a second worker reads the first one's
  result instead of launching them again (a file lock in the run's shared temporary
  directory). A failure is recorded too, so the other workers fail at once instead of running
  it again. Every path (xdist or not, first worker or not) returns the JSON round trip, so a
  fixture sees the same types wherever it runs.
  """
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = tmp_path_factory.getbasetemp().parent

  def once(name: str, compute):
    if run is None:
      return json.loads(json.dumps(compute()))
    path = root / f"{name}-{run}.json"
    with open(root / f"{name}-{run}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
      if not path.exists():
        try:
          record = {"value": compute()}
        except Exception as e:   # recorded for the other workers, raised here
          record = {"error": f"{type(e).__name__}: {e}"}
          _write(path, record)
          raise
        _write(path, record)
      record = json.loads(path.read_text())
    if "error" in record:
      pytest.fail(f"{name} failed in another worker: {record['error']}")
    return record["value"]

  return once


def _write(path, record):
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record))
  tmp.replace(path)
