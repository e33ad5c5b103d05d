"""cdquant_jax: post-training weight quantization of LLMs in JAX (GPTQ, CDQuant, SpQR).

The public API (`import cdquant_jax as cq`):

  One layer
    cq.solve(method, W, H, cfg=None, *, layer, **knobs) -> cq.SolveResult
    cq.METHODS, cq.default_config(method), cq.apply_knobs(cfg, bits=3, ...), cq.KNOBS
    cq.pack_result(result) -> cq.QuantizedWeight;  cq.dequantize(qw) -> [d_out, d_in]
  Configs (frozen dataclasses; every field means one thing and takes effect)
    cq.GridConfig, cq.RTNConfig, cq.GPTQConfig, cq.InitConfig, cq.CDConfig, cq.BCDConfig,
    cq.CyclicConfig, cq.SpQRConfig, cq.SecondLevelConfig, cq.SpQRCDConfig
    cq.RunConfig, cq.load_run_config(path, overrides), cq.ConfigError
  A whole model
    cq.load_model(path_or_hub_id, dtype) -> (model, params, tokenizer)
    cq.quantize_model(run_config) -> metrics;  cq.load_quantized_model(run_dir)
    cq.export_model(run_dir, "gptq" | "compressed-tensors" | "gguf", output_dir)
  Any Flax NNX model (`cdquant_jax.nnx`: also save_quantized_nnx / load_quantized_nnx)
    cq.quantize_nnx(model, ids, blocks="layers.*", embed=fn, method=..., knobs=...) -> result
    cq.QuantizedLinear: the NNX module a quantized nnx.Linear / nnx.Einsum becomes

Names resolve lazily, so `import cdquant_jax` (and the `cdquant` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "solve": ("cdquant_jax.solvers.api", "solve"),
    "METHODS": ("cdquant_jax.solvers.api", "METHODS"),
    "default_config": ("cdquant_jax.solvers.api", "default_config"),
    "KNOBS": ("cdquant_jax.solvers.knobs", "KNOBS"),
    "apply_knobs": ("cdquant_jax.solvers.knobs", "apply"),
    "SolveResult": ("cdquant_jax.solvers.result", "SolveResult"),
    "QuantizedWeight": ("cdquant_jax.quant.qweight", "QuantizedWeight"),
    "pack_result": ("cdquant_jax.quant.qweight", "pack_result"),
    "dequantize": ("cdquant_jax.quant.qweight", "dequantize"),
    "GridConfig": ("cdquant_jax.quant.grids", "GridConfig"),
    "RTNConfig": ("cdquant_jax.solvers.rtn", "RTNConfig"),
    "GPTQConfig": ("cdquant_jax.solvers.gptq", "GPTQConfig"),
    "InitConfig": ("cdquant_jax.solvers.init", "InitConfig"),
    "CDConfig": ("cdquant_jax.solvers.cd", "CDConfig"),
    "BCDConfig": ("cdquant_jax.solvers.bcd", "BCDConfig"),
    "CyclicConfig": ("cdquant_jax.solvers.cyclic", "CyclicConfig"),
    "SpQRConfig": ("cdquant_jax.solvers.spqr", "SpQRConfig"),
    "SecondLevelConfig": ("cdquant_jax.solvers.spqr", "SecondLevelConfig"),
    "SpQRCDConfig": ("cdquant_jax.solvers.spqr_cd", "SpQRCDConfig"),
    "RunConfig": ("cdquant_jax.pipeline.config", "RunConfig"),
    "load_run_config": ("cdquant_jax.pipeline.config", "load_run_config"),
    "ConfigError": ("cdquant_jax.config", "ConfigError"),
    "load_model": ("cdquant_jax.models.registry", "load_model"),
    "quantize_model": ("cdquant_jax.pipeline.sequential", "quantize_model"),
    "load_quantized_model": ("cdquant_jax.pipeline.export", "load_quantized_model"),
    "export_model": ("cdquant_jax.export", "export_model"),
    "quantize_nnx": ("cdquant_jax.nnx", "quantize_nnx"),
    "QuantizedLinear": ("cdquant_jax.nnx", "QuantizedLinear"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f"module 'cdquant_jax' has no attribute {name!r}")
  module, attribute = _API[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
