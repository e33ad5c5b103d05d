"""A run directory's files: unquantized tensors stored in the source checkpoint's type (not
widened), evaluation of the directory reproduces the in-memory model exactly, files follow the
umask, and metrics.json's phase times add up to quantize_seconds with a baseline evaluation on.

The checkpoint is a tiny random Llama written as a HF directory with mixed tensor types (bf16
embedding, f32 norms, f16 linears and lm_head) and loaded in float32."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from cdquant_jax import io_utils
from cdquant_jax.models import registry
from cdquant_jax.pipeline import export
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.evaluation import model_perplexity
from cdquant_jax.pipeline.sequential import quantize_loaded

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61, "tie_word_embeddings": False}
SEQLEN = 16
# Timing keys that are not phases of quantize_seconds.
OUTSIDE_QUANTIZE = ("quantize_seconds", "baseline_eval_seconds", "eval_seconds", "export_seconds")


def source_type(name: str) -> str:
  """The type each tensor of the synthetic checkpoint is saved in."""
  if name.startswith("embed_tokens"):
    return "bfloat16"
  return "float32" if "norm" in name else "float16"


def _write_checkpoint(directory, model) -> None:
  """config.json + model.safetensors (HF names "model.<ours>"; lm_head unprefixed)."""
  params = model.init_params(jax.random.key(0), scale=0.3)
  tensors = {}
  for name, leaf in export.flatten(params).items():
    hf_name = name if name.startswith("lm_head") else f"model.{name}"
    tensors[hf_name] = np.asarray(leaf, np.float32).astype(source_type(name))
  os.makedirs(directory)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(TINY, f)


def _word_tokenizer(vocab_size: int) -> Tokenizer:
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(run config, QuantizedRun, model, loaded params, source dtypes, eval text path)."""
  root = tmp_path_factory.mktemp("run_files")
  ckpt = str(root / "ckpt")
  _write_checkpoint(ckpt, registry.model_from_hf_config(TINY))
  source = {}
  model, params, _ = registry.load_model(ckpt, "float32", with_tokenizer=False,
                                         source_dtypes=source)
  ids = np.asarray(model.generate(params, jnp.zeros((40, 1), jnp.int32), SEQLEN - 1,
                                  greedy=False, key=jax.random.key(1)))
  text = root / "eval.txt"
  text.write_text(" ".join(f"w{i}" for i in ids[24:].reshape(-1)))
  cfg = run_config_from_dict({
      "output_dir": str(root / "out"), "forward_batch_size": 8,
      "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}},
      "calibration": {"nsamples": 24, "seqlen": SEQLEN},
      "eval": {"sources": ["text"], "paths": {"text": str(text)}, "baseline": True}})
  result = quantize_loaded(cfg, model, params, ids[:24], tokenizer=_word_tokenizer(61),
                           progress=False, source_dtypes=source)
  return cfg, result, model, params, source


def test_loader_reports_every_tensors_source_type(run):
  _, _, _, params, source = run
  names = export.flatten(params)
  assert source == {name: source_type(name) for name in names}
  assert all(leaf.dtype == jnp.float32 for leaf in names.values())  # loaded widened


def test_unquantized_tensors_keep_the_source_type_and_the_directory_reproduces_the_run(run):
  cfg, result, model, params, _ = run
  stored = load_file(os.path.join(cfg.output_dir, export.PARAMS_FILE))
  unquantized = [n for n in export.flatten(params) if not n.endswith("_proj.weight")]
  assert sorted(stored) == sorted(unquantized)
  for name, array in stored.items():
    assert array.dtype.name == source_type(name), name
  assert {a.dtype.name for a in stored.values()} == {"bfloat16", "float16", "float32"}
  m2, loaded, _ = export.load_quantized_model(cfg.output_dir)
  dense = export.dense_params(loaded)
  for name, leaf in export.flatten(result.params).items():
    got = export.flatten(dense)[name]
    assert got.dtype == jnp.float32, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf), err_msg=name)
  ids = np.asarray(model.generate(params, jnp.zeros((2, 1), jnp.int32), 4 * SEQLEN - 1,
                                  greedy=False, key=jax.random.key(2))).reshape(1, -1)
  ppl = lambda m, p: model_perplexity(m, p, ids, seqlen=SEQLEN, batch_size=4)["ppl"]
  assert ppl(m2, dense) == ppl(model, result.params)


@pytest.mark.parametrize("dtype, source, expected", [
    ("float32", "float16", "float16"),     # GGUF F16 / f16 safetensors, loaded as f32
    ("float32", "bfloat16", "bfloat16"),
    ("float32", "float32", "float32"),     # F32 stays F32 even when the values fit f16
    ("float32", "Q8_0", "float16"),        # block-quantized, values exactly f16
    ("float32", None, "float32"),          # unknown source: the in-memory dtype
    ("bfloat16", "float32", "bfloat16"),   # loaded narrower than the source
    ("bfloat16", None, "bfloat16"),
])
def test_storage_dtype_of_exact_values(dtype, source, expected):
  a = np.asarray([0.5, -1.25, 3.0, 0.0], np.float32).astype(dtype)
  assert export.storage_dtype(a, source) == expected


def test_storage_dtype_falls_back_when_values_do_not_fit():
  a = np.asarray([1.0, 1.0 + 2.0**-20], np.float32)  # not a float16 / bfloat16
  assert export.storage_dtype(a, "Q8_0") == "float32"
  # A source type that would round the values is not used (cannot come from that source).
  assert export.storage_dtype(a, "bfloat16") == "float32"
  wide = np.asarray([1e5], np.float32).astype(ml_dtypes.bfloat16)  # beyond float16's range
  assert export.storage_dtype(wide, "float16") == "bfloat16"


def test_timing_phases_add_up_to_quantize_seconds(run):
  cfg, result, _, _, _ = run
  timing = json.loads(open(os.path.join(cfg.output_dir, export.METRICS_FILE)).read())["timing"]
  assert timing == result.metrics["timing"]
  phases = {k: v for k, v in timing.items() if k not in OUTSIDE_QUANTIZE}
  assert {"setup_seconds", "capture_hessian_seconds", "solve_pack_seconds"} <= set(phases)
  # Each value is rounded to 1 ms on its own.
  assert sum(phases.values()) == pytest.approx(timing["quantize_seconds"],
                                               abs=0.0005 * (len(phases) + 1))
  assert timing["baseline_eval_seconds"] > 0 and "baseline_perplexity" in result.metrics


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_run_files_follow_the_umask(run):
  cfg = run[0]
  want = 0o666 & ~io_utils.current_umask()
  files = [os.path.join(d, f) for d, _, fs in os.walk(cfg.output_dir) for f in fs]
  assert len(files) >= 6
  assert {os.path.relpath(f, cfg.output_dir): _mode(f) for f in files} == {
      os.path.relpath(f, cfg.output_dir): want for f in files}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    io_utils.atomic_write_text(tmp_path / "a.txt", "x")
    io_utils.atomic_write_json(tmp_path / "b.json", {"x": 1})
    io_utils.atomic_write_npz(tmp_path / "c.npz", {"x": np.zeros(2)})
  finally:
    os.umask(old)
  for name in ("a.txt", "b.json", "c.npz"):
    assert _mode(tmp_path / name) == 0o666 & ~umask, name
