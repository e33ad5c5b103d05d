"""What every solver returns."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant.grids import Grid
from cdquant_jax.solvers.diagnostics import Diagnostics


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRStats:
  """SpQR's second-level statistics: the first-level scale / zero stored as codes.

  The dequantized first-level statistic of row r, group g is
      s2[r // qq_groupsize, g] · (codes[r, g] − z2[r // qq_groupsize, g])   (f32)
  and equals `grid.scale` / `grid.zero` of the result. A level kept unquantized (its qq bits
  None in the config) has its three arrays None and its bits 0.

  Attributes:
    scale_codes, zero_codes: [d_out, n_groups] int32 codes in [0, 2^qq_bits).
    scale_qq_scale, scale_qq_zero, zero_qq_scale, zero_qq_zero: [d_out / qq_groupsize,
      n_groups] f32 second-level scale and zero.
    qq_scale_bits, qq_zero_bits: static code widths (0 = level unquantized).
    qq_groupsize: static, output rows sharing one second-level (scale, zero).
    groupsize: static, input columns per first-level group.
  """

  scale_codes: jax.Array | None = None
  scale_qq_scale: jax.Array | None = None
  scale_qq_zero: jax.Array | None = None
  zero_codes: jax.Array | None = None
  zero_qq_scale: jax.Array | None = None
  zero_qq_zero: jax.Array | None = None
  qq_scale_bits: int = dataclasses.field(default=0, metadata=dict(static=True))
  qq_zero_bits: int = dataclasses.field(default=0, metadata=dict(static=True))
  qq_groupsize: int = dataclasses.field(default=0, metadata=dict(static=True))
  groupsize: int = dataclasses.field(default=0, metadata=dict(static=True))

  def level(self, which: str) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(codes, qq_scale, qq_zero) of the first-level "scale" or "zero"; None if unquantized."""
    codes = getattr(self, f"{which}_codes")
    if codes is None:
      return None
    return codes, getattr(self, f"{which}_qq_scale"), getattr(self, f"{which}_qq_zero")

  def bits(self, which: str) -> int:
    """Code width of the "scale" or "zero" level (0 = unquantized)."""
    return self.qq_scale_bits if which == "scale" else self.qq_zero_bits

  def arrays(self) -> dict[str, jax.Array]:
    """The present arrays by field name."""
    names = [f"{w}_{k}" for w in ("scale", "zero") for k in ("codes", "qq_scale", "qq_zero")]
    return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


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
    diagnostics: the solver's `Diagnostics` (damping used, objective traces, ...).
    spqr: SpQR's second-level statistics (None for every other method).
    method: static, the producing method's registry name. `api.solve` sets it; a solver
      called directly (`gptq(W, H, cfg)`) leaves "unknown", which packs all the same (the
      packed format needs only the grid and `spqr`; the name is recorded as metadata).
  """

  Q: jax.Array
  codes: jax.Array
  grid: Grid
  perm: jax.Array
  objective: jax.Array
  outlier_mask: jax.Array
  diagnostics: Diagnostics = dataclasses.field(default_factory=Diagnostics)
  spqr: SpQRStats | None = None
  method: str = dataclasses.field(default="unknown", metadata=dict(static=True))

  @property
  def bits(self) -> int:
    return int(self.grid.maxq + 1).bit_length() - 1

  def replace(self, **changes) -> "SolveResult":
    return dataclasses.replace(self, **changes)

  def rows(self, start: int, stop: int, W: jax.Array, H: jax.Array) -> "SolveResult":
    """Output rows [start, stop) of a row-separable solve (`api.ROW_SEPARABLE`) as a result of
    their own, with the objective of W [stop − start, d_in] (those rows' weights) on H.

    Per-row diagnostics (`steps`) are sliced; layer-wide ones (damping, traces, totals)
    describe the joint solve.
    """
    if self.spqr is not None:
      raise ValueError("SpQR results are not row-separable")
    return _rows(self, start, stop, W, H)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rows(result: SolveResult, start: int, stop: int, W: jax.Array, H: jax.Array) -> SolveResult:
  """`SolveResult.rows` as one program per shape and row range."""
  grid = dataclasses.replace(result.grid, scale=result.grid.scale[start:stop],
                             zero=result.grid.zero[start:stop])
  steps = result.diagnostics.steps
  Q = result.Q[start:stop]
  return result.replace(Q=Q, codes=result.codes[start:stop], grid=grid,
                        objective=layer_objective(W, Q, H),
                        outlier_mask=result.outlier_mask[start:stop],
                        diagnostics=result.diagnostics.replace(
                            steps=None if steps is None else steps[start:stop]))


def no_outliers(W: jax.Array) -> jax.Array:
  """[d_out, d_in] all-False outlier mask."""
  return jnp.zeros(W.shape, dtype=bool)


def identity_perm(d_in: int) -> jax.Array:
  return jnp.arange(d_in, dtype=jnp.int32)
