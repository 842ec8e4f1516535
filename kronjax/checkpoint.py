"""Atomic checkpoints of a whole ``TrainState`` (``save``) and their refusal-checked restore (``load``)."""

from kronjax._src.checkpoint import checkpoint_path
from kronjax._src.checkpoint import steps
from kronjax._src.checkpoint import latest_step
from kronjax._src.checkpoint import save
from kronjax._src.checkpoint import describe_tx
from kronjax._src.checkpoint import load

__all__ = (
    "checkpoint_path",
    "steps",
    "latest_step",
    "save",
    "describe_tx",
    "load",
)
