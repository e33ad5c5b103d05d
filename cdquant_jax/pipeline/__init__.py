"""The layer-sequential quantization pipeline: configs, calibration capture, checkpoints, export.

Public API:
  RunConfig, load_run_config(path, overrides)            (config.py)
  quantize_model(run, *, resume, progress) -> metrics      (sequential.py)
  quantize_loaded(run, model, params, ids, ...) -> QuantizedRun
  load_quantized_model(dir) -> (model, params, tokenizer); dense_params(params)   (export.py)
  model_perplexity(model, params, ids, *, seqlen, batch_size)                      (evaluation.py)
"""

from cdquant_jax.pipeline.config import RunConfig
from cdquant_jax.pipeline.config import load_run_config
from cdquant_jax.pipeline.evaluation import model_perplexity
from cdquant_jax.pipeline.export import dense_params
from cdquant_jax.pipeline.export import load_quantized_model
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.pipeline.sequential import quantize_model

__all__ = ["RunConfig", "dense_params", "load_quantized_model", "load_run_config",
           "model_perplexity", "quantize_loaded", "quantize_model"]
