"""Round-to-nearest (RTN): fit the grid on W and round every weight (GPTQ's `--nearest`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.solvers import hessian
from cdquant_jax.solvers.result import SolveResult, identity_perm, no_outliers


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
  """RTN settings: only the grid (its `scale_search` picks minmax, mse or owc)."""

  grid: GridConfig = GridConfig()

  def __post_init__(self):
    config_lib.reject_unless(self.grid.bits >= 2, f"grid.bits must be in [2, 8], got "
                                                   f"{self.grid.bits}")


def rtn(W, H, cfg: RTNConfig = RTNConfig(), *, layer: str = "?") -> SolveResult:
  """Quantizes W [d_out, d_in] to the nearest point of a grid fitted on W.

  Args:
    W: [d_out, d_in] weights.
    H: [d_in, d_in] Hessian; used for the objective and by the "owc" scale search.
    cfg: RTN config.
    layer: name used in error messages.
  Returns:
    SolveResult; objective = tr((W − Q) H (W − Q)ᵀ).
  """
  hessian.check_layer_problem(W, H, layer=layer)
  W = jnp.asarray(W)
  H = jnp.asarray(H, W.dtype)
  grid = grids.fit_grid(W, cfg.grid, H)
  codes = grids.quantize(W, grid)
  Q = grids.dequantize(codes, grid)
  return SolveResult(Q=Q, codes=codes, grid=grid, perm=identity_perm(W.shape[1]),
                     objective=layer_objective(W, Q, H), outlier_mask=no_outliers(W))
