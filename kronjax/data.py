"""Synthetic Kronecker data and a planted-teacher task."""

from kronjax._src.data.synthetic import synthetic
from kronjax._src.data.synthetic import planted

__all__ = (
    "synthetic",
    "planted",
)
