"""Peak memory: host resident set size and accelerator memory (when the backend reports it)."""

from __future__ import annotations

import resource
import sys

import jax

MIB = 1024 * 1024


def peak_host_mib() -> float:
  """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / MIB if sys.platform == "darwin" else peak / 1024


def device_memory_mib() -> dict[str, float] | None:
  """{"peak": MiB, "in_use": MiB} of the first device, or None where memory_stats() is absent
  (the CPU backend)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API raise
    return None
  if not stats:
    return None
  return {"peak": stats.get("peak_bytes_in_use", 0) / MIB,
          "in_use": stats.get("bytes_in_use", 0) / MIB}


def memory_report() -> dict[str, float | None]:
  device = device_memory_mib()
  return {"peak_host_mib": round(peak_host_mib(), 1),
          "peak_device_mib": None if device is None else round(device["peak"], 1)}
