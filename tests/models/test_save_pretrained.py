"""Directories written by transformers' own `save_pretrained` load for every supported family.

Each family's tiny random torch model is saved once (with the bookkeeping a real checkpoint
carries: architectures, token ids, label maps, use_cache, the dtype, generation_config.json),
loaded with `registry.load_model` and compared with the torch logits in f32. Bookkeeping and
generation fields of older files are accepted without changing the config; fields that change
the computation are rejected with the file, the field and its value.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.hf_config import config_from_hf
from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf

_LLAMA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5)
_GEMMA = dict(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64)
# family -> (config class, model class, config kwargs); sequences (12 tokens) are longer than
# every sliding window so the window matters.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "smollm-tied": ("LlamaConfig", "LlamaForCausalLM", {**_LLAMA, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_LLAMA, "sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_LLAMA, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_GEMMA, "num_key_value_heads": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_GEMMA, "sliding_window": 4, "query_pre_attn_scalar": 24,
                "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**_GEMMA, "sliding_window": 3, "query_pre_attn_scalar": 16,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=91, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=83, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, alibi=False, new_decoder_architecture=True,
                    num_kv_heads=2)),
}
# Set on the config after the model is built (the forward pass stays the same), then saved.
RUNTIME_BOOKKEEPING = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"},
                           label2id={"NEGATIVE": 0, "POSITIVE": 1},
                           problem_type="single_label_classification")
# What transformers 4 wrote into config.json next to the architecture (PretrainedConfig fields
# and generation defaults); none of it changes the logits.
TRANSFORMERS4_FIELDS = {
    "_name_or_path": "someone/tiny-model", "transformers_version": "4.44.2",
    "torch_dtype": "float32", "return_dict": True, "output_attentions": False,
    "output_hidden_states": False, "torchscript": False, "use_bfloat16": False,
    "tf_legacy_loss": False, "pruned_heads": {}, "tie_encoder_decoder": False,
    "is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
    "cross_attention_hidden_size": None, "chunk_size_feed_forward": 0, "finetuning_task": None,
    "tokenizer_class": None, "prefix": None, "sep_token_id": None,
    "decoder_start_token_id": None, "task_specific_params": None, "max_length": 20,
    "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "initializer_range": 0.02, "attention_dropout": 0.0,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (torch model, directory written by its save_pretrained)."""
  out = {}
  for family, (config_class, model_class, kwargs) in FAMILIES.items():
    torch_model = ref.build_torch_model(config_class, model_class, **kwargs)
    torch_model.config.update(RUNTIME_BOOKKEEPING)
    torch_model.config.architectures = [model_class]
    directory = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(str(directory))
    out[family] = torch_model, directory
  return out


def _config_json(directory) -> dict:
  return json.loads((directory / "config.json").read_text())


def _write_config_json(directory, config: dict) -> None:
  (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_logits_match_torch(saved, family):
  torch_model, directory = saved[family]
  written = _config_json(directory)
  assert {"architectures", "transformers_version", "pad_token_id", "id2label"} <= set(written)
  assert "dtype" in written or "torch_dtype" in written
  model, params, _ = registry.load_model(str(directory))
  ids = ref.random_ids(model.config.vocab_size)
  expected = ref.torch_logits(torch_model, ids)
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  assert np.max(np.abs(expected)) > 1.0, "reference logits too small to be a meaningful test"
  np.testing.assert_allclose(got, expected, atol=ref.ATOL, rtol=0)
  assert model.config.eos_token_ids == (2,) and model.config.bos_token_id == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers4_bookkeeping_does_not_change_the_config(saved, family):
  written = _config_json(saved[family][1])
  assert config_from_hf({**written, **TRANSFORMERS4_FIELDS}) == config_from_hf(written)


def test_every_generation_config_field_is_accepted(saved):
  import transformers  # pylint: disable=import-outside-toplevel
  written = _config_json(saved["llama"][1])
  generation = transformers.GenerationConfig().to_dict()
  generation.update({k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
  assert config_from_hf({**written, **generation}) == config_from_hf(written)


# (family, field, value, how the error shows it)
REJECTED = [
    ("llama", "quantization_config", {"quant_method": "gptq", "bits": 4},
     "quantization_config={'quant_method': 'gptq', 'bits': 4}"),
    ("llama", "attn_logit_softcapping", 30.0, "attn_logit_softcapping=30.0"),  # Gemma 2 only
    ("qwen2", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'rope_type': 'yarn'"),
    ("mistral", "partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
    ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention=True"),
    ("opt", "pruned_heads", {"0": [1]}, "pruned_heads={'0': [1]}"),
    ("falcon", "alibi", True, "alibi=True"),
]


@pytest.mark.parametrize("family,field,value,shown", REJECTED, ids=[r[1] for r in REJECTED])
def test_computation_changing_field_is_rejected(saved, tmp_path, family, field, value, shown):
  saved[family][0].save_pretrained(str(tmp_path))
  _write_config_json(tmp_path, {**_config_json(tmp_path), field: value})
  with pytest.raises(ModelLoadError) as info:
    registry.load_model(str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"{tmp_path / 'config.json'}: ")
  assert field in message and shown in message, message
