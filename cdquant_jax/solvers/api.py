"""One entry point over every solver: method name -> (config class, solve function).

    cfg = config.apply_overrides(default_config("cd"), ["grid.bits=3", "init.act_order=true"])
    result = solve("cd", W, H, cfg, layer="blk0.q_proj")
    result = solve("cd", W, H, bits=3, act_order=True)      # the same, with friendly knobs
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax.numpy as jnp

from cdquant_jax import config as config_lib
from cdquant_jax.solvers import knobs as knobs_lib
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

# Methods whose output rows are independent problems given H (every rule is per row or per
# row and group; the Hessian preparation depends on H alone): solving linears that share H as
# one stacked [Σ d_out, d_in] problem gives each the result of its own solve (up to float
# rounding of the shared matmuls), and the preparation and column loops run once.
ROW_SEPARABLE = ("rtn", "gptq", "cd")


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


def solve(method: str, W, H, cfg: Any = None, *, layer: str = "?", **knobs: Any) -> SolveResult:
  """Runs solver `method` on the layer problem (W [d_out, d_in], H [d_in, d_in] undamped).

  Args:
    method: one of `METHODS`.
    W, H: the layer problem.
    cfg: the method's config (default: its defaults).
    layer: name used in error messages.
    **knobs: friendly settings applied on top of cfg (`knobs.KNOBS`: bits=3, act_order=True, ...).
  """
  cfg_cls, fn = _lookup(method)
  cfg = knobs_lib.apply(cfg_cls() if cfg is None else cfg, knobs)
  if not isinstance(cfg, cfg_cls):
    raise TypeError(f"method {method!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
  try:
    result = fn(W, H, cfg, layer=layer)
  except config_lib.ConfigError as e:  # a setting that does not fit this layer's shape
    if str(e).startswith(f"layer {layer}"):
      raise
    raise config_lib.ConfigError(f"layer {layer} {list(jnp.shape(W))}: {e}") from e
  # The result records its method (direct solver calls leave "unknown"; see SolveResult).
  return result.replace(method=method)


