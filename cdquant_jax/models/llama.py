"""One Llama-like decoder (NNX modules) for Llama 1/2/3, Mistral, Qwen2, SmolLM, Gemma 1/2/3.

The variants differ only through `ModelConfig` fields (HF "modular" style, no copies):
  qkv_bias / o_bias        Qwen2 (q, k, v biases), Llama attention_bias
  tie_word_embeddings      SmolLM, Gemma
  rope.kind                Llama 3 ("llama3"), linear scaling (Gemma 3 global layers)
  layer_types, window      Mistral / Qwen2 / Gemma 2-3 sliding-window layers
  norm_offset, embed_scale Gemma: RMSNorm by (1 + weight), embeddings times sqrt(D)
  activation               GeGLU (gelu_tanh) for Gemma, SwiGLU otherwise
  post_norms               Gemma 2/3: norm after attention and after the MLP (4 norms per block)
  attn_softcap, final_softcap, query_scale   Gemma 2 (query_pre_attn_scalar, soft-capping)
  qk_norm, rope_local      Gemma 3: per-head RMSNorm of q and k; local rope base on sliding layers

Params = the `LlamaModel` module tree (HF names without the "model." prefix):
  embed_tokens.weight [V, D]; norm.weight [D]; lm_head.weight [V, D] (absent when tied)
  layers[i]: input_layernorm, self_attn.{q,k,v,o}_proj (+ q_norm, k_norm), post_attention_layernorm
             (+ pre_feedforward_layernorm, post_feedforward_layernorm), mlp.{gate,up,down}_proj
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cdquant_jax.models import layers
from cdquant_jax.models.base import CausalLM
from cdquant_jax.models.config import ModelConfig
from cdquant_jax.models.modules import DecoderModule, Embedding, Linear, ModuleList, Norm

ATTN = "self_attn"


class LlamaAttention(nnx.Module):
  """q/k/v/o projections (+ Gemma 3 per-head q_norm, k_norm), rope, cached causal attention."""

  def __init__(self, config: ModelConfig, layer_index: int, *, options, dtype, rngs):
    c = config
    d, hd = c.hidden_size, c.head_dim
    linear = functools.partial(Linear, options=options, dtype=dtype, rngs=rngs)
    self.q_proj = linear(d, c.num_heads * hd, bias=c.qkv_bias, path=(ATTN, "q_proj"))
    self.k_proj = linear(d, c.num_kv_heads * hd, bias=c.qkv_bias, path=(ATTN, "k_proj"))
    self.v_proj = linear(d, c.num_kv_heads * hd, bias=c.qkv_bias, path=(ATTN, "v_proj"))
    self.o_proj = linear(c.num_heads * hd, d, bias=c.o_bias, path=(ATTN, "o_proj"))
    if c.qk_norm:
      self.q_norm = Norm.of_config(c, hd, bias=False, rngs=rngs, dtype=dtype)
      self.k_norm = Norm.of_config(c, hd, bias=False, rngs=rngs, dtype=dtype)
    self.config, self.layer_index = c, layer_index

  def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None,
               recorder: layers.LinearRecorder | None) -> tuple[jax.Array, dict | None]:
    """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache or None)."""
    c = self.config
    b, t, _ = x.shape
    # [B, T, D] -> [B, T, H, Dh] and [B, T, K, Dh]
    q = self.q_proj(x, recorder).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x, recorder).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x, recorder).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = c.rope_for_layer(self.layer_index).inv_freq(c.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale,
                                         softcap=c.attn_softcap,
                                         window=c.window_for_layer(self.layer_index))
    # [B, T, H, Dh] -> [B, T, H * Dh] -> [B, T, D]
    return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim), recorder), cache


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU, or GeGLU (gelu_tanh) for Gemma."""

  def __init__(self, config: ModelConfig, *, options, dtype, rngs):
    c = config
    d, f, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
    linear = functools.partial(Linear, bias=bias, options=options, dtype=dtype, rngs=rngs)
    self.gate_proj = linear(d, f, path=("mlp", "gate_proj"))
    self.up_proj = linear(d, f, path=("mlp", "up_proj"))
    self.down_proj = linear(f, d, path=("mlp", "down_proj"))
    self.activation = c.activation

  def __call__(self, x: jax.Array, recorder: layers.LinearRecorder | None) -> jax.Array:
    """x [B, T, D] -> [B, T, F] -> [B, T, D]."""
    gated = layers.activation(self.gate_proj(x, recorder), self.activation)
    return self.down_proj(gated * self.up_proj(x, recorder), recorder)


class LlamaBlock(nnx.Module):
  """Pre-norm attention and gated MLP, each residual (Gemma 2/3: also normed after)."""

  def __init__(self, config: ModelConfig, layer_index: int, *, options, dtype, rngs):
    c = config
    norm = functools.partial(Norm.of_config, c, c.hidden_size, bias=False, rngs=rngs,
                             dtype=dtype)
    self.input_layernorm = norm()
    self.self_attn = LlamaAttention(c, layer_index, options=options, dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = norm()
    if c.post_norms:
      self.pre_feedforward_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    self.mlp = GatedMLP(c, options=options, dtype=dtype, rngs=rngs)
    self.post_norms = c.post_norms

  def __call__(self, h: jax.Array, positions: jax.Array, cache: dict | None = None,
               recorder: layers.LinearRecorder | None = None) -> tuple[jax.Array, dict | None]:
    """h [B, T, D], positions [B, T] -> (h [B, T, D], updated cache or None)."""
    attn_out, cache = self.self_attn(self.input_layernorm(h), positions, cache, recorder)
    if self.post_norms:
      attn_out = self.post_attention_layernorm(attn_out)
    h = h + attn_out
    mlp_norm = self.pre_feedforward_layernorm if self.post_norms else self.post_attention_layernorm
    mlp_out = self.mlp(mlp_norm(h), recorder)
    if self.post_norms:
      mlp_out = self.post_feedforward_layernorm(mlp_out)
    return h + mlp_out, cache


class LlamaModel(DecoderModule):
  """embed_tokens, layers (LlamaBlock), norm, lm_head (absent when tied)."""

  BLOCK = LlamaBlock

  def __init__(self, config: ModelConfig, *, options, dtype, rngs, num_layers=None):
    c = config
    n = c.num_layers if num_layers is None else num_layers
    self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, options=options, dtype=dtype,
                                  rngs=rngs)
    self.layers = ModuleList([LlamaBlock(c, i, options=options, dtype=dtype, rngs=rngs)
                              for i in range(n)])
    self.norm = Norm.of_config(c, c.hidden_size, bias=False, rngs=rngs, dtype=dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False, options=options,
                            dtype=dtype, rngs=rngs)
    self.config = c

  def embed(self, ids, positions):
    del positions  # rope is applied inside the blocks
    h = self.embed_tokens(ids)
    if self.config.embed_scale is not None:
      # Gemma multiplies by sqrt(D) rounded to the activation dtype.
      h = h * jnp.asarray(self.config.embed_scale, h.dtype)
    return h

  def head(self, h):
    c = self.config
    h = self.norm(h)
    logits = self.embed_tokens.attend(h) if c.tie_word_embeddings else self.lm_head(h)
    return layers.soft_cap(logits, c.final_softcap)


@dataclasses.dataclass(frozen=True)
class LlamaLike(CausalLM):
  """Llama-family decoder; see the module docstring for the config flags."""

  MODULE = LlamaModel
  HF_PREFIXES = (("model.", ""),)

  def block_linears(self):
    return [[(ATTN, "k_proj"), (ATTN, "v_proj"), (ATTN, "q_proj")], [(ATTN, "o_proj")],
            [("mlp", "up_proj"), ("mlp", "gate_proj")], [("mlp", "down_proj")]]
