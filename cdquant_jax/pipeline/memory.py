"""Peak memory: host resident set size (per pipeline phase) and accelerator memory.

`tracking()` starts a background thread that samples this process's current RSS every
10 ms; `mark(phase)` charges the highest sample since the previous mark to `phase` (the
pipeline's Timer marks each lap, so the phases of metrics["memory"]["phases_host_mib"] are those of
metrics["timing"]). ru_maxrss (`peak_host_mib`) is the process-lifetime peak: a phase's peak
is only visible by sampling. A peak shorter than the interval can be missed by the phases (not
by peak_host_mib).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
import sys
import threading
import time
from typing import Iterator

import jax
import psutil

MIB = 1024 * 1024


def peak_host_mib() -> float:
  """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / MIB if sys.platform == "darwin" else peak / 1024


def current_host_mib() -> float:
  """Current resident set size of this process in MiB."""
  return psutil.Process().memory_info().rss / MIB


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def _glibc_function(name: str):
  """The glibc function `name` (a ctypes function), or None off Linux / without glibc / in an
  older glibc that lacks it."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
  except (OSError, AttributeError):
    return None


@functools.cache
def _mallinfo2():
  fn = _glibc_function("mallinfo2")  # glibc >= 2.33
  if fn is not None:
    fn.restype = _MallInfo2
  return fn


def _smaps_rollup_kib() -> dict[str, int]:
  """{"Rss": KiB, "Anonymous": KiB, ...} of /proc/self/smaps_rollup ({} where absent)."""
  try:
    with open("/proc/self/smaps_rollup") as f:
      lines = f.readlines()[1:]  # the first names the address range
  except OSError:
    return {}
  fields = (line.split() for line in lines)
  return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) >= 2 and f[1].isdigit()}


def rss_breakdown_mib() -> dict[str, float] | None:
  """What the resident set is made of now (MiB), or None off Linux.

  anonymous: resident anonymous memory (malloc's heap and mappings, XLA's buffers, thread
    stacks); file: resident file-backed pages (the shared libraries' code and data: jaxlib,
    numpy, ...; their resident share of F). From /proc/self/smaps_rollup.
  malloc_in_use: bytes glibc malloc has handed out and not had back (uordblks + hblkhd);
  malloc_free: bytes freed to malloc and kept in its arenas outside the top chunk (fordblks -
    keepcost): an upper bound on the resident memory malloc holds for reuse (malloc_trim
    returns whole free pages of them to the OS, which are then still counted here).
  """
  smaps = _smaps_rollup_kib()
  if not smaps:
    return None
  out = {"anonymous": smaps.get("Anonymous", 0) / 1024,
         "file": (smaps.get("Rss", 0) - smaps.get("Anonymous", 0)) / 1024}
  info = _mallinfo2()
  if info is not None:
    m = info()
    out.update(malloc_in_use=(m.uordblks + m.hblkhd) / MIB,
               malloc_free=(m.fordblks - m.keepcost) / MIB)
  return {k: round(v, 1) for k, v in out.items()}


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


class PhaseMemory:
  """Host RSS sampled every `interval_s` seconds by a daemon thread, charged to phases.

  phases: {phase: peak MiB over every interval charged to it}; `window_peak()` is the peak since
  the last `reset_window()` (a block's peak).
  """

  def __init__(self, interval_s: float = 0.01):
    self._process = psutil.Process()
    self._interval = interval_s
    self._lock = threading.Lock()
    self._since_mark = self._since_window = self._rss()
    self.phases: dict[str, float] = {}
    # rss_breakdown_mib() when the RSS reached its highest sample so far (taken then, by the
    # sampler: the breakdown of the peak, not of the end of the run)
    self.peak_breakdown: dict[str, float] | None = None
    self._highest = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")
    self._thread.start()

  def _rss(self) -> float:
    return self._process.memory_info().rss / MIB

  def _sample(self) -> None:
    while not self._stop.wait(self._interval):
      rss = self._rss()
      self._observe(rss)
      if rss > self._highest + 1.0:  # a new peak (by more than 1 MiB): what it is made of
        self._highest = rss
        breakdown = rss_breakdown_mib()
        if breakdown is not None:
          self.peak_breakdown = dict(breakdown, rss=round(rss, 1))

  def _observe(self, rss: float) -> None:
    with self._lock:
      self._since_mark = max(self._since_mark, rss)
      self._since_window = max(self._since_window, rss)

  def mark(self, phase: str) -> None:
    """Charges the peak since the previous mark (and the RSS now) to `phase`."""
    self._observe(self._rss())
    with self._lock:
      self.phases[phase] = round(max(self.phases.get(phase, 0.0), self._since_mark), 1)
      self._since_mark = self._rss()

  def reset_window(self) -> None:
    with self._lock:
      self._since_window = self._rss()

  def window_peak(self) -> float:
    """Peak RSS (MiB) since the last `reset_window()`, the RSS now included."""
    self._observe(self._rss())
    with self._lock:
      return round(self._since_window, 1)

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


_ACTIVE: list[PhaseMemory] = []


@contextlib.contextmanager
def tracking() -> Iterator[PhaseMemory]:
  """The active PhaseMemory (a new one, stopped on exit, when none is active)."""
  if _ACTIVE:
    yield _ACTIVE[-1]
    return
  tracker = PhaseMemory()
  _ACTIVE.append(tracker)
  try:
    yield tracker
  finally:
    _ACTIVE.pop()
    tracker.close()


def active() -> PhaseMemory | None:
  return _ACTIVE[-1] if _ACTIVE else None


def mark(phase: str) -> None:
  """`PhaseMemory.mark` on the active tracker (nothing without one)."""
  if _ACTIVE:
    _ACTIVE[-1].mark(phase)


def release_freed() -> None:
  """Returns the memory freed since the last call to the OS (glibc `malloc_trim`; nothing
  elsewhere).

  glibc keeps freed heap memory for reuse (`runtime.configure` raises its trim threshold to
  4 GiB for speed), and a block's new buffers come from XLA's threads' arenas, not from the
  chunks the replaced block freed: without a trim each quantized block adds its size to the
  RSS until the run ends (+440 MiB over SmolLM2's 30 blocks). The pipeline calls this once per
  block and after loading and evaluating.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


@functools.cache
def _malloc_trim():
  return _glibc_function("malloc_trim")


def block_report(buffers: dict[str, int], peak_host: float | None) -> dict:
  """The memory record of one block: its accounted buffers (bytes), which one dominated, the
  host peak (MiB) while it ran and the device's peak / in-use memory (MiB; None on the CPU
  backend, whose client has no allocation stats).

  buffers: {name: bytes} of the buffers the block held (params, activations, Hessians, ...).
  """
  device = device_memory_mib()
  sizes = {name: int(n) for name, n in buffers.items()}
  return dict(buffers_bytes=sizes, dominant=max(sizes, key=sizes.get) if sizes else None,
              peak_host_mib=peak_host,
              peak_device_mib=None if device is None else round(device["peak"], 1),
              device_in_use_mib=None if device is None else round(device["in_use"], 1))


def memory_report() -> dict:
  """metrics["memory"]: the process peaks and, while tracking, the peak of each phase."""
  device = device_memory_mib()
  out = {"peak_host_mib": round(peak_host_mib(), 1),
         "peak_device_mib": None if device is None else round(device["peak"], 1)}
  tracker = active()
  if tracker is not None:
    tracker.mark("report")
    out["phases_host_mib"] = {k: v for k, v in tracker.phases.items() if k != "report"}
    out["peak_breakdown_mib"] = tracker.peak_breakdown
  return out


def empty_program_mib() -> float:
  """RSS (MiB) after compiling and running an empty jitted program: the JAX runtime's fixed
  overhead (the `fixed` term of the README's memory budget) when called in a fresh process."""
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jax.numpy.zeros(())))
  time.sleep(0.05)
  return current_host_mib()
