"""GPTQ with the exact semantics of IST-DASLab/gptq `fasterquant` (algorithms.md 1.2).

Per block of `blocksize` columns (processing order), each column j is quantized, its error
err = (w − q) / U_jj is propagated to the rest of the block with the row U[j, j+1:] (rank-1),
and after the block the accumulated errors update all later columns at once (lazy batch).
U is the upper Cholesky factor of the damped H⁻¹. `blocksize` changes only speed. Inside a
block the same two levels repeat with sub-blocks of `SUB_BLOCK` columns (rank-1 updates within
the sub-block, one matmul for the rest of the block after it), which is speed only too.

Groups (non-static): parameters are fitted at every group start j on W[:, j:j+G]. As in the
reference, W there is the *outer* weight, which has not received the current block's
in-block updates (they live in the block copy) when G < blocksize; `exact_groups=True` fits on
the fully updated weights instead. Static groups fit every group once on the (dead-zeroed)
original W. With act-order and non-static groups the groups are contiguous in the permuted
order (the result's group_index records it).

We keep the reference's naming (W, H, U, percdamp), hence the capitalised variables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import hdot, layer_objective
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, GridConfig
from cdquant_jax.solvers import hessian, padding
from cdquant_jax.solvers.diagnostics import Damping, Diagnostics
from cdquant_jax.solvers.result import SolveResult, no_outliers


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions:
  """GPTQ's sweep settings without a grid (reference defaults).

  The GPTQ solver adds its grid (`GPTQConfig`); the GPTQ init of CD, BCD and cyclic CD takes
  these options (`init.InitConfig`) and the grid of the solver it starts.
  """

  # Columns per lazy-update block; affects speed only.
  blocksize: int = 128
  # Relative damping: H += percdamp · mean(diag H) · I.
  percdamp: float = 0.01
  # Process columns by descending diag(H).
  act_order: bool = False
  # Fit every group once on the original weights before the sweep (groups only).
  static_groups: bool = False
  # Fit mid-block groups on fully updated weights (the reference uses the outer W; dynamic
  # groups only).
  exact_groups: bool = False
  # Damping escalations (×10 each) tried when the Cholesky fails.
  max_damp_escalations: int = 4

  def __post_init__(self):
    check = config_lib.reject_unless
    check(self.blocksize > 0, f"blocksize must be positive, got {self.blocksize}")
    check(self.percdamp >= 0, f"percdamp must be >= 0, got {self.percdamp}")
    check(self.max_damp_escalations >= 0,
          f"max_damp_escalations must be >= 0, got {self.max_damp_escalations}")

  def check_grid(self, grid: GridConfig) -> None:
    """Rejects options that this grid makes meaningless or impossible (ConfigError)."""
    check = config_lib.reject_unless
    check(grid.flavor == Flavor.GPTQ,
          "GPTQ uses the GPTQ grid flavour; use the SpQR solver for SpQR grids")
    check(grid.bits >= 2, f"grid.bits must be in [2, 8], got {grid.bits}")
    per_channel = grid.group_size == -1
    check(not (self.static_groups and per_channel),
          "static_groups=True needs a group grid (grid.group_size != -1)")
    check(not (self.exact_groups and (per_channel or self.static_groups)),
          "exact_groups=True only applies to dynamic groups (a group grid without static_groups)")
    check(not (grid.scale_search == "owc" and not per_channel and not self.static_groups),
          "grid.scale_search='owc' needs fixed grid parameters: use per-channel or static "
          "groups with GPTQ")

  def with_grid(self, grid: GridConfig) -> "GPTQConfig":
    """The GPTQ solver config of these options on `grid`."""
    options = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTQOptions)}
    return GPTQConfig(grid=grid, **options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig(GPTQOptions):
  """GPTQ settings: a grid (bits, group size, sym, scale search: minmax, mse; owc only for
  fixed parameters) and the sweep options."""

  grid: GridConfig = GridConfig()

  def __post_init__(self):
    super().__post_init__()
    self.check_grid(self.grid)

  def validate(self, d_in: int) -> None:
    """Shape checks (ValueError): the group size must divide d_in."""
    self.grid.validate(d_in)


def gptq(W, H, cfg: GPTQConfig = GPTQConfig(), *, layer: str = "?") -> SolveResult:
  """Quantizes W [d_out, d_in] with GPTQ on the layer Hessian H [d_in, d_in].

  Runs as one device program compiled once per shape and config (`_solve`: start, damped
  factorisation, sweep), after the value checks and with one host sync; only when the Cholesky
  fails does the damping escalation (`hessian.prepare_hessian`) run, as programs of its own.

  Returns:
    SolveResult with Q and codes in the original column order, the grid (group_index in
    original order), the processing permutation and Diagnostics: gptq_loss (the reference's
    Σ (w − q)² / U_jj² / 2) and damping.
  Raises:
    ValueError / HessianError naming the layer for bad shapes, values, bits or group sizes, and
    when no damping up to the bound makes H positive definite.
  """
  hessian.check_layer_problem(W, H, layer=layer)
  W = jnp.asarray(W)
  H = jnp.asarray(H, W.dtype)
  cfg.validate(W.shape[1])
  result, start, ok = _solve(W, H, cfg=cfg)
  if bool(ok):
    return result
  prep = hessian.prepare_hessian(start.Hp, start.Wp, cfg.percdamp, order="gptq",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  return _sweep_result(W, H, start, prep.W, prep.U, Damping.of(prep), cfg=cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _solve(W, H, *, cfg: GPTQConfig) -> tuple[SolveResult, "_Start", jax.Array]:
  """The whole solve at the configured damping: (result, start, factor ok). The result is
  meaningless when the factor is not ok (the caller then escalates the damping)."""
  start = _start(W, H, cfg=cfg)
  percdamp = jnp.asarray(cfg.percdamp, H.dtype)
  _, Wd, U, damp, ok = hessian.damped_factor(start.Hp, start.Wp, percdamp, "gptq")
  damping = Damping(percdamp=jnp.asarray(cfg.percdamp, jnp.float32),
                    damp=damp.astype(jnp.float32), escalations=jnp.int32(0))
  return _sweep_result(W, H, start, Wd, U, damping, cfg=cfg), start, ok


class _Start(NamedTuple):
  """The permuted problem and fixed parameters of a GPTQ sweep (see `_start`)."""

  row_grid: grids.Grid
  fixed: grids.Grid
  perm: jax.Array
  Wp: jax.Array
  Hp: jax.Array
  fixed_scale: jax.Array
  fixed_zero: jax.Array


@functools.partial(jax.jit, static_argnames="cfg")
def _start(W, H, *, cfg: GPTQConfig) -> _Start:
  """Grids, dead columns and processing order of the problem (W [d_out, d_in], H [d_in, d_in]).

  Returns the per-channel grid, the fixed grid (per channel or static groups), the processing
  permutation, W and H with dead columns fixed in processing order, and the parameters of each
  processed column, [d_out, d_in] (used when the grid is fixed during the sweep).
  """
  d_in = W.shape[1]
  # Per-channel parameters come from the ORIGINAL W (the reference fits them before zeroing
  # dead columns); static groups from the dead-zeroed W.
  row_grid = grids.fit_grid(W, dataclasses.replace(cfg.grid, group_size=-1), H)
  dead = hessian.dead_columns(H)
  H1, W1 = hessian.fix_dead(H, W, dead)
  static_grid = grids.fit_grid(W1, cfg.grid, H1) if cfg.static_groups else row_grid
  perm = (hessian.act_order_permutation(H1) if cfg.act_order
          else jnp.arange(d_in, dtype=jnp.int32))
  Wp, Hp = hessian.permute(W1, H1, perm)
  fixed = row_grid if cfg.grid.group_size == -1 else static_grid
  # Parameters of each processed column: [d_out, d_in] gathered in processing order.
  fixed_scale = jnp.take(fixed.scale, jnp.take(fixed.group_index, perm), axis=1)
  fixed_zero = jnp.take(fixed.zero, jnp.take(fixed.group_index, perm), axis=1)
  return _Start(row_grid=row_grid, fixed=fixed, perm=perm, Wp=Wp, Hp=Hp,
                fixed_scale=fixed_scale, fixed_zero=fixed_zero)


@functools.partial(jax.jit, static_argnames="cfg")
def _sweep_result(W, H, start: _Start, Wd, U, damping: Damping, *, cfg: GPTQConfig
                  ) -> SolveResult:
  """The sweep on the damped problem (Wd, U in processing order) and its SolveResult in the
  original column order (objective on the undamped H)."""
  d_in = W.shape[1]
  fixed_grid = cfg.grid.group_size == -1 or cfg.static_groups
  Qp, codes_p, scale, zero, loss = _sweep(Wd, U, start.fixed_scale, start.fixed_zero, cfg=cfg,
                                          dynamic=not fixed_grid)
  inv = hessian.inverse_permutation(start.perm)
  if fixed_grid:
    grid = start.fixed
  else:
    # Groups are contiguous in processing order: column perm[j] belongs to group j // g.
    _, g = cfg.grid.groups(d_in)
    group_index = (jnp.arange(d_in, dtype=jnp.int32) // g)[inv]
    grid = dataclasses.replace(start.row_grid, scale=scale, zero=zero, group_index=group_index)
  Q = Qp[:, inv]
  return SolveResult(
      Q=Q, codes=codes_p[:, inv], grid=grid, perm=start.perm,
      objective=layer_objective(W, Q, H), outlier_mask=no_outliers(W),
      diagnostics=Diagnostics(gptq_loss=loss, damping=damping))


def _pad_problem(W, U, fixed_scale, fixed_zero, blocksize: int):
  """Pads columns to a multiple of the block size: zero weights, identity U rows."""
  n = padding.round_up(W.shape[1], blocksize)
  widen = lambda A, v: padding.pad_axis(A, n, fill=v)
  return (widen(W, 0.0), padding.pad_square(U, n, diagonal=1.0), widen(fixed_scale, 1.0),
          widen(fixed_zero, 0.0))


# Columns per sub-block of the sweep: a column's rank-1 update touches only its sub-block (an
# [S, d_out] slab that stays in cache), and each sub-block updates the rest of its block with
# one matmul. Speed only.
SUB_BLOCK = 32


def _sub_block(B: int, exact_groups: bool) -> int:
  """Sub-block size S dividing the block size B (B itself for exact_groups, whose group fits
  read the whole block)."""
  if exact_groups:
    return B
  return next(s for s in (SUB_BLOCK, 16, 8, 4, 2, 1) if B % s == 0)


@dataclasses.dataclass(frozen=True)
class _SweepShape:
  """Static shape of a sweep (hashable): the config, whether groups are fitted during the sweep,
  d_out rows, d_in real and n_cols padded columns, blocks of B columns made of sub-blocks of S,
  and n_groups groups of G columns."""

  cfg: GPTQConfig
  dynamic: bool
  d_out: int
  d_in: int
  n_cols: int
  B: int
  S: int
  G: int
  n_groups: int


@functools.partial(jax.jit, static_argnames=("cfg", "dynamic"))
def _sweep(W, U, fixed_scale, fixed_zero, *, cfg: GPTQConfig, dynamic: bool):
  """The blocked column sweep in processing order.

  Internally works on transposed weights (a column of W is a contiguous row of Wᵀ).

  Args:
    W: [d_out, d_in] damped-problem weights (dead columns zeroed), processing order.
    U: [d_in, d_in] upper Cholesky factor of the damped H⁻¹.
    fixed_scale, fixed_zero: [d_out, d_in] per-column parameters (used when not `dynamic`).
    cfg: config (static).
    dynamic: fit group parameters during the sweep.
  Returns:
    (Q, codes, group scales, group zeros, reference loss); Q/codes [d_out, d_in] in processing
    order, scales/zeros [d_out, n_groups] (only meaningful when `dynamic`).
  """
  d_out, d_in = W.shape
  B = min(cfg.blocksize, d_in)
  n_groups, G = cfg.grid.groups(d_in)
  Wx, Ux, fs, fz = _pad_problem(W, U, fixed_scale, fixed_zero, B)
  # [d_out, n_cols] -> [n_cols, d_out]: row j of WT is column j of W.
  WT, fsT, fzT = Wx.T, fs.T, fz.T
  sw = _SweepShape(cfg=cfg, dynamic=dynamic, d_out=d_out, d_in=d_in, n_cols=WT.shape[0], B=B,
                   S=_sub_block(B, cfg.exact_groups), G=G, n_groups=n_groups)
  zeros_like_WT = jnp.zeros_like(WT)
  p0 = (jnp.ones((d_out,), W.dtype), jnp.zeros((d_out,), W.dtype))
  stats0 = jnp.zeros((n_groups, d_out), W.dtype)
  init = (WT, zeros_like_WT, zeros_like_WT, jnp.zeros((), W.dtype), p0, stats0, stats0)
  block = lambda b, state: _sweep_block(b, state, Ux, fsT, fzT, sw)
  _, QT, CT, loss, _, scales, zeros = jax.lax.fori_loop(0, sw.n_cols // B, block, init)
  scales, zeros = (scales.T, zeros.T) if dynamic else (stats0.T, stats0.T)
  return QT[:d_in].T, CT[:d_in].T.astype(jnp.int32), scales, zeros, loss


def _sweep_block(b, state, Ux, fsT, fzT, sw: _SweepShape):
  """Block b (columns [b·B, (b+1)·B)): its sub-blocks, then the lazy batch update of all later
  columns. WoutT is the outer weight [n_cols, d_out]; Q, C [n_cols, d_out] collect the block."""
  WoutT, Q, C, loss, params, scales, zeros = state
  B = sw.B
  i1 = b * B
  W1 = jax.lax.dynamic_slice(WoutT, (i1, 0), (B, sw.d_out))
  U1 = jax.lax.dynamic_slice(Ux, (i1, i1), (B, B))
  zero_blk = jnp.zeros_like(W1)
  inner = (W1, zero_blk, zero_blk, zero_blk, loss, params, scales, zeros, WoutT, i1, U1)
  sub_block = lambda k, st: _sweep_sub_block(k, st, Ux, fsT, fzT, sw)
  _, Q1, C1, Err1, loss, params, scales, zeros, _, _, _ = jax.lax.fori_loop(
      0, B // sw.S, sub_block, inner)
  # Lazy batch update of all later columns: Wᵀ[i2:] −= U[blk, i2:]ᵀ @ Err1.
  Urows = jax.lax.dynamic_slice(Ux, (i1, 0), (B, sw.n_cols))
  cols = jnp.arange(sw.n_cols)
  WoutT = WoutT - hdot(jnp.where(cols[None, :] >= i1 + B, Urows, 0.0).T, Err1)
  Q = jax.lax.dynamic_update_slice(Q, Q1, (i1, 0))
  C = jax.lax.dynamic_update_slice(C, C1, (i1, 0))
  return WoutT, Q, C, loss, params, scales, zeros


def _sweep_sub_block(k, state, Ux, fsT, fzT, sw: _SweepShape):
  """Sub-block k of the block at column i1: its columns, then one matmul updating the block's
  later columns. W1, Q1, C1, Err1 are the block's [B, d_out] weights, values, codes, errors."""
  W1, Q1, C1, Err1, loss, params, scales, zeros, WoutT, i1, U1 = state
  S, B = sw.S, sw.B
  k0 = k * S
  W2 = jax.lax.dynamic_slice(W1, (k0, 0), (S, sw.d_out))
  U2 = jax.lax.dynamic_slice(U1, (k0, k0), (S, S))
  inner = (W2, Q1, C1, Err1, loss, params, scales, zeros, WoutT, i1, U2, k0)
  column = lambda i, st: _sweep_column(i, st, Ux, fsT, fzT, sw)
  _, Q1, C1, Err1, loss, params, scales, zeros, _, _, _, _ = jax.lax.fori_loop(
      0, S, column, inner)
  if S < B:
    # Lazy update of the block's later columns: W1[k0+S:] −= U1[sub, k0+S:]ᵀ @ Err[sub].
    Err2 = jax.lax.dynamic_slice(Err1, (k0, 0), (S, sw.d_out))
    Urows = jax.lax.dynamic_slice(U1, (k0, 0), (S, B))
    W1 = W1 - hdot(jnp.where(jnp.arange(B)[None, :] >= k0 + S, Urows, 0.0).T, Err2)
  return W1, Q1, C1, Err1, loss, params, scales, zeros, WoutT, i1, U1


def _sweep_column(i, state, Ux, fsT, fzT, sw: _SweepShape):
  """Column i of the sub-block (W2 [S, d_out], U2 [S, S]) starting at block column k0: its
  parameters, quantization, reference loss and the rank-1 update of the sub-block."""
  W2, Q1, C1, Err1, loss, params, scales, zeros, WoutT, i1, U2, k0 = state
  ib = k0 + i  # column of the block
  j = i1 + ib
  if sw.dynamic:
    # exact_groups runs one sub-block per block (S == B), so W2 is the whole block there.
    params, scales, zeros = _group_params(j, params, scales, zeros, WoutT, W2, Err1, i1, Ux, sw)
    s, z = params
  else:
    s, z = fsT[j], fzT[j]
  w = W2[i]
  c = grids.codes_of(w, s, z, sw.cfg.grid.maxq, sw.cfg.grid.flavor)
  q = grids.dequantize_codes(c, s, z)
  d = U2[i, i]
  err = (w - q) / d
  loss = loss + jnp.sum((w - q) ** 2) / d**2 / 2
  # Rank-1 update of the sub-block's later columns: W2[i+1:] −= U2[i, i+1:] ⊗ err.
  W2 = W2 - jnp.where(jnp.arange(sw.S) > i, U2[i], 0.0)[:, None] * err[None, :]
  return (W2, Q1.at[ib].set(q), C1.at[ib].set(c), Err1.at[ib].set(err), loss, params,
          scales, zeros, WoutT, i1, U2, k0)


def _group_params(j, params, scales, zeros, WoutT, W2, Err1, i1, Ux, sw: _SweepShape):
  """Dynamic groups: the (scale, zero) [d_out] of column j, fitted anew when j starts a group,
  and the [n_groups, d_out] scale / zero tables with them written at j's group."""
  is_start = (j % sw.G == 0) & (j < sw.d_in)
  params = jax.lax.cond(is_start, lambda: _fit_group(WoutT, W2, Err1, i1, j, Ux, sw),
                        lambda: params)
  s, z = params
  # Parameters are constant within a group, so writing them at every column is exact.
  gi = jnp.minimum(j // sw.G, sw.n_groups - 1)
  return params, scales.at[gi].set(s), zeros.at[gi].set(z)


def _fit_group(WoutT, W1, Err1, i1, j, Ux, sw: _SweepShape):
  """(scale, zero) [d_out] of the group starting at column j, fitted on the outer weights
  WoutT [n_cols, d_out] (exact_groups: with the block's updates, W1 / Err1 [B, d_out])."""
  cfg, B, G = sw.cfg, sw.B, sw.G
  Wg = jax.lax.dynamic_slice(WoutT, (j, 0), (G, sw.d_out))
  if cfg.exact_groups:
    gcols = j + jnp.arange(G)
    # Pending in-block updates of later blocks' columns: U[blk, gcols]ᵀ [G, B] @ Err1 [B, d_out].
    Ublk = jax.lax.dynamic_slice(Ux, (i1, j), (B, G))
    Wg = Wg - hdot((Ublk * (gcols >= i1 + B)[None, :]).T, Err1)
    in_blk = (gcols >= i1) & (gcols < i1 + B)
    W1g = jnp.take(W1, jnp.clip(gcols - i1, 0, B - 1), axis=0)
    Wg = jnp.where(in_blk[:, None], W1g, Wg)
  fit = grids.minmax_params if cfg.grid.scale_search == "minmax" else grids.mse_params
  return fit(Wg.T, cfg.grid)
