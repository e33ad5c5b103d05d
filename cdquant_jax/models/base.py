"""`CausalLM`: the functional interface over each family's NNX module, and generation.

A model is a frozen, hashable dataclass holding a `ModelConfig` and the `LinearOptions` its
packed (quantized) linears run with. The computation lives in the family's NNX module
(`MODULE`, a `modules.DecoderModule`: llama.py, opt.py, falcon.py) whose parameters are
`nnx.Param`s named like HF's, so its state is the plain nested dict of params, e.g.
params["layers"][i]["self_attn"]["q_proj"]["weight"] [d_out, d_in] (`modules.state_to_params`).

The functional methods (embed / block / head / forward / decode_step over dict params, which
the pipeline, loaders and exports use) merge the module's graphdef, built once per model and
part (`_graphdef`), with the given params inside the traced function and call it, so the
NNX modules are the one implementation of each family. `nnx_module(params)` is that module
for direct NNX use (`nnx.split` / `nnx.merge` / `nnx.jit`), `params_of(module)` the way back.
Subclasses set `MODULE`, `block_linears` and the HF name prefixes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cdquant_jax.models import layers, modules
from cdquant_jax.models.config import ModelConfig
from cdquant_jax.models.modules import default_positions  # noqa: F401  (re-exported)

Params = dict[str, Any]
Path = tuple[str, ...]
OUTER = "outer"  # `_graphdef` part: the model without its blocks (embed and head)
WHOLE = "whole"  # `_graphdef` part: the whole model


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """Base class; see the module docstring. Hashable, so usable as a static jit argument."""

  config: ModelConfig
  linear_options: layers.LinearOptions = layers.LinearOptions()

  # The family's NNX model: MODULE(config, options=, dtype=, rngs=, num_layers=None), with
  # MODULE.BLOCK(config, layer_index, options=, dtype=, rngs=) its block class.
  MODULE: ClassVar[type[modules.DecoderModule]]
  # (HF name prefix, our prefix), first match wins; e.g. ("model.", "").
  HF_PREFIXES: ClassVar[tuple[tuple[str, str], ...]] = ()

  # ---- implemented by each family -------------------------------------------------------
  def block_linears(self) -> list[list[Path]]:
    """Linear paths of a block in true-sequential groups: [[k, v, q], [o], [up, gate], [down]]."""
    raise NotImplementedError

  @property
  def cache_kv_heads(self) -> int:
    return self.config.num_kv_heads

  # ---- the NNX modules ---------------------------------------------------------------------
  def build_module(self, rngs: nnx.Rngs | None, dtype=jnp.float32,
                   num_layers: int | None = None) -> modules.DecoderModule:
    """A fresh NNX model: N(0, 0.02) weights, unit norm scales, zero biases; rngs=None builds
    it abstract (jax.ShapeDtypeStruct values). num_layers None: the config's; 0 builds the
    embed and head only."""
    return self.MODULE(self.config, options=self.linear_options, dtype=dtype, rngs=rngs,
                       num_layers=num_layers)

  def build_block(self, layer_index: int, rngs: nnx.Rngs | None, dtype=jnp.float32
                  ) -> nnx.Module:
    """A fresh NNX block `layer_index` (its rope and attention window depend on the index)."""
    return self.MODULE.BLOCK(self.config, layer_index, options=self.linear_options,
                             dtype=dtype, rngs=rngs)

  def nnx_module(self, params: Params) -> modules.DecoderModule:
    """The family's NNX model holding `params` (arrays or packed QuantizedWeights)."""
    return nnx.merge(_graphdef(self, WHOLE), modules.params_to_state(params))

  def block_module(self, layer_params: Params, layer_index: int) -> nnx.Module:
    """NNX block `layer_index` holding `layer_params` (= params["layers"][layer_index])."""
    return nnx.merge(_graphdef(self, layer_index), modules.params_to_state(layer_params))

  def outer_module(self, params: Params) -> modules.DecoderModule:
    """The NNX model without blocks, holding the params outside "layers" (embed, head)."""
    outer = {key: value for key, value in params.items() if key != "layers"}
    return nnx.merge(_graphdef(self, OUTER), modules.params_to_state({**outer, "layers": []}))

  @staticmethod
  def params_of(module: nnx.Module) -> Params:
    """The dict params of an NNX model or block (`nnx.state` as nested dicts and lists)."""
    return modules.state_to_params(nnx.state(module))

  # ---- the functional interface over dict params -------------------------------------------
  def embed(self, params: Params, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """ids [B, T] int, positions [B, T] int -> h [B, T, D] (params need no "layers")."""
    return self.outer_module(params).embed(ids, positions)

  def block(self, layer_params: Params, h: jax.Array, positions: jax.Array, layer_index: int,
            cache: Params | None = None, capture: bool = False,
            given: dict[Path, jax.Array] | None = None):
    """One decoder block: h [B, T, D] -> (h, cache), or (h, cache, inputs) with capture=True,
    where inputs maps each linear's path (see `block_linears`) to its input [B, T, d_in].
    given: linear path -> input [B, T, d_in] to use instead of computing it
    (`layers.LinearRecorder`)."""
    recorder = layers.LinearRecorder(capture, given)
    h, cache = self.block_module(layer_params, layer_index)(h, positions, cache, recorder)
    return (h, cache, recorder.inputs) if capture else (h, cache)

  def head(self, params: Params, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V] (final norm, lm_head or tied embedding, soft-cap)."""
    return self.outer_module(params).head(h)

  def forward(self, params: Params, ids: jax.Array, positions: jax.Array | None = None
              ) -> jax.Array:
    """ids [B, T] -> logits [B, T, V] (embed, every block, head). Jit-able."""
    return self.nnx_module(params)(ids, positions)

  def decode_step(self, params: Params, ids: jax.Array, cache: list[Params]
                  ) -> tuple[jax.Array, list[Params]]:
    """Appends ids [B, T] to the cache; returns (logits [B, T, V], new cache)."""
    return self.nnx_module(params).decode_step(ids, cache)

  def param_shapes(self, dtype=jnp.float32) -> Params:
    """The params pytree as jax.ShapeDtypeStruct leaves (for eval_shape and load checks)."""
    return _param_shapes(self, jnp.dtype(dtype))

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

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list[Params]:
    """One `layers.init_layer_cache` per layer, max_len slots each."""
    c = self.config
    return [layers.init_layer_cache(batch, max_len, self.cache_kv_heads, c.head_dim, dtype)
            for _ in range(self.num_layers)]

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


@functools.lru_cache(maxsize=None)
def _abstract_model(model: CausalLM) -> tuple[nnx.GraphDef, Params]:
  """(graphdef, f32 param shapes) of `model`'s whole NNX module, from one abstract build."""
  graphdef, state = nnx.split(model.build_module(None))
  return graphdef, modules.state_to_params(state)


@functools.lru_cache(maxsize=None)
def _graphdef(model: CausalLM, part: str | int) -> nnx.GraphDef:
  """The graphdef of `model`'s NNX module: WHOLE, OUTER (no blocks) or block `part` (an int).

  Built once per (model, part) from an abstract module (no arrays); a graphdef holds no
  dtypes or shapes, so it serves params of any dtype.
  """
  if part == WHOLE:
    return _abstract_model(model)[0]
  if part == OUTER:
    return nnx.graphdef(model.build_module(None, num_layers=0))
  return nnx.graphdef(model.build_block(part, None))


def _param_shapes(model: CausalLM, dtype) -> Params:
  """`CausalLM.param_shapes`: the abstract build's shapes in `dtype` (fresh containers)."""
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype),
                      _abstract_model(model)[1])


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
