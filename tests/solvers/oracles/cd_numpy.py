"""Literal float64 numpy references for the coordinate-descent solvers (written from the math in
algorithms.md 3.2, independently of the JAX code: no rounding formula, every grid value of a
coordinate is enumerated).

Grids are given per weight: scale, zero [d_out, d_in]; the values of weight (r, i) are
scale[r, i] * (c - zero[r, i]) for the integer codes c = 0..maxq.
"""

import itertools

import numpy as np


def objective(W, Q, H):
  """tr((W − Q) H (W − Q)ᵀ) in float64."""
  E = np.asarray(Q, np.float64) - np.asarray(W, np.float64)
  return float(np.einsum("ri,ij,rj->", E, np.asarray(H, np.float64), E))


def _values(scale, zero, maxq, r, i):
  codes = np.arange(maxq + 1, dtype=np.float64)
  return scale[r, i] * (codes - zero[r, i])


# Exact ties: a move whose Δ is within this fraction of the size of its terms
# (2|δ|·(|H| |q − w|)_i + δ²H_ii) of zero is a float64 rounding artefact (e.g. a coordinate
# exactly between two grid values) and does not count as an improvement.
TIE = 1e-12


def best_single_move(W, H, Q, scale, zero, maxq, r, frozen=None):
  """(Δ, i, value) of the best improving single-coordinate move of row r (i = -1: none).

  Ties between coordinates → lowest i.
  """
  W, H, Q = (np.asarray(a, np.float64) for a in (W, H, Q))
  g = H @ (Q[r] - W[r])
  g_size = np.abs(H) @ np.abs(Q[r] - W[r])
  best = (0.0, -1, None)
  for i in range(W.shape[1]):
    if frozen is not None and frozen[r, i]:
      continue
    values = _values(scale, zero, maxq, r, i)
    # Moves between grid points (the current value is a grid point up to float rounding).
    deltas = values - values[int(np.argmin(np.abs(values - Q[r, i])))]
    gains = 2 * deltas * g[i] + deltas**2 * H[i, i]
    size = 2 * np.abs(deltas) * g_size[i] + deltas**2 * H[i, i]
    gains = np.where(gains < -TIE * size, gains, 0.0)
    j = int(np.argmin(gains))
    if gains[j] < best[0]:
      best = (float(gains[j]), i, values[j])
  return best


def greedy_cd(W, H, Q0, scale, zero, maxq, max_steps, frozen=None):
  """Greedy CD, one row at a time: apply the best single move while it lowers the objective.

  Returns:
    (Q [d_out, d_in], steps [d_out]: moves per row, per-row objective traces (lists)).
  """
  W, H = np.asarray(W, np.float64), np.asarray(H, np.float64)
  scale, zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
  Q = np.array(Q0, np.float64)
  steps = np.zeros(W.shape[0], int)
  traces = []
  for r in range(W.shape[0]):
    trace = [objective(W[r:r + 1], Q[r:r + 1], H)]
    for _ in range(max_steps):
      gain, i, value = best_single_move(W, H, Q, scale, zero, maxq, r, frozen)
      if i < 0:
        break
      Q[r, i] = value
      steps[r] += 1
      trace.append(objective(W[r:r + 1], Q[r:r + 1], H))
    traces.append(trace)
  return Q, steps, traces


def code_of(Q, scale, zero, maxq, r, i):
  """The integer code whose value is nearest to Q[r, i] (enumerated)."""
  values = _values(scale, zero, maxq, r, i)
  return int(np.argmin(np.abs(values - Q[r, i])))


def best_block_move(W, H, Q, scale, zero, maxq, r, block, radius):
  """Brute force: the best joint move of `block` (coordinates) in row r.

  Each coordinate may take the codes within `radius` of its current code (clipped to the grid).
  Returns (Δ, new values [len(block)]), Δ = exact objective change (≤ 0: no move is allowed).
  """
  W, H, Q = (np.asarray(a, np.float64) for a in (W, H, Q))
  base = objective(W[r:r + 1], Q[r:r + 1], H)
  options = []
  for i in block:
    c = code_of(Q, scale, zero, maxq, r, i)
    codes = sorted({min(max(c + d, 0), maxq) for d in range(-radius, radius + 1)})
    options.append([scale[r, i] * (k - zero[r, i]) for k in codes])
  best = (0.0, Q[r, list(block)].copy())
  for values in itertools.product(*options):
    q = Q[r].copy()
    q[list(block)] = values
    gain = objective(W[r:r + 1], q[None], H) - base
    if gain < best[0]:
      best = (gain, np.array(values))
  return best


def cyclic_cd(W, H, Q0, scale, zero, maxq, sweeps, order=None):
  """Cyclic CD: per sweep, columns in `order`, each weight set to its best grid value.

  Returns (Q, sweeps run); stops after a sweep without an improving move.
  """
  W, H = np.asarray(W, np.float64), np.asarray(H, np.float64)
  Q = np.array(Q0, np.float64)
  order = range(W.shape[1]) if order is None else order
  for k in range(sweeps):
    changed = 0
    for i in order:
      for r in range(W.shape[0]):
        g = H[i] @ (Q[r] - W[r])
        g_size = np.abs(H[i]) @ np.abs(Q[r] - W[r])
        values = _values(scale, zero, maxq, r, i)
        deltas = values - values[int(np.argmin(np.abs(values - Q[r, i])))]
        gains = 2 * deltas * g + deltas**2 * H[i, i]
        size = 2 * np.abs(deltas) * g_size + deltas**2 * H[i, i]
        gains = np.where(gains < -TIE * size, gains, 0.0)
        j = int(np.argmin(gains))
        if gains[j] < 0:
          Q[r, i] = values[j]
          changed += 1
    if not changed:
      return Q, k + 1
  return Q, sweeps
