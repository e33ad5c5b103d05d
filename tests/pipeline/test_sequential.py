"""The layer-sequential pipeline on a tiny random Llama.

Calibration and evaluation tokens are sampled from the unquantized model itself, so it is the
best predictor of them in expectation (cross-entropy = entropy + KL): quantization noise can
only raise the perplexity, a lot at 2 bits, barely at 8 bits.
Hessians in the independent checks are captured with the model's own un-jitted block (not the
pipeline's capture code) from weights read back from the exported directory.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.models import registry
from cdquant_jax.models.base import default_positions
from cdquant_jax.models.params import get_path
from cdquant_jax.pipeline import checkpoint, export, runlog
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.evaluation import model_perplexity
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.quant import qweight
from cdquant_jax.quant.bits import bits_formula
from cdquant_jax.solvers import api, knobs
from cdquant_jax.solvers.hessian import hessian_from_inputs

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}
SEQLEN = 16


@pytest.fixture(scope="module")
def tiny():
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  ids = np.asarray(model.generate(params, jnp.zeros((72, 1), jnp.int32), SEQLEN - 1,
                                  greedy=False, key=jax.random.key(1)))
  return model, params, ids[:24], ids[24:].reshape(1, -1)


def _run_config(tmp_path, name, **quant):
  quant = {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}, **quant}
  return run_config_from_dict({"output_dir": str(tmp_path / name), "quant": quant,
                               "calibration": {"nsamples": 24, "seqlen": SEQLEN},
                               "forward_batch_size": 8})


def _ppl(model, params, ids):
  return model_perplexity(model, params, ids, seqlen=SEQLEN, batch_size=8)["ppl"]


@pytest.fixture(scope="module")
def gptq_run(tiny, tmp_path_factory):
  model, params, calib, _ = tiny
  run = _run_config(tmp_path_factory.mktemp("gptq"), "out")
  return run, quantize_loaded(run, model, params, calib, progress=False)


def _block0_inputs(model, params, layer_params, calib):
  """Every linear's input [N, T, d_in] in block 0, with the model's plain (un-jitted) block."""
  ids = jnp.asarray(calib)
  pos = default_positions(ids)
  h = model.embed(params, ids, pos)
  return model.block(layer_params, h, pos, 0, capture=True)[2]


def test_objectives_equal_direct_solves_on_true_sequential_hessians(tiny, gptq_run):
  model, params, calib, _ = tiny
  run, result = gptq_run
  _, loaded, _ = export.load_quantized_model(run.output_dir)
  original = model.layer_params(params, 0)
  records = {r["module"]: r for r in result.records}
  partly = original  # block 0 with the groups before the current one quantized
  for g, group in enumerate(model.block_linears()):
    inputs = _block0_inputs(model, params, partly, calib)
    unquantized_inputs = _block0_inputs(model, params, original, calib)
    for path in group:
      name = "layers.0." + ".".join(path)
      W = get_path(original, path)["weight"]
      H = hessian_from_inputs(inputs[path])
      cfg = knobs.apply(api.default_config("gptq"), bits=3, group_size=16)
      direct = float(api.solve("gptq", W, H, cfg, layer=name).objective)
      np.testing.assert_allclose(records[name]["objective"], direct, rtol=1e-4)
      if g > 0:  # later groups see the quantized earlier groups
        H_unq = hessian_from_inputs(unquantized_inputs[path])
        assert float(jnp.max(jnp.abs(H - H_unq))) > 1e-3 * float(jnp.max(jnp.abs(H)))
    for path in group:
      qw = get_path(model.layer_params(loaded, 0), path)["weight"]
      partly = _set(partly, path, qweight.dequantize(qw))


def _set(tree, path, value):
  if len(path) == 1:
    return {**tree, path[0]: {**tree[path[0]], "weight": value}}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def test_log_records(tiny, gptq_run):
  model, _, _, _ = tiny
  run, result = gptq_run
  logged = runlog.read_log(run.output_dir)
  assert logged == result.records
  assert [r["module"] for r in logged] == [f"layers.{i}." + ".".join(p) for i in range(2)
                                           for p in model.linear_paths()]
  for r in logged:
    assert r["method"] == "gptq" and r["percdamp"] == pytest.approx(0.01)
    assert 0 < r["relative_objective"] < 1
    assert r["relative_objective"] == pytest.approx(r["objective"] / r["energy"])
    assert r["bits_formula"] == pytest.approx(bits_formula(
        bits=3, group_size=16, qq_groupsize=None, qq_scale_bits=None, qq_zero_bits=None))
    assert r["outlier_share"] == 0 and r["nsamples"] == 24


def test_export_reproduces_in_memory_model(tiny, gptq_run):
  model, params, _, eval_ids = tiny
  run, result = gptq_run
  m2, loaded, tok = export.load_quantized_model(run.output_dir)
  assert m2.config == model.config and tok is None
  assert export.quantized_weights(loaded).keys() == result.qweights.keys()
  dense = export.dense_params(loaded)
  assert _ppl(m2, dense, eval_ids) == _ppl(model, result.params, eval_ids)
  # Embeddings, norms and the lm_head are untouched.
  for name, leaf in export.flatten(params).items():
    if not name.endswith("_proj.weight"):
      np.testing.assert_array_equal(export.flatten(dense)[name], leaf, err_msg=name)


def test_perplexity_close_at_8_bits_worse_at_2(tiny, tmp_path):
  model, params, calib, eval_ids = tiny
  base = _ppl(model, params, eval_ids)
  ppl = {}
  for bits in (8, 2):
    run = _run_config(tmp_path, f"w{bits}", knobs={"bits": bits, "group_size": 16})
    ppl[bits] = _ppl(model, quantize_loaded(run, model, params, calib, progress=False).params,
                     eval_ids)
  assert np.isfinite(ppl[8]) and abs(ppl[8] / base - 1) < 0.02, (base, ppl)
  assert ppl[2] > 1.1 * base, (base, ppl)


def test_module_rules_and_exclude(tiny, tmp_path):
  model, params, calib, _ = tiny
  run = _run_config(tmp_path, "rules", rules=[
      {"pattern": r"mlp\.down_proj$", "method": "rtn", "knobs": {"bits": 4}},
      {"pattern": r"self_attn\.o_proj$", "set": {"grid.sym": True}}],
                    exclude=[r"^layers\.1\."])
  result = quantize_loaded(run, model, params, calib, progress=False)
  by_name = {r["module"]: r for r in result.records}
  assert sorted(by_name) == sorted(f"layers.0.{'.'.join(p)}" for p in model.linear_paths())
  assert by_name["layers.0.mlp.down_proj"]["method"] == "rtn"
  assert result.qweights["layers.0.mlp.down_proj"].meta.bits == 4
  assert result.qweights["layers.0.self_attn.o_proj"].meta.sym
  assert result.qweights["layers.0.mlp.up_proj"].meta.bits == 3
  assert by_name["layers.0.mlp.up_proj"]["method"] == "gptq"
  # The excluded block is bit-identical to the original.
  for leaf, orig in zip(jax.tree.leaves(model.layer_params(result.params, 1)),
                        jax.tree.leaves(model.layer_params(params, 1))):
    np.testing.assert_array_equal(leaf, orig)


class Interrupt(Exception):
  pass


def _stop_after(block):
  def hook(i):
    if i == block:
      raise Interrupt(i)
  return hook


def _comparable(metrics):
  return {k: v for k, v in metrics.items() if k not in ("timing", "memory")}


@pytest.mark.parametrize("mode", ["replay", "activations"])
def test_resume_is_bit_identical(tiny, gptq_run, tmp_path, mode):
  model, params, calib, _ = tiny
  _, full = gptq_run
  run = dataclasses.replace(_run_config(tmp_path, mode), checkpoint=mode,
                            activations="host" if mode == "replay" else "device")
  with pytest.raises(Interrupt):
    quantize_loaded(run, model, params, calib, progress=False, after_block=_stop_after(0))
  assert checkpoint.load_state(run.output_dir)["blocks_done"] == 1
  resumed = quantize_loaded(run, model, params, calib, progress=False, resume=True)
  assert resumed.qweights.keys() == full.qweights.keys()
  for name, qw in full.qweights.items():
    for field, array in qw.arrays().items():
      np.testing.assert_array_equal(resumed.qweights[name].arrays()[field], array,
                                    err_msg=f"{name}.{field}")
  strip = lambda recs: [{k: v for k, v in r.items() if k not in ("seconds", "block_memory")}
                         for r in recs]  # measured, like the times
  assert strip(resumed.records) == strip(full.records)
  assert _comparable(resumed.metrics) == _comparable(full.metrics)
  assert not checkpoint.load_state(run.output_dir)  # cleared after the export


def test_resume_refuses_changed_config_or_data(tiny, tmp_path):
  model, params, calib, _ = tiny
  run = _run_config(tmp_path, "changed")
  with pytest.raises(Interrupt):
    quantize_loaded(run, model, params, calib, progress=False, after_block=_stop_after(0))
  bits4 = _run_config(tmp_path, "changed", knobs={"bits": 4, "group_size": 16})
  with pytest.raises(checkpoint.ResumeError, match=r"quant\.knobs\.bits: 3 -> 4"):
    quantize_loaded(bits4, model, params, calib, progress=False, resume=True)
  with pytest.raises(checkpoint.ResumeError, match="calibration data changed"):
    quantize_loaded(run, model, params, calib[::-1], progress=False, resume=True)
  other = jax.tree.map(lambda x: x * 1.5, params)
  with pytest.raises(checkpoint.ResumeError, match="model parameters"):
    quantize_loaded(run, model, other, calib, progress=False, resume=True)


def test_without_true_sequential_all_hessians_come_from_the_unquantized_block(tiny, tmp_path):
  model, params, calib, _ = tiny
  run = _run_config(tmp_path, "flat", true_sequential=False)
  records = {r["module"]: r for r in quantize_loaded(run, model, params, calib,
                                                     progress=False).records}
  inputs = _block0_inputs(model, params, model.layer_params(params, 0), calib)
  cfg = knobs.apply(api.default_config("gptq"), bits=3, group_size=16)
  for path in (("mlp", "down_proj"), ("self_attn", "o_proj")):
    W = get_path(model.layer_params(params, 0), path)["weight"]
    direct = api.solve("gptq", W, hessian_from_inputs(inputs[path]), cfg).objective
    np.testing.assert_allclose(records["layers.0." + ".".join(path)]["objective"],
                               float(direct), rtol=1e-4)


def test_run_config_exports_after_quantization(tmp_path):
  """quant + exports in one run config: the formats are written as `cdquant export` writes them."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from cdquant_jax import export as export_formats  # pylint: disable=import-outside-toplevel
  # GPTQ v1 packs 32 rows per word: every linear needs multiples of 32 (TINY's k/v have 16).
  model = registry.model_from_hf_config({**TINY, "hidden_size": 64, "intermediate_size": 64,
                                         "num_attention_heads": 2, "num_key_value_heads": 1})
  params = model.init_params(jax.random.key(2), scale=0.3)
  calib = np.asarray(jax.random.randint(jax.random.key(3), (24, SEQLEN), 0, TINY["vocab_size"]))
  fp16 = {"gptq": {"grid": {"fp16_stats": True}}}
  run = _run_config(tmp_path, "exp", knobs={"bits": 4, "group_size": 16}, solvers=fp16)
  run = config_lib.apply_overrides(run, ["exports=[gptq, compressed-tensors]"])
  metrics = quantize_loaded(run, model, params, calib, progress=False).metrics
  assert sorted(metrics["exports"]) == ["compressed-tensors", "gptq"]
  for fmt in ("gptq", "compressed-tensors"):
    again = tmp_path / f"again-{fmt}"
    export_formats.export_model(run.output_dir, fmt, str(again))
    ours = load_file(os.path.join(run.output_dir, "export", fmt, "model.safetensors"))
    want = load_file(str(again / "model.safetensors"))
    assert ours.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(ours[key], want[key], err_msg=f"{fmt}: {key}")


def test_a_refused_export_keeps_the_run_directory(tiny, tmp_path):
  from cdquant_jax.export import ExportError  # pylint: disable=import-outside-toplevel
  model, params, calib, _ = tiny
  run = _run_config(tmp_path, "spqr", method="spqr", knobs={"bits": 3, "group_size": 16,
                                                             "qq_group_size": 8})
  run = config_lib.apply_overrides(run, ["exports=[gptq]"])
  with pytest.raises(ExportError, match="layers.0"):
    quantize_loaded(run, model, params, calib, progress=False)
  assert os.path.exists(os.path.join(run.output_dir, export.METRICS_FILE))


def test_export_formats_of_the_run_schema_are_the_exporters():
  import typing  # pylint: disable=import-outside-toplevel
  from cdquant_jax import export as export_formats  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config as run_schema  # pylint: disable=import-outside-toplevel
  assert set(typing.get_args(run_schema.ExportFormat)) == set(export_formats.FORMATS)
