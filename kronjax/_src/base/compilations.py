"""How many XLA compilations this process has run: a counter fed by ``jax.monitoring``.

``kronjax.fit`` paces its chunks of steps by their time and must not take a chunk
that compiled for a slow one (``train.loop._Chunks.observe``). The benchmarks count
compilations by the same event in ``kronjax.experiments.timing.count_compilations``,
which names it itself: the experiment layer uses the public API only.
"""

from __future__ import annotations

from typing import Any

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
"""The ``jax.monitoring`` duration event of one XLA (backend) compilation."""

_count = 0


def count() -> int:
  """XLA compilations in this process since kronjax was imported."""
  return _count


def _listener(event: str, duration: float, **kwargs: Any) -> None:
  del duration, kwargs
  global _count
  if event == BACKEND_COMPILE:
    _count += 1


# A counter, nothing more (registered once, on import).
jax.monitoring.register_event_duration_secs_listener(_listener)
