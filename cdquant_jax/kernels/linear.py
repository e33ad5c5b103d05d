"""`quantized_linear`: the models' linear layer on a packed `QuantizedWeight`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cdquant_jax.kernels.packed_matmul import BlockConfig, packed_matmul
from cdquant_jax.quant.qweight import QuantizedWeight


def quantized_linear(x: jax.Array, qw: QuantizedWeight, bias: jax.Array | None = None, *,
                     implementation: str | None = None, interpret: bool | None = None,
                     config: BlockConfig = BlockConfig()) -> jax.Array:
  """x [..., d_in] @ dequantize(qw)ᵀ (+ bias) -> [..., d_out] in x's dtype (f32 accumulation).

  Same contract as models.layers.linear on a dense {"weight", "bias"}; the leading dims are
  flattened into the kernel's batch (decode: B = batch; prefill: B = batch · T, which takes the
  dequantize + dense-dot path above BlockConfig.max_batch).
  """
  lead, d_in = x.shape[:-1], x.shape[-1]
  # [..., d_in] -> [M, d_in]
  y = packed_matmul(x.reshape(-1, d_in), qw, implementation=implementation,
                    interpret=interpret, config=config)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  # [M, d_out] -> [..., d_out]
  return y.astype(x.dtype).reshape(*lead, qw.meta.d_out)
