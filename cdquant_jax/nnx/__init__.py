"""Quantizing any Flax NNX model with the pipeline's solvers, packing and kernels.

  result = quantize_nnx(model, ids, blocks="layers.*", embed=lambda m, ids: m.embed(ids),
                        method="gptq", knobs={"bits": 3, "group_size": 128})
  result.model(ids)                      # quantized linears are QuantizedLinear modules
  save_quantized_nnx("out/q", result.model)
  model = load_quantized_nnx("out/q", lambda: MyModel(config, rngs=nnx.Rngs(0)))

Modules: `layout` (nnx.Linear / nnx.Einsum as W [d_out, d_in]), `qlinear` (QuantizedLinear; it
also replaces the zoo's `models.modules.Linear`, so `model.nnx_module(params)` quantizes too),
`graph` (paths, blocks, linears), `calibrate` (quantize_nnx), `checkpoint` (orbax save/load).
"""

from cdquant_jax.nnx.calibrate import NNXQuantResult, call_block, quantize_nnx
from cdquant_jax.nnx.checkpoint import load_quantized_nnx, save_quantized_nnx
from cdquant_jax.nnx.layout import EinsumLayout
from cdquant_jax.nnx.qlinear import SUPPORTED, QuantArray, QuantizedLinear

__all__ = ["EinsumLayout", "NNXQuantResult", "QuantArray", "QuantizedLinear", "SUPPORTED",
           "call_block", "load_quantized_nnx", "quantize_nnx", "save_quantized_nnx"]
