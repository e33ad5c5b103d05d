"""Quantized run directories of a tiny random Llama, built in the test (no pipeline run).

`tiny_llama(tmp)` saves a random transformers Llama (hf_reference weights: O(1) logits);
`quantized_run(...)` loads it with `registry.load_model`, solves every block linear with a
method on a random Hessian, packs it and writes the run directory with `write_model_dir`
(a run_config.json with the knobs, as `cdquant quantize` writes)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax.models import params as params_lib
from cdquant_jax.models import registry
from cdquant_jax.pipeline import export
from cdquant_jax.quant.qweight import pack_result
from cdquant_jax.solvers import api
from tests.models import hf_reference as ref

# Every linear dimension a multiple of 32 (GPTQ packing) and of the GGUF block.
TINY_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)

# name -> (method, knobs): the runs the round-trip tests export. Groups of 32 throughout so
# the GGUF blocks apply where the bits do.
RUNS = {
    "gptq-w4g32": ("gptq", dict(bits=4, group_size=32)),
    "gptq-w3g32-actorder": ("gptq", dict(bits=3, group_size=32, act_order=True)),
    "gptq-w4g32-static-sym": ("gptq", dict(bits=4, group_size=32, act_order=True,
                                           static_groups=True, sym=True)),
    "rtn-w8g32-sym": ("rtn", dict(bits=8, group_size=32, sym=True)),
    "rtn-w4-perchannel": ("rtn", dict(bits=4, group_size=-1)),
    "cd-w4g32": ("cd", dict(bits=4, group_size=32)),
    "bcd-w2g32": ("bcd", dict(bits=2, group_size=32)),
    "cyclic-w5g32": ("cyclic", dict(bits=5, group_size=32)),
}


def byte_level_tokenizer():
  """A tiny byte-level BPE tokenizer (41 ids < the model's 96): letters, digits, "Ġ", three
  merges and one special token."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + ["Ġ"]
  merges = [("h", "e"), ("l", "l"), ("Ġ", "w")]
  vocab = {t: i for i, t in enumerate(chars + ["".join(m) for m in merges])}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
  return tok


def tiny_llama(directory, **overrides):
  """(torch model, directory) of a random LlamaForCausalLM saved with save_pretrained, with a
  tokenizer.json."""
  torch_model = ref.build_torch_model("LlamaConfig", "LlamaForCausalLM",
                                      **{**TINY_LLAMA, **overrides})
  torch_model.save_pretrained(str(directory))
  byte_level_tokenizer().save(os.path.join(str(directory), "tokenizer.json"))
  return torch_model, str(directory)


def _hessian(rng, d_in: int) -> np.ndarray:
  X = rng.normal(size=(4 * d_in, d_in)).astype(np.float32) * rng.uniform(0.5, 2, d_in)
  return (2 * X.T @ X / X.shape[0]).astype(np.float32)


def quantized_run(checkpoint: str, out: str, method: str = "gptq", *, fp16_stats: bool = True,
                  only=None, knobs_for=None, seed: int = 0, set_fields=(), **knobs) -> str:
  """Writes a run directory of `checkpoint` quantized with `method` and `knobs`; returns it.

  only: module-name predicate (the others stay dense); knobs_for: module name -> knobs that
  replace `knobs` for it (mixed schemes); set_fields: extra "path=value" config overrides of
  the method's config.
  """
  model, params, tok = registry.load_model(checkpoint, "float32")
  rng = np.random.default_rng(seed)
  cfg = api.default_config(method)
  overrides = [f"grid.fp16_stats={str(fp16_stats).lower()}", *set_fields]
  cfg = config_lib.apply_overrides(cfg, overrides)
  qweights = {}
  for i in range(model.num_layers):
    for path in model.linear_paths():
      name = f"layers.{i}.{'.'.join(path)}"
      if only is not None and not only(name):
        continue
      full = ("layers", i) + tuple(path) + ("weight",)
      W = np.asarray(params_lib.get_path(params, full), np.float32)
      result = api.solve(method, jnp.asarray(W), jnp.asarray(_hessian(rng, W.shape[1])), cfg,
                         layer=name, **(knobs_for(name) if knobs_for else knobs))
      qweights[name] = pack_result(result)
      params = params_lib.set_path(params, full, jnp.asarray(result.Q))
  os.makedirs(out, exist_ok=True)
  run_config = {"quant": {"method": method, "knobs": dict(knobs), "true_sequential": True}}
  export.write_model_dir(out, model, params, qweights, tokenizer=tok)
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(out, export.RUN_CONFIG_FILE), "w") as f:
    json.dump(run_config, f)
  return out


def run_logits(run_dir: str, ids: np.ndarray) -> np.ndarray:
  """This project's f32 logits of the run directory (dequantized weights)."""
  import jax  # pylint: disable=import-outside-toplevel
  model, params, _ = export.load_quantized_model(run_dir)
  return np.asarray(jax.jit(model.forward)(export.dense_params(params), jnp.asarray(ids)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  """max |got − want| / max |want| (the reference must have O(1) logits)."""
  scale = float(np.max(np.abs(want)))
  assert scale > 1.0, f"reference logits too small to be a meaningful test ({scale})"
  return float(np.max(np.abs(got - want))) / scale


def torch_model_from_dense(config_json: dict, state: dict):
  """A transformers model (f32, eager) from a config.json dict (quantization_config dropped)
  and a dense {HF name: array} state dict, loaded strictly (a tied lm_head may be absent)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config = dict(config_json)
  config.pop("quantization_config", None)
  hf_config = transformers.AutoConfig.for_model(**config)
  hf_config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32).eval()
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  tied = ["lm_head.weight"] if config.get("tie_word_embeddings") else []
  assert missing == tied and not unexpected, (missing, unexpected)
  return model
