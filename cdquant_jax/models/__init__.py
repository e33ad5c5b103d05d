"""Decoder LMs in JAX loading HF (safetensors, sharded, hub) and GGUF checkpoints.

Families: Llama 1/2/3, Mistral, Qwen2, SmolLM, Gemma 1/2/3 (`LlamaLike`), OPT, Falcon.
Each family is a flax NNX module tree (modules.py, llama.py, opt.py, falcon.py) whose
nnx.Params sit at HF-like names; `CausalLM` (a frozen dataclass per family) is the functional
API over it (embed / block / head / forward / decode_step / generate) on plain nested dict
params with the same paths (`nnx_module(params)` and `params_of(module)` convert).
"""

# Model API
from cdquant_jax.models.base import CausalLM, default_positions
from cdquant_jax.models.config import ModelConfig, RopeConfig
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.falcon import Falcon
from cdquant_jax.models.layers import linear
from cdquant_jax.models.llama import LlamaLike
from cdquant_jax.models.opt import OPT
# Loading
from cdquant_jax.models.hf_config import config_from_hf
from cdquant_jax.models.registry import (block_linears, load_model, model_for_config,
                                         model_from_hf_config)
from cdquant_jax.models.tokenizer import load_tokenizer

__all__ = [
    "CausalLM", "Falcon", "LlamaLike", "ModelConfig", "ModelLoadError", "OPT", "RopeConfig",
    "block_linears", "config_from_hf", "default_positions", "linear", "load_model",
    "load_tokenizer", "model_for_config", "model_from_hf_config",
]
