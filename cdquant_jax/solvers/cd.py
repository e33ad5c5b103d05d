"""CDQuant's greedy coordinate descent (CD) on a fixed quantization grid (algorithms.md 3.2).

Per row r keep g = H (q_r − w_r) (all rows: G = (Q − W) H, [d_out, d_in]). Moving coordinate i
by δ changes the row's objective by exactly

    Δ_i(δ) = 2 δ g_i + δ² H_ii,

a parabola in δ, so the best grid value of coordinate i is the grid point nearest to
t_i = q_i − g_i / H_ii. Each greedy step applies, in every row at once, the coordinate with the
most negative Δ_i; a row whose best Δ_i is ≥ 0 is 1-opt and stops for good (rows are
independent and nothing else changes its g). The stop rule is Δ < 0, with no relative threshold
(algorithms.md 7); a move only has to beat the rounding error of its own Δ (`NOISE_ULPS`).
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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import hdot
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, Grid, GridConfig
from cdquant_jax.solvers import hessian, init as init_lib, refit as refit_lib
from cdquant_jax.solvers.init import InitConfig
from cdquant_jax.solvers.result import SolveResult

# A move must lower the objective by more than this many ulps of the terms of its Δ.
NOISE_ULPS = 32


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
    SolveResult (Q, codes in original column order; perm from the init) with diagnostics:
    "init_objective", the init's damping ("init_percdamp", ...), "steps" [d_out] (moves per row,
    summed over refit rounds), "objective_trace" (tracked objective every `trace_every` steps of
    the last round, NaN after the loop ended), "tracked_objective" / "recomputed_objective" (end
    of the last round), "max_resync_drift", "global_steps", "refit_objectives".
  Raises:
    ValueError / HessianError naming the layer for bad shapes, values or settings.
  """
  hessian.check_layer_problem(W, H, layer=layer)
  d_in = jnp.shape(W)[1]
  cfg.validate(d_in)
  init = init_lib.initial_solution(W, H, cfg.init, cfg.grid, layer=layer)
  start = init_lib.start_point(W, H, init)
  refine = functools.partial(refine_greedy, start.W, start.H, max_steps=cfg.max_steps(d_in),
                             resync_every=cfg.resync_every, min_phase_rows=cfg.min_phase_rows)
  Q, diag = refine(start.Q, start.grid)
  grid, steps, refit_objectives = start.grid, diag["steps"], []
  for _ in range(cfg.refit_rounds):
    grid, Q, refit_diag = refit_lib.refit_grid(start.W, start.H, Q, grid, cfg.grid,
                                               dead=start.dead)
    refit_objectives.append(refit_diag["objective"])
    Q, diag = refine(Q, grid)
    steps = steps + diag["steps"]
  diagnostics = {**init_lib.init_diagnostics(init), **diag, "steps": steps}
  if refit_objectives:
    diagnostics["refit_objectives"] = jnp.stack(refit_objectives)
  return init_lib.solve_result(W, H, Q, grid, init.perm, diagnostics)


def grid_arrays(grid: Grid, dtype) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) broadcastable to [d_out, d_in]: [d_out, 1] per channel, else expanded."""
  if grid.scale.shape[1] == 1:
    return grid.scale.astype(dtype), grid.zero.astype(dtype)
  s, z = grid.expand()
  return s.astype(dtype), z.astype(dtype)


def phase_sizes(d_out: int, min_rows: int) -> tuple[int, ...]:
  """Row counts of the compaction phases: d_out, then halving while above `min_rows`."""
  sizes = [d_out]
  while sizes[-1] > min_rows:
    sizes.append(max(min_rows, math.ceil(sizes[-1] / 2)))
  return tuple(sizes)


def refine_greedy(W, H, Q0, grid: Grid, *, max_steps: int, resync_every: int,
                  frozen: jax.Array | None = None, trace_every: int | None = None,
                  min_phase_rows: int = 64) -> tuple[jax.Array, dict]:
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
    (Q [d_out, d_in], diagnostics): "steps" [d_out] int32 moves per row, "global_steps",
    "objective_trace" [max_steps // trace_every + 1] (entry k after k·trace_every steps; NaN
    after the loop ended), "trace_every", "tracked_objective" (running sum of the Δ since the
    last resync) and "recomputed_objective" (exact, at the end), "max_resync_drift" (largest
    relative gap between tracked and recomputed objective seen at a resync or at the end).
  """
  dtype = init_lib.working_dtype(W)
  W, H, Q0 = (jnp.asarray(a, dtype) for a in (W, H, Q0))
  d_out, _ = W.shape
  s, z = grid_arrays(grid, dtype)
  trace_every = trace_every or max(1, max_steps // 256)
  frozen = None if frozen is None else jnp.asarray(frozen, bool)
  return _greedy(W, H, Q0, s, z, frozen, maxq=grid.maxq, flavor=grid.flavor,
                 max_steps=int(max_steps), resync_every=int(resync_every),
                 trace_every=int(trace_every), sizes=phase_sizes(d_out, min_phase_rows))


def code_values(C, s, z, Q0, frozen):
  """Weights of codes C [rows, d_in] (frozen coordinates keep Q0)."""
  Q = grids.dequantize_codes(C.astype(s.dtype), s, z)
  return Q if frozen is None else jnp.where(frozen, Q0, Q)


def take_rows(x, idx):
  """Rows idx of x (all of x when idx is None or x is a row-broadcast [1, ...] array)."""
  return x if idx is None or x.shape[0] == 1 else jnp.take(x, idx, axis=0)


@functools.partial(jax.jit, static_argnames=("maxq", "flavor", "max_steps", "resync_every",
                                             "trace_every", "sizes"))
def _greedy(W, H, Q0, s, z, frozen, *, maxq: int, flavor: Flavor, max_steps: int,
            resync_every: int, trace_every: int, sizes: tuple[int, ...]):
  """The phased greedy loop; see `refine_greedy` (s, z broadcastable to [d_out, d_in])."""
  d_out, d_in = W.shape
  diag_h = jnp.diag(H)
  inv_diag = jnp.where(diag_h > 0, 1.0 / jnp.where(diag_h > 0, diag_h, 1.0), 0.0)
  # State: integer codes C as uint8 (bits <= 8; the values are s·(C − z)): "no move" is exact
  # and a quarter of the memory traffic of f32.
  C = grids.codes_of(Q0, s, z, maxq, flavor).astype(jnp.uint8)
  E0 = code_values(C, s, z, Q0, frozen) - W
  G = hdot(E0, H)
  obj = jnp.sum(E0 * G, axis=1)
  steps, active = jnp.zeros((d_out,), jnp.int32), jnp.ones((d_out,), bool)
  kept = None if frozen is None else Q0  # values of the frozen coordinates
  trace = jnp.full((max_steps // trace_every + 2,), jnp.nan, W.dtype).at[0].set(jnp.sum(obj))
  # Loop-global carry: steps done, tracked total objective, trace, largest resync drift.
  glob = (jnp.int32(0), jnp.sum(obj), trace, jnp.zeros((), W.dtype))

  for k, rows in enumerate(sizes):
    handover = sizes[k + 1] if k + 1 < len(sizes) else 0
    # Active rows first; the previous phase ended with at most `rows` of them.
    idx = None if rows == d_out else jnp.argsort(~active, stable=True)[:rows]
    sub = tuple(take_rows(x, idx) for x in (C, G, obj, steps, active))
    consts = tuple(None if x is None else take_rows(x, idx) for x in (W, s, z, kept, frozen))
    outside = glob[1] - jnp.sum(sub[2])
    sub, glob = _phase(sub, glob, consts, H, diag_h, inv_diag, outside, maxq=maxq,
                       flavor=flavor, max_steps=max_steps, resync_every=resync_every,
                       trace_every=trace_every, handover=handover)
    if idx is None:
      C, G, obj, steps, active = sub
    else:
      C, G, obj, steps, active = (x.at[idx].set(y) for x, y in zip((C, G, obj, steps, active),
                                                                      sub))

  t, tracked, trace, drift = glob
  Q = code_values(C, s, z, Q0, frozen)
  E = Q - W
  exact = jnp.sum(hdot(E, H) * E)
  drift = jnp.maximum(drift, jnp.abs(tracked - exact) / jnp.maximum(jnp.abs(exact), 1e-30))
  return Q, dict(codes=C.astype(jnp.int32), steps=steps, global_steps=t,
                 objective_trace=trace[:-1],
                 trace_every=jnp.int32(trace_every), tracked_objective=tracked,
                 recomputed_objective=exact, max_resync_drift=drift)


def _phase(sub, glob, consts, H, diag_h, inv_diag, outside, *, maxq, flavor, max_steps,
           resync_every, trace_every, handover):
  """Greedy steps on a gathered set of rows until at most `handover` stay active."""
  W, s, z, Q0, frozen = consts
  d_in = W.shape[1]
  cols = jnp.arange(d_in, dtype=jnp.int32)[None, :]
  noise = NOISE_ULPS * jnp.finfo(W.dtype).eps
  inv_s = jnp.where(s != 0, 1.0 / jnp.where(s != 0, s, 1.0), 0.0)  # s = 0: nothing moves
  n_trace = max_steps // trace_every + 1
  # Column chunk of the two-level argmin (0: plain two-pass argmin).
  chunk = next((c for c in (128, 64, 32, 16) if d_in % c == 0 and d_in > c), 0)

  def gains(C, G, inv_d, d, s_, inv_s_, frozen_):
    """Δ of moving each coordinate to its best code (broadcastable [rows, cols] operands)."""
    C = C.astype(G.dtype)
    # Best code: nearest to t/s + z = C − g / (H_ii s) (both flavours, since C is an integer
    # code and t = s (C − z) − g / H_ii).
    cand = jnp.clip(jnp.round(C - G * inv_d * inv_s_), 0, maxq)
    delta = s_ * (cand - C)
    if frozen_ is not None:
      delta = jnp.where(frozen_, 0.0, delta)
    return delta * (2.0 * G + delta * d)

  def argmin_rows(C, G):
    """(min Δ, first column reaching it) per row, as plain reductions (XLA:CPU's variadic
    argmin is slow). With column chunks of K: one full pass for the chunk minima, then the
    winning chunk is recomputed from gathered [rows, K] operands."""
    gain = gains(C, G, inv_diag, diag_h, s, inv_s, frozen)
    if not chunk:
      best_gain = jnp.min(gain, axis=1)
      return best_gain, jnp.min(jnp.where(gain == best_gain[:, None], cols, d_in), axis=1)
    # [rows, d_in] -> [rows, d_in / K, K]
    chunk_min = jnp.min(gain.reshape(gain.shape[0], d_in // chunk, chunk), axis=2)
    best_gain = jnp.min(chunk_min, axis=1)
    n_chunks = d_in // chunk
    first = jnp.min(jnp.where(chunk_min == best_gain[:, None],
                              jnp.arange(n_chunks, dtype=jnp.int32)[None, :], n_chunks), axis=1)
    idx = jnp.minimum(first, n_chunks - 1)[:, None] * chunk + jnp.arange(chunk)[None, :]
    take = lambda A: A if A.shape[1] == 1 else jnp.take_along_axis(A, idx, axis=1)
    part = gains(take(C), take(G), inv_diag[idx], diag_h[idx], take(s), take(inv_s),
                 None if frozen is None else take(frozen))
    j = jnp.min(jnp.where(part == jnp.min(part, axis=1)[:, None],
                          jnp.arange(chunk, dtype=jnp.int32)[None, :], chunk - 1), axis=1)
    return best_gain, jnp.take_along_axis(idx, j[:, None], axis=1)[:, 0]

  def step(carry):
    (C, G, obj, steps, active), (t, total, trace, drift) = carry
    best_gain, best = argmin_rows(C, G)
    # The chosen move, recomputed from gathered scalars: [rows].
    pick = lambda A: A[:, 0] if A.shape[1] == 1 else jnp.take_along_axis(A, best[:, None],
                                                                          axis=1)[:, 0]
    c_b, g_b, s_b, d_b = pick(C).astype(G.dtype), pick(G), pick(s), diag_h[best]
    new_b = jnp.clip(jnp.round(c_b - g_b * inv_diag[best] * pick(inv_s)), 0, maxq)
    delta_b = jnp.where(best_gain < 0, s_b * (new_b - c_b), 0.0)
    gain_b = delta_b * (2.0 * g_b + delta_b * d_b)
    # A move counts only if its Δ is negative beyond Δ's own rounding error (otherwise float
    # noise can ping-pong a coordinate between two near-equal values forever).
    allowance = noise * jnp.abs(delta_b) * (2.0 * jnp.abs(g_b) + jnp.abs(delta_b) * d_b)
    move = active & (gain_b + allowance < 0)
    C = jnp.where((cols == best[:, None]) & move[:, None], new_b[:, None].astype(C.dtype), C)
    moved_by = jnp.where(move, delta_b, 0.0)
    # G += δ ⊗ H[i*, :], one gathered row of H per row: [rows, d_in].
    G = G + moved_by[:, None] * jnp.take(H, best, axis=0)
    gained = jnp.where(move, gain_b, 0.0)
    obj, total = obj + gained, total + jnp.sum(gained)
    steps, active, t = steps + move, move, t + 1
    slot = jnp.where(t % trace_every == 0, jnp.minimum(t // trace_every, n_trace), n_trace)
    trace = trace.at[slot].set(total)
    rows_state, glob_state = (C, G, obj, steps, active), (t, total, trace, drift)
    return jax.lax.cond(t % resync_every == 0, resync, lambda c: c, (rows_state, glob_state))

  def resync(carry):
    (C, G, obj, steps, active), (t, total, trace, drift) = carry
    E = code_values(C, s, z, Q0, frozen) - W
    G = hdot(E, H)
    obj = jnp.sum(E * G, axis=1)
    exact = outside + jnp.sum(obj)
    drift = jnp.maximum(drift, jnp.abs(total - exact) / jnp.maximum(jnp.abs(exact), 1e-30))
    return (C, G, obj, steps, active), (t, exact, trace, drift)

  def cond(carry):
    (_, _, _, _, active), (t, _, _, _) = carry
    return (jnp.sum(active) > handover) & (t < max_steps)

  return jax.lax.while_loop(cond, step, (sub, glob))
