"""One SolveResult for the full W from the results of contiguous row shards of it.

Per-row arrays (Q, codes, outlier mask, grid scale / zero, SpQR's first- and second-level
tables, diagnostics.steps) are concatenated in row order. Arrays that depend on H alone (perm,
grid.group_index, damping, SpQR's τ_abs, CD's trace_every) are the same in every shard and
taken from the first (`merge` checks perm). The objective is recomputed on the full W.
Layer-wide diagnostics are combined as the joint solve would have reported them:

  sums        init_objective, tracked_objective, recomputed_objective, refit_objectives,
              accepted_rows, gptq_loss (each is a sum over rows);
  maxima      global_steps (CD: steps until the last row stopped), rounds (sweeps / scans
              until the last row stopped); max_resync_drift (the largest shard drift: each is
              relative to its shard's objective, so this is not the joint drift);
  traces      objective_trace: each shard's trace carried forward from its last entry (a
              stopped shard keeps its final objective), summed, NaN after the longest;
  recomputed  outlier_fraction = mean of the merged outlier mask.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax._numerics import layer_objective
from cdquant_jax.solvers.diagnostics import Diagnostics
from cdquant_jax.solvers.result import SolveResult, SpQRStats

_SUMS = ("init_objective", "tracked_objective", "recomputed_objective", "refit_objectives",
         "accepted_rows", "gptq_loss")
_MAXIMA = ("global_steps", "rounds", "max_resync_drift")
_FIRST = ("damping", "trace_every", "tau_abs")


def _concat(arrays: Sequence[jax.Array | None], device) -> jax.Array | None:
  """Row-wise concatenation on `device` (None when the field is absent)."""
  if arrays[0] is None:
    return None
  return jnp.concatenate([jax.device_put(a, device) for a in arrays], axis=0)


def merged_trace(traces: Sequence[np.ndarray]) -> np.ndarray:
  """Σ of the shard traces [n] (NaN after each shard's last entry) carried forward, NaN after
  the longest shard's last entry."""
  dtype = np.asarray(traces[0]).dtype
  traces = [np.asarray(t, np.float64) for t in traces]
  lengths = [int(np.sum(np.isfinite(t))) for t in traces]
  longest = max(lengths)
  total = np.zeros(traces[0].shape, np.float64)
  for t, n in zip(traces, lengths):
    filled = t.copy()
    filled[n:] = t[n - 1] if n else 0.0
    total += filled
  total[longest:] = np.nan
  return total.astype(dtype)


def _diagnostics(parts: Sequence[Diagnostics], mask: jax.Array, device) -> Diagnostics:
  """The diagnostics of the joint solve (module docstring)."""
  get = lambda name: [getattr(p, name) for p in parts]
  values = {}
  for field in dataclasses.fields(Diagnostics):
    name, first = field.name, getattr(parts[0], field.name)
    if first is None:
      continue
    if name in _SUMS:
      values[name] = sum(jax.device_put(v, device) for v in get(name))
    elif name in _MAXIMA:
      values[name] = jnp.max(jnp.stack([jax.device_put(v, device) for v in get(name)]))
    elif name in _FIRST:
      values[name] = jax.device_put(first, device)
    elif name == "steps":
      values[name] = _concat(get(name), device)
    elif name == "objective_trace":
      values[name] = jax.device_put(merged_trace(jax.device_get(get(name))), device)
    elif name == "outlier_fraction":
      values[name] = jnp.mean(mask.astype(jnp.float32))
    else:
      raise NotImplementedError(f"no merge rule for Diagnostics.{name}")
  return Diagnostics(**values)


def _spqr_stats(parts: Sequence[SpQRStats | None], device) -> SpQRStats | None:
  if parts[0] is None:
    return None
  arrays = {name: _concat([getattr(p, name) for p in parts], device)
            for name in parts[0].arrays()}
  return dataclasses.replace(parts[0], **arrays)


def merge(parts: Sequence[SolveResult], W: jax.Array, H: jax.Array, device=None) -> SolveResult:
  """The result of the full W [d_out, d_in] from results of its row shards (in row order).

  Args:
    parts: shard results, shard k covering the next parts[k].Q.shape[0] rows of W.
    W, H: the full layer problem (the objective is recomputed on it).
    device: where the merged arrays live (default: the device of parts[0].Q).
  """
  device = device or next(iter(parts[0].Q.devices()))
  perms = jax.device_get([p.perm for p in parts])
  if any(not np.array_equal(perms[0], p) for p in perms[1:]):
    raise ValueError("shards processed the columns in different orders; a shard's perm must "
                     "depend on H only")
  first = parts[0]
  grid = dataclasses.replace(first.grid, scale=_concat([p.grid.scale for p in parts], device),
                             zero=_concat([p.grid.zero for p in parts], device),
                             group_index=jax.device_put(first.grid.group_index, device))
  Q = _concat([p.Q for p in parts], device)
  mask = _concat([p.outlier_mask for p in parts], device)
  W, H = jax.device_put(jnp.asarray(W, Q.dtype), device), jax.device_put(jnp.asarray(H), device)
  return first.replace(Q=Q, codes=_concat([p.codes for p in parts], device), grid=grid,
                       perm=jax.device_put(first.perm, device),
                       objective=layer_objective(W, Q, H.astype(Q.dtype)), outlier_mask=mask,
                       diagnostics=_diagnostics([p.diagnostics for p in parts], mask, device),
                       spqr=_spqr_stats([p.spqr for p in parts], device))
