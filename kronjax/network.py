"""A trained network for inference: save it without its optimizer state, load it anywhere."""

from kronjax._src.inference.network import Network
from kronjax._src.inference.network import from_state
from kronjax._src.inference.network import load
from kronjax._src.inference.network import save

__all__ = (
    "Network",
    "from_state",
    "load",
    "save",
)
