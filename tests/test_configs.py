"""Every YAML file in configs/ parses into a RunConfig, and every module's solver config
resolves (method, knobs, per-module rules) for a typical block."""

import pathlib

import pytest

from cdquant_jax.pipeline import config, rules
from cdquant_jax.solvers import api

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
# Sweep configs and published numbers have their own schemas and tests (tests/research/).
SWEEP_DIRS = ("paper", "sweeps")
FILES = sorted(p for p in CONFIG_DIR.rglob("*.yaml")
               if p.relative_to(CONFIG_DIR).parts[0] not in SWEEP_DIRS)
MODULES = [f"layers.{i}.{p}" for i in (0, 1) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_there_are_configs():
  assert len(FILES) >= 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_and_resolves(path):
  run = config.load_run_config(str(path))
  assert run.output_dir and run.calibration.nsamples > 0
  for name in MODULES:
    if rules.is_included(run.quant, name):
      method, cfg = rules.solver_for(run.quant, name)
      assert isinstance(cfg, api.config_class(method))
