"""SpQR group statistics: first level, second level ("qq") and the leave-one-out outlier screen.

Follows the reference `quant_groups.Quantizer.find_params` and `spqr_engine.get_leave_one_out_error`
(algorithms.md 2.1, 2.3). For one group of β1 input columns:

  first level   per row: min-max (scale, zero) of the group, SpQR flavour (fractional zero unless
                round_zero; 0 not forced into the range);
  second level  the [d_out] scale vector is cut into runs of β2 consecutive rows; each run gets its
                own asymmetric min-max quantizer with `qq_scale_bits` bits (codes + fp16 (scale,
                zero)); the first-level scale is replaced by its dequantized value. Same for the
                zero points with `qq_zero_bits` (symmetric iff qq_zero_sym), applied iff
                qq_zero_bits is set and (not round_zero or qq_zero_bits < bits).

Deviation (flag `fp16_storage`): the reference stores second-level statistics (and unquantized
first-level statistics) as float16 but quantizes with the float32 values; with the flag the values
are rounded to float16 first, so the statistics used are exactly the ones stored.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cdquant_jax.quant.grids import (Flavor, GridConfig, codes_of, dequantize_codes,
                                     fake_quantize, minmax_params, through_fp16)


@dataclasses.dataclass(frozen=True)
class StatsConfig:
  """Static description of the SpQR quantizer of one group (hashable, derived from SpQRConfig)."""

  bits: int
  sym: bool
  round_zero: bool
  qq_scale_bits: int | None
  qq_zero_bits: int | None
  qq_groupsize: int
  qq_zero_sym: bool
  fp16_storage: bool

  @property
  def quantize_scale(self) -> bool:
    return self.qq_scale_bits is not None

  @property
  def quantize_zero(self) -> bool:
    return self.qq_zero_bits is not None and (not self.round_zero or self.qq_zero_bits < self.bits)

  def first_level(self) -> GridConfig:
    return GridConfig(bits=self.bits, sym=self.sym, flavor=Flavor.SPQR, round_zero=self.round_zero)

  def plain(self) -> GridConfig:
    """The quantizer of the leave-one-out screen: no round_zero, no second level."""
    return GridConfig(bits=self.bits, sym=self.sym, flavor=Flavor.SPQR)


class GroupStats(NamedTuple):
  """Statistics of one group. Unused second-level fields are zeros.

  Attributes:
    scale, zero: [d_out] dequantized first-level statistics used to quantize the group.
    scale_codes, zero_codes: [d_out] int32 second-level codes.
    scale_qq_scale, scale_qq_zero, zero_qq_scale, zero_qq_zero: [d_out // β2] second-level
      (scale, zero) of the scales and of the zeros.
  """

  scale: jax.Array
  zero: jax.Array
  scale_codes: jax.Array
  zero_codes: jax.Array
  scale_qq_scale: jax.Array
  scale_qq_zero: jax.Array
  zero_qq_scale: jax.Array
  zero_qq_zero: jax.Array


def second_level(x: jax.Array, bits: int, sym: bool, groupsize: int,
                 fp16: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Quantizes a per-row statistic in runs of `groupsize` consecutive rows.

  Args:
    x: [d_out] statistic (first-level scales or zeros).
    bits: second-level bits.
    sym: symmetric second-level grid.
    groupsize: β2, rows per run (divides d_out).
    fp16: round the second-level (scale, zero) to float16 before using them.
  Returns:
    (dequantized x [d_out], codes [d_out] int32, scale [d_out // β2], zero [d_out // β2]).
  """
  cfg = GridConfig(bits=bits, sym=sym, flavor=Flavor.SPQR, fp16_stats=fp16)
  # [d_out] -> [d_out // β2, β2]
  runs = x.reshape(-1, groupsize)
  s2, z2 = minmax_params(runs, cfg)
  codes = codes_of(runs, s2[:, None], z2[:, None], cfg.maxq, Flavor.SPQR)
  deq = dequantize_codes(codes, s2[:, None], z2[:, None])
  return deq.reshape(x.shape), codes.reshape(x.shape).astype(jnp.int32), s2, z2


def group_stats(Wg: jax.Array, cfg: StatsConfig) -> GroupStats:
  """SpQR `find_params` on one group (both levels).

  Args:
    Wg: [d_out, g] weights of the group (already screened of likely outliers).
    cfg: quantizer config.
  Returns:
    GroupStats; `scale`/`zero` are the values the group is quantized with.
  """
  d_out = Wg.shape[0]
  scale, zero = minmax_params(Wg, cfg.first_level())
  zeros_i = jnp.zeros((d_out,), jnp.int32)
  zeros_2 = jnp.zeros((d_out // cfg.qq_groupsize,), Wg.dtype)
  scale_codes, s_s2, s_z2 = zeros_i, zeros_2, zeros_2
  zero_codes, z_s2, z_z2 = zeros_i, zeros_2, zeros_2
  if cfg.quantize_scale:
    scale, scale_codes, s_s2, s_z2 = second_level(scale, cfg.qq_scale_bits, False,
                                                  cfg.qq_groupsize, cfg.fp16_storage)
  elif cfg.fp16_storage:
    scale = through_fp16(scale)
  if cfg.quantize_zero:
    zero, zero_codes, z_s2, z_z2 = second_level(zero, cfg.qq_zero_bits, cfg.qq_zero_sym,
                                                cfg.qq_groupsize, cfg.fp16_storage)
  elif cfg.fp16_storage:
    zero = through_fp16(zero)
  return GroupStats(scale, zero, scale_codes, zero_codes, s_s2, s_z2, z_s2, z_z2)


def _leave_one_out_ranges(Wg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Min-max ranges of every leave-one-out subset of each row, without forming the subsets.

  Leaving out weight j changes the row's range only when j is the (first) argmin or argmax, so
  there are three candidate ranges per row: all weights, without the argmin, without the argmax.

  Args:
    Wg: [d_out, g] group weights.
  Returns:
    (lo, hi) [d_out, 3] ranges of (all, without argmin, without argmax), and the argmin and
    argmax columns [d_out].
  """
  g = Wg.shape[1]
  cols = jnp.arange(g)[None, :]
  i_min, i_max = jnp.argmin(Wg, axis=1), jnp.argmax(Wg, axis=1)
  xmin, xmax = jnp.min(Wg, axis=1), jnp.max(Wg, axis=1)
  min_wo = jnp.min(jnp.where(cols == i_min[:, None], jnp.inf, Wg), axis=1)
  max_wo = jnp.max(jnp.where(cols == i_max[:, None], -jnp.inf, Wg), axis=1)
  lo = jnp.stack([xmin, min_wo, xmin], axis=1)
  hi = jnp.stack([xmax, xmax, max_wo], axis=1)
  return lo, hi, i_min, i_max


def leave_one_out_reduction(Wg: jax.Array, u: jax.Array, cfg: StatsConfig) -> jax.Array:
  """Reduction of the group's diag-weighted error from leaving each weight out of the fit.

  Same values as fitting a plain min-max quantizer on each of the g leave-one-out subsets
  (the reference's [d_out, g, g − 1] gather), computed from the three distinct ranges.

  Args:
    Wg: [d_out, g] group weights.
    u: [g] diagonal of the inverse-Hessian Cholesky factor U on the group's columns.
    cfg: quantizer config (bits and sym are used; plain quantizer, no second level).
  Returns:
    [d_out, g] base_error − loo_error_j (larger = weight j is more outlier-like).
  """
  g = Wg.shape[1]
  plain = cfg.plain()
  lo, hi, i_min, i_max = _leave_one_out_ranges(Wg)
  # [d_out, 3] ranges -> [d_out, 3, 2] so that the min-max fit sees exactly (lo, hi).
  scale, zero = minmax_params(jnp.stack([lo, hi], axis=-1), plain)
  # Squared scaled errors of every weight under each candidate fit: [d_out, 3, g].
  xq = fake_quantize(Wg[:, None, :], scale[..., None], zero[..., None], plain.maxq,
                     plain.flavor)
  err = jnp.square((xq - Wg[:, None, :]) / u)
  cols = jnp.arange(g)
  # Fit used when leaving out j: [d_out, g] in {0, 1, 2}.
  which = jnp.where(cols[None, :] == i_min[:, None], 1,
                    jnp.where(cols[None, :] == i_max[:, None], 2, 0))
  # [d_out, 3, g] -> [d_out, g (left out j), g (k)] errors under fit(j), k == j excluded.
  err_j = jnp.take_along_axis(err, which[:, :, None], axis=1)
  loo_err = jnp.sum(jnp.where(cols[:, None] == cols[None, :], 0.0, err_j), axis=-1)
  base_err = jnp.sum(err[:, 0, :], axis=-1)
  return base_err[:, None] - loo_err


def screen_outliers(Wg: jax.Array, u: jax.Array, tau_abs: jax.Array,
                    cfg: StatsConfig) -> jax.Array:
  """Replaces likely outliers by the mean of their row's other weights (before the group fit).

  Args:
    Wg: [d_out, g] group weights.
    u: [g] diag of U on the group's columns.
    tau_abs: absolute outlier threshold (scalar).
    cfg: quantizer config.
  Returns:
    [d_out, g] weights to fit the group statistics on.
  """
  likely = leave_one_out_reduction(Wg, u, cfg) > tau_abs
  keep = (~likely).astype(Wg.dtype)
  count = jnp.maximum(jnp.sum(keep, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(Wg * keep, axis=1, keepdims=True) / count
  return jnp.where(likely, mean, Wg)
