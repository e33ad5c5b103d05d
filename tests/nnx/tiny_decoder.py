"""A tiny NNX decoder transformer written for the tests (not the zoo), and its zoo twin.

Llama-shaped: embed, blocks of RMSNorm -> attention (GQA, rope) -> RMSNorm -> gated MLP, head.
Attention mixes the two supported linear types: q_proj and o_proj are `nnx.Einsum`s
("BTD,DNH->BTNH", "BTNH,NHD->BTD"), k_proj and v_proj `nnx.Linear`s; the MLP's gate/up/down are
`nnx.Einsum`s. `zoo_params` writes the same weights into the zoo's Llama params (HF layout),
so the pipeline on the zoo model is the reference for `quantize_nnx` on this one.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdquant_jax.models import registry

HIGHEST = jax.lax.Precision.HIGHEST
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
D, F = TINY["hidden_size"], TINY["intermediate_size"]
N, K = TINY["num_attention_heads"], TINY["num_key_value_heads"]
DH = D // N


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,)))
    self.eps = eps

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale[...]


def rope(x, theta: float):
  """x [B, T, heads, DH] rotated by position (first half / second half pairs)."""
  t, dh = x.shape[1], x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh)
  # [T, DH/2] angles, then [1, T, 1, DH/2] to broadcast over batch and heads
  angles = (np.arange(t, dtype=np.float32)[:, None] * inv_freq)[None, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (D, N, DH), precision=HIGHEST, rngs=rngs)
    self.k_proj = nnx.Linear(D, K * DH, use_bias=False, precision=HIGHEST, rngs=rngs)
    self.v_proj = nnx.Linear(D, K * DH, use_bias=False, precision=HIGHEST, rngs=rngs)
    self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (N, DH, D), precision=HIGHEST, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    theta = TINY["rope_theta"]
    q = rope(self.q_proj(x), theta)  # [B, T, N, DH]
    # [B, T, K * DH] -> [B, T, K, DH]
    k = rope(self.k_proj(x).reshape(b, t, K, DH), theta)
    v = self.v_proj(x).reshape(b, t, K, DH)
    # Query head n uses kv head n // (N / K): [B, T, K, DH] -> [B, T, N, DH]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    # [B, T, N, DH] x [B, S, N, DH] -> [B, N, T, S]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, precision=HIGHEST) / np.sqrt(DH)
    causal = np.tril(np.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    # [B, N, T, S] x [B, S, N, DH] -> [B, T, N, DH]
    return self.o_proj(jnp.einsum("bnts,bsnh->btnh", probs, v, precision=HIGHEST))


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.gate_proj = nnx.Einsum("BTD,DF->BTF", (D, F), precision=HIGHEST, rngs=rngs)
    self.up_proj = nnx.Einsum("BTD,DF->BTF", (D, F), precision=HIGHEST, rngs=rngs)
    self.down_proj = nnx.Einsum("BTF,FD->BTD", (F, D), precision=HIGHEST, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, rngs):
    eps = TINY["rms_norm_eps"]
    self.input_layernorm = RMSNorm(D, eps)
    self.self_attn = Attention(rngs)
    self.post_attention_layernorm = RMSNorm(D, eps)
    self.mlp = MLP(rngs)

  def __call__(self, h):
    h = h + self.self_attn(self.input_layernorm(h))
    return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nnx.Module):
  def __init__(self, rngs):
    self.embed_tokens = nnx.Embed(TINY["vocab_size"], D, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(TINY["num_hidden_layers"])])
    self.norm = RMSNorm(D, TINY["rms_norm_eps"])
    self.lm_head = nnx.Linear(D, TINY["vocab_size"], use_bias=False, precision=HIGHEST,
                              rngs=rngs)

  def __call__(self, ids):
    h = self.embed_tokens(ids)
    for layer in self.layers:
      h = layer(h)
    return self.lm_head(self.norm(h))


def embed(model: Decoder, ids):
  """ids [B, T] -> the first block's input [B, T, D]."""
  return model.embed_tokens(ids)


def make_decoder(seed: int = 0, scale: float = 0.3) -> Decoder:
  """A Decoder with N(0, scale) weights and norm scales 1 + N(0, scale)."""
  model = Decoder(nnx.Rngs(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    noise = scale * jax.random.normal(next(keys), var[...].shape)
    var[...] = noise + 1.0 if path[-1] == "scale" else noise
  return model


def zoo_params(model: Decoder) -> tuple:
  """(zoo LlamaLike, its params) holding the Decoder's weights (HF layout, W [d_out, d_in])."""
  zoo = registry.model_from_hf_config(TINY)
  w = lambda a: jnp.asarray(a[...])
  layers = []
  for blk in model.layers:
    a, m = blk.self_attn, blk.mlp
    layers.append({
        "input_layernorm": {"weight": w(blk.input_layernorm.scale)},
        "post_attention_layernorm": {"weight": w(blk.post_attention_layernorm.scale)},
        "self_attn": {
            # [D, N, DH] -> [D, N * DH] -> [N * DH, D]
            "q_proj": {"weight": w(a.q_proj.kernel).reshape(D, N * DH).T},
            "k_proj": {"weight": w(a.k_proj.kernel).T},
            "v_proj": {"weight": w(a.v_proj.kernel).T},
            # [N, DH, D] -> [N * DH, D] -> [D, N * DH]
            "o_proj": {"weight": w(a.o_proj.kernel).reshape(N * DH, D).T}},
        "mlp": {name: {"weight": w(getattr(m, name).kernel).T}
                for name in ("gate_proj", "up_proj", "down_proj")}})
  params = {"embed_tokens": {"weight": w(model.embed_tokens.embedding)}, "layers": layers,
            "norm": {"weight": w(model.norm.scale)},
            "lm_head": {"weight": w(model.lm_head.kernel).T}}
  want = jax.tree.structure(zoo.param_shapes())
  assert jax.tree.structure(params) == want, (jax.tree.structure(params), want)
  return zoo, params
