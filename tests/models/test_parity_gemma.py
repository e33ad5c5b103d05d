"""Gemma 1/2/3 parity with transformers (eager attention): scaled embeddings, (1 + w) RMSNorm,
GeGLU, Gemma-2 soft-capping + query_pre_attn_scalar + alternating sliding window (sequence longer
than the window), Gemma-3 qk-norm + local/global rope bases + linear rope scaling."""

import pytest

from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

BASE = dict(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)


def test_gemma1_mqa_parity(tmp_path):
  torch_model = ref.build_torch_model("GemmaConfig", "GemmaForCausalLM", **BASE,
                                      num_key_value_heads=1)
  ids = ref.random_ids(BASE["vocab_size"])
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  assert model.config.embed_scale == pytest.approx(48**0.5)
  assert "lm_head" not in params  # tied


def test_gemma2_softcap_sliding_parity(tmp_path):
  torch_model = ref.build_torch_model(
      "Gemma2Config", "Gemma2ForCausalLM", **{**BASE, "num_hidden_layers": 3},
      num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=24,
      attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
  ids = ref.random_ids(BASE["vocab_size"], length=13)
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  c = model.config
  assert [c.window_for_layer(i) for i in range(3)] == [4, None, 4]
  assert len(params["layers"][0]) == 6  # 4 norms + attention + mlp
  ref.assert_cache_matches_forward(model, params, ids, prefill=6)


def test_gemma3_qknorm_local_global_parity(tmp_path):
  rope = {"full_attention": {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
  torch_model = ref.build_torch_model(
      "Gemma3TextConfig", "Gemma3ForCausalLM", **{**BASE, "num_hidden_layers": 3},
      num_key_value_heads=2, sliding_window=3, query_pre_attn_scalar=16,
      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
      rope_parameters=rope)
  ids = ref.random_ids(BASE["vocab_size"], length=11)
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  c = model.config
  assert c.qk_norm and c.rope_for_layer(0).theta == 100.0 and c.rope_for_layer(2).factor == 4.0
  ref.assert_cache_matches_forward(model, params, ids, prefill=4)
