"""The pipeline's `solve_devices`: a run with its solves split over 4 CPU devices equals the
one-device run (subprocess worker); settings it cannot honour are rejected."""

import jax
import numpy as np
import pytest

from cdquant_jax.config import ConfigError
from cdquant_jax.models import registry
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded
from tests.distributed.multidevice import run_worker


@pytest.mark.slow
def test_split_solves_equal_one_device_run():
  # GPTQ's row split (CD and cyclic split rows the same way: tests/distributed/test_solve.py
  # solves each of them on 4 devices) and SpQR's, in 16-row groups; each method costs ~60 s
  # of compiling here
  out = run_worker("pipeline_worker", 4, "4", "gptq,spqr", timeout=600)
  for method in ("gptq", "spqr"):
    assert f"{method}: " in out and "identical on 4 devices" in out


@pytest.mark.parametrize("fields, named", [
    ({"solve_devices": 0}, "solve_devices must be >= 1, got 0"),
    ({"solve_devices": 2, "quant": {"method": "bcd"}}, "solve_devices=2 with method bcd"),
    ({"solve_devices": 2, "quant": {"method": "gptq", "rules": [
        {"pattern": "mlp", "method": "spqr-cd"}]}}, "with method spqr-cd"),
])
def test_unhonourable_solve_devices_are_rejected(fields, named):
  with pytest.raises(ConfigError, match=named):
    run_config_from_dict(fields)


def test_more_devices_than_the_process_has_fails_before_any_work(tmp_path):
  model = registry.model_from_hf_config({
      "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 61})
  cfg = run_config_from_dict({"output_dir": str(tmp_path), "checkpoint": "none",
                              "solve_devices": 64, "calibration": {"nsamples": 2, "seqlen": 8}})
  with pytest.raises(ConfigError, match="solve_devices=64: this process has 1 local device"):
    quantize_loaded(cfg, model, model.init_params(jax.random.key(0)),
                    np.zeros((2, 8), np.int32), progress=False)
