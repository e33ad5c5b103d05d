"""`cdquant eval --model DIR|PATH [--source bundled] [--seqlen 512]`: GPTQ-protocol perplexity.

DIR is a quantized model directory written by `cdquant quantize` (dequantized on the fly), or
anything `load_model` takes (a HF directory, a .gguf file, "smollm2") for the unquantized model.
The last stdout line is one JSON object {source: {ppl, nll_sum, n_tokens, ...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_BAD_INPUT = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True,
                 help="quantized model directory, HF directory, .gguf file or 'smollm2'")
  p.add_argument("--source", action="append", default=None,
                 help="evaluation source (repeatable; default: bundled)")
  p.add_argument("--path", action="append", default=[], metavar="SOURCE=FILE",
                 help="local file for a source, e.g. wikitext2=test.parquet")
  p.add_argument("--seqlen", type=int, default=None,
                 help="window length (default: the run's calibration seqlen, else 2048)")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--max-windows", type=int, default=None,
                 help="evaluate only the first windows (quick, off-protocol)")
  p.add_argument("--dtype", default="float32", help="dtype for an unquantized model")
  p.add_argument("--progress", action="store_true")


def load_for_eval(path: str, dtype: str):
  """(model, dense params, tokenizer, default seqlen) of a quantized directory or a checkpoint."""
  from cdquant_jax.models import registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config, export  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, export.MODEL_FILE)):
    model, params, tok = export.load_quantized_model(path)
    seqlen = 2048
    run_path = os.path.join(path, export.RUN_CONFIG_FILE)
    if os.path.exists(run_path):
      with open(run_path) as f:
        seqlen = json.load(f)["calibration"]["seqlen"]
    return model, export.dense_params(params), tok, seqlen
  model, params, tok = registry.load_model(config.resolve_model_path(path), dtype)
  return model, params, tok, 2048


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.pipeline import config, evaluation  # pylint: disable=import-outside-toplevel
  try:
    paths = dict(item.split("=", 1) for item in args.path)
  except ValueError:
    print(f"cdquant eval: --path must look like SOURCE=FILE, got {args.path}", file=sys.stderr)
    return EXIT_BAD_INPUT
  hub_id = args.model.count("/") == 1 and not args.model.startswith((".", "/"))
  if not os.path.exists(args.model) and args.model != config.SMOLLM2_ALIAS and not hub_id:
    print(f"cdquant eval: {args.model}: no such model directory or file", file=sys.stderr)
    return EXIT_BAD_INPUT
  model, params, tok, default_seqlen = load_for_eval(args.model, args.dtype)
  settings = config.EvalSettings(sources=tuple(args.source or ("bundled",)), seqlen=args.seqlen,
                                 batch_size=args.batch_size, max_windows=args.max_windows,
                                 paths=paths)
  results = evaluation.evaluate_sources(settings, model, params, tok,
                                        default_seqlen=default_seqlen, progress=args.progress)
  for source, r in results.items():
    print(f"{source}: perplexity {r['ppl']:.4f} over {r['n_windows']} windows of {r['seqlen']}")
  print(json.dumps(results, sort_keys=True))
  return 0
