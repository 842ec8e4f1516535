"""Synthetic Kronecker data, a planted-teacher task, and pairwise data (KIBA, MovieLens-100k, entity features)."""

from kronjax._src.data.synthetic import synthetic
from kronjax._src.data.synthetic import planted
from kronjax._src.data.kernel_features import KernelFeatures
from kronjax._src.data.kernel_features import kernel_features
from kronjax._src.data.kernel_features import main_effect_features
from kronjax._src.data.featurize import kmer_composition
from kronjax._src.data.featurize import morgan_fingerprints
from kronjax._src.data.kiba import KibaData
from kronjax._src.data.kiba import fetch_kiba
from kronjax._src.data.movielens import MovieLensData
from kronjax._src.data.movielens import fetch_movielens
from kronjax._src.data.movielens import split_ratings

__all__ = (
    "synthetic",
    "planted",
    "KernelFeatures",
    "kernel_features",
    "main_effect_features",
    "kmer_composition",
    "morgan_fingerprints",
    "KibaData",
    "fetch_kiba",
    "MovieLensData",
    "fetch_movielens",
    "split_ratings",
)
