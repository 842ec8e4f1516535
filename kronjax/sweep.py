"""Hyperparameter sweeps: ``S`` training runs stacked into one state, one compiled step."""

from kronjax._src.train.sweep import size
from kronjax._src.train.sweep import member
from kronjax._src.train.sweep import grid
from kronjax._src.train.sweep import set_hyperparams
from kronjax._src.train.sweep import init
from kronjax._src.train.sweep import stack
from kronjax._src.train.sweep import with_plan
from kronjax._src.train.sweep import train_step
from kronjax._src.train.sweep import fit

__all__ = (
    "size",
    "member",
    "grid",
    "set_hyperparams",
    "init",
    "stack",
    "with_plan",
    "train_step",
    "fit",
)
