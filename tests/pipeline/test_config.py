"""Run-config schema: YAML/dict parsing, `--set` overrides, per-module rule resolution."""

import argparse
import dataclasses

import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.cli import layer
from cdquant_jax.config import ConfigError
from cdquant_jax.pipeline import config, rules
from cdquant_jax.quant import qweight
from cdquant_jax.solvers import api, knobs
from tests.fixtures.layer_problems import layer_problem


def test_yaml_knobs_and_cli_flags_are_the_same_settings():
  """One table: a YAML `quant.knobs` mapping and the `cdquant layer` flags give one config."""
  values = dict(bits=2, group_size=16, sym=True, act_order=True, percdamp=0.1, init="gptq")
  parser = argparse.ArgumentParser()
  layer.add_arguments(parser)
  argv = ["--input", "x.npz", "--method", "cd", "--bits", "2", "--group-size", "16", "--sym",
          "--act-order", "--percdamp", "0.1", "--init", "gptq"]
  from_flags = knobs.from_namespace(parser.parse_args(argv))
  from_yaml = config_lib.from_dict(config.Knobs, values).as_dict()
  assert from_flags == from_yaml == values
  assert {f.name for f in dataclasses.fields(config.Knobs)} == {k.name for k in knobs.KNOBS}


def test_overrides_reach_fields_mappings_and_list_items():
  cfg = config.run_config_from_dict({"quant": {"rules": [{"pattern": "q_proj"}]}})
  cfg = config_lib.apply_overrides(cfg, [
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
    config_lib.apply_overrides(config.RunConfig(), bad).validate()


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
  method, cfg = rules.solver_for(quant, "layers.0.self_attn.q_proj")
  assert method == "cd" and cfg.grid.bits == 3
  assert cfg.grid.group_size == 64 and cfg.max_steps_factor == 0.25
  method, cfg = rules.solver_for(quant, "layers.1.mlp.up_proj")
  assert method == "cd" and cfg.grid.bits == 4
  method, cfg = rules.solver_for(quant, "layers.1.mlp.down_proj")
  assert method == "gptq" and cfg.grid.bits == 4 and cfg.blocksize == 32
  assert rules.is_included(quant, "layers.1.mlp.down_proj")
  assert not rules.is_included(quant, "layers.2.mlp.down_proj")
  assert not rules.is_included(quant, "layers.0.self_attn.o_proj")


def test_inapplicable_knob_names_module_and_method():
  quant = config.QuantSettings(method="spqr", knobs=config.Knobs(static_groups=True))
  with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.up_proj \(spqr\)"):
    rules.solver_for(quant, "layers.0.mlp.up_proj")


def _packed_meta(method: str, knobs: dict):
  """Metadata of the packed result of `solver_for` with global `knobs` on a 16×32 layer."""
  quant = config.QuantSettings(method=method, knobs=config.Knobs(**knobs))
  method, cfg = rules.solver_for(quant, "layers.0.mlp.up_proj")
  W, H = layer_problem(np.random.default_rng(0), 16, 32, dtype=np.float32)
  return qweight.pack_result(api.solve(method, W, H, cfg)).meta


def test_packed_metadata_follows_the_knobs():
  meta = _packed_meta("spqr", dict(bits=3, group_size=16, qq_bits=2))
  assert (meta.method, meta.bits, meta.sym, meta.round_zero) == ("spqr", 3, False, False)
  assert (meta.qq_scale_bits, meta.qq_zero_bits) == (2, 2)
  meta = _packed_meta("cd", dict(bits=2, sym=True))
  assert (meta.method, meta.bits, meta.sym, meta.qq_scale_bits) == ("cd", 2, True, 0)


@pytest.mark.parametrize("overrides,match", [
    (["quant.knobs.bits=1"], r"quant \(cd\).*grid.bits must be in \[2, 8\]"),
    (["quant.method=spqr", "quant.knobs.static_groups=true"], r"no setting for static_groups"),
    (["quant.rules.0.knobs.init=rtn", "quant.rules.0.knobs.act_order=true"],
     r"quant.rules.0 \(cd\).*only apply to method='gptq'"),
])
def test_solver_settings_are_checked_when_the_run_config_is_built(overrides, match):
  base = config.run_config_from_dict({"quant": {"method": "cd",
                                                "rules": [{"pattern": "q_proj"}]}})
  with pytest.raises(ConfigError, match=match):
    config_lib.apply_overrides(base, overrides).validate()


def test_keep_linear_inputs_off_without_true_sequential_is_rejected():
  with pytest.raises(ConfigError, match="keep_linear_inputs=false only applies"):
    config.run_config_from_dict({"keep_linear_inputs": False,
                                 "quant": {"true_sequential": False}})
  config.run_config_from_dict({"keep_linear_inputs": False})  # with true_sequential: honoured
