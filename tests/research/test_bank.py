"""Layer-problem banks on a tiny random Llama: W is the model's weight, H the Hessian of the
linear's input on the full-precision model (checked with the model's own un-jitted blocks), and
a bank sweep's per-layer objectives are those of `cdquant_jax.solve` on the bank's (W, H)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import cdquant_jax
from cdquant_jax import config as config_lib
from cdquant_jax import data
from cdquant_jax.models import registry
from cdquant_jax.models.base import default_positions
from cdquant_jax.models.params import get_path
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.research import bank, runner, store, sweep
from cdquant_jax.solvers.hessian import hessian_from_inputs
from tests.research import tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  return tiny_model.write_fixture(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(fixture):
  """(run config, model, params, calibration ids [24, 16])."""
  run = run_config_from_dict(tiny_model.run_dict(fixture))
  model, params, tokenizer = registry.load_model(fixture["model"], "float32")
  c = run.calibration
  ids = data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                 seed=c.seed, path=c.path)
  return run, model, params, ids


@pytest.fixture(scope="module")
def written(loaded, tmp_path_factory):
  run, model, params, ids = loaded
  out = str(tmp_path_factory.mktemp("bank"))
  return out, bank.build_bank(run, out, model, params, ids, blocks=[1, 0])


def _fp_inputs(model, params, ids):
  """{block: {linear path: input [N, T, d_in]}} with the un-jitted blocks on FP activations."""
  ids = jnp.asarray(ids)
  pos = default_positions(ids)
  h = model.embed(params, ids, pos)
  out = {}
  for i in range(model.num_layers):
    h, _, inputs = model.block(model.layer_params(params, i), h, pos, i, capture=True)
    out[i] = inputs
  return out


def test_bank_round_trip(loaded, written):
  run, model, params, ids = loaded
  out, info = written
  assert info == json.load(open(os.path.join(out, bank.BANK_FILE)))
  assert info["blocks"] == [0, 1] and info["model"]["path"] == run.model.path
  assert info["calibration"]["token_hash"] == data.token_hash(ids)
  names = [m["module"] for m in info["modules"]]
  assert names == [f"layers.{i}." + ".".join(p) for i in (0, 1)
                   for g in model.block_linears() for p in g]
  inputs = _fp_inputs(model, params, ids)
  for entry in info["modules"]:
    path = tuple(entry["module"].split(".")[2:])
    with np.load(os.path.join(out, entry["file"])) as f:
      W, H, name, shape = f["W"], f["H"], str(f["name"]), list(f["shape"])
    assert (name, shape, entry["kind"]) == (entry["module"], entry["shape"], path[-1])
    weight = get_path(model.layer_params(params, entry["block"]), path)["weight"]
    np.testing.assert_array_equal(W, np.asarray(weight, np.float32))
    expected = hessian_from_inputs(inputs[entry["block"]][path])
    np.testing.assert_allclose(H, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(expected)))
    W2, H2 = bank.load_layer(out, entry)
    np.testing.assert_array_equal(W2, W)
    np.testing.assert_array_equal(H2, H)


def test_block_selection_is_checked(loaded, tmp_path):
  run, model, params, ids = loaded
  with pytest.raises(config_lib.ConfigError, match="0..1"):
    bank.build_bank(run, str(tmp_path), model, params, ids, blocks=[2])
  with pytest.raises(bank.BankError, match="not a bank"):
    bank.read_bank(str(tmp_path))


def test_bank_sweep_objectives_equal_direct_solves(fixture, tmp_path):
  spec = config_lib.from_dict(sweep.SweepConfig, dict(
      name="tiny_bank", mode="bank", blocks=[0, 1], base=tiny_model.run_dict(fixture),
      variants={"gptq": {"quant.method": "gptq"},
                "cd": {"quant.method": "cd", "quant.solvers.cd": {"max_steps_factor": 0.5}}},
      axes={"quant.knobs.bits": [2, 3]}))
  outcome = runner.run_sweep(spec, out=str(tmp_path))
  assert len(outcome.done) == 4 and not outcome.failed
  rows = store.read_rows(store.results_file(str(tmp_path)))
  assert len({r["bank"] for r in rows}) == 1  # one cached bank for every point
  assert rows[0]["bank"].startswith(os.path.join(str(tmp_path), "cache", "banks"))
  for r in rows:
    assert len(r["layers"]) == 14 and r["mode"] == "bank" and r["perplexity"] is None
    for layer in r["layers"]:
      with np.load(os.path.join(r["bank"], "layers", layer["module"] + ".npz")) as f:
        W, H = f["W"], f["H"]
      cfg = {"max_steps_factor": 0.5} if r["method"] == "cd" else {}
      direct = cdquant_jax.solve(r["method"], W, H, cdquant_jax.default_config(r["method"]),
                                 bits=r["bits"], group_size=16, **cfg)
      assert layer["objective"] == float(direct.objective), (r["name"], layer["module"])
      assert layer["relative_objective"] == pytest.approx(layer["objective"] / layer["energy"])
      assert (layer["steps"] is None) == (r["method"] == "gptq")
    assert r["objective_sum"] == pytest.approx(sum(l["objective"] for l in r["layers"]))
    assert r["relative_objective_sum"] == pytest.approx(
        r["objective_sum"] / sum(l["energy"] for l in r["layers"]))
  by = {(r["method"], r["bits"]): r["objective_sum"] for r in rows}
  assert by["cd", 2] <= by["gptq", 2] and by["cd", 3] <= by["gptq", 3]
  assert by["gptq", 3] < by["gptq", 2]


def test_bank_sweep_with_two_jobs_builds_one_bank_and_gives_the_same_layers(fixture, tmp_path):
  spec = config_lib.from_dict(sweep.SweepConfig, dict(
      name="tiny_bank", mode="bank", blocks=[1], base=tiny_model.run_dict(fixture),
      axes={"quant.knobs.bits": [2, 3]}))
  rows = {}
  for jobs in (1, 2):
    out = str(tmp_path / f"jobs{jobs}")
    runner.run_sweep(spec, out=out, jobs=jobs)
    rows[jobs] = {r["point"]: r for r in store.read_rows(store.results_file(out))}
    assert len(os.listdir(os.path.join(out, "cache", "banks"))) == 1
  assert rows[1].keys() == rows[2].keys() and len(rows[1]) == 2
  for point, row in rows[1].items():
    strip = lambda layers: [{k: v for k, v in l.items() if k != "seconds"} for l in layers]
    assert strip(rows[2][point]["layers"]) == strip(row["layers"])
