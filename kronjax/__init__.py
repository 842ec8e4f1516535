"""kronjax: train two-layer networks on Kronecker-structured data in d-free time."""

from kronjax import checkpoint
from kronjax import data
from kronjax import dense
from kronjax import initializers
from kronjax import memory
from kronjax import sharding
from kronjax import sweep
from kronjax import threshold
from kronjax.config import Config
from kronjax.inference import dense_params
from kronjax.inference import dense_weights
from kronjax.inference import evaluate
from kronjax.inference import predict
from kronjax.kron import KronData
from kronjax.loop import CapacityError
from kronjax.loop import fit
from kronjax.state import TrainState
from kronjax.state import init
from kronjax.state import with_config
from kronjax.train import train_step

__version__ = "0.1.0"

__all__ = (
    "CapacityError",
    "Config",
    "KronData",
    "TrainState",
    "checkpoint",
    "data",
    "dense",
    "dense_params",
    "dense_weights",
    "evaluate",
    "fit",
    "init",
    "initializers",
    "memory",
    "predict",
    "sharding",
    "sweep",
    "threshold",
    "train_step",
    "with_config",
)
