"""Shared test setup: strict rank promotion everywhere, float64 only where asked."""

import contextlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@contextlib.contextmanager
def _float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
  """Enables float64 for one test (trajectory comparisons) and restores the default."""
  with _float64():
    yield


@pytest.fixture(scope="module")
def x64_module():
  """float64 for a whole module (``pytestmark = pytest.mark.usefixtures("x64_module")``)."""
  with _float64():
    yield
