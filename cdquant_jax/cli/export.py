"""`cdquant export --model RUN_DIR --format gptq|compressed-tensors|gguf --output DIR`.

Writes a quantized run directory in a format serving stacks load (`cdquant_jax.export`):
gptq (GPTQ v1 checkpoint + quantize_config.json), compressed-tensors (pack-quantized, its
quantization_config in config.json), gguf (OUTPUT/model.gguf, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks).
A module the format cannot hold (SpQR statistics or outliers, fractional zeros, bits or groups
the format has no layout for, ...) ends the command with one line naming the module, the reason
and the formats that can hold it, exit code 2 (cli/errors.py); nothing is written then.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
  from cdquant_jax.export import FORMATS  # pylint: disable=import-outside-toplevel
  p.add_argument("--model", required=True, help="quantized run directory (cdquant quantize)")
  p.add_argument("--format", required=True, choices=tuple(FORMATS))
  p.add_argument("--output", required=True, help="output directory")
  p.add_argument("--round-scales", action="store_true",
                 help="round float32 scales to the format's float16 (GPTQ, GGUF) instead of "
                      "refusing them")
  p.add_argument("--gguf-dense", action="store_true",
                 help="gguf: write linears without an exact GGUF block type as dequantized F32")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  from cdquant_jax.cli import errors
  from cdquant_jax.export import ExportOptions, export_model
  options = ExportOptions(round_scales=args.round_scales, gguf_dense_fallback=args.gguf_dense)
  from cdquant_jax.export import common
  with errors.loading(args.model):  # a bad directory: a ModelLoadError naming it
    run_dir = common.load_run(args.model)
  summary = export_model(run_dir, args.format, args.output, options)
  print(f"wrote {args.output} ({args.format}, {summary['modules']} quantized modules)")
  print(json.dumps(summary["details"], sort_keys=True, default=str))
  return 0
