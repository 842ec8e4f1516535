"""Synthetic Kronecker data and a planted-teacher task."""

from kronjax._src.data import synthetic
from kronjax._src.data import planted

__all__ = (
    "synthetic",
    "planted",
)
