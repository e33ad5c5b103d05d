"""`QuantizedLinear`: an NNX module running a packed `QuantizedWeight` (in place of a linear).

The packed arrays are `QuantArray` variables (not `nnx.Param`: optimizers and `nnx.Param`
filters leave them alone), so `nnx.split` / `nnx.merge` / `nnx.jit` / `nnx.state` see them as
state; the `QuantMeta`, the `EinsumLayout` and the `LinearOptions` are static attributes (part
of the graphdef). The call goes through the zoo's one linear, `models.layers.linear`, i.e. the
packed_matmul dispatch (`kernels/packed_matmul`, "auto" = Pallas on a GPU, the reference
elsewhere).

Supported source modules (`SUPPORTED`): `nnx.Linear` (kernel [d_in, d_out]: W is its transpose),
`nnx.Einsum` with a linear einsum (`layout.EinsumLayout`, e.g. gemma-style "BTD,NDH->BTNH") and
the zoo's `models.modules.Linear` (weight W [d_out, d_in] itself; its path in the block is kept,
so the swapped module still answers the block's `layers.LinearRecorder`). A zoo Linear may
also hold a packed weight directly (the dict pipeline's form); `is_quantized` covers both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdquant_jax.models import layers, modules
from cdquant_jax.nnx.layout import EinsumLayout, linear_layout
from cdquant_jax.quant import qweight as qweight_lib
from cdquant_jax.quant.qweight import QuantizedWeight, QuantMeta

SUPPORTED = (nnx.Linear, nnx.Einsum, modules.Linear)
# The zoo Linear's weight [d_out, d_in] as an einsum kernel (W is the kernel itself).
ZOO_LINEAR_EINSUM = "...i,oi->...o"


class QuantArray(nnx.Variable):
  """One packed array of a `QuantizedWeight` (codes, stats, perm, outliers)."""


def layout_of(module: nnx.Module) -> EinsumLayout:
  """The einsum layout of a supported linear module (ValueError for another type)."""
  if isinstance(module, nnx.Linear):
    return linear_layout(module.in_features, module.out_features)
  if isinstance(module, nnx.Einsum):
    return EinsumLayout(module.einsum_str, tuple(module.kernel[...].shape))
  if isinstance(module, modules.Linear):
    return EinsumLayout(ZOO_LINEAR_EINSUM, tuple(modules.value_of(module.weight).shape))
  raise ValueError(f"{type(module).__name__} is not a supported linear "
                   f"({', '.join(t.__name__ for t in SUPPORTED)})")


def weight_of(module: nnx.Module) -> jax.Array:
  """W [d_out, d_in] of a supported linear module (for nnx.Linear: kernel [d_in, d_out]ᵀ)."""
  kernel = (modules.value_of(module.weight) if isinstance(module, modules.Linear)
            else module.kernel[...])
  return layout_of(module).weight(kernel)


def is_quantized(module: nnx.Module) -> bool:
  """A QuantizedLinear, or a zoo Linear holding a packed QuantizedWeight."""
  return isinstance(module, QuantizedLinear) or (
      isinstance(module, modules.Linear)
      and isinstance(modules.value_of(module.weight), QuantizedWeight))


def flat_bias(module: nnx.Module, layout: EinsumLayout) -> jax.Array | None:
  """The module's bias as [d_out] in W's row order (None without a bias)."""
  bias = getattr(module, "bias", None)
  if bias is None:
    return None
  value = bias[...]
  out_features = "".join(c for c in layout.out_labels if c in layout.features)
  # [bias_shape] -> [features in output order]
  value = value.reshape([layout.size(c) for c in out_features])
  if out_features != layout.features:
    # [features in output order] -> [features in kernel order] (a transpose)
    value = jnp.einsum(f"{out_features}->{layout.features}", value)
  # [features...] -> [d_out]
  return value.reshape(layout.d_out)


class QuantizedLinear(nnx.Module):
  """y = layout(x) @ dequantize(qweight)ᵀ (+ bias), run by the packed_matmul dispatch.

  Attributes:
    meta: the `QuantMeta` (static).
    layout: the source module's `EinsumLayout` (static; the plain linear for nnx.Linear).
    options: `LinearOptions`, which packed_matmul implementation runs the weight (static).
    dtype: the source module's computation dtype (None: the input's), static.
    path: the source zoo Linear's path in its block (the `layers.LinearRecorder` key), else ().
    <field>: a `QuantArray` per stored array of the container (`QuantizedWeight.arrays`).
    bias: `nnx.Param` [d_out] in W's row order, or None.
  """

  def __init__(self, qweight: QuantizedWeight, layout: EinsumLayout,
               bias: jax.Array | None = None, *, dtype=None,
               options: layers.LinearOptions = layers.LinearOptions(), path: tuple = ()):
    if qweight.shape != (layout.d_out, layout.d_in):
      raise ValueError(f"QuantizedLinear: weight shape {qweight.shape} does not match the "
                       f"layout {layout.einsum_str!r} [d_out={layout.d_out}, d_in={layout.d_in}]")
    self.meta = qweight.meta
    self.layout = layout
    self.options = options
    self.dtype = dtype
    self.path = tuple(path)
    self.fields = tuple(qweight.arrays())
    for name, array in qweight.arrays().items():
      setattr(self, name, QuantArray(array))
    self.bias = nnx.data(None) if bias is None else nnx.Param(bias)

  @classmethod
  def from_linear(cls, linear: nnx.Module, qweight: QuantizedWeight, *,
                  options: layers.LinearOptions = layers.LinearOptions()) -> "QuantizedLinear":
    """From an nnx.Linear / nnx.Einsum and the packed W [d_out, d_in] (bias copied)."""
    layout = layout_of(linear)
    return cls(qweight, layout, flat_bias(linear, layout), dtype=getattr(linear, "dtype", None),
               options=options, path=getattr(linear, "path", ()))

  @classmethod
  def placeholder(cls, meta: QuantMeta, layout: EinsumLayout, bias_dtype: str | None, *,
                  dtype=None, options: layers.LinearOptions = layers.LinearOptions(),
                  path: tuple = ()) -> "QuantizedLinear":
    """Zero arrays of the shapes `meta` prescribes (a restore target under nnx.eval_shape)."""
    arrays = {name: jnp.zeros(shape, dtype_name)
              for name, (shape, dtype_name) in qweight_lib.expected_shapes(meta).items()}
    bias = None if bias_dtype is None else jnp.zeros((layout.d_out,), bias_dtype)
    return cls(QuantizedWeight(**arrays, meta=meta), layout, bias, dtype=dtype, options=options,
               path=path)

  @property
  def qweight(self) -> QuantizedWeight:
    """The container rebuilt from the variables."""
    return QuantizedWeight(**{name: getattr(self, name)[...] for name in self.fields},
                           meta=self.meta)

  def dequantized(self) -> jax.Array:
    """W [d_out, d_in] f32."""
    return qweight_lib.dequantize(self.qweight)

  def __call__(self, x: jax.Array, recorder: layers.LinearRecorder | None = None) -> jax.Array:
    """x [lhs...] (for a source nnx.Linear: [..., d_in]) -> [out...] ([..., d_out]); a zoo
    block's `recorder` may record or replace x, as for the zoo Linear."""
    if recorder is not None:
      x = recorder(self.path, x)
    x2 = self.layout.flatten_input(x)  # [batch..., d_in]
    if self.dtype is not None:
      x2 = x2.astype(self.dtype)
    p = {"weight": self.qweight}
    if self.bias is not None:
      p["bias"] = self.bias[...]
    # [batch..., d_in] -> [batch..., d_out] -> [out...]
    return self.layout.unflatten_output(layers.linear(x2, p, self.options))


def bias_dtype_name(module: QuantizedLinear) -> str | None:
  """numpy dtype name of the module's bias (None without one), for the saved metadata."""
  return None if module.bias is None else np.dtype(module.bias[...].dtype).name
