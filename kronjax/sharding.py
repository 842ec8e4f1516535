"""Neuron-sharded training: the rows of ``P``, ``A``, ``a`` split over devices."""

from kronjax._src.distributed.sharding import neuron_mesh
from kronjax._src.distributed.sharding import padded_width
from kronjax._src.distributed.sharding import state_specs
from kronjax._src.distributed.sharding import shard_state
from kronjax._src.distributed.sharding import unshard_state
from kronjax._src.distributed.sharding import compiled_step
from kronjax._src.distributed.sharding import estimated_bytes

__all__ = (
    "neuron_mesh",
    "padded_width",
    "state_specs",
    "shard_state",
    "unshard_state",
    "compiled_step",
    "estimated_bytes",
)
