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
