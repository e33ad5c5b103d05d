"""The sweep schema: a base run config and axes over its fields, expanded into points.

A sweep YAML file (`SweepConfig`; unknown keys are ConfigErrors):

    name: smollm2_methods           # default: the file's stem
    mode: bank                      # sequential (the pipeline, default) | bank (layer-wise)
    base_config: ../smollm2/gptq_w3.yaml   # a run YAML, relative to this file; or
    base: {model: {path: smollm2}, ...}    # the run config itself (one of the two)
    overrides: {calibration.nsamples: 32}  # dotted paths set on the base
    variants:                       # named override sets: one axis, outermost
      gptq: {quant.method: gptq}
      gptq_act_order: {quant.method: gptq, quant.knobs.act_order: true}
    axes:                           # cartesian product, first axis slowest
      quant.knobs.bits: [2, 3, 4]
    zip:                            # paths that vary together (one mapping, or a list of them)
      {quant.knobs.group_size: [32, 64], eval.max_windows: [4, 8]}
    seeds: [0, 1, 2]                # innermost axis: calibration.seed
    blocks: [0, 1, 2]               # bank mode: the blocks of the bank (default: all)
    bank_dir: banks/smollm2         # bank mode: an existing `cdquant bank` directory
    output_dir: runs/sweeps/X       # SWEEP_DIR (default runs/sweeps/<name>); --out wins
    cache_dir: null                 # shared token / bank cache (default SWEEP_DIR/cache)

Paths walk dataclass fields, free-form mapping keys (`quant.solvers.cd.max_steps_factor`) and
list items by index (`quant.rules.0.knobs.bits`), as `config.replace_paths` does. Every axis
value is checked on its own at expansion (a path that does not exist or a value the config
rejects is a ConfigError naming the axis and the value), then every point as a whole; a path set
by two dimensions (e.g. a variant and an axis), a quant.solvers.<method> path of a method the
point does not use, or two points that resolve to the same config (an axis without effect), are
ConfigErrors too, so an axis is never silently ignored.

A point is the resolved RunConfig, its hash (`point_hash`: sha256 of the canonical JSON of the
config without output_dir, with the mode and bank blocks), a readable name, and its run
directory SWEEP_DIR/points/<name>-<hash[:8]>: a new base config makes new hashes and
directories, never overwriting old ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Literal

from cdquant_jax import config as config_lib
from cdquant_jax.pipeline import config as run_lib
from cdquant_jax.solvers import api

ConfigError = config_lib.ConfigError
SEED_PATH = "calibration.seed"
POINTS_DIR = "points"
_MAX_NAME = 96


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
  """A sweep (see the module docstring for every field)."""

  name: str | None = None
  mode: Literal["sequential", "bank"] = "sequential"
  base: dict | None = None
  base_config: str | None = None
  overrides: dict = dataclasses.field(default_factory=dict)
  variants: dict = dataclasses.field(default_factory=dict)
  axes: dict = dataclasses.field(default_factory=dict)
  zip: tuple[dict, ...] = ()
  seeds: tuple[int, ...] = ()
  blocks: tuple[int, ...] | None = None
  bank_dir: str | None = None
  output_dir: str | None = None
  cache_dir: str | None = None

  def __post_init__(self):
    config_lib.reject_unless((self.base is None) != (self.base_config is None),
                             "give exactly one of base (a run config) and base_config (a file)")
    for field in ("blocks", "bank_dir"):
      config_lib.reject_unless(self.mode == "bank" or getattr(self, field) is None,
                               f"{field} is for mode: bank only")
    config_lib.reject_unless(len(set(self.seeds)) == len(self.seeds),
                             f"seeds: repeated values in {list(self.seeds)}")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: resolved config, hash, name and where its values came from.

  axes: {dotted path: value} of the axis, zip and seed values (not the variant's overrides).
  """

  name: str
  hash: str
  run: run_lib.RunConfig
  axes: dict
  variant: str | None

  @property
  def run_dir(self) -> str:
    return self.run.output_dir


@dataclasses.dataclass(frozen=True)
class _Option:
  """One value of one dimension: its label in the point name, the paths it sets, and which
  of those are reported as axes."""

  label: str
  changes: dict
  axes: dict
  variant: str | None = None


# ----------------------------------------------------------------------------------------------
# Loading.


def load_sweep(path: str) -> SweepConfig:
  """SweepConfig from a YAML file; base_config is resolved relative to the file."""
  data = dict(config_lib.load_yaml(path))
  if isinstance(data.get("zip"), dict):
    data["zip"] = [data["zip"]]
  data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
  if isinstance(data.get("base_config"), str):
    data["base_config"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                       data["base_config"])
  return config_lib.from_dict(SweepConfig, data, where="sweep")


def sweep_dir(sweep: SweepConfig, out: str | None = None) -> str:
  """SWEEP_DIR: `out`, else the sweep's output_dir, else runs/sweeps/<name>."""
  return out or sweep.output_dir or os.path.join("runs", "sweeps", sweep.name or "sweep")


def cache_dir(sweep: SweepConfig, directory: str, override: str | None = None) -> str:
  return override or sweep.cache_dir or os.path.join(directory, "cache")


def base_run(sweep: SweepConfig) -> run_lib.RunConfig:
  """The base RunConfig with the sweep's overrides applied (validated)."""
  if sweep.base_config is not None:
    base = run_lib.load_run_config(sweep.base_config)
  else:
    base = run_lib.run_config_from_dict(sweep.base)
  try:
    return config_lib.apply_overrides(base, dict(sweep.overrides)).validate()
  except ConfigError as e:
    raise ConfigError(f"overrides: {e}") from e


# ----------------------------------------------------------------------------------------------
# Hash and names.


def canonical_json(data: Any) -> str:
  return json.dumps(data, sort_keys=True, separators=(",", ":"))


def point_spec(run: run_lib.RunConfig, mode: str, blocks: tuple[int, ...] | None) -> dict:
  """What a point's hash covers: the resolved config but output_dir, the mode (and blocks)."""
  data = config_lib.to_dict(run)
  data.pop("output_dir")
  spec = {"mode": mode, "run": data}
  if mode == "bank":
    spec["blocks"] = None if blocks is None else list(blocks)
  return spec


def point_hash(run: run_lib.RunConfig, mode: str = "sequential",
               blocks: tuple[int, ...] | None = None) -> str:
  """sha256 hex of `point_spec` as canonical JSON (sorted keys, no spaces)."""
  return hashlib.sha256(canonical_json(point_spec(run, mode, blocks)).encode()).hexdigest()


def _value_text(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _safe(text: str) -> str:
  """`text` with every character outside [A-Za-z0-9_.=+-] replaced by "_"."""
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def _short_names(paths: list[str]) -> dict[str, str]:
  """path -> its last component, or the whole path where two paths share the last one."""
  last = [p.split(".")[-1] for p in paths]
  return {p: (l if last.count(l) == 1 else p) for p, l in zip(paths, last)}


# ----------------------------------------------------------------------------------------------
# Expansion.


def _as_values(where: str, values: Any) -> list:
  if not isinstance(values, (list, tuple)):
    raise ConfigError(f"{where}: expected a list of values, got {values!r}")
  if not values:
    raise ConfigError(f"{where}: an empty list gives no points")
  return list(values)


def _dimensions(sweep: SweepConfig) -> list[list[_Option]]:
  """The sweep's dimensions, outermost first: variants, axes, zip groups, seeds."""
  axis_paths = list(sweep.axes) + [p for group in sweep.zip for p in group]
  short = _short_names(axis_paths + ([SEED_PATH] if sweep.seeds else []))
  dims = []
  if sweep.variants:
    dims.append([_variant_option(name, changes) for name, changes in sweep.variants.items()])
  for path, values in sweep.axes.items():
    dims.append([_Option(f"{short[path]}={_value_text(v)}", {path: v}, {path: v})
                 for v in _as_values(f"axis {path}", values)])
  for i, group in enumerate(sweep.zip):
    dims.append(_zip_options(i, group, short))
  if sweep.seeds:
    dims.append([_Option(f"seed={s}", {SEED_PATH: s}, {SEED_PATH: s}) for s in sweep.seeds])
  _check_disjoint(sweep)
  return dims


def _variant_option(name: Any, changes: Any) -> _Option:
  if not isinstance(changes, dict):
    raise ConfigError(f"variant {name}: expected a mapping of dotted paths, got {changes!r}")
  return _Option(str(name), dict(changes), {}, variant=str(name))


def _zip_options(i: int, group: dict, short: dict[str, str]) -> list[_Option]:
  values = {p: _as_values(f"zip {i} path {p}", v) for p, v in group.items()}
  lengths = {p: len(v) for p, v in values.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f"zip {i}: the paths must have equal numbers of values, got {lengths}")
  options = []
  for k in range(next(iter(lengths.values()), 0)):
    changes = {p: v[k] for p, v in values.items()}
    label = "-".join(f"{short[p]}={_value_text(v)}" for p, v in changes.items())
    options.append(_Option(label, changes, changes))
  return options


def _overlaps(a: str, b: str) -> bool:
  return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_disjoint(sweep: SweepConfig) -> None:
  """ConfigError when two dimensions set the same path (variants may share paths: they are
  the values of one dimension). The overrides are part of the base, so dimensions may set
  their paths."""
  owners: list[tuple[str, str]] = [(p, f"variant {n}") for n, c in sweep.variants.items()
                                   if isinstance(c, dict) for p in c]
  owners += [(p, f"axis {p}") for p in sweep.axes]
  owners += [(p, f"zip {i}") for i, g in enumerate(sweep.zip) for p in g]
  owners += [(SEED_PATH, "seeds")] if sweep.seeds else []
  for (p, who), (q, other) in itertools.combinations(owners, 2):
    same_variant_group = who.startswith("variant ") and other.startswith("variant ")
    if who != other and not same_variant_group and _overlaps(p, q):
      raise ConfigError(f"{p} is set by both {who} and {other}")


def _apply(base: run_lib.RunConfig, changes: dict, where: str) -> run_lib.RunConfig:
  try:
    run = config_lib.replace_paths(base, changes).validate()
    _check_solver_sections(run, changes)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from e
  return run


def _check_solver_sections(run: run_lib.RunConfig, changes: dict) -> None:
  """Every quant.solvers section builds its method's config, and a changed path inside one is
  used by the run (its method or a rule's), else it would have no effect."""
  solvers = run.quant.solvers
  used = {run.quant.method} | {r.method for r in run.quant.rules if r.method}
  for method, section in solvers.items():
    api.config_from_dict(method, section)
  for path in changes:
    keys = path.split(".")
    if keys[:2] == ["quant", "solvers"] and len(keys) > 2 and keys[2] not in used:
      raise ConfigError(f"{path} has no effect: the run uses {sorted(used)}; set it in the "
                        "variant that selects that method")


def _check_options(base: run_lib.RunConfig, dims: list[list[_Option]]) -> None:
  """Each option alone on the base: a bad path or value names its axis and value."""
  for dim in dims:
    for option in dim:
      if option.variant is not None:
        where = f"variant {option.variant}"
      else:
        where = ", ".join(f"axis {p}={v!r}" for p, v in option.changes.items())
      _apply(base, option.changes, where)


def expand(sweep: SweepConfig, directory: str) -> list[Point]:
  """The sweep's points in order (outermost dimension slowest), run dirs under `directory`.

  Raises:
    ConfigError: a bad base, axis path or value (named), overlapping axes, or two points
      with the same resolved config.
  """
  base = base_run(sweep)
  dims = _dimensions(sweep)
  _check_options(base, dims)
  points, seen = [], {}
  for combo in itertools.product(*dims):
    changes = {p: v for option in combo for p, v in option.changes.items()}
    name = _safe("-".join(o.label for o in combo) or "base")[:_MAX_NAME]
    run = _apply(base, changes, f"point {name}")
    digest = point_hash(run, sweep.mode, sweep.blocks)
    if digest in seen:
      raise ConfigError(f"points {seen[digest]} and {name} resolve to the same config "
                        "(an axis without effect?)")
    seen[digest] = name
    run_dir = os.path.join(directory, POINTS_DIR, f"{name}-{digest[:8]}")
    run = dataclasses.replace(run, output_dir=run_dir)
    variant = next((o.variant for o in combo if o.variant is not None), None)
    axes = {p: v for option in combo for p, v in option.axes.items()}
    points.append(Point(name=name, hash=digest, run=run, axes=axes, variant=variant))
  return points
