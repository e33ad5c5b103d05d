"""Falcon parity with transformers: fused query_key_value split after the linear, for the new
decoder architecture (GQA, 2 parallel norms), the old multi-query layout (1 norm, parallel) and
the MHA layout with sequential attention -> MLP; KV-cache decoding."""

import pytest

from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

BASE = dict(vocab_size=83, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, alibi=False)
CASES = {
    "new-gqa": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False),
    "mq-parallel": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                        bias=True),
    "mha-sequential": dict(new_decoder_architecture=False, multi_query=False,
                           parallel_attn=False, bias=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_parity(tmp_path, case):
  torch_model = ref.build_torch_model("FalconConfig", "FalconForCausalLM", **BASE, **CASES[case])
  ids = ref.random_ids(BASE["vocab_size"], length=9)
  model, params = ref.assert_parity(torch_model, tmp_path, ids)
  assert model.block_linears()[0] == [("self_attention", "query_key_value")]
  if case == "new-gqa":
    assert "ln_attn" in params["layers"][0]
    ref.assert_cache_matches_forward(model, params, ids, prefill=3)
