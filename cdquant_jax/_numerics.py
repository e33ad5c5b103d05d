"""Numerical helpers shared by every solver: full-precision matmuls and the layer objective.

Glossary (used across the package, kept from the GPTQ/SpQR papers):
  W     [d_out, d_in]  weight in PyTorch Linear layout (row = output channel, column = input feature)
  Q     [d_out, d_in]  dequantized (quantized-then-reconstructed) weight
  H     [d_in, d_in]   layer Hessian 2 X Xᵀ / n (GPTQ convention), symmetric positive semi-definite
  L(Q)  tr((W − Q) H (W − Q)ᵀ), the layer objective (output error) in units of H × weight²
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

# Matmul with exact f32 accumulation (the default on GPUs is TF32-like; GPTQ disables TF32 too).
hdot = functools.partial(jnp.matmul, precision=HIGHEST)


def row_objectives(W: jax.Array, Q: jax.Array, H: jax.Array) -> jax.Array:
  """Per-row layer objective (w_r − q_r)ᵀ H (w_r − q_r).

  Args:
    W: [d_out, d_in] reference weight.
    Q: [d_out, d_in] quantized weight.
    H: [d_in, d_in] Hessian.
  Returns:
    [d_out] objectives in the units of H × weight².
  """
  dtype = jnp.result_type(W, Q, H, jnp.float32)  # f32, or f64 under x64 with f64 inputs
  E = (W - Q).astype(dtype)
  # [d_out, d_in] @ [d_in, d_in] -> [d_out, d_in], then a row-wise dot with E.
  return jnp.sum(hdot(E, H.astype(dtype)) * E, axis=1)


@jax.jit
def layer_objective(W: jax.Array, Q: jax.Array, H: jax.Array) -> jax.Array:
  """tr((W − Q) H (W − Q)ᵀ) as an f32 scalar (see `row_objectives`)."""
  return jnp.sum(row_objectives(W, Q, H))


@jax.jit
def reference_energy(W: jax.Array, H: jax.Array) -> jax.Array:
  """tr(W H Wᵀ): the objective of the all-zero weight; normaliser of the relative objective."""
  return jnp.sum(row_objectives(W, jnp.zeros_like(W), H))
