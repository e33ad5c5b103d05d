"""compressed-tensors pack-quantized export, read by the consumers' own code.

Two readers: compressed-tensors' model-free decompressor (`CompressedTensorsDequantizer`,
what its checkpoint converter runs) must give back exactly this project's dequantized weights,
and transformers' `from_pretrained` of the directory (torch, CPU, f32) must give this project's
logits on the same tokens (relative 1e-4). transformers keeps symmetric checkpoints compressed
and decompresses them on the first forward; asymmetric ones are loaded with
`CompressedTensorsConfig(dequantize=True)`, because its compressed path builds the zero point
unpacked while pack-quantized stores it packed (the upstream bug llm-compressor#1618); that
dequantize path applies the first config group to every dense layer, so the mixed-scheme run
is symmetric (compressed path, per-module schemes).
"""

import json
import os

import numpy as np
import pytest

from cdquant_jax.export import ExportError, export_model
from cdquant_jax.export import common
from tests.export import runs
from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf
ct = pytest.importorskip("compressed_tensors")

ROUND_TRIPS = ["gptq-w4g32", "gptq-w4g32-static-sym", "rtn-w8g32-sym", "rtn-w4-perchannel",
               "cd-w4g32", "bcd-w2g32", "cyclic-w5g32"]


def library_dense(directory: str) -> dict:
  """{HF name: float32 array} decompressed by compressed-tensors itself."""
  import torch  # pylint: disable=import-outside-toplevel
  from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # pylint: disable=import-outside-toplevel
      CompressedTensorsDequantizer)
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  dense = CompressedTensorsDequantizer(directory, dtype=torch.float32).process(dict(tensors))
  return {k: v.numpy() for k, v in dense.items()}


def transformers_logits(directory: str, ids: np.ndarray, dequantize: bool) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  kwargs = {}
  if dequantize:
    kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager", **kwargs)
  return ref.torch_logits(model.eval(), ids)


def _config(directory) -> dict:
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def check_round_trip(rd: str, out: str, ids: np.ndarray) -> dict:
  """Exports `rd`, checks both readers; returns the quantization config."""
  export_model(rd, "compressed-tensors", out)
  qcfg = _config(out)["quantization_config"]
  from compressed_tensors.quantization import QuantizationConfig  # pylint: disable=import-outside-toplevel
  QuantizationConfig.model_validate(qcfg)  # the library's own schema accepts it
  dense = library_dense(out)
  run = common.load_run(rd)
  for module, g in common.decode_all(run).items():
    got = dense[f"{common.hf_name(module)}.weight"]
    np.testing.assert_array_equal(got.view(np.uint32), g.dequantized().view(np.uint32), module)
  want = runs.run_logits(rd, ids)
  torch_model = runs.torch_model_from_dense(_config(out), dense)
  assert runs.relative_error(ref.torch_logits(torch_model, ids), want) <= 1e-4
  symmetric = all(group["weights"]["symmetric"] for group in qcfg["config_groups"].values())
  err = runs.relative_error(transformers_logits(out, ids, dequantize=not symmetric), want)
  assert err <= 1e-4, err
  return qcfg


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip(run_dir, ids, tmp_path, name):
  qcfg = check_round_trip(run_dir(name), str(tmp_path), ids)
  _, knobs = runs.RUNS[name]
  assert qcfg["format"] == "pack-quantized" and qcfg["quant_method"] == "compressed-tensors"
  (group,) = qcfg["config_groups"].values()
  assert group["targets"] == ["Linear"] and qcfg["ignore"] == ["lm_head"]
  w = group["weights"]
  assert (w["num_bits"], w["symmetric"]) == (knobs["bits"], knobs.get("sym", False))
  assert w["strategy"] == ("channel" if knobs["group_size"] == -1 else "group")


def test_mixed_schemes_and_dense_modules(checkpoint, ids, tmp_path):
  """Per-module bits and groups (one config group each, `re:` targets); attention left dense."""
  knobs_for = lambda name: (dict(bits=4, group_size=32, sym=True) if "up_proj" in name
                            else dict(bits=8, group_size=-1, sym=True))
  rd = runs.quantized_run(checkpoint[1], str(tmp_path / "run"), "rtn", knobs_for=knobs_for,
                          only=lambda name: ".mlp." in name)
  qcfg = check_round_trip(rd, str(tmp_path / "out"), ids)
  assert len(qcfg["config_groups"]) == 2
  assert "model.layers.1.self_attn.q_proj" in qcfg["ignore"]
  targets = sorted(t for g in qcfg["config_groups"].values() for t in g["targets"])
  assert targets[0] == r"re:^model\.layers\.0\.mlp\.down_proj$"


def test_act_order_groups_are_refused_and_point_to_gptq(run_dir, tmp_path):
  with pytest.raises(ExportError, match=r"^layers\.0\.\S+: compressed-tensors cannot hold "
                     r"act-order groups .*; export it as gptq$"):
    export_model(run_dir("gptq-w3g32-actorder"), "compressed-tensors", str(tmp_path / "o"))
