"""CDQuant's greedy coordinate descent (CD) on a fixed quantization grid (algorithms.md 3.2).

Per row r keep g = H (q_r − w_r) (all rows: G = (Q − W) H, [d_out, d_in]). Moving coordinate i
by δ changes the row's objective by exactly

    Δ_i(δ) = 2 δ g_i + δ² H_ii,

a parabola in δ, so the best grid value of coordinate i is the grid point nearest to
t_i = q_i − g_i / H_ii. Each greedy step applies, in every row at once, the coordinate with the
most negative Δ_i; a row whose best Δ_i is ≥ 0 is 1-opt and stops for good (rows are
independent and nothing else changes its g). The stop rule is Δ < 0, with no relative threshold
(algorithms.md 7); a move only has to beat the rounding error of its own Δ (the noise rule).
G is updated with one gathered row of H per row, so a step costs O(d_out · d_in), and is
re-synchronised exactly (one matmul) every `resync_every` steps and at the end. The state is
the integer codes (as floats), so "no move" is exact and Q is always on the grid.

Speed: rows converge at very different speeds (a few % of d_in moves on average, a long tail).
The loop therefore runs in *phases*: phase k works on the `rows_k` rows that are still active
(rows_0 = d_out, then halving down to `min_phase_rows`), gathered into a smaller array, and hands
over to the next phase once at most rows_{k+1} rows are active. Shapes stay static (the phases
are unrolled at trace time, a handful of them), and the cost of a step follows the active rows.

Dead columns (H_ii == 0) have g_i = 0, so Δ_i = 0 and they never move; callers put them at the
code of 0 (see `init.start_point`).

This file holds the greedy step rule; the best-code and noise rules, resync and row compaction
are shared with BCD and cyclic CD (`_descent`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, Grid, GridConfig
from cdquant_jax.solvers import _descent as descent
from cdquant_jax.solvers import hessian, init as init_lib, refit as refit_lib
from cdquant_jax.solvers.diagnostics import Diagnostics
from cdquant_jax.solvers.init import InitConfig, StartPoint
from cdquant_jax.solvers.result import SolveResult


@dataclasses.dataclass(frozen=True, kw_only=True)
class GreedyOptions:
  """Greedy CD loop settings, without grid or start (shared by CD, BCD's CD stage, SpQR+CD)."""

  # Step budget per row = ceil(factor · d_in) greedy steps ("one sweep-equivalent" at 1.0).
  # Rows stop earlier at a 1-opt point, which measured layers reach after a few % of d_in.
  max_steps_factor: float = 1.0
  # Recompute G = (Q − W) H and the objective exactly every this many steps (kills f32 drift).
  resync_every: int = 512
  # Smallest row count of a compaction phase (see the module docstring); affects speed only.
  min_phase_rows: int = 64

  def __post_init__(self):
    check = config_lib.reject_unless
    check(self.max_steps_factor > 0,
          f"max_steps_factor must be positive, got {self.max_steps_factor}")
    check(self.resync_every > 0, f"resync_every must be positive, got {self.resync_every}")
    check(self.min_phase_rows > 0, f"min_phase_rows must be positive, got {self.min_phase_rows}")

  def max_steps(self, d_in: int) -> int:
    return max(1, math.ceil(self.max_steps_factor * d_in))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CDOptions(GreedyOptions):
  """Greedy CD settings without grid or start (CD's own, and BCD's CD stage)."""

  # Alternating rounds of (closed-form (scale, zero) refit with codes fixed, then CD again).
  # Meant for group grids (algorithms.md 3.3); 0 = the grid of the init is kept.
  refit_rounds: int = 0

  def __post_init__(self):
    super().__post_init__()
    config_lib.reject_unless(self.refit_rounds >= 0,
                             f"refit_rounds must be >= 0, got {self.refit_rounds}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CDConfig(CDOptions):
  """Greedy CD settings. The paper does not publish its budget or init details: all ablatable."""

  # Grid of the solution and of its start (bits, group size, sym, flavour, scale search).
  grid: GridConfig = GridConfig()
  # Starting point: RTN or GPTQ (with its options) on `grid`.
  init: InitConfig = InitConfig()

  def __post_init__(self):
    super().__post_init__()
    self.init.check_grid(self.grid)

  def validate(self, d_in: int) -> None:
    """Shape checks (ValueError): the group size must divide d_in."""
    self.grid.validate(d_in)


def cd(W, H, cfg: CDConfig = CDConfig(), *, layer: str = "?") -> SolveResult:
  """Quantizes W [d_out, d_in] by greedy CD on the undamped layer Hessian H [d_in, d_in].

  Returns:
    SolveResult (Q, codes in original column order; perm from the init) with Diagnostics:
    init_objective and damping (of the start), steps [d_out] (moves per row, summed over refit
    rounds), objective_trace (tracked objective every trace_every steps of the last round, NaN
    after the loop ended), tracked_objective / recomputed_objective (end of the last round),
    max_resync_drift, global_steps, refit_objectives (refit_rounds > 0).
  Raises:
    ValueError / HessianError naming the layer for bad shapes, values or settings.
  """
  hessian.check_layer_problem(W, H, layer=layer)
  cfg.validate(jnp.shape(W)[1])
  init = init_lib.initial_solution(W, H, cfg.init, cfg.grid, layer=layer)
  return _descend(jnp.asarray(W), jnp.asarray(H), init, cfg=cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _descend(W, H, init: SolveResult, *, cfg: CDConfig) -> SolveResult:
  """From the start `init` to the SolveResult as one program (compiled once per shape and
  config): solver form, greedy CD with its refit rounds, codes and objective."""
  grid, Q, diagnostics = _descend_with_refits(init_lib.start_point(W, H, init), cfg)
  return init_lib.solve_result(W, H, Q, grid, init.perm, diagnostics.started_from(init))


def _descend_with_refits(start: StartPoint, cfg: CDConfig) -> tuple[Grid, jax.Array, Diagnostics]:
  """Greedy CD from the start, then `refit_rounds` × (closed-form grid refit, greedy CD).

  Returns (grid, Q [d_out, d_in] on it, diagnostics of the last round with steps summed over the
  rounds and the objective after each refit).
  """
  refine = functools.partial(refine_greedy, start.W, start.H,
                             max_steps=cfg.max_steps(start.W.shape[1]),
                             resync_every=cfg.resync_every, min_phase_rows=cfg.min_phase_rows)
  Q, diag = refine(start.Q, start.grid)
  grid, steps, refit_objectives = start.grid, diag.steps, []
  for _ in range(cfg.refit_rounds):
    grid, Q, refit_diag = refit_lib.refit_grid(start.W, start.H, Q, grid, cfg.grid,
                                               dead=start.dead)
    refit_objectives.append(refit_diag["objective"])
    Q, diag = refine(Q, grid)
    steps = steps + diag.steps
  refits = jnp.stack(refit_objectives) if refit_objectives else None
  return grid, Q, diag.replace(steps=steps, refit_objectives=refits)


def refine_greedy(W, H, Q0, grid: Grid, *, max_steps: int, resync_every: int,
                  frozen: jax.Array | None = None, trace_every: int | None = None,
                  min_phase_rows: int = 64) -> tuple[jax.Array, Diagnostics]:
  """Greedy CD over a FIXED grid from Q0.

  Args:
    W: [d_out, d_in] target weights (dead columns zeroed by the caller).
    H: [d_in, d_in] undamped Hessian.
    Q0: [d_out, d_in] start; exact grid values except at `frozen` coordinates.
    grid: the grid the free coordinates move on.
    max_steps: greedy steps at most (each row moves at most once per step).
    resync_every: exact recomputation of G and of the objective every this many steps.
    frozen: optional [d_out, d_in] bool, coordinates that never move (they keep Q0 and still
      enter g, e.g. SpQR outliers).
    trace_every: record the tracked objective every this many steps (default: ~256 records).
    min_phase_rows: smallest compaction phase (speed only).
  Returns:
    (Q [d_out, d_in], Diagnostics): steps [d_out] int32 moves per row, global_steps,
    objective_trace [max_steps // trace_every + 1] (entry k after k·trace_every steps; NaN
    after the loop ended), trace_every, tracked_objective (running sum of the Δ since the
    last resync) and recomputed_objective (exact, at the end), max_resync_drift (largest
    relative gap between tracked and recomputed objective seen at a resync or at the end).
  """
  dtype = init_lib.working_dtype(W)
  W, H, Q0 = (jnp.asarray(a, dtype) for a in (W, H, Q0))
  d_out, _ = W.shape
  s, z = descent.grid_arrays(grid, dtype)
  trace_every = trace_every or max(1, max_steps // 256)
  frozen = None if frozen is None else jnp.asarray(frozen, bool)
  return _greedy(W, H, Q0, s, z, frozen, maxq=grid.maxq, flavor=grid.flavor,
                 max_steps=int(max_steps), resync_every=int(resync_every),
                 trace_every=int(trace_every),
                 sizes=descent.phase_sizes(d_out, min_phase_rows))


@functools.partial(jax.jit, static_argnames=("maxq", "flavor", "max_steps", "resync_every",
                                             "trace_every", "sizes"))
def _greedy(W, H, Q0, s, z, frozen, *, maxq: int, flavor: Flavor, max_steps: int,
            resync_every: int, trace_every: int, sizes: tuple[int, ...]):
  """The phased greedy loop; see `refine_greedy` (s, z broadcastable to [d_out, d_in])."""
  consts = descent.Consts(W=W, s=s, z=z, kept=None if frozen is None else Q0, frozen=frozen)
  # State: integer codes C as uint8 (bits <= 8; the values are s·(C − z)): "no move" is exact
  # and a quarter of the memory traffic of f32.
  C = grids.codes_of(Q0, s, z, maxq, flavor).astype(jnp.uint8)
  rows, totals = descent.start(C, consts, H, max_steps // trace_every + 1)
  phase = functools.partial(_phase, curv=descent.curvature(H), maxq=maxq, max_steps=max_steps,
                            resync_every=resync_every, trace_every=trace_every)
  rows, totals = descent.run_phases(rows, totals, consts, sizes, phase)
  Q, diagnostics = descent.finish(rows, totals, consts, H)
  return Q, diagnostics.replace(trace_every=jnp.int32(trace_every))


def _phase(rows: descent.Rows, totals: descent.Totals, consts: descent.Consts, outside,
           handover: int, *, curv: descent.Curvature, maxq: int, max_steps: int,
           resync_every: int, trace_every: int) -> tuple[descent.Rows, descent.Totals]:
  """Greedy steps on a gathered set of rows until at most `handover` stay pending."""
  s = consts.s
  step = functools.partial(_step, consts=consts, curv=curv,
                           inv_s=descent.safe_inverse(s, s != 0),  # s = 0: nothing moves
                           maxq=maxq, noise=descent.noise_level(consts.W.dtype),
                           trace_every=trace_every, n_trace=max_steps // trace_every + 1)

  def body(state):
    return descent.resync_every(*step(*state), consts, curv.H, outside, resync_every)

  def cond(state):
    rows, totals = state
    return (jnp.sum(rows.pending) > handover) & (totals.t < max_steps)

  return jax.lax.while_loop(cond, body, (rows, totals))


def _step(rows: descent.Rows, totals: descent.Totals, *, consts: descent.Consts,
          curv: descent.Curvature, inv_s, maxq: int, noise, trace_every: int,
          n_trace: int) -> tuple[descent.Rows, descent.Totals]:
  """One greedy step: every pending row applies its best single move if it beats the noise
  (a row without one stops for good); the trace records the total every `trace_every` steps
  (slot n_trace is the scratch slot)."""
  best_gain, best = _best_coordinates(rows.C, rows.G, consts, curv, inv_s, maxq)
  # The chosen move, recomputed from gathered scalars: [rows].
  pick = lambda A: A[:, 0] if A.shape[1] == 1 else jnp.take_along_axis(A, best[:, None],
                                                                        axis=1)[:, 0]
  c_b, g_b, d_b = pick(rows.C).astype(rows.G.dtype), pick(rows.G), curv.diag[best]
  code, delta, gain = descent.single_moves(c_b, g_b, curv.inv_diag[best], d_b, pick(consts.s),
                                           pick(inv_s), ~(best_gain < 0), maxq)
  move = rows.pending & descent.beats_noise(gain, delta, g_b, d_b, noise)
  C, G = descent.apply_moves(rows.C, rows.G, curv.H, best, jnp.where(move, code, c_b),
                             jnp.where(move, delta, 0.0))
  gained = jnp.where(move, gain, 0.0)
  t, total = totals.t + 1, totals.tracked + jnp.sum(gained)
  slot = jnp.where(t % trace_every == 0, jnp.minimum(t // trace_every, n_trace), n_trace)
  rows = descent.Rows(C=C, G=G, obj=rows.obj + gained, steps=rows.steps + move, pending=move)
  return rows, totals._replace(t=t, tracked=total, trace=totals.trace.at[slot].set(total))


def _gains(C, G, inv_d, d, s, inv_s, frozen, maxq: int) -> jax.Array:
  """Δ of moving each coordinate to its best code (broadcastable [rows, cols] operands)."""
  return descent.single_moves(C.astype(G.dtype), G, inv_d, d, s, inv_s, frozen, maxq)[2]


def _column_chunk(d_in: int) -> int:
  """Column chunk K of the two-level argmin (0: plain two-pass argmin)."""
  return next((c for c in (128, 64, 32, 16) if d_in % c == 0 and d_in > c), 0)


def _best_coordinates(C, G, consts: descent.Consts, curv: descent.Curvature, inv_s,
                      maxq: int) -> tuple[jax.Array, jax.Array]:
  """(min Δ, first column reaching it) per row over every coordinate's best move, [rows] each.

  With column chunks of K: one full pass for the chunk minima, then the winning chunk is
  recomputed from gathered [rows, K] operands.
  """
  d_in = G.shape[1]
  gain = _gains(C, G, curv.inv_diag, curv.diag, consts.s, inv_s, consts.frozen, maxq)
  chunk = _column_chunk(d_in)
  if not chunk:
    return descent.row_argmin(gain)
  n_chunks = d_in // chunk
  # [rows, d_in] -> [rows, d_in / K, K]
  chunk_min = jnp.min(gain.reshape(gain.shape[0], n_chunks, chunk), axis=2)
  best_gain, first = descent.row_argmin(chunk_min)
  idx = jnp.minimum(first, n_chunks - 1)[:, None] * chunk + jnp.arange(chunk)[None, :]
  take = lambda A: A if A.shape[1] == 1 else jnp.take_along_axis(A, idx, axis=1)
  frozen = None if consts.frozen is None else take(consts.frozen)
  part = _gains(take(C), take(G), curv.inv_diag[idx], curv.diag[idx], take(consts.s),
                take(inv_s), frozen, maxq)
  _, j = descent.row_argmin(part)
  return best_gain, jnp.take_along_axis(idx, jnp.minimum(j, chunk - 1)[:, None], axis=1)[:, 0]
