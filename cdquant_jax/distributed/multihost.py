"""Multi-controller runs: one process per host, joined with `jax.distributed.initialize`.

    group = ProcessGroup.from_env(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)
    initialize(group)   # before any JAX computation; no-op for a single process

Every process runs the same program on the same config and data; a mesh (`RunConfig.mesh`)
then spans every process's devices (`jax.devices()`), each process supplies its rows of the
calibration batches (`placement.shard_rows`), and only process 0 writes the run directory
(`is_writer`). Log records are prefixed with "[process i/n]".

Settings, first that is given: the flag value (`cdquant quantize --coordinator
--num-processes --process-id`), the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, then JAX's cluster auto-detection (SLURM, Open MPI,
Kubernetes, Cloud TPU) for those still unset. With none of them given the run is a single
process. On CPU devices the cross-process collectives use gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

from cdquant_jax import config as config_lib

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessGroup:
  """Where this process stands among the run's processes (None: JAX detects it)."""

  # "host:port" of process 0's coordination service.
  coordinator: str | None = None
  # Number of processes of the run.
  num_processes: int | None = None
  # This process's index, 0 .. num_processes - 1 (process 0 writes the outputs).
  process_id: int | None = None

  def __post_init__(self):
    check = config_lib.reject_unless
    check(self.num_processes is None or self.num_processes >= 1,
          f"num_processes must be >= 1, got {self.num_processes}")
    check(self.process_id is None or self.process_id >= 0,
          f"process_id must be >= 0, got {self.process_id}")
    check(self.process_id is None or self.num_processes is None
          or self.process_id < self.num_processes,
          f"process_id={self.process_id} must be below num_processes={self.num_processes}")

  @property
  def requested(self) -> bool:
    """Whether any setting asks for a multi-process run."""
    return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None, **given) -> "ProcessGroup":
    """The flags in `given` (None = unset), the rest from the environment variables ENV."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, var in ENV.items():
      value = given.get(name)
      if value is None and environ.get(var):
        value = environ[var]
        if name != "coordinator":
          config_lib.reject_unless(value.strip().isdigit(),
                                   f"{var} must be a non-negative integer, got {value!r}")
          value = int(value)
      values[name] = value
    return cls(**values)


def initialize(group: ProcessGroup) -> bool:
  """Joins the process group (gloo collectives on CPU); False (nothing done) when no setting
  asks for several processes. Must run before the first JAX computation."""
  if not group.requested:
    return False
  # gloo is the default on JAX 0.10; set it where a version leaves CPU collectives off.
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=group.coordinator,
                             num_processes=group.num_processes, process_id=group.process_id)
  name_process_in_logs()
  return True


def is_writer() -> bool:
  """Whether this process writes the run's shared outputs (process 0)."""
  return jax.process_index() == 0


class _ProcessPrefix(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    if not getattr(record, "_process_named", False):
      record.msg = f"{self.prefix} {record.msg}"
      record._process_named = True  # pylint: disable=protected-access
    return True


def name_process_in_logs() -> None:
  """Prefixes every record of the root logger's handlers with "[process i/n]"."""
  prefix = f"[process {jax.process_index()}/{jax.process_count()}]"
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _ProcessPrefix) for f in handler.filters):
      handler.addFilter(_ProcessPrefix(prefix))
