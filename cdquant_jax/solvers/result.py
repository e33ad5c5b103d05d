"""What every solver returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.quant.grids import Grid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SolveResult:
  """A quantized layer.

  Invariant (checked in tests): Q == dequantize(codes, grid) wherever `outlier_mask` is False;
  at outliers Q holds the kept full-precision value.

  Attributes:
    Q: [d_out, d_in] f32 dequantized weights, ORIGINAL column order.
    codes: [d_out, d_in] int32 integer codes in [0, maxq], original column order.
    grid: the grid (scale, zero [d_out, n_groups]; group_index [d_in] in original order).
    perm: [d_in] int32 processing order (column perm[j] was processed j-th); identity if none.
    objective: f32 scalar tr((W − Q) H (W − Q)ᵀ) on the undamped H given to the solver.
    outlier_mask: [d_out, d_in] bool, weights kept in full precision (all False but for SpQR).
    diagnostics: method-specific arrays (e.g. the damping used, per-step objective traces).
    extras: method-specific format arrays (e.g. SpQR's second-level statistics).
  """

  Q: jax.Array
  codes: jax.Array
  grid: Grid
  perm: jax.Array
  objective: jax.Array
  outlier_mask: jax.Array
  diagnostics: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def bits(self) -> int:
    return int(self.grid.maxq + 1).bit_length() - 1

  def replace(self, **changes) -> "SolveResult":
    return dataclasses.replace(self, **changes)


def no_outliers(W: jax.Array) -> jax.Array:
  """[d_out, d_in] all-False outlier mask."""
  return jnp.zeros(W.shape, dtype=bool)


def identity_perm(d_in: int) -> jax.Array:
  return jnp.arange(d_in, dtype=jnp.int32)
