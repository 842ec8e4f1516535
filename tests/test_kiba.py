"""Tests for ``kronjax.data.fetch_kiba`` on a small offline fixture in DeepDTA's format.

``tests/fixtures/kiba_small/kiba/`` holds 6 drugs x 4 targets written by
``make_fixture`` below (``python tests/test_kiba.py`` rewrites it). Its affinity is
``Y[d, t] = 10 + d + t / 10`` where ``(4 d + t) % 3 != 1`` and NaN elsewhere, so
the 16 measured pairs, row-major, are::

    index  0      1      2      3      4      5      6      7
    pair   (0,0)  (0,2)  (0,3)  (1,1)  (1,2)  (2,0)  (2,1)  (2,3)
    index  8      9      10     11     12     13     14     15
    pair   (3,0)  (3,2)  (3,3)  (4,1)  (4,2)  (5,0)  (5,1)  (5,3)

The test fold is ``[13, 2, 7]`` and the five training folds split the rest.
The ``Y`` pickle names ``numpy.core.multiarray`` as DeepDTA's (Python 2) file does.
"""

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import urllib.error

import numpy as np
import pytest

import kronjax
from kronjax._src.data import kiba

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kiba_small"

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "O=C=O", "CC(C)O"]
SEQUENCES = ["MKTAYIAK", "MGSSHHHH", "MALWMRLL", "MSTNPKPQ"]
TEST_FOLD = [13, 2, 7]
TRAIN_FOLDS = [[0, 9, 4], [15, 1, 11], [6, 12, 3], [10, 5], [8, 14]]
PAIRS = [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (2, 0), (2, 1), (2, 3),
         (3, 0), (3, 2), (3, 3), (4, 1), (4, 2), (5, 0), (5, 1), (5, 3)]


def fixture_affinity():
  d, t = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
  return np.where((4 * d + t) % 3 != 1, 10.0 + d + t / 10.0, np.nan)


def _matrix_text(M):
  return "\r\n".join("\t".join(f"{v:.4f}" for v in row) for row in M)


def make_fixture(home):
  """Writes the fixture's files into ``home/kiba`` in DeepDTA's formats."""
  root = pathlib.Path(home) / "kiba"
  (root / "folds").mkdir(parents=True, exist_ok=True)
  ligands = {f"CHEMBL{100 + i}": s for i, s in enumerate(SMILES)}
  proteins = {f"P0000{i}": s for i, s in enumerate(SEQUENCES)}
  (root / "ligands_can.txt").write_text(json.dumps(ligands))
  (root / "proteins.txt").write_text(json.dumps(proteins))
  Y = pickle.dumps(fixture_affinity(), protocol=2)
  (root / "Y").write_bytes(Y.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
  (root / "folds" / "test_fold_setting1.txt").write_text(json.dumps(TEST_FOLD))
  (root / "folds" / "train_fold_setting1.txt").write_text(json.dumps(TRAIN_FOLDS))
  rng = np.random.default_rng(0)
  drug = rng.uniform(0.0, 1.0, (6, 6)).round(3)
  drug = (drug + drug.T) / 2
  np.fill_diagonal(drug, 1.0)
  target = rng.uniform(0.0, 0.3, (4, 4)).round(3)
  target = (target + target.T) / 2
  np.fill_diagonal(target, 1.0)
  (root / "kiba_drug_sim.txt").write_bytes(_matrix_text(drug).encode())
  (root / "kiba_target_sim.txt").write_bytes(_matrix_text(target).encode())
  return root


def fixture_checksums(root=FIXTURE / "kiba"):
  """The checksum table of the fixture: sha256 for all but the drug similarity (git blob id)."""
  out = {}
  for f in kiba.KIBA_CHECKSUMS:
    algorithm = "git-blob" if f == "kiba_drug_sim.txt" else "sha256"
    out[f] = f"{algorithm}:{kiba.file_checksum(root / f, algorithm)}"
  return out


@pytest.fixture
def home(tmp_path):
  """A copy of the fixture as a data home (tests may damage it)."""
  shutil.copytree(FIXTURE, tmp_path / "data")
  return tmp_path / "data"


def test_committed_fixture_is_what_make_fixture_writes(tmp_path):
  fresh = make_fixture(tmp_path)
  for f in kiba.KIBA_CHECKSUMS:
    if f == "Y":
      got = kiba.parse_affinity((FIXTURE / "kiba" / f).read_bytes(), name=f)
      np.testing.assert_array_equal(got, fixture_affinity())
    else:
      assert (FIXTURE / "kiba" / f).read_bytes() == (fresh / f).read_bytes(), f


def test_fetch_parses_entities_pairs_labels_and_folds(home):
  data = kronjax.data.fetch_kiba(home, download=False, checksums=fixture_checksums())
  assert isinstance(data, kronjax.data.KibaData)
  assert data.smiles == SMILES and data.sequences == SEQUENCES
  assert data.drug_ids == [f"CHEMBL{100 + i}" for i in range(6)]
  assert data.target_ids == [f"P0000{i}" for i in range(4)]
  np.testing.assert_array_equal(data.affinity, fixture_affinity())
  assert data.pairs.dtype == np.int32 and data.pairs.shape == (16, 2)
  assert [tuple(p) for p in data.pairs.tolist()] == PAIRS
  np.testing.assert_array_equal(data.labels, [10.0 + d + t / 10.0 for d, t in PAIRS])
  # Folds keep the file's order and map to the pairs listed in the module docstring.
  assert data.test_fold.dtype == np.int32
  assert [tuple(p) for p in data.pairs[data.test_fold].tolist()] == [(5, 0), (0, 3), (2, 3)]
  assert [f.tolist() for f in data.train_folds] == TRAIN_FOLDS
  assert [tuple(p) for p in data.pairs[data.train_folds[3]].tolist()] == [(3, 3), (2, 0)]
  everything = np.concatenate([*data.train_folds, data.test_fold])
  np.testing.assert_array_equal(np.sort(everything), np.arange(16))
  assert data.drug_similarity.shape == (6, 6) and data.target_similarity.shape == (4, 4)
  np.testing.assert_array_equal(np.diag(data.drug_similarity), 1.0)
  features = kronjax.data.kernel_features(data.drug_similarity, name="drug_similarity")
  assert features.features.shape[0] == 6 and 0.0 <= features.clipped < 1.0


def test_similarities_can_be_left_out(home):
  (home / "kiba" / "kiba_drug_sim.txt").unlink()
  data = kronjax.data.fetch_kiba(home, download=False, similarities=("target",),
                                 checksums=fixture_checksums(FIXTURE / "kiba"))
  assert data.drug_similarity is None and data.target_similarity.shape == (4, 4)
  data = kronjax.data.fetch_kiba(home, download=False, similarities=(),
                                 checksums=fixture_checksums(FIXTURE / "kiba"))
  assert data.drug_similarity is None and data.target_similarity is None
  with pytest.raises(ValueError, match=r"similarities must be a subset of \('drug', 'target'\)"):
    kronjax.data.fetch_kiba(home, download=False, similarities=("drugs",))


def test_data_home_from_the_environment(home, monkeypatch):
  monkeypatch.setenv("KRONJAX_DATA", str(home))
  assert kiba.kiba_home() == home / "kiba"
  data = kronjax.data.fetch_kiba(download=False, checksums=fixture_checksums())
  assert len(data.pairs) == 16
  monkeypatch.delenv("KRONJAX_DATA")
  assert kiba.kiba_home() == pathlib.Path.home() / ".cache" / "kronjax" / "datasets" / "kiba"


def test_checksum_mismatch_names_the_file_and_says_to_delete_it(home):
  path = home / "kiba" / "folds" / "test_fold_setting1.txt"
  path.write_text(json.dumps([13, 2, 8]))
  with pytest.raises(ValueError, match=r"folds/test_fold_setting1.txt in .* has sha256 .*Delete it"):
    kronjax.data.fetch_kiba(home, download=False, checksums=fixture_checksums())


def test_affinity_is_unpickled_only_after_its_checksum_matched(home, monkeypatch):
  (home / "kiba" / "Y").write_bytes(b"not a pickle")
  monkeypatch.setattr(kiba, "parse_affinity", lambda *a, **k: pytest.fail("unpickled"))
  with pytest.raises(ValueError, match=r"Y in .* has sha256"):
    kronjax.data.fetch_kiba(home, download=False, checksums=fixture_checksums())


def test_missing_files_without_download_list_urls_and_directory(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    kronjax.data.fetch_kiba(tmp_path, download=False)
  message = str(err.value)
  assert str(tmp_path / "kiba") in message and "download=False" in message
  for f in kiba.KIBA_CHECKSUMS:
    assert kiba.BASE_URL + f in message
    assert str(tmp_path / "kiba" / f) in message


def _serve(files, calls):
  def urlopen(url, timeout=None):
    del timeout
    calls.append(url)
    name = url[len(kiba.BASE_URL):]
    if name not in files:
      raise urllib.error.URLError("no route to host")
    return io.BytesIO(files[name])
  return urlopen


def test_fake_download_fills_the_cache_once(tmp_path, monkeypatch):
  files = {f: (FIXTURE / "kiba" / f).read_bytes() for f in kiba.KIBA_CHECKSUMS}
  calls = []
  monkeypatch.setattr(kiba.urllib.request, "urlopen", _serve(files, calls))
  first = kronjax.data.fetch_kiba(tmp_path, checksums=fixture_checksums())
  assert sorted(calls) == sorted(kiba.BASE_URL + f for f in kiba.KIBA_CHECKSUMS)
  for f in kiba.KIBA_CHECKSUMS:
    assert (tmp_path / "kiba" / f).read_bytes() == files[f]
  assert not list((tmp_path / "kiba").rglob("*.part"))
  calls.clear()
  second = kronjax.data.fetch_kiba(tmp_path, checksums=fixture_checksums())
  assert calls == []
  np.testing.assert_array_equal(first.pairs, second.pairs)


def test_corrupt_download_is_not_saved(tmp_path, monkeypatch):
  files = {f: (FIXTURE / "kiba" / f).read_bytes() for f in kiba.KIBA_CHECKSUMS}
  files["proteins.txt"] = files["proteins.txt"].replace(b"MKTAYIAK", b"MKTAYIAQ")
  monkeypatch.setattr(kiba.urllib.request, "urlopen", _serve(files, []))
  with pytest.raises(ValueError, match=r"proteins.txt downloaded from .* has sha256 .*Nothing was saved"):
    kronjax.data.fetch_kiba(tmp_path, checksums=fixture_checksums())
  assert not (tmp_path / "kiba" / "proteins.txt").exists()
  assert not list((tmp_path / "kiba").rglob("*.part"))


def test_failed_download_says_where_to_place_the_files(tmp_path, monkeypatch):
  monkeypatch.setattr(kiba.urllib.request, "urlopen", _serve({}, []))
  with pytest.raises(OSError, match=r"Could not download .*place them in") as err:
    kronjax.data.fetch_kiba(tmp_path, checksums=fixture_checksums())
  assert kiba.BASE_URL + "Y" in str(err.value)


def test_git_blob_checksum_is_gits_object_id(tmp_path):
  path = tmp_path / "hello"
  path.write_bytes(b"hello\n")
  # `printf 'hello\n' | git hash-object --stdin`
  assert kiba.file_checksum(path, "git-blob") == "ce013625030ba8dba906f756967f9e9ca394464a"
  assert kiba.file_checksum(path, "sha256") == hashlib.sha256(b"hello\n").hexdigest()


def test_parsers_reject_malformed_files():
  with pytest.raises(ValueError, match=r"proteins.txt repeats the id 'P1'"):
    kiba.parse_entities('{"P1": "MK", "P1": "MA"}', name="proteins.txt")
  with pytest.raises(ValueError, match=r"ligands_can.txt is not valid JSON"):
    kiba.parse_entities("{", name="ligands_can.txt")
  with pytest.raises(ValueError, match=r"train.txt\[1\] holds indices in \[16, 16\], outside \[0, 16\)"):
    kiba.parse_folds("[[0, 1], [16]]", name="train.txt", n_pairs=16)
  with pytest.raises(ValueError, match=r"sim.txt must be a \(3, 3\) matrix"):
    kiba.parse_matrix("1 0\n0 1", name="sim.txt", shape=(3, 3))
  with pytest.raises(ValueError, match=r"Y holds a \(6, 4\) matrix, but the entity files list \(5, 4\)"):
    kiba.parse_affinity((FIXTURE / "kiba" / "Y").read_bytes(), name="Y", shape=(5, 4))
  with pytest.raises(ValueError, match=r"checksums\['Y'\] must read 'sha256:<hex>'"):
    kiba.ensure_files(["Y"], data_home="/nonexistent", checksums={"Y": "md5:00"})


def test_affinity_pickle_may_only_hold_numpy_arrays():
  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  with pytest.raises(ValueError, match=r"refusing to load the global .*print"):
    kiba.parse_affinity(pickle.dumps(Evil(), protocol=2), name="Y")


@pytest.mark.skipif(not os.environ.get("KRONJAX_KIBA_HOME"),
                    reason="set KRONJAX_KIBA_HOME to a data home whose kiba/ holds the real files")
def test_real_kiba_counts():
  data = kronjax.data.fetch_kiba(os.environ["KRONJAX_KIBA_HOME"], download=False,
                                 similarities=("target",))
  assert (len(data.smiles), len(data.sequences)) == (2111, 229)
  assert data.affinity.shape == (2111, 229) and data.pairs.shape == (118254, 2)
  assert [len(f) for f in data.train_folds] == [19709] * 5 and len(data.test_fold) == 19709
  everything = np.concatenate([*data.train_folds, data.test_fold])
  np.testing.assert_array_equal(np.sort(everything), np.arange(118254))
  assert data.pairs[36275].tolist() == [364, 120]  # DeepDTA's data/README.md example
  assert data.target_similarity.shape == (229, 229)


if __name__ == "__main__":
  make_fixture(FIXTURE)
  print(json.dumps(fixture_checksums(), indent=2))
