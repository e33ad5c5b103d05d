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

Deviation from the reference, behind `fp16_storage` (default True; False = the reference):
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
from typing import Literal

import jax
import jax.numpy as jnp
from cdquant_jax._numerics import hdot, layer_objective
from cdquant_jax.quant.grids import Flavor, Grid, codes_of, dequantize_codes
from cdquant_jax.solvers import hessian
from cdquant_jax.solvers.result import SolveResult
from cdquant_jax.solvers.spqr_stats import (GroupStats, StatsConfig, group_stats,
                                            screen_outliers)

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRConfig:
  """SpQR configuration (defaults: the README "near-lossless" command at 3 bits)."""

  # First-level bits per weight.
  bits: int = 3
  # β1: input columns per first-level group; -1 = one group per row.
  groupsize: int = 16
  # Second-level bits of the per-row scales / zeros; None = kept unquantized (fp16).
  qq_scale_bits: int | None = 3
  qq_zero_bits: int | None = 3
  # β2: consecutive output rows sharing one second-level (scale, zero); must divide d_out
  # whenever a second level is used (no padding of rows).
  qq_groupsize: int = 16
  # Relative outlier threshold τ; math.inf disables outliers.
  outlier_threshold: float = 0.2
  # Column processing order.
  permutation_order: Literal["identity", "act_order"] = "act_order"
  # Relative damping (SpQR README headline 1.0; reference CLI default 0.01).
  percdamp: float = 1.0
  # Columns per block of the sweep (affects speed only, not the result).
  blocksize: int = 128
  # Skip the leave-one-out screen before each group fit.
  simplified_outliers: bool = False
  # Round the first-level zero point to an integer.
  round_zero: bool = False
  # Symmetric first-level grid.
  sym: bool = False
  # Symmetric second-level grid of the zero points.
  qq_zero_sym: bool = False
  # Damping escalations (×10 each) tried when the Cholesky fails.
  max_damp_escalations: int = 4
  # Round stored statistics and outlier values to float16 before use (see module docstring).
  fp16_storage: bool = True

  @property
  def maxq(self) -> int:
    return 2**self.bits - 1

  @property
  def detect_outliers(self) -> bool:
    return not math.isinf(self.outlier_threshold)

  def group_size(self, d_in: int) -> int:
    return d_in if self.groupsize == -1 else self.groupsize

  def block_size(self, d_in: int) -> int:
    return min(self.blocksize, d_in)

  def stats_config(self) -> StatsConfig:
    return StatsConfig(bits=self.bits, sym=self.sym, round_zero=self.round_zero,
                       qq_scale_bits=self.qq_scale_bits, qq_zero_bits=self.qq_zero_bits,
                       qq_groupsize=self.qq_groupsize, qq_zero_sym=self.qq_zero_sym,
                       fp16_storage=self.fp16_storage)

  def validate(self, d_out: int, d_in: int, layer: str = "?") -> None:
    """Raises ValueError naming the layer and the bad field."""
    bad = lambda msg: ValueError(f"layer {layer} [{d_out}x{d_in}]: SpQRConfig.{msg}")
    if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise bad(f"bits must be an integer in [2, 8], got {self.bits!r}")
    for name in ("qq_scale_bits", "qq_zero_bits"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or not 1 <= v <= 8):
        raise bad(f"{name} must be None or an integer in [1, 8], got {v!r}")
    g = self.group_size(d_in)
    if g <= 0 or d_in % g:
      raise bad(f"groupsize must be -1 or a positive divisor of d_in={d_in}, got {self.groupsize}")
    if self.blocksize <= 0:
      raise bad(f"blocksize must be positive, got {self.blocksize}")
    b = self.block_size(d_in)
    if not (b % g == 0 or g % b == 0 or g == d_in):
      raise bad(f"groupsize {g} and blocksize {b} must divide one another so that no group "
                f"straddles a block boundary")
    sc = self.stats_config()
    second_level = sc.quantize_scale or sc.quantize_zero
    if self.qq_groupsize <= 0 or (second_level and d_out % self.qq_groupsize):
      raise bad(f"qq_groupsize must be a positive divisor of d_out={d_out}, "
                f"got {self.qq_groupsize} (pad the layer's rows first)")
    if self.permutation_order not in ("identity", "act_order"):
      raise bad(f"permutation_order must be 'identity' or 'act_order', "
                f"got {self.permutation_order!r}")
    if not self.outlier_threshold >= 0:
      raise bad(f"outlier_threshold must be >= 0 (inf disables), got {self.outlier_threshold}")
    if self.percdamp < 0:
      raise bad(f"percdamp must be >= 0, got {self.percdamp}")


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
    def fit_here():
      return _fit(jax.lax.dynamic_slice(WT, (b, 0), (g, d_out)).T,
                  jax.lax.dynamic_slice(u, (b,), (g,)), tau_abs, sw)
    stats = jax.lax.cond(b % g == 0, fit_here, lambda: stats)
    tables = _store(tables, stats, b // g)
  seg = min(g, B)
  Wb = jax.lax.dynamic_slice(WT, (b, 0), (B, d_out))
  Ub = jax.lax.dynamic_slice(U, (b, b), (B, B))
  ub = jax.lax.dynamic_slice(u, (b,), (B,))
  cols = jnp.arange(B)

  def column(j, c):
    Wb, Eb, Cb, Mb, stats = c
    q, code, is_out, e = _quantize_column(Wb[j], ub[j], stats, tau_abs, sw)
    # In-block update of the later columns: W[:, j+1:] −= e ⊗ U[j, j+1:] (transposed).
    Wb = Wb - jnp.where(cols > j, Ub[j], 0.0)[:, None] * e[None, :]
    Wb = Wb.at[j].set(q)
    return Wb, Eb.at[j].set(e), Cb.at[j].set(code), Mb.at[j].set(is_out), stats

  def segment(s, c):
    Wb, Eb, Cb, Mb, stats, tables = c
    c0 = s * seg
    if g <= B:
      stats = _fit(jax.lax.dynamic_slice(Wb, (c0, 0), (g, d_out)).T,
                   jax.lax.dynamic_slice(ub, (c0,), (g,)), tau_abs, sw)
      tables = _store(tables, stats, (b + c0) // g)
    Wb, Eb, Cb, Mb, stats = jax.lax.fori_loop(
        c0, c0 + seg, column, (Wb, Eb, Cb, Mb, stats))
    return Wb, Eb, Cb, Mb, stats, tables

  init = (Wb, jnp.zeros_like(Wb), jnp.zeros((B, d_out), jnp.int32), jnp.zeros((B, d_out), bool),
          stats, tables)
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


def _pad_columns(W: jax.Array, U: jax.Array, D: int) -> tuple[jax.Array, jax.Array]:
  """Zero columns after W and an identity block after U, up to D columns (no coupling)."""
  pad = D - W.shape[1]
  if pad == 0:
    return W, U
  W = jnp.pad(W, ((0, 0), (0, pad)))
  U = jnp.pad(U, ((0, pad), (0, pad)))
  idx = jnp.arange(W.shape[1] - pad, D)
  return W, U.at[idx, idx].set(1.0)


def _extras(tables: GroupStats, cfg: SpQRConfig, n_groups: int, g: int) -> dict:
  sc = cfg.stats_config()
  out = {}
  if sc.quantize_scale:
    out["qq_scale_bits"] = jnp.asarray(cfg.qq_scale_bits, jnp.int32)
    out["scale_codes"] = tables.scale_codes[:, :n_groups]
    out["scale_qq_scale"] = tables.scale_qq_scale[:, :n_groups]
    out["scale_qq_zero"] = tables.scale_qq_zero[:, :n_groups]
  if sc.quantize_zero:
    out["qq_zero_bits"] = jnp.asarray(cfg.qq_zero_bits, jnp.int32)
    out["zero_codes"] = tables.zero_codes[:, :n_groups]
    out["zero_qq_scale"] = tables.zero_qq_scale[:, :n_groups]
    out["zero_qq_zero"] = tables.zero_qq_zero[:, :n_groups]
  out["qq_groupsize"] = jnp.asarray(cfg.qq_groupsize, jnp.int32)
  out["groupsize"] = jnp.asarray(g, jnp.int32)
  return out


def spqr(W, H, cfg: SpQRConfig = SpQRConfig(), *, layer: str = "?") -> SolveResult:
  """Quantizes one layer with SpQR.

  Args:
    W: [d_out, d_in] weights (f32; f64 under x64 in oracle tests).
    H: [d_in, d_in] undamped Hessian.
    cfg: SpQR config; d_out must be a multiple of qq_groupsize.
    layer: name used in errors and logs.
  Returns:
    SolveResult in the original column order: Q (outliers hold their kept value), codes (at
    outliers: the code of the kept value, unused), grid (dequantized first-level statistics,
    group of column perm[j] = j // groupsize), perm, outlier_mask, objective on the undamped H,
    diagnostics (outlier_fraction, percdamp_used, damp, escalations, tau_abs) and extras
    (second-level codes and statistics, see module docs).
  """
  hessian.check_layer_problem(W, H, layer=layer)
  W, H = jnp.asarray(W), jnp.asarray(H)
  dtype = jnp.result_type(W.dtype, jnp.float32)
  W, H = W.astype(dtype), H.astype(dtype)
  d_out, d_in = W.shape
  cfg.validate(d_out, d_in, layer)
  g, B = cfg.group_size(d_in), cfg.block_size(d_in)

  if cfg.permutation_order == "act_order":
    perm = hessian.act_order_permutation(H)
  else:
    perm = jnp.arange(d_in, dtype=jnp.int32)
  Wp, Hp = hessian.permute(W, H, perm)
  prep = hessian.prepare_hessian(Hp, Wp, cfg.percdamp, order="spqr",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  if cfg.detect_outliers:
    tau_abs = cfg.outlier_threshold * outlier_scale(prep.W, prep.U)
  else:
    tau_abs = jnp.asarray(jnp.inf, dtype)

  D = -(-d_in // B) * B
  Wpad, Upad = _pad_columns(prep.W, prep.U, D)
  sw = _Sweep(stats=cfg.stats_config(), maxq=cfg.maxq, groupsize=g, blocksize=B,
              detect=cfg.detect_outliers,
              screen=cfg.detect_outliers and not cfg.simplified_outliers)
  Qp, codes_p, mask_p, tables = _sweep(Wpad, Upad, jnp.asarray(tau_abs, dtype), sw)

  inv = hessian.inverse_permutation(perm)
  Q = Qp[:, :d_in][:, inv]
  n_groups = d_in // g
  grid = Grid(scale=tables.scale[:, :n_groups], zero=tables.zero[:, :n_groups],
              group_index=(inv // g).astype(jnp.int32), maxq=cfg.maxq, flavor=Flavor.SPQR)
  mask = mask_p[:, :d_in][:, inv]
  diagnostics = {
      "outlier_fraction": jnp.mean(mask.astype(jnp.float32)),
      "percdamp_used": jnp.asarray(prep.percdamp, jnp.float32),
      "damp": jnp.asarray(prep.damp, jnp.float32),
      "escalations": jnp.asarray(prep.escalations, jnp.int32),
      "tau_abs": jnp.asarray(tau_abs, jnp.float32),
  }
  return SolveResult(Q=Q, codes=codes_p[:, :d_in][:, inv], grid=grid, perm=perm,
                     objective=layer_objective(W, Q, H), outlier_mask=mask,
                     diagnostics=diagnostics, extras=_extras(tables, cfg, n_groups, g))
