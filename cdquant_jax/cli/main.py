"""The `cdquant` command: `quantize` (a model, layer by layer), `eval` (perplexity), `layer` (one
layer problem), `generate` (text from a quantized model), `demo` (the offline main job)."""

from __future__ import annotations

import argparse
import logging
import sys

from cdquant_jax.cli import demo, evaluate, generate, layer, quantize


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cdquant", description=__doc__)
  parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
  sub = parser.add_subparsers(dest="command", required=True)
  quantize.add_arguments(sub.add_parser("quantize", help="quantize a model block by block"))
  evaluate.add_arguments(sub.add_parser("eval", help="perplexity of a (quantized) model"))
  layer.add_arguments(sub.add_parser("layer", help="quantize one layer problem (W, H) npz"))
  generate.add_arguments(sub.add_parser("generate", help="generate text with a quantized model"))
  demo.add_arguments(sub.add_parser("demo", help="offline main job on the embedded default"))
  return parser


COMMANDS = {"quantize": quantize.run, "eval": evaluate.run, "layer": layer.run,
            "generate": generate.run, "demo": demo.run}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  return COMMANDS[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
