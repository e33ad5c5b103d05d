"""Pipeline benchmark: wall time, phase breakdown and peak memory to quantize SmolLM2-135M.

Each method runs in its own subprocess (so the peak RSS is that method's), on the offline
SmolLM2-135M-Instruct GGUF, with the configs/smollm2/<method>_w3.yaml settings (3 bits; GPTQ and
CD in groups of 64, SpQR in groups of 16 with 3-bit statistics and outliers), calibration
128 x 512 tokens of the bundled corpus, true-sequential. Perplexity is measured on the bundled
evaluation split (seqlen 512), with the same block-by-block forward for every model.
Times are wall seconds on this (shared) machine, compilation included, as a user sees them.

    python experiments/bench_pipeline.py --out experiments/results/bench_pipeline.md
    python experiments/bench_pipeline.py --methods gptq --nsamples 32   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

CONFIGS = {"gptq": "configs/smollm2/gptq_w3.yaml", "cd": "configs/smollm2/cd_w3.yaml",
           "spqr": "configs/smollm2/spqr_w3.yaml", "bcd": "configs/smollm2/bcd_w3.yaml"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("embed_or_replay_seconds", "capture_hessian_seconds", "solve_pack_seconds",
          "propagate_seconds", "checkpoint_seconds", "export_seconds")


def run_one(method: str, args: argparse.Namespace) -> dict:
  """Quantizes with one method in this process; returns metrics + load time."""
  from cdquant_jax.pipeline import config, sequential  # pylint: disable=import-outside-toplevel
  overrides = [f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}",
               f"output_dir={args.output_dir}/{method}", f"checkpoint={args.checkpoint}",
               f"quant.true_sequential={not args.no_true_sequential}"]
  overrides += [f"eval.max_windows={args.eval_windows}"] if args.eval_windows else []
  overrides += ["eval.baseline=false"] if not args.baseline else []
  overrides += [] if args.eval else ["eval.sources=[]"]
  run = config.load_run_config(os.path.join(ROOT, CONFIGS[method]), overrides)
  start = time.perf_counter()
  metrics = sequential.quantize_model(run, progress=args.progress)
  metrics["total_seconds"] = round(time.perf_counter() - start, 2)
  metrics["calibration"] = f"{args.nsamples} x {args.seqlen}"
  return metrics


def spawn(method: str, args: argparse.Namespace, baseline: bool) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--one", method, "--nsamples",
         str(args.nsamples), "--seqlen", str(args.seqlen), "--output-dir", args.output_dir,
         "--checkpoint", args.checkpoint, "--eval-windows", str(args.eval_windows or 0)]
  cmd += ["--baseline"] if baseline else []
  cmd += ["--no-eval"] if not args.eval else []
  cmd += ["--no-true-sequential"] if args.no_true_sequential else []
  print("running", " ".join(cmd[1:]), flush=True)
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: dict, args: argparse.Namespace) -> str:
  lines = [
      "# Pipeline benchmark: SmolLM2-135M, 3-bit, layer-sequential", "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs while "
      f"measuring), {platform.python_version()}; `python experiments/bench_pipeline.py "
      f"--nsamples {args.nsamples} --seqlen {args.seqlen}`. One subprocess per method. Calibration "
      f"windows of the bundled corpus (column 'calibration'), "
      f"{'true-sequential' if not args.no_true_sequential else 'not true-sequential'}, "
      f"checkpoint `{args.checkpoint}`. Times include compilation.", "",
      "| method | calibration | bits/param | rel. objective (sum) | perplexity | quantize s | "
      "peak RSS MiB |", "|---|---|---|---|---|---|---|"]
  base = None
  for method, m in results.items():
    s = m["summary"]
    ppl = m.get("perplexity", {}).get("bundled", {}).get("ppl")
    base = base or m.get("baseline_perplexity", {}).get("bundled", {}).get("ppl")
    lines.append(f"| {method} | {m.get('calibration', '-')} | {s['bits_formula']:.3f} | {s['relative_objective_sum']:.5f} | "
                 f"{'-' if ppl is None else f'{ppl:.3f}'} | {m['timing']['quantize_seconds']:.1f} | "
                 f"{m['memory']['peak_host_mib']:.0f} |")
  if base is not None:
    lines.append(f"| fp32 (unquantized) | - | 32 | - | {base:.3f} | - | - |")
  lines += ["", "Where the quantize time goes (seconds):", "",
            "| method | " + " | ".join(p.replace("_seconds", "") for p in PHASES) + " |",
            "|---|" + "---|" * len(PHASES)]
  for method, m in results.items():
    lines.append(f"| {method} | " + " | ".join(f"{m['timing'].get(p, 0.0):.1f}" for p in PHASES)
                 + " |")
  return "\n".join(lines) + "\n"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--methods", default="gptq,cd,spqr")
  p.add_argument("--nsamples", type=int, default=128)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--checkpoint", default="replay", choices=("replay", "activations", "none"))
  p.add_argument("--eval-windows", type=int, default=0, help="0 = the whole evaluation split")
  p.add_argument("--no-eval", dest="eval", action="store_false")
  p.add_argument("--no-true-sequential", action="store_true")
  p.add_argument("--output-dir", default=None)
  p.add_argument("--out", default=None, help="write the Markdown table here")
  p.add_argument("--from-dirs", nargs="+", metavar="METHOD=DIR",
                 help="only render the table from finished runs' metrics.json")
  p.add_argument("--one", help=argparse.SUPPRESS)
  p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--progress", action="store_true")
  args = p.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args), sort_keys=True))
    return 0
  if args.from_dirs:
    results = {}
    for item in args.from_dirs:
      method, directory = item.split("=", 1)
      with open(os.path.join(directory, "metrics.json")) as f:
        results[method] = json.load(f)
      with open(os.path.join(directory, "run_config.json")) as f:
        c = json.load(f)["calibration"]
      results[method]["calibration"] = f"{c['nsamples']} x {c['seqlen']}"
    return _emit(markdown(results, args), args.out)
  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
    args.output_dir = args.output_dir or tmp
    results = {}
    for i, method in enumerate(args.methods.split(",")):
      results[method] = spawn(method, args, baseline=(i == 0))
      print(json.dumps({method: results[method]["timing"]}), flush=True)
  return _emit(markdown(results, args), args.out)


def _emit(text: str, out: str | None) -> int:
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
