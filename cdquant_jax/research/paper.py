"""Published numbers stored beside a paper sweep config (`configs/paper/<name>.numbers.yaml`).

    source: IST-DASLab/gptq README.md, LLaMA table (WikiText-2 perplexity)
    metric: perplexity.wikitext2            # default field of the results rows compared
    rows:
      - label: 4-bit GPTQ
        setting: {quant.method: gptq, quant.knobs.bits: 4}   # fields a matching row has
        value: 6.09
      - label: FP16
        metric: baseline_perplexity.wikitext2
        setting: {}                                          # every row
        value: 5.68

An entry names its rows by `setting` (dotted fields, see `results.field`: row fields, sweep axis
paths or config paths) or by `point` (a point name). Unknown keys and missing or non-numeric
values raise ResultsError naming the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from cdquant_jax.research import results

TOP_KEYS = {"source", "metric", "rows", "notes"}
ENTRY_KEYS = {"label", "setting", "point", "metric", "value", "note"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One published number: `value` of `metric` for the rows of `setting` (or point `point`)."""

  label: str
  metric: str
  value: float
  setting: tuple[tuple[str, Any], ...] = ()
  point: str | None = None

  def matches(self, row: dict) -> bool:
    if self.point is not None:
      return row.get("name") == self.point
    return all(_same(results.field(row, path), value) for path, value in self.setting)


@dataclasses.dataclass(frozen=True)
class Numbers:
  source: str
  entries: tuple[Entry, ...]


def _same(found: Any, wanted: Any) -> bool:
  if found is results.MISSING:
    return False
  a, b = results.number(found), results.number(wanted)
  return a == b if a is not None and b is not None else found == wanted


def load_numbers(path: str) -> Numbers:
  """Numbers from a YAML file; ResultsError (one line naming `path`) when it is malformed."""
  with open(path) as f:
    try:
      data = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise results.ResultsError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
  return numbers_from_dict(data, path)


def _check_keys(data: dict, known, bad) -> None:
  unknown = sorted(set(data) - set(known))
  if unknown:
    raise bad(f"unknown key(s) {unknown}; known: {sorted(known)}")


def numbers_from_dict(data: Any, where: str) -> Numbers:
  bad = lambda msg: results.ResultsError(f"{where}: {msg}")
  if not isinstance(data, dict):
    raise bad("the top level must be a mapping with source, metric and rows")
  _check_keys(data, TOP_KEYS, bad)
  if not isinstance(data.get("source"), str) or not data["source"].strip():
    raise bad("`source:` (the paper table or README the numbers come from) is required")
  if not isinstance(data.get("rows"), list):
    raise bad("`rows:` must be a list of {label, setting or point, value}")
  entries = tuple(_entry(item, data.get("metric"), f"{where}: rows[{i}]")
                  for i, item in enumerate(data["rows"]))
  return Numbers(source=data["source"].strip(), entries=entries)


def _entry(item: Any, default_metric: Any, where: str) -> Entry:
  bad = lambda msg: results.ResultsError(f"{where}: {msg}")
  if not isinstance(item, dict):
    raise bad("must be a mapping {label, setting or point, value}")
  _check_keys(item, ENTRY_KEYS, bad)
  value = results.number(item.get("value"))
  if value is None:
    raise bad(f"value must be a finite number, got {item.get('value')!r}")
  metric = item.get("metric", default_metric)
  if not isinstance(metric, str) or not metric:
    raise bad("no metric (give `metric:` at the top or in the row)")
  if ("setting" in item) == ("point" in item):
    raise bad("give exactly one of `setting:` (a mapping) and `point:` (a point name)")
  if not isinstance(item.get("point", ""), str):
    raise bad(f"point must be a point name, got {item['point']!r}")
  setting = item.get("setting", {})
  if not isinstance(setting, dict) or not all(isinstance(k, str) for k in setting):
    raise bad("setting must be a mapping {field path: value}")
  label = item.get("label") or ", ".join(f"{k}={v}" for k, v in setting.items()) or "all"
  return Entry(label=str(label), metric=metric, value=value,
               setting=tuple(setting.items()), point=item.get("point"))
