"""One process of a two-process run (`jax.distributed` on localhost, 2 CPU devices each).

    multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [MESH] [stop|resume] [CHECKPOINT]

Quantizes the tiny Llama of `pipeline_worker` (GPTQ 3-bit, 10 calibration windows in batches
of 4: the last batch's padding rows lie on process 1) on a mesh over both processes' 4
devices (MESH "data=4" by default, "data=2,model=2" splits the solves within each process).
CHECKPOINT "replay" (default): process 0 writes OUT_DIR/run; the others are given
OUT_DIR/run<id> and must leave it as they found it (no file added, changed or removed).
CHECKPOINT "activations": every process saves its shards of the activations with orbax into
the one shared OUT_DIR/run (orbax needs the same path on every process). "stop" ends both
processes after block 0 is checkpointed (as if killed there); "resume" then continues from the
checkpoint in each output directory (with "replay" the test copies process 0's into the
others', as a shared filesystem would show it). The packed arrays' sha256 is printed for the
parent test.
"""

import hashlib
import logging
import os
import sys

from cdquant_jax.distributed import multihost


def main(process_id: int, num_processes: int, port: str, out_dir: str, mesh: str,
         mode: str, checkpoint: str):
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  group = multihost.ProcessGroup(coordinator=f"localhost:{port}", num_processes=num_processes,
                                 process_id=process_id)
  assert multihost.initialize(group)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cdquant_jax.distributed.mesh import MeshConfig  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline.config import run_config_from_dict  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline.sequential import quantize_loaded  # pylint: disable=import-outside-toplevel
  from tests.distributed.workers.pipeline_worker import TINY  # pylint: disable=import-outside-toplevel
  from cdquant_jax.models import registry  # pylint: disable=import-outside-toplevel
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  logging.getLogger("multihost_worker").info("joined")
  model = registry.model_from_hf_config(TINY)
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (10, 16), 0, 61), np.int32)
  own = process_id > 0 and checkpoint == "replay"
  output = os.path.join(out_dir, f"run{process_id}" if own else "run")
  found = files(output)
  cfg = run_config_from_dict({
      "output_dir": output, "mesh": vars(MeshConfig.parse(mesh)), "forward_batch_size": 4,
      "checkpoint": checkpoint,
      "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
      "calibration": {"nsamples": len(ids), "seqlen": ids.shape[1]}})

  def untouched():
    if own:
      assert files(output) == found, f"process {process_id} wrote in {output}"

  def stop_after(block):
    if mode == "stop" and block == 0:
      untouched()
      print("stopped after block 0", flush=True)
      sys.exit(0)

  result = quantize_loaded(cfg, model, params, ids, progress=False, resume=mode == "resume",
                           after_block=stop_after)
  digest = hashlib.sha256()
  for name in sorted(result.qweights):
    for key, value in sorted(vars(result.qweights[name]).items()):
      if isinstance(value, jax.Array):
        digest.update(f"{name}.{key}".encode() + np.asarray(value).tobytes())
  print(f"process {process_id} packed sha256 {digest.hexdigest()}", flush=True)
  untouched()


def files(folder: str) -> dict[str, int]:
  """path -> modification time (ns) of every file under folder."""
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, names in os.walk(folder) for f in names}


if __name__ == "__main__":
  argv = sys.argv[1:]
  main(int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4] if len(argv) > 4 else "data=4",
       argv[5] if len(argv) > 5 else "run", argv[6] if len(argv) > 6 else "replay")
