"""Functional building blocks under the zoo's NNX modules (modules.py): linear, norms, rope,
causal attention, the KV cache, and the `LinearRecorder` of a block's linear inputs.

Shapes: B batch, T new tokens, S key slots (T without a cache, max_len with one), D hidden,
H query heads, K key/value heads (H = K * G), Dh head dim, F MLP width, V vocabulary.

Every linear layer of every model is applied by `linear(x, p, options)` (called by
`modules.Linear`, `modules.Embedding.attend` and `nnx.QuantizedLinear`), with p the linear's
param dict {"weight": [d_out, d_in], optional "bias": [d_out]} (HF layout). Nothing else in the
forward pass reads a weight, so a quantized weight container only has to be handled here;
`LinearOptions` (held by the model) says which packed_matmul kernel runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax._numerics import HIGHEST
from cdquant_jax.models.params import get_path  # noqa: F401  (re-exported for callers)
from cdquant_jax.quant.qweight import QuantizedWeight

Params = dict[str, Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearOptions:
  """How `linear` runs a packed QuantizedWeight (dense weights ignore it). Hashable: a model
  holds one (`CausalLM.linear_options`) and is a static jit argument.

  implementation: the packed_matmul implementation, "auto" or a name of its registry
    ("reference", "pallas_triton", "pallas_mosaic"; kernels/packed_matmul: "auto" = Mosaic GPU
    on Hopper, Triton on other GPUs, the reference elsewhere); another name is a ValueError.
  interpret: run Pallas in interpret mode; None = only where there is no GPU.
  """

  implementation: str = "auto"
  interpret: bool | None = None

  def __post_init__(self):
    from cdquant_jax.kernels.packed_matmul import IMPLEMENTATIONS  # pylint: disable=import-outside-toplevel
    if self.implementation != "auto" and self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"LinearOptions.implementation: unknown {self.implementation!r}; choose "
                       f"'auto' or one of {sorted(IMPLEMENTATIONS)}")


def linear(x: jax.Array, p: Params, options: LinearOptions = LinearOptions()) -> jax.Array:
  """x @ weight.T (+ bias) with f32 accumulation, returned in x's dtype.

  Args:
    x: [..., d_in] activations.
    p: {"weight": [d_out, d_in] array or a packed QuantizedWeight (then the packed_matmul
      kernel `options` names runs), optional "bias": [d_out]}.
    options: the kernel for a packed weight.
  Returns:
    [..., d_out].
  """
  if isinstance(p["weight"], QuantizedWeight):
    from cdquant_jax.kernels.linear import quantized_linear  # pylint: disable=import-outside-toplevel
    return quantized_linear(x, p["weight"], p.get("bias"), implementation=options.implementation,
                            interpret=options.interpret)
  # [..., d_in] x [d_out, d_in] -> [..., d_out]
  y = jnp.einsum("...i,oi->...o", x, p["weight"], precision=HIGHEST,
                 preferred_element_type=jnp.float32)
  if "bias" in p:
    y = y + p["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


class LinearRecorder:
  """Records (capture) or replaces (given) the inputs of a block's linears, by path.

  A block's `modules.Linear` calls `recorder(path, x)` with its path in the block
  (("self_attn", "q_proj")) and input x [B, T, d_in], and runs on what it returns: given[path]
  when present (inputs computed earlier; under jit the computation of x is then dead code
  when nothing else uses it, which the pipeline relies on), else x. With capture=True,
  `inputs[path]` is that input (the Hessian input of the linear). Pure Python bookkeeping at
  trace time, one recorder per block call, so it works under jit.
  """

  def __init__(self, capture: bool = False, given: Mapping[Path, jax.Array] | None = None):
    self.given = given or {}
    self.inputs: dict[Path, jax.Array] | None = {} if capture else None

  def __call__(self, path: Path, x: jax.Array) -> jax.Array:
    x = self.given.get(path, x)
    if self.inputs is not None:
      self.inputs[path] = x
    return x


def rms_norm(x: jax.Array, p: Params, eps: float, offset: float = 0.0) -> jax.Array:
  """x / rms(x) * (offset + weight), computed in f32 (Gemma: offset 1). x: [..., D]."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * (offset + p["weight"].astype(jnp.float32))).astype(x.dtype)


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
  """(x - mean) / std * weight + bias, computed in f32. x: [..., D]."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["weight"].astype(jnp.float32)
  return (y + p["bias"].astype(jnp.float32)).astype(x.dtype)


def activation(x: jax.Array, name: str) -> jax.Array:
  if name == "silu":
    return jax.nn.silu(x)
  if name == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unknown activation {name!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout (first half / second half of each head).

  Args:
    x: [B, T, N, Dh] queries or keys.
    positions: [B, T] integer positions.
    inv_freq: [Dh // 2] inverse frequencies.
  """
  # [B, T, Dh/2] angles in radians, then [B, T, 1, Dh] to broadcast over heads.
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def causal_mask(query_slots: jax.Array, num_slots: int, window: int | None) -> jax.Array:
  """[T, S] bool: key slot s visible from query slot q iff s <= q (and s > q - window)."""
  key_slots = jnp.arange(num_slots)[None, :]
  q = query_slots[:, None]
  mask = key_slots <= q
  if window is not None:
    mask = mask & (key_slots > q - window)
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              softcap: float | None = None) -> jax.Array:
  """Grouped-query softmax attention; scores and softmax in f32.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H = K * G (query head h uses kv head h // G).
    mask: [T, S] bool, True where attention is allowed.
    scale: multiplier of q . k; softcap: Gemma-2 tanh soft-capping of the scaled scores.
  Returns:
    [B, T, H, Dh] in q's dtype.
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  # [B, T, H, Dh] -> [B, T, K, G, Dh]
  qg = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  # [B, T, K, G, Dh] x [B, S, K, Dh] -> [B, K, G, T, S]
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=HIGHEST,
                      preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # [B, K, G, T, S] x [B, S, K, Dh] -> [B, T, K, G, Dh]
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=HIGHEST,
                   preferred_element_type=jnp.float32)
  # [B, T, K, G, Dh] -> [B, T, H, Dh]
  return out.reshape(b, t, h, dh).astype(q.dtype)


def init_layer_cache(batch: int, max_len: int, kv_heads: int, head_dim: int,
                     dtype) -> Params:
  """Empty KV cache of one layer: {"k", "v": [B, max_len, K, Dh], "end": int32 scalar}.

  Slot s holds the key/value of absolute position s; `end` is the number of filled slots.
  """
  shape = (batch, max_len, kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "end": jnp.zeros((), jnp.int32)}


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: Params | None, *,
                     scale: float, softcap: float | None, window: int | None
                     ) -> tuple[jax.Array, Params | None]:
  """Causal attention of T new tokens, optionally appended to a KV cache first.

  Args:
    q: [B, T, H, Dh]; k, v: [B, T, K, Dh] (rope already applied).
    cache: None (the T tokens are the whole sequence) or `init_layer_cache`'s pytree.
  Returns:
    ([B, T, H, Dh], updated cache or None).
  """
  t = q.shape[1]
  if cache is None:
    mask = causal_mask(jnp.arange(t), t, window)
    return attention(q, k, v, mask, scale, softcap), None
  start = cache["end"]
  keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
  values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
  mask = causal_mask(start + jnp.arange(t), keys.shape[1], window)
  out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale, softcap)
  return out, {"k": keys, "v": values, "end": start + t}


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap
