"""GGUF in for the Gemma architectures: a tiny GGUF written here the way llama.cpp's converter
writes it (gguf's own tensor-name map, norm weights stored as 1 + w, the arch's metadata keys),
loaded by `registry.load_model` and compared with a reference's f32 logits.

gemma2: transformers' own GGUF loader is the reference (its config from the metadata takes
query_pre_attn_scalar = 256 and soft-caps 50 / 30 by default, so the tiny model uses those:
head_dim 256, which is also what llama.cpp's 1/sqrt(head_dim) query scale means).
gemma: transformers has no GGUF loader for it; the source torch model is the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry
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
