"""kronjax: train two-layer networks on Kronecker-structured data in d-free time."""

from kronjax import checkpoint
from kronjax import data
from kronjax import dense
from kronjax import network
from kronjax import sharding
from kronjax import sweep
from kronjax._src.model.config import Config
from kronjax._src.data.dataset import Dataset
from kronjax._src.data.dataset import NormWarning
from kronjax._src.inference.inference import dense_params
from kronjax._src.inference.inference import evaluate
from kronjax._src.inference.inference import predict
from kronjax._src.inference.verify import verify
from kronjax._src.data.kron_data import KronData
from kronjax._src.train.loop import CapacityError
from kronjax._src.train.loop import STOP
from kronjax._src.train.loop import StepInfo
from kronjax._src.train.loop import batch_schedule
from kronjax._src.train.loop import fit
from kronjax._src.kernels.native import info as native_info
from kronjax._src.step.optim import assume_linear
from kronjax._src.step.plan import Plan
from kronjax._src.step.state import TrainState
from kronjax._src.step.state import init
from kronjax._src.step.state import memory_estimate
from kronjax._src.step.state import resync
from kronjax._src.step.state import with_plan
from kronjax._src.step.step import Status
from kronjax._src.step.step import check_status
from kronjax._src.step.step import jit_train_step
from kronjax._src.step.step import train_step

__version__ = "0.3.0"

__all__ = (
    "CapacityError",
    "Config",
    "Dataset",
    "KronData",
    "NormWarning",
    "Plan",
    "STOP",
    "Status",
    "StepInfo",
    "TrainState",
    "assume_linear",
    "batch_schedule",
    "check_status",
    "checkpoint",
    "data",
    "dense",
    "dense_params",
    "evaluate",
    "fit",
    "init",
    "jit_train_step",
    "memory_estimate",
    "native_info",
    "network",
    "predict",
    "resync",
    "sharding",
    "sweep",
    "train_step",
    "verify",
    "with_plan",
)
