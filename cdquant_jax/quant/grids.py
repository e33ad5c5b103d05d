"""Uniform quantization grids: parameters, scale search, quantize / dequantize.

A *grid* gives every weight W[r, i] a scale and a zero point shared by the columns of its
*group* (a set of input columns; per-channel = one group spanning the row). Values are
    code  q ∈ {0, …, maxq},  maxq = 2^bits − 1
    dequantized value  s · (q − z)
Two parameter flavours, exactly as in the reference code (algorithms.md 1.1, 2.1):

  flavour  range fitted              zero point                 code
  -------  ------------------------  -------------------------  ------------------------------
  GPTQ     [min(x, 0), max(x, 0)]    integer round(−xmin / s)   clamp(round(x / s) + z)
  SPQR     [min(x), max(x)]          fractional −xmin / s       clamp(round(x / s + z))
                                     (rounded iff round_zero)   (s clamped to ≥ 1e-9)
Both: sym ⇒ range ±max|x| and z = (maxq + 1) / 2; a degenerate range becomes (−1, +1).

Scale searches (per row, or per row and group):
  minmax  the range above;
  mse     GPTQ's shrink grid: p = 1 − i/grid, i < maxshrink·grid, range ×p, minimising Σ|Q(x) − x|^norm;
  owc     "optimal weight clipping" as we read CDQuant: the same shrink grid, minimising the
          H-weighted error e_gᵀ H_gg e_g of each group g (H_gg = the diagonal block of H on the
          group's columns). For per-channel grids this is exactly the row's layer objective; for
          groups it ignores the cross-group blocks of H (exact when H is block diagonal).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import HIGHEST

SPQR_SCALE_EPS = 1e-9  # SpQR clamps the scale to this before dividing.


class Flavor(str, enum.Enum):
  """Which reference quantizer the grid parameters follow (see the module docstring)."""

  GPTQ = "gptq"
  SPQR = "spqr"


ScaleSearch = Literal["minmax", "mse", "owc"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridConfig:
  """How a layer's grid is shaped and fitted. Frozen and hashable: usable as a static jit arg."""

  # Bits per weight, 2..8.
  bits: int = 4
  # Input columns per group; -1 = one group per row (per-channel).
  group_size: int = -1
  # Symmetric grid (zero point fixed at (maxq + 1) / 2).
  sym: bool = False
  # Parameter flavour; GPTQ everywhere except SpQR's first and second level.
  flavor: Flavor = Flavor.GPTQ
  # SpQR flavour only: round the fractional zero point to an integer.
  round_zero: bool = False
  # How the range is chosen: "minmax", "mse" (GPTQ's) or "owc" (H-weighted clipping).
  scale_search: ScaleSearch = "minmax"
  # MSE search: error exponent, grid resolution and maximal shrink (GPTQ defaults).
  mse_norm: float = 2.4
  mse_grid: int = 100
  mse_max_shrink: float = 0.8
  # OWC search: grid resolution and maximal shrink (candidates p = 1 − i/grid, i < max_shrink·grid).
  owc_grid: int = 20
  owc_max_shrink: float = 0.5
  # Round every fitted scale and zero to float16 (deployable statistics, stored exactly by the
  # packed format). False keeps the reference's float32 statistics.
  fp16_stats: bool = False

  def __post_init__(self):
    """Rejects values no grid can honour, and search settings its `scale_search` never reads."""
    check = config_lib.reject_unless
    check(isinstance(self.bits, int) and 1 <= self.bits <= 8,
          f"bits must be an integer in [1, 8], got {self.bits!r}")
    check(self.group_size == -1 or self.group_size > 0,
          f"group_size must be -1 (per channel) or positive, got {self.group_size}")
    check(self.scale_search in ("minmax", "mse", "owc"),
          f"scale_search must be one of ['minmax', 'mse', 'owc'], got {self.scale_search!r}")
    check(not self.round_zero or self.flavor == Flavor.SPQR,
          "round_zero=True only applies to the SpQR flavour (GPTQ zero points are integers)")
    check(not (self.round_zero and self.sym),
          "round_zero=True does not apply to a symmetric grid (its zero point is fixed)")
    unused = {"mse": ("owc_grid", "owc_max_shrink"), "owc": ("mse_norm", "mse_grid",
              "mse_max_shrink")}.get(self.scale_search, _SEARCH_FIELDS)
    changed = [f for f in unused if getattr(self, f) != _GRID_DEFAULTS[f]]
    check(not changed, f"{changed} set but scale_search={self.scale_search!r} does not use them")

  @property
  def maxq(self) -> int:
    return 2**self.bits - 1

  def validate(self, d_in: int) -> None:
    """Raises ConfigError naming the bad field when this grid cannot quantize `d_in` columns."""
    config_lib.reject_unless(2 <= self.bits, f"bits must be an integer in [2, 8], got {self.bits!r}")
    config_lib.reject_unless(
        self.group_size == -1 or d_in % self.group_size == 0,
        f"group_size must be -1 or a positive divisor of d_in={d_in}, got {self.group_size}")

  def groups(self, d_in: int) -> tuple[int, int]:
    """(number of groups, group size) for a layer with `d_in` input columns."""
    g = d_in if self.group_size == -1 else self.group_size
    return d_in // g, g


_SEARCH_FIELDS = ("mse_norm", "mse_grid", "mse_max_shrink", "owc_grid", "owc_max_shrink")
_GRID_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GridConfig)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Grid:
  """Fitted grid parameters of one layer.

  Attributes:
    scale: [d_out, n_groups] f32 step sizes.
    zero: [d_out, n_groups] f32 zero points in code units (integers for the GPTQ flavour).
    group_index: [d_in] int32, group of each input column in the layer's ORIGINAL column order.
    maxq: static, 2^bits − 1.
    flavor: static, the code rule (see module docstring).
    sym: static, fitted as a symmetric grid (GridConfig.sym); recorded by the packed format.
    round_zero: static, GridConfig.round_zero (SpQR flavour: integer zero points); recorded by
      the packed format (it changes the paper's bits formula).
  """

  scale: jax.Array
  zero: jax.Array
  group_index: jax.Array
  maxq: int = dataclasses.field(metadata=dict(static=True))
  flavor: Flavor = dataclasses.field(metadata=dict(static=True))
  sym: bool = dataclasses.field(default=False, metadata=dict(static=True))
  round_zero: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def expand(self) -> tuple[jax.Array, jax.Array]:
    """Per-weight (scale, zero), each [d_out, d_in]."""
    return (jnp.take(self.scale, self.group_index, axis=1),
            jnp.take(self.zero, self.group_index, axis=1))


# ----------------------------------------------------------------------------------------------
# Element-wise code rules.


def codes_of(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int,
             flavor: Flavor) -> jax.Array:
  """Integer codes (as f32) of `x` under broadcastable per-element (scale, zero)."""
  if flavor == Flavor.GPTQ:
    q = jnp.round(x / scale) + zero
  else:
    q = jnp.round(x / jnp.maximum(scale, SPQR_SCALE_EPS) + zero)
  return jnp.clip(q, 0, maxq)


def dequantize_codes(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """s · (q − z), element-wise with broadcasting."""
  return scale * (q - zero)


def fake_quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int,
                  flavor: Flavor) -> jax.Array:
  """Nearest grid value of `x` (quantize then dequantize)."""
  return dequantize_codes(codes_of(x, scale, zero, maxq, flavor), scale, zero)


# ----------------------------------------------------------------------------------------------
# Range → (scale, zero).


def _range(x: jax.Array, cfg: GridConfig) -> tuple[jax.Array, jax.Array]:
  """(xmin, xmax) over the last axis after the flavour's range rule, sym and the ±1 fix."""
  xmin, xmax = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
  if cfg.flavor == Flavor.GPTQ:
    xmin, xmax = jnp.minimum(xmin, 0.0), jnp.maximum(xmax, 0.0)
  if cfg.sym:
    xmax = jnp.maximum(jnp.abs(xmin), xmax)
    xmin = jnp.where(xmin < 0, -xmax, xmin)
  if cfg.flavor == Flavor.GPTQ:
    degenerate = (xmin == 0) & (xmax == 0)
  else:
    degenerate = xmin == xmax
  return jnp.where(degenerate, -1.0, xmin), jnp.where(degenerate, 1.0, xmax)


def params_from_range(xmin: jax.Array, xmax: jax.Array,
                      cfg: GridConfig) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) for the range [xmin, xmax] under the config's flavour."""
  scale = (xmax - xmin) / cfg.maxq
  if cfg.sym:
    zero = jnp.full_like(scale, (cfg.maxq + 1) / 2)
  elif cfg.flavor == Flavor.GPTQ or cfg.round_zero:
    zero = jnp.round(-xmin / scale)
  else:
    zero = -xmin / scale
  if cfg.fp16_stats:
    scale, zero = through_fp16(scale), through_fp16(zero)
  return scale, zero


def through_fp16(x: jax.Array) -> jax.Array:
  """x rounded to the nearest float16, back in its own dtype."""
  return x.astype(jnp.float16).astype(x.dtype)


def minmax_params(x: jax.Array, cfg: GridConfig) -> tuple[jax.Array, jax.Array]:
  """Min-max (scale, zero) of `x` [..., n] over its last axis; both [...]."""
  return params_from_range(*_range(x, cfg), cfg)


def _shrink_factors(grid: int, max_shrink: float) -> jax.Array:
  """Candidate range multipliers p = 1 − i/grid, i < max_shrink·grid (GPTQ's loop)."""
  return 1.0 - jnp.arange(int(max_shrink * grid)) / grid


def _search(x: jax.Array, cfg: GridConfig, shrinks: jax.Array, error_fn):
  """Keep, per slice, the shrunk range with the lowest `error_fn(fake_quantized − x)` [...]."""
  xmin, xmax = _range(x, cfg)
  scale0, zero0 = params_from_range(xmin, xmax, cfg)

  def body(carry, p):
    best, scale, zero = carry
    s1, z1 = params_from_range(p * xmin, p * xmax, cfg)
    err = error_fn(fake_quantize(x, s1[..., None], z1[..., None], cfg.maxq, cfg.flavor) - x)
    better = err < best
    return (jnp.where(better, err, best), jnp.where(better, s1, scale),
            jnp.where(better, z1, zero)), None

  init = (jnp.full(scale0.shape, jnp.inf, x.dtype), scale0, zero0)
  (_, scale, zero), _ = jax.lax.scan(body, init, shrinks.astype(x.dtype))
  return scale, zero


def mse_params(x: jax.Array, cfg: GridConfig) -> tuple[jax.Array, jax.Array]:
  """GPTQ's `mse=True` search over the last axis of `x` [..., n]."""
  error_fn = lambda e: jnp.sum(jnp.abs(e) ** cfg.mse_norm, axis=-1)
  return _search(x, cfg, _shrink_factors(cfg.mse_grid, cfg.mse_max_shrink), error_fn)


def owc_params(xg: jax.Array, Hgg: jax.Array, cfg: GridConfig) -> tuple[jax.Array, jax.Array]:
  """H-weighted clipping search per (row, group).

  Args:
    xg: [d_out, n_groups, G] weights grouped by contiguous columns.
    Hgg: [n_groups, G, G] diagonal blocks of H.
    cfg: grid config.
  Returns:
    (scale, zero), each [d_out, n_groups].
  """
  # e [r, g, i] · (H_g e_rg)[i] summed over i -> [d_out, n_groups]
  error_fn = lambda e: jnp.einsum("rgi,gij,rgj->rg", e, Hgg, e, precision=HIGHEST)
  return _search(xg, cfg, _shrink_factors(cfg.owc_grid, cfg.owc_max_shrink), error_fn)


def contiguous_group_index(d_in: int, group_size: int) -> jax.Array:
  """[d_in] int32 group of each column for contiguous groups (-1 = one group)."""
  g = d_in if group_size == -1 else group_size
  return jnp.arange(d_in, dtype=jnp.int32) // g


def fit_grid(W: jax.Array, cfg: GridConfig, H: jax.Array | None = None) -> Grid:
  """Fits a grid with contiguous groups of `cfg.group_size` columns on W.

  Args:
    W: [d_out, d_in] weights (f32).
    cfg: grid config; "owc" needs H.
    H: [d_in, d_in] Hessian, used by the "owc" search only.
  Returns:
    Grid with scale/zero [d_out, n_groups] and contiguous group_index.
  """
  d_out, d_in = W.shape
  cfg.validate(d_in)
  n_groups, g = cfg.groups(d_in)
  # [d_out, d_in] -> [d_out, n_groups, G]
  Wg = W.reshape(d_out, n_groups, g)
  if cfg.scale_search == "owc":
    if H is None:
      raise ValueError("scale_search='owc' needs the Hessian H")
    # [d_in, d_in] -> [n_groups, G, n_groups, G] -> diagonal blocks [n_groups, G, G]
    blocks = H.reshape(n_groups, g, n_groups, g)
    Hgg = jnp.einsum("gigj->gij", blocks)
    scale, zero = owc_params(Wg, Hgg, cfg)
  elif cfg.scale_search == "mse":
    scale, zero = mse_params(Wg, cfg)
  else:
    scale, zero = minmax_params(Wg, cfg)
  return Grid(scale=scale, zero=zero, group_index=contiguous_group_index(d_in, cfg.group_size),
              maxq=cfg.maxq, flavor=cfg.flavor, sym=cfg.sym, round_zero=cfg.round_zero)


def quantize(W: jax.Array, grid: Grid) -> jax.Array:
  """Integer codes [d_out, d_in] int32 of W on `grid`."""
  s, z = grid.expand()
  return codes_of(W, s, z, grid.maxq, grid.flavor).astype(jnp.int32)


def dequantize(codes: jax.Array, grid: Grid) -> jax.Array:
  """Dequantized weights [d_out, d_in] f32 from integer codes on `grid`."""
  s, z = grid.expand()
  return dequantize_codes(codes.astype(s.dtype), s, z)


def round_to_grid(x: jax.Array, grid: Grid) -> jax.Array:
  """Nearest grid value of every weight, [d_out, d_in] (quantize then dequantize)."""
  s, z = grid.expand()
  return fake_quantize(x, s, z, grid.maxq, grid.flavor)
