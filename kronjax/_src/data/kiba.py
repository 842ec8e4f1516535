"""The KIBA drug-target affinity benchmark as published with DeepDTA.

Glossary of shape letters used in this module:
  N_d  drugs (2,111)               N_t  targets (229)
  n    measured (drug, target) pairs (118,254)

``fetch_kiba`` downloads the files of the DeepDTA repository's ``data/kiba``
folder once into a data home (in the manner of scikit-learn's ``fetch_*``),
checks each file's checksum before reading it, and parses them:

* ``ligands_can.txt``: a JSON object ``{ChEMBL id: canonical SMILES}`` in drug order;
* ``proteins.txt``: a JSON object ``{UniProt id: sequence}`` in target order;
* ``Y``: a pickled ``(N_d, N_t)`` float array of KIBA scores, NaN where unmeasured
  (unpickled only after its checksum matched, and only numpy arrays are accepted);
* ``folds/train_fold_setting1.txt`` / ``folds/test_fold_setting1.txt``: JSON lists
  (five lists / one list) of indices into the measured pairs, which DeepDTA orders
  as ``np.where(~np.isnan(Y))`` does (row-major: by drug, then target);
* ``kiba_drug_sim.txt`` / ``kiba_target_sim.txt``: whitespace-separated
  ``(N_d, N_d)`` / ``(N_t, N_t)`` similarity matrices, in the same entity order.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import urllib.error
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from kronjax._src.base import checks
from kronjax._src.data import cache

BASE_URL = "https://raw.githubusercontent.com/hkmztrk/DeepDTA/master/data/kiba/"
"""Where the files are downloaded from: ``BASE_URL + <file name>``."""

ENV_DATA_HOME = "KRONJAX_DATA"
"""Environment variable naming the data home when ``data_home`` is not given."""

SUBDIR = "kiba"
"""The folder of the data home that holds the KIBA files."""

KIBA_CHECKSUMS: dict[str, str] = {
    "ligands_can.txt": "sha256:a95797abaf31b17bd2471dbf3e3476f588d5a79797903cc156528f66e55c963b",
    "proteins.txt": "sha256:2ba9dbc2959d88b0740aaf28828c4c611c2dbd1c2019547eb2ec1c3daa192604",
    "Y": "sha256:53857b84218ba3d60293c70ab79e2abd83d615d06218c73c150f6dfb4c7134a6",
    "folds/train_fold_setting1.txt":
        "sha256:da74eeeb2c3e7d52a2fd6daac0dc105bba097c222337230eec69d9fd7e1c301e",
    "folds/test_fold_setting1.txt":
        "sha256:92801eec2caddf950235c6c6a46d999d2eeeaa6d35cbeffd68c72a5cf54b208d",
    "kiba_target_sim.txt":
        "sha256:43943439c1498539a8526b3a1ca12d8d2e02b8c5811ace92c056ae5ce6f05891",
    # Only the git blob id of this file is on record: sha1(b"blob <size>\0" + bytes).
    "kiba_drug_sim.txt": "git-blob:f6e87ef20b48bdd1b7fa6e68583727ad7ec8ac5e",
}
"""Checksum of every file, ``"<algorithm>:<hex digest>"`` with algorithm
``sha256`` or ``git-blob`` (git's object id of the file's bytes), keyed by the
file's path relative to the KIBA folder."""

ENTITY_FILES = ("ligands_can.txt", "proteins.txt")
AFFINITY_FILE = "Y"
TRAIN_FOLDS_FILE = "folds/train_fold_setting1.txt"
TEST_FOLD_FILE = "folds/test_fold_setting1.txt"
SIMILARITY_FILES = {"drug": "kiba_drug_sim.txt", "target": "kiba_target_sim.txt"}


class KibaData(NamedTuple):
  """The KIBA benchmark, setting 1 (random split of the measured pairs).

  Attributes:
    smiles: ``N_d`` canonical SMILES strings, in drug order.
    sequences: ``N_t`` amino-acid sequences, in target order.
    drug_ids: ``N_d`` ChEMBL ids.
    target_ids: ``N_t`` UniProt ids.
    affinity: ``(N_d, N_t)`` float64 KIBA scores, NaN where unmeasured.
    pairs: ``(n, 2)`` int32 ``(drug, target)`` of the measured pairs, in the
      order the fold files index (row-major over ``affinity``).
    labels: ``(n,)`` float64, ``affinity[pairs[:, 0], pairs[:, 1]]``.
    train_folds: five ``(n_f,)`` int32 arrays of indices into ``pairs``.
    test_fold: ``(n_test,)`` int32 indices into ``pairs``.
    drug_similarity: ``(N_d, N_d)`` float64, or None when not requested.
    target_similarity: ``(N_t, N_t)`` float64, or None when not requested.
  """
  smiles: list[str]
  sequences: list[str]
  drug_ids: list[str]
  target_ids: list[str]
  affinity: np.ndarray  # shape=(N_d, N_t), dtype=float64
  pairs: np.ndarray  # shape=(n, 2), dtype=int32
  labels: np.ndarray  # shape=(n,), dtype=float64
  train_folds: list[np.ndarray]  # each shape=(n_f,), dtype=int32
  test_fold: np.ndarray  # shape=(n_test,), dtype=int32
  drug_similarity: np.ndarray | None  # shape=(N_d, N_d), dtype=float64
  target_similarity: np.ndarray | None  # shape=(N_t, N_t), dtype=float64


# --------------------------------------------------------------------------- parsing


def parse_entities(text: str, *, name: str) -> tuple[list[str], list[str]]:
  """``(ids, strings)`` from a JSON object ``{id: string}``, in file order.

  Raises:
    ValueError: the text is not a JSON object of strings, is empty, or repeats
      an id (the message names ``name``, the file).
  """
  try:
    items = json.loads(text, object_pairs_hook=list)
  except json.JSONDecodeError as e:
    raise ValueError(f"{name} is not valid JSON ({e}); delete it and fetch it again.") from None
  if not isinstance(items, list) or not items:
    raise ValueError(f"{name} must hold a non-empty JSON object {{id: string}}.")
  ids = [k for k, _ in items]
  values = [v for _, v in items]
  if len(set(ids)) != len(ids):
    dup = next(k for k in ids if ids.count(k) > 1)
    raise ValueError(f"{name} repeats the id {dup!r}; each entity must appear once.")
  for k, v in items:
    if not isinstance(v, str):
      raise ValueError(f"{name}: the value of {k!r} must be a string, got {type(v).__name__}.")
  return ids, values


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain numpy arrays and refuses every other global."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load the global {module}.{name}: the affinity pickle may only hold "
          "a numpy array.")
    if name == "_reconstruct":
      try:
        from numpy._core import multiarray  # pylint: disable=import-outside-toplevel
      except ImportError:  # numpy < 1.26
        from numpy.core import multiarray  # pylint: disable=import-outside-toplevel
      return multiarray._reconstruct  # pylint: disable=protected-access
    return super().find_class(module, name)


def parse_affinity(data: bytes, *, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
  """The ``(N_d, N_t)`` float64 affinity matrix from DeepDTA's pickle (NaN unmeasured).

  Only numpy arrays are unpickled (any other global is refused); Python 2
  pickles are read with ``encoding="latin1"``. Call it on verified bytes only.

  Raises:
    ValueError: the pickle holds something other than a 2-D real array, the
      shape differs from ``shape``, or a value is inf (names ``name``).
  """
  try:
    arr = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"{name} is not a pickled numpy array ({e}).") from None
  if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "iuf":
    got = f"shape {arr.shape}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
    raise ValueError(f"{name} must hold a 2-D real array (drugs x targets), got {got}.")
  if shape is not None and arr.shape != tuple(shape):
    raise ValueError(
        f"{name} holds a {arr.shape} matrix, but the entity files list {tuple(shape)} "
        "(drugs x targets); the files come from different releases: delete them and fetch again.")
  arr = np.array(arr, np.float64)
  if np.any(np.isinf(arr)):
    raise ValueError(f"{name} holds inf values; only finite scores and NaN (unmeasured) are valid.")
  return arr


def measured_pairs(affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(pairs (n, 2) int32, labels (n,))`` of the non-NaN entries, row-major.

  This is DeepDTA's ``label_row_inds, label_col_inds = np.where(~np.isnan(Y))``:
  the order the fold files index into.
  """
  rows, cols = np.nonzero(~np.isnan(affinity))
  pairs = np.stack([rows, cols], axis=1).astype(np.int32)
  return pairs, affinity[rows, cols]


def parse_folds(text: str, *, name: str, n_pairs: int | None = None) -> list[np.ndarray]:
  """A JSON list of index lists (or one flat list) as a list of int32 arrays.

  A flat list (the test fold) gives a one-element list.

  Raises:
    ValueError: the text is not JSON lists of integers, or an index falls
      outside ``[0, n_pairs)`` (names ``name``).
  """
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{name} is not valid JSON ({e}); delete it and fetch it again.") from None
  if not isinstance(raw, list) or not raw:
    raise ValueError(f"{name} must hold a non-empty JSON list of pair indices.")
  nested = isinstance(raw[0], list)
  folds = raw if nested else [raw]
  out = []
  for f, fold in enumerate(folds):
    where = f"{name}[{f}]" if nested else name
    if not isinstance(fold, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in fold):
      raise ValueError(f"{where} must be a list of integer pair indices.")
    arr = np.asarray(fold, np.int64)
    if n_pairs is not None and arr.size and (arr.min() < 0 or arr.max() >= n_pairs):
      raise ValueError(
          f"{where} holds indices in [{arr.min()}, {arr.max()}], outside [0, {n_pairs}) "
          "(the measured pairs of Y); the fold and affinity files come from different releases.")
    out.append(arr.astype(np.int32))
  return out


def parse_matrix(text: str, *, name: str, shape: tuple[int, int]) -> np.ndarray:
  """A whitespace-separated float matrix, checked to have ``shape`` and finite values."""
  try:
    arr = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2)
  except ValueError as e:
    raise ValueError(f"{name} is not a whitespace-separated matrix of numbers ({e}).") from None
  if arr.shape != tuple(shape):
    raise ValueError(f"{name} must be a {tuple(shape)} matrix (one row per entity), got {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} holds NaN or inf; a similarity matrix must be finite.")
  return arr


# --------------------------------------------------------------------------- files


def kiba_home(data_home: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding the KIBA files: ``<data_home>/kiba``.

  ``data_home`` defaults to ``$KRONJAX_DATA``, else ``~/.cache/kronjax/datasets``.
  """
  if data_home is None:
    data_home = os.environ.get(ENV_DATA_HOME) or pathlib.Path("~/.cache/kronjax/datasets")
  return pathlib.Path(data_home).expanduser() / SUBDIR


def file_checksum(path: str | os.PathLike, algorithm: str) -> str:
  """Hex digest of a file: ``sha256``, or ``git-blob`` (git's blob object id)."""
  if algorithm not in ("sha256", "git-blob"):
    raise ValueError(f"algorithm must be 'sha256' or 'git-blob', got {algorithm!r}.")
  return cache.file_checksum(path, algorithm)


def _split_checksum(file: str, checksum: str) -> tuple[str, str]:
  return cache.split_checksum(file, checksum, ("sha256", "git-blob"))


def _verify(path: pathlib.Path, file: str, checksum: str, *, downloaded_from: str | None) -> None:
  algorithm, expected = _split_checksum(file, checksum)
  got = file_checksum(path, algorithm)
  if got == expected:
    return
  if downloaded_from is not None:
    raise ValueError(
        f"{file} downloaded from {downloaded_from} has {algorithm} {got}, expected {expected}; "
        "the download was corrupted or the file changed upstream. Nothing was saved; try "
        "again, or place a file with the expected checksum by hand.")
  raise ValueError(
      f"{file} in {path.parent} has {algorithm} {got}, expected {expected}: the file is "
      f"corrupted or from another release. Delete it ({path}) and call fetch_kiba again to "
      "download it, or place the right file there by hand.")


def _download(url: str, dest: pathlib.Path, file: str, checksum: str) -> None:
  """Downloads ``url`` to ``dest``, saved only once its checksum matched."""
  cache.download(url, dest, lambda tmp: _verify(tmp, file, checksum, downloaded_from=url))


def _how_to_place(home: pathlib.Path, files: Iterable[str], base_url: str) -> str:
  lines = [f"  {base_url}{f}\n    -> {home / f}" for f in files]
  return (f"Download them by hand and place them in {home} (keeping the folds/ subfolder):\n"
          + "\n".join(lines)
          + f"\nor set data_home (or ${ENV_DATA_HOME}) to a folder whose {SUBDIR}/ holds them.")


def ensure_files(files: Sequence[str], *, data_home: str | os.PathLike | None = None,
                 download: bool = True, checksums: Mapping[str, str] | None = None,
                 base_url: str = BASE_URL) -> dict[str, pathlib.Path]:
  """Makes sure every file is in the KIBA folder with the right checksum.

  Missing files are downloaded (when ``download``) to a temporary file,
  verified, then renamed into place; present files are verified too.

  Returns:
    ``{file: path}`` for every file.

  Raises:
    FileNotFoundError: files are missing and ``download`` is False (the message
      lists the URLs and the folder to place them in).
    OSError: a download failed (same message, and the cause).
    ValueError: a file's checksum does not match (the message names the file
      and says to delete it).
  """
  checksums = KIBA_CHECKSUMS if checksums is None else checksums
  for f in files:
    if f not in checksums:
      raise ValueError(
          checks.unknown_key_message("file (no checksum on record)", f, checksums.keys()))
    _split_checksum(f, checksums[f])
  home = kiba_home(data_home)
  paths = {f: home / f for f in files}
  missing = [f for f in files if not paths[f].is_file()]
  if missing and not download:
    raise FileNotFoundError(
        f"KIBA files missing from {home}: {', '.join(missing)} (download=False). "
        + _how_to_place(home, missing, base_url))
  for f in missing:
    url = base_url + f
    try:
      _download(url, paths[f], f, checksums[f])
    except (urllib.error.URLError, OSError) as e:
      raise OSError(
          f"Could not download {url} ({e}); KIBA files missing from {home}: "
          f"{', '.join(m for m in missing if not paths[m].is_file())}. "
          + _how_to_place(home, [m for m in missing if not paths[m].is_file()], base_url)) from e
  for f in files:
    if f not in missing:
      _verify(paths[f], f, checksums[f], downloaded_from=None)
  return paths


# --------------------------------------------------------------------------- loader


def fetch_kiba(data_home: str | os.PathLike | None = None, *, download: bool = True,
               similarities: Sequence[str] = ("drug", "target"),
               checksums: Mapping[str, str] | None = None,
               base_url: str = BASE_URL) -> KibaData:
  """Loads the KIBA benchmark (DeepDTA's files), downloading it once if needed.

  Files live in ``<data_home>/kiba`` (``data_home`` defaults to
  ``$KRONJAX_DATA``, else ``~/.cache/kronjax/datasets``). Every file's checksum
  is verified before it is read.

  Args:
    data_home: folder holding the ``kiba/`` data folder.
    download: fetch missing files from ``base_url``; with False, missing files
      raise ``FileNotFoundError`` that says where to place them.
    similarities: which similarity matrices to load, a subset of
      ``("drug", "target")``; the others are None and their files are not needed.
    checksums: ``{file: "sha256:<hex>" | "git-blob:<hex>"}``; default
      ``KIBA_CHECKSUMS``.
    base_url: prefix of the download URLs.

  Returns:
    ``KibaData`` (see its fields; ``pairs`` in the order the folds index).

  Raises:
    FileNotFoundError: files are missing and ``download`` is False.
    OSError: a download failed.
    ValueError: a checksum does not match (delete the named file), a file does
      not parse, the files disagree on sizes, or ``similarities`` names an
      unknown matrix.
  """
  if isinstance(similarities, str):
    similarities = (similarities,)
  unknown = [s for s in similarities if s not in SIMILARITY_FILES]
  if unknown:
    raise ValueError(
        f"similarities must be a subset of {tuple(SIMILARITY_FILES)}, got {tuple(similarities)!r}; "
        f"drop {unknown[0]!r}.")
  files = [*ENTITY_FILES, AFFINITY_FILE, TRAIN_FOLDS_FILE, TEST_FOLD_FILE]
  files += [SIMILARITY_FILES[s] for s in SIMILARITY_FILES if s in similarities]
  paths = ensure_files(files, data_home=data_home, download=download, checksums=checksums,
                       base_url=base_url)
  read = lambda f: paths[f].read_text(encoding="utf-8")  # pylint: disable=unnecessary-lambda-assignment
  drug_ids, smiles = parse_entities(read("ligands_can.txt"), name="ligands_can.txt")
  target_ids, sequences = parse_entities(read("proteins.txt"), name="proteins.txt")
  shape = (len(smiles), len(sequences))
  affinity = parse_affinity(paths[AFFINITY_FILE].read_bytes(), name=AFFINITY_FILE, shape=shape)
  pairs, labels = measured_pairs(affinity)
  train_folds = parse_folds(read(TRAIN_FOLDS_FILE), name=TRAIN_FOLDS_FILE, n_pairs=len(pairs))
  test_folds = parse_folds(read(TEST_FOLD_FILE), name=TEST_FOLD_FILE, n_pairs=len(pairs))
  if len(test_folds) != 1:
    raise ValueError(f"{TEST_FOLD_FILE} must hold one flat list of indices, got {len(test_folds)} lists.")
  sim = {}
  for s, size in (("drug", shape[0]), ("target", shape[1])):
    f = SIMILARITY_FILES[s]
    sim[s] = parse_matrix(read(f), name=f, shape=(size, size)) if s in similarities else None
  return KibaData(smiles=smiles, sequences=sequences, drug_ids=drug_ids, target_ids=target_ids,
                  affinity=affinity, pairs=pairs, labels=labels, train_folds=train_folds,
                  test_fold=test_folds[0], drug_similarity=sim["drug"],
                  target_similarity=sim["target"])
