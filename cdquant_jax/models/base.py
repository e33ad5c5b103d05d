"""The functional decoder-LM interface shared by all families (`CausalLM`) and generation.

A model is a frozen dataclass holding a `ModelConfig` and the `LinearOptions` its packed
(quantized) linears run with; parameters are a separate plain nested
dict with HF-like names, e.g. params["layers"][i]["self_attn"]["q_proj"]["weight"] [d_out, d_in].
Subclasses implement `embed`, `block`, `head`, `block_linears`, `param_shapes` and the HF name
prefixes; this class adds forward, the KV cache, decoding and generation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from cdquant_jax.models import layers
from cdquant_jax.models.config import ModelConfig

Params = dict[str, Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """Base class; see the module docstring. Hashable, so usable as a static jit argument."""

  config: ModelConfig
  linear_options: layers.LinearOptions = layers.LinearOptions()

  # (HF name prefix, our prefix), first match wins; e.g. ("model.", "").
  HF_PREFIXES: ClassVar[tuple[tuple[str, str], ...]] = ()

  # ---- implemented by each family -------------------------------------------------------
  def embed(self, params: Params, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """ids [B, T] int, positions [B, T] int -> h [B, T, D]."""
    raise NotImplementedError

  def block(self, layer_params: Params, h: jax.Array, positions: jax.Array, layer_index: int,
            cache: Params | None = None, capture: bool = False,
            given: dict[Path, jax.Array] | None = None):
    """One decoder block: h [B, T, D] -> (h, cache), or (h, cache, inputs) with capture=True,
    where inputs maps each linear's path (see `block_linears`) to its input [B, T, d_in].
    given: linear path -> input [B, T, d_in] to use instead of computing it
    (`layers.LinearRecorder`)."""
    raise NotImplementedError

  def head(self, params: Params, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V] (final norm, lm_head or tied embedding, soft-cap)."""
    raise NotImplementedError

  def block_linears(self) -> list[list[Path]]:
    """Linear paths of a block in true-sequential groups: [[k, v, q], [o], [up, gate], [down]]."""
    raise NotImplementedError

  def param_shapes(self, dtype=jnp.float32) -> Params:
    """The params pytree as jax.ShapeDtypeStruct leaves (for eval_shape and load checks)."""
    raise NotImplementedError

  @property
  def cache_kv_heads(self) -> int:
    return self.config.num_kv_heads

  # ---- shared ------------------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  def layer_params(self, params: Params, i: int) -> Params:
    return params["layers"][i]

  def set_layer_params(self, params: Params, i: int, layer_params: Params) -> Params:
    """A new params dict with layer i replaced (the input is not modified)."""
    new_layers = list(params["layers"])
    new_layers[i] = layer_params
    return {**params, "layers": new_layers}

  def with_linear_options(self, options: layers.LinearOptions) -> "CausalLM":
    """This model with its packed linears run as `options` says (e.g. another kernel)."""
    return dataclasses.replace(self, linear_options=options)

  def linear_paths(self) -> list[Path]:
    return [path for group in self.block_linears() for path in group]

  def forward(self, params: Params, ids: jax.Array, positions: jax.Array | None = None
              ) -> jax.Array:
    """ids [B, T] -> logits [B, T, V] (embed, every block, head). Jit-able."""
    if positions is None:
      positions = default_positions(ids)
    h = self.embed(params, ids, positions)
    for i in range(self.num_layers):
      h, _ = self.block(self.layer_params(params, i), h, positions, i)
    return self.head(params, h)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list[Params]:
    """One `layers.init_layer_cache` per layer, max_len slots each."""
    c = self.config
    return [layers.init_layer_cache(batch, max_len, self.cache_kv_heads, c.head_dim, dtype)
            for _ in range(self.num_layers)]

  def decode_step(self, params: Params, ids: jax.Array, cache: list[Params]
                  ) -> tuple[jax.Array, list[Params]]:
    """Appends ids [B, T] to the cache; returns (logits [B, T, V], new cache)."""
    t = ids.shape[1]
    # [B, T] absolute positions, continuing after the cached tokens.
    positions = jnp.broadcast_to(cache[0]["end"] + jnp.arange(t), ids.shape)
    h = self.embed(params, ids, positions)
    new_cache = []
    for i in range(self.num_layers):
      h, layer_cache = self.block(self.layer_params(params, i), h, positions, i, cache[i])
      new_cache.append(layer_cache)
    return self.head(params, h), new_cache

  def generate(self, params: Params, prompt, max_new_tokens: int, *, tokenizer=None,
               greedy: bool = True, temperature: float = 1.0, key: jax.Array | None = None,
               stop_at_eos: bool = True):
    """Autoregressive generation with the KV cache.

    Args:
      prompt: a string (needs `tokenizer`, a `tokenizers.Tokenizer`) or ids [B, T].
      max_new_tokens: tokens to generate.
      greedy: argmax decoding; otherwise samples at `temperature` with `key`.
    Returns:
      The generated continuation as a string for a string prompt (cut at the first EOS when
      stop_at_eos), else ids [B, T + max_new_tokens].
    """
    text = isinstance(prompt, str)
    if text:
      if tokenizer is None:
        raise ValueError("generate: a string prompt needs a tokenizer")
      ids = jnp.asarray([tokenizer.encode(prompt).ids], jnp.int32)
    else:
      ids = jnp.asarray(prompt, jnp.int32)
    if key is None:
      key = jax.random.key(0)
    dtype = jax.tree.leaves(params)[0].dtype
    cache = self.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens, dtype)
    new = _generate_tokens(self, params, ids, cache, key, max_new_tokens, greedy,
                           float(temperature))
    if not text:
      return jnp.concatenate([ids, new], axis=1)
    tokens = [int(x) for x in new[0]]
    eos = set(self.config.eos_token_ids)
    if stop_at_eos and eos:
      cut = next((i for i, tok in enumerate(tokens) if tok in eos), len(tokens))
      tokens = tokens[:cut]
    return tokenizer.decode(tokens)

  def init_params(self, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters of the right shapes (for tests): N(0, scale) weights, norms near 1."""
    shapes = self.param_shapes(dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
      value = scale * jax.random.normal(k, leaf.shape, jnp.float32)
      name = getattr(path[-2], "key", "") if len(path) > 1 else ""
      if len(leaf.shape) == 1 and ("norm" in str(name) or "ln" in str(name)) and \
          getattr(path[-1], "key", "") == "weight":
        value = value + (1.0 - self.config.norm_offset)
      out.append(value.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  def hf_name_to_path(self, name: str) -> tuple[Any, ...] | None:
    """Our params path for a HF tensor name, or None for tensors we drop (tied lm_head,
    rotary buffers)."""
    if name.endswith("rotary_emb.inv_freq") or name.endswith(".masked_bias") \
        or name.endswith(".attn.bias"):
      return None
    for src, dst in self.HF_PREFIXES:
      if name.startswith(src):
        name = dst + name[len(src):]
        break
    if name == "lm_head.weight" and self.config.tie_word_embeddings:
      return None
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def default_positions(ids: jax.Array) -> jax.Array:
  """[B, T] positions 0..T-1 for every row."""
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def linear_shape(d_out: int, d_in: int, bias: bool, dtype) -> Params:
  p = {"weight": jax.ShapeDtypeStruct((d_out, d_in), dtype)}
  if bias:
    p["bias"] = jax.ShapeDtypeStruct((d_out,), dtype)
  return p


def norm_shape(dim: int, bias: bool, dtype) -> Params:
  p = {"weight": jax.ShapeDtypeStruct((dim,), dtype)}
  if bias:
    p["bias"] = jax.ShapeDtypeStruct((dim,), dtype)
  return p


def _pick(logits: jax.Array, key: jax.Array, greedy: bool, temperature: float) -> jax.Array:
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits.astype(jnp.float32) / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _generate_tokens(model: CausalLM, params: Params, ids: jax.Array, cache: Sequence[Params],
                     key: jax.Array, steps: int, greedy: bool, temperature: float) -> jax.Array:
  """[B, steps] new tokens: prefill with ids, then one cached decode step per token."""
  logits, cache = model.decode_step(params, ids, list(cache))
  keys = jax.random.split(key, steps + 1)
  first = _pick(logits[:, -1], keys[0], greedy, temperature)

  def step(carry, step_key):
    token, cache = carry
    logits, cache = model.decode_step(params, token[:, None], cache)
    return (_pick(logits[:, -1], step_key, greedy, temperature), cache), token

  _, tokens = jax.lax.scan(step, (first, cache), keys[1:])
  # [steps, B] -> [B, steps]
  return tokens.T
