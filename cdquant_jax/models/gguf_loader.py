"""GGUF files (llama.cpp): metadata -> HF config dict, tensors dequantized -> HF-named arrays.

Supported architectures: `llama` (Llama, Mistral, SmolLM exports), `qwen2`, `gemma`, `gemma2`,
`gemma3` (the text model, HF `gemma3_text`), `falcon` (7B-style multi-query, 40B/180B-style
new decoder architecture, 11B-style one norm with grouped kv heads). Quantized tensors (Q4_0,
Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with the `gguf` package.

What llama.cpp's converter changes, undone here: it permutes the rows of attn_q / attn_k (weight
and bias) of `llama` models so that rope acts on interleaved pairs (`unpermute_rope_rows`
restores HF's rotate-half order); it stores Gemma's norm weights (q/k norms of Gemma 3 too) as
1 + w (llama.cpp multiplies by the weight; `ModelConfig.norm_offset` adds the 1 back); it
reorders Falcon's fused query_key_value rows from HF's kv groups [K, G + 2, Dh] (G queries, one
k, one v per group) to [H queries | K keys | K values] (the "jploski" layout;
`falcon_qkv_rows_to_hf` restores HF's). Gemma 2 / 3 metadata has no query_pre_attn_scalar: like
llama.cpp, the query scale is 1/sqrt(head_dim), except for the 27B models (Gemma 2: 46 blocks,
Gemma 3: 62 blocks), 1/sqrt(hidden / heads). Gemma 2's missing soft-caps take llama.cpp's
defaults (50, 30); Gemma 3's local rope base (10000) is fixed in llama.cpp, not in the file, and so
is its sliding-window pattern (5 local layers, then 1 global) unless the file states one. Falcon's layout comes from the tensors:
attn_norm_2 (two norms a block, attn_norm_2 before attention, attn_norm before the MLP) means
the new decoder architecture, one kv head the 7B multi-query one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable

import numpy as np

from cdquant_jax.models.config import FULL, SLIDING
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.hf_loader import LazyTensors

ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
                      "gemma3": "gemma3_text", "falcon": "falcon"}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2 / 3 have four norms a block: ffn_norm is the pre-feedforward one there.
_GEMMA2_LAYER_NAMES = {
    **_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA3_LAYER_NAMES = {**_GEMMA2_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                       "attn_k_norm": "self_attn.k_norm"}
_ARCH_LAYER_NAMES = {"gemma2": _GEMMA2_LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_FALCON_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense", "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
# Falcon with two norms a block (new decoder architecture): attn_norm_2 feeds the attention,
# attn_norm the MLP (llama.cpp's falcon graph; gguf's name map: ln_attn -> attn_norm_2).
_FALCON_TWO_NORM_NAMES = {**_FALCON_LAYER_NAMES, "attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"}
_FALCON_GLOBAL_NAMES = {"token_embd": "transformer.word_embeddings",
                        "output_norm": "transformer.ln_f", "output": "lm_head"}
# llama.cpp's defaults for Gemma 2 keys a file may leave out.
_GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# Fixed in llama.cpp's Gemma 3 (not in the file): every 6th layer global, local rope base.
_GEMMA3_SLIDING_PATTERN, _GEMMA3_LOCAL_ROPE_THETA = 6, 10000.0
# Block counts of the 27B models, whose query scale is 1/sqrt(hidden / heads) in llama.cpp.
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}
FALCON_QKV_LAYOUT = "jploski"


@dataclasses.dataclass(frozen=True)
class NameScheme:
  """How one file's llama.cpp tensor names map to HF names.

  layer_prefix: HF prefix of block i's tensors, followed by "{i}." ("model.layers.").
  layer_names: llama.cpp leaf name in a block ("attn_q") -> HF module path ("self_attn.q_proj").
  global_names: llama.cpp name outside the blocks ("token_embd") -> HF module path.
  """
  layer_prefix: str
  layer_names: dict[str, str]
  global_names: dict[str, str]


def name_scheme(arch: str, gguf_names) -> NameScheme:
  """The `NameScheme` of a file of architecture `arch` holding tensors `gguf_names`."""
  if arch == "falcon":
    two_norms = any(name.endswith(".attn_norm_2.weight") for name in gguf_names)
    return NameScheme("transformer.h.", _FALCON_TWO_NORM_NAMES if two_norms
                      else _FALCON_LAYER_NAMES, _FALCON_GLOBAL_NAMES)
  return NameScheme("model.layers.", _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES), _GLOBAL_NAMES)


def open_reader(path: str):
  import gguf  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/struct errors on corrupt files
    raise ModelLoadError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader, skip_arrays: bool = True) -> dict[str, Any]:
  """{key: value} of the GGUF metadata; long arrays (vocab, merges) skipped unless asked."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    if skip_arrays and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                               "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
      continue
    out[key] = field.contents()
  return out


def hf_config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                            path: str) -> dict[str, Any]:
  """A HF config.json-style dict for the model a GGUF file describes.

  tensor_shapes: {GGUF tensor name: numpy-order shape}; some of the config comes from which
  tensors the file has (tied output, Falcon's norms and biases).
  """
  arch = meta.get("general.architecture")
  if arch not in ARCH_TO_MODEL_TYPE:
    raise ModelLoadError(f"{path}: general.architecture={arch!r} is not supported "
                         f"(supported: {sorted(ARCH_TO_MODEL_TYPE)})")
  if "rope_freqs.weight" in tensor_shapes:
    raise ModelLoadError(f"{path}: tensor rope_freqs.weight (llama3 rope scaling in GGUF) is "
                         "not supported")

  def get(key, default=None):
    return meta.get(f"{arch}.{key}", default)

  family = _falcon_config(get, tensor_shapes, path) if arch == "falcon" else \
      _llama_like_config(get, arch)
  hf = {
      "model_type": ARCH_TO_MODEL_TYPE[arch],
      "hidden_size": get("embedding_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": get("attention.head_count"),
      "max_position_embeddings": get("context_length", 2048),
      "rope_theta": get("rope.freq_base", 10000.0),
      "vocab_size": get("vocab_size", tensor_shapes.get("token_embd.weight", (None,))[0]),
      "tie_word_embeddings": "output.weight" not in tensor_shapes,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      **family,
  }
  if get("rope.scaling.type") not in (None, "none"):
    hf["rope_scaling"] = {"rope_type": get("rope.scaling.type"),
                          "factor": get("rope.scaling.factor")}
  return {k: v for k, v in hf.items() if v is not None}


def _llama_like_config(get: Callable[..., Any], arch: str) -> dict[str, Any]:
  """The Llama-family fields (llama, qwen2, gemma 1/2/3) of the HF config dict."""
  heads = get("attention.head_count")
  hf = {
      "intermediate_size": get("feed_forward_length"),
      "num_key_value_heads": get("attention.head_count_kv", heads),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
      "head_dim": get("attention.key_length"),
  }
  if arch in _GEMMA_27B_BLOCKS:
    hidden = get("embedding_length")
    head_dim = hf["head_dim"] or hidden // heads
    is_27b = get("block_count") == _GEMMA_27B_BLOCKS[arch]
    hf["query_pre_attn_scalar"] = hidden // heads if is_27b else head_dim
    hf["sliding_window"] = get("attention.sliding_window", 4096)
  if arch == "gemma2":
    hf.update({k: get(k, default) for k, default in _GEMMA2_SOFTCAPS.items()})
  if arch == "gemma3":
    hf.update(_gemma3_layer_pattern(get("attention.sliding_window_pattern")),
              rope_local_base_freq=_GEMMA3_LOCAL_ROPE_THETA)
  return hf


def _gemma3_layer_pattern(pattern: int | list[bool] | None) -> dict[str, Any]:
  """Gemma 3's sliding / full layers: llama.cpp's fixed pattern (every 6th layer full) unless
  the file states one, as a period (int) or one is-sliding flag per layer."""
  if isinstance(pattern, list):
    return {"layer_types": [SLIDING if sliding else FULL for sliding in pattern]}
  return {"sliding_window_pattern": _GEMMA3_SLIDING_PATTERN if pattern is None else pattern}


def _falcon_config(get: Callable[..., Any], tensor_shapes: dict[str, tuple[int, ...]],
                   path: str) -> dict[str, Any]:
  """The Falcon fields of the HF config dict; the qkv / norm layout comes from the tensors."""
  layout = get("tensor_data_layout", FALCON_QKV_LAYOUT)
  if layout != FALCON_QKV_LAYOUT:
    raise ModelLoadError(f"{path}: falcon.tensor_data_layout={layout!r} is not supported "
                         f"(supported: {FALCON_QKV_LAYOUT!r})")
  heads = get("attention.head_count")
  kv_heads = get("attention.head_count_kv", heads)  # llama.cpp's default when absent
  two_norms = any(name.endswith(".attn_norm_2.weight") for name in tensor_shapes)
  if two_norms or 1 < kv_heads < heads:  # Falcon 40B / 180B (two norms), Falcon 11B (one)
    layout_fields = {"new_decoder_architecture": True,
                     "num_ln_in_parallel_attn": 2 if two_norms else 1}
  else:  # Falcon 7B (one kv head) or multi-head attention
    layout_fields = {"new_decoder_architecture": False, "multi_query": kv_heads == 1}
  return {
      "ffn_hidden_size": get("feed_forward_length"),
      "num_kv_heads": kv_heads,
      "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5),
      "parallel_attn": True,  # llama.cpp's falcon graph is parallel attention + MLP only
      "alibi": False,
      "bias": "blk.0.attn_qkv.bias" in tensor_shapes,
      **layout_fields,
  }


def hf_tensor_name(gguf_name: str, path: str, scheme: NameScheme) -> str:
  """llama.cpp tensor name -> HF name (e.g. blk.3.attn_q.weight -> model.layers.3.self_attn...)."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(2) in scheme.layer_names:
    return f"{scheme.layer_prefix}{m.group(1)}.{scheme.layer_names[m.group(2)]}.{m.group(3)}"
  m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(1) in scheme.global_names:
    return f"{scheme.global_names[m.group(1)]}.{m.group(2)}"
  raise ModelLoadError(f"{path}: unsupported GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, rows (pairs, 2) -> (2, pairs).

  llama.cpp: w.reshape(n_head, 2, half, d_in).swapaxes(1, 2); this undoes it.
  """
  d_out = w.shape[0]
  half = d_out // n_heads // 2
  # [d_out, ...] -> [n_heads, half, 2, ...] -> [n_heads, 2, half, ...] -> [d_out, ...]
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def falcon_qkv_rows_to_hf(w: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Falcon qkv transform: rows [H queries | K keys | K values] -> HF's
  kv groups [K, G + 2] (G = H / K queries, then the group's key, then its value).

  w: the fused weight [(H + 2K) * Dh, d_in] or bias [(H + 2K) * Dh]; returns the same shape.
  """
  rest = w.shape[1:]
  head_dim = w.shape[0] // (n_heads + 2 * n_kv_heads)
  group = n_heads // n_kv_heads
  # [(H + 2K) * Dh, ...] -> [H + 2K, Dh, ...]
  rows = w.reshape(n_heads + 2 * n_kv_heads, head_dim, *rest)
  # [H, Dh, ...] -> [K, G, Dh, ...]; keys and values [K, Dh, ...] -> [K, 1, Dh, ...]
  queries = rows[:n_heads].reshape(n_kv_heads, group, head_dim, *rest)
  keys = rows[n_heads:n_heads + n_kv_heads, None]
  values = rows[n_heads + n_kv_heads:, None]
  # [K, G + 2, Dh, ...] -> [(H + 2K) * Dh, ...]
  return np.concatenate([queries, keys, values], axis=1).reshape(w.shape)


def dequantized(tensor) -> np.ndarray:
  """A GGUF tensor as a float32 array in [d_out, d_in] (numpy) order."""
  import gguf  # pylint: disable=import-outside-toplevel
  data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  return np.asarray(data, dtype=np.float32).reshape(shape)


# GGUF float tensor types -> numpy dtype names; every other type is block-quantized.
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def source_dtypes(reader, path: str) -> dict[str, str]:
  """{HF tensor name: its type in the file}: "float32" / "float16" / "bfloat16" for float
  tensors, the GGML type name (e.g. "Q8_0") for block-quantized ones. Metadata only."""
  scheme = name_scheme(architecture(reader), [t.name for t in reader.tensors])
  return {hf_tensor_name(t.name, path, scheme): _FLOAT_TYPES.get(t.tensor_type.name,
                                                                 t.tensor_type.name)
          for t in reader.tensors}


def architecture(reader) -> str | None:
  field = reader.fields.get("general.architecture")
  return None if field is None else field.contents()


def load_gguf(path: str, reader=None) -> tuple[dict[str, Any], LazyTensors]:
  """(HF config dict, {HF tensor name: float32 array}) of a GGUF file.

  The tensors come as a `LazyTensors` mapping: each one is dequantized when it is read, so a
  loader that converts and drops them one at a time never holds more than one dequantized
  float32 tensor besides its own copy (the file itself is memory-mapped by `gguf`).
  `reader`: an already open `gguf.GGUFReader` of path (opening one parses the whole metadata,
  several seconds for a 49k-token vocabulary).
  """
  reader = reader or open_reader(path)
  meta = read_metadata(reader)
  # numpy-order shapes ([d_out, d_in]); GGUF lists dimensions innermost first.
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
  config = hf_config_from_metadata(meta, shapes, path)
  arch = meta["general.architecture"]
  scheme = name_scheme(arch, shapes)
  loaders = {hf_tensor_name(t.name, path, scheme): functools.partial(
      _load_tensor, t, path, arch, hf_tensor_name(t.name, path, scheme), config)
             for t in reader.tensors}
  return config, LazyTensors(loaders)


def _load_tensor(tensor, path: str, arch: str, name: str, config: dict[str, Any]) -> np.ndarray:
  """One GGUF tensor dequantized to float32 in HF layout (rope rows, Falcon's qkv rows and
  Gemma norms undone); `name` is its HF name."""
  try:
    w = dequantized(tensor)
  except NotImplementedError as e:  # gguf has no numpy dequantizer for this type
    raise ModelLoadError(f"{path}: tensor {tensor.name} of type {tensor.tensor_type.name} "
                         f"cannot be dequantized ({e})") from e
  if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
    w = unpermute_rope_rows(w, config["num_attention_heads"])
  elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
    w = unpermute_rope_rows(w, config["num_key_value_heads"])
  elif arch == "falcon" and name.endswith(("query_key_value.weight", "query_key_value.bias")):
    w = _falcon_qkv(w, tensor.name, path, config)
  elif arch in GEMMA_ARCHS and name.endswith("norm.weight"):
    w = w - np.float32(1.0)  # llama.cpp stores Gemma's 1 + w
  return w


def _falcon_qkv(w: np.ndarray, gguf_name: str, path: str, config: dict[str, Any]) -> np.ndarray:
  """A Falcon attn_qkv tensor in HF's row order, after checking its row count."""
  heads, kv_heads = config["num_attention_heads"], config["num_kv_heads"]
  head_dim = config["hidden_size"] // heads
  if w.shape[0] != (heads + 2 * kv_heads) * head_dim:
    raise ModelLoadError(f"{path}: tensor {gguf_name} has {w.shape[0]} rows, expected "
                         f"(heads {heads} + 2 * kv heads {kv_heads}) * head_dim {head_dim}")
  return falcon_qkv_rows_to_hf(w, heads, kv_heads)
