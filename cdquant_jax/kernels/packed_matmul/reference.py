"""The specification of `packed_matmul`: dequantize the same container, multiply in f32.

`packed_matmul_reference(x, qw)` = x @ qweight.dequantize(qw)ᵀ in f32 at Precision.HIGHEST
(qweight.matmul_reference). Every implementation is tested against it, so the kernel tests
measure kernel error only, never quantization error (tokamax ragged_dot convention).
"""

from __future__ import annotations

import jax

from cdquant_jax.quant.qweight import QuantizedWeight, matmul_reference


@jax.jit
def packed_matmul_reference(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """x [B, d_in] (any float dtype) -> f32 [B, d_out] = x @ dequantize(qw)ᵀ, HIGHEST precision."""
  return matmul_reference(x, qw)
