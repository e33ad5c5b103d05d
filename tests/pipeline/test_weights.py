"""`weights: disk` (block weights read from the checkpoint when needed) against the reference,
the same run with every weight loaded in memory (`weights: host`), on a tiny random Llama saved
as safetensors and as a Q8_0 GGUF: the same packed weights, objectives, perplexities and
exported model, bit for bit, with and without an interruption; and what the lazy blocks keep."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cdquant_jax.config import ConfigError
from cdquant_jax.models import registry
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.pipeline import checkpoint, export, memory, weights
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded, quantize_model

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61, "tie_word_embeddings": False}
SEQLEN = 16


def _hf_tensors(model, params) -> dict[str, np.ndarray]:
  """{HF name: array} of our params (Llama names: "model." before all but lm_head)."""
  return {(n if n.startswith("lm_head") else f"model.{n}"): np.asarray(a, np.float32)
          for n, a in export.flatten(params).items()}


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY["vocab_size"])},
                                   unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """A HF directory (config.json, model.safetensors, tokenizer.json) of a random tiny Llama,
  and a text file of tokens sampled from it (calibration and evaluation)."""
  root = tmp_path_factory.mktemp("weights")
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  ids = np.asarray(model.generate(params, jnp.zeros((40, 1), jnp.int32), SEQLEN - 1,
                                  greedy=False, key=jax.random.key(1)))
  directory = root / "tiny"
  directory.mkdir()
  save_file(_hf_tensors(model, params), str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps({**TINY, "architectures":
                                                     ["LlamaForCausalLM"]}))
  _tokenizer().save(str(directory / "tokenizer.json"))
  text = root / "tokens.txt"
  text.write_text(" ".join(f"w{i}" for i in ids.reshape(-1)))
  return str(directory), str(text), ids[:24]


def _config(out, text=None, **fields):
  data = {"output_dir": str(out), "forward_batch_size": 8, "checkpoint": "none",
          "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
          "calibration": {"nsamples": 24, "seqlen": SEQLEN}, **fields}
  if text is not None:
    data["calibration"] = {**data["calibration"], "source": "text", "path": text}
    data["eval"] = {"sources": ["text"], "paths": {"text": text}, "baseline": True,
                    "batch_size": 4}
  return run_config_from_dict(data)


def _blocks(params, n):
  layers = params["layers"]
  return [layers[i] for i in range(n)]


def _unmeasured(tree):
  """tree (records, metrics) without what is measured: seconds, timing, memory."""
  if isinstance(tree, dict):
    return {k: _unmeasured(v) for k, v in tree.items()
            if k not in ("seconds", "block_memory", "timing", "memory")}
  if isinstance(tree, list):
    return [_unmeasured(v) for v in tree]
  return tree


def _assert_same_run(got, want, n_layers):
  """Two QuantizedRuns equal bit for bit: packed weights, records, metrics, dense params."""
  assert got.qweights.keys() == want.qweights.keys()
  for name, qw in want.qweights.items():
    for field, array in qw.arrays().items():
      np.testing.assert_array_equal(got.qweights[name].arrays()[field], array,
                                    err_msg=f"{name}.{field}")
  assert _unmeasured(got.records) == _unmeasured(want.records)
  assert _unmeasured(got.metrics) == _unmeasured(want.metrics)
  for g, w in zip(_blocks(got.params, n_layers), _blocks(want.params, n_layers)):
    for name, leaf in export.flatten(w).items():
      np.testing.assert_array_equal(np.asarray(export.flatten(g)[name]), np.asarray(leaf),
                                    err_msg=name)


@pytest.fixture(scope="module")
def model_runs(checkpoint_dir, tmp_path_factory):
  """{weights: (RunConfig, metrics)} of quantize_model on the directory, evaluated."""
  directory, text, _ = checkpoint_dir
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for where in ("host", "disk"):
    run = dataclasses.replace(_config(root / where, text), weights=where,
                              model=dataclasses.replace(_config(root).model, path=directory))
    reads = []
    with pytest.MonkeyPatch.context() as patch:
      block = weights.BlockReader.block
      patch.setattr(weights.BlockReader, "block",
                    lambda self, i, *a: reads.append(i) or block(self, i, *a))
      out[where] = (run, quantize_model(run.validate(), progress=False), reads)
  return out


def test_quantize_model_on_disk_weights_equals_host(model_runs):
  (host_run, host, host_reads), (disk_run, disk, disk_reads) = (model_runs["host"],
                                                                  model_runs["disk"])
  # disk: each block read for every batch of the baseline and the final evaluation (4
  # windows each), for its quantization, the comparison after it and the export; host: never
  assert not host_reads
  per_block = 2 * -(-disk["perplexity"]["text"]["n_windows"] // 4) + 3
  assert sorted(disk_reads) == sorted(list(range(TINY["num_hidden_layers"])) * per_block)
  assert _unmeasured(disk) == _unmeasured(host)
  assert disk["perplexity"]["text"]["ppl"] > 1 and "baseline_perplexity" in disk
  files = (export.PARAMS_FILE, export.QUANTIZED_FILE)
  for name in files:
    a = load_file(os.path.join(host_run.output_dir, name))
    b = load_file(os.path.join(disk_run.output_dir, name))
    assert a.keys() == b.keys(), name
    for key in a:
      np.testing.assert_array_equal(b[key], a[key], err_msg=f"{name}: {key}")


def test_disk_weights_load_only_the_outer_params(model_runs):
  """The load phase of the disk run holds the embeddings and head only: its bytes over the
  host run's are about the blocks' weights (3 blocks x 9.2k f32 values here, tiny beside the
  runtime), so compare the params themselves instead."""
  directory = model_runs["disk"][0].model.path
  _, lazy, _ = weights.load_model(directory)
  _, full, _ = registry.load_model(directory)
  resident = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert resident(weights.outer(lazy)) == resident(weights.outer(full))
  assert len(lazy["layers"]) == TINY["num_hidden_layers"]
  for i in range(TINY["num_hidden_layers"]):
    for name, leaf in export.flatten(full["layers"][i]).items():
      np.testing.assert_array_equal(np.asarray(export.flatten(lazy["layers"][i])[name]),
                                    np.asarray(leaf), err_msg=f"block {i}: {name}")
  with pytest.raises(TypeError, match="one block at a time"):
    lazy["layers"][0:2]  # pylint: disable=pointless-statement
  with pytest.raises(IndexError):
    lazy["layers"][3]  # pylint: disable=pointless-statement


def test_lazy_model_hash_is_the_checkpoint_hash(checkpoint_dir):
  directory, _, _ = checkpoint_dir
  model, lazy, _ = weights.load_model(directory)
  _, full, _ = registry.load_model(directory)
  assert weights.model_hash(model, lazy) == checkpoint.model_hash(model, full)


def _stop_after(block):
  def stop(i):
    if i == block:
      raise KeyboardInterrupt
  return stop


@pytest.mark.parametrize("first", ["disk", "host"])
def test_resume_with_disk_weights_is_bit_identical(checkpoint_dir, tmp_path, first):
  """Interrupted after block 0 (with disk or host weights), resumed with disk weights: the
  run equals the uninterrupted host run (the setting is not part of the fingerprint)."""
  directory, _, calib = checkpoint_dir
  model, full_params, _ = registry.load_model(directory)
  full = quantize_loaded(_config(tmp_path / "full"), model, full_params, calib, progress=False)
  run = _config(tmp_path / "resumed", checkpoint="replay")
  params = (lambda: weights.load_model(directory)[1]) if first == "disk" else \
      (lambda: registry.load_model(directory)[1])
  with pytest.raises(KeyboardInterrupt):
    quantize_loaded(dataclasses.replace(run, weights=first), model, params(), calib,
                    progress=False, after_block=_stop_after(0))
  assert checkpoint.load_state(run.output_dir)["blocks_done"] == 1
  resumed = quantize_loaded(dataclasses.replace(run, weights="disk"), model,
                            weights.load_model(directory)[1], calib, progress=False,
                            resume=True)
  _assert_same_run(resumed, full, TINY["num_hidden_layers"])
  layers = resumed.params["layers"]
  linear_bytes = sum(np.asarray(layers[0][k][m]["weight"]).nbytes
                     for k, m in [("self_attn", "q_proj"), ("self_attn", "k_proj"),
                                  ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                                  ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                  ("mlp", "down_proj")])
  # 3-bit codes with f16 group stats: kept packed, well under the f32 weights they replace
  assert 0 < layers.kept_nbytes() < TINY["num_hidden_layers"] * linear_bytes / 2


def test_disk_weights_refuse_params_already_in_memory(checkpoint_dir, tmp_path):
  directory, _, calib = checkpoint_dir
  model, params, _ = registry.load_model(directory)
  with pytest.raises(ConfigError, match="weights=disk"):
    quantize_loaded(_config(tmp_path, weights="disk"), model, params, calib, progress=False)
  with pytest.raises(ConfigError, match="weights"):
    _config(tmp_path, weights="gpu")


def test_missing_tensor_is_reported_when_the_reader_is_made(checkpoint_dir, tmp_path):
  directory, _, _ = checkpoint_dir
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  del tensors["model.layers.2.mlp.up_proj.weight"]
  broken = tmp_path / "broken"
  broken.mkdir()
  save_file(tensors, str(broken / "model.safetensors"))
  (broken / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
  with pytest.raises(ModelLoadError, match=r"missing \['layers.2.mlp.up_proj.weight'\]"):
    weights.load_model(str(broken))


def _write_gguf(model, params, path) -> None:
  """A llama GGUF of params, 2-D tensors in Q8_0 (rope rows left in HF order: both runs read
  the same file through the same loader)."""
  import gguf  # pylint: disable=import-outside-toplevel
  w = gguf.GGUFWriter(str(path), "llama")
  c = model.config
  w.add_block_count(c.num_layers)
  w.add_context_length(64)
  w.add_embedding_length(TINY["hidden_size"])
  w.add_feed_forward_length(TINY["intermediate_size"])
  w.add_head_count(TINY["num_attention_heads"])
  w.add_head_count_kv(TINY["num_key_value_heads"])
  w.add_layer_norm_rms_eps(1e-6)
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, x in export.flatten(params).items():
    x = np.asarray(x, np.float32)
    if name.startswith("layers."):
      _, i, rest = name.split(".", 2)
      module, kind = rest.rsplit(".", 1)
      out = f"blk.{i}.{names[module]}.{kind}"
    else:
      out = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}[name]
    if x.ndim == 2:
      q8 = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(out, gguf.quants.quantize(x, q8), raw_dtype=q8)
    else:
      w.add_tensor(out, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_disk_weights_equal_host(checkpoint_dir, tmp_path):
  directory, _, calib = checkpoint_dir
  model, params, _ = registry.load_model(directory)
  path = tmp_path / "tiny.gguf"
  _write_gguf(model, params, path)
  runs = {}
  for where, load in (("host", registry.load_model), ("disk", weights.load_model)):
    model, loaded, _ = load(str(path), "bfloat16")
    run = _config(tmp_path / where, weights=where,
                  model={"path": str(path), "dtype": "bfloat16"})
    runs[where] = quantize_loaded(run, model, loaded, calib, progress=False)
  _assert_same_run(runs["disk"], runs["host"], TINY["num_hidden_layers"])


def test_tuned_run_with_disk_weights_resumes_bit_identical(checkpoint_dir, tmp_path):
  """Tuned scales and norms: the norms differ from the checkpoint, so the lazy blocks keep
  them (after the solve, and from the checkpoint's block params on resume)."""
  directory, _, calib = checkpoint_dir
  model, full_params, _ = registry.load_model(directory)
  tuned = {"enabled": True, "steps": 6, "eval_every": 2, "holdout_fraction": 0.25}
  full = quantize_loaded(_config(tmp_path / "full", tune=tuned), model, full_params, calib,
                         progress=False)
  run = _config(tmp_path / "resumed", checkpoint="replay", tune=tuned, weights="disk")
  with pytest.raises(KeyboardInterrupt):
    quantize_loaded(run, model, weights.load_model(directory)[1], calib, progress=False,
                    after_block=_stop_after(1))
  resumed = quantize_loaded(run, model, weights.load_model(directory)[1], calib,
                            progress=False, resume=True)
  _assert_same_run(resumed, full, TINY["num_hidden_layers"])
  norms = [r["tune"]["tuned"].get("norms", 0) for r in full.records]
  assert min(norms) > 0  # the norms were tuned (and differ from the checkpoint's)


class _FakeDevice:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    if isinstance(self._stats, Exception):
      raise self._stats
    return self._stats


@pytest.mark.parametrize("stats, want", [
    (None, None), ({}, None), (RuntimeError("no allocator stats"), None),
    ({"peak_bytes_in_use": 3 * memory.MIB, "bytes_in_use": memory.MIB // 2},
     {"peak": 3.0, "in_use": 0.5})])
def test_device_memory_handles_cpu_and_gpu_stats(monkeypatch, stats, want):
  """memory_stats() is None on the CPU backend (or raises on some), a dict on a GPU."""
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(stats)])
  assert memory.device_memory_mib() == want
  report = memory.block_report({"block_params": 10, "activations_in": 20}, 100.0)
  assert report["dominant"] == "activations_in"
  assert report["peak_device_mib"] == (None if want is None else 3.0)
  assert report["device_in_use_mib"] == (None if want is None else 0.5)
