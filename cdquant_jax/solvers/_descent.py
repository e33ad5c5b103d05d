"""Descent machinery shared by greedy CD (cd.py), block CD (bcd.py) and cyclic CD (cyclic.py).

The three solvers move integer codes C [rows, d_in] on a FIXED grid, Q = s (C − z) (s, z
broadcastable to [rows, d_in]; frozen coordinates keep their start value), and keep
G = (Q − W) H, with which moving coordinate i of a row by δ changes its objective by

    Δ_i(δ) = 2 δ g_i + δ² H_ii                                  (algorithms.md 3.2).

Each solver file keeps only its own step rule (which moves a step considers and applies); this
module holds what they share:

  grid operands   `grid_arrays`, `code_values`, `Consts`;
  best code       the code nearest to a coordinate's unconstrained optimum t = q − g / H_ii,
                  i.e. to C − g / (H_ii s) (`best_code`, `single_moves`);
  noise rule      a move counts only if its Δ is negative beyond `NOISE_ULPS` ulps of the
                  magnitudes of its terms (`noise_level`, `beats_noise`); otherwise float noise can
                  ping-pong a coordinate between two near-equal values forever;
  moves           `apply_moves` (one coordinate per row, G updated with a gathered row of H),
                  `row_argmin`;
  resync          exact recomputation of G, the row objectives and the drift of the tracked
                  objective (`exact_rows`, `resync`, `resync_every`, `finish`);
  row compaction  the loop runs in phases on the rows still pending, gathered into smaller
                  arrays (`phase_sizes`, `take_rows`, `run_phases`): rows converge at very
                  different speeds, and the cost of a step follows the gathered rows.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cdquant_jax._numerics import hdot
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Grid
from cdquant_jax.solvers.diagnostics import Diagnostics

# A move must lower the objective by more than this many ulps of the terms of its Δ.
NOISE_ULPS = 32


class Consts(NamedTuple):
  """Per-row constants of a descent problem (gathered with the rows of a phase).

  Attributes:
    W: [rows, d_in] target weights (dead columns zeroed).
    s, z: scale and zero, [rows, 1] per channel or [rows, d_in].
    kept: None, or [rows, d_in] the values of the frozen coordinates.
    frozen: None, or [rows, d_in] bool coordinates that never move.
  """

  W: jax.Array
  s: jax.Array
  z: jax.Array
  kept: jax.Array | None
  frozen: jax.Array | None


class Curvature(NamedTuple):
  """The Hessian operands of a step: H [d_in, d_in], its diagonal and 1 / diagonal (0 where the
  diagonal is not positive: dead columns never move), both [d_in]."""

  H: jax.Array
  diag: jax.Array
  inv_diag: jax.Array


class Rows(NamedTuple):
  """Per-row loop state.

  Attributes:
    C: [rows, d_in] codes (integers, stored as floats or uint8).
    G: [rows, d_in] (Q − W) H, updated per move and recomputed at a resync.
    obj: [rows] tracked row objectives.
    steps: [rows] int32 moves applied.
    pending: [rows] bool, rows the loop still works on (compaction gathers these first).
  """

  C: jax.Array
  G: jax.Array
  obj: jax.Array
  steps: jax.Array
  pending: jax.Array


class Totals(NamedTuple):
  """Layer-wide loop state.

  Attributes:
    t: int32 greedy steps taken.
    tracked: total objective of all rows (running sum of Δ since the last resync).
    drift: largest relative gap between tracked and exact objective seen at a resync.
    rounds: int32 outer rounds run (BCD scans; 0 for CD).
    trace: [n + 1] objective trace, NaN where not reached; the last entry is a scratch slot.
  """

  t: jax.Array
  tracked: jax.Array
  drift: jax.Array
  rounds: jax.Array
  trace: jax.Array


# ----------------------------------------------------------------------------------------------
# Grid operands and the single-coordinate rules.


def grid_arrays(grid: Grid, dtype) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) broadcastable to [d_out, d_in]: [d_out, 1] per channel, else expanded."""
  if grid.scale.shape[1] == 1:
    return grid.scale.astype(dtype), grid.zero.astype(dtype)
  s, z = grid.expand()
  return s.astype(dtype), z.astype(dtype)


def code_values(C, consts: Consts) -> jax.Array:
  """Weights [rows, d_in] of the codes C [rows, d_in] (frozen coordinates keep their values)."""
  Q = grids.dequantize_codes(C.astype(consts.s.dtype), consts.s, consts.z)
  return Q if consts.frozen is None else jnp.where(consts.frozen, consts.kept, Q)


def safe_inverse(x, usable) -> jax.Array:
  """1 / x where `usable`, 0 elsewhere (element-wise)."""
  return jnp.where(usable, 1.0 / jnp.where(usable, x, 1.0), 0.0)


def curvature(H) -> Curvature:
  """H [d_in, d_in] with its diagonal and safe inverse diagonal."""
  diag_h = jnp.diag(H)
  return Curvature(H=H, diag=diag_h, inv_diag=safe_inverse(diag_h, diag_h > 0))


def best_code(C, g, inv_d, inv_s, maxq: int) -> jax.Array:
  """Code nearest to a coordinate's optimum given the others (broadcastable operands).

  Nearest to t / s + z = C − g / (H_ii s) for both flavours, since C is an integer code and
  t = s (C − z) − g / H_ii; inv_d = 1 / H_ii and inv_s = 1 / s (0 where nothing may move).
  """
  return jnp.clip(jnp.round(C - g * inv_d * inv_s), 0, maxq)


def single_moves(C, g, inv_d, d, s, inv_s, fixed, maxq: int):
  """The best single-coordinate move of each coordinate (broadcastable operands).

  Args:
    C: float codes; g: G entries; inv_d, d: 1 / H_ii and H_ii; s, inv_s: scale and 1 / s.
    fixed: None or bool, coordinates that must not move (their δ is 0).
    maxq: largest code.
  Returns:
    (new code, δ = s (new − C), Δ = δ (2 g + δ H_ii)).
  """
  code = best_code(C, g, inv_d, inv_s, maxq)
  delta = s * (code - C)
  if fixed is not None:
    delta = jnp.where(fixed, 0.0, delta)
  return code, delta, delta * (2.0 * g + delta * d)


def noise_level(dtype) -> float:
  """Relative rounding allowance of a Δ: `NOISE_ULPS` ulps of `dtype`."""
  return NOISE_ULPS * jnp.finfo(dtype).eps


def beats_noise(gain, delta, g, d, noise) -> jax.Array:
  """Whether a single move's Δ = `gain` is negative beyond the rounding error of its terms
  (|δ| (2 |g| + |δ| H_ii), scaled by `noise`)."""
  return gain + noise * jnp.abs(delta) * (2.0 * jnp.abs(g) + jnp.abs(delta) * d) < 0


def row_argmin(x) -> tuple[jax.Array, jax.Array]:
  """(min, first column reaching it) of each row of x [rows, n], as plain reductions (XLA:CPU's
  variadic argmin is slow); the column is n where no entry equals the min (a NaN row)."""
  best = jnp.min(x, axis=1)
  cols = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
  return best, jnp.min(jnp.where(x == best[:, None], cols, x.shape[1]), axis=1)


def apply_moves(C, G, H, col, code, delta) -> tuple[jax.Array, jax.Array]:
  """One move per row: C[r, col_r] ← code_r and G[r] += δ_r H[col_r, :].

  Args:
    C, G: [rows, d_in] codes and (Q − W) H; H: [d_in, d_in].
    col: [rows] int32 moved coordinate; code: [rows] its new code; delta: [rows] its δ
      (δ = 0 and code = the current code: no move).
  """
  cols = jnp.arange(C.shape[1], dtype=jnp.int32)[None, :]
  C = jnp.where(cols == col[:, None], code[:, None].astype(C.dtype), C)
  # G += δ ⊗ H[col, :], one gathered row of H per row: [rows, d_in].
  return C, G + delta[:, None] * jnp.take(H, col, axis=0)


# ----------------------------------------------------------------------------------------------
# Exact recomputation.


def gradient(C, consts: Consts, H) -> tuple[jax.Array, jax.Array]:
  """(E, G) of the codes C: E = Q − W and G = E H, both [rows, d_in]."""
  E = code_values(C, consts) - consts.W
  return E, hdot(E, H)


def exact_rows(C, consts: Consts, H) -> tuple[jax.Array, jax.Array]:
  """(G [rows, d_in], row objectives [rows]) recomputed exactly from the codes C."""
  E, G = gradient(C, consts, H)
  return G, jnp.sum(E * G, axis=1)


def relative_gap(tracked, exact) -> jax.Array:
  """|tracked − exact| / |exact| (scalars)."""
  return jnp.abs(tracked - exact) / jnp.maximum(jnp.abs(exact), 1e-30)


def resync(rows: Rows, totals: Totals, consts: Consts, H, outside) -> tuple[Rows, Totals]:
  """Exact G and objectives of the gathered rows; records the drift of the tracked total.

  `outside` is the tracked objective of the rows that are not gathered (unchanged by a phase).
  """
  G, obj = exact_rows(rows.C, consts, H)
  exact = outside + jnp.sum(obj)
  drift = jnp.maximum(totals.drift, relative_gap(totals.tracked, exact))
  return rows._replace(G=G, obj=obj), totals._replace(tracked=exact, drift=drift)


def resync_every(rows: Rows, totals: Totals, consts: Consts, H, outside,
                 every: int) -> tuple[Rows, Totals]:
  """`resync` when the step count totals.t is a multiple of `every`, else the state as is."""
  return jax.lax.cond(totals.t % every == 0, lambda st: resync(*st, consts, H, outside),
                      lambda st: st, (rows, totals))


def start(C, consts: Consts, H, n_trace: int) -> tuple[Rows, Totals]:
  """The loop state at codes C: exact G and objectives, every row pending, an empty trace of
  `n_trace` entries (entry 0 = the start) plus the scratch slot."""
  G, obj = exact_rows(C, consts, H)
  d_out = C.shape[0]
  rows = Rows(C=C, G=G, obj=obj, steps=jnp.zeros((d_out,), jnp.int32),
              pending=jnp.ones((d_out,), bool))
  trace = jnp.full((n_trace + 1,), jnp.nan, G.dtype).at[0].set(jnp.sum(obj))
  totals = Totals(t=jnp.int32(0), tracked=jnp.sum(obj), drift=jnp.zeros((), G.dtype),
                  rounds=jnp.int32(0), trace=trace)
  return rows, totals


def solution(C, consts: Consts, H) -> tuple[jax.Array, jax.Array]:
  """(Q [rows, d_in], its exact objective) of the codes C."""
  Q = code_values(C, consts)
  E = Q - consts.W
  return Q, jnp.sum(hdot(E, H) * E)


def finish(rows: Rows, totals: Totals, consts: Consts, H) -> tuple[jax.Array, Diagnostics]:
  """(Q, diagnostics) at the end of a phased loop: exact objective, final drift, trace."""
  Q, exact = solution(rows.C, consts, H)
  drift = jnp.maximum(totals.drift, relative_gap(totals.tracked, exact))
  return Q, Diagnostics(steps=rows.steps, global_steps=totals.t,
                        objective_trace=totals.trace[:-1], tracked_objective=totals.tracked,
                        recomputed_objective=exact, max_resync_drift=drift)


# ----------------------------------------------------------------------------------------------
# Row compaction.


# Each compaction phase gathers 1/PHASE_SHRINK of the previous phase's rows. Every phase is a
# loop of its own in the compiled program (about a second of XLA compile each on a CPU), so
# fewer, steeper phases trade a little gathered work for compile time. Speed only.
PHASE_SHRINK = 4


def phase_sizes(d_out: int, min_rows: int) -> tuple[int, ...]:
  """Row counts of the compaction phases: d_out, then / PHASE_SHRINK while above `min_rows`."""
  sizes = [d_out]
  while sizes[-1] > min_rows:
    sizes.append(max(min_rows, math.ceil(sizes[-1] / PHASE_SHRINK)))
  return tuple(sizes)


def take_rows(x, idx):
  """Rows idx of x (x itself when idx or x is None or x is a row-broadcast [1, ...] array)."""
  return x if idx is None or x is None or x.shape[0] == 1 else jnp.take(x, idx, axis=0)


Phase = Callable[[Rows, Totals, Consts, jax.Array, int], tuple[Rows, Totals]]


def run_phases(rows: Rows, totals: Totals, consts: Consts, sizes: tuple[int, ...],
               phase: Phase) -> tuple[Rows, Totals]:
  """Runs `phase` on gathers of sizes[k] rows, pending rows first, k = 0, 1, ...

  phase(rows, totals, consts, outside, handover) works on the gathered rows until at most
  `handover` (the next phase's size; 0 for the last) of them are pending; `outside` is the
  tracked objective of the rows not gathered. Shapes stay static: the phases are unrolled.
  """
  d_out = rows.C.shape[0]
  for k, n_rows in enumerate(sizes):
    handover = sizes[k + 1] if k + 1 < len(sizes) else 0
    # Pending rows first; the previous phase ended with at most `n_rows` of them.
    idx = None if n_rows == d_out else jnp.argsort(~rows.pending, stable=True)[:n_rows]
    sub = Rows(*(take_rows(x, idx) for x in rows))
    outside = totals.tracked - jnp.sum(sub.obj)
    sub, totals = phase(sub, totals, Consts(*(take_rows(x, idx) for x in consts)), outside,
                        handover)
    rows = sub if idx is None else Rows(*(x.at[idx].set(y) for x, y in zip(rows, sub)))
  return rows, totals
