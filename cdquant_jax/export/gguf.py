"""GGUF (llama.cpp), written with the `gguf` package.

A linear maps exactly onto a GGUF block type when its groups are 32 consecutive input columns
(no act-order permutation) and its scales are float16 (d) — each block is one group:
  grid                               type   block (32 weights)          dequantized
  4-bit symmetric (zero 8)           Q4_0   f16 d, 16 B nibbles         d · (q − 8)
  4-bit asymmetric                   Q4_1   f16 d, f16 m, 16 B nibbles  d · q + m,  m = −d · zero
  5-bit symmetric (zero 16)          Q5_0   f16 d, u32 high bits, 16 B  d · (q − 16)
  5-bit asymmetric                   Q5_1   f16 d, f16 m, u32, 16 B     d · q + m
  8-bit symmetric (zero 128)         Q8_0   f16 d, 32 int8              d · (q − 128)
The symmetric types reproduce s · (q − z) bit for bit; Q4_1/Q5_1 round m = −s·z to float16
(so any zero, integer or SpQR-flavour fractional, fits within that rounding). Nibble order: byte
j of a block holds q[j] (low) and q[j + 16] (high); Q5 high bits: bit j of the u32 is q[j] >> 4.

Every other tensor is F32 (norms, and tensors float16 does not hold) or F16. Metadata (sizes,
heads, rope, norm epsilon, token ids, byte-level BPE tokenizer) comes from the run's model. For
the `llama` architecture the rows of attn_q / attn_k are permuted as llama.cpp's converter does
(whole rows move, so blocks stay intact). Other grids are refused with the formats that hold
them, or written as dequantized F32 tensors with `gguf_dense_fallback` (listed in the metadata
key cdquant.dense_fallback).
"""

from __future__ import annotations

import json
import os

import numpy as np

from cdquant_jax import io_utils
from cdquant_jax.export import common
from cdquant_jax.export.common import ExportOptions, LinearGrid, Run
from cdquant_jax.models.config import SLIDING

NAME = "gguf"
BLOCK = 32
FILE = "model.gguf"
# (bits, sym) -> GGML type name
TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1",
         (8, True): "Q8_0"}
NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp token types
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_TYPES_TEXT = ", ".join(f"{b}-bit {'sym' if s else 'asym'} {t}" for (b, s), t in TYPES.items())
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}


def block_type(g: LinearGrid) -> str | None:
  return TYPES.get((g.bits, bool(g.meta.sym)))


def why_not(g: LinearGrid, options: ExportOptions) -> str | None:
  """None when a GGUF block type holds the grid (exactly, or within f16 rounding of m)."""
  if block_type(g) is None:
    return (f"{g.bits}-bit {'symmetric' if g.meta.sym else 'asymmetric'} codes (exact GGUF "
            f"blocks: {_TYPES_TEXT})")
  if g.per_channel or g.meta.group_size != BLOCK:
    groups = "a per-channel grid" if g.per_channel else f"groups of {g.meta.group_size} columns"
    return f"{groups} (GGUF blocks are groups of 32 columns)"
  if not g.contiguous_groups:
    return "act-order groups that are not 32 consecutive columns"
  return common.fp16_scales(g, options)


def _nibbles(q: np.ndarray) -> np.ndarray:
  """[..., 32] low 4 bits -> [..., 16] bytes: q[j] | q[j + 16] << 4."""
  low = (q & 0xF).astype(np.uint8)
  return low[..., :16] | (low[..., 16:] << np.uint8(4))


def _f16_bytes(a: np.ndarray) -> np.ndarray:
  """[...] -> [..., 2] little-endian float16 bytes."""
  return a.astype("<f2")[..., None].view(np.uint8)


def encode(g: LinearGrid) -> tuple[str, np.ndarray]:
  """(type name, uint8 [N, K/32 · block bytes]) of one linear (see the module docstring)."""
  kind = block_type(g)
  n, k = g.codes.shape
  q = g.codes.reshape(n, k // BLOCK, BLOCK).astype(np.int64)  # [N, blocks, 32]
  d = _f16_bytes(g.scale)  # [N, blocks, 2]
  parts = [d]
  if kind in ("Q4_1", "Q5_1"):
    parts.append(_f16_bytes(-(g.scale.astype(np.float16).astype(np.float32) * g.zero)))
  if kind in ("Q5_0", "Q5_1"):
    high = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
    parts.append(high.sum(axis=-1, dtype=np.uint32).astype("<u4")[..., None].view(np.uint8))
  if kind == "Q8_0":
    parts.append((q - 128).astype(np.int8).view(np.uint8))
  else:
    parts.append(_nibbles(q))
  return kind, np.concatenate(parts, axis=-1).reshape(n, -1)


def gguf_name(dotted: str) -> str:
  """Our dotted parameter name -> llama.cpp's ("layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
  parts = dotted.split(".")
  if parts[0] == "layers":
    return f"blk.{parts[1]}.{_LAYER_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
  return f"{_GLOBAL_NAMES[parts[0]]}.{parts[-1]}"


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's `permute` of attn_q / attn_k rows (HF rotate-half -> interleaved pairs)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rows_permuted(run: Run, dotted: str, w: np.ndarray) -> np.ndarray:
  if ARCHITECTURES[run.config.model_type] != "llama":
    return w
  if ".q_proj." in dotted:
    return permute_rope_rows(w, run.config.num_heads)
  if ".k_proj." in dotted:
    return permute_rope_rows(w, run.config.num_kv_heads)
  return w


def _check_model(run: Run) -> None:
  c = run.config
  if c.family != "llama" or c.model_type not in ARCHITECTURES:
    raise common.ExportError(f"model_type {c.model_type!r}: gguf export writes "
                             f"{', '.join(ARCHITECTURES)} only")
  if c.rope is None or c.rope.kind not in ("default", "linear"):
    raise common.ExportError(f"rope {c.rope}: gguf export writes default and linear rope only")
  if SLIDING in c.layer_types:
    raise common.ExportError("sliding-window layers: the llama/qwen2 GGUF architectures have "
                             "no sliding window")


def _metadata(writer, run: Run) -> None:
  import gguf  # pylint: disable=import-outside-toplevel
  c = run.config
  writer.add_name(os.path.basename(os.path.normpath(run.directory)))
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_block_count(c.num_layers)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_layer_norm_rms_eps(c.norm_eps)
  writer.add_rope_freq_base(c.rope.theta)
  writer.add_rope_dimension_count(c.head_dim)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_vocab_size(c.vocab_size)
  if c.rope.kind == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(c.rope.factor)
  if c.bos_token_id is not None:
    writer.add_bos_token_id(c.bos_token_id)
  if c.eos_token_ids:
    writer.add_eos_token_id(c.eos_token_ids[0])


def _pre_name(pre: dict | None) -> str:
  """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer ("default" if unknown)."""
  kinds = [p.get("type") for p in (pre or {}).get("pretokenizers", [pre or {}])]
  if kinds == ["Digits", "ByteLevel"]:
    return "smollm"
  return "default"


def _tokenizer(writer, run: Run) -> str | None:
  """Writes byte-level BPE vocabulary metadata; returns why it did not (or None)."""
  if run.tokenizer is None:
    return "the run has no tokenizer"
  doc = json.loads(run.tokenizer.to_str())
  model = doc.get("model", {})
  if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(doc.get("pre_tokenizer")):
    return f"tokenizer model {model.get('type')!r} is not byte-level BPE"
  vocab = dict(model["vocab"])
  special = set()
  for added in doc.get("added_tokens", []):
    vocab[added["content"]] = added["id"]
    if added.get("special"):
      special.add(added["id"])
  size = max(max(vocab.values()) + 1, run.config.vocab_size)
  tokens = [f"[PAD{i}]" for i in range(size)]  # ids the tokenizer never produces: UNUSED
  types = [UNUSED] * size
  for token, i in vocab.items():
    tokens[i] = token
    types[i] = CONTROL if i in special else NORMAL
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_pre_name(doc.get("pre_tokenizer")))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  return None


def write(run: Run, grids: dict[str, LinearGrid], output: str, options: ExportOptions) -> dict:
  """Writes OUTPUT/model.gguf; returns {tensor types, dense fallbacks, tokenizer note}."""
  import gguf  # pylint: disable=import-outside-toplevel
  _check_model(run)
  arch = ARCHITECTURES[run.config.model_type]
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, FILE)
  types: dict[str, str] = {}
  fallback = []
  with io_utils.atomic_path(path) as tmp:
    writer = gguf.GGUFWriter(tmp, arch)
    _metadata(writer, run)
    note = _tokenizer(writer, run)
    for name, a in common.dense_tensors(run).items():
      module = name.rsplit(".", 1)[0]
      if module in grids:
        continue
      a = a.astype(np.float32)
      if a.ndim == 2 and common.fp16_exact(a):
        a = a.astype(np.float16)
      types[gguf_name(name)] = "F16" if a.dtype == np.float16 else "F32"
      writer.add_tensor(gguf_name(name), np.ascontiguousarray(_rows_permuted(run, name, a)))
    for module, g in grids.items():
      name = f"{module}.weight"
      if why_not(g, options) is None:
        kind, blocks = encode(g)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(_rows_permuted(run, name, blocks)),
                          raw_dtype=gguf.GGMLQuantizationType[kind])
      else:  # only reached with gguf_dense_fallback (export.export_model checks first)
        kind = "F32"
        fallback.append(module)
        writer.add_tensor(gguf_name(name),
                          np.ascontiguousarray(_rows_permuted(run, name, g.dequantized())))
      types[gguf_name(name)] = kind
    if fallback:
      writer.add_array("cdquant.dense_fallback", fallback)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
  return {"file": path, "tensor_types": types, "dense_fallback": fallback,
          "tokenizer": note or "byte-level BPE written"}
