"""Runs a worker script in a subprocess with N forced CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count only takes effect when the backend starts, so
multi-device checks cannot run in the pytest process (whose JAX is already started with one
device). A worker asserts its properties itself and exits non-zero on failure; its stdout and
stderr are shown in the pytest failure.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

WORKERS = pathlib.Path(__file__).parent / "workers"
REPO = pathlib.Path(__file__).resolve().parents[2]


def run_worker(name: str, n_devices: int, *args: str, timeout: float = 120) -> str:
  """Runs workers/<name>.py on `n_devices` CPU devices; returns its stdout (asserts rc == 0)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, str(WORKERS / f"{name}.py"), *args], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)
  assert proc.returncode == 0, (f"{name} failed (rc {proc.returncode}):\n"
                                f"{proc.stdout}\n{proc.stderr}")
  return proc.stdout


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago (for the coordinator)."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(name: str, n_processes: int, n_devices: int, *args: str,
                  timeout: float = 600, jax_cache: str | None = None) -> list[str]:
  """Runs workers/<name>.py as processes 0..n_processes-1 of one `jax.distributed` group on
  localhost (argv: process id, process count, coordinator port, *args), each with `n_devices`
  CPU devices; returns their stdout + stderr (asserts every rc == 0).

  jax_cache: a persistent compilation cache folder shared by the launches of a test module
  (later launches load the programs instead of compiling them again)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             PYTHONPATH=str(REPO))
  if jax_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(WORKERS / f"{name}.py"), str(k),
                             str(n_processes), port, *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for k in range(n_processes)]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for k, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"{name} process {k} failed (rc {p.returncode}):\n{out}"
  return outputs
