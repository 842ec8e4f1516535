"""Keep large freed buffers in the process (glibc malloc) instead of unmapping them.

Why: XLA CPU allocates each step's temporaries anew. glibc serves blocks above
its mmap threshold (at most 32 MiB by default) with fresh ``mmap`` pages and
unmaps them on free, so a step whose temporaries are that large pays one page
fault (and a page zeroing) per 4 KiB, every step. A vmapped momentum sweep has
such temporaries (its full-size gradients, ``(S, m, n)``); plain-SGD steps and
single runs of moderate size do not. ``experiments/bench_sweep.py
[--retain-freed-memory]`` measures the page faults per step with and without.

The setting is process-wide (every allocation in the process is affected), so
kronjax never makes it on import: call it once at the start of a program, or
set ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824``
before Python starts. The cost is memory: freed blocks stay in the process
(up to ``max_bytes`` of free heap) instead of going back to the OS. Blocks
allocated on XLA's worker threads come from glibc's per-thread heaps of at most
64 MiB; a single temporary larger than that is still mapped fresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1   # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def retain_freed_memory(max_bytes: int = 2**30) -> bool:
  """Raises glibc's mmap and trim thresholds to ``max_bytes``; returns whether it did.

  Blocks up to ``max_bytes`` then come from the heap and are reused across
  steps; up to ``max_bytes`` of free heap is kept. Returns False (and changes
  nothing) where the C library is not glibc. ``max_bytes`` must be an int in
  ``[1, 2**31 - 1]``.
  """
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
    raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}.")
  if not 1 <= max_bytes <= _INT_MAX:
    raise ValueError(f"max_bytes must be in [1, {_INT_MAX}] (mallopt takes a C int), got {max_bytes}.")
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  mallopt = libc.mallopt
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # mallopt returns 1 on success; the mmap threshold first: it is the one that matters.
  return bool(mallopt(_M_MMAP_THRESHOLD, max_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, max_bytes))
