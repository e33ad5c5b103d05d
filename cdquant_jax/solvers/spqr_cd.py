"""SpQR+CD: the SpQR sweep, then coordinate descent on the full layer objective.

After `spqr` (its grids and its outlier set are kept fixed) every round alternates
  1. greedy CD (or BCD) over the non-outlier codes on the grid SpQR fitted; outliers are frozen
     but enter the objective;
  2. the closed-form re-solve of the outlier values: given every other weight of row r, the
     outliers S_r are free continuous variables and the row objective eᵀ H e (e = w − q) is
     minimised by
         e_S = −(H_SS + λI)⁻¹ H_{S,S̄} e_S̄,   i.e.  q_S = w_S + (H_SS + λI)⁻¹ (H e_S̄)_S,
     with λ = ridge · mean(diag H) (tiny; guards singular H_SS, e.g. dead columns). With
     fp16_storage the values are then rounded to float16 (the stored format).
Both steps are accepted row by row only where they lower the row objective (rows are independent
for a fixed grid), so the objective never rises above SpQR's.

The per-row outlier systems are padded to the largest outlier count K of the layer and solved in
chunks of rows (`lax.map` with a batch size keeping chunk·K² bounded).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import hdot, layer_objective, row_objectives
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Grid
from cdquant_jax.solvers import bcd as bcd_lib
from cdquant_jax.solvers import cd as cd_lib
from cdquant_jax.solvers import hessian, padding
from cdquant_jax.solvers.bcd import BlockOptions
from cdquant_jax.solvers.cd import GreedyOptions
from cdquant_jax.solvers.result import SolveResult
from cdquant_jax.solvers.spqr import FP16_MAX, SpQRConfig, spqr

# Upper bound on the elements of one chunk of padded outlier systems (chunk rows · K²).
_SOLVE_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpQRCDConfig(SpQRConfig):
  """SpQR (every SpQRConfig field) followed by CD/BCD refinement of the codes and closed-form
  outlier values."""

  # Code refinement: greedy single-coordinate CD (settings `cd`) or block CD (settings `bcd`).
  refine: Literal["cd", "bcd"] = "cd"
  # Alternations of (CD on the non-outliers) and (closed-form outlier re-solve); 0 = plain SpQR.
  rounds: int = 2
  # Greedy CD settings per round (refine="cd").
  cd: GreedyOptions = GreedyOptions()
  # Block CD settings per round (refine="bcd").
  bcd: BlockOptions = BlockOptions()
  # Relative ridge λ / mean(diag H) of the outlier solve (outliers on only).
  ridge: float = 1e-6

  def __post_init__(self):
    super().__post_init__()
    check = config_lib.reject_unless
    check(self.refine in ("cd", "bcd"), f"refine must be 'cd' or 'bcd', got {self.refine!r}")
    check(self.rounds >= 0, f"rounds must be >= 0, got {self.rounds}")
    check(self.ridge >= 0, f"ridge must be >= 0, got {self.ridge}")
    unused = [name for name, default in (("cd", GreedyOptions()), ("bcd", BlockOptions()))
              if getattr(self, name) != default and (self.rounds == 0 or name != self.refine)]
    check(not unused, f"{unused} settings are not used with refine={self.refine!r}, "
                      f"rounds={self.rounds}")
    check(self.ridge == 1e-6 or (self.rounds > 0 and self.detect_outliers),
          "ridge only applies with rounds > 0 and outliers on")

  def spqr_config(self) -> SpQRConfig:
    """The SpQR sweep's settings alone."""
    return SpQRConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SpQRConfig)})

  def validate(self, d_out: int, d_in: int, layer: str = "?") -> None:
    super().validate(d_out, d_in, layer)
    if self.refine == "bcd":
      self.bcd.validate(d_in)


# ----------------------------------------------------------------------------------------------
# Closed-form outlier values.


def _solve_rows(H, idx, valid, rhs, lam):
  """e_S for a chunk of rows: idx/valid/rhs [rows, K] -> [rows, K] (0 on padding)."""
  # [rows, K] index pairs -> [rows, K, K] principal submatrices H_SS.
  Hs = H[idx[:, :, None], idx[:, None, :]]
  pair = valid[:, :, None] & valid[:, None, :]
  eye = jnp.eye(idx.shape[1], dtype=H.dtype)
  Hs = jnp.where(pair, Hs, 0.0) + eye * jnp.where(valid, lam, 1.0)[:, None, :]
  b = jnp.where(valid, rhs, 0.0)
  return -jnp.linalg.solve(Hs, b[..., None])[..., 0]


@functools.partial(jax.jit, static_argnames=("k", "fp16"))
def _resolve_outliers(W, H, Q, mask, lam, *, k: int, fp16: bool):
  """Optimal outlier values given the other weights, for every row (see module docstring).

  Args:
    W: [d_out, d_in] target weights; H: [d_in, d_in] undamped Hessian.
    Q: [d_out, d_in] current weights; mask: [d_out, d_in] outliers (at most k per row).
    lam: absolute ridge.
    k: largest outlier count of a row (static padding).
    fp16: round the new values to float16.
  Returns:
    [d_out, d_in] Q with the outliers replaced.
  """
  d_out = W.shape[0]
  # (H e_S̄) per row, with e_S̄ the error on the non-outliers: [d_out, d_in].
  R = hdot(jnp.where(mask, 0.0, W - Q), H)
  # Each row's outlier columns first: [d_out, k].
  idx = jnp.argsort(~mask, axis=1, stable=True)[:, :k].astype(jnp.int32)
  valid = jnp.take_along_axis(mask, idx, axis=1)
  rhs = jnp.take_along_axis(R, idx, axis=1)
  chunk = max(1, min(d_out, _SOLVE_CHUNK_ELEMENTS // max(k * k, 1)))
  n_chunks = -(-d_out // chunk)
  # [d_out, k] -> [n_chunks, chunk, k] (padded rows are invalid)
  split = lambda x, v: padding.pad_axis(x, n_chunks * chunk, axis=0, fill=v).reshape(
      n_chunks, chunk, k)
  e_S = jax.lax.map(lambda a: _solve_rows(H, *a, lam),
                    (split(idx, 0), split(valid, False), split(rhs, 0.0)))
  # [n_chunks, chunk, k] -> [d_out, k]
  e_S = e_S.reshape(-1, k)[:d_out]
  q_S = jnp.take_along_axis(W, idx, axis=1) - e_S
  if fp16:
    q_S = jnp.clip(q_S, -FP16_MAX, FP16_MAX).astype(jnp.float16).astype(q_S.dtype)
  q_S = jnp.where(valid, q_S, jnp.take_along_axis(Q, idx, axis=1))
  rows = jnp.arange(d_out)[:, None]
  return Q.at[rows, idx].set(q_S)


def storable_outliers(Q, mask, grid: Grid, *, fp16: bool) -> tuple[jax.Array, jax.Array]:
  """Outlier values in the packed format's form, and the codes they refer to.

  The format stores an outlier as a float16 correction added to the dense value of its code, so
  with `fp16` each outlier becomes dense(c) + f16(q − dense(c)) with c its nearest code.
  Returns (Q [d_out, d_in], codes [d_out, d_in] int32).
  """
  codes = grids.quantize(Q, grid)
  if not fp16:
    return Q, codes
  dense = grids.dequantize(codes, grid)
  delta = jnp.clip(Q - dense, -FP16_MAX, FP16_MAX).astype(jnp.float16).astype(Q.dtype)
  return jnp.where(mask, dense + delta, Q), codes


def resolve_outliers(W, H, Q, mask, *, ridge: float = 1e-6, fp16: bool = False) -> jax.Array:
  """Closed-form outlier values (no acceptance test). W, H, Q, mask as in `_resolve_outliers`."""
  k = int(jnp.max(jnp.sum(mask, axis=1)))
  if k == 0:
    return Q
  # Pad to a power of two (few distinct compilations), but never past d_in: a row of a 2-bit
  # SpQR layer can hold more than half its columns as outliers.
  k = min(1 << (k - 1).bit_length(), W.shape[1])
  lam = ridge * jnp.mean(jnp.diag(H))
  return _resolve_outliers(W, H, Q, mask, lam, k=k, fp16=fp16)


# ----------------------------------------------------------------------------------------------
# Driver.


@jax.jit
def _accept_rows(W, H, Q_old, Q_new):
  """Keeps Q_new in the rows where it strictly lowers the row objective.

  Returns (Q [d_out, d_in], accepted rows [d_out] bool).
  """
  better = row_objectives(W, Q_new, H) < row_objectives(W, Q_old, H)
  return jnp.where(better[:, None], Q_new, Q_old), better


def _refine_codes(W, H, Q, grid: Grid, mask, blocks, cfg: SpQRCDConfig):
  """One CD/BCD pass over the non-outlier codes. Returns (Q, moves per row [d_out])."""
  d_in = W.shape[1]
  if cfg.refine == "cd":
    Q, diag = cd_lib.refine_greedy(W, H, Q, grid, max_steps=cfg.cd.max_steps(d_in),
                                   resync_every=cfg.cd.resync_every, frozen=mask,
                                   min_phase_rows=cfg.cd.min_phase_rows)
  else:
    b = cfg.bcd
    Q, diag = bcd_lib.refine_bcd(W, H, Q, grid, blocks=blocks, radius=b.radius,
                                 max_steps=b.max_steps(d_in), candidates=b.candidates,
                                 rescan_every=b.rescan_every, resync_every=b.resync_every,
                                 frozen=mask, min_phase_rows=b.min_phase_rows)
  return Q, diag.steps


def spqr_cd(W, H, cfg: SpQRCDConfig = SpQRCDConfig(), *, layer: str = "?") -> SolveResult:
  """SpQR, then `rounds` × (CD on the non-outliers, closed-form outlier re-solve).

  Args:
    W: [d_out, d_in] weights; H: [d_in, d_in] undamped Hessian.
    cfg: config; its SpQRConfig fields as for `spqr`.
    layer: name used in errors.
  Returns:
    SolveResult with SpQR's grid, perm, outlier mask and second-level stats; Q and codes
    refined. Diagnostics: SpQR's (damping, outlier_fraction, tau_abs), plus init_objective
    (SpQR's objective), objective_trace [2·rounds + 1] (after SpQR, then after each
    half-round), steps [d_out] (accepted CD moves per row, all rounds) and accepted_rows
    [2·rounds] (rows that accepted each half-round).
  """
  hessian.check_layer_problem(W, H, layer=layer)
  d_out, d_in = jnp.shape(W)
  cfg.validate(d_out, d_in, layer)
  base = spqr(W, H, cfg.spqr_config(), layer=layer)
  dtype = base.Q.dtype
  W, H = jnp.asarray(W, dtype), jnp.asarray(H, dtype)
  # CD works on W with dead columns zeroed (where H is zero, so the objective is unchanged).
  Wt = jnp.where(hessian.dead_columns(H)[None, :], 0.0, W)
  mask, grid = base.outlier_mask, base.grid
  blocks = _bcd_blocks(H, cfg)
  Q, trace = base.Q, [base.objective]
  out_codes = base.codes
  steps = jnp.zeros((d_out,), jnp.int32)
  accepted = []
  for _ in range(cfg.rounds):
    Q, better, moves = _refine_half_round(W, Wt, H, Q, grid, mask, blocks, cfg)
    steps = steps + moves
    accepted.append(jnp.sum(better))
    trace.append(layer_objective(W, Q, H))
    Q, better, out_codes = _outlier_half_round(W, H, Q, out_codes, mask, grid, cfg)
    accepted.append(jnp.sum(better))
    trace.append(layer_objective(W, Q, H))
  return _refined_result(base, W, H, Q, out_codes, trace, steps, accepted)


def _bcd_blocks(H, cfg: SpQRCDConfig):
  """The coordinate blocks of block CD on H [d_in, d_in] (None unless refine="bcd" runs)."""
  if not (cfg.refine == "bcd" and cfg.rounds):
    return None
  b = cfg.bcd
  return bcd_lib.make_blocks(np.asarray(H), b.block_size, b.partition, b.n_partners, b.seed)


def _refine_half_round(W, Wt, H, Q, grid: Grid, mask, blocks, cfg: SpQRCDConfig):
  """CD / BCD of the non-outlier codes of Q [d_out, d_in] on Wt (W with dead columns zeroed),
  kept in the rows where it lowers the objective: (Q, accepted rows [d_out], their moves)."""
  Q_cd, s = _refine_codes(Wt, H, Q, grid, mask, blocks, cfg)
  Q, better = _accept_rows(W, H, Q, Q_cd)
  return Q, better, jnp.where(better, s, 0).astype(jnp.int32)


def _outlier_half_round(W, H, Q, out_codes, mask, grid: Grid, cfg: SpQRCDConfig):
  """Closed-form storable outlier values at `mask`, kept in the rows where they lower the
  objective: (Q, accepted rows [d_out], codes [d_out, d_in] their corrections refer to)."""
  Q_out = resolve_outliers(W, H, Q, mask, ridge=cfg.ridge)
  Q_out, codes_out = storable_outliers(Q_out, mask, grid, fp16=cfg.grid.fp16_stats)
  Q, better = _accept_rows(W, H, Q, Q_out)
  return Q, better, jnp.where(better[:, None], codes_out, out_codes)


def _refined_result(base: SolveResult, W, H, Q, out_codes, trace, steps, accepted
                    ) -> SolveResult:
  """SpQR's result `base` with the refined Q [d_out, d_in], its codes and the refinement's
  diagnostics (objective after each half-round, moves per row, accepted rows)."""
  # Non-outliers lie on the grid; outliers keep the code their stored correction refers to.
  codes = jnp.where(base.outlier_mask, out_codes, grids.quantize(Q, base.grid))
  diagnostics = base.diagnostics.replace(init_objective=base.objective,
                                         objective_trace=jnp.stack(trace), steps=steps,
                                         accepted_rows=jnp.asarray(accepted, jnp.int32))
  return base.replace(Q=Q, codes=codes, objective=layer_objective(W, Q, H),
                      diagnostics=diagnostics)
