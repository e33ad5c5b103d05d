"""GGUF in for the Gemma and Falcon architectures: a tiny GGUF written here the way llama.cpp's
converter writes it (gguf's own tensor-name map, the arch's metadata keys; Gemma norm weights
stored as 1 + w; Falcon's fused qkv rows reordered to [queries | keys | values]), loaded by
`registry.load_model` and compared with a reference's f32 logits.

gemma2, gemma3: transformers' own GGUF loader is the reference (its config from the metadata takes
query_pre_attn_scalar = 256 and, for Gemma 2, soft-caps 50 / 30 by default, so the tiny models
use those: head_dim 256, which is also what llama.cpp's 1/sqrt(head_dim) query scale means).
gemma: transformers has no GGUF loader for it; the source torch model is the reference.
falcon: transformers' GGUF loader is the reference for the 7B-style multi-query model (the only
layout it reads right: it neither undoes the qkv reorder nor maps the kv-head count, which are
no-ops there); for the new decoder architecture (40B-style two norms, 11B-style one norm with
grouped kv heads) transformers' GGUF loader fails on the qkv shape, so the source torch model is
the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry
from cdquant_jax.models.errors import ModelLoadError
from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf
gguf = pytest.importorskip("gguf")

GEMMA = dict(vocab_size=89, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             max_position_embeddings=64, rms_norm_eps=1e-6)
GEMMA2 = dict(GEMMA, head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, sliding_window=4, num_hidden_layers=3)
ARCH = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2}


def write_gguf(torch_model, arch: str, path) -> None:
  """torch_model as llama.cpp's converter writes a Gemma / Gemma 2 GGUF (F32 tensors)."""
  c = torch_model.config
  w = ref.gguf_writer(torch_model, arch, path, head_dims=True)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
  names = gguf.get_tensor_name_map(ARCH[arch], c.num_hidden_layers)
  for name, tensor in torch_model.state_dict().items():
    if name == "lm_head.weight":  # tied
      continue
    x = tensor.detach().float().numpy()
    base, kind = name.rsplit(".", 1)
    if name.endswith("norm.weight"):
      x = x + 1  # convert_hf_to_gguf.py GemmaModel / Gemma2Model
    w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _our_logits(path, ids):
  model, params, tok = registry.load_model(str(path), "float32")
  assert tok is None
  return model, np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))


def test_gemma2_gguf_matches_transformers_gguf_loader(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  source = ref.build_torch_model("Gemma2Config", "Gemma2ForCausalLM", **GEMMA2)
  write_gguf(source, "gemma2", tmp_path / "tiny.gguf")
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32,
      attn_implementation="eager").eval()
  ids = ref.random_ids(GEMMA2["vocab_size"], length=12)  # longer than the window
  model, got = _our_logits(tmp_path / "tiny.gguf", ids)
  c = model.config
  assert c.model_type == "gemma2" and c.post_norms and c.sliding_window == 4
  assert (c.attn_softcap, c.final_softcap, c.query_scale) == (50.0, 30.0, 256**-0.5)
  want = ref.torch_logits(reference, ids)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # and the GGUF is the source model (norms 1 + w round to f32)
  np.testing.assert_allclose(got, ref.torch_logits(source, ids), atol=1e-4, rtol=0)


def test_gemma_gguf_matches_the_source_model(tmp_path):
  source = ref.build_torch_model("GemmaConfig", "GemmaForCausalLM", **GEMMA)
  write_gguf(source, "gemma", tmp_path / "tiny.gguf")
  ids = ref.random_ids(GEMMA["vocab_size"])
  model, got = _our_logits(tmp_path / "tiny.gguf", ids)
  assert model.config.model_type == "gemma" and model.config.tie_word_embeddings
  want = ref.torch_logits(source, ids)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


GEMMA3 = dict(GEMMA, head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
              num_hidden_layers=6, rope_parameters={
                  "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def _close(writer) -> None:
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def write_gemma3_gguf(torch_model, path, layer_pattern: bool = False) -> None:
  """torch_model as llama.cpp's Gemma3Model converter writes it (F32 tensors, norms 1 + w);
  layer_pattern: also write attention.sliding_window_pattern, one is-sliding flag a layer."""
  c = torch_model.config
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  full_rope = c.rope_parameters["full_attention"]
  w.add_rope_freq_base(full_rope["rope_theta"])  # global layers
  if full_rope.get("rope_type", "default") == "linear":  # Gemma 3 4B+: global layers only
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(full_rope["factor"])
  w.add_sliding_window(c.sliding_window)
  if layer_pattern:
    w.add_sliding_window_pattern([kind == "sliding_attention" for kind in c.layer_types])
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_vocab_size(c.vocab_size)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
  for name, tensor in torch_model.state_dict().items():
    if name == "lm_head.weight":  # tied
      continue
    x = tensor.detach().float().numpy()
    base, kind = name.rsplit(".", 1)
    if name.endswith("norm.weight"):  # q_norm / k_norm too
      x = x + 1
    w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(x))
  _close(w)


def test_gemma3_gguf_matches_transformers_gguf_loader(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  source = ref.build_torch_model("Gemma3TextConfig", "Gemma3ForCausalLM", **GEMMA3)
  write_gemma3_gguf(source, tmp_path / "tiny.gguf")
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32,
      attn_implementation="eager").eval()
  ids = ref.random_ids(GEMMA3["vocab_size"], length=12)  # longer than the window
  model, got = _our_logits(tmp_path / "tiny.gguf", ids)
  c = model.config
  assert c.model_type == "gemma3_text" and c.qk_norm and c.post_norms and c.sliding_window == 4
  assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
  assert (c.rope.theta, c.rope_local.theta, c.query_scale) == (50000.0, 10000.0, 256**-0.5)
  assert c.attn_softcap is None and c.final_softcap is None
  want = ref.torch_logits(reference, ids)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, ref.torch_logits(source, ids), atol=1e-4, rtol=0)


def test_gemma3_gguf_linear_rope_scaling_matches_the_source_model(tmp_path):
  """Gemma 3 4B+ scale the global layers' rope linearly; transformers' GGUF loader drops the
  scaling keys, so the source model is the reference."""
  ropes = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 50000.0},
           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
  source = ref.build_torch_model("Gemma3TextConfig", "Gemma3ForCausalLM",
                                 **dict(GEMMA3, rope_parameters=ropes))
  write_gemma3_gguf(source, tmp_path / "tiny.gguf")
  ids = ref.random_ids(GEMMA3["vocab_size"], length=12)
  model, got = _our_logits(tmp_path / "tiny.gguf", ids)
  c = model.config
  assert (c.rope.kind, c.rope.factor, c.rope_local.kind) == ("linear", 8.0, "default")
  np.testing.assert_allclose(got, ref.torch_logits(source, ids), atol=1e-4, rtol=0)


def test_gemma3_gguf_layer_pattern_from_the_file_matches_the_source_model(tmp_path):
  layer_types = ["sliding_attention", "full_attention"] * 3
  source = ref.build_torch_model("Gemma3TextConfig", "Gemma3ForCausalLM",
                                 **dict(GEMMA3, layer_types=layer_types))
  write_gemma3_gguf(source, tmp_path / "tiny.gguf", layer_pattern=True)
  ids = ref.random_ids(GEMMA3["vocab_size"], length=12)
  model, got = _our_logits(tmp_path / "tiny.gguf", ids)
  assert model.config.layer_types == tuple(layer_types)
  np.testing.assert_allclose(got, ref.torch_logits(source, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,blocks,scalar", [("gemma3", 62, 64 // 2), ("gemma3", 26, 256),
                                                ("gemma2", 46, 64 // 2), ("gemma2", 42, 256)])
def test_gemma_27b_query_scale_follows_llama_cpp(arch, blocks, scalar):
  """llama.cpp: the 27B models (Gemma 2: 46 blocks, Gemma 3: 62) scale queries by
  1/sqrt(hidden / heads), the others by 1/sqrt(head_dim); GGUF metadata has neither."""
  from cdquant_jax.models import gguf_loader  # pylint: disable=import-outside-toplevel
  meta = {"general.architecture": arch, f"{arch}.embedding_length": 64,
          f"{arch}.block_count": blocks, f"{arch}.attention.head_count": 2,
          f"{arch}.attention.key_length": 256, f"{arch}.feed_forward_length": 96}
  hf = gguf_loader.hf_config_from_metadata(meta, {"token_embd.weight": (89, 64)}, "x.gguf")
  assert hf["query_pre_attn_scalar"] == scalar


FALCON = dict(vocab_size=89, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, alibi=False, parallel_attn=True, bias=False)
# name -> (FalconConfig fields, kv heads as llama.cpp's converter reads them)
FALCON_LAYOUTS = {
    "7b_multi_query": (dict(multi_query=True, new_decoder_architecture=False), 1),
    "40b_two_norms": (dict(new_decoder_architecture=True, num_kv_heads=2), 2),
    "11b_one_norm": (dict(new_decoder_architecture=True, num_kv_heads=2,
                          num_ln_in_parallel_attn=1), 2),
}


def _llama_cpp_falcon_qkv(w, n_head: int, n_head_kv: int):
  """convert_hf_to_gguf.py FalconModel.modify_tensors: HF's kv groups -> [q | k | v] rows."""
  import torch  # pylint: disable=import-outside-toplevel
  head_dim = w.shape[-1] // n_head
  qkv = w.view(n_head_kv, n_head // n_head_kv + 2, head_dim, w.shape[-1])
  q = qkv[:, :-2].reshape(n_head * head_dim, w.shape[-1])
  k = qkv[:, [-2]].reshape(n_head_kv * head_dim, w.shape[-1])
  v = qkv[:, [-1]].reshape(n_head_kv * head_dim, w.shape[-1])
  return torch.cat((q, k, v)).reshape_as(w)


def write_falcon_gguf(torch_model, n_head_kv: int, path, layout: str = "jploski") -> None:
  """torch_model as llama.cpp's FalconModel converter writes it (F32 tensors), with a
  placeholder vocabulary (transformers' GGUF loader takes vocab_size from its length)."""
  c = torch_model.config
  w = gguf.GGUFWriter(str(path), "falcon")
  w.add_context_length(2048)
  w.add_tensor_data_layout(layout)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(4 * c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(n_head_kv)
  w.add_layer_norm_eps(c.layer_norm_epsilon)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.FALCON, c.num_hidden_layers)
  for name, tensor in torch_model.state_dict().items():
    x = tensor.detach().float()
    if "query_key_value" in name:
      x = _llama_cpp_falcon_qkv(x, c.num_attention_heads, n_head_kv)
    base, kind = name.rsplit(".", 1)
    w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(x.numpy()))
  _close(w)


def _our_falcon_logits(path, ids):
  model, params, _ = registry.load_model(str(path), "float32", with_tokenizer=False)
  return model, np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))


def test_falcon_7b_gguf_matches_transformers_gguf_loader(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  fields, n_kv = FALCON_LAYOUTS["7b_multi_query"]
  source = ref.build_torch_model("FalconConfig", "FalconForCausalLM", **FALCON, **fields)
  write_falcon_gguf(source, n_kv, tmp_path / "tiny.gguf")
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32,
      attn_implementation="eager").eval()
  ids = ref.random_ids(FALCON["vocab_size"])
  model, got = _our_falcon_logits(tmp_path / "tiny.gguf", ids)
  c = model.config
  assert (c.model_type, c.qkv_layout, c.num_kv_heads, c.num_parallel_norms) == (
      "falcon", "falcon_mq", 1, 1)
  want = ref.torch_logits(reference, ids)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["40b_two_norms", "11b_one_norm"])
def test_falcon_new_architecture_gguf_matches_the_source_model(tmp_path, layout):
  fields, n_kv = FALCON_LAYOUTS[layout]
  source = ref.build_torch_model("FalconConfig", "FalconForCausalLM", **FALCON, **fields)
  write_falcon_gguf(source, n_kv, tmp_path / "tiny.gguf")
  ids = ref.random_ids(FALCON["vocab_size"])
  model, got = _our_falcon_logits(tmp_path / "tiny.gguf", ids)
  c = model.config
  norms = 2 if layout == "40b_two_norms" else 1
  assert (c.qkv_layout, c.num_kv_heads, c.num_parallel_norms) == ("falcon_new", 2, norms)
  want = ref.torch_logits(source, ids)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_falcon_gguf_with_another_qkv_layout_is_a_load_error(tmp_path):
  fields, n_kv = FALCON_LAYOUTS["7b_multi_query"]
  source = ref.build_torch_model("FalconConfig", "FalconForCausalLM", **FALCON, **fields)
  write_falcon_gguf(source, n_kv, tmp_path / "tiny.gguf", layout="interleaved")
  with pytest.raises(ModelLoadError, match=r"tiny\.gguf: falcon\.tensor_data_layout="
                                           r"'interleaved' is not supported"):
    registry.load_model(str(tmp_path / "tiny.gguf"), with_tokenizer=False)
