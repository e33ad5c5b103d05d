"""OPT (NNX modules): learned positions (table offset 2), LayerNorm, biased linears, ReLU MLP.

Params = the `OPTModel` module tree (HF names without "model.decoder."):
  embed_tokens.weight [V, E]; embed_positions.weight [max_pos + 2, D];
  project_in [D, E] / project_out [E, D] only when word_embed_proj_dim E != D (OPT-350m);
  final_layer_norm (pre-norm models); lm_head tied to embed_tokens unless the config says not.
  layers[i]: self_attn_layer_norm, self_attn.{q,k,v,out}_proj, final_layer_norm, fc1, fc2
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

ATTN = "self_attn"


class OPTAttention(nnx.Module):
  """q/k/v/out projections (biased), multi-head causal attention without rope."""

  def __init__(self, config: ModelConfig, *, options, dtype, rngs):
    c = config
    d = c.hidden_size
    linear = functools.partial(Linear, d, d, bias=c.qkv_bias, options=options, dtype=dtype,
                               rngs=rngs)
    self.q_proj = linear(path=(ATTN, "q_proj"))
    self.k_proj = linear(path=(ATTN, "k_proj"))
    self.v_proj = linear(path=(ATTN, "v_proj"))
    self.out_proj = linear(path=(ATTN, "out_proj"))
    self.config = c

  def __call__(self, x: jax.Array, cache: dict | None, recorder: layers.LinearRecorder | None
               ) -> tuple[jax.Array, dict | None]:
    """x [B, T, D] -> ([B, T, D], updated cache or None)."""
    c = self.config
    b, t, _ = x.shape
    # [B, T, D] -> [B, T, H, Dh]
    q, k, v = (proj(x, recorder).reshape(b, t, c.num_heads, c.head_dim)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    out, cache = layers.cached_attention(q, k, v, cache, scale=c.query_scale, softcap=None,
                                         window=None)
    # [B, T, H, Dh] -> [B, T, D]
    return self.out_proj(out.reshape(b, t, c.num_heads * c.head_dim), recorder), cache


class OPTBlock(nnx.Module):
  """Attention and fc1 -> activation -> fc2, each residual; LayerNorm before (pre_norm) or
  after each."""

  def __init__(self, config: ModelConfig, layer_index: int, *, options, dtype, rngs):
    del layer_index  # every OPT block is the same
    c = config
    d, f, bias = c.hidden_size, c.intermediate_size, c.qkv_bias
    norm = functools.partial(Norm.of_config, c, d, bias=True, rngs=rngs, dtype=dtype)
    linear = functools.partial(Linear, bias=bias, options=options, dtype=dtype, rngs=rngs)
    self.self_attn_layer_norm = norm()
    self.self_attn = OPTAttention(c, options=options, dtype=dtype, rngs=rngs)
    self.final_layer_norm = norm()
    self.fc1 = linear(d, f, path=("fc1",))
    self.fc2 = linear(f, d, path=("fc2",))
    self.pre_norm, self.activation = c.pre_norm, c.activation

  def __call__(self, h: jax.Array, positions: jax.Array, cache: dict | None = None,
               recorder: layers.LinearRecorder | None = None) -> tuple[jax.Array, dict | None]:
    """h [B, T, D] -> (h [B, T, D], updated cache or None); positions are unused (they are
    embedded once, in `OPTModel.embed`)."""
    del positions
    x = self.self_attn_layer_norm(h) if self.pre_norm else h
    attn_out, cache = self.self_attn(x, cache, recorder)
    h = h + attn_out
    if not self.pre_norm:
      h = self.self_attn_layer_norm(h)
    x = self.final_layer_norm(h) if self.pre_norm else h
    h = h + self.fc2(layers.activation(self.fc1(x, recorder), self.activation), recorder)
    if not self.pre_norm:
      h = self.final_layer_norm(h)
    return h, cache


class OPTModel(DecoderModule):
  """embed_tokens, embed_positions, project_in/out (E != D), layers (OPTBlock),
  final_layer_norm (pre-norm models), lm_head (absent when tied)."""

  BLOCK = OPTBlock

  def __init__(self, config: ModelConfig, *, options, dtype, rngs, num_layers=None):
    c = config
    d = c.hidden_size
    e = c.word_embed_proj_dim or d
    n = c.num_layers if num_layers is None else num_layers
    linear = functools.partial(Linear, bias=False, options=options, dtype=dtype, rngs=rngs)
    self.embed_tokens = Embedding(c.vocab_size, e, options=options, dtype=dtype, rngs=rngs)
    self.embed_positions = Embedding(c.max_position_embeddings + c.position_offset, d,
                                     options=options, dtype=dtype, rngs=rngs)
    self.layers = ModuleList([OPTBlock(c, i, options=options, dtype=dtype, rngs=rngs)
                              for i in range(n)])
    if c.final_norm:
      self.final_layer_norm = Norm.of_config(c, d, bias=True, rngs=rngs, dtype=dtype)
    if c.word_embed_proj_dim is not None:
      self.project_in = linear(e, d)
      self.project_out = linear(d, e)
    if not c.tie_word_embeddings:
      self.lm_head = linear(e, c.vocab_size)
    self.config = c

  def embed(self, ids, positions):
    c = self.config
    h = self.embed_tokens(ids)
    if c.word_embed_proj_dim is not None:
      h = self.project_in(h)
    # OPT's position table starts at offset 2 (row p + 2 holds position p).
    pos = self.embed_positions(positions + c.position_offset)
    return h + pos.astype(h.dtype)

  def head(self, h):
    c = self.config
    if c.final_norm:
      h = self.final_layer_norm(h)
    if c.word_embed_proj_dim is not None:
      h = self.project_out(h)
    return self.embed_tokens.attend(h) if c.tie_word_embeddings else self.lm_head(h)


@dataclasses.dataclass(frozen=True)
class OPT(CausalLM):
  """OPT decoder (pre-norm, or post-norm when do_layer_norm_before=False)."""

  MODULE = OPTModel
  HF_PREFIXES = (("model.decoder.", ""),)

  def block_linears(self):
    return [[(ATTN, "k_proj"), (ATTN, "v_proj"), (ATTN, "q_proj")], [(ATTN, "out_proj")],
            [("fc1",)], [("fc2",)]]
