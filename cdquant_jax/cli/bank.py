"""`cdquant bank --config run.yaml --out BANK_DIR [--blocks 0,1,2] [--set a.b=c]`.

Writes the layer problems of the run's model on its calibration data, on full-precision
activations (`research.bank`): BANK_DIR/layers/<module>.npz (W, H) and BANK_DIR/bank.json.
A bank is written once: an existing BANK_DIR with bank.json is kept when it holds the same
model, data and blocks, and is an error otherwise. Bad input exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import os

from cdquant_jax.cli import errors
from cdquant_jax.cli import quantize


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="YAML run config (model, calibration)")
  p.add_argument("--out", required=True, help="bank directory to write")
  p.add_argument("--blocks", help="comma-separated block indices (default: every block)")
  p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                 help="override a run config field, e.g. --set calibration.nsamples=32")


def parse_blocks(text: str | None) -> list[int] | None:
  """"0,1,2" -> [0, 1, 2]; UsageError for anything but non-negative integers."""
  if text is None:
    return None
  items = [t.strip() for t in text.split(",")]
  errors.require(all(t.isdigit() for t in items),
                 f"--blocks {text!r}: expected comma-separated block indices, e.g. 0,1,2")
  return [int(t) for t in items]


def run(args: argparse.Namespace) -> int:
  from cdquant_jax import data  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import checkpoint  # pylint: disable=import-outside-toplevel
  from cdquant_jax.research import bank  # pylint: disable=import-outside-toplevel
  from cdquant_jax.research import runner  # pylint: disable=import-outside-toplevel
  blocks = parse_blocks(args.blocks)
  run_cfg = quantize.load_run_config(argparse.Namespace(config=args.config, set=args.set,
                                                        output=None))
  model, params, tokenizer, _ = runner.load_model_once(run_cfg.model)
  with errors.about("--blocks"):
    chosen = bank.select_blocks(blocks, model.num_layers)
  c = run_cfg.calibration
  ids = data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                 seed=c.seed, path=c.path, field=c.field)
  model_hash = checkpoint.model_hash(model, params)
  if os.path.exists(os.path.join(args.out, bank.BANK_FILE)):
    existing = bank.read_bank(args.out)
    same = (existing["model"].get("hash") == model_hash and existing["blocks"] == chosen
            and existing["calibration"].get("token_hash") == data.token_hash(ids)
            and existing.get("forward_batch_size") == run_cfg.forward_batch_size)
    errors.require(same, f"--out {args.out}: holds a bank of another model, data or blocks; "
                   "choose a new directory")
    print(f"{args.out}: the bank exists ({len(existing['modules'])} layers)")
    return 0
  info = bank.build_bank(run_cfg, args.out, model, params, ids, blocks=chosen,
                         model_hash=model_hash)
  print(f"wrote {args.out}: {len(info['modules'])} layers of blocks {info['blocks']}, "
        f"calibration token hash {info['calibration']['token_hash'][:12]}")
  return 0
