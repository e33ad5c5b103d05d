"""The specification of `packed_matmul`: dequantize the same container, multiply in f32.

`packed_matmul_reference(x, qw)` = x @ qweight.dequantize(qw)ᵀ in f32 at Precision.HIGHEST, the
one reference of the packed matmul. Every implementation is tested against it, so the kernel
tests measure kernel error only, never quantization error (tokamax ragged_dot convention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cdquant_jax.quant.qweight import QuantizedWeight, dequantize


@jax.jit
def packed_matmul_reference(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """x [..., d_in] (any float dtype) -> f32 [..., d_out] = x @ dequantize(qw)ᵀ, HIGHEST."""
  return jnp.matmul(x.astype(jnp.float32), dequantize(qw).T, precision=jax.lax.Precision.HIGHEST)
