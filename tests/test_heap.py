"""kronjax.memory: glibc keeps large freed blocks, so big per-step temporaries stop page-faulting."""

import platform
import subprocess
import sys
import textwrap

import pytest

import kronjax

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A jitted step with a 48 MiB temporary (above glibc's largest default mmap
# threshold, 32 MiB; below the 64 MiB of a per-thread heap),
# run 8 times: minor page faults per call, before and after the setting.
_SCRIPT = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    import kronjax

    @jax.jit
    def step(x):
      big = jnp.outer(x, jnp.sin(x[:3072])) + 1.0   # (4096, 3072) float32: a 48 MiB
      return x + (big @ x[:3072]) * 1e-9             # temporary, materialized for the product

    def faults_per_call(x, warmup=1):
      # XLA's worker threads allocate from per-thread heaps: after the setting,
      # each thread that runs the step maps its block once, so warm up a few calls.
      for _ in range(warmup):
        x = step(x).block_until_ready()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(8):
        x = step(x).block_until_ready()
      return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8, x

    x = jnp.ones((4096,), jnp.float32)
    plain, x = faults_per_call(x)
    assert kronjax.memory.retain_freed_memory() is True
    windows = []
    for _ in range(3):   # the quietest window: a busy machine moves the step between threads
      faults, x = faults_per_call(x, warmup=8)
      windows.append(faults)
    retained = min(windows)
    print(plain, retained)
""")


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_retain_freed_memory_stops_page_faults_of_large_temporaries():
  done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  plain, retained = map(float, done.stdout.split()[-2:])
  assert plain > 4000          # ~12k fresh 4 KiB pages per call
  assert retained < plain / 2   # measured: 12.3k -> 3.1k


@pytest.mark.parametrize("bad, error", [(0, ValueError), (2**31, ValueError), (-5, ValueError),
                                        (1.5, TypeError), (True, TypeError), ("1G", TypeError)])
def test_retain_freed_memory_rejects_bad_max_bytes(bad, error):
  with pytest.raises(error, match="max_bytes"):
    kronjax.memory.retain_freed_memory(bad)


def test_retain_freed_memory_is_a_no_op_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
  assert kronjax.memory.retain_freed_memory() is False
