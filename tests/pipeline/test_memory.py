"""Memory options and records of the pipeline on a tiny random Llama: activations on disk and
in bfloat16, per-phase and per-block memory in metrics.json, token hashes in every run, the
chunked evaluation head, and the loaders reading one tensor at a time."""

import gc
import json
import os
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax import data
from cdquant_jax.eval.perplexity import window_nll
from cdquant_jax.models import hf_loader, registry
from cdquant_jax.pipeline import capture, export, memory
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.config import ConfigError
from cdquant_jax.pipeline.sequential import quantize_loaded

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}
SEQLEN = 16
RUN_DIRS: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny():
  model = registry.model_from_hf_config(TINY)
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.asarray(model.generate(params, jnp.zeros((40, 1), jnp.int32), SEQLEN - 1,
                                  greedy=False, key=jax.random.key(1)))
  return model, params, ids[:24], ids[24:]


def _run(tiny, out, **fields):
  model, params, calib, _ = tiny
  cfg = run_config_from_dict({
      "output_dir": str(out), "forward_batch_size": 8, "checkpoint": "none",
      "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
      "calibration": {"nsamples": 24, "seqlen": SEQLEN}, **fields})
  return quantize_loaded(cfg, model, params, calib, progress=False)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
  """{name: QuantizedRun} of the same run with its activations stored three ways (the output
  directory of each is `RUN_DIRS[name]` under the module's temporary folder)."""
  root = tmp_path_factory.mktemp("memory")
  RUN_DIRS.update({name: str(root / name) for name in ("host", "disk", "bf16")})
  return {name: _run(tiny, root / name, **fields) for name, fields in {
      "host": {"activations": "host"},
      "disk": {"activations": "disk"},
      "bf16": {"activations": "host", "activation_dtype": "bfloat16"}}.items()}


def _objectives(result):
  return np.array([r["objective"] for r in result.records])


def test_disk_activations_change_nothing_but_where_they_live(runs):
  np.testing.assert_array_equal(_objectives(runs["disk"]), _objectives(runs["host"]))
  for name, leaf in export.flatten(runs["host"].params).items():
    np.testing.assert_array_equal(np.asarray(export.flatten(runs["disk"].params)[name]),
                                  np.asarray(leaf), err_msg=name)


def test_bf16_activations_change_the_objective_by_a_bounded_amount(runs):
  host, bf16 = _objectives(runs["host"]), _objectives(runs["bf16"])
  relative = np.abs(bf16 - host) / host
  assert relative.max() > 0  # the layer problems did change
  assert relative.max() < 0.1, relative  # bf16 rounding of the inputs: ~2^-8 relative
  sizes = {name: runs[name].metrics["memory"]["blocks"][0]["buffers_bytes"]
           for name in ("host", "bf16", "disk")}
  assert 2 * sizes["bf16"]["activations_in"] == sizes["host"]["activations_in"] == 24 * SEQLEN * 32 * 4
  assert 2 * sizes["bf16"]["kept_inputs"] == sizes["host"]["kept_inputs"]
  assert sizes["disk"]["activations_in"] == sizes["disk"]["kept_inputs"] == 0  # not in memory


def test_disk_storage_writes_files_and_removes_them(tmp_path):
  storage = capture.Storage(where="disk", directory=str(tmp_path))
  acts = capture.Activations(storage)
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  acts.append(x)
  acts.append(x + 1)
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
  assert len(files) == 2 and all(f.endswith(".npy") for f in files)
  assert acts.resident_nbytes() == 0 and acts.nbytes() == 2 * x.nbytes
  got = list(acts)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(x + 1))
  assert got[0].dtype == jnp.float32
  del acts, got
  gc.collect()
  assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]


def test_bf16_storage_keeps_bf16_and_reads_back_the_compute_dtype():
  acts = capture.Activations(capture.Storage(where="host", dtype="bfloat16"))
  x = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.float32)
  acts.append(x)
  assert acts.batches[0].dtype == jnp.bfloat16
  (back,) = list(acts)
  assert back.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x.astype(jnp.bfloat16), np.float32))


def test_activation_dtype_wider_than_the_model_is_rejected():
  with pytest.raises(ConfigError, match="wider"):
    run_config_from_dict({"model": {"dtype": "bfloat16"}, "activation_dtype": "float32"})
  with pytest.raises(ConfigError):
    run_config_from_dict({"activations": "tape"})


def test_metrics_report_phase_and_block_memory(runs):
  result = runs["host"]
  mem = result.metrics["memory"]
  phases = {k for k in result.metrics["timing"] if k != "quantize_seconds"}
  assert phases <= set(mem["phases_host_mib"]) | {"export_formats_seconds"}
  assert max(mem["phases_host_mib"].values()) <= mem["peak_host_mib"] + 1
  assert [b["block"] for b in mem["blocks"]] == [0, 1]
  block = mem["blocks"][0]
  # kept linear inputs: Σ d_in / D = (32 + 32 + 32 + 64) / 32 = 5 times the activations
  # kept linear inputs, one per distinct input: q/k/v (d_in 32), o (32), up/gate (32) and
  # down (64), Σ d_in / D = 5 times the activations
  assert block["buffers_bytes"]["kept_inputs"] == 5 * block["buffers_bytes"]["activations_in"]
  assert block["dominant"] == "kept_inputs"
  log = [json.loads(line) for line in open(os.path.join(RUN_DIRS["host"], "log.jsonl"))]
  assert all(r["block_memory"]["buffers_bytes"] == mem["blocks"][r["layer"]]["buffers_bytes"]
             for r in log)


def test_token_hashes_are_recorded_without_checkpoints(tiny, runs):
  _, _, calib, _ = tiny
  result = runs["host"]
  expected = data.token_hash(np.asarray(calib, np.int32))
  assert result.metrics["token_hashes"]["calibration"] == expected
  saved = json.load(open(os.path.join(RUN_DIRS["host"], export.RUN_CONFIG_FILE)))
  assert saved["checkpoint"] == "none"
  assert saved["token_hashes"]["calibration"] == expected


def _evaluated_run(tiny, tmp_path, method: str):
  """(tokenizer, QuantizedRun, its saved run_config.json) of a 4-bit `method` run evaluated on
  a text file of held-out windows, in tmp_path/first."""
  model, params, calib, held_out = tiny
  text = tmp_path / "eval.txt"
  text.write_text(" ".join(f"w{i}" for i in held_out.reshape(-1)))
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  cfg = run_config_from_dict({
      "output_dir": str(tmp_path / "first"), "checkpoint": "none",
      "quant": {"method": method, "knobs": {"bits": 4, "group_size": 16}},
      "calibration": {"nsamples": 24, "seqlen": SEQLEN},
      "eval": {"sources": ["text"], "paths": {"text": str(text)}}})
  result = quantize_loaded(cfg, model, params, calib, tokenizer=tok, progress=False)
  return tok, result, json.load(open(tmp_path / "first" / export.RUN_CONFIG_FILE))


def test_token_hashes_include_the_evaluation_windows(tiny, tmp_path):
  _, result, saved = _evaluated_run(tiny, tmp_path, "gptq")
  hashes = result.metrics["token_hashes"]["evaluation"]
  assert hashes == {"text": result.metrics["perplexity"]["text"]["token_hash"]}
  assert len(hashes["text"]) == 64 and hashes["text"] != result.metrics["token_hashes"][
      "calibration"]
  assert saved["token_hashes"] == result.metrics["token_hashes"]


def test_a_runs_own_run_config_reruns_and_checks_its_token_hashes(tiny, tmp_path):
  """run_config.json loads as a run config; re-run, it reproduces the run; with another
  calibration set or a tampered evaluation hash it fails, naming the hash, before evaluating."""
  model, params, calib, _ = tiny
  tok, done, saved = _evaluated_run(tiny, tmp_path, "rtn")
  again = run_config_from_dict({**saved, "output_dir": str(tmp_path / "again")})
  assert again.token_hashes == done.metrics["token_hashes"]
  redone = quantize_loaded(again, model, params, calib, tokenizer=tok, progress=False)
  assert redone.metrics["perplexity"] == done.metrics["perplexity"]
  with pytest.raises(ConfigError, match="token_hashes.calibration"):
    quantize_loaded(again, model, params, calib[::-1], tokenizer=tok, progress=False)
  tampered = {**saved, "token_hashes": {**saved["token_hashes"], "evaluation": {"text": "0" * 64}}}
  with pytest.raises(ConfigError, match="token_hashes.evaluation.text"):
    quantize_loaded(run_config_from_dict(tampered), model, params, calib, tokenizer=tok,
                    progress=False)
  with pytest.raises(ConfigError, match=r"source\(s\) \['c4'\] are not in eval.sources"):
    run_config_from_dict({**saved, "token_hashes": {"evaluation": {"c4": "0" * 64}}})


def test_chunked_head_equals_the_whole_batch_head(tiny, monkeypatch):
  model, params, calib, _ = tiny
  monkeypatch.setattr(capture, "HEAD_CHUNK_TOKENS", 7)  # 3 x 16 tokens: 7 chunks, 1 padded
  ids = jnp.asarray(calib[:3])
  h = jax.random.normal(jax.random.key(2), (3, SEQLEN, TINY["hidden_size"]), jnp.float32)
  got = capture._head_nll(model, params, h, ids)  # pylint: disable=protected-access
  want = window_nll(model.head(params, h), ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_phase_memory_charges_a_peak_to_its_phase():
  with memory.tracking() as tracker:
    tracker.mark("before")
    big = np.ones(64 * memory.MIB // 8)  # 64 MiB, touched
    time.sleep(0.1)
    del big
    memory.release_freed()
    tracker.mark("big")
    time.sleep(0.05)
    tracker.mark("after")
  assert tracker.phases["big"] >= tracker.phases["before"] + 48
  assert tracker.phases["after"] <= tracker.phases["big"] - 32


@pytest.mark.skipif(memory.rss_breakdown_mib() is None, reason="needs /proc/self/smaps_rollup")
def test_rss_breakdown_names_an_allocation_and_its_release():
  before = memory.rss_breakdown_mib()
  big = np.ones(96 * memory.MIB // 8)  # 96 MiB through malloc (mmapped: above its threshold)
  held = memory.rss_breakdown_mib()
  assert held["anonymous"] >= before["anonymous"] + 90
  assert abs(held["file"] - before["file"]) < 8
  if "malloc_in_use" in held:  # glibc
    assert held["malloc_in_use"] >= before["malloc_in_use"] + 95
  rss = memory.current_host_mib()
  assert abs(held["anonymous"] + held["file"] - rss) < 16
  del big
  after = memory.rss_breakdown_mib()
  assert after["anonymous"] <= held["anonymous"] - 90
  if "malloc_in_use" in held:
    assert after["malloc_in_use"] <= held["malloc_in_use"] - 95


def test_the_peak_breakdown_is_taken_at_the_peak():
  with memory.tracking() as tracker:
    big = np.ones(128 * memory.MIB // 8)
    time.sleep(0.2)
    del big
    time.sleep(0.05)
    report = memory.memory_report()
  breakdown = report["peak_breakdown_mib"]
  if memory.rss_breakdown_mib() is None:
    assert breakdown is None
    return
  assert breakdown["rss"] >= memory.current_host_mib() + 100  # the peak's, not the end's
  assert breakdown["anonymous"] + breakdown["file"] == pytest.approx(breakdown["rss"], abs=16)
  assert tracker.peak_breakdown is breakdown


def test_state_dicts_are_converted_one_tensor_at_a_time():
  """f32 source tensors loaded as bf16 params (so no param can alias its source): each source
  tensor is dropped once converted (at most the previous one lingers, held by its asynchronous
  device copy), never all of them at once."""
  model = registry.model_from_hf_config(TINY)
  shapes = export.flatten(model.param_shapes())
  alive: list[weakref.ref] = []
  most = []

  def loader(shape):
    def load():
      gc.collect()
      most.append(sum(ref() is not None for ref in alive))
      a = np.ones(shape, np.float32)
      alive.append(weakref.ref(a))
      return a
    return load

  names = {n if n.startswith("lm_head") else f"model.{n}": s for n, s in shapes.items()}
  state = hf_loader.LazyTensors({n: loader(s.shape) for n, s in names.items()})
  params = hf_loader.params_from_state_dict(model, state, jnp.bfloat16)
  assert len(alive) == len(shapes) and max(most) <= 1, most
  gc.collect()
  assert sum(ref() is not None for ref in alive) <= 1
  assert sorted(export.flatten(params)) == sorted(shapes)
  assert {leaf.dtype for leaf in export.flatten(params).values()} == {jnp.dtype(jnp.bfloat16)}
