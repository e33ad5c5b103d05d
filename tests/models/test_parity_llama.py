"""Llama-family parity with transformers: Llama (MHA/GQA/MQA, llama3 rope), Mistral (sliding
window), Qwen2 (qkv bias), SmolLM-style tied embeddings; KV-cache decoding == full forward."""

import numpy as np
import pytest

from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True), (1, False)],
                         ids=["mha-untied", "gqa-tied", "mqa-untied"])
def test_llama_parity(tmp_path, kv_heads, tied):
  torch_model = ref.build_torch_model("LlamaConfig", "LlamaForCausalLM", **BASE,
                                      num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  ids = ref.random_ids(BASE["vocab_size"])
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  assert ("lm_head" in params) == (not tied)
  if kv_heads == 2:
    ref.assert_cache_matches_forward(model, params, ids, prefill=5)


def test_llama3_rope_scaling_parity(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  torch_model = ref.build_torch_model("LlamaConfig", "LlamaForCausalLM", **BASE,
                                      num_key_value_heads=2, rope_parameters=rope,
                                      attention_bias=True, mlp_bias=True)
  ids = ref.random_ids(BASE["vocab_size"], length=20)
  model, _ = ref.assert_parity(torch_model, tmp_path, ids)
  assert model.config.rope.kind == "llama3"
  inv = model.config.rope.inv_freq(16)
  assert not np.allclose(inv, 500000.0 ** -(np.arange(0, 16, 2) / 16)), "scaling had no effect"


def test_mistral_sliding_window_parity(tmp_path):
  torch_model = ref.build_torch_model("MistralConfig", "MistralForCausalLM", **BASE,
                                      num_key_value_heads=2, sliding_window=5)
  ids = ref.random_ids(BASE["vocab_size"], length=14)
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  assert model.config.window_for_layer(0) == 5
  ref.assert_cache_matches_forward(model, params, ids, prefill=4)


def test_qwen2_qkv_bias_parity(tmp_path):
  torch_model = ref.build_torch_model("Qwen2Config", "Qwen2ForCausalLM", **BASE,
                                      num_key_value_heads=2, tie_word_embeddings=True)
  ids = ref.random_ids(BASE["vocab_size"])
  _, params = ref.assert_parity(torch_model, tmp_path, ids)
  attn = params["layers"][0]["self_attn"]
  assert "bias" in attn["q_proj"] and "bias" not in attn["o_proj"]
