"""The planner: its memory figure against a real pipeline run, sizes of known models, no
allocation for 70B, and the `cdquant plan` error contract."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.cli import errors, main as cli
from cdquant_jax.distributed import planner
from cdquant_jax.distributed.mesh import MeshConfig
from cdquant_jax.models import registry
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}


class LiveArrayPeak:
  """Largest total nbytes of the live jax arrays, sampled every `interval_s` by a thread."""

  def __init__(self, interval_s: float = 0.002):
    self.peak, self._stop, self._interval = 0, threading.Event(), interval_s
    self._thread = threading.Thread(target=self._run, daemon=True)

  def sample(self) -> None:
    self.peak = max(self.peak, sum(a.nbytes for a in jax.live_arrays()))

  def _run(self) -> None:
    while not self._stop.wait(self._interval):
      self.sample()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def test_memory_figure_within_20_percent_of_live_array_peak(tmp_path):
  """The planner's `resident` (weights + activations + kept inputs + Hessians and solver
  arrays or output activations) against the peak of the live jax arrays of a real run of a
  tiny Llama (activations on the device, 64 x 64 calibration tokens). Live arrays are the
  buffers between programs: the temporaries inside a jitted solve or forward (the planner's
  `workspace`, most of `solver`) and the runtime's own memory are not in either figure."""
  model = registry.model_from_hf_config(TINY)
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (64, 64)).astype(np.int32)
  run = run_config_from_dict({"output_dir": str(tmp_path / "run"), "activations": "device",
                              "calibration": {"nsamples": 64, "seqlen": 64},
                              "quant": {"method": "gptq", "knobs": {"bits": 4}},
                              "forward_batch_size": 8, "checkpoint": "none"})
  plan = planner.plan(run, model, MeshConfig(data=1), 1, gflops=1.0, runtime_bytes=0)
  before = sum(a.nbytes for a in jax.live_arrays())
  with LiveArrayPeak() as live:
    quantize_loaded(run, model, params, ids, progress=False,
                    after_block=lambda i: live.sample())
  measured = live.peak - before
  print(f"planned resident {plan.resident} B, measured live-array peak {measured} B, "
        f"items {plan.bytes}")
  assert plan.bytes["kept"] > plan.bytes["activations_in"]  # this run's peak is not trivial
  assert abs(plan.resident - measured) <= 0.2 * measured, (plan.resident, measured, plan.bytes)


def test_known_sizes_block_weights_and_solve_flops():
  model = planner.model_for("meta-llama/Llama-2-7b-hf")
  block = planner.block_shapes(model, 0, jnp.float16, 16)
  # q, k, v, o [4096, 4096]; gate, up [11008, 4096]; down [4096, 11008]; two RMSNorms.
  assert block.param_bytes == 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096)
  assert sorted(len(c) for c in block.classes) == [1, 1, 2, 3]  # qkv, o, up/gate, down
  cfg = None
  assert planner.solve_flops("gptq", cfg, 4096, 11008) == 4096 * 11008 ** 2 + 11008 ** 3 / 3


def test_shard_weights_divides_the_linear_weights_by_model():
  run = run_config_from_dict({"calibration": {"nsamples": 16, "seqlen": 128},
                              "model": {"path": "llama2-7b", "dtype": "float16"}})
  model = planner.model_for("llama2-7b")
  plans = [planner.plan(run, model, MeshConfig(model=8, shard_weights=shard), 8, gflops=100.0,
                        runtime_bytes=0) for shard in (False, True)]
  linears = 2 * (4 * 4096 ** 2 + 3 * 4096 * 11008)  # every d_out divides by 8
  norms = 2 * 2 * 4096  # replicated
  assert plans[0].bytes["weights"] == linears + norms
  assert plans[1].bytes["weights"] == linears // 8 + norms
  assert plans[0].resident - plans[1].resident == linears - linears // 8


def test_70b_plan_allocates_nothing():
  run = run_config_from_dict({"calibration": {"nsamples": 128, "seqlen": 2048},
                              "model": {"path": "llama3-70b", "dtype": "bfloat16"}})
  before = len(jax.live_arrays())
  plans = [planner.plan(run, planner.model_for("llama3-70b"), MeshConfig(), n, gflops=100.0,
                        runtime_bytes=0) for n in (1, 8, 64)]
  assert len(jax.live_arrays()) == before
  # 80 blocks of 8192 x 28672 MLPs: data parallelism divides activations, not weights.
  assert plans[0].bytes["weights"] == plans[2].bytes["weights"]
  assert plans[0].bytes["activations_in"] == 64 * plans[2].bytes["activations_in"]
  assert plans[0].seconds > 8 * plans[1].seconds * 0.99


def _run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,needles", [
    (["--devices", "0"], ["--devices must be positive", "0"]),
    (["--gflops", "-1"], ["--gflops must be positive", "-1"]),
    (["--mesh", "dat=8"], ["--mesh dat=8", "expected data=N,model=M"]),
    (["--mesh", "data=0"], ["mesh.data", "0"]),
    (["--mesh", "data=3", "--devices", "8"], ["mesh.data=3", "device count 8"]),
    (["--model", "no/such-model"], ["model.path", "no/such-model"]),
])
def test_plan_bad_input_is_one_line_exit_2(capsys, argv, needles):
  code, err = _run(capsys, "plan", "--config", "configs/llama2_7b/gptq_w4g128.yaml",
                   "--gflops", "1", *argv)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == errors.EXIT_USER_ERROR and len(lines) == 1, err
  assert lines[0].startswith("error: ") and "Traceback" not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_plan_missing_config_is_one_line_exit_2(capsys, tmp_path):
  code, err = _run(capsys, "plan", "--config", tmp_path / "none.yaml")
  assert code == errors.EXIT_USER_ERROR and "none.yaml" in err and len(err.splitlines()) == 1
