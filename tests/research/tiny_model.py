"""A tiny random Llama written as a HF directory (config.json, model.safetensors,
tokenizer.json: one word-level token per id), calibration and evaluation texts of random words
(long enough, > 64 KiB, for the tokenization cache), and run configs for it."""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from cdquant_jax.models import registry
from cdquant_jax.pipeline import export

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61, "tie_word_embeddings": False}
SEQLEN = 16
WORDS = 20000


def write_model_dir(directory: str) -> str:
  """config.json + model.safetensors (HF names) + tokenizer.json of a tiny random Llama."""
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  tensors = {(n if n.startswith("lm_head") else f"model.{n}"): np.asarray(v, np.float32)
             for n, v in export.flatten(params).items()}
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(TINY, f)
  vocab = {f"w{i}": i for i in range(TINY["vocab_size"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, "tokenizer.json"))
  return directory


def write_text(path: str, seed: int) -> str:
  words = np.random.default_rng(seed).integers(0, TINY["vocab_size"], WORDS)
  with open(path, "w") as f:
    f.write(" ".join(f"w{i}" for i in words))
  return path


def write_fixture(root) -> dict:
  """{model, calibration, evaluation}: paths of the tiny model and its two texts under root."""
  root = str(root)
  return dict(model=write_model_dir(os.path.join(root, "tiny_llama")),
              calibration=write_text(os.path.join(root, "calibration.txt"), 1),
              evaluation=write_text(os.path.join(root, "evaluation.txt"), 2))


def run_dict(fixture: dict, **quant) -> dict:
  """A run config mapping: GPTQ 3 bits in groups of 16, 24 x 16 calibration tokens from the
  text file, perplexity on 8 windows of the evaluation text."""
  return {"model": {"path": fixture["model"]},
          "calibration": {"source": "text", "path": fixture["calibration"], "nsamples": 24,
                          "seqlen": SEQLEN},
          "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}, **quant},
          "eval": {"sources": ["text"], "paths": {"text": fixture["evaluation"]},
                   "max_windows": 8, "baseline": True},
          "forward_batch_size": 8}
