"""`cdquant eval --model DIR|PATH [--source bundled] [--seqlen 512]`: GPTQ-protocol perplexity.

DIR is a quantized model directory written by `cdquant quantize` (dequantized on the fly), or
anything `load_model` takes (a HF directory, a .gguf file, "smollm2") for the unquantized model.
The last stdout line is one JSON object {source: {ppl, nll_sum, n_tokens, ...}}. Bad input exits
with code 2 and one line naming the flag or file (cli/errors.py).
"""

from __future__ import annotations

import argparse
import json
import os

from cdquant_jax.cli import errors
from cdquant_jax.data import EVALUATION_SOURCES
from cdquant_jax.data.sources import FILE_SOURCES
from cdquant_jax.models.registry import DTYPE_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True,
                 help="quantized model directory, HF directory, .gguf file or 'smollm2'")
  p.add_argument("--source", action="append", default=None, choices=EVALUATION_SOURCES,
                 help="evaluation source (repeatable; default: bundled)")
  p.add_argument("--path", action="append", default=[], metavar="SOURCE=FILE",
                 help="local file for a source, e.g. wikitext2=test.parquet")
  p.add_argument("--seqlen", type=int, default=None,
                 help="window length (default: the run's calibration seqlen, else 2048)")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--max-windows", type=int, default=None,
                 help="evaluate only the first windows (quick, off-protocol)")
  p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                 help="dtype for an unquantized model")
  p.add_argument("--progress", action="store_true")


def load_for_eval(path: str, dtype: str):
  """(model, dense params, tokenizer, default seqlen) of a quantized directory or a checkpoint."""
  from cdquant_jax.models import aliases, registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config, export  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, export.MODEL_FILE)):
    with errors.loading(path):
      model, params, tok = export.load_quantized_model(path)
      seqlen = _calibration_seqlen(os.path.join(path, export.RUN_CONFIG_FILE))
    return model, export.dense_params(params), tok, seqlen
  model, params, tok = registry.load_model(aliases.resolve_model_path(path), dtype)
  return model, params, tok, 2048


def _calibration_seqlen(run_config_path: str, default: int = 2048) -> int:
  """The calibration seqlen recorded in a quantized directory's run_config.json, else default."""
  if not os.path.exists(run_config_path):
    return default
  with open(run_config_path) as f:
    return json.load(f)["calibration"]["seqlen"]


def source_paths(args: argparse.Namespace) -> dict[str, str]:
  """{source: file} from the --path SOURCE=FILE flags, checked against the --source list."""
  paths = {}
  for item in args.path:
    source, sep, file = item.partition("=")
    errors.require(bool(sep and source and file),
                   f"--path must look like SOURCE=FILE, got {item!r}")
    errors.require(source in EVALUATION_SOURCES,
                   f"--path {item}: unknown source {source!r}; known: {list(EVALUATION_SOURCES)}")
    paths[source] = file
  for source in args.source or ():
    errors.require(source not in FILE_SOURCES or source in paths,
                   f"--source {source} needs a file: add --path {source}=FILE")
  return paths


def check_numbers(args: argparse.Namespace) -> None:
  """Window length, batch size and window count that can work."""
  errors.require(args.seqlen is None or args.seqlen >= 2,
                 f"--seqlen must be >= 2, got {args.seqlen}")
  errors.require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
  errors.require(args.max_windows is None or args.max_windows >= 1,
                 f"--max-windows must be >= 1, got {args.max_windows}")


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.pipeline import config, evaluation  # pylint: disable=import-outside-toplevel
  paths = source_paths(args)
  check_numbers(args)
  model, params, tok, default_seqlen = load_for_eval(args.model, args.dtype)
  if tok is None:
    raise errors.UsageError(f"--model {args.model}: the model has no tokenizer (tokenizer.json), "
                            "so there is no text to evaluate on")
  settings = config.EvalSettings(sources=tuple(args.source or ("bundled",)), seqlen=args.seqlen,
                                 batch_size=args.batch_size, max_windows=args.max_windows,
                                 paths=paths)
  results = evaluation.evaluate_sources(settings, model, params, tok,
                                        default_seqlen=default_seqlen, progress=args.progress)
  for source, r in results.items():
    print(f"{source}: perplexity {r['ppl']:.4f} over {r['n_windows']} windows of {r['seqlen']}")
  print(json.dumps(results, sort_keys=True))
  return 0
