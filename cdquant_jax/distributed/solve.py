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
             full W and every shard uses it (`spqr.spqr(..., tau_abs=)`).

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
from cdquant_jax.distributed import merge as merge_lib
from cdquant_jax.solvers import api, hessian, knobs as knobs_lib, spqr as spqr_lib
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
  Wp, Hp = hessian.permute(W, H, spqr_lib.column_order(H, cfg))
  prep = hessian.prepare_hessian(Hp, Wp, cfg.percdamp, order="spqr",
                                 max_escalations=cfg.max_damp_escalations, layer=layer)
  return cfg.outlier_threshold * spqr_lib.outlier_scale(prep.W, prep.U)


def _solve_shard(method: str, W_rows, H, cfg, device, tau_abs, layer: str) -> SolveResult:
  """One shard on `device` (its arrays put there; default device set for the thread)."""
  with jax.default_device(device):
    W_rows, H = jax.device_put(W_rows, device), jax.device_put(H, device)
    if method == "spqr":
      result = spqr_lib.spqr(W_rows, H, cfg, layer=layer,
                             tau_abs=jax.device_put(tau_abs, device)).replace(method="spqr")
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
