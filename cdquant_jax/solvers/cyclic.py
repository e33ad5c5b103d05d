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

The best-code and noise rules are CD's (`_descent`); this file holds the sweep order.
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
from cdquant_jax.solvers import _descent as descent
from cdquant_jax.solvers import hessian, init as init_lib, padding
from cdquant_jax.solvers.diagnostics import Diagnostics
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
    SolveResult with Diagnostics: init_objective and damping (of the start), steps [d_out]
    (coordinate changes per row), rounds (sweeps run), objective_trace [sweeps + 1] (tracked
    objective after each sweep; NaN after the loop ended), tracked_objective,
    recomputed_objective.
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
  return init_lib.solve_result(W, H, Q, start.grid, init.perm, diag.started_from(init))


def refine_cyclic(W, H, Q0, grid: Grid, *, sweeps: int, blocksize: int = 128,
                  order: jax.Array | None = None,
                  frozen: jax.Array | None = None) -> tuple[jax.Array, Diagnostics]:
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
    (Q [d_out, d_in] in the original column order, Diagnostics: steps, rounds (sweeps run),
    objective_trace, tracked_objective, recomputed_objective).
  """
  dtype = init_lib.working_dtype(W)
  W, H, Q0 = (jnp.asarray(a, dtype) for a in (W, H, Q0))
  d_in = W.shape[1]
  order = jnp.arange(d_in, dtype=jnp.int32) if order is None else jnp.asarray(order, jnp.int32)
  s, z = descent.grid_arrays(grid, dtype)
  B = min(blocksize, d_in)
  n = padding.round_up(d_in, B)

  def prep(A, fill):
    """Columns in visiting order, padded to a multiple of the block size."""
    return padding.pad_axis(A[:, order], n, fill=fill)

  # Padded columns have H_jj = 0 (dead): they never move and couple to nothing.
  Hp = padding.pad_square(H[order][:, order], n)
  sp, zp = (prep(s, 1.0), prep(z, 0.0)) if s.shape[1] != 1 else (s, z)
  frozen_p = None if frozen is None else prep(jnp.asarray(frozen, bool), True)
  Qp, diag = _sweeps(prep(W, 0.0), Hp, prep(Q0, 0.0), sp, zp, frozen_p, maxq=grid.maxq,
                     flavor=grid.flavor, sweeps=int(sweeps), B=B)
  inverse = hessian.inverse_permutation(order)
  return Qp[:, :d_in][:, inverse], diag


@functools.partial(jax.jit, static_argnames=("maxq", "flavor", "sweeps", "B"))
def _sweeps(W, H, Q0, s, z, frozen, *, maxq: int, flavor: Flavor, sweeps: int, B: int):
  """Sweeps in visiting order on padded arrays (d_in a multiple of B)."""
  d_out = W.shape[0]
  consts = descent.Consts(W=W, s=s, z=z, kept=None if frozen is None else Q0, frozen=frozen)
  C0 = grids.codes_of(Q0, s, z, maxq, flavor)
  E0, G0 = descent.gradient(C0, consts, H)
  obj0 = jnp.sum(E0 * G0)
  sweep = functools.partial(_sweep, consts=consts, curv=descent.curvature(H), maxq=maxq, B=B)

  def body(state):
    C, G, k, steps, _, total, trace = state
    C, G, changed, gained = sweep(C, G)
    total = total + gained
    n_changed = jnp.sum(changed).astype(jnp.int32)
    return C, G, k + 1, steps + changed, n_changed, total, trace.at[k + 1].set(total)

  def cond(state):
    _, _, k, _, last_changes, _, _ = state
    return (k < sweeps) & (last_changes > 0)

  trace = jnp.full((sweeps + 1,), jnp.nan, W.dtype).at[0].set(obj0)
  init = (C0, G0, jnp.int32(0), jnp.zeros((d_out,), jnp.int32), jnp.int32(1), obj0, trace)
  C, _, k, steps, _, tracked, trace = jax.lax.while_loop(cond, body, init)
  Q, exact = descent.solution(C, consts, H)
  return Q, Diagnostics(steps=steps, rounds=k, objective_trace=trace, tracked_objective=tracked,
                        recomputed_objective=exact)


def _sweep(C, G, *, consts: descent.Consts, curv: descent.Curvature, maxq: int, B: int):
  """One sweep over the columns, block by block: (C, G, changes per row [d_out], Σ Δ)."""
  d_out, n = C.shape
  block = functools.partial(_lazy_block, consts=consts, curv=curv, maxq=maxq, B=B)
  return jax.lax.fori_loop(0, n // B, block, (C, G, jnp.zeros((d_out,), jnp.int32),
                                              jnp.zeros((), G.dtype)))


def _lazy_block(b, state, *, consts: descent.Consts, curv: descent.Curvature, maxq: int, B: int):
  """Columns [b·B, (b+1)·B) one by one with in-block updates of G, then the block's moves
  reach every column of G at once."""
  C, G, changed, gained = state
  d_out, n = C.shape
  a = b * B
  cut = lambda A: jax.lax.dynamic_slice(A, (0, a), (d_out, B))
  Hrows = jax.lax.dynamic_slice(curv.H, (a, 0), (B, n))
  column = functools.partial(
      _column, s=cut(consts.s) if consts.s.shape[1] != 1 else consts.s,
      frozen=None if consts.frozen is None else cut(consts.frozen),
      Hbb=jax.lax.dynamic_slice(Hrows, (0, a), (B, B)),
      d=jax.lax.dynamic_slice(curv.diag, (a,), (B,)),
      inv_d=jax.lax.dynamic_slice(curv.inv_diag, (a,), (B,)),
      maxq=maxq, noise=descent.noise_level(consts.W.dtype))
  inner = (cut(C), cut(G), jnp.zeros((d_out, B), G.dtype), changed, gained)
  Cb, _, Db, changed, gained = jax.lax.fori_loop(0, B, column, inner)
  # Lazy batch: every column of G receives the block's moves, [d_out, B] @ [B, n].
  G = G + hdot(Db, Hrows)
  return jax.lax.dynamic_update_slice(C, Cb, (0, a)), G, changed, gained


def _column(j, state, *, s, frozen, Hbb, d, inv_d, maxq: int, noise):
  """Column j of a block: every row takes its best code if that beats the noise.

  state: block codes Cb, G columns Gb, moves Db (all [d_out, B]), changes per row [d_out] and
  Σ Δ; s: [d_out, B] or [d_out, 1]; frozen: None or [d_out, B]; Hbb: [B, B]; d, inv_d: [B].
  """
  Cb, Gb, Db, changed, gained = state
  c, g = Cb[:, j], Gb[:, j]
  s_j = s[:, j] if s.shape[1] != 1 else s[:, 0]
  fr = None if frozen is None else frozen[:, j]
  # Best code of column j (s = 0: no move).
  code, delta, gain = descent.single_moves(c, g, inv_d[j], d[j], s_j,
                                           descent.safe_inverse(s_j, s_j != 0), fr, maxq)
  move = descent.beats_noise(gain, delta, g, d[j], noise)
  delta = jnp.where(move, delta, 0.0)
  Cb = Cb.at[:, j].set(jnp.where(move, code, c))
  # In-block update: G[:, blk] += δ ⊗ H[j, blk].
  Gb = Gb + delta[:, None] * Hbb[j][None, :]
  return (Cb, Gb, Db.at[:, j].set(delta), changed + move,
          gained + jnp.sum(jnp.where(move, gain, 0.0)))
