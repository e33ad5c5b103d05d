"""GPTQ v1 export, checked by an unpacker written here from the published layout.

The unpacker follows the GPTQ/AutoGPTQ v1 kernels (qlinear_cuda_old, the 3-bit CUDA kernel):
qweight words along the input dimension, qzeros along the output dimension holding zero − 1,
fp16 scales, g_idx per input column. Its dense weights go into a plain transformers
LlamaForCausalLM whose f32 logits are compared with this project's model of the run.
transformers' own GPTQ loader is not used: it needs optimum and gptqmodel, and no gptqmodel
release installs CPU-only beside torch 2.13 and numpy 2.4 (7.7 needs torch >= 2.14.1; 7.6 builds
from source and downgrades numpy).
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from cdquant_jax.export import ExportError, ExportOptions, export_model
from cdquant_jax.export import common
from tests.export import runs
from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

ROUND_TRIPS = ["gptq-w4g32", "gptq-w3g32-actorder", "gptq-w4g32-static-sym", "rtn-w8g32-sym",
               "rtn-w4-perchannel", "cd-w4g32", "bcd-w2g32"]


def _unpack_rows(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
  """int32 [rows·bits/32, C] -> uint32 [rows, C] (GPTQ v1 packing along the first axis)."""
  w = words.view(np.uint32)
  mask = np.uint32(2**bits - 1)
  if 32 % bits == 0:  # word r holds rows r·pf + j at bit bits·j
    pf = 32 // bits
    shifts = (bits * np.arange(pf, dtype=np.uint32))[None, :, None]
    return ((w[:, None, :] >> shifts) & mask).reshape(rows, -1)
  assert bits == 3
  out = np.zeros((rows, w.shape[1]), np.uint32)
  for c in range(rows // 32):  # 32 rows in words 3c, 3c+1, 3c+2 (GPTQ's 3-bit kernel)
    w0, w1, w2 = w[3 * c], w[3 * c + 1], w[3 * c + 2]
    r = 32 * c
    for j in range(10):
      out[r + j] = (w0 >> np.uint32(3 * j)) & mask
      out[r + 11 + j] = (w1 >> np.uint32(3 * j + 1)) & mask
      out[r + 22 + j] = (w2 >> np.uint32(3 * j + 2)) & mask
    out[r + 10] = (w0 >> np.uint32(30)) | ((w1 & np.uint32(1)) << np.uint32(2))
    out[r + 21] = (w1 >> np.uint32(31)) | ((w2 & np.uint32(3)) << np.uint32(1))
  return out


def unpack_linear(t: dict, prefix: str, bits: int) -> np.ndarray:
  """float32 [N, K] of one GPTQ v1 linear: scales[g] · (q − (qzeros[g] + 1)), g = g_idx[k]."""
  g_idx = t[f"{prefix}.g_idx"].astype(np.int64)
  scales = t[f"{prefix}.scales"].astype(np.float32)  # [groups, N]
  q = _unpack_rows(t[f"{prefix}.qweight"], bits, g_idx.shape[0])  # [K, N]
  zeros = _unpack_rows(t[f"{prefix}.qzeros"].T.copy(), bits, scales.shape[1]).T + 1  # [groups, N]
  w = scales[g_idx] * (q.astype(np.float32) - zeros[g_idx].astype(np.float32))
  return w.T


def read_gptq_dir(directory: str):
  """(config.json, quantize_config.json, dense {HF name: array})."""
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(directory, "quantize_config.json")) as f:
    qcfg = json.load(f)
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  dense = {k: v for k, v in tensors.items()
           if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
  for key in tensors:
    if key.endswith(".qweight"):
      prefix = key[:-len(".qweight")]
      dense[f"{prefix}.weight"] = unpack_linear(tensors, prefix, qcfg["bits"])
  return config, qcfg, dense


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_gptq_round_trip(run_dir, ids, tmp_path, name):
  rd = run_dir(name)
  export_model(rd, "gptq", str(tmp_path))
  config, qcfg, dense = read_gptq_dir(str(tmp_path))
  assert config["quantization_config"] == {k: v for k, v in qcfg.items() if v is not None}
  _, knobs = runs.RUNS[name]
  assert qcfg["bits"] == knobs["bits"] and qcfg["checkpoint_format"] == "gptq"
  assert qcfg["group_size"] == knobs["group_size"]
  assert qcfg["sym"] == knobs.get("sym", False)
  assert qcfg["desc_act"] == (knobs.get("act_order", False)
                              and not knobs.get("static_groups", False))
  assert qcfg["static_groups"] == knobs.get("static_groups", False)
  run = common.load_run(rd)
  for module, g in common.decode_all(run).items():  # the same weights, bit for bit
    got = dense[f"{common.hf_name(module)}.weight"]
    np.testing.assert_array_equal(got.view(np.uint32), g.dequantized().view(np.uint32), module)
  torch_model = runs.torch_model_from_dense(config, dense)
  err = runs.relative_error(ref.torch_logits(torch_model, ids), runs.run_logits(rd, ids))
  assert err <= 1e-4, err


def test_symmetric_4bit_zero_words_read_0x77777777(run_dir, tmp_path):
  export_model(run_dir("gptq-w4g32-static-sym"), "gptq", str(tmp_path))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  qzeros = tensors["model.layers.0.self_attn.q_proj.qzeros"]
  assert qzeros.dtype == np.int32 and (qzeros.view(np.uint32) == 0x77777777).all()
  assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == np.float16
  assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * 4 // 32, 64)


def test_act_order_g_idx_is_not_contiguous(run_dir, tmp_path):
  export_model(run_dir("gptq-w3g32-actorder"), "gptq", str(tmp_path))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
  assert g_idx.shape == (96,) and (np.bincount(g_idx) == 32).all()
  assert not np.array_equal(g_idx, np.arange(96) // 32)


@pytest.mark.parametrize("name, reason, alternatives", [
    ("cyclic-w5g32", "5-bit codes", "compressed-tensors or gguf"),
])
def test_refusals_name_the_module_the_reason_and_the_formats(run_dir, tmp_path, name, reason,
                                                             alternatives):
  with pytest.raises(ExportError) as info:
    export_model(run_dir(name), "gptq", str(tmp_path / "out"))
  message = str(info.value)
  assert message.startswith("layers.0.") and "gptq cannot hold" in message
  assert reason in message and f"export it as {alternatives}" in message, message
  assert not (tmp_path / "out").exists()


def test_float32_scales_are_refused_unless_rounding_is_asked(checkpoint, ids, tmp_path):
  rd = runs.quantized_run(checkpoint[1], str(tmp_path / "run"), "rtn", fp16_stats=False,
                          bits=4, group_size=32)
  with pytest.raises(ExportError, match="float32 scales.*export it as compressed-tensors"):
    export_model(rd, "gptq", str(tmp_path / "refused"))
  export_model(rd, "gptq", str(tmp_path / "rounded"), ExportOptions(round_scales=True))
  config, _, dense = read_gptq_dir(str(tmp_path / "rounded"))
  err = runs.relative_error(ref.torch_logits(runs.torch_model_from_dense(config, dense), ids),
                            runs.run_logits(rd, ids))
  assert 0 < err <= 1e-2, err  # fp16 rounding of the scales only


def test_zero_point_zero_is_refused_by_v1_and_held_by_compressed_tensors():
  """v1 stores zero − 1: a zero point of 0 would wrap to 2^bits − 1 (GPTQModel's v2 fixes it)."""
  from cdquant_jax.export import compressed_tensors, gptq  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  meta = common.QuantMeta(method="rtn", bits=4, group_size=32, flavor="gptq", sym=False,
                          d_out=32, d_in=64, k_pad=64, n_groups=2, n_groups_pad=2,
                          scale_format="f16", zero_format="f16")
  zero = np.full((32, 2), 5.0, np.float32)
  zero[3, 1] = 0.0
  g = common.LinearGrid(name="layers.0.mlp.up_proj",
                        codes=rng.integers(0, 16, (32, 64)).astype(np.int32),
                        scale=np.full((32, 2), 0.25, np.float32), zero=zero,
                        group_index=np.arange(64, dtype=np.int32) // 32, meta=meta)
  reason = gptq.why_not(g, ExportOptions())
  assert reason.startswith("zero point 0 at channel 3, group 1 (v1 stores zero − 1"), reason
  assert compressed_tensors.why_not(g, ExportOptions()) is None
