"""`cdquant sweep --config sweeps/X.yaml [--dry-run] [--jobs N] [--devices 0,1] [--out DIR]
[--cache DIR]`.

Expands the sweep (`research.sweep`) and runs its points that have no "done" row yet in
SWEEP_DIR/results.jsonl (`research.runner`); --dry-run lists the points (name, hash, axes,
done or not) without running anything. A bad sweep file, axis path or value exits with code 2
and one line naming it (cli/errors.py); a point that fails is recorded and the sweep goes on
(exit code 1 when any point failed).
"""

from __future__ import annotations

import argparse
import json

from cdquant_jax.cli import errors


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="sweep YAML (see configs/sweeps/)")
  p.add_argument("--dry-run", action="store_true", help="list the points, run nothing")
  p.add_argument("--jobs", type=int, default=None, help="points run in parallel processes "
                 "(default 1)")
  p.add_argument("--devices", help="comma-separated GPU ids, one worker per device (--jobs "
                 "defaults to their number)")
  p.add_argument("--only", action="append", metavar="GLOB", help="run only the points whose "
                 "name matches (shell pattern, e.g. 'spqr_cd-*'; repeatable)")
  p.add_argument("--isolate", action="store_true", help="each point in a process of its own "
                 "also with --jobs 1 (a crashing point then fails alone; always so with --jobs > 1)")
  p.add_argument("--out", help="sweep directory (default: the sweep's output_dir)")
  p.add_argument("--cache", help="shared cache directory (default: SWEEP_DIR/cache)")
  p.add_argument("--no-progress", action="store_true", help="no per-point progress bar")


def run(args: argparse.Namespace) -> int:
  from cdquant_jax.research import runner, sweep  # pylint: disable=import-outside-toplevel
  devices = _devices(args.devices)
  jobs = args.jobs if args.jobs is not None else len(devices) if devices else 1
  errors.require(jobs >= 1, f"--jobs must be >= 1, got {jobs}")
  errors.require(devices is None or jobs == len(devices),
                 f"--jobs {jobs} with --devices {args.devices}: one worker per device")
  with errors.about(args.config):
    spec = sweep.load_sweep(args.config)
    directory, points, done = runner.plan(spec, args.out)
  if args.dry_run:
    print(format_points(spec, directory, runner.selected(points, _only(args.only)), done))
    return 0
  outcome = runner.run_sweep(spec, out=args.out, cache=args.cache, jobs=jobs, devices=devices,
                             isolate=args.isolate, only=_only(args.only),
                             progress=not args.no_progress and jobs == 1, report=print)
  print(f"{len(outcome.done)} done, {len(outcome.failed)} failed, {len(outcome.skipped)} "
        f"skipped (already done); results in {directory}/results.jsonl")
  return 1 if outcome.failed else 0


def _devices(text: str | None) -> tuple[str, ...] | None:
  """("0", "1") for "0,1"; None for no --devices. Ids must be distinct non-negative integers."""
  if text is None:
    return None
  ids = tuple(part.strip() for part in text.split(","))
  errors.require(all(i.isdigit() for i in ids) and len(set(ids)) == len(ids),
                 f"--devices must be distinct GPU ids like 0,1, got {text!r}")
  return ids


def _only(patterns: list[str] | None) -> tuple[str, ...] | None:
  return None if patterns is None else tuple(patterns)


def format_points(spec, directory: str, points, done: set[str]) -> str:
  """One line per point: name, hash[:12], done/todo, axes (and variant) as JSON."""
  lines = [f"sweep {spec.name} ({spec.mode}): {len(points)} points, "
           f"{sum(p.hash in done for p in points)} done, in {directory}"]
  width = max(len(p.name) for p in points)
  for p in points:
    axes = ({"variant": p.variant} if p.variant else {}) | p.axes
    lines.append(f"  {p.name:<{width}}  {p.hash[:12]}  {'done' if p.hash in done else 'todo'}  "
                 f"{json.dumps(axes, sort_keys=False)}")
  return "\n".join(lines)
