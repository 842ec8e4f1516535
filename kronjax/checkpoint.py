"""Checkpoints of a ``TrainState``, sharded or not: every process writes its own shards (orbax).

``save`` / ``load`` / ``steps`` / ``latest_step``; ``Manager`` saves a run's
checkpoints asynchronously (``kronjax.fit`` uses it).
"""

from kronjax._src.distributed.checkpoint import checkpoint_path
from kronjax._src.distributed.checkpoint import steps
from kronjax._src.distributed.checkpoint import latest_step
from kronjax._src.distributed.checkpoint import save
from kronjax._src.distributed.checkpoint import Manager
from kronjax._src.distributed.checkpoint import describe_tx
from kronjax._src.distributed.checkpoint import load

__all__ = (
    "checkpoint_path",
    "steps",
    "latest_step",
    "save",
    "Manager",
    "describe_tx",
    "load",
)
