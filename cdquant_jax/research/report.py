"""`cdquant report`: the tables and plots of one sweep directory, written to one folder.

    report = write_report("sweeps/smollm2", pivot="rows=method,cols=bits", out_dir=None)

Writes into SWEEP_DIR/report/ (or `out_dir`): report.md (every table, the failed points, the
plots), table.tex (the main pivot, booktabs), objective.tex (the summed relative objective, when
rows have it), paper.tex (paper vs ours, with a numbers file) and each plot as PNG and PDF.
Everything is checked (fields, numbers file) before anything is written.
"""

from __future__ import annotations

import dataclasses
import os

from cdquant_jax.research import paper, plots, results, tables

REPORT_DIR = "report"
OBJECTIVE_FIELD = "relative_objective_sum"


@dataclasses.dataclass(frozen=True)
class Report:
  """main_table: the main pivot as Markdown (what the command prints); files: paths written;
  notes: plots that were skipped and why."""

  main_table: str
  files: tuple[str, ...]
  notes: tuple[str, ...]


def _perplexity_metric(spec: tables.PivotSpec, rows: list[dict]) -> str | None:
  if spec.value.startswith("perplexity."):
    return spec.value
  sources = results.perplexity_sources(rows)
  return f"perplexity.{sources[0]}" if sources else None


def _figures(rows: list[dict], sweep_dir: str, metric: str | None) -> dict[str, tuple]:
  """{stem: (figure or None, why it was skipped)} of every plot."""
  no_ppl = "no perplexity in the rows"
  return {
      "pareto": (plots.pareto(rows, metric) if metric else None, no_ppl),
      "layer_ratio": (plots.layer_ratio(rows, sweep_dir),
                      "no per-layer records of GPTQ and another method at the same setting"),
      "objective_trace": (plots.objective_trace(rows), "no row carries an objective_trace"),
      "time_vs_perplexity": (plots.time_vs_perplexity(rows, metric) if metric else None, no_ppl),
      "outlier_share": (plots.outlier_share(rows, sweep_dir), "no per-layer outliers in the rows"),
  }


def _failed_section(rows: list[dict]) -> str:
  bad = results.failed(rows)
  if not bad:
    return ""
  lines = [f"- `{r.get('name', r.get('point'))}`: {' '.join(str(r.get('error', '')).split())}"
           for r in bad]
  return "## Failed points\n\n" + "\n".join(lines) + "\n"


def write_report(sweep_dir: str, pivot: str | None = None, numbers_path: str | None = None,
                 out_dir: str | None = None) -> Report:
  """Writes the report of `sweep_dir`; ResultsError for bad input (nothing written then)."""
  rows = results.load_sweep(sweep_dir)
  finished = results.done(rows)
  if not finished:
    raise results.ResultsError(f"{sweep_dir}: no finished point yet "
                               f"({len(rows)} row(s), none with status done)")
  numbers = paper.load_numbers(numbers_path) if numbers_path else None
  spec = tables.parse_pivot(pivot, tables.default_value_field(finished))
  main = tables.pivot(finished, spec)
  out_dir = out_dir or os.path.join(sweep_dir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  files = {"table.tex": tables.latex(main)}
  sections = [f"# Report of {sweep_dir}\n\n{len(finished)} done, "
              f"{len(rows) - len(finished)} failed point(s).\n", tables.markdown(main)]
  if spec.value != OBJECTIVE_FIELD and any(
      results.number(r.get(OBJECTIVE_FIELD)) is not None for r in finished):
    objective = tables.pivot(finished, dataclasses.replace(spec, value=OBJECTIVE_FIELD))
    files["objective.tex"] = tables.latex(objective)
    sections.append(tables.markdown(objective))
  if numbers is not None:
    comparisons = tables.compare(finished, numbers)
    files["paper.tex"] = tables.comparison_latex(comparisons, numbers.source)
    sections.append(tables.comparison_markdown(comparisons, numbers.source))
  sections.append(_failed_section(rows))
  written, notes, plot_lines = [], [], []
  for stem, (fig, why) in _figures(finished, sweep_dir, _perplexity_metric(spec, finished)).items():
    if fig is None:
      notes.append(f"{stem}: skipped ({why})")
      continue
    written += plots.save_figure(fig, out_dir, stem)
    plot_lines.append(f"![{stem}]({stem}.png) ([pdf]({stem}.pdf))")
  sections.append("## Plots\n\n" + "".join(f"{line}\n\n" for line in plot_lines)
                  + "".join(f"- {n}\n" for n in notes))
  files["report.md"] = "\n".join(s for s in sections if s)
  for name, text in files.items():
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
      f.write(text)
    written.append(path)
  return Report(main_table=tables.markdown(main), files=tuple(written), notes=tuple(notes))
