"""GGUF files (llama.cpp): metadata -> HF config dict, tensors dequantized -> HF-named arrays.

Supported architectures: `llama` (Llama, Mistral, SmolLM exports), `qwen2`, `gemma`, `gemma2`.
Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with the `gguf`
package.

What llama.cpp's converter changes, undone here: it permutes the rows of attn_q / attn_k (weight
and bias) of `llama` models so that rope acts on interleaved pairs (`unpermute_rope_rows`
restores HF's rotate-half order); it stores Gemma's norm weights as 1 + w (llama.cpp multiplies
by the weight; `ModelConfig.norm_offset` adds the 1 back). Gemma 2 metadata has no
query_pre_attn_scalar: like llama.cpp, the query scale is 1/sqrt(head_dim), except for the 27B
(46 blocks), 1/sqrt(hidden / heads); missing soft-caps take llama.cpp's defaults (50, 30).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np

from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.hf_loader import LazyTensors

ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2"}
GEMMA_ARCHS = ("gemma", "gemma2")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2 has four norms a block: ffn_norm is the pre-feedforward one there.
_GEMMA2_LAYER_NAMES = {
    **_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {"gemma2": _GEMMA2_LAYER_NAMES}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# llama.cpp's defaults for Gemma 2 keys a file may leave out.
_GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


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
  """A HF config.json-style dict for the model a GGUF file describes."""
  arch = meta.get("general.architecture")
  if arch not in ARCH_TO_MODEL_TYPE:
    raise ModelLoadError(f"{path}: general.architecture={arch!r} is not supported "
                         f"(supported: {sorted(ARCH_TO_MODEL_TYPE)})")
  if "rope_freqs.weight" in tensor_shapes:
    raise ModelLoadError(f"{path}: tensor rope_freqs.weight (llama3 rope scaling in GGUF) is "
                         "not supported")

  def get(key, default=None):
    return meta.get(f"{arch}.{key}", default)

  heads = get("attention.head_count")
  hf = {
      "model_type": ARCH_TO_MODEL_TYPE[arch],
      "hidden_size": get("embedding_length"),
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": get("attention.head_count_kv", heads),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
      "max_position_embeddings": get("context_length", 2048),
      "rope_theta": get("rope.freq_base", 10000.0),
      "vocab_size": get("vocab_size", tensor_shapes.get("token_embd.weight", (None,))[0]),
      "tie_word_embeddings": "output.weight" not in tensor_shapes,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
  }
  if get("attention.key_length") is not None:
    hf["head_dim"] = get("attention.key_length")
  if arch == "gemma2":
    head_dim = hf.get("head_dim", hf["hidden_size"] // heads)
    hf["query_pre_attn_scalar"] = (hf["hidden_size"] // heads if hf["num_hidden_layers"] == 46
                                   else head_dim)
    hf.update({k: get(k, default) for k, default in _GEMMA2_SOFTCAPS.items()})
    hf["sliding_window"] = get("attention.sliding_window", 4096)
  if get("rope.scaling.type") not in (None, "none"):
    hf["rope_scaling"] = {"rope_type": get("rope.scaling.type"),
                          "factor": get("rope.scaling.factor")}
  return {k: v for k, v in hf.items() if v is not None}


def hf_tensor_name(gguf_name: str, path: str, arch: str = "llama") -> str:
  """llama.cpp tensor name -> HF name (e.g. blk.3.attn_q.weight -> model.layers.3.self_attn...)."""
  layer_names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(2) in layer_names:
    return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
  m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
  raise ModelLoadError(f"{path}: unsupported GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, rows (pairs, 2) -> (2, pairs).

  llama.cpp: w.reshape(n_head, 2, half, d_in).swapaxes(1, 2); this undoes it.
  """
  d_out = w.shape[0]
  half = d_out // n_heads // 2
  # [d_out, ...] -> [n_heads, half, 2, ...] -> [n_heads, 2, half, ...] -> [d_out, ...]
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
  arch = architecture(reader)
  return {hf_tensor_name(t.name, path, arch): _FLOAT_TYPES.get(t.tensor_type.name,
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
  loaders = {hf_tensor_name(t.name, path, arch): functools.partial(_load_tensor, t, path, arch,
                                                                   config)
             for t in reader.tensors}
  return config, LazyTensors(loaders)


def _load_tensor(tensor, path: str, arch: str, config: dict[str, Any]) -> np.ndarray:
  """One GGUF tensor dequantized to float32 in HF layout (rope rows and Gemma norms undone)."""
  name = hf_tensor_name(tensor.name, path, arch)
  try:
    w = dequantized(tensor)
  except NotImplementedError as e:  # gguf has no numpy dequantizer for this type
    raise ModelLoadError(f"{path}: tensor {tensor.name} of type {tensor.tensor_type.name} "
                         f"cannot be dequantized ({e})") from e
  if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
    w = unpermute_rope_rows(w, config["num_attention_heads"])
  elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
    w = unpermute_rope_rows(w, config["num_key_value_heads"])
  elif arch in GEMMA_ARCHS and name.endswith("norm.weight"):
    w = w - np.float32(1.0)  # llama.cpp stores Gemma's 1 + w
  return w
