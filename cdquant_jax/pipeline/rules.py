"""Per-module resolution of the run's quantization settings: which linears, which solver config.

Module names are "layers.<i>.<linear path>", e.g. "layers.3.self_attn.q_proj"; rules, include
and exclude patterns are regexes matched with `re.search` against them.
"""

from __future__ import annotations

import re
from typing import Any

from cdquant_jax import config as config_lib
from cdquant_jax.pipeline.config import QuantSettings
from cdquant_jax.solvers import api
from cdquant_jax.solvers import knobs as knobs_lib


def module_name(layer_index: int, path: tuple[str, ...]) -> str:
  return ".".join(("layers", str(layer_index)) + tuple(path))


def is_included(quant: QuantSettings, name: str) -> bool:
  if quant.include and not any(re.search(p, name) for p in quant.include):
    return False
  return not any(re.search(p, name) for p in quant.exclude)


def solver_for(quant: QuantSettings, name: str) -> tuple[str, Any]:
  """(method, its config) for module `name`: base config, global knobs, then matching rules.

  A rule that switches the method starts again from quant.solvers[method]; each rule's knobs
  and `set` fields apply in order (later rules win). Raises ConfigError naming the module.
  """
  rules = [r for r in quant.rules if re.search(r.pattern, name)]
  method = quant.method
  for rule in rules:
    method = rule.method or method
  try:
    cfg = api.config_from_dict(method, quant.solvers.get(method))
    cfg = knobs_lib.apply(cfg, quant.knobs.as_dict())
    for rule in rules:
      cfg = knobs_lib.apply(cfg, rule.knobs.as_dict())
      cfg = config_lib.apply_overrides(cfg, dict(rule.set))
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"module {name} ({method}): {e}") from e
  return method, cfg
