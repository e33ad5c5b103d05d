"""Tiny random transformers (torch) models as the reference for the JAX models' parity tests.

Weights are re-drawn with O(1)-scale statistics (HF's init gives logits ~0, which would make any
parity test pass trivially): linear weights and embeddings N(0, 1/shape[1]), biases N(0, 0.1),
norm weights 1 + N(0, 0.1) (Gemma stores the weight as an offset from 1: N(0, 0.1)).
"""

from __future__ import annotations

import math

import numpy as np

import jax
import jax.numpy as jnp

from cdquant_jax.models import registry

ATOL = 1e-5


def build_torch_model(config_class: str, model_class: str, seed: int = 0, **config_kwargs):
  """A random transformers model from a small config, eager attention, f32, eval mode."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  config = getattr(transformers, config_class)(**config_kwargs)
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = getattr(transformers, model_class)(config).eval().to(torch.float32)
  gemma = config.model_type.startswith("gemma")
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 2:
        p.copy_(noise / math.sqrt(p.shape[1]))
      elif "norm" in name or "ln_" in name or "layer_norm" in name:
        p.copy_(noise * 0.1 + (0.0 if gemma or name.endswith("bias") else 1.0))
      else:
        p.copy_(noise * 0.1)
  return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def save_and_load(torch_model, tmp_path, dtype=jnp.float32):
  """save_pretrained to tmp_path, then our load_model; returns (model, params, tokenizer)."""
  torch_model.save_pretrained(str(tmp_path))
  return registry.load_model(str(tmp_path), dtype=dtype)


def random_ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


def assert_parity(torch_model, tmp_path, ids: np.ndarray, atol: float = ATOL):
  """Loads the saved torch model with our loader and compares f32 logits (max abs)."""
  model, params, _ = save_and_load(torch_model, tmp_path)
  expected = torch_logits(torch_model, ids)
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  err = float(np.max(np.abs(got - expected)))
  scale = float(np.max(np.abs(expected)))
  assert scale > 1.0, f"reference logits too small to be a meaningful test ({scale})"
  assert err <= atol, f"max |logits - torch| = {err:.3g} (logit scale {scale:.3g})"
  return model, params


def assert_cache_matches_forward(model, params, ids: np.ndarray, prefill: int,
                                 atol: float = 2e-5):
  """Prefill `prefill` tokens into a KV cache, decode the rest one by one: same logits."""
  full = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  cache = model.init_cache(ids.shape[0], ids.shape[1] + 3)
  step = jax.jit(model.decode_step)
  logits, cache = step(params, jnp.asarray(ids[:, :prefill]), cache)
  pieces = [np.asarray(logits)]
  for t in range(prefill, ids.shape[1]):
    logits, cache = step(params, jnp.asarray(ids[:, t:t + 1]), cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=atol, rtol=0)
  assert int(cache[0]["end"]) == ids.shape[1]


def gguf_writer(torch_model, arch: str, path, *, head_dims: bool = False):
  """A `gguf.GGUFWriter` for `arch` at `path` with the header keys llama.cpp's converter writes
  for a Llama-like transformers model (head_dims: also key/value length and vocab size)."""
  import gguf  # pylint: disable=import-outside-toplevel
  c = torch_model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  if head_dims:
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if head_dims:
    w.add_vocab_size(c.vocab_size)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  return w
