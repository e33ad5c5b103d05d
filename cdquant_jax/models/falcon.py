"""Falcon: fused query_key_value linear, rope, parallel attention + MLP, LayerNorm, GELU.

The fused linear is applied as one linear (so it is quantized as one matrix); its OUTPUT is
split into q, k, v according to `config.qkv_layout`:
  falcon_new  (new_decoder_architecture) [K, G + 2, Dh]: G query heads, then k, then v per group
  falcon_mq   (multi_query)              [H + 2, Dh]: H query heads, one k head, one v head
  falcon_mha                             [H, 3, Dh]: (q, k, v) per head

Params (HF names without "transformer.", with "h" renamed "layers"):
  word_embeddings.weight [V, D]; ln_f; lm_head (absent when tied)
  layers[i]: ln_attn + ln_mlp (2 norms) or input_layernorm (+ post_attention_layernorm when not
             parallel), self_attention.{query_key_value, dense}, mlp.{dense_h_to_4h, dense_4h_to_h}
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.models import layers
from cdquant_jax.models.base import CausalLM, linear_shape, norm_shape

ATTN = "self_attention"


@dataclasses.dataclass(frozen=True)
class Falcon(CausalLM):
  """Falcon decoder (rotary variants; ALiBi models are rejected by the config parser)."""

  HF_PREFIXES = (("transformer.h.", "layers."), ("transformer.", ""))

  def embed(self, params, ids, positions):
    del positions
    return jnp.take(params["word_embeddings"]["weight"], ids, axis=0)

  def block(self, layer_params, h, positions, layer_index, cache=None, capture=False,
            given=None):
    c = self.config
    lin = layers.LinearRecorder(layer_params, capture, self.linear_options, given)
    if c.num_parallel_norms == 2:
      x_attn = layers.norm(h, layer_params["ln_attn"], c)
      x_mlp = layers.norm(h, layer_params["ln_mlp"], c)
    else:
      x_attn = x_mlp = layers.norm(h, layer_params["input_layernorm"], c)
    attn_out, cache = self._attention(lin, x_attn, positions, layer_index, cache)
    if not c.parallel_attn:
      h = h + attn_out
      x_mlp = layers.norm(h, layer_params["post_attention_layernorm"], c)
    hidden = layers.activation(lin(("mlp", "dense_h_to_4h"), x_mlp), c.activation)
    mlp_out = lin(("mlp", "dense_4h_to_h"), hidden)
    h = (mlp_out + attn_out) + h if c.parallel_attn else h + mlp_out
    return (h, cache, lin.inputs) if capture else (h, cache)

  def _split_qkv(self, fused: jax.Array):
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

  def _attention(self, lin, x, positions, layer_index, cache):
    c = self.config
    b, t, _ = x.shape
    q, k, v = self._split_qkv(lin((ATTN, "query_key_value"), x))
    inv_freq = c.rope_for_layer(layer_index).inv_freq(c.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale, softcap=None,
                                         window=None)
    # [B, T, H, Dh] -> [B, T, D]
    return lin((ATTN, "dense"), out.reshape(b, t, c.num_heads * c.head_dim)), cache

  def head(self, params, h):
    c = self.config
    h = layers.norm(h, params["ln_f"], c)
    lm_head = params["word_embeddings"] if c.tie_word_embeddings else params["lm_head"]
    return layers.linear(h, lm_head, self.linear_options)

  def block_linears(self):
    return [[(ATTN, "query_key_value")], [(ATTN, "dense")], [("mlp", "dense_h_to_4h")],
            [("mlp", "dense_4h_to_h")]]

  def param_shapes(self, dtype=jnp.float32):
    c = self.config
    d, f, dh, bias = c.hidden_size, c.intermediate_size, c.head_dim, c.qkv_bias
    qkv_out = (c.num_heads + 2 * c.num_kv_heads) * dh
    layer = {
        ATTN: {"query_key_value": linear_shape(qkv_out, d, bias, dtype),
               "dense": linear_shape(d, d, bias, dtype)},
        "mlp": {"dense_h_to_4h": linear_shape(f, d, bias, dtype),
                "dense_4h_to_h": linear_shape(d, f, bias, dtype)},
    }
    if c.num_parallel_norms == 2:
      layer.update(ln_attn=norm_shape(d, True, dtype), ln_mlp=norm_shape(d, True, dtype))
    else:
      layer["input_layernorm"] = norm_shape(d, True, dtype)
    if not c.parallel_attn:
      layer["post_attention_layernorm"] = norm_shape(d, True, dtype)
    params = {"word_embeddings": {"weight": jax.ShapeDtypeStruct((c.vocab_size, d), dtype)},
              "layers": [layer] * c.num_layers, "ln_f": norm_shape(d, True, dtype)}
    if not c.tie_word_embeddings:
      params["lm_head"] = linear_shape(c.vocab_size, d, False, dtype)
    return params
