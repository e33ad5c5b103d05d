"""Starting points of the coordinate-descent solvers: RTN or GPTQ on the solver's grid.

  rtn   round to nearest on the solver's grid, fitted with its `grid.scale_search` (minmax /
        mse / owc; owc is CDQuant's "optimal weight clipping" start, algorithms.md 3.3);
  gptq  GPTQ with the init's GPTQ options on the solver's grid.

An `InitConfig` has no grid: the grid of a descent solver is the grid of its start by
construction. Every start is put in the form the descent solvers expect (`start_point`): dead
columns (H_ii == 0) hold the code of 0, and the solver's weights have those columns zeroed, as
GPTQ does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Grid, GridConfig
from cdquant_jax.solvers import hessian
from cdquant_jax.solvers.diagnostics import Diagnostics
from cdquant_jax.solvers.gptq import GPTQOptions, gptq
from cdquant_jax.solvers.result import SolveResult
from cdquant_jax.solvers.rtn import RTNConfig, rtn

INIT_METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig(GPTQOptions):
  """The start of a descent solver: `method` and, for "gptq", GPTQ's sweep options.

  act_order=True (GPTQ with act-order) is the best single-coordinate start measured
  (algorithms.md 7). The GPTQ options must keep their defaults when method is "rtn".
  """

  method: Literal["rtn", "gptq"] = "gptq"

  def __post_init__(self):
    super().__post_init__()
    config_lib.reject_unless(self.method in INIT_METHODS,
                             f"method must be one of {list(INIT_METHODS)}, got {self.method!r}"
                             + ("; the OWC start is method=rtn with grid.scale_search=owc"
                                if self.method == "owc" else ""))
    if self.method != "gptq":
      changed = config_lib.changed_fields(self.options(), GPTQOptions())
      config_lib.reject_unless(not changed, f"{changed} only apply to method='gptq', "
                                            f"got method={self.method!r}")

  def options(self) -> GPTQOptions:
    """The GPTQ options alone."""
    return GPTQOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTQOptions)})

  def check_grid(self, grid: GridConfig) -> None:
    """Rejects a start that cannot run on the solver's grid (ConfigError)."""
    config_lib.reject_unless(grid.bits >= 2, f"grid.bits must be in [2, 8], got {grid.bits}")
    if self.method == "gptq":
      self.options().check_grid(grid)


def initial_solution(W, H, init: InitConfig, grid: GridConfig, *, layer: str = "?") -> SolveResult:
  """Runs the start `init` on the layer problem (W [d_out, d_in], H [d_in, d_in] undamped).

  Args:
    W, H: layer problem (H undamped).
    init: the start (method and GPTQ options).
    grid: the descent solver's grid, which the start uses.
    layer: name used in error messages.
  Returns:
    The initial SolveResult (its diagnostics carry the GPTQ damping for method "gptq").
  """
  if init.method == "rtn":
    return rtn(W, H, RTNConfig(grid=grid), layer=layer)
  return gptq(W, H, init.options().with_grid(grid), layer=layer)


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
  grid = dataclasses.replace(init.grid, scale=init.grid.scale.astype(dtype),
                             zero=init.grid.zero.astype(dtype))
  return StartPoint(W=W, H=H, Q=grids.dequantize(codes, grid), grid=grid, dead=dead)


def solve_result(W, H, Q: jax.Array, grid: Grid, perm: jax.Array,
                 diagnostics: Diagnostics) -> SolveResult:
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
