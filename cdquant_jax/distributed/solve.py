"""Layer solves split over devices by output rows: one contiguous row shard per device.

Given H, the rows of W are independent problems for these methods (checked per solver):

  rtn, gptq  every rule is per row (or per row and group); perm and damping depend on H only.
  cd         greedy steps move every pending row at once and a row that stops never restarts,
             so a row's trajectory (and the resync points on it: t is its own step count while
             it is pending) does not depend on the other rows.
  cyclic     a sweep updates every row from its own G; a row that a sweep leaves unchanged
             stays unchanged (its G update is 0), so sweeping on until the last shard's fixed
             point changes nothing in the others.
  spqr       rows of one second-level group (β2 = qq.group_size rows) share statistics, so
             shards are multiples of β2 rows; the outlier threshold τ_abs = τ · mean_c
             var_rows(W[:, c]) / U_cc² is a statistic of ALL rows: it is computed once on the
             full W and every shard uses it (`spqr_rows`).

Refused (`NOT_SHARDABLE`): bcd, whose greedy rounds run until no row of the layer improves
(or `rescan_every` steps) and resync G at multiples of the LAYER's step count, so a row's G is
recomputed at points that depend on the other rows (a float difference that flips near-ties);
spqr-cd, which calls SpQR (per-shard τ_abs) and then BCD/CD rounds accepted per layer.

Shards run concurrently, one Python thread per device (`api.solve` with the shard and H put on
that device; JAX releases the GIL while a program runs). Results equal the one-device result up
to the rounding of row slices of matmuls (XLA may block a [rows, ·] product differently for a
different number of rows); the tests measure it.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax._numerics import layer_objective
from cdquant_jax.distributed import merge as merge_lib
from cdquant_jax.quant.grids import Flavor, Grid
from cdquant_jax.solvers import api, hessian, knobs as knobs_lib, padding, spqr as spqr_lib
from cdquant_jax.solvers.diagnostics import Damping, Diagnostics
from cdquant_jax.solvers.result import SolveResult

SHARDABLE = ("rtn", "gptq", "cd", "cyclic", "spqr")
NOT_SHARDABLE = {
    "bcd": "its greedy rounds and resyncs follow the whole layer's step count, so a row's "
           "result depends on the other rows",
    "spqr-cd": "its SpQR stage needs the layer-wide outlier threshold and its CD/BCD rounds "
               "are accepted per layer",
}


def row_multiple(method: str, cfg: Any) -> int:
  """Rows a shard must be a multiple of: SpQR's β2 when a second level is used, else 1."""
  if method == "spqr" and cfg.qq.used:
    return cfg.qq.group_size
  return 1


def shard_bounds(d_out: int, n_shards: int, multiple: int = 1) -> list[tuple[int, int]]:
  """Contiguous [start, stop) row ranges, sizes multiples of `multiple` as even as possible.

  Fewer than `n_shards` ranges when d_out has fewer than n_shards units of `multiple` rows
  (no shard is empty).
  """
  config_lib.reject_unless(d_out % multiple == 0,
                           f"d_out={d_out} must be a multiple of the row unit {multiple}")
  units = d_out // multiple
  n = max(1, min(n_shards, units))
  sizes = [(units // n + (k < units % n)) * multiple for k in range(n)]
  starts = [sum(sizes[:k]) for k in range(n)]
  return [(a, a + s) for a, s in zip(starts, sizes)]


def devices_of(mesh_or_devices) -> list[jax.Device]:
  """The devices of a Mesh (in its flat order) or of a device sequence."""
  if isinstance(mesh_or_devices, jax.sharding.Mesh):
    return list(mesh_or_devices.devices.flat)
  return list(mesh_or_devices)


def spqr_threshold(W, H, cfg: spqr_lib.SpQRConfig, *, layer: str = "?") -> jax.Array:
  """SpQR's τ_abs of the FULL layer (as `spqr.spqr` computes it; inf without outliers)."""
  W, H = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  if not cfg.detect_outliers:
    return jnp.asarray(jnp.inf, jnp.float32)
  perm = _spqr_perm(H, cfg)
  Wp, Hp = hessian.permute(W, H, perm)
  prep = hessian.prepare_hessian(Hp, Wp, cfg.percdamp, order="spqr",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  return cfg.outlier_threshold * spqr_lib.outlier_scale(prep.W, prep.U)


def _spqr_perm(H: jax.Array, cfg: spqr_lib.SpQRConfig) -> jax.Array:
  if cfg.act_order:
    return hessian.act_order_permutation(H)
  return jnp.arange(H.shape[0], dtype=jnp.int32)


def spqr_rows(W, H, cfg: spqr_lib.SpQRConfig, tau_abs, *, layer: str = "?") -> SolveResult:
  """`spqr.spqr` on rows W [rows, d_in] (rows a multiple of β2) with a given τ_abs (scalar).

  The driver of `spqr.spqr` step by step with the layer's τ_abs in place of the rows' own
  (its sweep `spqr._sweep` and tables `spqr._spqr_stats` are reused as they are).
  """
  hessian.check_layer_problem(W, H, layer=layer)
  W, H = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  d_out, d_in = W.shape
  cfg.validate(d_out, d_in, layer)
  g, B = cfg.columns_per_group(d_in), cfg.block_size(d_in)
  perm = _spqr_perm(H, cfg)
  Wp, Hp = hessian.permute(W, H, perm)
  prep = hessian.prepare_hessian(Hp, Wp, cfg.percdamp, order="spqr",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  D = padding.round_up(d_in, B)
  Wpad, Upad = padding.pad_axis(prep.W, D), padding.pad_square(prep.U, D, diagonal=1.0)
  sw = spqr_lib._Sweep(stats=cfg.stats_config(), maxq=cfg.maxq, groupsize=g, blocksize=B,
                       detect=cfg.detect_outliers,
                       screen=cfg.detect_outliers and not cfg.simplified_outliers)
  Qp, codes_p, mask_p, tables = spqr_lib._sweep(Wpad, Upad, jnp.asarray(tau_abs, W.dtype), sw)
  inv = hessian.inverse_permutation(perm)
  n_groups = d_in // g
  grid = Grid(scale=tables.scale[:, :n_groups], zero=tables.zero[:, :n_groups],
              group_index=(inv // g).astype(jnp.int32), maxq=cfg.maxq, flavor=Flavor.SPQR,
              sym=cfg.grid.sym, round_zero=cfg.grid.round_zero)
  Q, mask = Qp[:, :d_in][:, inv], mask_p[:, :d_in][:, inv]
  diagnostics = Diagnostics(outlier_fraction=jnp.mean(mask.astype(jnp.float32)),
                            damping=Damping.of(prep), tau_abs=jnp.asarray(tau_abs, jnp.float32))
  return SolveResult(Q=Q, codes=codes_p[:, :d_in][:, inv], grid=grid, perm=perm,
                     objective=layer_objective(W, Q, H), outlier_mask=mask,
                     diagnostics=diagnostics, spqr=spqr_lib._spqr_stats(tables, cfg, n_groups, g),
                     method="spqr")


def _solve_shard(method: str, W_rows, H, cfg, device, tau_abs, layer: str) -> SolveResult:
  """One shard on `device` (its arrays put there; default device set for the thread)."""
  with jax.default_device(device):
    W_rows, H = jax.device_put(W_rows, device), jax.device_put(H, device)
    if method == "spqr":
      result = spqr_rows(W_rows, H, cfg, jax.device_put(tau_abs, device), layer=layer)
    else:
      result = api.solve(method, W_rows, H, cfg, layer=layer)
    return jax.block_until_ready(result)


def solve_shards(method: str, W, H, cfg: Any, devices: Sequence[jax.Device], *,
                 layer: str = "?") -> tuple[list[tuple[int, int]], list[SolveResult]]:
  """(row bounds, shard results): shard k of W's rows solved on devices[k], concurrently."""
  if method in NOT_SHARDABLE:
    raise config_lib.ConfigError(f"layer {layer}: method {method!r} cannot be split by output "
                                 f"rows ({NOT_SHARDABLE[method]}); shardable: {list(SHARDABLE)}")
  config_lib.reject_unless(method in SHARDABLE,
                           f"unknown method {method!r}; shardable: {list(SHARDABLE)}")
  d_out = jnp.shape(W)[0]
  multiple = row_multiple(method, cfg)
  if d_out % multiple:
    raise config_lib.ConfigError(f"layer {layer}: d_out={d_out} must be a multiple of "
                                 f"qq.group_size={multiple} to split SpQR by rows")
  bounds = shard_bounds(d_out, len(devices), multiple)
  tau_abs = spqr_threshold(W, H, cfg, layer=layer) if method == "spqr" else None
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(bounds)) as pool:
    futures = [pool.submit(_solve_shard, method, W[a:b], H, cfg, device, tau_abs,
                           f"{layer}[{a}:{b}]")
               for (a, b), device in zip(bounds, devices)]
    results = [f.result() for f in futures]
  return bounds, results


def solve_sharded(method: str, W, H, cfg: Any = None, mesh_or_devices=None, *,
                  layer: str = "?", **knobs: Any) -> SolveResult:
  """`api.solve(method, W, H, cfg)` with W [d_out, d_in]'s rows split over devices.

  Args:
    method: one of `SHARDABLE` (the others raise ConfigError saying why).
    W, H: the layer problem (H [d_in, d_in] undamped; it is copied to every device).
    cfg: the method's config (default: its defaults); **knobs as in `api.solve`.
    mesh_or_devices: a Mesh (all its devices) or a device sequence (default: jax.devices()).
    layer: name used in error messages (shards are named layer[start:stop]).
  Returns:
    The merged SolveResult on the first device (`merge.merge` says how diagnostics combine).
  """
  cfg = knobs_lib.apply(api.default_config(method) if cfg is None else cfg, knobs)
  devices = devices_of(jax.devices() if mesh_or_devices is None else mesh_or_devices)
  W, H = jnp.asarray(W), jnp.asarray(H)
  _, parts = solve_shards(method, W, H, cfg, devices, layer=layer)
  return merge_lib.merge(parts, W, H, devices[0]).replace(method=method)
