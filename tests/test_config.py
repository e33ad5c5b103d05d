"""Config schema utilities: dict/YAML -> frozen dataclasses, dotted overrides, strictness."""

import dataclasses
import math
from typing import Literal

import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.quant.grids import Flavor, GridConfig
from cdquant_jax.solvers import api, knobs
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


def test_knobs_set_the_one_field_of_each_method():
  cfg = knobs.apply(api.default_config("cd"), bits=2, group_size=64, act_order=True)
  assert cfg.grid.bits == 2 and cfg.grid.group_size == 64 and cfg.init.act_order
  cfg = knobs.apply(api.default_config("spqr-cd"), bits=2, act_order=False, qq_bits=4)
  assert (cfg.grid.bits, cfg.act_order, cfg.qq.scale_bits, cfg.qq.zero_bits) == (2, False, 4, 4)
  with pytest.raises(config_lib.ConfigError, match="outlier-threshold"):
    knobs.apply(api.default_config("gptq"), dict(outlier_threshold=0.2))
  with pytest.raises(config_lib.ConfigError, match="unknown knob 'bitz'"):
    knobs.apply(api.default_config("gptq"), bitz=3)


def test_knobs_are_built_once_so_their_order_does_not_matter():
  # init=rtn with act_order=false is valid; set one at a time from an act-order start, the
  # intermediate (rtn, act_order=True) would be rejected.
  start = config_lib.apply_overrides(api.default_config("cd"), ["init.act_order=true"])
  cfg = knobs.apply(start, init="rtn", act_order=False)
  assert cfg.init.method == "rtn" and not cfg.init.act_order
  with pytest.raises(config_lib.ConfigError, match="only apply to method='gptq'"):
    knobs.apply(start, init="rtn")


def test_every_knob_is_one_field_per_method():
  for method in api.METHODS:
    cfg = api.default_config(method)
    for knob in knobs.KNOBS:
      for path in knob.fields_in(cfg):
        assert config_lib.has_path(cfg, path)
        assert not dataclasses.is_dataclass(config_lib.get_path(cfg, path)), (method, path)
