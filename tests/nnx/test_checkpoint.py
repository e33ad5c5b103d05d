"""Save / load of a quantized NNX model (orbax state + JSON metadata)."""

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdquant_jax.nnx import QuantizedLinear, load_quantized_nnx, quantize_nnx, save_quantized_nnx
from cdquant_jax.nnx import checkpoint
from tests.nnx import tiny_decoder as td


def test_logits_after_load_equal_before_save(tmp_path):
  ids = np.random.default_rng(1).integers(0, td.TINY["vocab_size"], (8, 12)).astype(np.int32)
  model = td.make_decoder()
  out = quantize_nnx(model, ids, embed=td.embed, method="gptq",
                     knobs={"bits": 3, "group_size": 16}, quant={"exclude": [r"^layers\.1\."]})
  before = np.asarray(model(jnp.asarray(ids)))
  save_quantized_nnx(tmp_path / "q", model)
  entries = json.load(open(os.path.join(tmp_path, "q", checkpoint.META_FILE)))["linears"]
  assert sorted(".".join(map(str, e["path"])) for e in entries) == sorted(out.qweights)
  # A differently seeded constructor: every value comes from the checkpoint.
  loaded = load_quantized_nnx(tmp_path / "q", lambda: td.Decoder(nnx.Rngs(7)))
  assert isinstance(loaded.layers[0].self_attn.q_proj, QuantizedLinear)
  assert type(loaded.layers[1].self_attn.q_proj) is nnx.Einsum
  for name, qw in out.qweights.items():
    path = tuple(int(k) if k.isdigit() else k for k in name.split("."))
    got = checkpoint.graph.get_node(loaded, path).qweight
    assert got.meta == qw.meta
    for field, array in qw.arrays().items():
      np.testing.assert_array_equal(got.arrays()[field], array, err_msg=f"{name}.{field}")
  np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids))), before)
