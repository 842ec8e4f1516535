"""A griffe extension for the API reference: keep free-form ``Raises:`` sections.

Google-style ``Raises:`` items must read ``ExceptionName: description``. Some
docstrings write the section as prose ("TypeError / ValueError naming ... when
..."); griffe's parser warns about such items and drops them, so the rendered
reference would lose what the function raises. This extension turns a
``Raises:`` section whose items do not all follow the item form into a plain
paragraph ("**Raises:** ...") before the docstring is parsed. Sections in the
item form are left alone, so the extension does nothing once the docstrings
follow the convention.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ITEM = re.compile(r"^[A-Za-z_][\w.]*(\s*\([^)]*\))?:\s")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" "))


def rewrite(text: str) -> str:
  """``text`` with each free-form ``Raises:`` section written as a paragraph."""
  lines = text.splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.strip() != "Raises:":
      out.append(line)
      i += 1
      continue
    base = _indent(line)
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
      j += 1
    body = lines[i + 1:j]
    while body and not body[-1].strip():
      body.pop()
    items = [b for b in body if b.strip() and _indent(b) == min(_indent(x) for x in body if x.strip())]
    if body and all(_ITEM.match(b.strip()) for b in items):
      out.extend(lines[i:j])
    else:
      prose = " ".join(b.strip() for b in body if b.strip())
      out.append(" " * base + f"**Raises:** {prose}")
      out.extend(lines[i + 1 + len(body):j])
    i = j
  return "\n".join(out)


class RaisesAsText(griffe.Extension):
  """Rewrites free-form ``Raises:`` sections of every loaded object (see the module docstring)."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
    if obj.docstring is not None and "Raises:" in obj.docstring.value:
      obj.docstring.value = rewrite(obj.docstring.value)
