"""``Dataset``: the training points, their labels, an optional eval split and the Gram.

Shapes: n training points, n_e eval points, C outputs.

The dataset lives beside the ``TrainState``, never inside it: a sweep stacks
states and shares one dataset (``jax.vmap(train_step, in_axes=(0, None, None))``),
a checkpoint holds the state only, and the state remembers the dataset's
*fingerprint* so that every entry point refuses a different dataset.

The fingerprint is an array leaf (``(8,)`` uint32, a sha256), not static data: two
datasets of the same shapes share one compiled step, and the step itself compares
the two fingerprints (a mismatch makes it a no-op with ``wrong_dataset`` set).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kronjax._src.base import checks
from kronjax._src.data.kron_data import KronData, check_compatible, gram_from_entity_grams

GRAMS = ("auto", "precomputed", "factors", "entities")

# Squared norms outside this band get the warning: the threshold b and the
# capacities assume ||x|| = 1 (at init <w_r, x> ~ N(0, ||x||^2)).
NORM_BAND = (0.8, 1.25)


class NormWarning(UserWarning):
  """Inputs that are not unit-norm: the threshold and capacities assume ``||x|| = 1``."""


@jax.tree_util.register_pytree_node_class
class Dataset:
  """Training points and labels, an optional eval split, and the data Gram (a pytree).

  Args:
    data: the ``n`` training points (``kronjax.KronData``).
    labels: ``(n,)`` or ``(n, C)`` float targets (mse) or ``(n,)`` integer class
      ids (softmax); for a loss of one's own (``Config(loss=fn)``), an array or any
      pytree whose leaves have leading axis ``n`` (``{"y": (n,), "w": (n,)}``).
      Float labels are cast to the data's dtype, integer ones to int32.
    eval_data: optional held-out points (``n_e``) whose projections the state
      maintains every step, so ``kronjax.evaluate`` costs no ``d``.
    eval_labels: their labels (needs ``eval_data``).
    gram: ``"precomputed"`` stores the ``(n, n)`` Gram ``K = X X^T`` and the
      ``(n, n_e)`` cross Gram once; ``"factors"`` stores nothing ``n x n`` and the
      step recomputes its ``(B, n)`` Gram rows from the factors
      (``O(B n sum_q d_q)`` per step): for an ``n`` whose Gram does not fit;
      ``"entities"`` (entity-indexed ``data`` only) stores the entity Grams
      ``G_q = F_q F_q^T`` ``(N_q, N_q)`` and the cross entity Grams to the eval
      tables ``(N_q, N^e_q)`` (a per-point eval set counts as tables with
      ``N^e_q = n_e``), and the step gathers its Gram rows from them
      (``O(B n p)`` per step, nothing ``n x n``). ``"auto"`` (default) is
      ``"entities"`` for indexed ``data``, else ``"precomputed"``.
    normalize: scale every point (training and eval) to unit norm
      (``KronData.normalize``). The network's threshold ``b`` and its capacities
      assume ``||x|| = 1``: at init ``<w_r, x> ~ N(0, ||x||^2)``, so on points of
      norm 64 nearly half the neurons fire instead of ``m Q(b)``, and training
      diverges or loses the sparsity kronjax exists for. Left False, points whose
      squared norm is outside ``NORM_BAND`` trigger one ``NormWarning`` that
      gives the measured range and this fix. The dataset records it
      (``normalized``): ``kronjax.predict`` and a saved ``kronjax.network``
      normalize new points the same way (per point; per entity row of each table
      for indexed data).

  Factors of any float dtype are accepted (``KronData``); bfloat16 and float16
  factors are stored as float32, so the Gram, ``P`` and the step run in float32
  (kronjax has no half-precision step).

  Resampling: ``take(indices)`` gives the dataset of the points ``indices``
  (bootstrap resamples, folds) with its Gram's rows *and* columns taken and its
  own fingerprint; ``Dataset.stack(datasets)`` stacks equal-shaped ones along a
  new leading axis for ``jax.vmap``. Never rebuild a dataset leaf by leaf
  (``jax.tree.map(lambda x: x[idx], dataset)``): that takes the Gram's rows but
  not its columns; entry points refuse it.

  Attributes:
    data: the training points, as given (normalized with ``normalize=True``).
    labels: ``(n,)`` / ``(n, C)`` (or the pytree), cast as above.
    eval_data: the eval points, or None.
    eval_labels: their labels, or None.
    gram: ``(n, n)`` Gram, or None unless ``gram_mode == "precomputed"``
      (``full_gram()`` forms it in every mode).
    gram_eval: ``(n, n_e)`` cross Gram, or None (``full_gram_eval()``).
    entity_grams: with ``gram_mode == "entities"``, the tuple of ``G_q``
      ``(N_q, N_q)``; else None.
    entity_grams_eval: with ``"entities"`` and eval data, the tuple of cross
      entity Grams ``(N_q, N^e_q)``; else None.
    gram_mode: ``"precomputed"``, ``"factors"`` or ``"entities"`` (never ``"auto"``).
    normalized: whether the points were normalized (``normalize=True``; static).
    fingerprint: ``(8,)`` uint32 sha256 of the factors (tables and index) and
      labels (train and eval); all zeros (unknown) for a dataset built from traced
      arrays.

  Raises:
    TypeError: ``data`` is not a KronData, labels are neither floats nor integers.
    ValueError: labels with another row count or NaN/inf, eval data in another
      tensor space, ``eval_labels`` without ``eval_data``, ``gram="entities"`` with
      per-point data or rank-R eval data (each names the argument).
  """

  __slots__ = ("data", "labels", "eval_data", "eval_labels", "gram", "gram_eval",
               "entity_grams", "entity_grams_eval", "gram_mode", "normalized", "fingerprint",
               "__weakref__")

  def __init__(self, data: KronData, labels: Any, *, eval_data: KronData | None = None,
               eval_labels: Any = None, gram: str = "auto", normalize: bool = False):
    if not isinstance(data, KronData):
      raise TypeError(f"data must be a kronjax.KronData, got {type(data).__name__}; "
                      "wrap your factors with kronjax.KronData((u, v, ...)).")
    checks.check_choice("gram", gram, GRAMS)
    if gram == "auto":
      gram = "entities" if data.is_indexed else "precomputed"
    if gram == "entities" and not data.is_indexed:
      raise ValueError(
          "gram='entities' needs entity-indexed data (kronjax.KronData(tables, index=...)), but "
          "data is per point; use gram='precomputed' (or 'factors' when the n x n Gram does not "
          "fit), or leave gram at its default 'auto'.")
    if not isinstance(normalize, bool):
      raise TypeError(f"normalize must be a bool, got {normalize!r}.")
    labels = _check_labels("labels", labels, data)
    if eval_data is not None:
      check_compatible("eval_data", data, eval_data)
      if gram == "entities" and eval_data.rank != 1:
        raise ValueError(
            f"eval_data has rank {eval_data.rank}, but gram='entities' stores (N_q, n_e) cross "
            "entity Grams, which rank-R points do not have; pass gram='precomputed' or "
            "'factors', or rank-1 eval points.")
      if eval_data.dtype != data.dtype:
        eval_data = eval_data.astype(data.dtype)
      if eval_labels is not None:
        eval_labels = _check_labels("eval_labels", eval_labels, eval_data)
    elif eval_labels is not None:
      raise ValueError("eval_labels was given without eval_data; pass both or neither.")
    if normalize:
      data = data.normalize()
      eval_data = None if eval_data is None else eval_data.normalize()
    else:
      _warn_unless_unit_norm(data, eval_data)
    self.data, self.labels = data, labels
    self.eval_data, self.eval_labels = eval_data, eval_labels
    self.gram_mode = gram
    self.normalized = normalize
    self.gram = data.gram() if gram == "precomputed" else None
    self.gram_eval = (data.gram(other=eval_data)
                      if gram == "precomputed" and eval_data is not None else None)
    self.entity_grams = data.entity_grams() if gram == "entities" else None
    self.entity_grams_eval = (data.entity_grams(other=eval_data)
                              if gram == "entities" and eval_data is not None else None)
    self.fingerprint = fingerprint(self)

  # -- pytree protocol: unflatten bypasses validation (leaves may be tracers).
  def tree_flatten(self):
    children = (self.data, self.labels, self.eval_data, self.eval_labels, self.gram,
                self.gram_eval, self.entity_grams, self.entity_grams_eval, self.fingerprint)
    return children, (self.gram_mode, self.normalized)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    (obj.data, obj.labels, obj.eval_data, obj.eval_labels, obj.gram, obj.gram_eval,
     obj.entity_grams, obj.entity_grams_eval, obj.fingerprint) = children
    obj.gram_mode, obj.normalized = aux
    return obj

  @property
  def n(self) -> int:
    """Number of training points."""
    return self.data.n

  @property
  def n_eval(self) -> int:
    """Number of eval points (0 without an eval split)."""
    return 0 if self.eval_data is None else self.eval_data.n

  @property
  def dtype(self):
    return self.data.dtype

  def __repr__(self) -> str:
    return (f"Dataset(n={self.n}, n_eval={self.n_eval}, dims={self.data.dims}, "
            f"rank={self.data.rank}, dtype={self.dtype}, gram={self.gram_mode!r})")

  def take(self, indices: Any, *, keep_eval: bool = True) -> "Dataset":
    """The dataset of the training points ``indices``: a bootstrap resample, a fold.

    Args:
      indices: ``(n',)`` integer point indices in ``[0, n)``; repeats are allowed
        (a bootstrap resample draws with replacement) and make that many points.
      keep_eval: keep the eval split as it is (its points and labels; the cross
        Gram's rows are taken), or drop it (False).

    Returns:
      A ``Dataset`` of ``n'`` points with everything taken consistently: the
      points (``data.subset``: indexed data keeps its tables and takes rows of
      the index), every leaf of the labels, the ``(n', n')`` Gram
      ``K[indices][:, indices]`` (rows *and* columns; entity Grams are kept, the
      tables do not change), the gram mode, ``normalized`` (the points are not
      normalized again) and a fingerprint of its own, equal to that of
      ``Dataset(data.subset(indices), labels[indices], ...)``. No Gram is
      recomputed. With traced ``indices`` (inside ``jit``/``vmap``) the
      fingerprint is unknown (all zeros) and the dataset checks are skipped:
      build the resamples on the host and ``stack`` them instead.

    Raises:
      TypeError / ValueError: ``indices`` not a 1-D integer array in ``[0, n)``,
      or ``keep_eval`` not a bool.
    """
    if not isinstance(keep_eval, bool):
      raise TypeError(f"keep_eval must be a bool, got {keep_eval!r}.")
    checks.check_indices("indices", indices, self.n)
    idx = jnp.asarray(indices)
    if idx.ndim != 1:
      raise ValueError(f"indices must be 1-D (a list of point indices), got shape {idx.shape}.")
    keep_eval = keep_eval and self.eval_data is not None
    obj = object.__new__(Dataset)
    obj.data = self.data.subset(idx)
    obj.labels = jax.tree.map(lambda x: x[idx], self.labels)
    obj.eval_data = self.eval_data if keep_eval else None
    obj.eval_labels = self.eval_labels if keep_eval else None
    obj.gram_mode, obj.normalized = self.gram_mode, self.normalized
    obj.gram = None if self.gram is None else self.gram[idx][:, idx]
    obj.gram_eval = self.gram_eval[idx] if keep_eval and self.gram_eval is not None else None
    obj.entity_grams = self.entity_grams
    obj.entity_grams_eval = self.entity_grams_eval if keep_eval else None
    obj.fingerprint = fingerprint(obj)
    return obj

  @staticmethod
  def stack(datasets: Sequence["Dataset"]) -> "Dataset":
    """Datasets of equal shapes stacked along a new leading axis, for ``jax.vmap``
    (bootstrap resamples or folds from ``take``); see the module function ``stack``."""
    return stack(datasets)

  def gram_rows(self, batch_idx: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``K[S, :]`` ``(B, n)`` and ``K[S, E]`` ``(B, n_e)`` (None without eval data).

    ``"entities"``: ``p`` gathers from the entity Grams per entry (``O(B (n + n_e) p)``).
    """
    if self.gram_mode == "entities":
      left = self.data.index[batch_idx]  # (B, p)
      rows = gram_from_entity_grams(self.entity_grams, left, self.data.index)
      rows_eval = None
      if self.eval_data is not None:
        rows_eval = _cross_rows(self.entity_grams_eval, left, self.eval_data)
      return rows, rows_eval
    if self.gram_mode == "precomputed":
      rows = self.gram[batch_idx]
      rows_eval = None if self.gram_eval is None else self.gram_eval[batch_idx]
      return rows, rows_eval
    rows = self.data.gram(rows=batch_idx)
    rows_eval = (None if self.eval_data is None
                 else self.data.gram(rows=batch_idx, other=self.eval_data))
    return rows, rows_eval

  def full_gram(self) -> jax.Array:
    """The ``(n, n)`` training Gram in every mode (stored, or formed now: ``O(n^2)``).

    For the uses that need all of it (the implicit init, ``resync``), never per step.
    """
    if self.gram_mode == "precomputed":
      return self.gram
    if self.gram_mode == "entities":
      return gram_from_entity_grams(self.entity_grams, self.data.index, self.data.index)
    return self.data.gram()

  def full_gram_eval(self) -> jax.Array | None:
    """The ``(n, n_e)`` cross Gram in every mode (None without eval data)."""
    if self.eval_data is None:
      return None
    if self.gram_mode == "precomputed":
      return self.gram_eval
    if self.gram_mode == "entities":
      return _cross_rows(self.entity_grams_eval, self.data.index, self.eval_data)
    return self.data.gram(other=self.eval_data)


def stack(datasets: Sequence[Dataset]) -> Dataset:
  """Stacks datasets of equal shapes along a new leading axis, for ``jax.vmap``.

  Every leaf (points, labels, Grams, the fingerprint) gains a leading axis of
  size ``S = len(datasets)``: map over it with ``jax.vmap(..., in_axes=0)``
  (``kronjax.init``, ``kronjax.train_step`` and ``kronjax.evaluate`` accept one
  member inside the map, and each member's state keeps that member's
  fingerprint). For bootstrap resamples or folds of equal size, from
  ``Dataset.take``. The stacked object itself is only for ``vmap``: entry points
  given it on the host refuse it.

  Raises:
    TypeError: not a non-empty sequence of ``kronjax.Dataset``.
    ValueError: datasets that differ in gram mode, ``normalized``, eval split,
      label structure, or a leaf's shape or dtype (the message names which).
  """
  datasets = list(datasets) if isinstance(datasets, (list, tuple)) else datasets
  if not isinstance(datasets, list) or not datasets or not all(
      isinstance(d, Dataset) for d in datasets):
    raise TypeError("datasets must be a non-empty list of kronjax.Dataset (e.g. "
                    "[dataset.take(idx) for idx in resamples]).")
  first = datasets[0]
  for i, d in enumerate(datasets):
    if np.ndim(d.fingerprint) != 1:
      raise ValueError(f"datasets[{i}] is already stacked; stack unstacked datasets only.")
    if jax.tree.structure(d) != jax.tree.structure(first):
      raise ValueError(
          f"datasets[{i}] differs from datasets[0] in structure (gram mode {d.gram_mode!r} vs "
          f"{first.gram_mode!r}, normalized {d.normalized} vs {first.normalized}, eval split "
          f"{d.eval_data is not None} vs {first.eval_data is not None}, or the labels' pytree); "
          "stack datasets built the same way.")
    for field in ("data", "labels", "eval_data", "eval_labels", "gram", "gram_eval", "entity_grams",
                  "entity_grams_eval"):
      for a, b in zip(jax.tree.leaves(getattr(d, field)), jax.tree.leaves(getattr(first, field))):
        if a.shape == b.shape and a.dtype == b.dtype:
          continue
        raise ValueError(
            f"datasets[{i}].{field} has a leaf of shape {a.shape} {a.dtype} but "
            f"datasets[0] has {b.shape} {b.dtype}; stacked datasets need equal shapes (draw "
            "resamples of one size: dataset.take(idx) with idx of one length).")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *datasets)


def _cross_rows(grams_eval: tuple[jax.Array, ...], left: jax.Array,
                eval_data: KronData) -> jax.Array:
  """``(a, n_e)`` cross Gram of the training points ``left`` ``(a, p)`` to the eval points."""
  if eval_data.is_indexed:
    return gram_from_entity_grams(grams_eval, left, eval_data.index)
  prod = None  # per-point eval: the cross entity Grams are (N_q, n_e); gather rows only
  for q, g in enumerate(grams_eval):
    r = g[left[:, q]]
    prod = r if prod is None else prod * r
  return prod


def _warn_unless_unit_norm(data: KronData, eval_data: KronData | None) -> None:
  for name, points in [("data", data)] + ([] if eval_data is None else [("eval_data", eval_data)]):
    if warn_unless_unit_norm(name, points, stacklevel=4):
      return


def warn_unless_unit_norm(name: str, points: KronData, *, stacklevel: int = 3) -> bool:
  """One ``NormWarning`` when concrete ``points`` have a squared norm outside ``NORM_BAND``;
  returns whether it warned (traced points are not checked)."""
  if not all(checks.is_concrete(f) for f in jax.tree.leaves(points)):
    return False
  sq = np.asarray(points.sq_norms())
  lo, hi = float(sq.min()), float(sq.max())
  if NORM_BAND[0] <= lo and hi <= NORM_BAND[1]:
    return False
  warnings.warn(
      f"{name} is not unit-norm: ||x||^2 ranges over [{lo:.3g}, {hi:.3g}]. The threshold b and "
      "the capacities assume ||x|| = 1 (at init <w, x> ~ N(0, ||x||^2)), so far more neurons "
      "fire than m Q(b) and training may diverge. Pass kronjax.Dataset(..., normalize=True) "
      "or normalize the points yourself (KronData.normalize()).", NormWarning,
      stacklevel=stacklevel)
  return True


def _check_labels(name: str, labels: Any, data: KronData) -> Any:
  """Row count, finiteness and dtype; the loss-specific checks run in ``kronjax.init``.

  An array (or list) needs ``n`` rows; any other pytree (a dict of targets and
  weights, ...) is the labels of a loss of one's own, and each leaf needs leading
  axis ``n`` (errors name the leaf's path). Float leaves follow the data's dtype,
  integer leaves become int32, bool leaves stay bool.
  """
  if isinstance(labels, KronData) or labels is None:
    raise TypeError(f"{name} must be an array of targets or class ids, got "
                    f"{type(labels).__name__}.")
  if hasattr(labels, "shape") or isinstance(labels, list):
    if not hasattr(labels, "shape"):
      labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] != data.n:
      raise ValueError(f"{name} must have shape ({data.n},) or ({data.n}, C) (one row per "
                       f"point), got {tuple(labels.shape)}.")
    return _label_leaf(name, labels, data.dtype)
  tree = checks.check_label_tree(labels, data.n, name)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(
      treedef, [_label_leaf(name + jax.tree_util.keystr(path), leaf, data.dtype)
                for path, leaf in leaves])


def _label_leaf(name: str, labels: Any, dtype: Any = None) -> jax.Array:
  kind = np.dtype(labels.dtype).kind
  if kind == "f":
    checks.check_finite(name, labels)
    return jnp.asarray(labels, dtype)  # labels follow the data's dtype
  if kind in "iu":
    return jnp.asarray(labels, jnp.int32)
  if kind == "b" and dtype is not None:  # a pytree leaf (a mask) may be bool
    return jnp.asarray(labels)
  raise TypeError(f"{name} must hold floats (regression targets) or integers (class ids), "
                  f"got dtype {labels.dtype}.")


FINGERPRINT_WORDS = 8  # a sha256 as uint32 words


def fingerprint(dataset: Dataset) -> jax.Array:
  """``(8,)`` uint32: sha256 over the training and eval factors (the tables and index of
  indexed data) and labels (shapes, dtypes, bytes); all zeros ("unknown") when any of them
  is traced (a dataset built inside ``jit``), whose checks are then skipped."""
  words = fingerprint_words(dataset)
  return (jnp.zeros((FINGERPRINT_WORDS,), jnp.uint32) if words is None
          else jnp.asarray(words))


def fingerprint_words(dataset: Dataset) -> np.ndarray | None:
  """``fingerprint`` as a host ``(8,)`` uint32 array; None when any input is traced."""
  parts = [("data", dataset.data.factors), _labels_part("labels", dataset.labels)]
  if dataset.data.is_indexed:  # per-point data hashes as it always did
    parts.append(("data_index", (dataset.data.index,)))
  if dataset.eval_data is not None:
    parts.append(("eval_data", dataset.eval_data.factors))
    if dataset.eval_data.is_indexed:
      parts.append(("eval_data_index", (dataset.eval_data.index,)))
  if dataset.eval_labels is not None:
    parts.append(_labels_part("eval_labels", dataset.eval_labels))
  if not all(checks.is_concrete(x) for _, arrays in parts for x in arrays):
    return None
  h = hashlib.sha256()
  for name, arrays in parts:
    h.update(name.encode())
    for x in arrays:
      arr = np.ascontiguousarray(jax.device_get(x))
      h.update(f"{arr.dtype.name}{arr.shape}".encode())
      h.update(arr.tobytes())
  return np.frombuffer(h.digest(), np.uint32)


def _labels_part(name: str, labels: Any) -> tuple[str, tuple]:
  """An array hashes as it always did; a pytree of labels adds its structure to the name."""
  if hasattr(labels, "shape"):
    return name, (labels,)
  leaves, treedef = jax.tree.flatten(labels)
  return f"{name}{treedef}", tuple(leaves)


def fingerprint_text(fp: Any) -> str | None:
  """A fingerprint as hex (for messages and manifests), None when unknown or traced."""
  if not checks.is_concrete(fp):
    return None
  words = np.asarray(fp)
  if words.shape != (FINGERPRINT_WORDS,) or words.dtype != np.uint32:
    return "malformed (the dataset was rebuilt leaf by leaf, e.g. with jax.tree.map; use dataset.take)"
  if not words.any():
    return None
  return words.tobytes().hex()


def same_fingerprint(a: jax.Array, b: jax.Array) -> jax.Array:
  """``()`` bool, traceable: equal fingerprints, or either unknown (all zeros)."""
  return jnp.all(a == b) | ~jnp.any(a) | ~jnp.any(b)


def check_dataset(name: str, dataset: Any, *, fingerprint: Any, n: int,
                  n_eval: int) -> Dataset:
  """Raises unless ``dataset`` is the dataset a state was built from.

  Args:
    name: the argument's name in the caller (for the message).
    fingerprint: the state's record of its dataset (``(8,)`` uint32, or None to
      check the point counts only); compared on the host when both are concrete.
    n, n_eval: the point counts the state's arrays were built for.
  """
  if not isinstance(dataset, Dataset):
    raise TypeError(f"{name} must be a kronjax.Dataset, got {type(dataset).__name__}; build it "
                    "with kronjax.Dataset(data, labels, eval_data=..., eval_labels=...).")
  check_layout(name, dataset)
  if dataset.n != n or dataset.n_eval != n_eval:
    raise ValueError(
        f"{name} has n={dataset.n} training and {dataset.n_eval} eval points, but the state was "
        f"built for n={n} and {n_eval}; pass the dataset given to kronjax.init.")
  check_consistent(name, dataset)
  if fingerprint is None:  # the jitted step compares fingerprints itself: no device read here
    return dataset
  mine, theirs = fingerprint_text(fingerprint), fingerprint_text(dataset.fingerprint)
  if mine is not None and theirs is not None and mine != theirs:
    raise ValueError(
        f"{name} is not the dataset this state was built from (its fingerprint "
        f"{theirs[:12]}… differs from the state's {mine[:12]}…: other "
        "factors, labels or eval split). Pass the dataset given to kronjax.init, or build a "
        "new state for this one.")
  return dataset


def check_layout(name: str, dataset: Dataset) -> None:
  """Refuses a stacked dataset on the host and one rebuilt leaf by leaf (shapes only,
  so traced datasets are checked too; one member inside ``jax.vmap`` passes)."""
  shape = np.shape(dataset.fingerprint)
  if shape == (FINGERPRINT_WORDS,):
    return
  if len(shape) >= 2 and shape[-1] == FINGERPRINT_WORDS:
    raise ValueError(
        f"{name} is a stacked dataset ({shape[0]} members, from kronjax.Dataset.stack): map over it "
        "with jax.vmap (in_axes=0), or pass one member (dataset.take(idx)).")
  raise ValueError(
      f"{name} was rebuilt leaf by leaf (its fingerprint has shape {shape}, not "
      f"({FINGERPRINT_WORDS},)): jax.tree.map(lambda x: x[idx], dataset) takes the Gram's rows "
      "but not its columns, so its Gram no longer matches its points. Use dataset.take(idx) for "
      "a resample or fold (rows and columns taken, a fingerprint of its own), and "
      "kronjax.Dataset.stack([...]) to vmap over several.")


_CONSISTENT = weakref.WeakSet()   # datasets whose fingerprint was recomputed and matched


def check_consistent(name: str, dataset: Dataset) -> None:
  """Refuses a dataset whose fingerprint is not that of its own points and labels: one
  rebuilt leaf by leaf (``jax.tree.map(lambda x: x[idx], dataset)`` on every leaf but the
  fingerprint) or edited by hand, whose Gram may disagree with its points and which a state
  would otherwise take for its own dataset. Recomputes the fingerprint (a host pass over the
  factors and labels, never the Gram) once per dataset object; traced datasets and arrays
  spread over several processes are not checked."""
  if dataset in _CONSISTENT:
    return
  leaves = jax.tree.leaves(dataset)
  if not all(checks.is_concrete(x) and getattr(x, "is_fully_addressable", True) for x in leaves):
    return
  stored = fingerprint_text(dataset.fingerprint)
  if stored is not None and fingerprint_words(dataset).tobytes().hex() != stored:
    raise ValueError(
        f"{name}'s fingerprint is not that of its own points and labels: the dataset was rebuilt "
        "leaf by leaf (jax.tree.map(lambda x: x[idx], dataset) takes the Gram's rows but not its "
        "columns, and keeps the old fingerprint) or edited by hand. Use dataset.take(idx) for a "
        "resample or fold (rows and columns taken, a fingerprint of its own), or build a new "
        "kronjax.Dataset.")
  _CONSISTENT.add(dataset)
