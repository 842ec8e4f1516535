"""The random streams every initializer draws from, so that each init is a pure function of the key."""

from __future__ import annotations

from typing import Any

import jax


def init_keys(key: Any) -> dict[str, jax.Array]:
  """Splits a state's key into the named streams: ``"W0"`` (hidden weights) and ``"a"``.

  Shared by ``kronjax.init``, ``predict`` on new points and the dense baseline,
  so all of them draw the same network.
  """
  k_w, k_a = jax.random.split(key, 2)
  return {"W0": k_w, "a": k_a}


def neuron_keys(key: jax.Array, width: int) -> jax.Array:
  """One key per neuron, ``(m,)`` keys: row ``r`` of ``W0`` depends on ``keys[r]`` only,
  so drawing ``W0`` whole or in chunks of neurons gives the same rows bit for bit."""
  return jax.random.split(key, width)
