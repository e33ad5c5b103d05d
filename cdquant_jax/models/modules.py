"""The zoo's NNX building blocks (`Linear`, `Norm`, `Embedding`, `DecoderModule`) and the
conversions between the zoo's dict params and `nnx.State`.

Every family (llama.py, opt.py, falcon.py) is a `DecoderModule` subclass whose attribute names
are the HF-like param names, with the blocks as an explicit list under `layers`, so
`state_to_params(nnx.state(module))` is exactly the dict params, e.g.
params["layers"][i]["self_attn"]["q_proj"]["weight"] [d_out, d_in] (HF layout), and
`nnx.merge(graphdef, params_to_state(params))` is the module holding those params.

A weight's value is an array or a packed `QuantizedWeight` (a pytree): `Linear` runs both
through `layers.linear`, the zoo's one matmul (packed_matmul dispatch for the latter).
Linears of a block carry their path in the block (("self_attn", "q_proj")) and consult the
`layers.LinearRecorder` passed to the block's call, which records (capture) or substitutes
(given) their inputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cdquant_jax.models import layers

Params = dict[str, Any]
Path = tuple[str, ...]
INIT_SCALE = 0.02  # std of the N(0, std) weights of a freshly built module

# An explicit, graph-visible list of sub-modules (flax >= 0.12 needs nnx.List for that).
ModuleList = getattr(nnx, "List", list)


def value_of(variable: nnx.Variable) -> Any:
  """A variable's value: an array or a pytree (a packed QuantizedWeight)."""
  get = getattr(variable, "get_value", None)
  return get() if get is not None else variable.value


def default_positions(ids: jax.Array) -> jax.Array:
  """[B, T] positions 0..T-1 for every row."""
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, fill: float | None = None
           ) -> nnx.Param:
  """A parameter of `shape`: N(0, INIT_SCALE) values, or all `fill`; with rngs=None an
  abstract jax.ShapeDtypeStruct (a module built so has the graphdef and shapes, no arrays)."""
  if rngs is None:
    return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
  if fill is not None:
    return nnx.Param(jnp.full(shape, fill, dtype))
  return nnx.Param((INIT_SCALE * jax.random.normal(rngs.params(), shape, jnp.float32)
                    ).astype(dtype))


class Linear(nnx.Module):
  """y = x @ weightᵀ (+ bias) by `layers.linear`, with f32 accumulation.

  Attributes:
    weight: nnx.Param [d_out, d_in] (HF layout), an array or a packed QuantizedWeight.
    bias: nnx.Param [d_out], or None.
    path: this linear's path in its block (the key of `layers.LinearRecorder`), () elsewhere.
    options: `layers.LinearOptions`, the kernel of a packed weight (static).
  """

  def __init__(self, d_in: int, d_out: int, *, bias: bool, rngs: nnx.Rngs | None,
               dtype=jnp.float32, path: Path = (),
               options: layers.LinearOptions = layers.LinearOptions()):
    self.weight = _param(rngs, (d_out, d_in), dtype)
    self.bias = _param(rngs, (d_out,), dtype, fill=0.0) if bias else None
    self.path = tuple(path)
    self.options = options

  def params(self) -> Params:
    """{"weight": [d_out, d_in], optional "bias": [d_out]}: the `layers.linear` param dict."""
    p = {"weight": value_of(self.weight)}
    if self.bias is not None:
      p["bias"] = value_of(self.bias)
    return p

  def __call__(self, x: jax.Array, recorder: layers.LinearRecorder | None = None) -> jax.Array:
    """x [..., d_in] -> [..., d_out]; `recorder` may record or replace x (by `path`)."""
    if recorder is not None:
      x = recorder(self.path, x)
    return layers.linear(x, self.params(), self.options)


class Norm(nnx.Module):
  """RMSNorm (times offset + weight; Gemma: offset 1) or LayerNorm, computed in f32.

  Attributes: weight nnx.Param [D] (initialised to 1 - offset, i.e. a scale of 1), bias
  nnx.Param [D] or None; kind ("rms" | "layer"), eps, offset static. rngs: None builds it
  abstract (see `_param`); the values are constants otherwise.
  """

  def __init__(self, dim: int, *, kind: str, eps: float, offset: float = 0.0, bias: bool,
               rngs: nnx.Rngs | None, dtype=jnp.float32):
    self.weight = _param(rngs, (dim,), dtype, fill=1.0 - offset)
    self.bias = _param(rngs, (dim,), dtype, fill=0.0) if bias else None
    self.kind, self.eps, self.offset = kind, eps, offset

  @classmethod
  def of_config(cls, config, dim: int, *, bias: bool, rngs: nnx.Rngs | None,
                dtype=jnp.float32) -> "Norm":
    """The normalisation `config` prescribes (norm_kind, norm_eps, norm_offset)."""
    return cls(dim, kind=config.norm_kind, eps=config.norm_eps, offset=config.norm_offset,
               bias=bias, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D] in x's dtype."""
    p = {"weight": value_of(self.weight)}
    if self.kind == "layer":
      p["bias"] = value_of(self.bias)
      return layers.layer_norm(x, p, self.eps)
    return layers.rms_norm(x, p, self.eps, self.offset)


class Embedding(nnx.Module):
  """A table weight nnx.Param [V, D]: rows by id, or (tied lm_head) h @ weightᵀ."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs | None, dtype=jnp.float32,
               options: layers.LinearOptions = layers.LinearOptions()):
    self.weight = _param(rngs, (num, dim), dtype)
    self.options = options

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [...] int -> [..., D]."""
    return jnp.take(value_of(self.weight), ids, axis=0)

  def attend(self, h: jax.Array) -> jax.Array:
    """h [..., D] -> [..., V] (the tied output projection)."""
    return layers.linear(h, {"weight": value_of(self.weight)}, self.options)


class DecoderModule(nnx.Module):
  """A decoder LM: `embed`, the blocks in `layers` (each `block(h, positions, cache, recorder)
  -> (h, cache)`), `head`. Subclasses build the attributes and implement embed and head."""

  def embed(self, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """ids [B, T] int, positions [B, T] int -> h [B, T, D]."""
    raise NotImplementedError

  def head(self, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V]."""
    raise NotImplementedError

  def __call__(self, ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """ids [B, T] -> logits [B, T, V] (embed, every block, head)."""
    if positions is None:
      positions = default_positions(ids)
    h = self.embed(ids, positions)
    for block in self.layers:
      h, _ = block(h, positions)
    return self.head(h)

  def decode_step(self, ids: jax.Array, cache: Sequence[Params]
                  ) -> tuple[jax.Array, list[Params]]:
    """Appends ids [B, T] to the per-layer KV caches (`layers.init_layer_cache`); returns
    (logits [B, T, V], new caches)."""
    t = ids.shape[1]
    # [B, T] absolute positions, continuing after the cached tokens.
    positions = jnp.broadcast_to(cache[0]["end"] + jnp.arange(t), ids.shape)
    h = self.embed(ids, positions)
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      h, layer_cache = block(h, positions, layer_cache)
      new_cache.append(layer_cache)
    return self.head(h), new_cache


# ---- dict params <-> nnx.State ------------------------------------------------------------------

def _as_variables(node: Any) -> Any:
  """Nested dicts / lists of values -> nested dicts (lists keyed 0..n-1) of nnx.Param."""
  if isinstance(node, Mapping):
    return {key: _as_variables(child) for key, child in node.items()}
  if isinstance(node, (list, tuple)):
    return {i: _as_variables(child) for i, child in enumerate(node)}
  return nnx.Param(node)


def params_to_state(params: Params) -> nnx.State:
  """The zoo's dict params (a list under "layers") -> the nnx.State of the family's module
  (every leaf an nnx.Param; a QuantizedWeight stays one value)."""
  return nnx.State(_as_variables(params))


def _as_values(node: Any) -> Any:
  if isinstance(node, nnx.Variable):
    return value_of(node)
  keys = list(node.keys())
  if keys and all(isinstance(k, int) for k in keys):
    return [_as_values(node[i]) for i in sorted(keys)]
  return {key: _as_values(node[key]) for key in keys}


def state_to_params(state: nnx.State) -> Params:
  """The inverse of `params_to_state`: an nnx.State (e.g. `nnx.state(module)`) -> dict params
  (int-keyed levels become lists)."""
  return _as_values(state)
