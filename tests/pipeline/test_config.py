"""Run-config schema: YAML/dict parsing, `--set` overrides, per-module rule resolution."""

import dataclasses

import pytest

from cdquant_jax.config import ConfigError
from cdquant_jax.pipeline import config
from cdquant_jax.solvers import api


def test_knobs_cover_every_friendly_knob():
  assert {f.name for f in dataclasses.fields(config.Knobs)} == set(api.KNOB_PATHS)


def test_overrides_reach_fields_mappings_and_list_items():
  cfg = config.run_config_from_dict({"quant": {"rules": [{"pattern": "q_proj"}]}})
  cfg = config.apply_run_overrides(cfg, [
      "quant.knobs.bits=2", "quant.solvers.cd.max_steps_factor=0.5",
      "quant.rules.0.knobs.group_size=64", "calibration.nsamples=7", "output_dir=x/y"])
  assert cfg.quant.knobs.bits == 2 and cfg.calibration.nsamples == 7
  assert cfg.quant.solvers == {"cd": {"max_steps_factor": 0.5}}
  assert cfg.quant.rules[0].knobs.group_size == 64 and cfg.output_dir == "x/y"


@pytest.mark.parametrize("bad, match", [
    (["quant.knobs.bitz=2"], "bitz"),
    (["calibration.nsamples=abc"], "nsamples"),
    (["quant.rules.3.knobs.bits=2"], "index"),
    (["quant.method=nope"], "nope"),
    (["quant.exclude=['(']"], "regex"),
])
def test_bad_overrides_name_the_field(bad, match):
  with pytest.raises(ConfigError, match=match):
    config.apply_run_overrides(config.RunConfig(), bad).validate()


def test_unknown_yaml_key_is_listed(tmp_path):
  path = tmp_path / "x.yaml"
  path.write_text("quant: {method: gptq, bitz: 3}\n")
  with pytest.raises(ConfigError, match="bitz"):
    config.load_run_config(str(path))


def test_rules_apply_in_order_and_switch_method():
  quant = config.QuantSettings(
      method="cd", knobs=config.Knobs(bits=3, group_size=64),
      solvers={"cd": {"max_steps_factor": 0.25}},
      rules=(config.ModuleRule(pattern=r"mlp\.", knobs=config.Knobs(bits=4)),
             config.ModuleRule(pattern=r"down_proj$", method="gptq", set={"blocksize": 32})),
      include=(r"^layers\.[01]\.",), exclude=(r"o_proj",))
  method, cfg = config.solver_for(quant, "layers.0.self_attn.q_proj")
  assert method == "cd" and cfg.grid.bits == 3 and cfg.gptq.grid.bits == 3
  assert cfg.grid.group_size == 64 and cfg.max_steps_factor == 0.25
  method, cfg = config.solver_for(quant, "layers.1.mlp.up_proj")
  assert method == "cd" and cfg.grid.bits == 4
  method, cfg = config.solver_for(quant, "layers.1.mlp.down_proj")
  assert method == "gptq" and cfg.grid.bits == 4 and cfg.blocksize == 32
  assert config.is_included(quant, "layers.1.mlp.down_proj")
  assert not config.is_included(quant, "layers.2.mlp.down_proj")
  assert not config.is_included(quant, "layers.0.self_attn.o_proj")


def test_inapplicable_knob_names_module_and_method():
  quant = config.QuantSettings(method="spqr", knobs=config.Knobs(act_order=True))
  with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.up_proj \(spqr\)"):
    config.solver_for(quant, "layers.0.mlp.up_proj")


def test_pack_options_follow_the_method_config():
  quant = config.QuantSettings()
  opts = config.pack_options("spqr", api.apply_knobs(api.default_config("spqr"),
                                                     dict(qq_bits=2)), quant)
  assert opts == dict(sym=False, round_zero=False, qq_scale_bits=2, qq_zero_bits=2,
                      allow_lossy_outliers=False)
  opts = config.pack_options("cd", api.apply_knobs(api.default_config("cd"), dict(sym=True)),
                             quant)
  assert opts["sym"] and opts["qq_scale_bits"] is None and not opts["allow_lossy_outliers"]
