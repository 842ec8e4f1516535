"""The MovieLens-100k loader, offline on the synthetic fixture in tests/fixtures/movielens_small.

The fixture holds both archives in the real layouts (RecBole's wheel, GroupLens's zip), written
by its make_fixture.py; checksums.json holds their checksums and their members'.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

import kronjax
from kronjax._src.data import movielens as ml

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "movielens_small"
CHECKSUMS = json.loads((FIXTURE / "checksums.json").read_text())


def fetch(source="recbole", **kw):
  kw.setdefault("checksums", CHECKSUMS)
  kw.setdefault("download", False)
  kw.setdefault("kg_min_count", 2)
  return kronjax.data.fetch_movielens(kw.pop("data_home", FIXTURE), source=source, **kw)


def test_fixture_is_reproducible(tmp_path, monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "HERE", tmp_path)
  module.main()
  assert json.loads((tmp_path / "checksums.json").read_text()) == CHECKSUMS


def test_parses_both_sources_alike():
  rb, gl = fetch("recbole"), fetch("grouplens")
  assert rb.pairs.shape == (800, 2) and rb.pairs.dtype == np.int32
  np.testing.assert_array_equal(rb.pairs, gl.pairs)
  np.testing.assert_array_equal(rb.ratings, gl.ratings)
  np.testing.assert_array_equal(rb.timestamps, gl.timestamps)
  assert rb.user_ids == gl.user_ids == [str(u) for u in range(1, 31)]
  assert rb.movie_ids == [str(i) for i in range(1, 41)]
  np.testing.assert_array_equal(rb.user_features, gl.user_features)
  assert rb.user_feature_names == gl.user_feature_names
  # GroupLens has no knowledge graph; RecBole's facts shared by >= 2 movies are kept.
  assert not any(n.startswith("kg:") for n in gl.movie_feature_names)
  assert any(n.startswith("kg:film.film.actor|") for n in rb.movie_feature_names)
  assert "kg:film.film.language|m.en" not in rb.movie_feature_names   # one movie only
  for d in (rb, gl):
    for F in (d.user_features, d.movie_features):
      np.testing.assert_allclose(np.linalg.norm(F, axis=1), 1.0, rtol=1e-12)
    assert np.all((d.ratings >= 1) & (d.ratings <= 5))


def test_first_rating_matches_the_file():
  d = fetch("grouplens")
  first = (FIXTURE / "movielens").joinpath("ml-100k.zip")
  text = ml.read_members(first, "grouplens", CHECKSUMS)
  u, i, r, t = text["ratings"].splitlines()[0].split("\t")
  assert d.user_ids[d.pairs[0, 0]] == u and d.movie_ids[d.pairs[0, 1]] == i
  assert d.ratings[0] == float(r) and d.timestamps[0] == int(t)


def test_feature_blocks():
  d = fetch("grouplens")
  names = d.user_feature_names
  F = d.user_features
  # Five one-hot blocks (a constant, age, gender, occupation, zip region), each of weight 1/5.
  for block in ("const", "age:", "gender:", "occupation:", "zip:"):
    cols = [k for k, n in enumerate(names) if n.startswith(block)]
    np.testing.assert_allclose(np.sum(F[:, cols] ** 2, axis=1), 0.2, rtol=1e-12)
  assert "zip:other" in names     # the fixture's Canadian code
  movies = d.movie_feature_names
  assert {n for n in movies if n.startswith("genre:")} <= {f"genre:{g}" for g in ml.GROUPLENS_GENRES}
  assert any(n.startswith("year:") for n in movies)


def test_identity_weight_mixes_a_delta_into_the_kernel():
  plain = fetch("grouplens").user_features
  w = 2.0
  mixed = fetch("grouplens", identity_weight=w).user_features
  K0, Kw = plain @ plain.T, mixed @ mixed.T
  off = ~np.eye(len(K0), dtype=bool)
  np.testing.assert_allclose(Kw[off], K0[off] * 5 / (5 + w), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(np.diag(Kw), 1.0, rtol=1e-12)


def test_kron_is_the_tensor_product_of_entity_rows(x64):
  d = fetch()
  rows = np.array([0, 5, 17])
  data = d.kron(rows, dtype=np.float64)
  assert isinstance(data, kronjax.KronData) and data.n == 3
  dense = np.asarray(data.materialize())
  for k, i in enumerate(rows):
    u, v = d.pairs[i]
    np.testing.assert_allclose(dense[k], np.kron(d.user_features[u], d.movie_features[v]),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("regime", ["warm", "cold"])
def test_splits_partition_the_ratings(regime):
  d = fetch()
  train, val, test = ml.split_ratings(d, regime, seed=3)
  together = np.concatenate([train, val, test])
  np.testing.assert_array_equal(np.sort(together), np.arange(len(d.pairs)))
  assert len(train) > len(val) > 0 and len(test) > 0
  seen = set(d.pairs[train, 1])
  if regime == "cold":
    assert not seen & set(d.pairs[test, 1]) and not seen & set(d.pairs[val, 1])
  else:
    assert abs(len(train) - 0.8 * len(d.pairs)) <= 1
  again = ml.split_ratings(d, regime, seed=3)
  for a, b in zip((train, val, test), again):
    np.testing.assert_array_equal(a, b)


def test_split_errors():
  d = fetch()
  with pytest.raises(ValueError, match="regime must be 'warm'"):
    ml.split_ratings(d, "hot")
  with pytest.raises(ValueError, match="fractions must be three positive shares"):
    ml.split_ratings(d, "warm", fractions=(0.5, 0.5))
  with pytest.raises(ValueError, match="fractions must be three positive shares"):
    ml.split_ratings(d, "warm", fractions=(0.9, 0.2, -0.1))


def test_offline_error_says_where_to_place_the_archive(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    fetch(data_home=tmp_path)
  msg = str(e.value)
  assert str(tmp_path / "movielens" / "recbole-1.2.1-py3-none-any.whl") in msg
  assert "files.pythonhosted.org" in msg and "pip download recbole==1.2.1" in msg
  with pytest.raises(FileNotFoundError, match="grouplens.org/datasets/movielens/ml-100k.zip"):
    fetch("grouplens", data_home=tmp_path)


def test_failed_download_is_an_oserror_with_the_same_advice(tmp_path):
  with pytest.raises(OSError, match="Could not download .*place it at"):
    fetch(data_home=tmp_path, download=True, base_url=(tmp_path / "nowhere").as_uri() + "/")
  assert not list((tmp_path / "movielens").glob("*"))


def test_download_verifies_then_caches(tmp_path):
  base = (FIXTURE / "movielens").as_uri() + "/"
  d = fetch("grouplens", data_home=tmp_path, download=True, base_url=base)
  assert (tmp_path / "movielens" / "ml-100k.zip").is_file()
  np.testing.assert_array_equal(d.pairs, fetch("grouplens").pairs)
  # A wrong checksum on download: refused, nothing saved.
  bad = {**CHECKSUMS, "recbole-1.2.1-py3-none-any.whl": "sha256:" + "0" * 64}
  with pytest.raises(ValueError, match="downloaded from .* expected 0000.*Nothing was saved"):
    fetch(data_home=tmp_path, download=True, base_url=base, checksums=bad)
  assert sorted(p.name for p in (tmp_path / "movielens").iterdir()) == ["ml-100k.zip"]


def test_wrong_checksum_is_refused(tmp_path):
  shutil.copytree(FIXTURE / "movielens", tmp_path / "movielens")
  bad = {**CHECKSUMS, "ml-100k.zip": "md5:" + "0" * 32}
  with pytest.raises(ValueError, match=r"ml-100k.zip in .* has md5 .* expected 0{32}.*Delete it"):
    fetch("grouplens", data_home=tmp_path, checksums=bad)
  member = {**CHECKSUMS, "ml-100k.kg": "sha256:" + "1" * 64}
  with pytest.raises(ValueError, match="ml-100k.kg inside .* expected 1{64}"):
    fetch(data_home=tmp_path, checksums=member)
  # The published checksums refuse the fixture: it is not the real archive.
  with pytest.raises(ValueError, match="recbole-1.2.1-py3-none-any.whl in .* has sha256"):
    fetch(data_home=tmp_path, checksums=None)
  with pytest.raises(ValueError, match="must read 'sha256:<hex>' or 'md5:<hex>'"):
    fetch(data_home=tmp_path, checksums={**CHECKSUMS, "ml-100k.zip": "crc32:1"}, source="grouplens")
  with pytest.raises(ValueError, match="no checksum on record"):
    fetch(data_home=tmp_path, checksums={})


def test_damaged_files_are_named(tmp_path):
  good = dict(ml.read_members(FIXTURE / "movielens" / "ml-100k.zip", "grouplens", CHECKSUMS))
  cases = [("ratings", good["ratings"].replace("\t", " ", 1), "u.data line 1 has 3 fields"),
           ("ratings", "1\t1\tfive\t0\n", "u.data: a rating must be a number"),
           ("users", "", "u.user holds no data rows"),
           ("ratings", good["ratings"] + "999\t1\t3\t0\n", "names the user '999'")]
  for role, text, message in cases:
    ml.write_archive(tmp_path / "movielens" / "ml-100k.zip", "grouplens", {**good, role: text})
    with pytest.raises(ValueError, match=message):
      fetch("grouplens", data_home=tmp_path, checksums={"ml-100k.zip": "sha256:" + _sha(tmp_path)})
  (tmp_path / "movielens" / "ml-100k.zip").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not a zip archive"):
    fetch("grouplens", data_home=tmp_path, checksums={"ml-100k.zip": "sha256:" + _sha(tmp_path)})


def _sha(tmp_path):
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha256((tmp_path / "movielens" / "ml-100k.zip").read_bytes()).hexdigest()


def test_argument_errors():
  with pytest.raises(ValueError, match="source must be one of"):
    fetch("netflix")
  with pytest.raises(ValueError, match="identity_weight must be a finite number >= 0"):
    fetch(identity_weight=-1.0)
  with pytest.raises(ValueError, match="kg_min_count"):
    fetch(kg_min_count=0)


@pytest.mark.slow
def test_experiment_smoke(tmp_path, monkeypatch):
  """`kronjax run configs/movielens.toml --smoke`: every row in both regimes, finite, chosen on
  validation, and the threshold curve over the configured thresholds."""
  pytest.importorskip("sklearn")
  from kronjax.experiments import runner as experiment  # pylint: disable=import-outside-toplevel
  root = FIXTURE.parents[2]
  monkeypatch.chdir(root)   # the smoke config names the fixture relative to the checkout
  experiment.run_config(root / "configs" / "movielens.toml", smoke=True, out_dir=tmp_path,
                        progress=False, echo=False)
  result = json.loads((tmp_path / "results.json").read_text())
  methods = [row["method"] for row in result["table"]]
  assert methods[:4] == ["global mean", "user + item biases", "KronRLS (same entity kernels)",
                         "gradient-boosted trees (side features)"]
  assert sum(m.startswith("kronjax") for m in methods) == 7
  for row in result["table"]:
    for key in ("warm test RMSE", "cold test RMSE", "warm validation RMSE"):
      assert np.isfinite(row[key]) and row[key] > 0, (row["method"], key)
  params = result["config"]["params"]
  for regime in ("warm", "cold"):
    m = result["metrics"]["regimes"][regime]
    assert [c["threshold"] for c in m["threshold_curve"]] == sorted(params["thresholds"])
    ridge = m["methods"]["KronRLS (same entity kernels)"]
    best = [r for r in ridge["tuning"] if r["lambda"] == ridge["chosen"]["lambda"]][0]
    assert best["score"] == ridge["val_rmse"] and not best["at_edge"]
    name = "kronjax centered, best b of the curve"
    rows = [r for r in m["sweep"] if r["variant"] == "centered"]
    assert m["methods"][name]["val_rmse"] == min(r["validation_rmse"] for r in rows)
    kron = [v for k, v in m["methods"].items() if k.startswith("kronjax")]
    assert m["methods"]["kronjax, the best of the above on validation"] == min(
        kron[:-1], key=lambda v: v["val_rmse"])
  assert (tmp_path / result["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_lambda_extends_the_grid_past_its_edges():
  from kronjax.experiments import kronrls  # pylint: disable=import-outside-toplevel
  score = lambda lam: (np.log(lam) - np.log(0.01)) ** 2  # pylint: disable=unnecessary-lambda-assignment
  best, rows = kronrls.tune_lambda(score, [10.0, 1.0, 3.0])
  tried = sorted(r["lambda"] for r in rows)
  assert tried[0] < best < tried[-1] and abs(np.log(best / 0.01)) <= np.log(3) / 2 + 1e-12
  assert [r["at_edge"] for r in rows if r["lambda"] == best] == [False]
  up, rows = kronrls.tune_lambda(lambda lam: (-lam, {"note": 1}), [1.0, 2.0], max_extensions=2)
  assert up == 18.0 and [r for r in rows if r["lambda"] == up][0]["at_edge"]
  assert all(r["note"] == 1 for r in rows)
  for bad, match in (([], "non-empty"), ([0.0, 1.0], "ridges > 0"), ([np.inf], "finite")):
    with pytest.raises(ValueError, match=match):
      kronrls.tune_lambda(score, bad)
  with pytest.raises(ValueError, match="step must be a finite factor > 1"):
    kronrls.tune_lambda(score, [1.0], step=1.0)
