"""Closed-form refit of the rows' grid parameters with the integer codes fixed (algorithms.md 3.3).

With codes q fixed, a row's weights are linear in its group parameters:
  scale only (zero fixed):  ŵ_i = s_g (q_i − z_g),                  unknowns s_g;
  affine (zero free):       ŵ_i = s_g q_i + c_g with c_g = −s_g z_g,  unknowns (s_g, c_g);
so the H-weighted least squares min (w − ŵ)ᵀ H (w − ŵ) is a small (n_groups·K)² system per row
(K = 1 or 2 features per group): (Aᵀ H A + ridge) x = Aᵀ H w. Zero points that must be integers
(GPTQ flavour, SpQR with round_zero) are rounded after the affine fit and the scales refitted
with them fixed; symmetric grids keep their fixed zero. A row keeps its old parameters unless
the refit lowers its objective, so a refit never raises the objective; a group whose fitted scale
is not positive and finite keeps its old (scale, zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cdquant_jax._numerics import HIGHEST, hdot, row_objectives
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, Grid, GridConfig

# Ridge added to each normal-equation system, relative to the mean of its diagonal.
RIDGE = 1e-7
# Elements of the largest per-chunk intermediate [rows, d_in, n_groups, K] (memory bound).
CHUNK_ELEMENTS = 1 << 24


@functools.partial(jax.jit, static_argnames=("grid_cfg",))
def refit_grid(W, H, Q, grid: Grid, grid_cfg: GridConfig, *,
               dead: jax.Array | None = None) -> tuple[Grid, jax.Array, dict]:
  """Refits (scale, zero) of every row and group for the codes of Q.

  Args:
    W: [d_out, d_in] weights (dead columns zeroed).
    H: [d_in, d_in] undamped Hessian.
    Q: [d_out, d_in] current solution on `grid`.
    grid: current grid; every group must have the same number of columns.
    grid_cfg: the grid config (sym, flavour, round_zero, fp16_stats decide what is refitted).
    dead: optional [d_in] bool; dead columns are put at the code of 0 of the new grid.
  Returns:
    (new grid, new Q on it with the same codes, diagnostics {"objective", "rows_refit"}).
  """
  d_out, d_in = W.shape
  n_groups = grid.scale.shape[1]
  if d_in % n_groups:
    raise ValueError(f"refit needs equal-size groups: d_in={d_in}, n_groups={n_groups}")
  codes = grids.quantize(Q, grid).astype(W.dtype)
  scale, zero = _refit_params(W, H, codes, grid, grid_cfg)
  new, ok = _where_rows_improve(W, H, Q, codes, grid, scale, zero)
  new_codes = codes.astype(jnp.int32)
  if dead is not None:
    new_codes = jnp.where(dead[None, :], grids.quantize(jnp.zeros_like(W), new), new_codes)
  Q_out = grids.dequantize(new_codes, new)
  return new, Q_out, {"objective": jnp.sum(row_objectives(W, Q_out, H)),
                      "rows_refit": jnp.sum(ok)}


def _refit_params(W, H, codes, grid: Grid, grid_cfg: GridConfig):
  """Least-squares (scale, zero) [d_out, n_groups] for the codes [d_out, d_in] (as floats).

  Symmetric grids keep their zero; integer zero points are rounded and the scales refitted with
  them fixed; fp16_stats rounds both to float16; unusable groups keep the old parameters.
  """
  n_groups = grid.scale.shape[1]
  # Columns sorted by group, so each group is a contiguous run of d_in / n_groups columns.
  order = jnp.argsort(grid.group_index, stable=True)
  Hs = H[order][:, order]
  HWs = hdot(W, H)[:, order]
  qs = codes[:, order]
  fixed_zero = grid_cfg.sym
  integer_zero = grid_cfg.flavor == Flavor.GPTQ or grid_cfg.round_zero
  if fixed_zero:
    scale, zero = _fit_scales(qs, grid.zero, Hs, HWs), grid.zero
  else:
    scale, offset = _fit_affine(qs, Hs, HWs, n_groups)
    zero = -offset / jnp.where(scale != 0, scale, 1.0)
    if integer_zero:
      zero = jnp.round(zero)
      scale = _fit_scales(qs, zero, Hs, HWs)
  if grid_cfg.fp16_stats:
    scale = scale.astype(jnp.float16).astype(scale.dtype)
    zero = zero.astype(jnp.float16).astype(zero.dtype)
  # Groups whose fit is not a usable grid (scale ≤ 0, NaN) keep their old parameters.
  usable = jnp.isfinite(scale) & (scale > 0) & jnp.isfinite(zero)
  return jnp.where(usable, scale, grid.scale), jnp.where(usable, zero, grid.zero)


def _where_rows_improve(W, H, Q, codes, grid: Grid, scale, zero) -> tuple[Grid, jax.Array]:
  """The grid with the refitted (scale, zero) [d_out, n_groups] in the rows whose objective
  they lower for the same codes (others keep `grid`'s), and those rows [d_out] bool."""
  new = dataclasses.replace(grid, scale=scale, zero=zero)
  Q_new = grids.dequantize(codes.astype(jnp.int32), new)
  ok = row_objectives(W, Q_new, H) < row_objectives(W, Q, H)
  new = dataclasses.replace(grid, scale=jnp.where(ok[:, None], scale, grid.scale),
                            zero=jnp.where(ok[:, None], zero, grid.zero))
  return new, ok


def _fit_scales(qs, zero, Hs, HWs):
  """Scales [d_out, n_groups] minimising the objective with codes and zeros fixed."""
  d_out, n_groups = zero.shape
  g = qs.shape[1] // n_groups
  # [d_out, d_in] -> [d_out, n_groups, g, 1]: feature q − z of each column.
  feats = (qs.reshape(d_out, n_groups, g) - zero[:, :, None])[..., None]
  return _solve(feats, Hs, HWs)[..., 0]


def _fit_affine(qs, Hs, HWs, n_groups):
  """(scale, offset) [d_out, n_groups] each, for ŵ = s·q + c with codes fixed."""
  d_out, d_in = qs.shape
  # [d_out, d_in] -> [d_out, n_groups, g, 2]: features (q, 1) of each column.
  q = qs.reshape(d_out, n_groups, d_in // n_groups)
  x = _solve(jnp.stack([q, jnp.ones_like(q)], axis=-1), Hs, HWs)
  return x[..., 0], x[..., 1]


def _solve(feats, Hs, HWs):
  """Per-row least squares for features [d_out, n_groups, g, K]; returns [d_out, n_groups, K].

  Normal equations per row r: M[(g,k),(h,l)] = Σ_{i∈g, j∈h} F_gik H_ij F_hjl and
  b[(g,k)] = Σ_{i∈g} F_gik (H w_r)_i.
  """
  d_out, n_groups, g, K = feats.shape
  d_in = n_groups * g
  # [d_in, d_in] -> [d_in, n_groups, g]: column j = (group h, position j') of the sorted order.
  Hblk = Hs.reshape(d_in, n_groups, g)
  # [d_out, d_in] -> [d_out, n_groups, g]
  HWg = HWs.reshape(d_out, n_groups, g)

  def normal_equations(args):
    F, hw = args  # [n_groups, g, K], [n_groups, g]
    # T[i, h, l] = Σ_j H[i, (h, j)] F[h, j, l]: [d_in, n_groups, K]
    T = jnp.einsum("ihj,hjl->ihl", Hblk, F, precision=HIGHEST)
    # M[(g, k), (h, l)] = Σ_i F[g, i, k] T[(g, i), h, l]: [n_groups, K, n_groups, K]
    M = jnp.einsum("gik,gihl->gkhl", F, T.reshape(n_groups, g, n_groups, K), precision=HIGHEST)
    M = M.reshape(n_groups * K, n_groups * K)
    b = jnp.einsum("gik,gi->gk", F, hw, precision=HIGHEST).reshape(n_groups * K)
    ridge = RIDGE * jnp.maximum(jnp.mean(jnp.abs(jnp.diag(M))), 1e-30)
    x = jnp.linalg.solve(M + ridge * jnp.eye(n_groups * K, dtype=M.dtype), b)
    return x.reshape(n_groups, K)

  batch = max(1, CHUNK_ELEMENTS // (d_in * n_groups * K))
  return jax.lax.map(normal_equations, (feats, HWg), batch_size=min(batch, d_out))
