"""Layer Hessians: streaming accumulation, checks, damping, dead columns, inverse Cholesky.

Conventions (algorithms.md 0, 1.2, 2.2):
  H = (2 / n) Σ_tokens x xᵀ, with n counting *sequences* (GPTQ/SpQR `add_batch`), f32, HIGHEST.
  Dead column i: H_ii == 0 ⇒ H_ii := 1 and W[:, i] := 0 (it quantizes to the code of 0).
  Damping: H += percdamp · mean(diag H) · I. GPTQ fixes dead columns first, then damps;
           SpQR damps first (with mean |diag H|), then overwrites dead diagonals with 1.
  U: the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), the only inverse GPTQ/SpQR use.

When the Cholesky of the damped H fails, the damping is escalated ×`escalation_factor` up to
`max_escalations` times; each step is logged, and a `HessianError` naming the layer, its shape
and every damping tried is raised if none works. There is no silent fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax._numerics import HIGHEST, hdot

log = logging.getLogger(__name__)

DampOrder = Literal["gptq", "spqr"]


class HessianError(ValueError):
  """A Hessian or its activations are unusable (NaN/Inf, shape, not positive definite)."""


# ----------------------------------------------------------------------------------------------
# Streaming accumulation.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianState:
  """Running Hessian: H [d_in, d_in] f32 and the number of sequences n seen (f32 scalar)."""

  H: jax.Array
  n: jax.Array

  @classmethod
  def zeros(cls, d_in: int) -> "HessianState":
    return cls(H=jnp.zeros((d_in, d_in), jnp.float32), n=jnp.zeros((), jnp.float32))


def accumulate_batch(state: HessianState, x: jax.Array, rows: jax.Array | None = None
                     ) -> tuple[HessianState, jax.Array]:
  """Traceable core of `accumulate` (for use inside a caller's jit): the updated state and a
  bool scalar, whether every value of x is finite. No checks.

  rows: how many of x's b sequences count towards n (scalar; default b), for a batch padded
  with rows of exact zeros, which add nothing to Σ x xᵀ."""
  b = x.shape[0] if rows is None else rows
  # [b, ..., d_in] -> [tokens, d_in]
  tokens = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n = state.n + b
  # Running mean as in GPTQ: H ← H·n_old/n + (2/n) Σ x xᵀ.
  scaled = tokens * jnp.sqrt(2.0 / n)
  H = state.H * (state.n / n) + hdot(scaled.T, scaled)
  finite = jnp.all(jnp.isfinite(tokens))
  return HessianState(H=H, n=n), finite


_accumulate = jax.jit(accumulate_batch)


def accumulate(state: HessianState, x: jax.Array, *, layer: str = "?") -> HessianState:
  """Adds a batch of activations to the running Hessian.

  Args:
    state: running Hessian.
    x: [n_seq, seq_len, d_in] (or [n_seq, d_in]) inputs of the layer; n_seq sequences count
      towards n, as in GPTQ.
    layer: name used in error messages.
  Raises:
    HessianError: NaN/Inf in x, or a feature size that does not match H.
  """
  if x.shape[-1] != state.H.shape[0]:
    raise HessianError(f"layer {layer}: activations have {x.shape[-1]} features, "
                       f"Hessian expects {state.H.shape[0]}")
  new, finite = _accumulate(state, x)
  if not bool(finite):
    bad = int(jnp.sum(~jnp.isfinite(x)))
    raise HessianError(f"layer {layer}: {bad} NaN/Inf values in the calibration activations "
                       f"of shape {tuple(x.shape)}")
  return new


def hessian_from_inputs(X: jax.Array, *, layer: str = "?") -> jax.Array:
  """H = 2/n Σ x xᵀ from inputs X [n_seq, seq_len, d_in] (or [n_seq, d_in]) in one batch."""
  return accumulate(HessianState.zeros(X.shape[-1]), X, layer=layer).H


# ----------------------------------------------------------------------------------------------
# Validation.


@jax.jit
def _problem_stats(W: jax.Array, H: jax.Array) -> dict[str, jax.Array]:
  """NaN/Inf counts of W and H, max |H| and max |H − Hᵀ| (scalars), in one device program."""
  return dict(bad_W=jnp.sum(~jnp.isfinite(W)), bad_H=jnp.sum(~jnp.isfinite(H)),
              scale=jnp.max(jnp.abs(H)), asym=jnp.max(jnp.abs(H - H.T)))


def check_layer_problem(W, H, *, layer: str = "?") -> None:
  """Raises ValueError/HessianError naming the problem if (W, H) is not a valid layer problem.

  Shapes are checked on the host; values with one small device program and one host sync.
  """
  W_shape, H_shape = np.shape(W), np.shape(H)
  if len(W_shape) != 2:
    raise ValueError(f"layer {layer}: W must be 2-D [d_out, d_in], got shape {W_shape}")
  if len(H_shape) != 2 or H_shape[0] != H_shape[1]:
    raise HessianError(f"layer {layer}: H must be square, got shape {H_shape}")
  if H_shape[0] != W_shape[1]:
    raise ValueError(f"layer {layer}: W has d_in={W_shape[1]} but H is {H_shape[0]}x{H_shape[1]}")
  stats = jax.device_get(_problem_stats(jnp.asarray(W), jnp.asarray(H)))
  if stats["bad_W"]:
    raise ValueError(f"layer {layer}: W has {int(stats['bad_W'])} NaN/Inf values")
  if stats["bad_H"]:
    raise HessianError(f"layer {layer}: H has {int(stats['bad_H'])} NaN/Inf values")
  asym = float(stats["asym"]) / max(float(stats["scale"]), 1e-30)
  if asym > 1e-4:
    raise HessianError(f"layer {layer}: H is not symmetric (max |H - Hᵀ| / max |H| = {asym:.3g})")


# ----------------------------------------------------------------------------------------------
# Damping, dead columns, inverse Cholesky.


def dead_columns(H: jax.Array) -> jax.Array:
  """[d_in] bool, columns whose diagonal Hessian entry is exactly zero."""
  return jnp.diag(H) == 0


def fix_dead(H: jax.Array, W: jax.Array, dead: jax.Array) -> tuple[jax.Array, jax.Array]:
  """H_ii := 1 and W[:, i] := 0 on dead columns i."""
  d = jnp.diag(H)
  H = H + jnp.diag(jnp.where(dead, 1.0 - d, 0.0))
  return H, jnp.where(dead[None, :], 0.0, W)


def damp_and_fix_dead(H: jax.Array, W: jax.Array, percdamp: float | jax.Array,
                      order: DampOrder) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies damping and the dead-column rule in the reference order.

  Args:
    H: [d_in, d_in] Hessian (undamped).
    W: [d_out, d_in] weights.
    percdamp: relative damping (fraction of the mean diagonal).
    order: "gptq" (dead fix, then + percdamp·mean diag) or "spqr" (+ percdamp·mean |diag|, then
      dead diagonals overwritten with 1).
  Returns:
    (damped H, W with dead columns zeroed, absolute damping added).
  """
  dead = dead_columns(H)
  eye = jnp.eye(H.shape[0], dtype=H.dtype)
  if order == "gptq":
    H, W = fix_dead(H, W, dead)
    damp = percdamp * jnp.mean(jnp.diag(H))
    return H + damp * eye, W, damp
  damp = percdamp * jnp.mean(jnp.abs(jnp.diag(H)))
  H = H + damp * eye
  H, W = fix_dead(H, W, dead)
  return H, W, damp


@jax.jit
def inverse_cholesky_upper(H: jax.Array) -> jax.Array:
  """U upper triangular with H⁻¹ = Uᵀ U (GPTQ's `cholesky(cholesky_inverse(cholesky(H)), upper)`).

  Computed without forming H⁻¹: with J the reversal permutation and J H J = L̃ L̃ᵀ (Cholesky),
  H = R Rᵀ for the upper triangular R = J L̃ J, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = J L̃⁻¹ J (the
  unique upper factor with a positive diagonal): one Cholesky and one triangular inverse
  instead of two Choleskys, a triangular inverse and a matmul, and more accurate.
  Returns NaNs when H is not numerically positive definite (checked by the callers).
  """
  # [d_in, d_in] reversed in both axes: J H J.
  L = jnp.linalg.cholesky(H[::-1, ::-1])
  eye = jnp.eye(H.shape[0], dtype=H.dtype)
  Linv = jax.lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)
  return Linv[::-1, ::-1]


def factor_ok(U: jax.Array) -> jax.Array:
  """bool scalar: U is a usable factor (finite, positive diagonal)."""
  return jnp.all(jnp.isfinite(U)) & jnp.all(jnp.diag(U) > 0)


def damped_factor(H: jax.Array, W: jax.Array, percdamp: jax.Array, order: DampOrder):
  """One damping attempt: (damped H, W, U, absolute damp, factor ok); traceable (a solver's
  program can include its first attempt)."""
  Hd, Wd, damp = damp_and_fix_dead(H, W, percdamp, order)
  U = inverse_cholesky_upper(Hd)
  return Hd, Wd, U, damp, factor_ok(U)


_damped_factor = jax.jit(damped_factor, static_argnames="order")


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
  """A damped Hessian ready for a column sweep.

  Attributes:
    H: [d_in, d_in] damped Hessian with dead columns fixed (in the processing order given).
    W: [d_out, d_in] weights with dead columns zeroed.
    U: [d_in, d_in] upper Cholesky factor of H⁻¹.
    percdamp: relative damping finally used (after any escalation).
    damp: absolute damping added to the diagonal.
    escalations: how many times the damping was multiplied.
  """

  H: jax.Array
  W: jax.Array
  U: jax.Array
  percdamp: float
  damp: float
  escalations: int


def prepare_hessian(H: jax.Array, W: jax.Array, percdamp: float, *, order: DampOrder = "gptq",
                    max_escalations: int = 4, escalation_factor: float = 10.0,
                    layer: str = "?") -> PreparedHessian:
  """Damps H, fixes dead columns and factors H⁻¹, escalating the damping on failure.

  Args:
    H: [d_in, d_in] Hessian (already permuted if the solver permutes).
    W: [d_out, d_in] weights in the same column order.
    percdamp: initial relative damping (0 allowed; escalation then starts at 0.01).
    order: reference order of damping and dead-column fix ("gptq" or "spqr").
    max_escalations: how many ×`escalation_factor` steps are tried after the first failure.
    escalation_factor: multiplier of each step.
    layer: name used in logs and errors.
  Raises:
    HessianError: if no damping up to the bound gives a positive definite H.
  """
  tried = []
  current = float(percdamp)
  for step in range(max_escalations + 1):
    Hd, Wd, U, damp, ok = _damped_factor(H, W, jnp.asarray(current, H.dtype), order)
    tried.append(current)
    ok, damp = jax.device_get((ok, damp))  # the one host sync of an attempt
    if ok:
      return PreparedHessian(H=Hd, W=Wd, U=U, percdamp=current, damp=float(damp),
                             escalations=step)
    nxt = current * escalation_factor if current > 0 else 0.01
    if step < max_escalations:
      log.warning("layer %s: Cholesky of the damped Hessian %s failed at percdamp=%g; "
                  "retrying with percdamp=%g", layer, tuple(H.shape), current, nxt)
    current = nxt
  raise HessianError(
      f"layer {layer}: Hessian of shape {tuple(H.shape)} is not positive definite after damping "
      f"escalation; percdamp tried: {', '.join(f'{p:g}' for p in tried)}")


def act_order_permutation(H: jax.Array) -> jax.Array:
  """[d_in] int32 columns sorted by descending diag(H) (GPTQ act-order; stable for ties)."""
  return jnp.argsort(-jnp.diag(H), stable=True).astype(jnp.int32)


def permute(W: jax.Array, H: jax.Array, perm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """W[:, perm] and H[perm][:, perm]."""
  return W[:, perm], H[perm][:, perm]


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """[d_in] int32 inverse of `perm`."""
  return jnp.argsort(perm).astype(jnp.int32)
