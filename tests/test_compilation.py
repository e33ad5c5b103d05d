"""compilation: compile accounting, the persistent cache location, and dropping compiled programs
before the process reaches the kernel's memory-mapping limit."""

import sys

import jax
import jax.numpy as jnp
import pytest

from cdquant_jax import compilation

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")


def _compile_distinct(n: int) -> list:
  """Calls n jitted programs of distinct shapes; returns the jitted functions (kept alive)."""
  fns = []
  for k in range(n):
    fn = jax.jit(lambda x: jnp.cos(x.T @ x).sum() + jnp.sin(x).max())
    fn(jnp.ones((k + 2, 8))).block_until_ready()
    fns.append(fn)
  return fns


@linux_only
def test_map_usage_counts_this_process_against_the_kernel_limit():
  count, limit = compilation.memory_map_usage()
  with open("/proc/self/maps") as maps:
    direct = len(maps.readlines())
  assert abs(count - direct) < 50  # the reads allocate between the two counts
  assert limit >= 1024


@linux_only
def test_programs_are_dropped_only_past_the_share():
  kept = _compile_distinct(3)
  assert not compilation.release_programs_near_map_limit(share=1.0)
  x = jnp.ones((2, 8))
  stats = compilation.CompileStats()
  kept[0](x).block_until_ready()
  built = stats.report()
  assert built["programs_compiled"] + built["cache_hits"] == 0  # still cached
  assert compilation.release_programs_near_map_limit(share=0.0)
  kept[0](x).block_until_ready()
  built = stats.report()
  assert built["programs_compiled"] + built["cache_hits"] == 1  # dropped: built again


@linux_only
def test_dropping_programs_returns_their_mappings():
  compilation.release_programs_near_map_limit(share=0.0)
  before = compilation.memory_map_usage()[0]
  _compile_distinct(60)
  grown = compilation.memory_map_usage()[0]
  assert grown > before
  assert compilation.release_programs_near_map_limit(share=0.0)
  assert compilation.memory_map_usage()[0] < grown - (grown - before) // 2
