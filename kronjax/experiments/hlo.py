"""Reading a compiled step's communication: the collective ops of its HLO.

Used by the sharding benchmark and tests to check that one training step's
all-reduce payload equals ``kronjax.sharding.estimated_bytes``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax.numpy as jnp

import kronjax

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collective ops of a compiled HLO module (``jit(f).lower(...).compile().as_text()``).

  Returns one dict per op: ``op`` (all-reduce, all-gather, ...), ``shapes`` (the
  result arrays, e.g. ``["f64[8,3]"]``) and ``bytes`` (their total size: the
  payload each device contributes).
  """
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    shapes, size = [], 0
    for dtype, dims in _ARRAY.findall(m.group("type")):
      count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      shapes.append(f"{dtype}[{dims}]")
      size += count * _BYTES[dtype]
    out.append({"op": m.group("op"), "shapes": shapes, "bytes": size})
  return out


def step_collectives(state: kronjax.TrainState, dataset: kronjax.Dataset, batch_idx: Any, mesh: Any,
                     axis_name: str | None = None) -> list[dict[str, Any]]:
  """``collectives`` of the compiled sharded step for this state and batch shape."""
  step = kronjax.sharding.compiled_step(mesh, axis_name)  # the step fit runs (lowering does not donate)
  text = step.lower(state, dataset, jnp.asarray(batch_idx, jnp.int32)).compile().as_text()
  return collectives(text)




# ----------------------------------------------------------------------------- kernel costs

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>\([^=]*?\)|\S+) (?P<op>[\w\-]+)\((?P<args>[^)]*)\)"
    r"(?P<rest>.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|body|to_apply|condition|branch_computations)=\{?(%[^,}\s]+"
                     r"(?:,\s*%[^,}\s]+)*)\}?")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Ops that launch no kernel of their own on an accelerator (views, bookkeeping, constants).
_FREE = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
                   "after-all", "partition-id", "replica-id", "iota"})


def _array_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += count * _BYTES[dtype]
  return total


def _category(op: str, rest: str, called: list[str], computations: dict) -> str:
  """What a top-level op is, for a cost table: the dot, sort, gather/scatter, loop, elementwise."""
  if op == "fusion":
    inner = {i["op"] for c in called for i in computations.get(c, [])}
    for kind in ("dot", "sort", "scatter", "dynamic-update-slice", "gather", "dynamic-slice",
                 "slice", "reduce"):
      if kind in inner:
        return kind
    return "elementwise"
  if op in ("dot", "convolution"):
    return "dot"
  if op in ("custom-call",):
    return "custom-call"
  return op


def _moved_bytes(category: str, result: int, operands: list[int]) -> int:
  """Bytes one kernel moves: its result and operands, except where it touches part of one.

  A slice or gather reads about as many elements as it writes, not its whole operand;
  an in-place update (``dynamic-update-slice``, ``scatter``: the result aliases the
  largest operand) reads and writes the update's elements, not the whole buffer.
  """
  if category in ("gather", "dynamic-slice", "slice"):
    return result + sum(min(b, result) for b in operands)
  if category in ("dynamic-update-slice", "scatter") and operands:
    rest = sorted(operands)[:-1]
    return 2 * sum(rest)
  return result + sum(operands)


def kernel_costs(hlo_text: str) -> dict[str, Any]:
  """The kernels a compiled HLO module launches and the bytes each moves.

  Reads the optimized module (``jit(f).lower(...).compile().as_text()``): every op of the
  entry computation that is not a view or constant counts as one kernel launch, moving
  the bytes of its result and operands; a ``while`` loop's body counts once per iteration
  (its ``known_trip_count``; a loop without one counts once and is listed under
  ``unknown_trip_loops``), a ``conditional`` its largest branch. This is an accounting
  of the program, not a timing: on an accelerator each launch costs a few microseconds
  and each byte one pass over memory.

  Returns ``{"kernels": int, "bytes": int, "by_category": {category: {"kernels", "bytes"}},
  "largest": [(bytes, op, category, result type) x 8], "loops": [trip counts],
  "unknown_trip_loops": int}``.
  """
  computations: dict[str, list[dict[str, Any]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group("name")
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    inst = _INSTRUCTION.match(line) if current else None
    if inst:
      called = []
      for group in _CALLED.findall(inst.group("rest")):
        called += [c.strip().lstrip("%") for c in group.split(",")]
      trip = _TRIP_COUNT.search(inst.group("rest"))
      computations[current].append({
          "name": inst.group("name"), "type": inst.group("type"), "op": inst.group("op"),
          "operands": _OPERAND.findall(inst.group("args")), "called": called,
          "trip": int(trip.group(1)) if trip else None, "rest": inst.group("rest")})
  if entry is None:
    raise ValueError("hlo_text has no ENTRY computation; pass compiled.as_text().")

  totals = {"kernels": 0, "bytes": 0, "by_category": {}, "largest": [], "loops": [],
            "unknown_trip_loops": 0}

  def walk(name: str, times: int) -> tuple[int, int]:
    insts = computations[name]
    types = {i["name"]: i["type"] for i in insts}
    kernels = moved = 0
    for i in insts:
      if i["op"] in _FREE:
        continue
      if i["op"] == "while":
        body = [c for c in i["called"] if c in computations]
        trip = i["trip"]
        if trip is None:
          totals["unknown_trip_loops"] += 1
        totals["loops"].append(trip)
        for c in body:
          k, b = walk(c, times * (trip or 1))
          kernels, moved = kernels + k, moved + b
        continue
      if i["op"] in ("conditional", "call"):
        best = (0, 0)
        for c in i["called"]:
          if c in computations:
            before = (totals["kernels"], totals["bytes"])
            k, b = walk(c, 0)  # cost of one branch, not added to the totals
            totals["kernels"], totals["bytes"] = before
            best = max(best, (b, k))
        b, k = best
        if times:
          kernels, moved = kernels + k * times, moved + b * times
          totals["kernels"] += k * times
          totals["bytes"] += b * times
        continue
      category = _category(i["op"], i["rest"], i["called"], computations)
      size = _moved_bytes(category, _array_bytes(i["type"]),
                          [_array_bytes(types.get(o, "")) for o in i["operands"]])
      kernels += times
      moved += size * times
      if times:
        totals["kernels"] += times
        totals["bytes"] += size * times
        entry_cat = totals["by_category"].setdefault(category, {"kernels": 0, "bytes": 0})
        entry_cat["kernels"] += times
        entry_cat["bytes"] += size * times
        totals["largest"].append((size * times, i["op"], category, i["type"].split("{")[0]))
    return kernels, moved

  walk(entry, 1)
  totals["largest"] = sorted(totals["largest"], reverse=True)[:8]
  return totals
