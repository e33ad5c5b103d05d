"""The run config's `mesh`: a run on 4 CPU devices in mesh shapes 4x1, 2x2 and 1x4 against the
one-device run (subprocess workers, tolerances stated in workers/mesh_worker.py); the padded
Hessian capture; settings a mesh cannot honour are rejected with one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.config import ConfigError
from cdquant_jax.distributed.mesh import MeshConfig
from cdquant_jax.models import aliases, registry
from cdquant_jax.pipeline import capture
from cdquant_jax.pipeline.config import load_run_config, run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.solvers import hessian
from tests.distributed.multidevice import run_worker


@pytest.mark.slow
def test_tiny_llama_on_every_mesh_shape_equals_one_device():
  """Also: a 4x1 run stopped after block 0 resumes on 2x2 to the same model, and 2x2 and 1x4
  with mesh.shard_weights give the unsharded model from really sharded weights."""
  out = run_worker("mesh_worker", 4, "tiny", timeout=900)
  assert "tiny: all mesh shapes ok" in out
  for shape in ("{'data': 4, 'model': 1}", "{'data': 2, 'model': 2}", "{'data': 1, 'model': 4}"):
    assert f"tiny {shape}: " in out and "0/4032 packed values differ" in out
  for checkpoint in ("activations", "replay"):
    assert f"resumed on 2x2 ({checkpoint}): equal to one device" in out
  for shape in ("{'data': 2, 'model': 2, 'shard_weights': True}",
                "{'data': 1, 'model': 4, 'shard_weights': True}"):
    assert f"tiny {shape}: 10 blocks placed sharded; " in out
  assert "shard_block: rows split where d_out divides by model, else replicated" in out


@pytest.mark.slow
def test_two_smollm2_blocks_on_every_mesh_shape():
  try:
    aliases.resolve_model_path(aliases.SMOLLM2)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(str(e))
  out = run_worker("mesh_worker", 4, "smollm2", timeout=1200)
  assert "smollm2: all mesh shapes ok" in out


def test_padded_rows_add_nothing_to_the_hessian(rng):
  """A batch of 3 real rows padded to 4 (mask 1, 1, 1, 0; the padding is garbage) gives the
  running-mean state of the 3 rows alone (n counts real rows only)."""
  x = jnp.asarray(rng.standard_normal((4, 5, 8)), jnp.float32)
  x = x.at[3].set(jnp.nan)  # padding rows are masked, whatever they hold
  state = hessian.HessianState.zeros(8)
  state, _ = hessian.accumulate_batch(state, x[:2])  # an earlier batch
  padded, finite = capture._accumulate(state, x, jnp.asarray([1.0, 1.0, 1.0, 0.0]))  # pylint: disable=protected-access
  alone, _ = hessian.accumulate_batch(state, x[:3])
  assert bool(finite) and float(padded.n) == float(alone.n) == 5.0
  # f32 summation order only (XLA may block a 20- and a 15-token product differently)
  assert float(jnp.abs(padded.H - alone.H).max()) <= 1e-6 * float(jnp.abs(alone.H).max())


@pytest.mark.parametrize("fields, named", [
    ({"mesh": {"model": 2}, "quant": {"method": "bcd"}}, "mesh.model=2 with method bcd"),
    ({"mesh": {}, "solve_devices": 2}, "cannot be used with solve_devices=2"),
    ({"mesh": {}, "activations": "host"}, "cannot be used with activations=host"),
    ({"mesh": {}, "tune": {"enabled": True}}, "cannot be used with tune.enabled=true"),
    ({"mesh": {"data": 0}}, "mesh.data must be a positive integer or 'auto', got 0"),
    ({"mesh": {"dta": 2}}, r"run.mesh: unknown field\(s\) \['dta'\]"),
    ({"mesh": {"shard_weights": True}}, "mesh.shard_weights=true needs mesh.model > 1, got "
                                        "model=1"),
    ({"mesh": {"model": 2, "shard_weights": "yes"}},
     "run.mesh.shard_weights: expected true/false, got 'yes'"),
])
def test_unhonourable_mesh_settings_are_rejected(fields, named):
  with pytest.raises(ConfigError, match=named):
    run_config_from_dict(fields)


def test_mesh_set_field_by_field():
  run = load_run_config(None, ["mesh.data=2", "mesh.model=2"])
  assert run.mesh == MeshConfig(data=2, model=2) and load_run_config(None).mesh is None
  # built once: shard_weights set before model sees the final model size
  run = load_run_config(None, ["mesh.shard_weights=true", "mesh.model=2"])
  assert run.mesh == MeshConfig(model=2, shard_weights=True)


def test_shard_weights_from_yaml(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("mesh:\n  data: 2\n  model: 2\n  shard_weights: true\n")
  assert load_run_config(str(path)).mesh == MeshConfig(data=2, model=2, shard_weights=True)


def test_shard_weights_must_be_a_bool():
  with pytest.raises(ConfigError, match="mesh.shard_weights must be true or false, got 1"):
    MeshConfig(model=2, shard_weights=1)


def test_a_mesh_larger_than_the_machine_fails_before_any_work(tmp_path):
  model = registry.model_from_hf_config({
      "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 61})
  cfg = run_config_from_dict({"output_dir": str(tmp_path), "checkpoint": "none",
                              "mesh": {"data": 2}, "calibration": {"nsamples": 2, "seqlen": 8}})
  with pytest.raises(ConfigError, match="mesh.data=2 x mesh.model=1 must divide the device "
                                        f"count {jax.device_count()}"):
    quantize_loaded(cfg, model, model.init_params(jax.random.key(0)),
                    np.zeros((2, 8), np.int32), progress=False)
