"""JAX compilation: the persistent compilation cache and compile-time accounting.

Every jitted function compiles once per distinct shapes and static settings; within a process
the programs are cached in memory (the pipeline's blocks, solvers and packers compile for the
first block and are reused by the others). The persistent cache (JAX's compilation cache)
keeps them on disk across processes, so a second run of the same model and settings loads
them instead of compiling.

Cache location, first that is set: the `path` argument (CLI `--jax-cache DIR`), the
environment variable `CDQUANT_JAX_CACHE`, the default ~/.cache/cdquant_jax/jax; the value
"off" disables the persistent cache.

`CompileStats` counts what compiling cost (seconds and programs, persistent cache hits) from
JAX's monitoring events, so runs report compile time apart from compute time.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading

import jax
from jax import monitoring

ENV_VAR = "CDQUANT_JAX_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "cdquant_jax", "jax")
OFF = ("off", "none", "")

# JAX's monitoring events (jax/_src/dispatch.py, compiler.py). BACKEND covers a program's XLA
# compilation, or its load when the persistent cache has it.
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def cache_dir(path: str | None = None) -> str | None:
  """The persistent cache directory to use (see the module docstring); None when off."""
  value = path if path is not None else os.environ.get(ENV_VAR, DEFAULT_DIR)
  if value.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable_persistent_cache(path: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on at `cache_dir(path)`; returns the directory
  (None: left off). Every program is cached, however quick its compile (the pipeline's small
  ones add up)."""
  directory = cache_dir(path)
  if directory is None:
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def active_cache_dir() -> str | None:
  """The persistent cache directory JAX uses now (None: off)."""
  return jax.config.jax_compilation_cache_dir


@dataclasses.dataclass
class _Totals:
  seconds: float = 0.0  # tracing + lowering + XLA compile (or persistent cache load)
  programs: int = 0  # programs built or loaded (one per distinct shape and setting)
  cache_hits: int = 0  # of which loaded from the persistent cache


_totals = _Totals()
_lock = threading.Lock()
_registered = False


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in (_TRACE, _LOWER, _BACKEND):
    with _lock:
      _totals.seconds += seconds
      _totals.programs += event == _BACKEND


def _on_event(event: str, **_) -> None:
  if event == _CACHE_HIT:
    with _lock:
      _totals.cache_hits += 1


def _register() -> None:
  global _registered  # pylint: disable=global-statement
  with _lock:
    if _registered:
      return
    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)
    _registered = True


class CompileStats:
  """Compile work since this object was made (seconds, programs, persistent cache hits)."""

  def __init__(self):
    _register()
    self._start = dataclasses.replace(_totals)

  def report(self) -> dict:
    """{"compile_seconds", "programs_compiled", "cache_hits"} since creation; programs
    compiled counts the programs XLA built (cache hits excluded)."""
    with _lock:
      now = dataclasses.replace(_totals)
    hits = now.cache_hits - self._start.cache_hits
    return dict(compile_seconds=round(now.seconds - self._start.seconds, 3),
                programs_compiled=now.programs - self._start.programs - hits,
                cache_hits=hits)


# Linux's default vm.max_map_count; used where /proc/sys/vm/max_map_count cannot be read.
_DEFAULT_MAP_LIMIT = 65530


def memory_map_usage() -> tuple[int, int] | None:
  """(memory mappings this process holds, the kernel's per-process limit), or None where
  /proc is absent (not Linux)."""
  try:
    with open("/proc/self/maps", "rb") as maps:
      count = sum(1 for _ in maps)
  except OSError:
    return None
  try:
    with open("/proc/sys/vm/max_map_count") as limit_file:
      limit = int(limit_file.read())
  except (OSError, ValueError):
    limit = _DEFAULT_MAP_LIMIT
  return count, limit


def release_programs_near_map_limit(share: float = 0.5) -> bool:
  """Drops JAX's in-memory program caches (`jax.clear_caches`) once this process holds more
  than `share` of the kernel's memory-mapping limit; returns whether it did.

  Every compiled XLA:CPU program keeps its own code and data mappings until its cache entry is
  dropped. A process that compiles many distinct programs (a sweep of points in one process,
  a test session: ~32,000 mappings after the 250 solver tests) reaches vm.max_map_count
  (65,530 by default), and LLVM then dies with SIGSEGV on its next mmap instead of raising.
  Dropped programs compile again (or load from the persistent cache) when next called.
  """
  usage = memory_map_usage()
  if usage is None or usage[0] <= share * usage[1]:
    return False
  jax.clear_caches()
  gc.collect()
  return True
