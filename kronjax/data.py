"""Synthetic Kronecker data, a planted-teacher task, and pairwise data (KIBA, entity features)."""

from kronjax._src.data.synthetic import synthetic
from kronjax._src.data.synthetic import planted
from kronjax._src.data.kernel_features import KernelFeatures
from kronjax._src.data.kernel_features import kernel_features
from kronjax._src.data.featurize import kmer_composition
from kronjax._src.data.featurize import morgan_fingerprints
from kronjax._src.data.kiba import KibaData
from kronjax._src.data.kiba import fetch_kiba

__all__ = (
    "synthetic",
    "planted",
    "KernelFeatures",
    "kernel_features",
    "kmer_composition",
    "morgan_fingerprints",
    "KibaData",
    "fetch_kiba",
)
