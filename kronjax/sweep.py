"""Hyperparameter sweeps as one vmapped computation over a shared dataset."""

from kronjax._src.sweep import Sweep
from kronjax._src.sweep import split
from kronjax._src.sweep import merge
from kronjax._src.sweep import grid
from kronjax._src.sweep import set_hyperparams
from kronjax._src.sweep import init
from kronjax._src.sweep import stack
from kronjax._src.sweep import with_config
from kronjax._src.sweep import compiled_step
from kronjax._src.sweep import fit

__all__ = (
    "Sweep",
    "split",
    "merge",
    "grid",
    "set_hyperparams",
    "init",
    "stack",
    "with_config",
    "compiled_step",
    "fit",
)
