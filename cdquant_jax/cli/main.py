"""The `cdquant` command: `quantize` (a model, layer by layer), `eval` (perplexity), `layer` (one
layer problem), `generate` (text from a quantized model), `demo` (the offline main job), `report`
(tables and plots of a sweep), `sweep` (run a sweep of run configs), `bank` (a model's layer
problems), `plan` (per-device memory, flops and time of a run on a mesh).

Bad input ends every command with one line on stderr and exit code 2; -v shows the traceback
(see cli/errors.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cdquant_jax import compilation
from cdquant_jax.cli import demo, errors, evaluate, generate, layer, quantize, report
from cdquant_jax.cli import bank, plan, sweep
from cdquant_jax.cli import export as export_cmd

VERBOSE_HELP = "log at INFO level; on bad input print the traceback instead of one line"
CACHE_HELP = (f"JAX's persistent compilation cache directory, or 'off' (default: "
              f"${compilation.ENV_VAR}, else {compilation.DEFAULT_DIR})")


def build_parser() -> argparse.ArgumentParser:
  parser = errors.ArgumentParser(prog="cdquant", description=__doc__)
  parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
  parser.add_argument("--jax-cache", metavar="DIR", default=None, help=CACHE_HELP)
  # -v and --jax-cache are accepted after the command too; SUPPRESS keeps the global value when
  # absent there.
  verbose = argparse.ArgumentParser(add_help=False)
  verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)
  verbose.add_argument("--jax-cache", metavar="DIR", default=argparse.SUPPRESS, help=CACHE_HELP)
  sub = parser.add_subparsers(dest="command", required=True)

  def command(name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, parents=[verbose])

  quantize.add_arguments(command("quantize", "quantize a model block by block"))
  evaluate.add_arguments(command("eval", "perplexity of a (quantized) model"))
  layer.add_arguments(command("layer", "quantize one layer problem (W, H) npz"))
  generate.add_arguments(command("generate", "generate text with a quantized model"))
  demo.add_arguments(command("demo", "offline main job on the embedded default"))
  report.add_arguments(command("report", "tables and plots of a sweep directory"))
  sweep.add_arguments(command("sweep", "run a sweep of run configs (or --dry-run list it)"))
  bank.add_arguments(command("bank", "write the layer problems (W, H) of a model"))
  export_cmd.add_arguments(command("export", "write a run as gptq, compressed-tensors or gguf"))
  plan.add_arguments(command("plan", "per-device memory, flops and time of a run on a mesh"))
  return parser


COMMANDS = {"quantize": quantize.run, "eval": evaluate.run, "layer": layer.run,
            "generate": generate.run, "demo": demo.run, "report": report.run,
            "sweep": sweep.run, "bank": bank.run, "export": export_cmd.run, "plan": plan.run}


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns its exit code (2 on bad input, see cli/errors.py)."""
  try:
    args = build_parser().parse_args(argv)
  except errors.UsageError as e:  # argparse's own: unknown flag, bad type, missing argument
    return errors.report(e)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  compilation.enable_persistent_cache(args.jax_cache)
  return errors.run_command(COMMANDS[args.command], args)


if __name__ == "__main__":
  sys.exit(main())
