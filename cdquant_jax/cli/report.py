"""`cdquant report SWEEP_DIR [--pivot rows=method,cols=bits,value=perplexity.bundled]
[--paper configs/paper/X.numbers.yaml] [--out DIR]`: tables and plots of a sweep.

Writes report.md, LaTeX tables and PNG/PDF plots into SWEEP_DIR/report/ (or --out) and prints
the main table. A missing directory or results file, an unknown pivot field or a malformed
numbers file ends with one line on stderr and exit code 2 (cli/errors.py).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep directory with results.jsonl")
  p.add_argument("--pivot", default=None, metavar="rows=F,cols=F,value=F",
                 help="fields of the main table (dotted, '+' combines fields; default "
                      "rows=method,cols=bits,value=perplexity.<first corpus>)")
  p.add_argument("--paper", default=None, metavar="NUMBERS_YAML",
                 help="published numbers to print beside ours (configs/paper/*.numbers.yaml)")
  p.add_argument("--out", default=None, metavar="DIR", help="output folder (SWEEP_DIR/report)")


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.research import report  # pylint: disable=import-outside-toplevel
  result = report.write_report(args.sweep_dir, pivot=args.pivot, numbers_path=args.paper,
                               out_dir=args.out)
  print(result.main_table, end="")
  for note in result.notes:
    print(f"note: {note}")
  print(f"wrote {len(result.files)} files to {args.out or args.sweep_dir + '/report'}")
  return 0
