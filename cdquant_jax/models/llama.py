"""One Llama-like decoder for Llama 1/2/3, Mistral, Qwen2, SmolLM and Gemma 1/2/3.

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

Params (HF names without the "model." prefix):
  embed_tokens.weight [V, D]; norm.weight [D]; lm_head.weight [V, D] (absent when tied)
  layers[i]: input_layernorm, self_attn.{q,k,v,o}_proj (+ q_norm, k_norm), post_attention_layernorm
             (+ pre_feedforward_layernorm, post_feedforward_layernorm), mlp.{gate,up,down}_proj
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.models import layers
from cdquant_jax.models.base import CausalLM, linear_shape, norm_shape

ATTN = "self_attn"


@dataclasses.dataclass(frozen=True)
class LlamaLike(CausalLM):
  """Llama-family decoder; see the module docstring for the config flags."""

  HF_PREFIXES = (("model.", ""),)

  def embed(self, params, ids, positions):
    del positions  # rope is applied inside the blocks
    h = jnp.take(params["embed_tokens"]["weight"], ids, axis=0)
    if self.config.embed_scale is not None:
      # Gemma multiplies by sqrt(D) rounded to the activation dtype.
      h = h * jnp.asarray(self.config.embed_scale, h.dtype)
    return h

  def block(self, layer_params, h, positions, layer_index, cache=None, capture=False,
            given=None):
    c = self.config
    lin = layers.LinearRecorder(layer_params, capture, self.linear_options, given)
    x = layers.norm(h, layer_params["input_layernorm"], c)
    attn_out, cache = self._attention(lin, x, positions, layer_index, cache)
    if c.post_norms:
      attn_out = layers.norm(attn_out, layer_params["post_attention_layernorm"], c)
    h = h + attn_out
    mlp_norm = "pre_feedforward_layernorm" if c.post_norms else "post_attention_layernorm"
    x = layers.norm(h, layer_params[mlp_norm], c)
    # Gated MLP: down(act(gate(x)) * up(x)); [B, T, D] -> [B, T, F] -> [B, T, D]
    gated = layers.activation(lin(("mlp", "gate_proj"), x), c.activation)
    mlp_out = lin(("mlp", "down_proj"), gated * lin(("mlp", "up_proj"), x))
    if c.post_norms:
      mlp_out = layers.norm(mlp_out, layer_params["post_feedforward_layernorm"], c)
    h = h + mlp_out
    return (h, cache, lin.inputs) if capture else (h, cache)

  def _attention(self, lin, x, positions, layer_index, cache):
    c = self.config
    b, t, _ = x.shape
    # [B, T, D] -> [B, T, H, Dh] and [B, T, K, Dh]
    q = lin((ATTN, "q_proj"), x).reshape(b, t, c.num_heads, c.head_dim)
    k = lin((ATTN, "k_proj"), x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = lin((ATTN, "v_proj"), x).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      attn_p = lin.layer_params[ATTN]
      q = layers.norm(q, attn_p["q_norm"], c)
      k = layers.norm(k, attn_p["k_norm"], c)
    inv_freq = c.rope_for_layer(layer_index).inv_freq(c.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale,
                                         softcap=c.attn_softcap,
                                         window=c.window_for_layer(layer_index))
    # [B, T, H, Dh] -> [B, T, H * Dh] -> [B, T, D]
    return lin((ATTN, "o_proj"), out.reshape(b, t, c.num_heads * c.head_dim)), cache

  def head(self, params, h):
    c = self.config
    h = layers.norm(h, params["norm"], c)
    lm_head = params["embed_tokens"] if c.tie_word_embeddings else params["lm_head"]
    logits = layers.linear(h, lm_head, self.linear_options)
    return layers.soft_cap(logits, c.final_softcap)

  def block_linears(self):
    return [[(ATTN, "k_proj"), (ATTN, "v_proj"), (ATTN, "q_proj")], [(ATTN, "o_proj")],
            [("mlp", "up_proj"), ("mlp", "gate_proj")], [("mlp", "down_proj")]]

  def param_shapes(self, dtype=jnp.float32):
    c = self.config
    d, hd = c.hidden_size, c.head_dim
    attn = {
        "q_proj": linear_shape(c.num_heads * hd, d, c.qkv_bias, dtype),
        "k_proj": linear_shape(c.num_kv_heads * hd, d, c.qkv_bias, dtype),
        "v_proj": linear_shape(c.num_kv_heads * hd, d, c.qkv_bias, dtype),
        "o_proj": linear_shape(d, c.num_heads * hd, c.o_bias, dtype),
    }
    if c.qk_norm:
      attn.update(q_norm=norm_shape(hd, False, dtype), k_norm=norm_shape(hd, False, dtype))
    f = c.intermediate_size
    layer = {
        "input_layernorm": norm_shape(d, False, dtype),
        ATTN: attn,
        "post_attention_layernorm": norm_shape(d, False, dtype),
        "mlp": {"gate_proj": linear_shape(f, d, c.mlp_bias, dtype),
                "up_proj": linear_shape(f, d, c.mlp_bias, dtype),
                "down_proj": linear_shape(d, f, c.mlp_bias, dtype)},
    }
    if c.post_norms:
      layer.update(pre_feedforward_layernorm=norm_shape(d, False, dtype),
                   post_feedforward_layernorm=norm_shape(d, False, dtype))
    params = {"embed_tokens": {"weight": jax.ShapeDtypeStruct((c.vocab_size, d), dtype)},
              "layers": [layer] * c.num_layers, "norm": norm_shape(d, False, dtype)}
    if not c.tie_word_embeddings:
      params["lm_head"] = linear_shape(c.vocab_size, d, False, dtype)
    return params
