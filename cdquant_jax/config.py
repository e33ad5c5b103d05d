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
    raise ConfigError(f"{where}: {value!r} fits none of {annotation}")
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
  if annotation is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(annotation)
    item = args[0] if args else Any
    return tuple(coerce(v, item, f"{where}[{i}]") if item is not Any else v
                 for i, v in enumerate(value))
  if origin is dict or annotation is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value
  return value


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
  return cls(**kwargs)


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
  head, _, rest = path.partition(".")
  names = {f.name for f in dataclasses.fields(cfg)}
  if head not in names:
    raise ConfigError(f"{type(cfg).__name__} has no field {head!r} (path {path!r}); "
                      f"known: {sorted(names)}")
  if rest:
    return dataclasses.replace(cfg, **{head: override(getattr(cfg, head), rest, value)})
  if isinstance(value, str):
    value = _parse_scalar(value) if _hints(type(cfg))[head] is not str else value
  return dataclasses.replace(cfg, **{head: coerce(value, _hints(type(cfg))[head], path)})


def apply_overrides(cfg: Any, assignments: list[str] | dict[str, Any]) -> Any:
  """Applies `a.b=c` strings (or a {path: value} mapping) in order."""
  items = assignments.items() if isinstance(assignments, dict) else [
      _split_assignment(a) for a in assignments]
  for path, value in items:
    cfg = override(cfg, path, value)
  return cfg


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
