"""Shared test fixtures.

`x64`: run a test with float64 enabled (oracle comparisons are made in float64, where f32
rounding flips of the error feedback cannot blur the comparison).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import pytest

from cdquant_jax import compilation


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  """A test session compiles thousands of programs in one worker process; without dropping
  them it reaches the kernel's memory-mapping limit and the worker dies with SIGSEGV inside
  LLVM (`compilation.release_programs_near_map_limit`)."""
  yield
  compilation.release_programs_near_map_limit(share=0.3)
