"""What a solver reports besides its solution: one dataclass for every method.

Every field is optional (None = the method has no such quantity); all present fields are JAX
arrays, so a `Diagnostics` passes through `jax.jit` and tree maps like the rest of a SolveResult.
Objectives are in the units of the layer objective tr((W − Q) H (W − Q)ᵀ) on the undamped H.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Damping:
  """The damping a GPTQ-style sweep used (after any escalation).

  Attributes:
    percdamp: f32 scalar, relative damping (fraction of the mean diagonal of H).
    damp: f32 scalar, absolute value added to the diagonal of H.
    escalations: int32 scalar, how many times the damping was multiplied after a failed Cholesky.
  """

  percdamp: jax.Array
  damp: jax.Array
  escalations: jax.Array

  @classmethod
  def of(cls, prepared) -> "Damping":
    """The damping of a `hessian.PreparedHessian`."""
    return cls(percdamp=jnp.asarray(prepared.percdamp, jnp.float32),
               damp=jnp.asarray(prepared.damp, jnp.float32),
               escalations=jnp.asarray(prepared.escalations, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Diagnostics:
  """Diagnostics of one solve (None where a method has no such quantity).

  Attributes:
    damping: the damping of the method's GPTQ/SpQR sweep, or of its GPTQ start (descent
      solvers); None for RTN and RTN starts.
    init_objective: scalar, objective of the start (descent solvers: the RTN/GPTQ start or, for
      BCD with cd_first, the CD solution; SpQR+CD: the SpQR solution).
    steps: [d_out] int32 accepted moves per row (CD: coordinate moves summed over refit rounds;
      BCD: block moves; cyclic: coordinate changes; SpQR+CD: accepted CD moves of all rounds).
    global_steps: int32 scalar, greedy steps of the whole layer (CD, BCD).
    rounds: int32 scalar, outer rounds run: BCD scans, cyclic sweeps.
    objective_trace: [n] tracked objective, entry 0 at the start; then every `trace_every`
      steps (CD), after each scan round (BCD), after each sweep (cyclic), after each half-round
      (SpQR+CD). NaN after the loop ended.
    trace_every: int32 scalar, greedy steps between two entries of the CD trace (CD only).
    tracked_objective: scalar, the loop's running objective at the end (a sum of Δ since the
      last exact recomputation).
    recomputed_objective: scalar, the objective recomputed exactly at the end.
    max_resync_drift: scalar, largest relative gap between tracked and recomputed objective at a
      resync or at the end (CD, BCD).
    refit_objectives: [refit_rounds] objective after each closed-form grid refit (CD).
    accepted_rows: [2 · rounds] int32 rows whose objective each half-round lowered (SpQR+CD:
      CD pass, outlier re-solve, CD pass, ...; aligned with objective_trace[1:]).
    outlier_fraction: f32 scalar, share of weights kept as outliers (SpQR, SpQR+CD).
    tau_abs: f32 scalar, absolute outlier threshold on the OBS saliency (SpQR, SpQR+CD).
    gptq_loss: scalar, the GPTQ reference's Σ (w − q)² / U_jj² / 2 (GPTQ).
  """

  damping: Damping | None = None
  init_objective: jax.Array | None = None
  steps: jax.Array | None = None
  global_steps: jax.Array | None = None
  rounds: jax.Array | None = None
  objective_trace: jax.Array | None = None
  trace_every: jax.Array | None = None
  tracked_objective: jax.Array | None = None
  recomputed_objective: jax.Array | None = None
  max_resync_drift: jax.Array | None = None
  refit_objectives: jax.Array | None = None
  accepted_rows: jax.Array | None = None
  outlier_fraction: jax.Array | None = None
  tau_abs: jax.Array | None = None
  gptq_loss: jax.Array | None = None

  def replace(self, **changes) -> "Diagnostics":
    return dataclasses.replace(self, **changes)

  def started_from(self, start) -> "Diagnostics":
    """These diagnostics with the objective and damping of the start `start` (a SolveResult)."""
    return self.replace(init_objective=start.objective, damping=start.diagnostics.damping)
