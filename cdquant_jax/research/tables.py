"""Tables of sweep results: a pivot (rows x columns of any fields, mean ± std over seeds) and a
"paper vs ours" table, as Markdown or LaTeX (booktabs).

    spec = parse_pivot("rows=method,cols=bits,value=perplexity.wikitext2")
    table = pivot(results.done(rows), spec)
    print(markdown(table))

A row or column may combine fields with "+" (rows=method+group_size). Every done row whose value
is a number lands in the cell of its (row, column) key; the cell shows the mean over those rows,
± the sample standard deviation (ddof=1) when there are several (the calibration seeds). A cell
whose rows differ by more than the seed (another setting the pivot does not show) is marked †.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Iterable

import numpy as np

from cdquant_jax.research import results

if TYPE_CHECKING:
  from cdquant_jax.research.paper import Numbers

PIVOT_KEYS = ("rows", "cols", "value")
MIXED_MARK = "†"
MIXED_NOTE = f"{MIXED_MARK} the cell averages rows of several settings (not only seeds)"


@dataclasses.dataclass(frozen=True)
class PivotSpec:
  """Fields (dotted paths, see `results.field`) of the table's rows, columns and cells."""

  rows: tuple[str, ...] = ("method",)
  cols: tuple[str, ...] = ("bits",)
  value: str = "perplexity.bundled"


@dataclasses.dataclass(frozen=True)
class Stat:
  """mean and sample std (ddof=1; None for one value) of n values; settings: distinct
  settings (`results.setting_key`) among the rows averaged."""

  mean: float
  std: float | None
  n: int
  settings: int = 1


@dataclasses.dataclass(frozen=True)
class Table:
  """A pivot: cells[(row key, col key)] for the keys that have values."""

  spec: PivotSpec
  row_keys: tuple[tuple, ...]
  col_keys: tuple[tuple, ...]
  cells: dict[tuple[tuple, tuple], Stat]

  @property
  def mixed(self) -> bool:
    return any(s.settings > 1 for s in self.cells.values())


def parse_pivot(text: str | None, default_value: str) -> PivotSpec:
  """PivotSpec from "rows=a+b,cols=c,value=d" (any keys may be left out; None: all defaults)."""
  given: dict[str, str] = {}
  for part in (text or "").split(","):
    if not part.strip():
      continue
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or key not in PIVOT_KEYS or not value.strip():
      raise results.ResultsError(f"--pivot {text!r}: expected rows=FIELD,cols=FIELD,"
                                 f"value=FIELD (bad part {part!r})")
    given[key] = value.strip()
  split = lambda s: tuple(p.strip() for p in s.split("+") if p.strip())
  return PivotSpec(rows=split(given.get("rows", "method")), cols=split(given.get("cols", "bits")),
                   value=given.get("value", default_value))


def default_value_field(rows: list[dict]) -> str:
  """perplexity.<first corpus> when rows have perplexities, else the summed relative objective
  (layer-wise bank sweeps evaluate no perplexity)."""
  sources = results.perplexity_sources(rows)
  return f"perplexity.{sources[0]}" if sources else "relative_objective_sum"


def summarize(values: Iterable[float], settings: int = 1) -> Stat:
  """Mean and sample std (ddof=1) of `values` (std None for a single value)."""
  v = np.asarray(list(values), np.float64)
  std = float(np.std(v, ddof=1)) if v.size > 1 else None
  return Stat(mean=float(np.mean(v)), std=std, n=int(v.size), settings=settings)


def check_fields(rows: list[dict], spec: PivotSpec) -> None:
  """ResultsError for a field of `spec` that no row has."""
  for path in spec.rows + spec.cols + (spec.value,):
    results.require_field(rows, path)


def pivot(rows: list[dict], spec: PivotSpec) -> Table:
  """The pivot of the done `rows` (rows whose value is not a number are left out)."""
  check_fields(rows, spec)
  valued = [r for r in rows if results.number(results.field(r, spec.value)) is not None]
  cells, row_keys, col_keys = {}, set(), set()
  for group in results.group_by(valued, spec.rows + spec.cols):
    r, c = group.key[:len(spec.rows)], group.key[len(spec.rows):]
    values = [results.number(results.field(x, spec.value)) for x in group.rows]
    cells[(r, c)] = summarize(values, len({results.setting_key(x) for x in group.rows}))
    row_keys.add(r)
    col_keys.add(c)
  order = lambda keys: tuple(sorted(keys, key=lambda k: tuple(results.sort_key(v) for v in k)))
  return Table(spec, order(row_keys), order(col_keys), cells)


# ----------------------------------------------------------------------------------------------
# Formatting.


def format_number(x: float, digits: int = 2) -> str:
  """`digits` decimals; 3 significant digits from 1e5 up (a diverged 2-bit perplexity)."""
  return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def auto_digits(table: Table, at_least: int = 2, at_most: int = 6) -> int:
  """Decimals that give the smallest nonzero cell mean about 3 significant digits
  (perplexities: 2; relative objectives near 0.01: 4)."""
  means = [abs(s.mean) for s in table.cells.values() if s.mean != 0]
  if not means:
    return at_least
  return int(min(at_most, max(at_least, 2 - math.floor(math.log10(min(means))))))


def format_stat(stat: Stat | None, digits: int = 2, pm: str = "±") -> str:
  if stat is None:
    return "–"
  text = format_number(stat.mean, digits)
  if stat.std is not None:
    text += f" {pm} {format_number(stat.std, digits)}"
  return text + (MIXED_MARK if stat.settings > 1 else "")


def key_label(key: tuple) -> str:
  return " / ".join("–" if v is None else str(v) for v in key)


def _corner(spec: PivotSpec) -> str:
  return f"{'+'.join(spec.rows)} \\ {'+'.join(spec.cols)}"


def grid(table: Table, digits: int | None = None, pm: str = "±") -> list[list[str]]:
  """The table as text cells: a header line, then one line per row key (digits None:
  `auto_digits`)."""
  digits = auto_digits(table) if digits is None else digits
  lines = [[_corner(table.spec)] + [key_label(c) for c in table.col_keys]]
  for r in table.row_keys:
    lines.append([key_label(r)] + [format_stat(table.cells.get((r, c)), digits, pm)
                                   for c in table.col_keys])
  return lines


def markdown_lines(lines: list[list[str]]) -> str:
  """A Markdown table of text cells (first line = header)."""
  out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
  out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
  return "\n".join(out) + "\n"


def markdown(table: Table, digits: int | None = None) -> str:
  text = f"{table.spec.value}, mean ± std over seeds\n\n" + markdown_lines(grid(table, digits))
  return text + (f"\n{MIXED_NOTE}\n" if table.mixed else "")


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$", "–": "--"}


def latex_escape(text: str) -> str:
  return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def latex_lines(lines: list[list[str]], caption: str | None = None) -> str:
  """A booktabs tabular of text cells (first line = header; first column left, rest right)."""
  body = [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in lines]
  out = [r"\begin{tabular}{l" + "r" * (len(lines[0]) - 1) + "}", r"\toprule", body[0],
         r"\midrule", *body[1:], r"\bottomrule", r"\end{tabular}"]
  if caption:
    out.insert(0, f"% {caption}")
  return "\n".join(out) + "\n"


def latex(table: Table, digits: int | None = None) -> str:
  """booktabs tabular (needs \\usepackage{booktabs})."""
  caption = f"{table.spec.value}, mean ± std over seeds" + (f"; {MIXED_NOTE}" if table.mixed
                                                            else "")
  return latex_lines(grid(table, digits), caption)


# ----------------------------------------------------------------------------------------------
# Paper vs ours.


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One published number and our rows of the same setting."""

  label: str
  metric: str
  paper: float
  ours: Stat | None

  @property
  def delta(self) -> float | None:
    return None if self.ours is None else self.ours.mean - self.paper


def compare(rows: list[dict], numbers: "Numbers") -> list[Comparison]:
  """Each entry of a `paper.Numbers` against the done `rows` that match its setting (for a
  baseline_* metric, rows of several quantization settings count as one setting)."""
  out = []
  for entry in numbers.entries:
    matched = [r for r in rows if entry.matches(r)]
    values = [v for v in (results.number(results.field(r, entry.metric)) for r in matched)
              if v is not None]
    sections = results.BASELINE_SECTIONS if entry.metric.startswith("baseline_") else None
    settings = len({results.setting_key(r, sections) for r in matched})
    ours = summarize(values, settings) if values else None
    out.append(Comparison(entry.label, entry.metric, entry.value, ours))
  return out


def comparison_grid(comparisons: list[Comparison], digits: int = 2) -> list[list[str]]:
  lines = [["setting", "metric", "paper", "ours", "ours − paper"]]
  for c in comparisons:
    delta = "–" if c.delta is None else f"{c.delta:+.{digits}f}"
    lines.append([c.label, c.metric, format_number(c.paper, digits), format_stat(c.ours, digits),
                  delta])
  return lines


def comparison_markdown(comparisons: list[Comparison], source: str, digits: int = 2) -> str:
  text = f"Paper vs ours ({source})\n\n" + markdown_lines(comparison_grid(comparisons, digits))
  if any(c.ours is not None and c.ours.settings > 1 for c in comparisons):
    text += f"\n{MIXED_NOTE}\n"
  return text


def comparison_latex(comparisons: list[Comparison], source: str, digits: int = 2) -> str:
  return latex_lines(comparison_grid(comparisons, digits), f"paper vs ours: {source}")
