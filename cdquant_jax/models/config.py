"""Frozen model configs: one `ModelConfig` describes every supported decoder.

The implementation is picked by `family`:
  llama   Llama 1/2/3, Mistral, Qwen2, SmolLM, Gemma 1/2/3 (differences are config fields)
  opt     OPT (learned positions with offset 2, LayerNorm, biases)
  falcon  Falcon (fused query_key_value, parallel attention)

HF `config.json` dicts are converted, strictly, by `hf_config.config_from_hf` (which imports
this module; this module imports no loader).
"""

from __future__ import annotations

import dataclasses
import math
import numpy as np

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
  """Rotary embedding frequencies. kind: "default", "linear" (positions / factor) or "llama3"."""

  theta: float = 10000.0
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies (radians per position), as transformers."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(self.theta) ** exponent)).astype(np.float32)
    if self.kind == "default":
      return inv
    if self.kind == "linear":
      return (inv / np.float32(self.factor)).astype(np.float32)
    if self.kind == "llama3":
      return _llama3_inv_freq(inv, self)
    raise ValueError(f"unsupported rope kind {self.kind!r}")


def _llama3_inv_freq(inv: np.ndarray, r: RopeConfig) -> np.ndarray:
  """Llama-3.1 frequency-dependent rope scaling (transformers `_compute_llama3_parameters`)."""
  old_len = r.original_max_position_embeddings
  low_wavelen = old_len / r.low_freq_factor
  high_wavelen = old_len / r.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
  smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
  smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture of a decoder-only LM. Frozen and hashable (usable as a static jit argument)."""

  family: str  # "llama" | "opt" | "falcon"
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  # Normalisation: "rms" or "layer"; Gemma's RMSNorm scales by (norm_offset + weight), offset 1.
  norm_kind: str = "rms"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0
  # MLP: activation in {"silu", "gelu_tanh", "gelu", "relu"}; gated = act(gate) * up.
  activation: str = "silu"
  gated_mlp: bool = True
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  # Positions: rope for full-attention layers, rope_local for sliding layers (Gemma 3), or learned.
  rope: RopeConfig | None = None
  rope_local: RopeConfig | None = None
  learned_positions: bool = False
  position_offset: int = 0
  # Attention pattern, one entry per layer (FULL or SLIDING); window in tokens.
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  # Scores are (q . k) * query_scale, then soft-capped (Gemma 2) when attn_softcap is set.
  query_scale: float = 1.0
  attn_softcap: float | None = None
  final_softcap: float | None = None
  embed_scale: float | None = None
  post_norms: bool = False  # Gemma 2/3: norms after attention and MLP too (4 per block)
  qk_norm: bool = False  # Gemma 3: RMSNorm of q and k per head
  # OPT
  pre_norm: bool = True
  final_norm: bool = True
  word_embed_proj_dim: int | None = None
  # Falcon: "separate" (q/k/v), "falcon_new" ([kv, g+2, hd]), "falcon_mq" ([h+2, hd]), "falcon_mha"
  qkv_layout: str = "separate"
  parallel_attn: bool = False
  num_parallel_norms: int = 1
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{self.model_type}: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"{self.model_type}: {len(self.layer_types)} layer_types for "
                       f"{self.num_layers} layers")
    bad = set(self.layer_types) - {FULL, SLIDING}
    if bad:
      raise ValueError(f"{self.model_type}: unsupported layer_types {sorted(bad)}")
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError(f"{self.model_type}: sliding layers need sliding_window, "
                       f"got {self.sliding_window}")

  def rope_for_layer(self, layer_index: int) -> RopeConfig | None:
    """The rope of a layer: rope_local on sliding layers when set (Gemma 3), else rope."""
    if self.layer_types[layer_index] == SLIDING and self.rope_local is not None:
      return self.rope_local
    return self.rope

  def window_for_layer(self, layer_index: int) -> int | None:
    return self.sliding_window if self.layer_types[layer_index] == SLIDING else None
