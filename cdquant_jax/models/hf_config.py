"""HF config.json -> `ModelConfig`, one parser per family, strict (penzai-style conversion).

`config_from_hf(d)` accepts what transformers 4 and 5 write (`rope_theta` / `rope_scaling` or
`rope_parameters`; `torch_dtype` or `dtype`). Every field a parser reads is marked as used; what
is left must be in `IGNORED` (fields that cannot change the inference function) or the parse
fails with `ModelLoadError` naming each leftover field and its value: a silently ignored field
would give a model that runs but computes something else. Imports go one way: this module uses
`config`, never the reverse.
"""

from __future__ import annotations

from typing import Any

from cdquant_jax.models.config import FULL, SLIDING, ModelConfig, RopeConfig
from cdquant_jax.models.errors import ModelLoadError

# What `save_pretrained` writes about the file itself, the task head or the torch runtime.
BOOKKEEPING = frozenset({
    "_attn_implementation_autoset", "_name_or_path", "architectures", "auto_map",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id", "dtype",
    "finetuning_task", "id2label", "is_decoder", "label2id", "model_type", "output_attentions",
    "output_hidden_states", "pad_token_id", "prefix", "pretraining_tp", "problem_type",
    "return_dict", "sep_token_id", "task_specific_params", "tf_legacy_loss", "tokenizer_class",
    "torch_dtype", "torchscript", "transformers_version", "use_bfloat16", "use_return_dict",
})
# Training only: dropout is off and initialisation is overwritten by the checkpoint.
TRAINING = frozenset({
    "activation_dropout", "attention_dropout", "dropout", "hidden_dropout", "init_std",
    "initializer_range", "layerdrop",
})
# Generation defaults (transformers 4 kept them in config.json; `GenerationConfig` fields).
GENERATION = frozenset({
    "_from_model_config", "assistant_confidence_threshold", "assistant_early_exit",
    "assistant_ensemble_weight", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "cache_config", "cache_implementation", "compile_config", "constraints",
    "continuous_batching_config", "disable_compile", "diversity_penalty", "do_sample",
    "dola_layers", "early_stopping", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
    "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "force_words_ids",
    "forced_bos_token_id", "forced_decoder_ids", "forced_eos_token_id", "guidance_scale",
    "is_assistant", "length_penalty", "low_memory", "max_cache_len", "max_length",
    "max_matching_ngram_size", "max_new_tokens", "max_time", "min_length", "min_new_tokens",
    "min_p", "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_logits", "output_scores",
    "penalty_alpha", "prefill_chunk_size", "prompt_lookup_num_tokens", "remove_invalid_values",
    "renormalize_logits", "repetition_penalty", "return_dict_in_generate", "return_legacy_cache",
    "sequence_bias", "speculation_type", "stop_strings", "suppress_tokens", "target_lookbehind",
    "temperature", "token_healing", "top_h", "top_k", "top_p", "typical_p", "use_cache", "use_mtp",
    "watermarking_config",
})
IGNORED = BOOKKEEPING | TRAINING | GENERATION
# Base-config fields that change the model unless they keep their default (the only value the
# decoders here implement): pruned heads, cross-attention, encoder-decoder wiring.
DEFAULT_ONLY = {"pruned_heads": {}, "add_cross_attention": False, "is_encoder_decoder": False,
                "tie_encoder_decoder": False}

_REQUIRED = object()
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings"}


class _Fields:
  """Reads fields of a HF config dict and remembers which ones were read."""

  def __init__(self, hf: dict[str, Any]):
    self.hf = hf
    self.used: set[str] = set()
    self.model_type = hf.get("model_type", "?")

  def get(self, *names: str, default: Any = _REQUIRED) -> Any:
    """The first present of `names` (aliases), else default; missing and required -> error."""
    self.used.update(names)
    for name in names:
      if name in self.hf and self.hf[name] is not None:
        return self.hf[name]
    if default is _REQUIRED:
      raise ModelLoadError(f"{self.model_type}: the config lacks required field {names[0]!r}")
    return default

  def expect(self, name: str, allowed: tuple[Any, ...]) -> None:
    """A field that must keep one of `allowed` values (others are not implemented)."""
    value = self.get(name, default=allowed[0])
    if value not in allowed:
      raise ModelLoadError(f"{self.model_type}: unsupported {name}={value!r} "
                           f"(supported: {allowed})")

  def finish(self) -> None:
    """Raises naming every field no parser read and `IGNORED` does not list, with its value."""
    leftover = sorted(set(self.hf) - self.used - IGNORED)
    if leftover:
      shown = ", ".join(f"{name}={_short_repr(self.hf[name])}" for name in leftover)
      raise ModelLoadError(f"{self.model_type}: unsupported config field(s) {shown}; "
                           "the model would silently differ from the checkpoint")


def _short_repr(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def parse(hf: dict[str, Any]) -> dict[str, Any]:
  """kwargs of `ModelConfig` for a HF config dict (see module docstring)."""
  model_type = hf.get("model_type")
  if model_type not in PARSERS:
    raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {sorted(PARSERS)}")
  f = _Fields(hf)
  kwargs = PARSERS[model_type](f)
  for name, default in DEFAULT_ONLY.items():
    f.expect(name, (default,))
  f.finish()
  return kwargs


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The `ModelConfig` of a HF config.json dict; ModelLoadError on anything not understood."""
  kwargs = parse(hf)
  try:
    return ModelConfig(**kwargs)
  except ValueError as e:  # ModelConfig.__post_init__: an inconsistent combination of fields
    raise ModelLoadError(str(e)) from e


def _token_ids(f: _Fields) -> dict[str, Any]:
  eos = f.get("eos_token_id", default=())
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  return {"bos_token_id": f.get("bos_token_id", default=None), "eos_token_ids": eos}


def _activation(f: _Fields, *names: str, default: str) -> str:
  name = f.get(*names, default=default)
  if name not in _ACTIVATIONS:
    raise ModelLoadError(f"{f.model_type}: unsupported activation {name!r} "
                         f"(supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _rope_from_dict(f: _Fields, d: dict[str, Any], theta: float | None, field: str
                    ) -> RopeConfig:
  """The RopeConfig of one rope dict (`field` names where it came from, for errors)."""
  unknown = sorted(set(d) - _ROPE_KEYS)
  if unknown:
    raise ModelLoadError(f"{f.model_type}: {field}: unsupported rope parameters {unknown} in {d}")
  kind = d.get("rope_type", d.get("type", "default"))
  if kind not in ("default", "linear", "llama3"):
    raise ModelLoadError(f"{f.model_type}: {field}: rope_type={kind!r} is not supported "
                         "(supported: default, linear, llama3)")
  rope = RopeConfig(theta=float(d.get("rope_theta") or theta or 10000.0), kind=kind)
  fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  present = {k: d[k] for k in fields if d.get(k) is not None}
  return RopeConfig(**{**rope.__dict__, **present})


def _normalized_rope(d: dict[str, Any] | None, theta: float | None = None) -> dict[str, Any]:
  """A rope dict with "type" spelled "rope_type" and the top-level theta folded in."""
  out = {("rope_type" if k == "type" else k): v for k, v in (d or {}).items() if v is not None}
  return {**out, "rope_theta": theta} if theta is not None else out


def _reject_disagreement(f: _Fields, old: dict[str, Any], old_name: str, new: dict[str, Any],
                         new_name: str) -> None:
  """Both spellings present (transformers 4 and 5 fields in one file) must say the same."""
  differ = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  if differ:
    raise ModelLoadError(f"{f.model_type}: {old_name} {old} disagrees with {new_name} {new} "
                         f"on {differ}")


def _ropes(f: _Fields) -> tuple[RopeConfig, RopeConfig | None]:
  """(rope of full layers, rope of sliding layers or None), from either spelling.

  transformers 4: rope_theta + rope_scaling (+ rope_local_base_freq, Gemma 3); transformers 5:
  rope_parameters, per layer type for Gemma 3. Where both are present they must agree.
  """
  f.expect("partial_rotary_factor", (1.0,))
  params = f.get("rope_parameters", default=None) or {}
  old_full = _normalized_rope(f.get("rope_scaling", default=None),
                              f.get("rope_theta", default=None))
  local_theta = f.get("rope_local_base_freq", default=None)
  old_local = _normalized_rope(None, local_theta)
  if params and set(params) <= {FULL, SLIDING}:
    _reject_disagreement(f, old_full, "rope_scaling/rope_theta", _normalized_rope(params[FULL]),
                         f"rope_parameters[{FULL!r}]")
    full = _rope_from_dict(f, {**old_full, **_normalized_rope(params[FULL])}, None,
                           f"rope_parameters[{FULL!r}]")
    if SLIDING not in params:
      return full, None
    _reject_disagreement(f, old_local, "rope_local_base_freq", _normalized_rope(params[SLIDING]),
                         f"rope_parameters[{SLIDING!r}]")
    return full, _rope_from_dict(f, {**old_local, **_normalized_rope(params[SLIDING])}, None,
                                 f"rope_parameters[{SLIDING!r}]")
  _reject_disagreement(f, old_full, "rope_scaling/rope_theta", _normalized_rope(params),
                       "rope_parameters")
  field = "rope_parameters" if params else "rope_scaling"
  full = _rope_from_dict(f, {**old_full, **_normalized_rope(params)}, None, field)
  local = RopeConfig(theta=float(local_theta)) if local_theta is not None else None
  return full, local


def _default_layer_types(f: _Fields, n: int) -> tuple[str, ...]:
  """Attention pattern when config.json has no `layer_types` (transformers 4 files)."""
  t = f.model_type
  if t == "mistral":
    return (SLIDING if f.get("sliding_window", default=None) else FULL,) * n
  if t == "qwen2":
    first_sliding = f.get("max_window_layers", default=n)
    sliding = f.get("use_sliding_window", default=False)
    return tuple(SLIDING if sliding and i >= first_sliding else FULL for i in range(n))
  if t == "gemma2":
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
  if t == "gemma3_text":
    pattern = f.get("sliding_window_pattern", "_sliding_window_pattern", default=6)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
  return (FULL,) * n


def _llama_like(f: _Fields) -> dict[str, Any]:
  """Llama 1/2/3, Mistral, Qwen2, SmolLM, Gemma 1/2/3."""
  t = f.model_type
  gemma = t.startswith("gemma")
  hidden = f.get("hidden_size")
  heads = f.get("num_attention_heads")
  n = f.get("num_hidden_layers")
  head_dim = f.get("head_dim", default=hidden // heads)
  rope, rope_local = _ropes(f)
  layer_types = tuple(f.get("layer_types", default=None) or _default_layer_types(f, n))
  f.get("use_sliding_window", "max_window_layers", "_sliding_window_pattern",
        "sliding_window_pattern", default=None)
  window = f.get("sliding_window", default=None)
  window = window if SLIDING in layer_types else None
  f.expect("use_bidirectional_attention", (False,))
  kwargs = dict(
      family="llama", model_type=t, vocab_size=f.get("vocab_size"), hidden_size=hidden,
      intermediate_size=f.get("intermediate_size"), num_layers=n, num_heads=heads,
      num_kv_heads=f.get("num_key_value_heads", default=heads), head_dim=head_dim,
      max_position_embeddings=f.get("max_position_embeddings", default=2048),
      norm_eps=float(f.get("rms_norm_eps", default=1e-6)),
      activation=_activation(f, *(("hidden_activation", "hidden_act") if gemma and t != "gemma"
                                  else ("hidden_act", "hidden_activation")),
                             default="gelu_pytorch_tanh" if gemma else "silu"),
      qkv_bias=bool(f.get("attention_bias", default=t == "qwen2")),
      mlp_bias=bool(f.get("mlp_bias", default=False)),
      tie_word_embeddings=bool(f.get("tie_word_embeddings", default=gemma)),
      rope=rope, rope_local=rope_local, layer_types=layer_types, sliding_window=window,
      query_scale=head_dim**-0.5, **_token_ids(f))
  kwargs["o_bias"] = kwargs["qkv_bias"] and t != "qwen2"
  if gemma:
    kwargs.update(norm_offset=1.0, embed_scale=hidden**0.5)
  if t in ("gemma2", "gemma3_text"):
    kwargs.update(post_norms=True, qk_norm=t == "gemma3_text",
                  query_scale=f.get("query_pre_attn_scalar", default=head_dim)**-0.5,
                  attn_softcap=f.get("attn_logit_softcapping", default=None),
                  final_softcap=f.get("final_logit_softcapping", default=None))
  return kwargs


def _opt(f: _Fields) -> dict[str, Any]:
  hidden = f.get("hidden_size")
  heads = f.get("num_attention_heads")
  n = f.get("num_hidden_layers")
  bias = bool(f.get("enable_bias", default=True))
  f.expect("layer_norm_elementwise_affine", (True,))
  pre_norm = bool(f.get("do_layer_norm_before", default=True))
  remove_final_norm = bool(f.get("_remove_final_layer_norm", default=False))
  proj = f.get("word_embed_proj_dim", default=hidden)
  return dict(
      family="opt", model_type="opt", vocab_size=f.get("vocab_size"), hidden_size=hidden,
      intermediate_size=f.get("ffn_dim"), num_layers=n, num_heads=heads, num_kv_heads=heads,
      head_dim=hidden // heads, max_position_embeddings=f.get("max_position_embeddings"),
      norm_kind="layer", norm_eps=1e-5, activation=_activation(f, "activation_function",
                                                               default="relu"),
      gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
      tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)),
      learned_positions=True, position_offset=2, layer_types=(FULL,) * n,
      query_scale=(hidden // heads)**-0.5, pre_norm=pre_norm,
      final_norm=pre_norm and not remove_final_norm,
      word_embed_proj_dim=proj if proj != hidden else None, **_token_ids(f))


def _falcon(f: _Fields) -> dict[str, Any]:
  hidden = f.get("hidden_size")
  heads = f.get("num_attention_heads", "n_head")
  n = f.get("num_hidden_layers", "n_layer")
  f.expect("alibi", (False,))
  f.expect("apply_residual_connection_post_layernorm", (False,))
  new_arch = bool(f.get("new_decoder_architecture", default=False))
  multi_query = bool(f.get("multi_query", default=True))
  parallel = bool(f.get("parallel_attn", default=True))
  kv = f.get("num_kv_heads", "n_head_kv", default=heads)
  if new_arch:
    layout, norms = "falcon_new", f.get("num_ln_in_parallel_attn", default=2)
    if not parallel:
      raise ModelLoadError("falcon: new_decoder_architecture=True with parallel_attn=False is "
                           "not supported")
  else:
    layout, norms = ("falcon_mq", 1) if multi_query else ("falcon_mha", 1)
    kv = 1 if multi_query else heads
    f.get("num_ln_in_parallel_attn", default=None)
  bias = bool(f.get("bias", default=False))
  rope, _ = _ropes(f)
  return dict(
      family="falcon", model_type="falcon", vocab_size=f.get("vocab_size"), hidden_size=hidden,
      intermediate_size=f.get("ffn_hidden_size", default=4 * hidden), num_layers=n,
      num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
      max_position_embeddings=f.get("max_position_embeddings", default=2048), norm_kind="layer",
      norm_eps=float(f.get("layer_norm_epsilon", default=1e-5)),
      activation=_activation(f, "activation", default="gelu"), gated_mlp=False, qkv_bias=bias,
      o_bias=bias, mlp_bias=bias, tie_word_embeddings=bool(f.get("tie_word_embeddings",
                                                                  default=True)),
      rope=rope, layer_types=(FULL,) * n, query_scale=(hidden // heads)**-0.5,
      qkv_layout=layout, parallel_attn=parallel, num_parallel_norms=norms, **_token_ids(f))


PARSERS = {"llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
           "gemma": _llama_like, "gemma2": _llama_like, "gemma3_text": _llama_like,
           "opt": _opt, "falcon": _falcon}
