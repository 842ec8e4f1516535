"""MovieLens-100k: user-movie ratings with user and movie side features, as pairs of entities.

Glossary of shape letters used in this module:
  N_u  users (943)          N_m  movies (1,682)
  n    ratings (100,000)    d_u, d_m  feature dimensions of a user, a movie

``fetch_movielens`` downloads one archive once into a data home (in the manner of
scikit-learn's ``fetch_*``), checks its checksum before opening it, checks every
member it reads, and parses it. Two sources hold the same ratings:

* ``"recbole"``: the RecBole wheel on PyPI (read as a zip, never installed), whose
  ``recbole/dataset_example/ml-100k/`` holds the atomic files ``ml-100k.inter``
  (user, item, rating, timestamp), ``.user`` (age, gender, occupation, zip code),
  ``.item`` (title, release year, genres), ``.link`` (item -> Freebase entity) and
  ``.kg`` (Freebase facts ``head relation tail``), tab-separated with a typed header;
* ``"grouplens"``: the official ``ml-100k.zip`` (``u.data``, ``u.user``, ``u.item``,
  ``|``-separated, latin-1), which has no knowledge graph.

Entity features (each block one-hot or multi-hot, scaled to unit norm, then every
row normalized, so the blocks weigh alike and every pair ``u ⊗ v`` is unit-norm):

* users: age bucket, gender, occupation, zip region (the first digit; ``other``
  for non-US codes);
* movies: genres, release-year bucket, and (``"recbole"``) knowledge-graph facts
  ``relation|entity`` with the movie as head, kept when at least ``kg_min_count``
  movies share them;
* optionally an identity block per entity (``identity_weight``): the kernel then
  reads ``w delta + (1 - w) K_side``, which lets a learner tell apart entities with
  the same side features (warm pairs) and adds nothing for an unseen entity.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pathlib
import urllib.error
import zipfile
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from kronjax._src.base import checks
from kronjax._src.data import cache

ENV_DATA_HOME = "KRONJAX_DATA"
"""Environment variable naming the data home when ``data_home`` is not given."""

SUBDIR = "movielens"
"""The folder of the data home that holds the archives."""

SOURCES: dict[str, dict] = {
    "recbole": {
        "archive": "recbole-1.2.1-py3-none-any.whl",
        "url": "https://files.pythonhosted.org/packages/ab/fe/"
               "7d606cb7cd2b166a36b100cb9435d21014ceee16c192d972deb0976967a8/",
        "prefix": "recbole/dataset_example/ml-100k/",
        "files": {"ratings": "ml-100k.inter", "users": "ml-100k.user", "movies": "ml-100k.item",
                  "link": "ml-100k.link", "kg": "ml-100k.kg"},
    },
    "grouplens": {
        "archive": "ml-100k.zip",
        "url": "https://files.grouplens.org/datasets/movielens/",
        "prefix": "ml-100k/",
        "files": {"ratings": "u.data", "users": "u.user", "movies": "u.item"},
    },
}
"""Per source: the archive's file name, the URL folder it is downloaded from
(``url + archive``), the folder of the data files inside it and their names."""

MOVIELENS_CHECKSUMS: dict[str, str] = {
    # The PyPI index publishes the wheel's sha256; the members' are of RecBole 1.2.1.
    "recbole-1.2.1-py3-none-any.whl":
        "sha256:9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    "ml-100k.inter": "sha256:4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "sha256:4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "sha256:51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.link": "sha256:524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948",
    "ml-100k.kg": "sha256:200a0636fa07c218119a42e5bac7aa3e26e3665a6f919c1b22909bd412b14779",
    # GroupLens publishes only the md5 of the zip (ml-100k.zip.md5).
    "ml-100k.zip": "md5:0e33842e24a9c977be4e0107933c0723",
}
"""Checksum of each archive and of each member read, ``"<algorithm>:<hex>"`` with
algorithm ``sha256`` or ``md5``, keyed by file name. A member without an entry
is covered by its archive's checksum."""

AGE_EDGES = (18, 25, 35, 45, 50, 56)
"""Age buckets (MovieLens-1M's): under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+."""

YEAR_EDGES = (1940, 1960, 1970, 1980, 1990, 1993, 1995, 1996, 1997, 1998)
"""Release-year buckets: before 1940, 1940-59, 1960s, 1970s, 1980s, 1990-92, 1993-94,
then 1995 to 1998 each its own (most movies are from the 1990s); ``unknown``."""

GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western")
"""The 19 genre flags of ``u.item``, in column order."""


class MovieLensData(NamedTuple):
  """MovieLens-100k ratings as (user, movie) pairs with entity feature tables.

  Attributes:
    pairs: ``(n, 2)`` int32 ``(user, movie)`` row indices into the tables, in file order.
    ratings: ``(n,)`` float64 ratings (1 to 5).
    timestamps: ``(n,)`` int64 seconds since the epoch.
    user_ids: ``N_u`` ids as in the files, in table order (sorted numerically).
    movie_ids: ``N_m`` ids, likewise.
    titles: ``N_m`` movie titles.
    user_features: ``(N_u, d_u)`` float64 unit rows.
    user_feature_names: ``d_u`` names, ``"<block>:<value>"``.
    movie_features: ``(N_m, d_m)`` float64 unit rows.
    movie_feature_names: ``d_m`` names (blocks ``id``, ``genre``, ``year``, ``kg``).
    source: ``"recbole"`` or ``"grouplens"``.
  """
  pairs: np.ndarray  # shape=(n, 2), dtype=int32
  ratings: np.ndarray  # shape=(n,), dtype=float64
  timestamps: np.ndarray  # shape=(n,), dtype=int64
  user_ids: list[str]
  movie_ids: list[str]
  titles: list[str]
  user_features: np.ndarray  # shape=(N_u, d_u), dtype=float64
  user_feature_names: list[str]
  movie_features: np.ndarray  # shape=(N_m, d_m), dtype=float64
  movie_feature_names: list[str]
  source: str

  def kron(self, rows=None, dtype=np.float32):
    """The pairs ``rows`` (default all) as entity-indexed ``kronjax.KronData``.

    ``x_i = user_features[u_i] ⊗ movie_features[v_i]``; the tables are shared.
    """
    from kronjax._src.data.kron_data import KronData  # pylint: disable=import-outside-toplevel
    index = self.pairs if rows is None else self.pairs[np.asarray(rows)]
    return KronData((self.user_features.astype(dtype), self.movie_features.astype(dtype)),
                    index=index)


# --------------------------------------------------------------------------- parsing


class _Raw(NamedTuple):
  """What both sources parse to, before features: ids are the files' tokens."""
  ratings: list[tuple[str, str, float, int]]
  users: dict[str, tuple[int, str, str, str]]     # id -> (age, gender, occupation, zip)
  movies: dict[str, tuple[str, int | None, list[str]]]  # id -> (title, year, genres)
  facts: dict[str, list[str]]                     # movie id -> ["relation|entity", ...]


def _rows(text: str, *, name: str, sep: str, width: int, header: bool) -> list[list[str]]:
  """Non-empty lines split on ``sep``, each with exactly ``width`` fields."""
  lines = text.splitlines()
  if header:
    lines = lines[1:]
  out = []
  for no, line in enumerate(lines, start=2 if header else 1):
    if not line.strip():
      continue
    fields = line.split(sep)
    if len(fields) != width:
      raise ValueError(f"{name} line {no} has {len(fields)} fields, expected {width} "
                       f"separated by {sep!r}: {line[:80]!r}; the file is damaged or of another "
                       "format.")
    out.append(fields)
  if not out:
    raise ValueError(f"{name} holds no data rows.")
  return out


def _number(text: str, kind: type, *, name: str, what: str):
  try:
    return kind(float(text)) if kind is int else kind(text)
  except ValueError:
    raise ValueError(f"{name}: {what} must be a number, got {text!r}.") from None


def _year(text: str) -> int | None:
  """The year of ``1995``, ``01-Jan-1995`` or a title's ``(1995)``; None when absent."""
  digits = text.strip()[-4:]
  return int(digits) if digits.isdigit() else None


def _ratings(rows, *, name: str) -> list[tuple[str, str, float, int]]:
  return [(u, i, _number(r, float, name=name, what="a rating"),
           _number(t, int, name=name, what="a timestamp")) for u, i, r, t in rows]


def _users(rows, *, name: str) -> dict[str, tuple[int, str, str, str]]:
  return {u: (_number(age, int, name=name, what="an age"), gender, occupation, zipcode)
          for u, age, gender, occupation, zipcode in rows}


def parse_recbole(text: Mapping[str, str]) -> _Raw:
  """The RecBole atomic files (``text[role]`` for each role of ``SOURCES["recbole"]``)."""
  files = SOURCES["recbole"]["files"]
  rows = lambda role, width: _rows(text[role], name=files[role], sep="\t", width=width,  # pylint: disable=unnecessary-lambda-assignment
                                   header=True)
  movies = {i: (title, _year(year), genres.split())
            for i, title, year, genres in rows("movies", 4)}
  entity_of = {entity: i for i, entity in rows("link", 2)}
  facts = collections.defaultdict(list)
  for head, relation, tail in rows("kg", 3):
    if head in entity_of:
      facts[entity_of[head]].append(f"{relation}|{tail}")
  return _Raw(_ratings(rows("ratings", 4), name=files["ratings"]),
              _users(rows("users", 5), name=files["users"]), movies, dict(facts))


def parse_grouplens(text: Mapping[str, str]) -> _Raw:
  """The official files (``u.data``, ``u.user``, ``u.item``)."""
  files = SOURCES["grouplens"]["files"]
  movies = {}
  for fields in _rows(text["movies"], name=files["movies"], sep="|",
                      width=5 + len(GROUPLENS_GENRES), header=False):
    flags = fields[5:]
    if any(f not in ("0", "1") for f in flags):
      raise ValueError(f"{files['movies']}: the genre flags of movie {fields[0]} must be 0 or 1, "
                       f"got {flags}.")
    genres = [g for g, f in zip(GROUPLENS_GENRES, flags) if f == "1"]
    movies[fields[0]] = (fields[1], _year(fields[2]), genres)
  ratings = _rows(text["ratings"], name=files["ratings"], sep="\t", width=4, header=False)
  users = _rows(text["users"], name=files["users"], sep="|", width=5, header=False)
  return _Raw(_ratings(ratings, name=files["ratings"]), _users(users, name=files["users"]),
              movies, {})


# --------------------------------------------------------------------------- features


def _bucket(value: int | None, edges: Sequence[int], fmt) -> str:
  if value is None:
    return "unknown"
  k = int(np.searchsorted(edges, value, side="right"))
  lo = None if k == 0 else edges[k - 1]
  hi = None if k == len(edges) else edges[k] - 1
  return fmt(lo, hi)


def _range(lo, hi) -> str:
  if lo is None:
    return f"<{hi + 1}"
  if hi is None:
    return f"{lo}+"
  return str(lo) if lo == hi else f"{lo}-{hi}"


def _table(tokens: Sequence[Sequence[Sequence[str]]], weights: Sequence[float]
           ) -> tuple[np.ndarray, list[str]]:
  """Entity features from per-entity token lists per block: ``(N, d)`` unit rows, names.

  ``tokens[e][k]`` are entity ``e``'s tokens in block ``k`` (multi-hot); each block
  of each entity is scaled to norm ``sqrt(weights[k])`` (a block with no token
  stays zero), then each row to unit norm.
  """
  n_blocks = len(weights)
  vocab = [sorted({t for ent in tokens for t in ent[k]}) for k in range(n_blocks)]
  offsets = np.cumsum([0] + [len(v) for v in vocab])
  column = [{t: offsets[k] + j for j, t in enumerate(v)} for k, v in enumerate(vocab)]
  F = np.zeros((len(tokens), int(offsets[-1])), np.float64)
  for e, ent in enumerate(tokens):
    for k in range(n_blocks):
      cols = [column[k][t] for t in set(ent[k])]
      if cols and weights[k] > 0:
        F[e, cols] = np.sqrt(weights[k] / len(cols))
  norms = np.linalg.norm(F, axis=1, keepdims=True)
  if np.any(norms == 0):
    raise ValueError("an entity has no feature in any block; raise a block's weight.")
  keep = np.any(F != 0, axis=0)
  return F[:, keep] / norms, [name for name, k in zip((n for v in vocab for n in v), keep) if k]


def _zip_region(code: str) -> str:
  return code[0] if code[:1].isdigit() else "other"


def user_table(raw: _Raw, ids: Sequence[str], identity_weight: float
               ) -> tuple[np.ndarray, list[str]]:
  """``(N_u, d_u)`` unit rows and names: age bucket, gender, occupation, zip region, id."""
  tokens = []
  for u in ids:
    age, gender, occupation, zipcode = raw.users[u]
    tokens.append((["const"], [f"age:{_bucket(age, AGE_EDGES, _range)}"], [f"gender:{gender}"],
                   [f"occupation:{occupation}"], [f"zip:{_zip_region(zipcode)}"], [f"id:{u}"]))
  return _table(tokens, (1.0, 1.0, 1.0, 1.0, 1.0, identity_weight))


def movie_table(raw: _Raw, ids: Sequence[str], identity_weight: float, kg_min_count: int
                ) -> tuple[np.ndarray, list[str]]:
  """``(N_m, d_m)`` unit rows and names: genres, release-year bucket, KG facts, id."""
  counts = collections.Counter(f for i in ids for f in set(raw.facts.get(i, ())))
  tokens = []
  for i in ids:
    _, year, genres = raw.movies[i]
    facts = [f"kg:{f}" for f in raw.facts.get(i, ()) if counts[f] >= kg_min_count]
    tokens.append((["const"], [f"genre:{g}" for g in genres],
                   [f"year:{_bucket(year, YEAR_EDGES, _range)}"], facts, [f"id:{i}"]))
  kg_weight = 1.0 if raw.facts else 0.0
  return _table(tokens, (1.0, 1.0, 1.0, kg_weight, identity_weight))


def _sorted_ids(ids) -> list[str]:
  return sorted(ids, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def build(raw: _Raw, *, source: str, identity_weight: float = 0.0,
          kg_min_count: int = 5) -> MovieLensData:
  """``MovieLensData`` from parsed files; checks that every rating names a known entity."""
  for what, key, known in (("user", 0, raw.users), ("movie", 1, raw.movies)):
    unknown = next((r[key] for r in raw.ratings if r[key] not in known), None)
    if unknown is not None:
      raise ValueError(f"a rating names the {what} {unknown!r}, which the {what} file does not "
                       "list; the files come from different releases.")
  user_ids, movie_ids = _sorted_ids(raw.users), _sorted_ids(raw.movies)
  user_row = {u: k for k, u in enumerate(user_ids)}
  movie_row = {i: k for k, i in enumerate(movie_ids)}
  pairs = np.array([(user_row[u], movie_row[i]) for u, i, _, _ in raw.ratings], np.int32)
  ratings = np.array([r for _, _, r, _ in raw.ratings], np.float64)
  if not np.all(np.isfinite(ratings)):
    raise ValueError("the ratings file holds NaN or inf ratings.")
  timestamps = np.array([t for _, _, _, t in raw.ratings], np.int64)
  Fu, u_names = user_table(raw, user_ids, identity_weight)
  Fm, m_names = movie_table(raw, movie_ids, identity_weight, kg_min_count)
  return MovieLensData(pairs=pairs, ratings=ratings, timestamps=timestamps, user_ids=user_ids,
                       movie_ids=movie_ids, titles=[raw.movies[i][0] for i in movie_ids],
                       user_features=Fu, user_feature_names=u_names, movie_features=Fm,
                       movie_feature_names=m_names, source=source)


# --------------------------------------------------------------------------- splits


def split_ratings(data: MovieLensData, regime: str, *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(train, validation, test)`` int64 indices into ``data.pairs``.

  Args:
    data: from ``fetch_movielens``.
    regime: ``"warm"``: the ratings are split at random (the same users and movies
      appear on both sides); ``"cold"``: the movies are split at random and each
      rating goes with its movie, so no validation or test movie is ever rated in
      training (unseen items).
    fractions: shares of ratings (warm) or movies (cold), three positive numbers
      summing to 1.
    seed: the permutation's seed.
  """
  if regime not in ("warm", "cold"):
    raise ValueError(f"regime must be 'warm' (random ratings) or 'cold' (unseen movies), got "
                     f"{regime!r}.")
  fr = np.asarray(fractions, np.float64)
  if fr.shape != (3,) or np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-9:
    raise ValueError(f"fractions must be three positive shares (train, validation, test) summing "
                     f"to 1, got {tuple(fractions)!r}.")
  rng = np.random.default_rng(seed)
  units = len(data.pairs) if regime == "warm" else len(data.movie_ids)
  order = rng.permutation(units)
  cut = np.round(np.cumsum(fr)[:2] * units).astype(int)
  part = np.empty(units, np.int64)
  part[order[:cut[0]]], part[order[cut[0]:cut[1]]], part[order[cut[1]:]] = 0, 1, 2
  of_rating = part if regime == "warm" else part[data.pairs[:, 1]]
  return tuple(np.flatnonzero(of_rating == k) for k in range(3))


# --------------------------------------------------------------------------- files


def movielens_home(data_home: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding the archives: ``<data_home>/movielens``.

  ``data_home`` defaults to ``$KRONJAX_DATA``, else ``~/.cache/kronjax/datasets``.
  """
  if data_home is None:
    data_home = os.environ.get(ENV_DATA_HOME) or pathlib.Path("~/.cache/kronjax/datasets")
  return pathlib.Path(data_home).expanduser() / SUBDIR


def _split_checksum(file: str, checksum: str) -> tuple[str, str]:
  return cache.split_checksum(file, checksum, ("sha256", "md5"))


def _how_to_place(path: pathlib.Path, url: str) -> str:
  return (f"Download {url} by hand (a browser or `pip download recbole==1.2.1 --no-deps` "
          f"for the wheel) and place it at {path}, or set data_home (or ${ENV_DATA_HOME}) to a "
          f"folder whose {SUBDIR}/ holds it.")


def _download(url: str, dest: pathlib.Path, checksum: str) -> None:
  """Downloads ``url`` to ``dest``, saved only once its checksum matched."""

  def verify(tmp: pathlib.Path) -> None:
    algorithm, expected = _split_checksum(dest.name, checksum)
    got = cache.file_checksum(tmp, algorithm)
    if got != expected:
      raise ValueError(f"{dest.name} downloaded from {url} has {algorithm} {got}, expected "
                       f"{expected}; the download was corrupted or the file changed upstream. "
                       "Nothing was saved; try again, or place a file with the expected "
                       "checksum by hand.")

  cache.download(url, dest, verify)


def ensure_archive(source: str = "recbole", *, data_home: str | os.PathLike | None = None,
                   download: bool = True, checksums: Mapping[str, str] | None = None,
                   base_url: str | None = None) -> pathlib.Path:
  """The verified archive of ``source`` in the data home, downloaded first if missing.

  Raises:
    FileNotFoundError: the archive is missing and ``download`` is False (the
      message gives the URL and the path to place it at).
    OSError: the download failed (same advice, and the cause).
    ValueError: the archive's checksum does not match (delete the named file).
  """
  spec = _source(source)
  checksums = MOVIELENS_CHECKSUMS if checksums is None else checksums
  name = spec["archive"]
  if name not in checksums:
    raise ValueError(checks.unknown_key_message("file (no checksum on record)", name, checksums))
  algorithm, expected = _split_checksum(name, checksums[name])
  path = movielens_home(data_home) / name
  url = (spec["url"] if base_url is None else base_url) + name
  if not path.is_file():
    if not download:
      raise FileNotFoundError(f"MovieLens archive missing: {path} (download=False). "
                              + _how_to_place(path, url))
    try:
      _download(url, path, checksums[name])
    except (urllib.error.URLError, OSError) as e:
      raise OSError(f"Could not download {url} ({e}). " + _how_to_place(path, url)) from e
    return path
  got = cache.file_checksum(path, algorithm)
  if got != expected:
    raise ValueError(f"{name} in {path.parent} has {algorithm} {got}, expected {expected}: the "
                     f"file is corrupted or another release. Delete it ({path}) and call "
                     "fetch_movielens again to download it, or place the right file there by hand.")
  return path


def _source(source: str) -> dict:
  if source not in SOURCES:
    raise ValueError(f"source must be one of {tuple(SOURCES)}, got {source!r}: 'recbole' (the "
                     "RecBole wheel on PyPI, with knowledge-graph facts) or 'grouplens' (the "
                     "official ml-100k.zip).")
  return SOURCES[source]


def read_members(archive: pathlib.Path, source: str,
                 checksums: Mapping[str, str] | None = None) -> dict[str, str]:
  """``{role: text}`` of the source's data files in ``archive``, each checked when on record."""
  spec = _source(source)
  checksums = MOVIELENS_CHECKSUMS if checksums is None else checksums
  encoding = "utf-8" if source == "recbole" else "latin-1"
  out = {}
  try:
    with zipfile.ZipFile(archive) as z:
      for role, name in spec["files"].items():
        try:
          data = z.read(spec["prefix"] + name)
        except KeyError:
          raise ValueError(f"{archive.name} has no member {spec['prefix'] + name}; it is not the "
                           f"{source} archive of ml-100k.") from None
        if name in checksums:
          algorithm, expected = _split_checksum(name, checksums[name])
          got = hashlib.new(algorithm, data).hexdigest()
          if got != expected:
            raise ValueError(f"{name} inside {archive} has {algorithm} {got}, expected {expected}; "
                             f"the archive holds another release: delete {archive} and fetch "
                             "again.")
        out[role] = data.decode(encoding)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{archive} is not a zip archive ({e}); delete it and fetch again.") from None
  return out


# --------------------------------------------------------------------------- loader


def fetch_movielens(data_home: str | os.PathLike | None = None, *, source: str = "recbole",
                    download: bool = True, checksums: Mapping[str, str] | None = None,
                    base_url: str | None = None, identity_weight: float = 0.0,
                    kg_min_count: int = 5) -> MovieLensData:
  """Loads MovieLens-100k with user and movie features, downloading it once if needed.

  The archive lives in ``<data_home>/movielens`` (``data_home`` defaults to
  ``$KRONJAX_DATA``, else ``~/.cache/kronjax/datasets``); its checksum, and each
  member's when on record, is verified before anything is parsed.

  Args:
    data_home: folder holding the ``movielens/`` folder.
    source: ``"recbole"`` (the RecBole 1.2.1 wheel from PyPI, read as a zip; with
      knowledge-graph facts) or ``"grouplens"`` (the official ``ml-100k.zip``).
    download: fetch a missing archive; with False it raises ``FileNotFoundError``
      saying where to place it.
    checksums: ``{file: "sha256:<hex>" | "md5:<hex>"}``; default ``MOVIELENS_CHECKSUMS``.
    base_url: the URL folder to download from instead of the source's.
    identity_weight: weight of each entity's identity block against 1 for each
      side-feature block (0: side features only).
    kg_min_count: keep a knowledge-graph fact when at least this many movies have it.

  Returns:
    ``MovieLensData``; ``data.kron(rows)`` gives the pairs as ``kronjax.KronData``,
    ``split_ratings`` the warm and cold splits.

  Raises:
    FileNotFoundError: the archive is missing and ``download`` is False.
    OSError: the download failed.
    ValueError: a checksum does not match (delete the named file), a file does not
      parse, or an argument is out of range (the message names it).
    TypeError: ``identity_weight`` or ``kg_min_count`` is not a number.
  """
  _source(source)
  checks.check_nonnegative("identity_weight", identity_weight)
  checks.check_positive_int("kg_min_count", kg_min_count)
  archive = ensure_archive(source, data_home=data_home, download=download, checksums=checksums,
                           base_url=base_url)
  text = read_members(archive, source, checksums)
  raw = parse_recbole(text) if source == "recbole" else parse_grouplens(text)
  return build(raw, source=source, identity_weight=float(identity_weight),
               kg_min_count=kg_min_count)


def write_archive(path: str | os.PathLike, source: str, text: Mapping[str, str]) -> pathlib.Path:
  """Writes a zip in the layout of ``source`` holding ``text[role]``; byte-for-byte reproducible.

  For fixtures and for data of one's own in the same format.
  """
  spec = _source(source)
  encoding = "utf-8" if source == "recbole" else "latin-1"
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for role, name in spec["files"].items():
      info = zipfile.ZipInfo(spec["prefix"] + name, date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      z.writestr(info, text[role].encode(encoding))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return path
