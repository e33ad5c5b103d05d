"""`load_model`: a HF directory, a hub id or a .gguf file -> (model, params, tokenizer or None).

Bad checkpoints raise `ModelLoadError` naming the file and the offending field, value or tensor
(FileNotFoundError for a missing file).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from cdquant_jax.models import hf_config, hf_loader
from cdquant_jax.models.base import CausalLM
from cdquant_jax.models.config import ModelConfig
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.falcon import Falcon
from cdquant_jax.models.llama import LlamaLike
from cdquant_jax.models.opt import OPT

FAMILIES: dict[str, type[CausalLM]] = {"llama": LlamaLike, "opt": OPT, "falcon": Falcon}

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "f16": jnp.float16}
DTYPE_NAMES = tuple(_DTYPES)  # what `as_dtype` (and `load_model(dtype=...)`) accepts by name


def model_for_config(config: ModelConfig) -> CausalLM:
  return FAMILIES[config.family](config)


def model_from_hf_config(hf_config_dict: dict[str, Any]) -> CausalLM:
  """The model object for a HF config.json dict (strictly parsed)."""
  return model_for_config(hf_config.config_from_hf(hf_config_dict))


def block_linears(config: ModelConfig) -> list[list[tuple[str, ...]]]:
  """True-sequential groups of linear paths of one block (see `CausalLM.block_linears`)."""
  return model_for_config(config).block_linears()


def as_dtype(dtype) -> Any:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
  return dtype


def _checkpoint_model(hf_config_dict: dict[str, Any], config_file: str) -> CausalLM:
  """`model_from_hf_config`, its errors prefixed with the file the config came from."""
  try:
    return model_from_hf_config(hf_config_dict)
  except ModelLoadError as e:
    raise ModelLoadError(f"{config_file}: {e}") from e


def _by_param_name(model, by_hf_name: dict[str, str]) -> dict[str, str]:
  """{HF tensor name: v} -> {dotted parameter path: v} for the tensors the model uses."""
  out = {}
  for name, value in by_hf_name.items():
    path = model.hf_name_to_path(name)
    if path is not None:
      out[".".join(str(k) for k in path)] = value
  return out


def open_checkpoint(path_or_hub_id: str, with_tokenizer: bool = True, *,
                    source_dtypes: dict[str, str] | None = None):
  """(model, tensors, source, tokenizer or None) of a checkpoint, no tensor read yet.

  tensors: the checkpoint's `hf_loader.LazyTensors` ({HF tensor name: array}, each read from
  the file, and a GGUF one dequantized to float32, when accessed); source: the directory or
  .gguf file (for error messages). Arguments as for `load_model`.
  """
  from cdquant_jax.models import gguf_loader, tokenizer  # pylint: disable=import-outside-toplevel
  reader = None
  if str(path_or_hub_id).endswith(".gguf"):
    source = config_file = str(path_or_hub_id)
    reader = gguf_loader.open_reader(source)
    hf_config_dict, state = gguf_loader.load_gguf(source, reader)
  else:
    source = hf_loader.resolve_model_dir(str(path_or_hub_id))
    config_file = os.path.join(source, hf_loader.CONFIG_FILE)
    hf_config_dict = hf_loader.read_config(source)
    state = hf_loader.load_state_dict(source)
  model = _checkpoint_model(hf_config_dict, config_file)
  if source_dtypes is not None:
    types = (gguf_loader.source_dtypes(reader, source) if reader is not None
             else dict(state.dtypes))
    source_dtypes.update(_by_param_name(model, types))
  tok = None
  if with_tokenizer and tokenizer.has_tokenizer(source, reader):
    tok = tokenizer.load_tokenizer(source, reader)
  return model, state, source, tok


def load_model(path_or_hub_id: str, dtype=jnp.float32, with_tokenizer: bool = True, *,
               source_dtypes: dict[str, str] | None = None):
  """Loads a checkpoint into (model, params, tokenizer or None).

  Args:
    path_or_hub_id: a local HF directory (config.json + safetensors), a .gguf file, or a hub id
      (downloaded with huggingface_hub; needs network).
    dtype: parameter dtype, float32 / bfloat16 / float16 (or their names).
    with_tokenizer: also build a `tokenizers.Tokenizer` (None when the checkpoint has none).
    source_dtypes: a dict to fill with {dotted parameter name ("layers.0.mlp.up_proj.weight"):
      the checkpoint's type of that tensor} ("float32" / "float16" / "bfloat16", or a GGUF
      block type such as "Q8_0"), for `export.write_model_dir` to store unquantized tensors
      no wider than they came.
  """
  dtype = as_dtype(dtype)
  model, state, source, tok = open_checkpoint(path_or_hub_id, with_tokenizer,
                                              source_dtypes=source_dtypes)
  params = hf_loader.params_from_state_dict(model, state, dtype, source=source)
  return model, params, tok
