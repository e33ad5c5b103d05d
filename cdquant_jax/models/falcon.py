"""Falcon (NNX modules): fused query_key_value, rope, parallel attention + MLP, LayerNorm, GELU.

The fused linear is applied as one linear (so it is quantized as one matrix); its OUTPUT is
split into q, k, v according to `config.qkv_layout`:
  falcon_new  (new_decoder_architecture) [K, G + 2, Dh]: G query heads, then k, then v per group
  falcon_mq   (multi_query)              [H + 2, Dh]: H query heads, one k head, one v head
  falcon_mha                             [H, 3, Dh]: (q, k, v) per head

Params = the `FalconModel` module tree (HF names without "transformer.", "h" renamed "layers"):
  word_embeddings.weight [V, D]; ln_f; lm_head (absent when tied)
  layers[i]: ln_attn + ln_mlp (2 norms) or input_layernorm (+ post_attention_layernorm when not
             parallel), self_attention.{query_key_value, dense}, mlp.{dense_h_to_4h, dense_4h_to_h}
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from cdquant_jax.models import layers
from cdquant_jax.models.base import CausalLM
from cdquant_jax.models.config import ModelConfig
from cdquant_jax.models.modules import DecoderModule, Embedding, Linear, ModuleList, Norm

ATTN = "self_attention"


class FalconAttention(nnx.Module):
  """The fused query_key_value linear, split into q, k, v; rope; attention; dense."""

  def __init__(self, config: ModelConfig, layer_index: int, *, options, dtype, rngs):
    c = config
    d, bias = c.hidden_size, c.qkv_bias
    qkv_out = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    linear = functools.partial(Linear, bias=bias, options=options, dtype=dtype, rngs=rngs)
    self.query_key_value = linear(d, qkv_out, path=(ATTN, "query_key_value"))
    self.dense = linear(d, d, path=(ATTN, "dense"))
    self.config, self.layer_index = c, layer_index

  def split_qkv(self, fused: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fused [B, T, qkv_out] -> q [B, T, H, Dh], k, v [B, T, K, Dh]."""
    c = self.config
    b, t, _ = fused.shape
    h, dh = c.num_heads, c.head_dim
    if c.qkv_layout == "falcon_new":
      g = h // c.num_kv_heads
      # [B, T, K * (G + 2) * Dh] -> [B, T, K, G + 2, Dh]
      x = fused.reshape(b, t, c.num_kv_heads, g + 2, dh)
      # query head index = kv * G + g, as HF flattens [K, G] (and as `layers.attention` groups).
      return x[:, :, :, :g].reshape(b, t, h, dh), x[:, :, :, g], x[:, :, :, g + 1]
    if c.qkv_layout == "falcon_mq":
      # [B, T, (H + 2) * Dh] -> [B, T, H + 2, Dh]
      x = fused.reshape(b, t, h + 2, dh)
      return x[:, :, :h], x[:, :, h:h + 1], x[:, :, h + 1:]
    # [B, T, H * 3 * Dh] -> [B, T, H, 3, Dh]
    x = fused.reshape(b, t, h, 3, dh)
    return x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None,
               recorder: layers.LinearRecorder | None) -> tuple[jax.Array, dict | None]:
    """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache or None)."""
    c = self.config
    b, t, _ = x.shape
    q, k, v = self.split_qkv(self.query_key_value(x, recorder))
    inv_freq = c.rope_for_layer(self.layer_index).inv_freq(c.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale, softcap=None,
                                         window=None)
    # [B, T, H, Dh] -> [B, T, D]
    return self.dense(out.reshape(b, t, c.num_heads * c.head_dim), recorder), cache


class FalconMLP(nnx.Module):
  """dense_4h_to_h(act(dense_h_to_4h(x)))."""

  def __init__(self, config: ModelConfig, *, options, dtype, rngs):
    c = config
    d, f = c.hidden_size, c.intermediate_size
    linear = functools.partial(Linear, bias=c.qkv_bias, options=options, dtype=dtype, rngs=rngs)
    self.dense_h_to_4h = linear(d, f, path=("mlp", "dense_h_to_4h"))
    self.dense_4h_to_h = linear(f, d, path=("mlp", "dense_4h_to_h"))
    self.activation = c.activation

  def __call__(self, x: jax.Array, recorder: layers.LinearRecorder | None) -> jax.Array:
    """x [B, T, D] -> [B, T, F] -> [B, T, D]."""
    hidden = layers.activation(self.dense_h_to_4h(x, recorder), self.activation)
    return self.dense_4h_to_h(hidden, recorder)


class FalconBlock(nnx.Module):
  """Attention and MLP in parallel on normed inputs (one or two norms), or sequential."""

  def __init__(self, config: ModelConfig, layer_index: int, *, options, dtype, rngs):
    c = config
    norm = functools.partial(Norm.of_config, c, c.hidden_size, bias=True, rngs=rngs,
                             dtype=dtype)
    if c.num_parallel_norms == 2:
      self.ln_attn, self.ln_mlp = norm(), norm()
    else:
      self.input_layernorm = norm()
    if not c.parallel_attn:
      self.post_attention_layernorm = norm()
    self.self_attention = FalconAttention(c, layer_index, options=options, dtype=dtype,
                                          rngs=rngs)
    self.mlp = FalconMLP(c, options=options, dtype=dtype, rngs=rngs)
    self.parallel_attn, self.num_parallel_norms = c.parallel_attn, c.num_parallel_norms

  def __call__(self, h: jax.Array, positions: jax.Array, cache: dict | None = None,
               recorder: layers.LinearRecorder | None = None) -> tuple[jax.Array, dict | None]:
    """h [B, T, D], positions [B, T] -> (h [B, T, D], updated cache or None)."""
    if self.num_parallel_norms == 2:
      x_attn, x_mlp = self.ln_attn(h), self.ln_mlp(h)
    else:
      x_attn = x_mlp = self.input_layernorm(h)
    attn_out, cache = self.self_attention(x_attn, positions, cache, recorder)
    if not self.parallel_attn:
      h = h + attn_out
      x_mlp = self.post_attention_layernorm(h)
    mlp_out = self.mlp(x_mlp, recorder)
    h = (mlp_out + attn_out) + h if self.parallel_attn else h + mlp_out
    return h, cache


class FalconModel(DecoderModule):
  """word_embeddings, layers (FalconBlock), ln_f, lm_head (absent when tied)."""

  BLOCK = FalconBlock

  def __init__(self, config: ModelConfig, *, options, dtype, rngs, num_layers=None):
    c = config
    n = c.num_layers if num_layers is None else num_layers
    self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, options=options, dtype=dtype,
                                     rngs=rngs)
    self.layers = ModuleList([FalconBlock(c, i, options=options, dtype=dtype, rngs=rngs)
                              for i in range(n)])
    self.ln_f = Norm.of_config(c, c.hidden_size, bias=True, rngs=rngs, dtype=dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False, options=options,
                            dtype=dtype, rngs=rngs)
    self.tie_word_embeddings = c.tie_word_embeddings

  def embed(self, ids, positions):
    del positions  # rope is applied inside the blocks
    return self.word_embeddings(ids)

  def head(self, h):
    h = self.ln_f(h)
    return self.word_embeddings.attend(h) if self.tie_word_embeddings else self.lm_head(h)


@dataclasses.dataclass(frozen=True)
class Falcon(CausalLM):
  """Falcon decoder (rotary variants; ALiBi models are rejected by the config parser)."""

  MODULE = FalconModel
  HF_PREFIXES = (("transformer.h.", "layers."), ("transformer.", ""))

  def block_linears(self):
    return [[(ATTN, "query_key_value")], [(ATTN, "dense")], [("mlp", "dense_h_to_4h")],
            [("mlp", "dense_4h_to_h")]]
