"""Real-size configs (Llama-2-7B, Llama-3-8B, Gemma-2-9B) without memory: `jax.eval_shape` of the
forward pass, parameter counts against the published totals, and every parameter name/shape
against transformers' own model built on the meta device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
    "use_cache": True, "vocab_size": 32000}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 16,
    "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
    "use_cache": True, "vocab_size": 256000}

# Published parameter totals (HF model cards / state dicts).
CASES = {"llama2-7b": (LLAMA2_7B, 6_738_415_616), "llama3-8b": (LLAMA3_8B, 8_030_261_248),
         "gemma2-9b": (GEMMA2_9B, 9_241_705_984)}


@pytest.mark.parametrize("name", list(CASES))
def test_eval_shape_and_param_count(name):
  hf_config, total = CASES[name]
  model = registry.model_from_hf_config(hf_config)
  shapes = model.param_shapes(jnp.bfloat16)
  n = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  assert n == total
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  logits = jax.eval_shape(model.forward, shapes, ids)
  assert logits.shape == (2, 16, hf_config["vocab_size"])
  assert logits.dtype == jnp.bfloat16


@pytest.mark.hf
@pytest.mark.parametrize("name", list(CASES))
def test_param_names_match_transformers(name):
  """Every tensor of transformers' model maps to one of our params with the same shape."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf_config, _ = CASES[name]
  config = transformers.AutoConfig.for_model(**hf_config)
  with torch.device("meta"):
    torch_model = transformers.AutoModelForCausalLM.from_config(config)
  model = registry.model_from_hf_config(hf_config)
  expected = {tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]}
  mapped = {}
  for hf_name, tensor in torch_model.state_dict().items():
    path = model.hf_name_to_path(hf_name)
    if path is not None:
      mapped[path] = tuple(tensor.shape)
  assert mapped == expected
