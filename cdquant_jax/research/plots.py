"""Plots of sweep results (matplotlib, Agg canvas; each function returns the Figure or None).

- `pareto`: perplexity vs bits per parameter, one line per series (`series`: the variant, else
  the method; mean over seeds per setting),
  the Pareto front over all settings, and the 16-bit baseline.
- `layer_ratio`: per-layer relative objective of each method / GPTQ's on the same layer (same
  model, mode, bits, group size and seed), geometric mean by layer kind and by block.
- `objective_trace`: CD objective vs steps, for rows that carry an `objective_trace`.
- `time_vs_perplexity`: quantize seconds vs perplexity, one scatter per series.
- `outlier_share`: share of outlier weights per linear (in block order), one line per setting.

Per-layer records come from a bank row's `layers` or a sequential run's `run_dir/log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cdquant_jax.research import results

FORMATS = ("png", "pdf")
REFERENCE_METHOD = "gptq"
PAIR_FIELDS = ("mode", "config.model.path", "bits", "group_size", "seed")
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def new_figure(ncols: int = 1, width: float = 6.0) -> tuple[Figure, list]:
  fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def save_figure(fig: Figure, out_dir: str, stem: str) -> list[str]:
  """Writes out_dir/stem.png and .pdf; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}.{fmt}") for fmt in FORMATS]
  for path in paths:
    fig.savefig(path, dpi=150)
  return paths


def series(row: dict) -> str:
  """A row's plot series: its variant, else its method (a variant sweep runs one method in
  several settings, e.g. variants gptq and gptq_act_order of method gptq)."""
  return str(row.get("variant") or row.get("method"))


def _methods(rows: list[dict]) -> list[str]:
  """The series of the rows (`series`), in the results' method order."""
  return sorted({series(r) for r in rows}, key=results.sort_key)


def _mean_points(rows: list[dict], x_path: str, y_path: str) -> list[tuple[float, float]]:
  """(mean x, mean y) per setting (seeds averaged) of rows having both values, sorted by x."""
  points = []
  for group in _by_setting(rows):
    xs = [results.number(results.field(r, x_path)) for r in group]
    ys = [results.number(results.field(r, y_path)) for r in group]
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if pairs:
      points.append(tuple(float(np.mean(v)) for v in zip(*pairs)))
  return sorted(points)


def _by_setting(rows: list[dict]) -> list[list[dict]]:
  groups: dict[str, list[dict]] = {}
  for row in rows:
    groups.setdefault(results.setting_key(row), []).append(row)
  return list(groups.values())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The points no other point beats on both x and y (lower is better), sorted by x."""
  front, best_y = [], math.inf
  for x, y in sorted(points, key=lambda p: (p[0], p[1])):
    if y < best_y:
      front.append((x, y))
      best_y = y
  return front


def pareto(rows: list[dict], metric: str, bits_field: str = "bits_formula") -> Figure | None:
  """Perplexity (`metric`, e.g. perplexity.wikitext2) vs bits per parameter, per series."""
  x_path = bits_field if any(results.number(results.field(r, bits_field)) is not None
                             for r in rows) else "bits"
  fig, (ax,) = new_figure()
  everything = []
  for method in _methods(rows):
    points = _mean_points([r for r in rows if series(r) == method], x_path, metric)
    if points:
      ax.plot(*zip(*points), marker="o", label=method)
      everything += points
  if not everything:
    return None
  front = pareto_front(everything)
  ax.plot(*zip(*front), linestyle="--", color="black", linewidth=1, label="Pareto front")
  baseline = _baseline(rows, metric)
  if baseline is not None:
    ax.axhline(baseline, color="grey", linestyle=":", label="16-bit baseline")
  ys = [y for _, y in everything]
  if min(ys) > 0 and max(ys) / min(ys) > 10:
    ax.set_yscale("log")
  ax.set_xlabel(f"bits per parameter ({x_path})")
  ax.set_ylabel(metric)
  ax.set_title("Perplexity vs bits per parameter")
  ax.legend()
  return fig


def _baseline(rows: list[dict], metric: str) -> float | None:
  if not metric.startswith("perplexity."):
    return None
  values = [results.number(results.field(r, "baseline_" + metric)) for r in rows]
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def time_vs_perplexity(rows: list[dict], metric: str) -> Figure | None:
  """quantize_seconds vs `metric`, one scatter per series (every row a point)."""
  fig, (ax,) = new_figure()
  any_points = False
  for method in _methods(rows):
    pairs = [(results.number(r.get("quantize_seconds")), results.number(results.field(r, metric)))
             for r in rows if series(r) == method]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if pairs:
      ax.scatter(*zip(*pairs), label=method)
      any_points = True
  if not any_points:
    return None
  ax.set_xscale("log")
  ax.set_xlabel("quantize time (s)")
  ax.set_ylabel(metric)
  ax.set_title("Quantize time vs perplexity")
  ax.legend()
  return fig


# ----------------------------------------------------------------------------------------------
# Per-layer records.


def _run_dir(row: dict, sweep_dir: str | None) -> str | None:
  path = row.get("run_dir")
  if not isinstance(path, str):
    return None
  if os.path.isabs(path) or sweep_dir is None or os.path.isdir(path):
    return path
  return os.path.join(sweep_dir, path)


def layer_records(row: dict, sweep_dir: str | None = None) -> list[dict]:
  """Per-linear records {module, kind, block, relative_objective, outlier_share, ...} of a row:
  its `layers` (bank mode) or its run's log.jsonl (sequential); [] when it has neither."""
  records = row.get("layers")
  if not records:
    run_dir = _run_dir(row, sweep_dir)
    log = os.path.join(run_dir, "log.jsonl") if run_dir else None
    if not log or not os.path.isfile(log):
      return []
    with open(log) as f:
      records = [json.loads(line) for line in f if line.strip()]
  return [_normalized(r) for r in records if isinstance(r, dict) and "module" in r]


def _normalized(record: dict) -> dict:
  module = str(record["module"])
  block = record.get("block", record.get("layer"))
  if block is None:
    match = _BLOCK.search(module)
    block = int(match.group(1)) if match else None
  return {**record, "module": module, "kind": record.get("kind") or module.rsplit(".", 1)[-1],
          "block": block}


def _pair_key(row: dict) -> tuple:
  return tuple(results.hashable(results.field(row, p)) for p in PAIR_FIELDS)


def layer_ratios(rows: list[dict], sweep_dir: str | None = None,
                 reference: str = REFERENCE_METHOD) -> list[dict]:
  """{method, module, kind, block, ratio} for every linear of every non-reference, non-RTN row
  that has a reference row of the same PAIR_FIELDS; ratio = relative objective / reference's
  (the mean over the reference rows of that key)."""
  reference_objectives: dict[tuple, dict[str, list[float]]] = {}
  for row in rows:
    if series(row) == reference:
      table = reference_objectives.setdefault(_pair_key(row), {})
      for rec in layer_records(row, sweep_dir):
        value = results.number(rec.get("relative_objective"))
        if value is not None:
          table.setdefault(rec["module"], []).append(value)
  out = []
  for row in rows:
    table = reference_objectives.get(_pair_key(row))
    if series(row) == reference or row.get("method") == "rtn" or not table:
      continue
    for rec in layer_records(row, sweep_dir):
      value, ref = results.number(rec.get("relative_objective")), table.get(rec["module"])
      if value is not None and ref and np.mean(ref) > 0:
        out.append(dict(method=series(row), module=rec["module"], kind=rec["kind"],
                        block=rec["block"], ratio=value / float(np.mean(ref))))
  return out


def _geomean(values: list[float]) -> float:
  return float(np.exp(np.mean(np.log(np.maximum(values, 1e-300)))))


def _first_seen(values) -> list:
  return list(dict.fromkeys(values))


def layer_ratio(rows: list[dict], sweep_dir: str | None = None,
                reference: str = REFERENCE_METHOD) -> Figure | None:
  """Two panels: geometric-mean ratio to `reference` by layer kind (bars, one group of bars per
  method) and by block (one line per method); a line at 1 (= as good as the reference)."""
  ratios = layer_ratios(rows, sweep_dir, reference)
  if not ratios:
    return None
  methods = sorted(_first_seen(r["method"] for r in ratios), key=results.sort_key)
  kinds = _first_seen(r["kind"] for r in ratios)
  fig, (by_kind, by_block) = new_figure(ncols=2)
  width = 0.8 / len(methods)
  for i, method in enumerate(methods):
    mine = [r for r in ratios if r["method"] == method]
    heights = [_geomean([r["ratio"] for r in mine if r["kind"] == k] or [math.nan])
               if any(r["kind"] == k for r in mine) else math.nan for k in kinds]
    by_kind.bar(np.arange(len(kinds)) + (i - (len(methods) - 1) / 2) * width, heights, width,
                label=method)
    blocks = sorted({r["block"] for r in mine if r["block"] is not None})
    by_block.plot(blocks, [_geomean([r["ratio"] for r in mine if r["block"] == b])
                           for b in blocks], marker="o", label=method)
  by_kind.set_xticks(np.arange(len(kinds)), kinds, rotation=30)
  by_block.xaxis.set_major_locator(MaxNLocator(integer=True))
  for ax, xlabel in ((by_kind, "layer kind"), (by_block, "block")):
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"relative objective / {reference}'s")
    ax.legend()
  by_kind.set_title(f"Layer objective vs {reference} by layer kind (geo. mean)")
  by_block.set_title(f"Layer objective vs {reference} by block (geo. mean)")
  return fig


def setting_label(row: dict) -> str:
  """A row's variant (else method) and its non-seed axis values: "spqr, bits=3"."""
  axes = row.get("axes") or {}
  parts = [str(row.get("variant") or row.get("method"))]
  parts += [f"{p.rsplit('.', 1)[-1]}={v}" for p, v in axes.items()
            if p not in results.SEED_PATHS]
  return ", ".join(parts)


def outlier_share(rows: list[dict], sweep_dir: str | None = None) -> Figure | None:
  """Outlier share (% of the weights) of every linear in block order, one line per setting
  with outliers (mean over its seeds); x ticks mark the first linear of each block."""
  fig, (ax,) = new_figure(width=8.0)
  ticks: dict[int, Any] = {}
  for group in _by_setting(rows):
    shares: dict[str, list[float]] = {}
    blocks: dict[str, Any] = {}
    for row in group:
      for rec in layer_records(row, sweep_dir):
        value = results.number(rec.get("outlier_share"))
        if value is not None:
          shares.setdefault(rec["module"], []).append(value)
          blocks[rec["module"]] = rec["block"]
    if not any(v > 0 for values in shares.values() for v in values):
      continue
    ax.plot([100 * float(np.mean(v)) for v in shares.values()], marker=".",
            label=setting_label(group[0]))
    order = list(blocks.values())
    for i, block in enumerate(order):
      if i == 0 or block != order[i - 1]:
        ticks.setdefault(i, block)
  if not ax.lines:
    return None
  ax.set_xticks(list(ticks), [str(b) for b in ticks.values()])
  ax.set_xlabel("linear (ticks: first linear of each block)")
  ax.set_ylabel("outlier share (%)")
  ax.set_title("Outlier share by layer")
  ax.legend()
  return fig


def _trace(value: Any) -> tuple[list[float], list[float]] | None:
  """(steps, objectives) of an `objective_trace`: a list of objectives (step = index) or a
  mapping {steps, objective}."""
  if isinstance(value, dict):
    steps, objective = value.get("steps"), value.get("objective")
  elif isinstance(value, list):
    steps, objective = list(range(len(value))), value
  else:
    return None
  if not isinstance(steps, list) or not isinstance(objective, list) or not objective:
    return None
  pairs = [(results.number(s), results.number(o)) for s, o in zip(steps, objective)]
  pairs = [p for p in pairs if None not in p]
  return tuple(map(list, zip(*pairs))) if pairs else None


def objective_trace(rows: list[dict]) -> Figure | None:
  """Objective vs descent steps, one line per row with an `objective_trace` (else None)."""
  fig, (ax,) = new_figure()
  for row in rows:
    trace = _trace(row.get("objective_trace"))
    if trace:
      ax.plot(*trace, label=str(row.get("name", row.get("method"))))
  if not ax.lines:
    return None
  ax.set_xlabel("steps")
  ax.set_ylabel("objective")
  ax.set_title("CD objective vs steps")
  ax.legend()
  return fig
