"""What every export format needs: the run directory read back, each quantized linear decoded
into its grid (codes, scale, zero, groups), a HF config.json and HF tensor names, and the one
refusal error.

Glossary: N = d_out output channels, K = d_in input features, G = columns per group;
`group_index[k]` is the group of ORIGINAL input column k (contiguous groups: k // G; act-order
without static groups: a permuted assignment); w[n, k] = scale[n, g] · (codes[n, k] − zero[n, g])
with g = group_index[k], exactly `qweight.dequantize` when the weight has no outliers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from cdquant_jax.models import hf_config as hf_config_lib
from cdquant_jax.models.config import FULL, SLIDING, ModelConfig, RopeConfig
from cdquant_jax.quant import packing, qweight
from cdquant_jax.quant.qweight import QuantizedWeight, QuantMeta  # noqa: F401 (re-exported)


class ExportError(ValueError):
  """A run that the chosen format cannot hold exactly (or a run directory it cannot read).

  The message names the module, what the format cannot hold, and the formats that can.
  """


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
  """Choices that trade exactness for exportability (all off: refuse anything inexact)."""

  # Round float32 scales to float16 where the format stores float16 scales (GPTQ scales, GGUF
  # block scales d); off: refuse them (quantize with grid fp16_stats for exact fp16 scales).
  round_scales: bool = False
  # GGUF only: write a linear whose grid has no exact GGUF block type as a dequantized F32
  # tensor (the file notes which) instead of refusing.
  gguf_dense_fallback: bool = False


@dataclasses.dataclass(frozen=True)
class LinearGrid:
  """One quantized linear decoded from its QuantizedWeight (numpy, original column order)."""

  name: str  # module, "layers.0.self_attn.q_proj"
  codes: np.ndarray  # int32 [N, K] in [0, 2^bits)
  scale: np.ndarray  # float32 [N, n_groups]
  zero: np.ndarray  # float32 [N, n_groups], in code units
  group_index: np.ndarray  # int32 [K]
  meta: QuantMeta

  @property
  def bits(self) -> int:
    return self.meta.bits

  @property
  def maxq(self) -> int:
    return 2**self.meta.bits - 1

  @property
  def contiguous_groups(self) -> bool:
    """Groups are runs of G consecutive input columns (no act-order permutation)."""
    return not self.meta.has_perm

  @property
  def per_channel(self) -> bool:
    return self.meta.n_groups == 1

  def dequantized(self) -> np.ndarray:
    """float32 [N, K], the same operations (and bits) as `qweight.dequantize`."""
    g = self.group_index
    return self.scale[:, g] * (self.codes.astype(np.float32) - self.zero[:, g])


@dataclasses.dataclass(frozen=True)
class Run:
  """A quantized run directory read back."""

  directory: str
  model: Any  # CausalLM
  params: dict  # with a QuantizedWeight at p["weight"] of each quantized linear
  tokenizer: Any  # tokenizers.Tokenizer or None
  run_config: dict | None  # run_config.json, when present

  @property
  def config(self) -> ModelConfig:
    return self.model.config

  @property
  def dtype(self) -> str:
    leaf = next(x for x in jax.tree.leaves(self.params, is_leaf=_is_qweight)
                if not _is_qweight(x))
    return np.dtype(leaf.dtype).name


def _is_qweight(x) -> bool:
  return isinstance(x, QuantizedWeight)


def load_run(directory: str) -> Run:
  """Reads a run directory written by `pipeline.export.write_model_dir`."""
  from cdquant_jax.pipeline import export  # pylint: disable=import-outside-toplevel
  model, params, tok = export.load_quantized_model(directory)
  path = os.path.join(directory, export.RUN_CONFIG_FILE)
  run_config = None
  if os.path.exists(path):
    with open(path) as f:
      run_config = json.load(f)
  return Run(directory=directory, model=model, params=params, tokenizer=tok,
             run_config=run_config)


def quantized_weights(run: Run) -> dict[str, QuantizedWeight]:
  from cdquant_jax.pipeline import export  # pylint: disable=import-outside-toplevel
  return export.quantized_weights(run.params)


def dense_tensors(run: Run) -> dict[str, np.ndarray]:
  """{dotted name: array in the model dtype} of every parameter that is not a quantized weight."""
  from cdquant_jax.pipeline import export  # pylint: disable=import-outside-toplevel
  return {name: np.asarray(leaf) for name, leaf in export.flatten(run.params).items()
          if not _is_qweight(leaf)}


def decode(name: str, qw: QuantizedWeight) -> LinearGrid:
  """The grid of a QuantizedWeight. Raises ExportError for what no grid export can hold:
  SpQR second-level statistics and outliers."""
  meta = qw.meta
  if "qq" in (meta.scale_format, meta.zero_format):
    raise ExportError(f"{name}: SpQR second-level statistics (quantized scales/zeros) have no "
                      "equivalent in the GPTQ, compressed-tensors or GGUF formats; keep the "
                      "run directory (cdquant_jax format)")
  if meta.nnz:
    raise ExportError(f"{name}: {meta.nnz} SpQR outliers (sparse fp16 corrections) have no "
                      "equivalent in the GPTQ, compressed-tensors or GGUF formats; keep the "
                      "run directory (cdquant_jax format)")
  storage = np.asarray(packing.unpack_codes(qw.codes, meta.bits))[:meta.d_in]  # [K, N]
  perm = np.arange(meta.d_in) if qw.perm is None else np.asarray(qw.perm)
  codes = np.empty((meta.d_out, meta.d_in), np.int32)
  codes[:, perm] = storage.T.astype(np.int32)
  group_index = np.empty(meta.d_in, np.int32)
  group_index[perm] = np.arange(meta.d_in) // meta.group_size
  stat = lambda which: np.asarray(qweight.first_level_stat(qw, which))[:meta.n_groups].T
  grid = LinearGrid(name=name, codes=codes, scale=np.ascontiguousarray(stat("scale")),
                    zero=np.ascontiguousarray(stat("zero")), group_index=group_index, meta=meta)
  want = np.asarray(qweight.dequantize(qw))
  if not np.array_equal(grid.dequantized().view(np.uint32), want.view(np.uint32)):
    raise AssertionError(f"{name}: decoded grid does not reproduce dequantize(qw)")
  return grid


def decode_all(run: Run) -> dict[str, LinearGrid]:
  return {name: decode(name, qw) for name, qw in sorted(quantized_weights(run).items())}


# ----------------------------------------------------------------------------------------------
# Checks shared by the formats (each returns None or the reason, for a refusal message).


def integer_zeros(g: LinearGrid) -> str | None:
  if not np.array_equal(g.zero, np.round(g.zero)):
    bad = np.argwhere(g.zero != np.round(g.zero))[0]
    return (f"non-integer zero points (SpQR-flavour grid; e.g. zero[{bad[0]}, {bad[1]}] = "
            f"{g.zero[tuple(bad)]!r})")
  return None


def fp16_exact(a: np.ndarray) -> bool:
  return np.array_equal(a.astype(np.float16).astype(np.float32).view(np.uint32),
                        a.astype(np.float32).view(np.uint32))


def fp16_scales(g: LinearGrid, options: ExportOptions) -> str | None:
  if options.round_scales or fp16_exact(g.scale):
    return None
  return ("float32 scales that float16 does not hold exactly (quantize with the grid's "
          "fp16_stats=true, or pass round_scales / --round-scales to round them)")


def refusal(name: str, fmt: str, reason: str, others: list[str]) -> ExportError:
  where = (f"export it as {' or '.join(others)}" if others else
           "no export format holds it; keep the run directory (cdquant_jax format)")
  return ExportError(f"{name}: {fmt} cannot hold {reason}; {where}")


# ----------------------------------------------------------------------------------------------
# HF config.json and tensor names (llama family).

_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu",
                   "relu": "relu"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _rope_parameters(rope: RopeConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_type": rope.kind, "rope_theta": rope.theta}
  if rope.kind == "linear":
    out["factor"] = rope.factor
  elif rope.kind == "llama3":
    out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor,
               high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """config.json for transformers; checked to parse back (strictly) to the same ModelConfig.

  Raises ExportError for a family or model type this writer does not cover.
  """
  if cfg.family != "llama" or cfg.model_type not in _ARCHITECTURES:
    raise ExportError(f"model_type {cfg.model_type!r}: export writes the llama family "
                      f"({', '.join(_ARCHITECTURES)}) only")
  gemma = cfg.model_type.startswith("gemma")
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.norm_eps,
      ("hidden_activation" if gemma else "hidden_act"): _HF_ACTIVATIONS[cfg.activation],
      "tie_word_embeddings": cfg.tie_word_embeddings, "layer_types": list(cfg.layer_types),
      "dtype": dtype,
  }
  if cfg.model_type != "qwen2":
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  if SLIDING in cfg.layer_types:
    hf["sliding_window"] = cfg.sliding_window
  if cfg.model_type == "qwen2":
    hf["use_sliding_window"] = SLIDING in cfg.layer_types
  if cfg.rope_local is not None:
    hf["rope_parameters"] = {FULL: _rope_parameters(cfg.rope),
                             SLIDING: _rope_parameters(cfg.rope_local)}
  elif cfg.rope is not None:
    hf["rope_parameters"] = _rope_parameters(cfg.rope)
  if cfg.model_type in ("gemma2", "gemma3_text"):
    hf.update(query_pre_attn_scalar=cfg.query_scale**-2,
              attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.final_softcap)
  if cfg.bos_token_id is not None:
    hf["bos_token_id"] = cfg.bos_token_id
  if cfg.eos_token_ids:
    hf["eos_token_id"] = (cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1
                          else list(cfg.eos_token_ids))
  try:
    back = hf_config_lib.config_from_hf(hf)
  except ValueError as e:
    raise ExportError(f"model_type {cfg.model_type!r}: cannot write its config.json ({e})") from e
  if back != cfg:
    diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name))
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(back, f.name)}
    raise ExportError(f"model_type {cfg.model_type!r}: config.json would not reproduce the "
                      f"model (field: (model, config.json) {diff})")
  return hf


def hf_name(dotted: str) -> str:
  """Our dotted parameter name -> the HF tensor name (llama family)."""
  return dotted if dotted.startswith("lm_head.") else f"model.{dotted}"


def hf_dense_state(run: Run, skip: set[str]) -> dict[str, np.ndarray]:
  """{HF name: array} of the unquantized parameters (names in `skip` left out), model dtype."""
  return {hf_name(name): np.ascontiguousarray(a) for name, a in dense_tensors(run).items()
          if name not in skip}


def write_state(path: str, state: dict[str, np.ndarray]) -> None:
  """Writes {HF name: array} as a safetensors file with transformers' {"format": "pt"}
  metadata, one tensor at a time (`io_utils.atomic_write_safetensors`: no bytes copy of the
  whole state, which `safetensors.numpy.save_file` makes)."""
  from cdquant_jax import io_utils  # pylint: disable=import-outside-toplevel
  specs = [(name, np.shape(a)) for name, a in state.items()]
  io_utils.atomic_write_safetensors(path, specs, (np.asarray(a) for a in state.values()),
                                    metadata={"format": "pt"})


def write_hf_side_files(run: Run, output: str, config: dict[str, Any]) -> None:
  """config.json, and tokenizer.json when the run has a tokenizer."""
  from cdquant_jax import io_utils  # pylint: disable=import-outside-toplevel
  io_utils.atomic_write_json(os.path.join(output, "config.json"), config)
  if run.tokenizer is not None and hasattr(run.tokenizer, "to_str"):
    io_utils.atomic_write_text(os.path.join(output, "tokenizer.json"), run.tokenizer.to_str())


def knob(run: Run, name: str, default: Any) -> Any:
  """A solver knob of the run config (quant.knobs.<name>), else `default`."""
  value = ((run.run_config or {}).get("quant") or {}).get("knobs", {}).get(name)
  return default if value is None else value


def true_sequential(run: Run) -> bool:
  return bool(((run.run_config or {}).get("quant") or {}).get("true_sequential", True))
