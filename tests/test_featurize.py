"""Tests for entity features: ``kernel_features`` (similarity matrices),
``kmer_composition`` (sequences) and ``morgan_fingerprints`` (SMILES, needs RDKit)."""

import collections
import itertools
import math
import sys
import time

import numpy as np
import pytest

import kronjax
from kronjax._src.data.featurize import AMINO_ACIDS


# --------------------------------------------------------------------------- kernel_features


def normalized(K):
  d = np.sqrt(np.diag(K))
  return K / d[:, None] / d[None, :]


@pytest.mark.parametrize("rank", [8, 5])
def test_psd_input_is_reproduced_exactly(rank):
  rng = np.random.default_rng(0)
  F0 = rng.normal(size=(8, rank))
  K = F0 @ F0.T
  out = kronjax.data.kernel_features(K)
  assert out.features.shape == (8, rank) and out.rank == rank
  assert out.features.dtype == np.float64
  assert out.clipped == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out.features @ out.features.T, normalized(K), rtol=0, atol=1e-10)


def test_indefinite_input_reports_the_clipped_mass():
  rng = np.random.default_rng(1)
  Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  lam = np.array([3.0, 2.0, 1.0, -0.5, -0.5])
  K = (Q * lam) @ Q.T
  out = kronjax.data.kernel_features(K)
  assert out.rank == 3
  assert out.clipped == pytest.approx(1.0 / 7.0, rel=1e-12)
  psd = (Q[:, :3] * lam[:3]) @ Q[:, :3].T
  np.testing.assert_allclose(out.features @ out.features.T, normalized(psd), rtol=0, atol=1e-10)


def test_asymmetric_input_is_symmetrized_and_ints_accepted():
  rng = np.random.default_rng(2)
  F0 = rng.normal(size=(6, 6))
  K = F0 @ F0.T
  A = rng.normal(size=(6, 6))
  skewed = kronjax.data.kernel_features(K + (A - A.T))
  np.testing.assert_allclose(skewed.features @ skewed.features.T, normalized(K), atol=1e-10)
  ints = kronjax.data.kernel_features(np.array([[2, 1], [1, 2]]))
  np.testing.assert_allclose(ints.features @ ints.features.T, [[1, 0.5], [0.5, 1]], atol=1e-12)


@pytest.mark.parametrize("K,match", [
    (np.ones(3), r"drug_similarity must be a square 2-D"),
    (np.ones((2, 3)), r"drug_similarity must be a square 2-D"),
    (np.ones((0, 0)), r"drug_similarity is empty"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), r"drug_similarity contains 2 non-finite"),
])
def test_bad_inputs_raise_with_the_argument_name(K, match):
  with pytest.raises(ValueError, match=match):
    kronjax.data.kernel_features(K, name="drug_similarity")


def test_complex_input_is_a_type_error():
  with pytest.raises(TypeError, match=r"K must be a real array"):
    kronjax.data.kernel_features(np.eye(2) * 1j)


def test_row_without_positive_part_names_the_row():
  K = np.eye(4)
  K[2, 2] = 0.0
  with pytest.raises(ValueError, match=r"K: row 2 has no positive-eigenvalue component"):
    kronjax.data.kernel_features(K)
  with pytest.raises(ValueError, match=r"row 0"):
    kronjax.data.kernel_features(-np.eye(3))


# --------------------------------------------------------------------------- main_effect_features


def test_main_effect_features_pair_kernel_holds_each_entity_alone():
  rng = np.random.default_rng(0)
  U, V = rng.normal(size=(6, 3)) + 2.0, rng.normal(size=(5, 4))
  w = 0.3
  A = kronjax.data.main_effect_features(U, w)
  B = kronjax.data.main_effect_features(V.astype(np.float32), w)
  assert A.shape == (6, 4) and A.dtype == np.float64 and B.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0, rtol=1e-12)

  def cosine_of_centered(T):
    c = T - T.mean(axis=0)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return c @ c.T

  Ku, Kv = cosine_of_centered(U), cosine_of_centered(V)
  np.testing.assert_allclose(A @ A.T, (Ku + w) / (1 + w), atol=1e-12)
  # The pair kernel of x = u' ⊗ v': interaction, both main effects and a constant.
  X = np.stack([np.kron(A[i], B[j]) for i in range(6) for j in range(5)]).astype(np.float64)
  want = np.kron(Ku + w, Kv + w) / (1 + w) ** 2
  np.testing.assert_allclose(X @ X.T, want, atol=1e-6)
  # A function of the user alone, g(u) = sum_k beta_k Ku[k, u], lies in the span: fitted exactly.
  g = np.repeat(Ku @ rng.normal(size=6), 5)
  coef, *_ = np.linalg.lstsq(X, g, rcond=None)
  np.testing.assert_allclose(X @ coef, g, atol=1e-8)
  plain = np.stack([np.kron(U[i] / np.linalg.norm(U[i]), V[j] / np.linalg.norm(V[j]))
                    for i in range(6) for j in range(5)])
  coef, *_ = np.linalg.lstsq(plain, g, rcond=None)
  assert np.max(np.abs(plain @ coef - g)) > 1e-2   # the plain product features miss it


def test_main_effect_features_row_at_the_mean_and_errors():
  U = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])   # row 2 is the mean row
  A = kronjax.data.main_effect_features(U, 1.0)
  np.testing.assert_allclose(A[2], [0.0, 0.0, 1.0])
  with pytest.raises(ValueError, match=r"features: row 2 equals the mean row"):
    kronjax.data.main_effect_features(U, 0.0)
  with pytest.raises(ValueError, match=r"weight must be a finite number >= 0"):
    kronjax.data.main_effect_features(U, -1.0)
  with pytest.raises(TypeError, match=r"weight must be a number"):
    kronjax.data.main_effect_features(U, "1")
  with pytest.raises(ValueError, match=r"drugs must be a 2-D"):
    kronjax.data.main_effect_features(np.ones(3), 1.0, name="drugs")
  with pytest.raises(ValueError, match=r"non-finite"):
    kronjax.data.main_effect_features(np.array([[np.nan, 1.0]]), 1.0)
  with pytest.raises(TypeError, match=r"real \(N, r\) array.*pass a float array"):
    kronjax.data.main_effect_features(np.ones((2, 2), complex), 1.0)
  with pytest.raises(TypeError, match=r"weight must be a number"):
    kronjax.data.main_effect_features(U, True)
  for bad in (math.inf, math.nan, 10**400):
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0"):
      kronjax.data.main_effect_features(U, bad)
  with pytest.raises(ValueError, match=r"at least one row and column"):
    kronjax.data.main_effect_features(np.ones((0, 3)), 1.0)


def test_main_effect_features_int_input_and_a_mean_row_in_wide_tables():
  A = kronjax.data.main_effect_features(np.array([[1, 0], [0, 1]]), 3.0)
  assert A.dtype == np.float64
  # Centered rows ±(1/2, -1/2), unit norm ±(1, -1)/sqrt(2), then [., sqrt(3)] / 2.
  c = 1 / np.sqrt(8)
  np.testing.assert_allclose(A, [[c, -c, np.sqrt(3) / 2], [-c, c, np.sqrt(3) / 2]])
  # A row equal to the mean of the others keeps only the constant, whatever the width r:
  # the rounding of the mean grows with sqrt(r).
  rng = np.random.default_rng(1)
  for r in (1000, 100000):
    rows = rng.normal(size=(6, r))
    table = np.concatenate([rows, rows.mean(axis=0, keepdims=True)])
    np.testing.assert_allclose(kronjax.data.main_effect_features(table, 1.0)[-1, -1], 1.0)


# --------------------------------------------------------------------------- kmer_composition


def naive_kmers(seq, k, alphabet=AMINO_ACIDS):
  seq = seq.upper()
  kmers = ["".join(t) for t in itertools.product(alphabet, repeat=k)]
  counts = collections.Counter(seq[i:i + k] for i in range(len(seq) - k + 1))
  return np.array([counts[m] for m in kmers], np.float64)


def test_kmer_composition_small_cases_by_hand():
  out = kronjax.data.kmer_composition(["AAC"], k=1)
  assert out.shape == (1, 20) and out.dtype == np.float32
  expected = np.zeros(20)
  expected[AMINO_ACIDS.index("A")] = 2 / 3
  expected[AMINO_ACIDS.index("C")] = 1 / 3
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)
  # Windows with an unknown letter are skipped; letters are case-insensitive.
  out = kronjax.data.kmer_composition(["ACAXAC", "acaxac"], k=2)
  ac, ca = AMINO_ACIDS.index("A") * 20 + AMINO_ACIDS.index("C"), AMINO_ACIDS.index("C") * 20
  expected = np.zeros(400)
  expected[ac], expected[ca] = 2 / 3, 1 / 3
  np.testing.assert_allclose(out, [expected, expected], rtol=1e-6)


def test_kmer_composition_does_not_count_across_sequences():
  out = kronjax.data.kmer_composition(["AC", "GA"], k=2, alphabet="ACG")
  # 3**2 features; "AC" = index 0*3+1, "GA" = 2*3+0; "CG" (across) is never counted.
  expected = np.zeros((2, 9))
  expected[0, 1] = expected[1, 6] = 1.0
  np.testing.assert_array_equal(out, expected)


def test_kmer_composition_matches_a_naive_count():
  rng = np.random.default_rng(0)
  seqs = ["".join(rng.choice(list(AMINO_ACIDS + "XBu"), size=rng.integers(3, 60)))
          for _ in range(12)]
  counts = [naive_kmers(s, 3) for s in seqs]
  seqs, expected = zip(*[(s, c / c.sum()) for s, c in zip(seqs, counts) if c.sum() > 0])
  out = kronjax.data.kmer_composition(seqs, k=3)
  assert out.shape == (len(seqs), 8000)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_kmer_composition_is_fast_on_a_kiba_sized_table():
  rng = np.random.default_rng(0)
  seqs = ["".join(rng.choice(list(AMINO_ACIDS), size=1000)) for _ in range(229)]
  kronjax.data.kmer_composition(seqs[:2], k=3)
  start = time.perf_counter()
  out = kronjax.data.kmer_composition(seqs, k=3)
  assert time.perf_counter() - start < 1.0
  assert out.shape == (229, 8000)


def test_kmer_composition_errors_name_the_argument():
  with pytest.raises(TypeError, match=r"sequences must be a sequence of sequence strings, got a single"):
    kronjax.data.kmer_composition("ACD")
  with pytest.raises(TypeError, match=r"sequences\[1\] must be a str"):
    kronjax.data.kmer_composition(["ACD", 3])
  with pytest.raises(ValueError, match=r"sequences is empty"):
    kronjax.data.kmer_composition([])
  with pytest.raises(ValueError, match=r"k must be >= 1"):
    kronjax.data.kmer_composition(["ACD"], k=0)
  with pytest.raises(ValueError, match=r"alphabet must be .* distinct"):
    kronjax.data.kmer_composition(["ACD"], alphabet="AAC")
  with pytest.raises(ValueError, match=r"sequences\[1\] \(length 2\) has no 3-mer"):
    kronjax.data.kmer_composition(["ACDE", "AC"], k=3)


# --------------------------------------------------------------------------- morgan_fingerprints


def test_morgan_fingerprints_bits():
  pytest.importorskip("rdkit")
  out = kronjax.data.morgan_fingerprints(["CCO", "OCC", "c1ccccc1"], n_bits=256)
  assert out.shape == (3, 256) and out.dtype == np.float32
  assert set(np.unique(out)) <= {0.0, 1.0}
  np.testing.assert_array_equal(out[0], out[1])  # one molecule, two SMILES
  assert out[0].sum() > 0 and not np.array_equal(out[0], out[2])
  wider = kronjax.data.morgan_fingerprints(["CCO"], radius=3)
  assert wider.shape == (1, 2048)


def test_morgan_fingerprints_bad_smiles_names_its_position():
  pytest.importorskip("rdkit")
  with pytest.raises(ValueError, match=r"smiles\[1\] = 'C1CC' is not a valid SMILES"):
    kronjax.data.morgan_fingerprints(["CCO", "C1CC"])
  with pytest.raises(ValueError, match=r"n_bits must be >= 1"):
    kronjax.data.morgan_fingerprints(["CCO"], n_bits=0)
  with pytest.raises(TypeError, match=r"smiles must be a sequence of SMILES strings"):
    kronjax.data.morgan_fingerprints("CCO")


def test_morgan_fingerprints_without_rdkit_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "rdkit", None)
  with pytest.raises(ImportError, match=r"pip install 'kronjax\[pairwise\]'"):
    kronjax.data.morgan_fingerprints(["CCO"])
