"""GGUF export, read back by `gguf`'s own reader and dequantizer and by this project's loader.

4-bit groups of 32 map onto Q4_1 (asymmetric: d = s, m = −s·z) and Q4_0 (symmetric), 5-bit
onto Q5_1, 8-bit symmetric onto Q8_0: `gguf.quants.dequantize` must give back this project's
dequantized weights, bit for bit for the symmetric types and within the float16 rounding of m
for Q4_1 / Q5_1. `registry.load_model(model.gguf)` (this project's GGUF loader, which undoes
llama.cpp's q/k row permutation) must give the run's logits on the same tokens, and its
tokenizer the same ids as the run's tokenizer.
"""

import dataclasses

import numpy as np
import pytest

from cdquant_jax.export import ExportError, export_model
from cdquant_jax.export import common
from cdquant_jax.models import registry
from cdquant_jax.pipeline import export
from tests.export import runs

pytestmark = pytest.mark.hf
gguf = pytest.importorskip("gguf")

# run -> GGML type of its quantized linears
EXACT = {"gptq-w4g32": "Q4_1", "gptq-w4g32-static-sym": "Q4_0", "rtn-w8g32-sym": "Q8_0",
         "cyclic-w5g32": "Q5_1", "cd-w4g32": "Q4_1"}
# Largest relative logit difference from the run allowed: f32 rounding for the symmetric
# types; the float16 rounding of m (relative 2^-11 of s·z per weight; 2.2e-3 seen on the tiny
# model) for the asymmetric ones. Against the run's model with gguf's dequantized weights put
# in, the loader must agree to f32 rounding for every type.
LOGIT_TOLERANCE = {"Q4_0": 1e-4, "Q8_0": 1e-4, "Q4_1": 5e-3, "Q5_1": 5e-3}


def _hf_rows(name: str, w: np.ndarray, config) -> np.ndarray:
  """Undo llama.cpp's permute(w, n_head) of attn_q / attn_k rows:
  w.reshape(n_head, 2, half, K).swapaxes(1, 2) in the converter."""
  if ".attn_q." in name or ".attn_k." in name:
    heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)
  return w


@pytest.mark.parametrize("name", list(EXACT))
def test_gguf_reader_gives_back_the_weights_and_our_loader_the_logits(run_dir, ids, tmp_path,
                                                                     name):
  rd = run_dir(name)
  export_model(rd, "gguf", str(tmp_path))
  path = str(tmp_path / "model.gguf")
  reader = gguf.GGUFReader(path)
  run = common.load_run(rd)
  assert reader.fields["general.architecture"].contents() == "llama"
  assert reader.fields["llama.block_count"].contents() == run.config.num_layers
  tensors = {t.name: t for t in reader.tensors}
  from_reader = {}  # dotted weight name -> gguf's dequantized weight, HF row order
  for module, g in common.decode_all(run).items():
    layer, rest = module.split(".")[1], ".".join(module.split(".")[2:])
    gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}[rest]
    t = tensors[f"blk.{layer}.{gname}.weight"]
    assert t.tensor_type.name == EXACT[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(g.codes.shape)
    w = _hf_rows(t.name, w.astype(np.float32), run.config)
    from_reader[f"{module}.weight"] = w
    want = g.dequantized()
    if EXACT[name] in ("Q4_1", "Q5_1"):  # m = f16(−s·z): within its rounding (+ f32 ops)
      sz = np.abs(g.scale * g.zero)[:, g.group_index]
      bound = sz * 2.0**-11 + 4 * np.finfo(np.float32).eps * (np.abs(want) + sz)
      assert (np.abs(w - want) <= bound).all(), module
    else:
      np.testing.assert_array_equal(w.view(np.uint32), want.view(np.uint32), module)
  model, params, tok = registry.load_model(path, "float32")
  # GGUF stores the norm epsilon as float32
  assert model.config == dataclasses.replace(run.config, norm_eps=float(np.float32(1e-5)))
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  err = runs.relative_error(got, runs.run_logits(rd, ids))
  assert err <= LOGIT_TOLERANCE[EXACT[name]], err
  flat = export.flatten(export.dense_params(run.params))
  flat.update({k: jnp.asarray(v) for k, v in from_reader.items()})
  substituted = export.unflatten_like(run.model, jnp.float32, flat, where="test")
  same_weights = np.asarray(jax.jit(run.model.forward)(substituted, jnp.asarray(ids)))
  assert runs.relative_error(got, same_weights) <= 1e-4
  text = "hello world 42<|endoftext|>"
  assert tok.encode(text).ids == run.tokenizer.encode(text).ids


def test_other_grids_are_refused_with_the_formats_that_hold_them(run_dir, tmp_path):
  with pytest.raises(ExportError, match=r"^layers\.0\.mlp\.down_proj: gguf cannot hold a "
                     r"per-channel grid \(GGUF blocks are groups of 32 columns\); export it "
                     r"as gptq or compressed-tensors or gguf with gguf_dense_fallback"):
    export_model(run_dir("rtn-w4-perchannel"), "gguf", str(tmp_path / "o"))


def test_dense_fallback_is_exact_f32(run_dir, ids, tmp_path):
  rd = run_dir("bcd-w2g32")
  summary = export_model(rd, "gguf", str(tmp_path),
                         common.ExportOptions(gguf_dense_fallback=True))
  assert len(summary["details"]["dense_fallback"]) == 14
  reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
  assert reader.fields["cdquant.dense_fallback"].contents()[0] == "layers.0.mlp.down_proj"
  model, params, _ = registry.load_model(str(tmp_path / "model.gguf"), "float32")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  assert runs.relative_error(got, runs.run_logits(rd, ids)) <= 1e-4
