"""The dense baseline: the same network trained on explicit ``(n, d)`` inputs."""

from kronjax._src.step.dense import DenseState
from kronjax._src.step.dense import init
from kronjax._src.step.dense import forward
from kronjax._src.step.dense import make_step
from kronjax._src.step.dense import evaluate

__all__ = (
    "DenseState",
    "init",
    "forward",
    "make_step",
    "evaluate",
)
