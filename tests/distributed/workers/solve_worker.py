"""Row-sharded solves equal the one-device solve of the same full W (run on 4+ CPU devices).

Compared per method: codes, Q, outlier mask, grid, perm and per-row steps must be IDENTICAL
(bit for bit): every row is the same problem on one device and in a shard, and on the XLA CPU
backend a row of a matmul does not round differently in a [d_out / 4, ·] slice (if a backend
did, the codes of near-tie weights could flip and this check would have to count them
instead). The objective is recomputed on the full W by the same function, so it is identical
too; layer-wide diagnostics that are sums over rows (tracked / recomputed objective, traces)
are compared at rtol 1e-5: they add the same row terms in another order (f32).
"""

import sys

import jax
import numpy as np

from cdquant_jax.config import ConfigError
from cdquant_jax.distributed import solve as dsolve
from cdquant_jax.distributed.mesh import MeshConfig, make_mesh
from cdquant_jax.solvers import api, knobs as knobs_lib
from cdquant_jax.solvers.hessian import hessian_from_inputs

CASES = {
    "rtn": dict(bits=3),
    "gptq": dict(bits=3, group_size=16, act_order=True),
    "cd": dict(bits=3, group_size=16),
    "cyclic": dict(bits=3),
    "spqr": dict(bits=3),
}
EXACT_DIAG = ("steps", "global_steps", "rounds", "trace_every", "tau_abs", "damping")
CLOSE_DIAG = ("init_objective", "tracked_objective", "recomputed_objective", "objective_trace",
              "refit_objectives", "gptq_loss", "outlier_fraction")


def problem(d_out=64, d_in=32, n=48):
  rng = np.random.default_rng(0)
  X = rng.standard_normal((n, 4, d_in)) @ rng.standard_normal((d_in, d_in)) * 0.3
  X[..., 3] = 0.0  # a dead column
  W = rng.standard_normal((d_out, d_in)) * rng.uniform(0.2, 2.0, (d_out, 1))
  W[5, 7] = 9.0  # an outlier for SpQR
  return np.asarray(W, np.float32), np.asarray(hessian_from_inputs(np.float32(X)))


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def compare(method, merged, one):
  for name in ("Q", "codes", "outlier_mask", "perm", "objective"):
    a, b = np.asarray(getattr(merged, name)), np.asarray(getattr(one, name))
    assert np.array_equal(a, b), (method, name, np.sum(a != b))
  for name, a in leaves(merged.grid).items():
    assert np.array_equal(a, leaves(one.grid)[name]), (method, "grid", name)
  if one.spqr is not None:
    for name, a in leaves(merged.spqr).items():
      assert np.array_equal(a, leaves(one.spqr)[name]), (method, "spqr", name)
  for name in EXACT_DIAG + CLOSE_DIAG:
    a, b = getattr(merged.diagnostics, name), getattr(one.diagnostics, name)
    assert (a is None) == (b is None), (method, name)
    if a is None:
      continue
    for key, x in leaves(a).items():
      y = leaves(b)[key]
      if name in EXACT_DIAG:
        assert np.array_equal(x, y), (method, name, key, x, y)
      else:
        assert np.allclose(x, y, rtol=1e-5, atol=0, equal_nan=True), (method, name, key, x, y)


def main(shape, methods):
  mesh = make_mesh(MeshConfig(data=shape[0], model=shape[1]))
  devices = dsolve.devices_of(mesh)
  W, H = problem()
  for method in methods:
    if method in dsolve.NOT_SHARDABLE:
      continue
    cfg = knobs_lib.apply(api.default_config(method), CASES[method])
    with jax.default_device(devices[0]):
      one = api.solve(method, W, H, cfg)
    bounds, parts = dsolve.solve_shards(method, W, H, cfg, devices)
    used = [next(iter(p.Q.devices())) for p in parts]
    assert len(set(used)) == len(parts) == len(devices), (method, used)
    merged = dsolve.solve_sharded(method, W, H, cfg, mesh)
    assert merged.method == method and merged.Q.shape == W.shape
    compare(method, merged, one)
    if method == "spqr":  # the layer-wide τ_abs matters: a shard's own would differ
      assert int(np.sum(merged.outlier_mask)) > 0
      own = float(dsolve.spqr_threshold(W[bounds[0][0]:bounds[0][1]], H, cfg))
      assert own != float(merged.diagnostics.tau_abs), own
    print(f"{method}: {len(parts)} shards {bounds} on {[d.id for d in used]}: identical")
  for method in [m for m in methods if m in dsolve.NOT_SHARDABLE]:
    try:
      dsolve.solve_sharded(method, W, H, None, mesh)
    except ConfigError as e:
      assert method in str(e) and "cannot be split" in str(e), e
    else:
      raise AssertionError(f"{method} was not refused")


if __name__ == "__main__":
  main(tuple(int(v) for v in sys.argv[1].split("x")), sys.argv[2].split(","))
