"""Downloaded data files: checksums, and a download that saves only what verifies.

Shared by the data-set loaders (``kiba``, ``movielens``). A checksum is written
``"<algorithm>:<hex digest>"``; the algorithms are ``sha256``, ``md5`` (where a
publisher gives only that) and ``git-blob`` (git's object id of the file's bytes,
for files known only by their id in a repository).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile
import urllib.request
from typing import Callable, Sequence

ALGORITHMS = ("sha256", "md5", "git-blob")
_CHUNK = 1 << 20


def file_checksum(path: str | os.PathLike, algorithm: str) -> str:
  """Hex digest of a file by one of ``ALGORITHMS``."""
  path = pathlib.Path(path)
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")
  if algorithm == "git-blob":
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
  else:
    h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def split_checksum(file: str, checksum: str, algorithms: Sequence[str]) -> tuple[str, str]:
  """``(algorithm, lower-case digest)`` of ``checksums[file]``, one of ``algorithms``."""
  algorithm, sep, digest = str(checksum).partition(":")
  if not sep or algorithm not in algorithms or not digest:
    forms = " or ".join(f"'{a}:<hex>'" for a in algorithms)
    raise ValueError(f"checksums[{file!r}] must read {forms}, got {checksum!r}.")
  return algorithm, digest.lower()


def download(url: str, dest: pathlib.Path, verify: Callable[[pathlib.Path], None]) -> None:
  """Downloads ``url`` to a temporary file beside ``dest``, calls ``verify`` on it (which
  raises when it does not match) and only then renames it to ``dest``: a failed or
  corrupted download leaves nothing behind."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      for chunk in iter(lambda: response.read(_CHUNK), b""):
        out.write(chunk)
    verify(pathlib.Path(tmp))
    os.replace(tmp, dest)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
