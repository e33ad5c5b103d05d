"""Starting points of the coordinate-descent solvers: RTN, OWC or GPTQ, as a SolveResult.

  rtn   round to nearest on a grid fitted with `grid.scale_search` (minmax / mse / owc);
  owc   round to nearest on a grid fitted with the H-weighted clipping search (CDQuant's
        initialisation as the ICLR reviews describe it, algorithms.md 3.3);
  gptq  GPTQ (its own config; its grid is replaced by the CD grid).

Every start is put in the form the descent solvers expect (`start_point`): dead columns
(H_ii == 0) hold the code of 0, and the solver's weights have those columns zeroed, as GPTQ does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Grid, GridConfig
from cdquant_jax.solvers import hessian
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.result import SolveResult
from cdquant_jax.solvers.rtn import RTNConfig, rtn

InitMethod = Literal["rtn", "owc", "gptq"]
INIT_METHODS = ("rtn", "owc", "gptq")


def initial_solution(W, H, method: InitMethod, grid_cfg: GridConfig,
                     gptq_cfg: GPTQConfig = GPTQConfig(), *, layer: str = "?") -> SolveResult:
  """Runs the initialisation `method` on the layer problem (W [d_out, d_in], H [d_in, d_in]).

  Args:
    W, H: layer problem (H undamped).
    method: "rtn", "owc" or "gptq".
    grid_cfg: the grid of the descent solver (overrides `gptq_cfg.grid`; "owc" overrides its
      scale search).
    gptq_cfg: GPTQ settings for method "gptq" (act_order, percdamp, static_groups, ...).
    layer: name used in error messages.
  Returns:
    The initial SolveResult (its diagnostics carry the GPTQ damping for method "gptq").
  """
  if method == "rtn":
    return rtn(W, H, RTNConfig(grid=grid_cfg), layer=layer)
  if method == "owc":
    return rtn(W, H, RTNConfig(grid=dataclasses.replace(grid_cfg, scale_search="owc")),
               layer=layer)
  if method == "gptq":
    return gptq(W, H, dataclasses.replace(gptq_cfg, grid=grid_cfg), layer=layer)
  raise ValueError(f"layer {layer}: unknown init {method!r}; expected one of {INIT_METHODS}")


class StartPoint(NamedTuple):
  """A descent problem in solver form.

  Attributes:
    W: [d_out, d_in] weights with dead columns zeroed.
    H: [d_in, d_in] undamped Hessian.
    Q: [d_out, d_in] start, exact grid values; dead columns at the code of 0.
    grid: the start's grid.
    dead: [d_in] bool, H_ii == 0.
  """

  W: jax.Array
  H: jax.Array
  Q: jax.Array
  grid: Grid
  dead: jax.Array


def working_dtype(W) -> jnp.dtype:
  """float64 if the input is float64 and x64 is enabled (oracle tests), else float32."""
  return jnp.result_type(jnp.asarray(W).dtype, jnp.float32)


def start_point(W, H, init: SolveResult) -> StartPoint:
  """Puts (W, H, init) in solver form: dead columns zeroed in W and set to the code of 0."""
  dtype = working_dtype(W)
  W = jnp.asarray(W, dtype)
  H = jnp.asarray(H, dtype)
  dead = hessian.dead_columns(H)
  W = jnp.where(dead[None, :], 0.0, W)
  codes = jnp.where(dead[None, :], grids.quantize(jnp.zeros_like(W), init.grid), init.codes)
  grid = Grid(scale=init.grid.scale.astype(dtype), zero=init.grid.zero.astype(dtype),
              group_index=init.grid.group_index, maxq=init.grid.maxq, flavor=init.grid.flavor)
  return StartPoint(W=W, H=H, Q=grids.dequantize(codes, grid), grid=grid, dead=dead)


def init_diagnostics(init: SolveResult) -> dict:
  """The init's objective and damping, for the descent solver's diagnostics."""
  out = {"init_objective": init.objective}
  for key in ("percdamp", "damp", "escalations"):
    if key in init.diagnostics:
      out[f"init_{key}"] = init.diagnostics[key]
  return out


def solve_result(W, H, Q: jax.Array, grid: Grid, perm: jax.Array,
                 diagnostics: dict) -> SolveResult:
  """Packs a descent solution: codes derived from Q as integers, Q re-derived from the codes.

  Args:
    W, H: the ORIGINAL layer problem (undamped H; the objective is computed on it).
    Q: [d_out, d_in] solution on `grid` (original column order).
    grid: its grid.
    perm: [d_in] the init's processing order.
    diagnostics: solver diagnostics.
  """
  codes = grids.quantize(Q, grid)
  Q = grids.dequantize(codes, grid)
  W = jnp.asarray(W, Q.dtype)
  H = jnp.asarray(H, Q.dtype)
  return SolveResult(Q=Q, codes=codes, grid=grid, perm=perm,
                     objective=layer_objective(W, Q, H),
                     outlier_mask=jnp.zeros(Q.shape, dtype=bool), diagnostics=diagnostics)
