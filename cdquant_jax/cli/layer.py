"""`cdquant layer`: quantize one layer problem (W, H) from an npz file with any solver.

Input npz: `W` [d_out, d_in] and `H` [d_in, d_in] (float32 or float64); other keys are ignored.
Output npz: `Q` (f32, original column order), `codes`, `scale`, `zero`, `group_index`, `perm`,
`outlier_mask` and SpQR's second-level statistics (prefixed `spqr_`).
With --json the last stdout line is one JSON object (objective, relative_objective, bits, seconds).
Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax.solvers import api, knobs


class BadInput(Exception):
  """Raised for user errors that end the command with exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--input", required=True, help="npz with W [d_out, d_in] and H [d_in, d_in]")
  p.add_argument("--output", help="npz to write Q, codes, scales, zeros, ...")
  p.add_argument("--method", required=True, choices=api.METHODS)
  knobs.add_arguments(p)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="any other config field by dotted path, e.g. --set resync_every=256")
  p.add_argument("--layer-name", help="name used in messages (default: the input file)")
  p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def build_config(args: argparse.Namespace):
  """The method's default config with the given flags and --set overrides applied."""
  cfg = config_lib.apply_overrides(api.default_config(args.method), args.set)
  return knobs.apply(cfg, knobs.from_namespace(args))


def load_problem(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates (W, H) from an npz file; raises BadInput with one line."""
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise BadInput(f"cannot read {path}: {e}")
  missing = [k for k in ("W", "H") if k not in data.files]
  if missing:
    raise BadInput(f"{path}: missing array(s) {missing}; found {sorted(data.files)}")
  W, H = data["W"], data["H"]
  for name, a in (("W", W), ("H", H)):
    if a.dtype not in (np.float32, np.float64):
      raise BadInput(f"{path}: {name} must be float32 or float64, got {a.dtype}")
    if a.ndim != 2:
      raise BadInput(f"{path}: {name} must be 2-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
      raise BadInput(f"{path}: {name} has {int(np.sum(~np.isfinite(a)))} NaN/Inf values")
  if H.shape[0] != H.shape[1]:
    raise BadInput(f"{path}: H must be square, got shape {H.shape}")
  if H.shape[0] != W.shape[1]:
    raise BadInput(f"{path}: W is {W.shape} but H is {H.shape}: H must be d_in x d_in "
                   f"with d_in={W.shape[1]}")
  if np.max(np.abs(H - H.T)) > 1e-4 * max(np.max(np.abs(H)), 1e-30):
    raise BadInput(f"{path}: H is not symmetric")
  return W, H


def summarize(method: str, W: np.ndarray, H: np.ndarray, result, seconds: float, cfg) -> dict:
  """The JSON summary: objective on the undamped H (float64), bits both ways, time."""
  from cdquant_jax.quant import bits as bits_lib
  from cdquant_jax.quant import qweight

  W64, H64 = W.astype(np.float64), H.astype(np.float64)
  E = W64 - np.asarray(result.Q, np.float64)
  objective = float(np.sum((E @ H64) * E))
  energy = float(np.sum((W64 @ H64) * W64))
  packed = qweight.pack_result(result)
  report = bits_lib.bits_report(packed)
  n_out = int(np.sum(np.asarray(result.outlier_mask)))
  return dict(
      method=method, shape=list(W.shape), objective=objective,
      relative_objective=objective / energy if energy > 0 else float("nan"),
      bits_per_param=report["bits_formula"], bits_per_param_stored=report["bits_stored"],
      outlier_fraction=n_out / W.size, seconds=seconds,
      config=config_lib.to_dict(cfg))


def write_output(path: str, result) -> None:
  """Writes the result's arrays to an .npz; SpQR's second-level stats as "spqr_<field>"
  (arrays, plus the code widths and group sizes as int32 scalars)."""
  arrays = dict(Q=np.asarray(result.Q, np.float32), codes=np.asarray(result.codes),
                scale=np.asarray(result.grid.scale), zero=np.asarray(result.grid.zero),
                group_index=np.asarray(result.grid.group_index), perm=np.asarray(result.perm),
                outlier_mask=np.asarray(result.outlier_mask))
  if result.spqr is not None:
    stats = result.spqr
    arrays.update({f"spqr_{k}": np.asarray(v) for k, v in stats.arrays().items()})
    for k in ("qq_scale_bits", "qq_zero_bits", "qq_groupsize", "groupsize"):
      arrays[f"spqr_{k}"] = np.asarray(getattr(stats, k), np.int32)
  from cdquant_jax.io_utils import atomic_write_npz
  atomic_write_npz(path, arrays)


def run(args: argparse.Namespace) -> int:
  """Bad input raises BadInput / ConfigError / HessianError (one line and exit 2 in cli.main)."""
  W, H = load_problem(args.input)
  cfg = build_config(args)
  start = time.perf_counter()
  result = api.solve(args.method, W, H, cfg, layer=args.layer_name or args.input)
  result.Q.block_until_ready()
  seconds = time.perf_counter() - start
  summary = summarize(args.method, W, H, result, seconds, cfg)
  if args.output:
    write_output(args.output, result)
  if args.json:
    print(json.dumps(summary))
  else:
    print(f"{args.method}: relative objective {summary['relative_objective']:.6g}, "
          f"{summary['bits_per_param']:.3f} bits/param (stored {summary['bits_per_param_stored']:.3f}), "
          f"{seconds:.2f} s")
  return 0
