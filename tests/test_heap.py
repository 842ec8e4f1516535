"""kronjax.experiments.heap.retain_freed_memory: what the switch asks of glibc and what it returns.

Whether glibc then stops page-faulting is the C library's behaviour, measured by
``experiments/bench_sweep.py --retain-freed-memory``, not tested here.
"""

import ctypes
import platform
import subprocess
import sys

import pytest

from kronjax.experiments import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _FakeLibc:
  """Records mallopt calls; returns the given results in turn (glibc: 1 success, 0 failure)."""

  def __init__(self, results):
    self.calls, self._results = [], list(results)
    outer = self

    class _Mallopt:
      argtypes = restype = None

      def __call__(self, param, value):
        outer.calls.append((param, value))
        return outer._results.pop(0)

    self.mallopt = _Mallopt()


@pytest.fixture
def fake_glibc(monkeypatch):
  monkeypatch.setattr(platform, "system", lambda: "Linux")
  monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))

  def install(results):
    lib = _FakeLibc(results)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: lib)
    return lib

  return install


def test_sets_the_mmap_threshold_then_the_trim_threshold(fake_glibc):
  lib = fake_glibc([1, 1])
  assert heap.retain_freed_memory(3 * 2**20) is True
  assert lib.calls == [(heap._M_MMAP_THRESHOLD, 3 * 2**20), (heap._M_TRIM_THRESHOLD, 3 * 2**20)]
  assert lib.mallopt.argtypes == [ctypes.c_int, ctypes.c_int] and lib.mallopt.restype is ctypes.c_int


def test_default_is_one_gib(fake_glibc):
  lib = fake_glibc([1, 1])
  assert heap.retain_freed_memory() is True
  assert {v for _, v in lib.calls} == {2**30}


@pytest.mark.parametrize("results, calls", [([0], 1), ([1, 0], 2)])
def test_a_refused_setting_returns_false(fake_glibc, results, calls):
  lib = fake_glibc(results)
  assert heap.retain_freed_memory() is False
  assert len(lib.calls) == calls  # a refused mmap threshold is not followed by the trim one


@pytest.mark.parametrize("bad, error", [(0, ValueError), (2**31, ValueError), (-5, ValueError),
                                        (1.5, TypeError), (True, TypeError), ("1G", TypeError)])
def test_rejects_bad_max_bytes_before_touching_the_c_library(fake_glibc, bad, error):
  lib = fake_glibc([])
  with pytest.raises(error, match="max_bytes"):
    heap.retain_freed_memory(bad)
  assert lib.calls == []


def test_is_a_no_op_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
  monkeypatch.setattr(ctypes, "CDLL", lambda name: pytest.fail("the C library was loaded"))
  assert heap.retain_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_the_real_glibc_accepts_the_setting():
  # In a child process: the setting is process-wide and would outlive this test.
  done = subprocess.run([sys.executable, "-c", "from kronjax.experiments import heap; "
                         "print(heap.retain_freed_memory(2**20))"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["True"]
