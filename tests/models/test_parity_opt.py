"""OPT parity with transformers: learned positions (offset 2), LayerNorm, biases, tied head;
pre-norm (OPT-125m+) and post-norm (do_layer_norm_before=False) variants; KV-cache decoding."""

import pytest

from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

BASE = dict(vocab_size=91, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64)


def test_opt_prenorm_parity(tmp_path):
  torch_model = ref.build_torch_model("OPTConfig", "OPTForCausalLM", **BASE)
  ids = ref.random_ids(BASE["vocab_size"], length=10)
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  assert params["embed_positions"]["weight"].shape == (32 + 2, 64)
  assert "lm_head" not in params
  ref.assert_cache_matches_forward(model, params, ids, prefill=4)


def test_opt_postnorm_parity(tmp_path):
  torch_model = ref.build_torch_model("OPTConfig", "OPTForCausalLM", **BASE,
                                      do_layer_norm_before=False)
  ids = ref.random_ids(BASE["vocab_size"], length=10, seed=1)
  model, _ = ref.assert_parity(torch_model, tmp_path, ids)
  assert not model.config.pre_norm and not model.config.final_norm
