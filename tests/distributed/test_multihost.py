"""Two processes on localhost (`jax.distributed`, gloo CPU collectives, 2 CPU devices each)
quantize a tiny Llama on a mesh over both processes' 4 devices: the result equals the
one-process, one-device run bit for bit after both are stopped after block 0 and restarted
with resume; only process 0 writes, and the logs name the process."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from cdquant_jax.config import ConfigError
from cdquant_jax.distributed import multihost
from cdquant_jax.models import registry
from cdquant_jax.pipeline import export
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.quant import serialize
from tests.distributed.multidevice import run_processes
from tests.distributed.workers.pipeline_worker import TINY

# data 2 x model 2 over 2 processes x 2 devices: each process holds one data row (its half of
# every calibration batch) and splits each solve's rows over its own 2 devices.
MESH = "data=2,model=2"


def packed_sha(qweights) -> str:
  """sha256 over every packed array (as the worker prints it)."""
  digest = hashlib.sha256()
  for name in sorted(qweights):
    for key, value in sorted(vars(qweights[name]).items()):
      if isinstance(value, jax.Array):
        digest.update(f"{name}.{key}".encode() + np.asarray(value).tobytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: this process, one device, no mesh (the worker's model and data)."""
  model = registry.model_from_hf_config(TINY)
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (10, 16), 0, 61), np.int32)
  cfg = run_config_from_dict({
      "output_dir": str(tmp_path_factory.mktemp("one")), "checkpoint": "none",
      "forward_batch_size": 4, "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
      "calibration": {"nsamples": len(ids), "seqlen": ids.shape[1]}})
  return quantize_loaded(cfg, model, params, ids, progress=False)


def shas(outputs: list[str]) -> list[str]:
  return [line.split()[-1] for out in outputs for line in out.splitlines()
          if "packed sha256" in line]


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_one_process(tmp_path, one_process):
  """Stopped after block 0, then restarted with resume: the model of the one-process run, in
  both processes' memory and in process 0's files; process 1 touches no file."""
  cache = str(tmp_path / "jax_cache")  # the resumed processes load the stopped ones' programs
  stopped = run_processes("multihost_worker", 2, 2, str(tmp_path), MESH, "stop", jax_cache=cache)
  for k, out in enumerate(stopped):
    assert "stopped after block 0" in out and f"[process {k}/2] joined" in out
  assert os.listdir(tmp_path / "run1") == []
  shutil.copytree(tmp_path / "run" / "checkpoint", tmp_path / "run1" / "checkpoint")
  resumed = run_processes("multihost_worker", 2, 2, str(tmp_path), MESH, "resume",
                          jax_cache=cache)
  assert shas(resumed) == [packed_sha(one_process.qweights)] * 2
  assert "[process 0/2] resuming" in resumed[0] and "[process 1/2] resuming" in resumed[1]
  written = serialize.load_quantized(os.path.join(tmp_path, "run", export.QUANTIZED_FILE))
  assert packed_sha(written) == packed_sha(one_process.qweights)
  assert not os.path.exists(tmp_path / "run" / "checkpoint")  # removed by process 0 at the end
  assert os.path.exists(tmp_path / "run1" / "checkpoint" / "state.json")  # process 1's copy


@pytest.mark.slow
def test_two_processes_resume_from_their_orbax_activations(tmp_path, one_process):
  """checkpoint=activations: each process saves its rows of the activations with orbax into
  the shared output directory; both resume from them to the one-process model."""
  args = (str(tmp_path), MESH)
  cache = str(tmp_path / "jax_cache")
  run_processes("multihost_worker", 2, 2, *args, "stop", "activations", jax_cache=cache)
  assert os.path.isdir(tmp_path / "run" / "checkpoint" / "activations_0000")
  resumed = run_processes("multihost_worker", 2, 2, *args, "resume", "activations",
                          jax_cache=cache)
  assert shas(resumed) == [packed_sha(one_process.qweights)] * 2


def test_process_group_from_flags_and_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert multihost.ProcessGroup.from_env(env) == multihost.ProcessGroup(
      coordinator="10.0.0.1:1234", num_processes=4, process_id=3)
  flags = multihost.ProcessGroup.from_env(env, process_id=1)  # a flag wins over the env
  assert flags.process_id == 1 and flags.num_processes == 4
  assert not multihost.ProcessGroup.from_env({}).requested
  assert not multihost.initialize(multihost.ProcessGroup())  # single process: nothing done
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES must be a non-negative integer"):
    multihost.ProcessGroup.from_env({"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ConfigError, match="process_id=2 must be below num_processes=2"):
    multihost.ProcessGroup(num_processes=2, process_id=2)
