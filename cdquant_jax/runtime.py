"""Process settings for CPU runs, applied by the `cdquant` command (and the benchmarks) before
JAX loads.

- `OPENBLAS_NUM_THREADS=1` unless already set: XLA runs its LAPACK calls (Cholesky, triangular
  solves) through scipy's OpenBLAS, whose own thread pool busy-waits after every call and takes
  the cores from XLA's threads (12% of all CPU samples of a SmolLM2 GPTQ run, `perf`).
- glibc malloc keeps freed memory: XLA allocates its buffers per call, and above the dynamic
  mmap threshold each one is mapped and zero-filled again; a fixed 32 MiB threshold and a
  large trim threshold and top pad reuse them (a third of the page faults of that run).
- glibc malloc at most 2 arenas: each thread that allocates (XLA's pool) otherwise gets its own
  arena, and the freed memory each one keeps adds up: a SmolLM2 GPTQ run (32 x 256, 3 blocks
  quantized, no evaluation) peaked at 1515 MiB with the two settings above, 1390 MiB with
  glibc's defaults and 1377 MiB with both settings and MALLOC_ARENA_MAX=2, what this sets.
  The pipeline also returns freed memory after every block (`pipeline.memory.release_freed`).

The first two only change speed. A SmolLM2 GPTQ run (32 x 256 calibration): 32.8 s -> 28.3 s,
system time 12.7 s -> 3.3 s (experiments/results/bench_pipeline.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_MIB = 1 << 20


def configure() -> None:
  """Applies the settings of the module docstring (the malloc ones on glibc only)."""
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  if not sys.platform.startswith("linux"):
    return
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return
  mallopt(_M_MMAP_THRESHOLD, 32 * _MIB)
  mallopt(_M_TRIM_THRESHOLD, 4096 * _MIB)
  mallopt(_M_TOP_PAD, 256 * _MIB)
  mallopt(_M_ARENA_MAX, 2)
