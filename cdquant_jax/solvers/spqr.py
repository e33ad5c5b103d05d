"""SpQR (Dettmers et al. 2023): GPTQ sweep with bilevel group statistics and unstructured outliers.

Exactly the reference `SPQRUtil.quantize` (algorithms.md 2.2, Vahe1994/SpQR spqr_engine.py):
  1. permute columns (identity or act_order = descending diag H);
  2. damp H by percdamp · mean |diag H| *then* overwrite dead diagonals with 1 (SpQR's order);
  3. U = upper Cholesky factor of H⁻¹; outlier scale = mean_c var_rows(W[:, c]) / U_cc² (unbiased
     variance, before any update); τ_abs = outlier_threshold · outlier scale;
  4. column sweep in blocks; at each group start the group statistics are fitted on the fully
     updated weights of the group (leave-one-out screen of likely outliers, then the two-level
     SpQR quantizer, see spqr_stats.py); every column is quantized, weights whose OBS saliency
     ((w − q) / U_cc)² exceeds τ_abs are kept as outliers (no error propagated from them), and
     the error of the others is propagated to the later columns through U.

Loop structure (never unrolled over columns): lax.fori_loop over blocks of `blocksize` columns →
fori_loop over segments of min(groupsize, blocksize) columns (group statistics at segment starts)
→ fori_loop over the segment's columns. Inside a block the updates are written eagerly into the
block; after it, one [d_in, B] @ [B, d_out] matmul (masked to the later columns) updates the rest.
The sweep works on Wᵀ so that a column is a contiguous row.

Deviation from the reference, behind `grid.fp16_stats` (default True; False = the reference):
statistics that are stored as float16 (second-level statistics, unquantized first-level ones) are
rounded to float16 before use, and outlier values are rounded to float16 (the small rounding error
of an outlier is then propagated like any quantization error).

Known reference quirk kept on purpose: with sym=True the first-level zero is the constant
(maxq+1)/2, and quantizing it at the second level (qq_zero_bits set) degenerates the range to
(−1, 1) exactly as in the reference.

percdamp: default 1.0 is the SpQR README headline command; the reference CLI default is 0.01.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import hdot, layer_objective
from cdquant_jax.quant.grids import Flavor, Grid, GridConfig, codes_of, dequantize_codes
from cdquant_jax.solvers import hessian, padding
from cdquant_jax.solvers.diagnostics import Damping, Diagnostics
from cdquant_jax.solvers.result import SolveResult, SpQRStats
from cdquant_jax.solvers.spqr_stats import (GroupStats, StatsConfig, group_stats,
                                            screen_outliers)

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecondLevelConfig:
  """SpQR's second level: the per-row first-level scales / zeros quantized over β2 rows."""

  # Bits of the second-level codes of the scales / zeros; None = kept unquantized (float16).
  scale_bits: int | None = 3
  zero_bits: int | None = 3
  # β2: consecutive output rows sharing one second-level (scale, zero); must divide d_out
  # whenever a second level is used (no padding of rows).
  group_size: int = 16
  # Symmetric second-level grid of the zero points.
  zero_sym: bool = False

  def __post_init__(self):
    check = config_lib.reject_unless
    for name in ("scale_bits", "zero_bits"):
      v = getattr(self, name)
      check(v is None or (isinstance(v, int) and 1 <= v <= 8),
            f"{name} must be None or an integer in [1, 8], got {v!r}")
    check(self.group_size > 0, f"group_size must be positive, got {self.group_size}")
    check(self.used or self.group_size == 16,
          "group_size only applies when scale_bits or zero_bits is set")
    check(self.zero_bits is not None or not self.zero_sym,
          "zero_sym=True only applies when zero_bits is set")

  @property
  def used(self) -> bool:
    return self.scale_bits is not None or self.zero_bits is not None


# SpQR's first level: the README "near-lossless" command at 3 bits (β1 = 16), statistics
# rounded to float16 before use (see the module docstring; fp16_stats=False is the reference).
SPQR_GRID = GridConfig(bits=3, group_size=16, flavor=Flavor.SPQR, fp16_stats=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRConfig:
  """SpQR configuration (defaults: the README "near-lossless" command at 3 bits)."""

  # First level: bits, β1 = grid.group_size input columns per group (-1 = one per row), sym,
  # round_zero, fp16_stats (round stored statistics and outlier values to float16 before use).
  # Flavour SpQR and the min-max range only.
  grid: GridConfig = SPQR_GRID
  # Second level (β2, bits, zero_sym).
  qq: SecondLevelConfig = SecondLevelConfig()
  # Relative outlier threshold τ; math.inf disables outliers.
  outlier_threshold: float = 0.2
  # Process columns by descending diag(H) (SpQR's permutation_order="act_order").
  act_order: bool = True
  # Relative damping (SpQR README headline 1.0; reference CLI default 0.01).
  percdamp: float = 1.0
  # Columns per block of the sweep (affects speed only, not the result).
  blocksize: int = 128
  # Skip the leave-one-out screen before each group fit (outliers on only).
  simplified_outliers: bool = False
  # Damping escalations (×10 each) tried when the Cholesky fails.
  max_damp_escalations: int = 4

  def __post_init__(self):
    check = config_lib.reject_unless
    check(self.grid.flavor == Flavor.SPQR, "grid.flavor must be 'spqr' for SpQR")
    check(self.grid.scale_search == "minmax",
          f"grid.scale_search must be 'minmax' for SpQR, got {self.grid.scale_search!r}")
    check(self.grid.bits >= 2, f"grid.bits must be in [2, 8], got {self.grid.bits}")
    check(self.outlier_threshold >= 0,
          f"outlier_threshold must be >= 0 (inf disables), got {self.outlier_threshold}")
    check(self.detect_outliers or not self.simplified_outliers,
          "simplified_outliers=True needs outliers (a finite outlier_threshold)")
    check(self.percdamp >= 0, f"percdamp must be >= 0, got {self.percdamp}")
    check(self.blocksize > 0, f"blocksize must be positive, got {self.blocksize}")
    check(self.max_damp_escalations >= 0,
          f"max_damp_escalations must be >= 0, got {self.max_damp_escalations}")

  @property
  def maxq(self) -> int:
    return self.grid.maxq

  @property
  def detect_outliers(self) -> bool:
    return not math.isinf(self.outlier_threshold)

  def columns_per_group(self, d_in: int) -> int:
    return d_in if self.grid.group_size == -1 else self.grid.group_size

  def block_size(self, d_in: int) -> int:
    return min(self.blocksize, d_in)

  def stats_config(self) -> StatsConfig:
    g, qq = self.grid, self.qq
    return StatsConfig(bits=g.bits, sym=g.sym, round_zero=g.round_zero,
                       qq_scale_bits=qq.scale_bits, qq_zero_bits=qq.zero_bits,
                       qq_groupsize=qq.group_size, qq_zero_sym=qq.zero_sym,
                       fp16_storage=g.fp16_stats)

  def validate(self, d_out: int, d_in: int, layer: str = "?") -> None:
    """Shape checks: raises ConfigError naming the layer and the field."""
    bad = lambda msg: config_lib.ConfigError(f"layer {layer} [{d_out}x{d_in}]: SpQRConfig.{msg}")
    g = self.columns_per_group(d_in)
    if d_in % g:
      raise bad(f"grid.group_size must be -1 or a positive divisor of d_in={d_in}, "
                f"got {self.grid.group_size}")
    b = self.block_size(d_in)
    if not (b % g == 0 or g % b == 0 or g == d_in):
      raise bad(f"grid.group_size {g} and blocksize {b} must divide one another so that no "
                f"group straddles a block boundary")
    if self.qq.used and d_out % self.qq.group_size:
      raise bad(f"qq.group_size must be a positive divisor of d_out={d_out}, "
                f"got {self.qq.group_size} (pad the layer's rows first)")


# ----------------------------------------------------------------------------------------------
# The jitted sweep.


@dataclasses.dataclass(frozen=True)
class _Sweep:
  """Static shape of the sweep (hashable jit argument)."""

  stats: StatsConfig
  maxq: int
  groupsize: int
  blocksize: int
  detect: bool
  screen: bool


def _fit(Wg: jax.Array, ug: jax.Array, tau_abs: jax.Array, sw: _Sweep) -> GroupStats:
  """Statistics of one group from its fully updated weights Wg [d_out, g], ug = diag U [g]."""
  if sw.screen:
    Wg = screen_outliers(Wg, ug, tau_abs, sw.stats)
  return group_stats(Wg, sw.stats)


def _store(tables: GroupStats, stats: GroupStats, k: jax.Array) -> GroupStats:
  """Writes one group's statistics (vectors) into row k of the [n_groups, ·] tables."""
  return GroupStats(*(t.at[k].set(s) for t, s in zip(tables, stats)))


def _quantize_column(w, u_jj, stats: GroupStats, tau_abs, sw: _Sweep):
  """One column: (new value q, code, outlier flag, scaled error (w − q) / U_jj), each [d_out]."""
  code = codes_of(w, stats.scale, stats.zero, sw.maxq, Flavor.SPQR)
  q = dequantize_codes(code, stats.scale, stats.zero)
  if not sw.detect:
    is_out = jnp.zeros(w.shape, bool)
  else:
    is_out = jnp.square((w - q) / u_jj) > tau_abs
    kept = w
    if sw.stats.fp16_storage:
      # The packed format stores an outlier as a float16 correction added to the dense value of
      # its code: keep exactly dense + f16(w − dense), so packing is lossless.
      kept = q + jnp.clip(w - q, -FP16_MAX, FP16_MAX).astype(jnp.float16).astype(w.dtype)
    q = jnp.where(is_out, kept, q)
  return q, code.astype(jnp.int32), is_out, (w - q) / u_jj


def _sweep_block(i, carry, U, u, tau_abs, sw: _Sweep):
  """Quantizes block i (columns [i·B, (i+1)·B)) and propagates its error to later columns.

  Works on transposed weights WT [D, d_out] (a column of W is a contiguous row of WT).
  """
  WT, codes, mask, stats, tables = carry
  D, d_out = WT.shape
  B, g = sw.blocksize, sw.groupsize
  b = i * B
  if g > B:  # a group spans whole blocks: fit at the first block of each group
    stats, tables = _fit_spanning_group(WT, u, b, stats, tables, tau_abs, sw)
  seg = min(g, B)
  Wb = jax.lax.dynamic_slice(WT, (b, 0), (B, d_out))
  Ub = jax.lax.dynamic_slice(U, (b, b), (B, B))
  ub = jax.lax.dynamic_slice(u, (b,), (B,))
  init = (Wb, jnp.zeros_like(Wb), jnp.zeros((B, d_out), jnp.int32), jnp.zeros((B, d_out), bool),
          stats, tables)
  segment = lambda s, c: _sweep_segment(s, c, b, Ub, ub, tau_abs, sw)
  Wb, Eb, Cb, Mb, stats, tables = jax.lax.fori_loop(0, B // seg, segment, init)
  # Lazy update of the columns after the block: W[:, b+B:] −= E_blk @ U[blk, b+B:], i.e.
  # WT[b+B:] −= U[blk, b+B:]ᵀ @ E_blkᵀ: [D, B] @ [B, d_out], masked to the later rows.
  Urows = jax.lax.dynamic_slice(U, (b, 0), (B, D))
  later = (jnp.arange(D) >= b + B)[None, :]
  WT = WT - hdot(jnp.where(later, Urows, 0.0).T, Eb)
  WT = jax.lax.dynamic_update_slice(WT, Wb, (b, 0))
  codes = jax.lax.dynamic_update_slice(codes, Cb, (b, 0))
  mask = jax.lax.dynamic_update_slice(mask, Mb, (b, 0))
  return WT, codes, mask, stats, tables


def _fit_spanning_group(WT, u, b, stats: GroupStats, tables: GroupStats, tau_abs, sw: _Sweep):
  """Groups longer than a block: the statistics of the group of block column b, fitted on the
  group's updated weights WT[b:b+g] when b starts it (else kept), and written to its table row."""
  g, d_out = sw.groupsize, WT.shape[1]

  def fit_here():
    return _fit(jax.lax.dynamic_slice(WT, (b, 0), (g, d_out)).T,
                jax.lax.dynamic_slice(u, (b,), (g,)), tau_abs, sw)
  stats = jax.lax.cond(b % g == 0, fit_here, lambda: stats)
  return stats, _store(tables, stats, b // g)


def _sweep_segment(s, c, b, Ub, ub, tau_abs, sw: _Sweep):
  """Segment s (min(g, B) columns) of the block at column b: the group statistics at its start
  (groups within a block), then its columns. Wb, Eb, Cb, Mb are the block's [B, d_out] weights,
  scaled errors, codes and outlier flags; Ub [B, B], ub [B] its part of U and diag U."""
  Wb, Eb, Cb, Mb, stats, tables = c
  B, g = sw.blocksize, sw.groupsize
  seg = min(g, B)
  c0 = s * seg
  if g <= B:
    stats = _fit(jax.lax.dynamic_slice(Wb, (c0, 0), (g, Wb.shape[1])).T,
                 jax.lax.dynamic_slice(ub, (c0,), (g,)), tau_abs, sw)
    tables = _store(tables, stats, (b + c0) // g)
  column = lambda j, cc: _sweep_column(j, cc, Ub, ub, tau_abs, sw)
  Wb, Eb, Cb, Mb, stats = jax.lax.fori_loop(c0, c0 + seg, column, (Wb, Eb, Cb, Mb, stats))
  return Wb, Eb, Cb, Mb, stats, tables


def _sweep_column(j, c, Ub, ub, tau_abs, sw: _Sweep):
  """Block column j: quantized (or kept as an outlier), its scaled error recorded and propagated
  to the block's later columns."""
  Wb, Eb, Cb, Mb, stats = c
  q, code, is_out, e = _quantize_column(Wb[j], ub[j], stats, tau_abs, sw)
  # In-block update of the later columns: W[:, j+1:] −= e ⊗ U[j, j+1:] (transposed).
  cols = jnp.arange(sw.blocksize)
  Wb = Wb - jnp.where(cols > j, Ub[j], 0.0)[:, None] * e[None, :]
  Wb = Wb.at[j].set(q)
  return Wb, Eb.at[j].set(e), Cb.at[j].set(code), Mb.at[j].set(is_out), stats


@functools.partial(jax.jit, static_argnames=("sw",))
def _sweep(W: jax.Array, U: jax.Array, tau_abs: jax.Array, sw: _Sweep):
  """The SpQR sweep on permuted, padded W [d_out, D] and U [D, D] (D a multiple of B).

  Returns (Q [d_out, D], codes [d_out, D] int32, outlier mask [d_out, D], GroupStats tables with
  first-level fields [d_out, n_tab] and second-level fields [d_out // β2, n_tab]).
  """
  d_out, D = W.shape
  n_tab = -(-D // sw.groupsize)
  n_rows2 = d_out // sw.stats.qq_groupsize
  vec = lambda n, dt: jnp.zeros((n,), dt)
  stats = GroupStats(vec(d_out, W.dtype), vec(d_out, W.dtype), vec(d_out, jnp.int32),
                     vec(d_out, jnp.int32), *(vec(n_rows2, W.dtype) for _ in range(4)))
  # Tables are [n_tab, ·] inside the loop (one contiguous row per group).
  tables = GroupStats(*(jnp.zeros((n_tab, v.shape[0]), v.dtype) for v in stats))
  # [d_out, D] -> [D, d_out]
  WT = W.T
  carry = (WT, jnp.zeros(WT.shape, jnp.int32), jnp.zeros(WT.shape, bool), stats, tables)
  body = lambda i, c: _sweep_block(i, c, U, jnp.diag(U), tau_abs, sw)
  QT, codes, mask, _, tables = jax.lax.fori_loop(0, D // sw.blocksize, body, carry)
  return QT.T, codes.T, mask.T, GroupStats(*(t.T for t in tables))


# ----------------------------------------------------------------------------------------------
# Driver.


def outlier_scale(W: jax.Array, U: jax.Array) -> jax.Array:
  """mean_c var_rows(W[:, c]) / U_cc² (unbiased variance over output rows, as torch.var)."""
  var = jnp.var(W, axis=0, ddof=1)
  return jnp.mean(var / jnp.square(jnp.diag(U)))


def _spqr_stats(tables: GroupStats, cfg: SpQRConfig, n_groups: int, g: int) -> SpQRStats:
  """The second-level codes and statistics of the real groups (`n_groups` of `g` columns)."""
  sc = cfg.stats_config()
  levels = {}
  for which, quantized, bits in (("scale", sc.quantize_scale, cfg.qq.scale_bits),
                                 ("zero", sc.quantize_zero, cfg.qq.zero_bits)):
    if not quantized:
      continue
    levels[f"qq_{which}_bits"] = int(bits)
    for key in ("codes", "qq_scale", "qq_zero"):
      levels[f"{which}_{key}"] = getattr(tables, f"{which}_{key}")[:, :n_groups]
  return SpQRStats(**levels, qq_groupsize=int(cfg.qq.group_size), groupsize=int(g))


def column_order(H, cfg: SpQRConfig) -> jax.Array:
  """[d_in] int32 processing order of the columns: act-order of H, else the identity."""
  if cfg.act_order:
    return hessian.act_order_permutation(H)
  return jnp.arange(H.shape[0], dtype=jnp.int32)


def spqr(W, H, cfg: SpQRConfig = SpQRConfig(), *, layer: str = "?",
         tau_abs=None) -> SolveResult:
  """Quantizes one layer with SpQR.

  Args:
    W: [d_out, d_in] weights (f32; f64 under x64 in oracle tests).
    H: [d_in, d_in] undamped Hessian.
    cfg: SpQR config; d_out must be a multiple of qq_groupsize.
    layer: name used in errors and logs.
    tau_abs: the absolute outlier threshold to use instead of this W's own (scalar; e.g. the
      full layer's when W is a shard of its rows, `distributed.solve`); None: computed here.
  Returns:
    SolveResult in the original column order: Q (outliers hold their kept value), codes (at
    outliers: the code of the kept value, unused), grid (dequantized first-level statistics,
    group of column perm[j] = j // groupsize), perm, outlier_mask, objective on the undamped H,
    Diagnostics (outlier_fraction, damping, tau_abs) and `spqr` (second-level codes and
    statistics, see module docs).
  """
  hessian.check_layer_problem(W, H, layer=layer)
  W, H = jnp.asarray(W), jnp.asarray(H)
  dtype = jnp.result_type(W.dtype, jnp.float32)
  W, H = W.astype(dtype), H.astype(dtype)
  d_out, d_in = W.shape
  cfg.validate(d_out, d_in, layer)

  perm = column_order(H, cfg)
  Wp, Hp = hessian.permute(W, H, perm)
  prep = hessian.prepare_hessian(Hp, Wp, cfg.percdamp, order="spqr",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  if not cfg.detect_outliers:
    tau_abs = jnp.asarray(jnp.inf, dtype)
  elif tau_abs is None:
    tau_abs = cfg.outlier_threshold * outlier_scale(prep.W, prep.U)
  swept = _padded_sweep(prep.W, prep.U, jnp.asarray(tau_abs, dtype), cfg)
  return _unpermuted_result(W, H, perm, swept, Damping.of(prep), tau_abs, cfg)


def _padded_sweep(Wd, U, tau_abs, cfg: SpQRConfig):
  """`_sweep` of the permuted, damped problem (Wd [d_out, d_in], U [d_in, d_in]) padded to D,
  a multiple of the block size: (Qp, codes, outlier mask) [d_out, D] and the GroupStats tables."""
  d_in = Wd.shape[1]
  g, B = cfg.columns_per_group(d_in), cfg.block_size(d_in)
  # Zero columns after W and an identity block after U, up to D columns (no coupling).
  D = padding.round_up(d_in, B)
  Wpad, Upad = padding.pad_axis(Wd, D), padding.pad_square(U, D, diagonal=1.0)
  sw = _Sweep(stats=cfg.stats_config(), maxq=cfg.maxq, groupsize=g, blocksize=B,
              detect=cfg.detect_outliers,
              screen=cfg.detect_outliers and not cfg.simplified_outliers)
  return _sweep(Wpad, Upad, tau_abs, sw)


def _unpermuted_result(W, H, perm, swept, damping: Damping, tau_abs, cfg: SpQRConfig
                       ) -> SolveResult:
  """The SolveResult of the `_padded_sweep` output `swept` for the problem W [d_out, d_in],
  H [d_in, d_in], in the original column order (perm: the processing order)."""
  Qp, codes_p, mask_p, tables = swept
  d_in = W.shape[1]
  g = cfg.columns_per_group(d_in)
  inv = hessian.inverse_permutation(perm)
  Q = Qp[:, :d_in][:, inv]
  n_groups = d_in // g
  grid = Grid(scale=tables.scale[:, :n_groups], zero=tables.zero[:, :n_groups],
              group_index=(inv // g).astype(jnp.int32), maxq=cfg.maxq, flavor=Flavor.SPQR,
              sym=cfg.grid.sym, round_zero=cfg.grid.round_zero)
  mask = mask_p[:, :d_in][:, inv]
  diagnostics = Diagnostics(outlier_fraction=jnp.mean(mask.astype(jnp.float32)),
                            damping=damping, tau_abs=jnp.asarray(tau_abs, jnp.float32))
  return SolveResult(Q=Q, codes=codes_p[:, :d_in][:, inv], grid=grid, perm=perm,
                     objective=layer_objective(W, Q, H), outlier_mask=mask,
                     diagnostics=diagnostics, spqr=_spqr_stats(tables, cfg, n_groups, g))
