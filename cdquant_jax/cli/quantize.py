"""`cdquant quantize --config X.yaml [--set a.b=c ...] [--resume]`: the layer-sequential pipeline.

Several processes (one per host): the same command on every host with --coordinator HOST:PORT
--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or a cluster JAX detects) and a `mesh` in the config; only process 0 writes the
output directory and prints the summary (`distributed.multihost`).

Writes the quantized model directory (`run.output_dir`: quantized.safetensors, params,
model.json, metrics.json, log.jsonl) and prints a summary. Bad input (config, model, resume
checkpoint) exits with code 2 and one line naming the file or flag (cli/errors.py).
"""

from __future__ import annotations

import argparse
import json

from cdquant_jax.cli import errors


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", help="YAML run config (see configs/); defaults when omitted")
  p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                 help="override a config field, e.g. --set quant.knobs.bits=4")
  p.add_argument("--output", help="output directory (same as --set output_dir=...)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the checkpoint in the output directory")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                 help="multi-process run: process 0's address (env JAX_COORDINATOR_ADDRESS)")
  p.add_argument("--num-processes", type=int, default=None,
                 help="multi-process run: number of processes (env JAX_NUM_PROCESSES)")
  p.add_argument("--process-id", type=int, default=None,
                 help="multi-process run: this process's index (env JAX_PROCESS_ID)")


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.distributed import multihost  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import sequential  # pylint: disable=import-outside-toplevel
  with errors.about("--coordinator/--num-processes/--process-id"):
    group = multihost.ProcessGroup.from_env(coordinator=args.coordinator,
                                            num_processes=args.num_processes,
                                            process_id=args.process_id)
  multihost.initialize(group)  # before any JAX computation
  run_cfg = load_run_config(args)
  writer = multihost.is_writer()
  metrics = sequential.quantize_model(run_cfg, resume=args.resume,
                                      progress=writer and not args.no_progress)
  if writer:
    print(format_summary(run_cfg.output_dir, metrics))
  return 0


def load_run_config(args: argparse.Namespace):
  """The RunConfig of --config (defaults when omitted) with --set and --output applied.

  Errors name where the bad value is: the YAML file when it fails alone, else the flags.
  """
  from cdquant_jax.pipeline import config  # pylint: disable=import-outside-toplevel
  overrides = list(args.set) + ([f"output_dir={args.output}"] if args.output else [])
  with errors.about(args.config):
    run_cfg = config.load_run_config(args.config)
  if not overrides:
    return run_cfg
  flags = [f"--set {s}" for s in args.set] + ([f"--output {args.output}"] if args.output else [])
  with errors.about(" ".join(flags)):
    return config.load_run_config(args.config, overrides)


def format_summary(output_dir: str, metrics: dict) -> str:
  s = metrics["summary"]
  lines = [f"wrote {output_dir}",
           f"  modules {s['modules']}, methods {s.get('methods')}, bits/param "
           f"{s.get('bits_formula', float('nan')):.3f} (stored {s.get('bits_stored', float('nan')):.3f})",
           f"  relative objective (sum) {s.get('relative_objective_sum')}",
           f"  time {metrics['timing']}, memory {metrics['memory']}"]
  for name, key in (("baseline", "baseline_perplexity"), ("quantized", "perplexity")):
    for source, result in metrics.get(key, {}).items():
      lines.append(f"  {name} perplexity {source}: {result['ppl']:.4f}")
  return "\n".join(lines) + "\n" + json.dumps({"summary": s}, sort_keys=True)
