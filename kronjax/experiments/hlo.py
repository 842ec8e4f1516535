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


