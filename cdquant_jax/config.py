"""Frozen dataclasses as the config schema: build them from dicts/YAML and apply `a.b=c` overrides.

Every config in the package is a frozen, keyword-only dataclass whose fields have defaults. This
module converts plain data (YAML mappings, strings from the command line) into those classes,
coercing values by the field annotations and rejecting unknown keys with their list.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
  """An unknown key, or a value that does not fit its field."""


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _parse_scalar(text: str) -> Any:
  """YAML scalar parsing for command-line values ("3" -> 3, "true" -> True, "inf" -> inf)."""
  if text.strip().lower() in ("inf", "+inf", "infinity"):
    return math.inf
  if text.strip().lower() == "-inf":
    return -math.inf
  return yaml.safe_load(text)


def coerce(value: Any, annotation: Any, where: str) -> Any:
  """Converts `value` to `annotation` (int, float, bool, str, Literal, Enum, Optional, dataclass)."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return _coerce_union(value, annotation, where)
  if origin is Literal:
    allowed = typing.get_args(annotation)
    if value not in allowed:
      raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
    return value
  if dataclasses.is_dataclass(annotation):
    if isinstance(value, annotation):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
    return from_dict(annotation, value, where=where)
  if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
    try:
      return annotation(value)
    except ValueError:
      raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in annotation]}")
  if any(annotation is kind for kind in (bool, int, float, str)):
    return _coerce_scalar(value, annotation, where)
  if origin in (tuple, list):
    return _coerce_sequence(value, annotation, where)
  if origin is dict or annotation is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value
  return value


def _coerce_union(value: Any, annotation: Any, where: str) -> Any:
  """`value` as the first option of the union that accepts it (None for an Optional)."""
  options = typing.get_args(annotation)
  if value is None and type(None) in options:
    return None
  errors = []
  for option in options:
    if option is type(None):
      continue
    try:
      return coerce(value, option, where)
    except ConfigError as e:
      errors.append(str(e))
  if len(errors) == 1:  # X | None: the one option's own, more precise error
    raise ConfigError(errors[0])
  raise ConfigError(f"{where}: {value!r} fits none of {annotation}")


def _coerce_scalar(value: Any, annotation: type, where: str) -> Any:
  """`value` as a bool, int (integral floats accepted), float or str; bools are no numbers."""
  if annotation is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{where}: expected true/false, got {value!r}")
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if not isinstance(value, str):
    raise ConfigError(f"{where}: expected a string, got {value!r}")
  return value


def _coerce_sequence(value: Any, annotation: Any, where: str) -> tuple:
  """A list / tuple `value` as a tuple, its items coerced to the annotation's item type."""
  if not isinstance(value, (list, tuple)):
    raise ConfigError(f"{where}: expected a list, got {value!r}")
  args = typing.get_args(annotation)
  item = args[0] if args else Any
  return tuple(coerce(v, item, f"{where}[{i}]") if item is not Any else v
               for i, v in enumerate(value))


def from_dict(cls, data: dict, *, where: str = "") -> Any:
  """Builds dataclass `cls` from a (nested) mapping; unknown keys raise ConfigError listing them."""
  if data is None:
    data = {}
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ConfigError(f"{where or cls.__name__}: unknown field(s) {unknown}; "
                      f"known: {sorted(names)}")
  hints = _hints(cls)
  kwargs = {k: coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
  try:
    return cls(**kwargs)
  except ConfigError as e:  # a combination of fields the class rejects (its __post_init__)
    raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_dict(cfg: Any) -> Any:
  """Plain-data view of a config (enums as values, tuples as lists); inverse of `from_dict`."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, enum.Enum):
    return cfg.value
  if isinstance(cfg, (tuple, list)):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def leaf_paths(cfg: Any, prefix: str = "") -> list[str]:
  """Dotted paths of every non-dataclass field of the (nested) dataclass `cfg`, in field order."""
  out = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    path = f"{prefix}{f.name}"
    out.extend(leaf_paths(value, path + ".") if dataclasses.is_dataclass(value) else [path])
  return out


def get_path(cfg: Any, path: str) -> Any:
  """The value of the dotted field `path` of `cfg`."""
  for name in path.split("."):
    cfg = getattr(cfg, name)
  return cfg


def replace_paths(cfg: Any, changes: dict[str, Any]) -> Any:
  """A copy of `cfg` with every dotted path in `changes` set, built (and validated) ONCE.

  Paths walk dataclass fields (unknown names raise ConfigError listing the known ones), keys of
  free-form mapping fields (`quant.solvers.cd.max_steps_factor`) and list items by index
  (`quant.rules.0.knobs.bits`). Values may be strings, parsed as YAML scalars unless the field is
  a string. Building once matters: a class whose __post_init__ rejects a combination of fields
  must see the final combination, not an intermediate one (e.g. init.method=rtn set before
  init.act_order=false).
  """
  data = to_dict(cfg)
  for path, value in changes.items():
    data = _set_path(data, type(cfg), path.split("."), value, path)
  return from_dict(type(cfg), data)


def _set_path(node: Any, annotation: Any, keys: list[str], value: Any, full: str) -> Any:
  """`node` (plain data of a value of type `annotation`) with `keys` set to `value`."""
  head, rest = keys[0], keys[1:]
  options = [a for a in typing.get_args(annotation) if a is not type(None)]
  if (typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1
      and dataclasses.is_dataclass(options[0]) and (node is None or isinstance(node, dict))):
    # An unset `X | None` section (e.g. `mesh`) is set field by field from X's defaults.
    node, annotation = node or {}, options[0]
  if dataclasses.is_dataclass(annotation) and isinstance(node, dict):
    hints = _hints(annotation)
    if head not in hints:
      raise ConfigError(f"{full}: {annotation.__name__} has no field {head!r}; "
                        f"known: {sorted(hints)}")
    child = _leaf(value, hints[head]) if not rest else _set_path(node[head], hints[head], rest,
                                                                 value, full)
    return {**node, head: child}
  if isinstance(node, dict):
    child = _leaf(value, Any) if not rest else _set_path(node.get(head, {}), Any, rest, value,
                                                         full)
    return {**node, head: child}
  if isinstance(node, list):
    if not head.isdigit() or int(head) >= len(node):
      raise ConfigError(f"{full}: {head!r} is not an index of a {len(node)}-item list")
    if not rest:
      raise ConfigError(f"{full}: set a field of item {head}, not the whole item")
    args = typing.get_args(annotation)
    i = int(head)
    return node[:i] + [_set_path(node[i], args[0] if args else Any, rest, value, full)] + node[i + 1:]
  raise ConfigError(f"{full}: cannot descend into {type(node).__name__} at {head!r}")


def _leaf(value: Any, annotation: Any) -> Any:
  if isinstance(value, str) and annotation is not str:
    return _parse_scalar(value)
  return to_dict(value)


def reject_unless(condition: bool, message: str) -> None:
  """Raises ConfigError(message) when `condition` is false (for __post_init__ checks)."""
  if not condition:
    raise ConfigError(message)


def changed_fields(cfg: Any, default: Any) -> list[str]:
  """Leaf paths where `cfg` differs from `default` (same class)."""
  return [p for p in leaf_paths(cfg) if get_path(cfg, p) != get_path(default, p)]


def fields_dict(cfg: Any) -> dict[str, Any]:
  """{field name: value} of the dataclass `cfg` (one level, values as they are)."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def has_path(cfg: Any, path: str) -> bool:
  """Whether the dotted field path exists in the (nested) dataclass `cfg`."""
  node = cfg
  for name in path.split("."):
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
      return False
    node = getattr(node, name)
  return True


def override(cfg: Any, path: str, value: Any) -> Any:
  """Returns a copy of `cfg` with the dotted field `path` set to `value` (a string is parsed)."""
  return replace_paths(cfg, {path: value})


def apply_overrides(cfg: Any, assignments: list[str] | dict[str, Any]) -> Any:
  """Applies `a.b=c` strings (or a {path: value} mapping); later ones win; built once."""
  items = assignments.items() if isinstance(assignments, dict) else [
      _split_assignment(a) for a in assignments]
  return replace_paths(cfg, dict(items)) if items else cfg


def _split_assignment(text: str) -> tuple[str, str]:
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like a.b=value")
  path, value = text.split("=", 1)
  return path.strip(), value


def load_yaml(path: str) -> dict:
  """Reads a YAML mapping (an empty file is an empty mapping)."""
  with open(path) as f:
    data = yaml.safe_load(f)
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
  return data
