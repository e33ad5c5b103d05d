"""Config schema utilities: dict/YAML -> frozen dataclasses, dotted overrides, strictness."""

import dataclasses
import math
from typing import Literal

import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.quant.grids import Flavor, GridConfig
from cdquant_jax.solvers import api
from cdquant_jax.solvers.gptq import GPTQConfig


def test_from_dict_builds_nested_and_coerces():
  cfg = config_lib.from_dict(GPTQConfig, {"grid": {"bits": 3, "flavor": "gptq"}, "percdamp": 1})
  assert cfg.grid == GridConfig(bits=3, flavor=Flavor.GPTQ)
  assert isinstance(cfg.percdamp, float) and cfg.percdamp == 1.0
  assert config_lib.from_dict(GPTQConfig, config_lib.to_dict(cfg)) == cfg


def test_unknown_keys_are_listed():
  with pytest.raises(config_lib.ConfigError, match=r"\['bitz'\]"):
    config_lib.from_dict(GPTQConfig, {"grid": {"bitz": 3}})


@pytest.mark.parametrize("path,value,match", [
    ("grid.bits", "three", "integer"), ("act_order", "maybe", "true/false"),
    ("grid.scale_search", "rms", "one of"), ("grid.nope", "1", "no field"),
])
def test_override_errors(path, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.override(GPTQConfig(), path, value)


def test_override_parses_strings():
  cfg = config_lib.apply_overrides(GPTQConfig(), ["grid.bits=2", "act_order=true",
                                                  "percdamp=0.1"])
  assert (cfg.grid.bits, cfg.act_order, cfg.percdamp) == (2, True, 0.1)


def test_optional_and_inf():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class C:
    a: int | None = 3
    t: float = 1.0
    mode: Literal["x", "y"] = "x"
  c = config_lib.apply_overrides(C(), ["a=null", "t=inf", "mode=y"])
  assert c.a is None and math.isinf(c.t) and c.mode == "y"


def test_knobs_set_every_nested_grid():
  cfg = api.apply_knobs(api.default_config("cd"), dict(bits=2, group_size=64, act_order=True))
  assert cfg.grid.bits == 2 and cfg.gptq.grid.bits == 2 and cfg.grid.group_size == 64
  assert cfg.gptq.act_order
  with pytest.raises(config_lib.ConfigError, match="outlier-threshold"):
    api.apply_knobs(api.default_config("gptq"), dict(outlier_threshold=0.2))
