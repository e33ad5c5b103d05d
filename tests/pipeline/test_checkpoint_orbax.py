"""checkpoint=activations with bfloat16 activations on disk: the orbax-saved batches (stored
dtype) resume to the uninterrupted run bit for bit. Fails without casting the restored rows
back to the compute dtype (the resumed blocks ran in bfloat16) and without viewing a .npy
bfloat16 batch (saved as 2-byte voids) as bfloat16 again."""

import jax
import numpy as np

from cdquant_jax.models import registry
from cdquant_jax.pipeline import checkpoint
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded


class Stop(Exception):
  pass


def stop_after_block_0(block):
  if block == 0:
    raise Stop


def test_bf16_disk_activations_resume_bit_identical(tmp_path):
  model = registry.model_from_hf_config({
      "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 61})
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (6, 16), 0, 61), np.int32)
  run = lambda out: run_config_from_dict({
      "output_dir": str(out), "checkpoint": "activations", "activations": "disk",
      "activation_dtype": "bfloat16", "forward_batch_size": 4,
      "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
      "calibration": {"nsamples": len(ids), "seqlen": ids.shape[1]}})
  full = quantize_loaded(run(tmp_path / "full"), model, params, ids, progress=False)
  try:
    quantize_loaded(run(tmp_path / "cut"), model, params, ids, progress=False,
                    after_block=stop_after_block_0)
  except Stop:
    pass
  assert checkpoint.load_state(str(tmp_path / "cut"))["activation_batches"] == 2
  resumed = quantize_loaded(run(tmp_path / "cut"), model, params, ids, progress=False,
                            resume=True)
  assert sorted(full.qweights) == sorted(resumed.qweights)
  for name, qw in full.qweights.items():
    for key, value in vars(qw).items():
      if isinstance(value, jax.Array):
        assert np.array_equal(value, vars(resumed.qweights[name])[key]), (name, key)
  assert [r["objective"] for r in full.records] == [r["objective"] for r in resumed.records]
