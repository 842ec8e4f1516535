"""The dense baseline: the same network trained on explicit ``(n, d)`` inputs."""

from kronjax._src.model.dense import DenseState
from kronjax._src.model.dense import init
from kronjax._src.model.dense import forward
from kronjax._src.model.dense import make_step
from kronjax._src.model.dense import evaluate

__all__ = (
    "DenseState",
    "init",
    "forward",
    "make_step",
    "evaluate",
)
