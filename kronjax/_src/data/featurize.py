"""Fixed-length features for drugs (SMILES) and proteins (amino-acid sequences).

Glossary of shape letters used in this module:
  N   number of molecules or sequences
  A   alphabet size (20 standard amino acids by default)
  k   k-mer length; ``A**k`` features per sequence

``morgan_fingerprints`` needs RDKit, an optional dependency
(``pip install 'kronjax[pairwise]'``); ``kmer_composition`` is plain numpy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kronjax._src.base import checks

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
"""The 20 standard amino acids, one-letter codes in alphabetical order."""

_RDKIT_HINT = "pip install 'kronjax[pairwise]'"


def _check_strings(name: str, values: Any, what: str) -> list[str]:
  if isinstance(values, (str, bytes)):
    raise TypeError(
        f"{name} must be a sequence of {what} strings, got a single string; "
        f"wrap it in a list: [{name}].")
  try:
    values = list(values)
  except TypeError:
    raise TypeError(
        f"{name} must be a sequence of {what} strings, got {type(values).__name__}.") from None
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise TypeError(f"{name}[{i}] must be a str ({what}), got {type(v).__name__} ({v!r}).")
  if not values:
    raise ValueError(f"{name} is empty; pass at least one {what} string.")
  return values


def morgan_fingerprints(smiles: Sequence[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
  """Morgan (ECFP-like) bit fingerprints of molecules given as SMILES.

  Args:
    smiles: ``N`` SMILES strings.
    radius: Morgan radius (2 gives ECFP4-like bits).
    n_bits: fingerprint length.

  Returns:
    ``(N, n_bits)`` float32 array of 0/1 bits.

  Raises:
    ImportError: RDKit is not installed (the message gives the install command).
    TypeError: ``smiles`` is not a sequence of strings.
    ValueError: a SMILES string does not parse (the message names its position),
      ``smiles`` is empty, or ``radius``/``n_bits`` is out of range.
  """
  smiles = _check_strings("smiles", smiles, "SMILES")
  radius = checks.check_positive_int("radius", radius, minimum=0)
  n_bits = checks.check_positive_int("n_bits", n_bits)
  try:
    from rdkit import Chem, rdBase  # pylint: disable=import-outside-toplevel
    from rdkit.Chem import rdFingerprintGenerator  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "morgan_fingerprints needs RDKit, an optional dependency of kronjax; install it "
        f"with `{_RDKIT_HINT}` (or `pip install rdkit`).") from e
  generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
  out = np.zeros((len(smiles), n_bits), np.float32)
  blocker = rdBase.BlockLogs()  # RDKit's parse errors become our ValueError
  try:
    for i, s in enumerate(smiles):
      mol = Chem.MolFromSmiles(s)
      if mol is None:
        raise ValueError(
            f"smiles[{i}] = {s!r} is not a valid SMILES string (RDKit could not parse it); "
            "fix or drop that molecule.")
      out[i] = generator.GetFingerprintAsNumPy(mol)
  finally:
    del blocker  # logging comes back when the blocker is released
  return out


def kmer_composition(sequences: Sequence[str], *, k: int = 3,
                     alphabet: str = AMINO_ACIDS) -> np.ndarray:
  """k-mer frequencies of sequences over an alphabet.

  Feature ``j`` of a row is the fraction of the sequence's k-mers equal to the
  k-mer with base-``A`` digits ``j`` (first letter most significant; letters in
  ``alphabet`` order). Letters are matched case-insensitively; a k-mer that
  contains a letter outside ``alphabet`` is skipped (not counted in the total).

  Args:
    sequences: ``N`` strings (protein sequences by default).
    k: k-mer length, ``>= 1``.
    alphabet: ``A`` distinct ASCII letters.

  Returns:
    ``(N, A**k)`` float32 array; each row sums to 1.

  Raises:
    TypeError: ``sequences`` is not a sequence of strings.
    ValueError: ``sequences`` is empty, ``k``/``alphabet`` is invalid, or a
      sequence has no k-mer of known letters (the message names its position).
  """
  sequences = _check_strings("sequences", sequences, "sequence")
  k = checks.check_positive_int("k", k)
  if (not isinstance(alphabet, str) or not alphabet or not alphabet.isascii()
      or len(set(alphabet.upper())) != len(alphabet)):
    raise ValueError(
        f"alphabet must be a non-empty string of distinct ASCII letters (case-insensitive), "
        f"got {alphabet!r}.")
  a = len(alphabet)
  width = a**k
  if len(sequences) * width > 2**31:
    raise ValueError(
        f"k={k} gives {width} features per sequence, {len(sequences) * width} values for "
        f"{len(sequences)} sequences; use a smaller k.")
  code = np.full(256, -1, np.int64)
  code[np.frombuffer(alphabet.upper().encode("ascii"), np.uint8)] = np.arange(a)
  # One array of all sequences, each followed by a separator (code -1), so no
  # valid window crosses two sequences.
  joined = "\0".join(s.upper() for s in sequences) + "\0"
  codes = code[np.frombuffer(joined.encode("ascii", errors="replace"), np.uint8)]
  lengths = np.array([len(s) + 1 for s in sequences])
  owner = np.repeat(np.arange(len(sequences)), lengths)
  n_win = codes.size - k + 1
  index = np.zeros(max(n_win, 0), np.int64)
  valid = np.ones(max(n_win, 0), bool)
  for j in range(k):
    c = codes[j:j + n_win]
    index = index * a + c
    valid &= c >= 0
  flat = owner[:n_win][valid] * width + index[valid]
  keys, counts = np.unique(flat, return_counts=True)
  out = np.zeros((len(sequences), width), np.float32)
  out[keys // width, keys % width] = counts
  totals = out.sum(axis=1, keepdims=True)
  empty = np.flatnonzero(totals[:, 0] == 0)
  if empty.size:
    i = int(empty[0])
    raise ValueError(
        f"sequences[{i}] (length {len(sequences[i])}) has no {k}-mer made only of letters in "
        f"alphabet ({empty.size} such sequence(s)); drop it or use a smaller k.")
  return out / totals
