"""One entry point over every solver: method name -> (config class, solve function).

    cfg = default_config("cd")
    cfg = config.apply_overrides(cfg, ["grid.bits=3", "init=gptq"])
    result = solve("cd", W, H, cfg, layer="blk0.q_proj")
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from cdquant_jax import config as config_lib
from cdquant_jax.solvers.result import SolveResult

# method -> (module, config class, solve function)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "rtn": ("cdquant_jax.solvers.rtn", "RTNConfig", "rtn"),
    "gptq": ("cdquant_jax.solvers.gptq", "GPTQConfig", "gptq"),
    "cd": ("cdquant_jax.solvers.cd", "CDConfig", "cd"),
    "bcd": ("cdquant_jax.solvers.bcd", "BCDConfig", "bcd"),
    "cyclic": ("cdquant_jax.solvers.cyclic", "CyclicConfig", "cyclic"),
    "spqr": ("cdquant_jax.solvers.spqr", "SpQRConfig", "spqr"),
    "spqr-cd": ("cdquant_jax.solvers.spqr_cd", "SpQRCDConfig", "spqr_cd"),
}

METHODS = tuple(_REGISTRY)


def _lookup(method: str) -> tuple[type, Callable[..., SolveResult]]:
  if method not in _REGISTRY:
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
  module, cfg_name, fn_name = _REGISTRY[method]
  mod = importlib.import_module(module)
  return getattr(mod, cfg_name), getattr(mod, fn_name)


def config_class(method: str) -> type:
  return _lookup(method)[0]


def default_config(method: str) -> Any:
  return config_class(method)()


def config_from_dict(method: str, data: dict | None) -> Any:
  """The method's config built from a (nested) mapping, e.g. from YAML."""
  return config_lib.from_dict(config_class(method), data or {}, where=method)


def solve(method: str, W, H, cfg: Any = None, *, layer: str = "?") -> SolveResult:
  """Runs solver `method` on the layer problem (W [d_out, d_in], H [d_in, d_in])."""
  cfg_cls, fn = _lookup(method)
  cfg = cfg_cls() if cfg is None else cfg
  if not isinstance(cfg, cfg_cls):
    raise TypeError(f"method {method!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
  return fn(W, H, cfg, layer=layer)


# Friendly knobs -> every config path they set (a knob sets each path the method's config has,
# so nested grids, e.g. CD's grid and its GPTQ init's grid, stay consistent).
KNOB_PATHS: dict[str, tuple[str, ...]] = {
    "bits": ("grid.bits", "bits", "cd.grid.bits", "spqr.bits", "gptq.grid.bits", "cd.gptq.grid.bits"),
    "group_size": ("grid.group_size", "groupsize", "cd.grid.group_size", "spqr.groupsize",
                   "gptq.grid.group_size", "cd.gptq.grid.group_size"),
    "sym": ("grid.sym", "sym", "cd.grid.sym", "spqr.sym", "gptq.grid.sym", "cd.gptq.grid.sym"),
    "act_order": ("act_order", "gptq.act_order", "cd.gptq.act_order"),
    "static_groups": ("static_groups", "gptq.static_groups", "cd.gptq.static_groups"),
    "percdamp": ("percdamp", "gptq.percdamp", "cd.gptq.percdamp", "spqr.percdamp"),
    "blocksize": ("blocksize", "gptq.blocksize", "cd.gptq.blocksize", "spqr.blocksize"),
    "init": ("init",),
    "scale_search": ("grid.scale_search", "cd.grid.scale_search"),
    "max_steps_factor": ("max_steps_factor", "cd.max_steps_factor"),
    "refit_rounds": ("refit_rounds", "cd.refit_rounds"),
    "qq_bits": ("qq_scale_bits", "qq_zero_bits", "spqr.qq_scale_bits", "spqr.qq_zero_bits"),
    "qq_group_size": ("qq_groupsize", "spqr.qq_groupsize"),
    "outlier_threshold": ("outlier_threshold", "spqr.outlier_threshold"),
    "permutation_order": ("permutation_order", "spqr.permutation_order"),
    "simplified_outliers": ("simplified_outliers", "spqr.simplified_outliers"),
    "round_zero": ("round_zero", "spqr.round_zero"),
}


def apply_knobs(cfg: Any, knobs: dict[str, Any]) -> Any:
  """Sets friendly knobs (see KNOB_PATHS) on every matching path; unknown knobs raise.

  A knob that matches no path of this method's config raises ConfigError naming the method.
  """
  for knob, value in knobs.items():
    if value is None:
      continue
    paths = [p for p in KNOB_PATHS.get(knob, ()) if config_lib.has_path(cfg, p)]
    if not paths:
      raise config_lib.ConfigError(f"{type(cfg).__name__} has no setting for --{knob.replace('_', '-')}")
    for p in paths:
      cfg = config_lib.override(cfg, p, value)
  return cfg


def knob_value(cfg: Any, knob: str, default: Any = None) -> Any:
  """The value of a friendly knob: the first of its KNOB_PATHS present in `cfg`, else default."""
  for path in KNOB_PATHS[knob]:
    if config_lib.has_path(cfg, path):
      node = cfg
      for part in path.split("."):
        node = getattr(node, part)
      return node
  return default


def pack_flags(cfg: Any) -> dict[str, bool]:
  """The metadata flags `qweight.pack_result` records (sym, round_zero), wherever cfg keeps them."""
  return dict(sym=bool(knob_value(cfg, "sym", False)),
              round_zero=bool(knob_value(cfg, "round_zero", False)))
