"""quantize_nnx on the zoo's own NNX module (a tiny Llama built from dict params).

The reference is the zoo pipeline (`sequential.quantize_loaded`) on the same dict params: the
packed weights must be identical bit for bit and the logits of the quantized NNX module equal
to the pipeline's quantized model; the quantized module saves and loads with orbax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdquant_jax.models import registry
from cdquant_jax.models.modules import default_positions
from cdquant_jax.nnx import QuantizedLinear, load_quantized_nnx, quantize_nnx, save_quantized_nnx
from cdquant_jax.pipeline import capture
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}
NSAMPLES, SEQLEN, BATCH = 16, 16, 8
KNOBS = {"bits": 3, "group_size": 16}


def zoo_embed(module, ids):
  """ids [B, T] -> the first block's input [B, T, D]."""
  return module.embed(ids, default_positions(ids))


def zoo_block_call(block, h):
  """The zoo block's output hidden state for its input h [B, T, D] (no cache)."""
  return block(h, default_positions(h[..., 0]))[0]


@pytest.fixture(scope="module")
def setup():
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  calib = np.random.default_rng(0).integers(0, TINY["vocab_size"],
                                            (NSAMPLES, SEQLEN)).astype(np.int32)
  return model, params, calib


def test_quantize_nnx_on_the_zoo_module_matches_the_zoo_pipeline(setup, tmp_path):
  model, params, calib = setup
  run = run_config_from_dict({
      "output_dir": str(tmp_path / "zoo"), "checkpoint": "none", "forward_batch_size": BATCH,
      "quant": {"method": "gptq", "knobs": KNOBS},
      "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN}})
  reference = quantize_loaded(run, model, params, calib, progress=False)
  module = model.nnx_module(params)
  out = quantize_nnx(module, calib, blocks="layers.*", embed=zoo_embed,
                     block_call=zoo_block_call, method="gptq", knobs=KNOBS, batch_size=BATCH)
  assert sorted(out.qweights) == sorted(reference.qweights)
  for name, theirs in reference.qweights.items():
    ours = out.qweights[name]
    assert ours.meta == theirs.meta, name
    for field, array in theirs.arrays().items():
      np.testing.assert_array_equal(ours.arrays()[field], array, err_msg=f"{name}.{field}")
  q_proj = module.layers[0].self_attn.q_proj
  assert isinstance(q_proj, QuantizedLinear) and q_proj.path == ("self_attn", "q_proj")
  ids = jnp.asarray(calib)
  want = capture.block_logits_fn(model, reference.params)(calib)
  got = nnx.jit(lambda m, x: m(x))(module, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)

  save_quantized_nnx(tmp_path / "saved", module)
  loaded = load_quantized_nnx(tmp_path / "saved", lambda: model.build_module(nnx.Rngs(0)))
  assert loaded.layers[1].mlp.down_proj.path == ("mlp", "down_proj")
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(loaded, ids)),
                                np.asarray(got))
