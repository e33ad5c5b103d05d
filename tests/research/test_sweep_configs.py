"""Every sweep in configs/sweeps/ parses and expands (a dry run), and every point's solver
settings resolve for every linear of a block."""

import pathlib

import pytest

from cdquant_jax.cli import main as cli
from cdquant_jax.pipeline import rules
from cdquant_jax.research import sweep
from cdquant_jax.solvers import api

SWEEPS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sweeps"
FILES = sorted(SWEEPS.glob("*.yaml"))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_the_example_sweeps_are_there():
  assert {p.name for p in FILES} >= {"smollm2_bank_methods.yaml", "smollm2_seq_small.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_sweep_expands(path, tmp_path, capsys):
  spec = sweep.load_sweep(str(path))
  points = sweep.expand(spec, str(tmp_path))
  assert points and len({p.hash for p in points}) == len(points)
  for point in points:
    for name in (f"layers.0.{p}" for p in LINEARS):
      if rules.is_included(point.run.quant, name):
        method, cfg = rules.solver_for(point.run.quant, name)
        assert isinstance(cfg, api.config_class(method))
  assert cli.main(["sweep", "--config", str(path), "--dry-run", "--out", str(tmp_path)]) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == len(points) + 1


def test_bank_methods_sweep():
  spec = sweep.load_sweep(str(SWEEPS / "smollm2_bank_methods.yaml"))
  points = sweep.expand(spec, "unused")
  assert spec.mode == "bank" and spec.blocks == (0, 1, 2) and len(points) >= 18
  settings = {(p.run.quant.method, bool(p.run.quant.knobs.act_order), p.run.quant.knobs.bits)
              for p in points}
  methods = {("rtn", False), ("gptq", False), ("gptq", True), ("cd", False), ("bcd", False),
             ("cyclic", False)}
  assert settings == {(m, a, b) for m, a in methods for b in (2, 3, 4)}
