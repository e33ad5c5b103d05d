"""OPT: learned positions (table offset 2), LayerNorm, biased linears, ReLU MLP.

Params (HF names without "model.decoder."):
  embed_tokens.weight [V, E]; embed_positions.weight [max_pos + 2, D];
  project_in [D, E] / project_out [E, D] only when word_embed_proj_dim E != D (OPT-350m);
  final_layer_norm (pre-norm models); lm_head tied to embed_tokens unless the config says not.
  layers[i]: self_attn_layer_norm, self_attn.{q,k,v,out}_proj, final_layer_norm, fc1, fc2
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.models import layers
from cdquant_jax.models.base import CausalLM, linear_shape, norm_shape

ATTN = "self_attn"


@dataclasses.dataclass(frozen=True)
class OPT(CausalLM):
  """OPT decoder (pre-norm, or post-norm when do_layer_norm_before=False)."""

  HF_PREFIXES = (("model.decoder.", ""),)

  def embed(self, params, ids, positions):
    c = self.config
    h = jnp.take(params["embed_tokens"]["weight"], ids, axis=0)
    if c.word_embed_proj_dim is not None:
      h = layers.linear(h, params["project_in"], self.linear_options)
    # OPT's position table starts at offset 2 (row p + 2 holds position p).
    pos = jnp.take(params["embed_positions"]["weight"], positions + c.position_offset, axis=0)
    return h + pos.astype(h.dtype)

  def block(self, layer_params, h, positions, layer_index, cache=None, capture=False,
            given=None):
    del positions
    c = self.config
    lin = layers.LinearRecorder(layer_params, capture, self.linear_options, given)
    b, t, _ = h.shape
    x = layers.norm(h, layer_params["self_attn_layer_norm"], c) if c.pre_norm else h
    # [B, T, D] -> [B, T, H, Dh]
    q, k, v = (lin((ATTN, name), x).reshape(b, t, c.num_heads, c.head_dim)
               for name in ("q_proj", "k_proj", "v_proj"))
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale, softcap=None,
                                         window=None)
    # [B, T, H, Dh] -> [B, T, D]
    h = h + lin((ATTN, "out_proj"), out.reshape(b, t, c.num_heads * c.head_dim))
    if not c.pre_norm:
      h = layers.norm(h, layer_params["self_attn_layer_norm"], c)
    x = layers.norm(h, layer_params["final_layer_norm"], c) if c.pre_norm else h
    h = h + lin(("fc2",), layers.activation(lin(("fc1",), x), c.activation))
    if not c.pre_norm:
      h = layers.norm(h, layer_params["final_layer_norm"], c)
    return (h, cache, lin.inputs) if capture else (h, cache)

  def head(self, params, h):
    c = self.config
    if c.final_norm:
      h = layers.norm(h, params["final_layer_norm"], c)
    if c.word_embed_proj_dim is not None:
      h = layers.linear(h, params["project_out"], self.linear_options)
    lm_head = params["embed_tokens"] if c.tie_word_embeddings else params["lm_head"]
    return layers.linear(h, lm_head, self.linear_options)

  def block_linears(self):
    return [[(ATTN, "k_proj"), (ATTN, "v_proj"), (ATTN, "q_proj")], [(ATTN, "out_proj")],
            [("fc1",)], [("fc2",)]]

  def param_shapes(self, dtype=jnp.float32):
    c = self.config
    d, f, bias = c.hidden_size, c.intermediate_size, c.qkv_bias
    e = c.word_embed_proj_dim or d
    layer = {
        "self_attn_layer_norm": norm_shape(d, True, dtype),
        ATTN: {name: linear_shape(d, d, bias, dtype)
               for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "final_layer_norm": norm_shape(d, True, dtype),
        "fc1": linear_shape(f, d, bias, dtype),
        "fc2": linear_shape(d, f, bias, dtype),
    }
    params = {
        "embed_tokens": {"weight": jax.ShapeDtypeStruct((c.vocab_size, e), dtype)},
        "embed_positions": {"weight": jax.ShapeDtypeStruct(
            (c.max_position_embeddings + c.position_offset, d), dtype)},
        "layers": [layer] * c.num_layers,
    }
    if c.final_norm:
      params["final_layer_norm"] = norm_shape(d, True, dtype)
    if c.word_embed_proj_dim is not None:
      params["project_in"] = linear_shape(d, e, False, dtype)
      params["project_out"] = linear_shape(e, d, False, dtype)
    if not c.tie_word_embeddings:
      params["lm_head"] = linear_shape(c.vocab_size, e, False, dtype)
    return params
