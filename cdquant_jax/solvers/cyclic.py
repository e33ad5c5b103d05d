"""Cyclic coordinate descent: QuantEase-style sweeps (algorithms.md 4.1, 3.4), the cheap baseline.

A sweep visits the columns i = 0..d_in−1 in order (all rows at once) and sets each weight to the
grid value nearest to its unconstrained optimum t_i = q_i − g_i / H_ii, g = H (q − w): the exact
best value of that coordinate given all others, so no update raises the objective. Sweeps
repeat until one changes nothing (a fixed point, 1-opt) or the sweep budget is spent. This is
QuantEase's quantized iteration (its relaxed, unquantized iterations are not used) started from
RTN/OWC/GPTQ (GPTQ: QuantEase's `gptq_quantease`).

Lazy batches (GuidedQuant `update_P`): G = (Q − W) H is exact at the start of each block of
`blocksize` columns; inside the block only the block's columns of G are updated (rank-1 with
H[i, blk]); after the block the whole G receives Δ_blk H[blk, :] as one matmul. A sweep costs one
d_out × d_in × d_in matmul plus O(d_out · d_in · blocksize) element work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import hdot
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, Grid, GridConfig
from cdquant_jax.solvers import hessian, init as init_lib
from cdquant_jax.solvers.cd import NOISE_ULPS, code_values, grid_arrays
from cdquant_jax.solvers.init import InitConfig
from cdquant_jax.solvers.result import SolveResult


@dataclasses.dataclass(frozen=True, kw_only=True)
class CyclicConfig:
  """Cyclic CD settings."""

  # Grid of the solution and of its start.
  grid: GridConfig = GridConfig()
  # Starting point: RTN or GPTQ (with its options) on `grid`.
  init: InitConfig = InitConfig()
  # Sweeps at most; stops earlier at a fixed point. Measured layers needed 12-17 sweeps from
  # GPTQ (algorithms.md 7); QuantEase's default is 30 iterations (a third of them relaxed).
  sweeps: int = 16
  # Column visiting order of a sweep: "natural" or "diag_desc" (descending diag(H)). Not the
  # knob act_order, which is the processing order of the GPTQ start.
  visit_order: Literal["natural", "diag_desc"] = "natural"
  # Columns per lazy batch; speed only.
  blocksize: int = 128

  def __post_init__(self):
    check = config_lib.reject_unless
    check(self.sweeps > 0, f"sweeps must be positive, got {self.sweeps}")
    check(self.blocksize > 0, f"blocksize must be positive, got {self.blocksize}")
    check(self.visit_order in ("natural", "diag_desc"),
          f"visit_order must be 'natural' or 'diag_desc', got {self.visit_order!r}")
    self.init.check_grid(self.grid)

  def validate(self, d_in: int) -> None:
    """Shape checks (ValueError)."""
    self.grid.validate(d_in)


def cyclic(W, H, cfg: CyclicConfig = CyclicConfig(), *, layer: str = "?") -> SolveResult:
  """Quantizes W [d_out, d_in] by cyclic CD sweeps on the undamped Hessian H [d_in, d_in].

  Returns:
    SolveResult with diagnostics "init_objective" (and the init's damping), "steps" [d_out]
    (coordinate changes per row), "sweeps" (sweeps run), "objective_trace" [sweeps + 1]
    (tracked objective after each sweep; NaN after the loop ended), "tracked_objective",
    "recomputed_objective".
  """
  hessian.check_layer_problem(W, H, layer=layer)
  d_in = jnp.shape(W)[1]
  cfg.validate(d_in)
  init = init_lib.initial_solution(W, H, cfg.init, cfg.grid, layer=layer)
  start = init_lib.start_point(W, H, init)
  order = (hessian.act_order_permutation(start.H) if cfg.visit_order == "diag_desc"
           else jnp.arange(d_in, dtype=jnp.int32))
  Q, diag = refine_cyclic(start.W, start.H, start.Q, start.grid, sweeps=cfg.sweeps,
                          blocksize=cfg.blocksize, order=order)
  diagnostics = {**init_lib.init_diagnostics(init), **diag}
  return init_lib.solve_result(W, H, Q, start.grid, init.perm, diagnostics)


def refine_cyclic(W, H, Q0, grid: Grid, *, sweeps: int, blocksize: int = 128,
                  order: jax.Array | None = None,
                  frozen: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Cyclic CD sweeps over a FIXED grid from Q0.

  Args:
    W: [d_out, d_in] weights (dead columns zeroed); H: [d_in, d_in] undamped Hessian.
    Q0: [d_out, d_in] start, grid values except at `frozen` coordinates.
    grid: the grid.
    sweeps: sweeps at most (stops at a sweep that changes nothing).
    blocksize: lazy-batch width (speed only).
    order: optional [d_in] visiting order of the columns (default natural).
    frozen: optional [d_out, d_in] bool, coordinates that keep their Q0 value.
  Returns:
    (Q [d_out, d_in] in the original column order, diagnostics as in `cyclic`).
  """
  dtype = init_lib.working_dtype(W)
  W, H, Q0 = (jnp.asarray(a, dtype) for a in (W, H, Q0))
  d_out, d_in = W.shape
  order = jnp.arange(d_in, dtype=jnp.int32) if order is None else jnp.asarray(order, jnp.int32)
  s, z = grid_arrays(grid, dtype)
  per_column = s.shape[1] != 1
  pad = -d_in % min(blocksize, d_in)
  B = min(blocksize, d_in)

  def prep(A, fill):
    """Columns in visiting order, padded to a multiple of the block size."""
    return jnp.pad(A[:, order], ((0, 0), (0, pad)), constant_values=fill)

  Hp = jnp.pad(H[order][:, order], ((0, pad), (0, pad)))
  sp, zp = (prep(s, 1.0), prep(z, 0.0)) if per_column else (s, z)
  frozen_p = None if frozen is None else prep(jnp.asarray(frozen, bool), True)
  Qp, diag = _sweeps(prep(W, 0.0), Hp, prep(Q0, 0.0), sp, zp, frozen_p, maxq=grid.maxq,
                     flavor=grid.flavor, sweeps=int(sweeps), B=B)
  inverse = hessian.inverse_permutation(order)
  return Qp[:, :d_in][:, inverse], diag


@functools.partial(jax.jit, static_argnames=("maxq", "flavor", "sweeps", "B"))
def _sweeps(W, H, Q0, s, z, frozen, *, maxq: int, flavor: Flavor, sweeps: int, B: int):
  """Sweeps in visiting order on padded arrays (d_in a multiple of B)."""
  d_out, n = W.shape
  diag_h = jnp.diag(H)
  inv_diag = jnp.where(diag_h > 0, 1.0 / jnp.where(diag_h > 0, diag_h, 1.0), 0.0)
  noise = NOISE_ULPS * jnp.finfo(W.dtype).eps
  per_column = s.shape[1] != 1
  C0 = grids.codes_of(Q0, s, z, maxq, flavor)
  E0 = code_values(C0, s, z, Q0, frozen) - W
  G0 = hdot(E0, H)
  obj0 = jnp.sum(E0 * G0)

  def column(j, state):
    Cb, Gb, Db, sb, fb, Hbb, db, ib, changed, gained = state
    c, g = Cb[:, j], Gb[:, j]
    s_j = sb[:, j] if per_column else sb[:, 0]
    fr = None if fb is None else fb[:, j]
    # Best code: nearest to t/s + z = c − g / (H_jj s) (both flavours; s = 0: no move).
    inv_s = jnp.where(s_j != 0, 1.0 / jnp.where(s_j != 0, s_j, 1.0), 0.0)
    cand = jnp.clip(jnp.round(c - g * ib[j] * inv_s), 0, maxq)
    delta = s_j * (cand - c)
    if fr is not None:
      delta = jnp.where(fr, 0.0, delta)
    gain = delta * (2.0 * g + delta * db[j])
    move = gain + noise * jnp.abs(delta) * (2.0 * jnp.abs(g) + jnp.abs(delta) * db[j]) < 0
    delta = jnp.where(move, delta, 0.0)
    Cb = Cb.at[:, j].set(jnp.where(move, cand, c))
    # In-block update: G[:, blk] += δ ⊗ H[j, blk].
    Gb = Gb + delta[:, None] * Hbb[j][None, :]
    return (Cb, Gb, Db.at[:, j].set(delta), sb, fb, Hbb, db, ib, changed + move,
            gained + jnp.sum(jnp.where(move, gain, 0.0)))

  def block(b, state):
    C, G, changed, gained = state
    a = b * B
    cut = lambda A: jax.lax.dynamic_slice(A, (0, a), (d_out, B))
    sb = cut(s) if per_column else s
    fb = None if frozen is None else cut(frozen)
    Hrows = jax.lax.dynamic_slice(H, (a, 0), (B, n))
    Hbb = jax.lax.dynamic_slice(Hrows, (0, a), (B, B))
    db, ib = jax.lax.dynamic_slice(diag_h, (a,), (B,)), jax.lax.dynamic_slice(inv_diag, (a,), (B,))
    inner = (cut(C), cut(G), jnp.zeros((d_out, B), W.dtype), sb, fb, Hbb, db, ib, changed,
             gained)
    Cb, _, Db, *_, changed, gained = jax.lax.fori_loop(0, B, column, inner)
    # Lazy batch: every column of G receives the block's moves, [d_out, B] @ [B, n].
    G = G + hdot(Db, Hrows)
    return jax.lax.dynamic_update_slice(C, Cb, (0, a)), G, changed, gained

  def sweep(state):
    C, G, k, steps, last_changes, total, trace = state
    C, G, changed, gained = jax.lax.fori_loop(
        0, n // B, block, (C, G, jnp.zeros((d_out,), jnp.int32), jnp.zeros((), W.dtype)))
    total = total + gained
    n_changed = jnp.sum(changed).astype(jnp.int32)
    return (C, G, k + 1, steps + changed, n_changed, total, trace.at[k + 1].set(total))

  def cond(state):
    _, _, k, _, last_changes, _, _ = state
    return (k < sweeps) & (last_changes > 0)

  trace = jnp.full((sweeps + 1,), jnp.nan, W.dtype).at[0].set(obj0)
  init = (C0, G0, jnp.int32(0), jnp.zeros((d_out,), jnp.int32), jnp.int32(1), obj0, trace)
  C, _, k, steps, _, tracked, trace = jax.lax.while_loop(cond, sweep, init)
  Q = code_values(C, s, z, Q0, frozen)
  E = Q - W
  exact = jnp.sum(hdot(E, H) * E)
  return Q, dict(steps=steps, sweeps=k, objective_trace=trace, tracked_objective=tracked,
                 recomputed_objective=exact)
