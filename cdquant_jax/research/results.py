"""Reading a sweep's results rows: the file, the finished rows, field lookup and grouping.

A sweep directory holds `results.jsonl`, one JSON object per finished (or failed) point, written
append-only by `research.store` (its docstring has the row schema). A crash can leave a torn last
line; it is skipped. A point run again after a failure appends a second row; the last row of each
point wins. Optional fields may be missing or null: readers here tolerate both.

Fields are named by dotted paths and looked up in the row itself, then in its `axes` (whose keys
are dotted config paths), then in its resolved `config`, so `bits`, `perplexity.wikitext2`,
`quant.knobs.act_order` and `config.calibration.seed` all name a field of a row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable

from cdquant_jax import config as config_lib
from cdquant_jax.research import store

RESULTS_FILE = store.RESULTS_FILE
# Method order in tables and legends: roughly weakest to strongest (`solvers.api.METHODS`).
METHOD_ORDER = ("rtn", "gptq", "cd", "bcd", "cyclic", "spqr", "spqr-cd")
# Fields that tell calibration seeds apart; a "setting" is a row without them.
SEED_PATHS = ("seed", "calibration.seed")
MISSING = object()


class ResultsError(config_lib.ConfigError):
  """A sweep directory, results file, field name or numbers file that cannot be used."""


def results_path(sweep_dir: str) -> str:
  """SWEEP_DIR/results.jsonl; ResultsError when the directory or the file is missing."""
  if not os.path.isdir(sweep_dir):
    raise ResultsError(f"{sweep_dir}: not a sweep directory (no such directory)")
  path = os.path.join(sweep_dir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise ResultsError(f"{sweep_dir}: no {RESULTS_FILE} (has the sweep finished a point?)")
  return path


def read_rows(path: str) -> list[dict]:
  """The rows of a results file in file order (`store.read_rows`: a torn last line is skipped,
  any other bad line raises store.StoreError, a ConfigError)."""
  return store.read_rows(path)


def latest_per_point(rows: Iterable[dict]) -> list[dict]:
  """One row per point hash (its last row), in order of each point's first row."""
  latest: dict[Any, dict] = {}
  for i, row in enumerate(rows):
    latest[row.get("point", ("row", i))] = row  # dict keeps first-insertion order
  return list(latest.values())


def done(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r.get("status") == "done"]


def failed(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r.get("status") != "done"]


def load_sweep(sweep_dir: str) -> list[dict]:
  """The latest row of every point of the sweep in `sweep_dir` (done and failed)."""
  return latest_per_point(read_rows(results_path(sweep_dir)))


def _lookup(node: Any, keys: list[str]) -> Any:
  """node[keys...], where a mapping key may itself contain dots (the keys of `axes`)."""
  if not keys:
    return node
  if not isinstance(node, dict):
    return MISSING
  for n in range(len(keys), 0, -1):  # longest dotted key first
    key = ".".join(keys[:n])
    if key in node:
      found = _lookup(node[key], keys[n:])
      if found is not MISSING:
        return found
  return MISSING


def field(row: dict, path: str) -> Any:
  """The value of dotted `path` in `row`, else in row["axes"], else in row["config"]; MISSING."""
  keys = path.split(".")
  for node in (row, row.get("axes"), row.get("config")):
    found = _lookup(node, keys) if isinstance(node, dict) else MISSING
    if found is not MISSING:
      return found
  return MISSING


def leaf_fields(row: dict, prefix: str = "") -> list[str]:
  """Dotted paths of the scalar fields of `row` (for error messages listing known fields)."""
  out = []
  for key, value in row.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out += leaf_fields(value, path + ".")
    elif not isinstance(value, list):
      out.append(path)
  return out


def require_field(rows: list[dict], path: str) -> None:
  """ResultsError naming `path` and some known fields unless some row has the field."""
  if any(field(r, path) is not MISSING for r in rows):
    return
  known = sorted({p for r in rows for p in leaf_fields(r) if not p.startswith(("config.",
                                                                             "axes."))})
  raise ResultsError(f"unknown field {path!r} (no done row has it); known: {known} "
                     "and the config paths, e.g. quant.knobs.bits")


def number(value: Any) -> float | None:
  """`value` as a finite float, else None (missing, null, text, NaN)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


# What an unquantized baseline depends on: the model and the evaluation, not the quantization.
BASELINE_SECTIONS = ("model", "eval")


def setting_key(row: dict, sections: tuple[str, ...] | None = None) -> str:
  """A row's setting (its resolved config, else axes, without the seed) as canonical JSON;
  rows that differ only by calibration seed share it. `sections`: only these config sections
  (e.g. BASELINE_SECTIONS)."""
  data = row.get("config") or row.get("axes") or {"name": row.get("name")}
  data = json.loads(json.dumps(data, default=str))
  if sections is not None and row.get("config"):
    data = {k: v for k, v in data.items() if k in sections}
  calibration = data.get("calibration")
  if isinstance(calibration, dict):
    calibration.pop("seed", None)
  for path in SEED_PATHS:
    data.pop(path, None)
  data.pop("output_dir", None)
  return json.dumps(data, sort_keys=True)


def sort_key(value: Any) -> tuple:
  """Orders table keys: numbers ascending, then methods in METHOD_ORDER, then text, None last."""
  if value is None or value is MISSING:
    return (3, 0, "")
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return (0, float(value), "")
  text = str(value)
  if text in METHOD_ORDER:
    return (1, METHOD_ORDER.index(text), text)
  return (2, 0, text)


@dataclasses.dataclass(frozen=True)
class Group:
  """Rows sharing the values `key` of some fields."""

  key: tuple
  rows: tuple[dict, ...]


def group_by(rows: Iterable[dict], paths: tuple[str, ...]) -> list[Group]:
  """Rows grouped by their values of `paths` (MISSING -> None), groups in `sort_key` order."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    key = tuple(hashable(field(row, p)) for p in paths)
    groups.setdefault(key, []).append(row)
  ordered = sorted(groups, key=lambda k: tuple(sort_key(v) for v in k))
  return [Group(k, tuple(groups[k])) for k in ordered]


def hashable(value: Any) -> Any:
  """`value` usable as a dict key: MISSING -> None, mappings and lists -> canonical JSON."""
  if value is MISSING:
    return None
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return value


def perplexity_sources(rows: Iterable[dict]) -> list[str]:
  """The corpora any row has a perplexity for, in first-seen order."""
  seen: dict[str, None] = {}
  for row in rows:
    for source in (row.get("perplexity") or {}):
      seen.setdefault(source, None)
  return list(seen)
