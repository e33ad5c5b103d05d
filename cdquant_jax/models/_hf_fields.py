"""HF config.json -> `ModelConfig` keyword arguments, one parser per family, strict.

Every field a parser reads is marked as used; what is left must be in `IGNORED` (fields that
cannot change the inference function: dropout, init, generation defaults, bookkeeping) or the
parse fails with the list of the leftovers.
"""

from __future__ import annotations

from typing import Any

from cdquant_jax.models.config import FULL, SLIDING, RopeConfig

IGNORED = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "init_std", "use_cache", "pad_token_id", "attention_dropout", "dropout", "hidden_dropout",
    "layerdrop", "activation_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "model_type", "tokenizer_class", "torchscript", "pretraining_tp", "auto_map",
    "prefix", "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
    "early_stopping", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "diversity_penalty", "num_beam_groups", "typical_p",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "decoder_start_token_id", "sep_token_id", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads",
    "finetuning_task", "tf_legacy_loss", "use_bfloat16", "task_specific_params",
    "cache_implementation", "max_position_embeddings",
})

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
      raise ValueError(f"{self.model_type}: config.json lacks required field {names[0]!r}")
    return default

  def expect(self, name: str, allowed: tuple[Any, ...]) -> None:
    """A field that must keep one of `allowed` values (others are not implemented)."""
    value = self.get(name, default=allowed[0])
    if value not in allowed:
      raise ValueError(f"{self.model_type}: unsupported {name}={value!r} (supported: {allowed})")

  def finish(self) -> None:
    leftover = sorted(set(self.hf) - self.used - IGNORED)
    if leftover:
      raise ValueError(f"{self.model_type}: unsupported config fields {leftover}; "
                       "the model would silently differ from the checkpoint")


def parse(hf: dict[str, Any]) -> dict[str, Any]:
  """kwargs of `ModelConfig` for a HF config dict (see module docstring)."""
  model_type = hf.get("model_type")
  parsers = {"llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
             "gemma": _llama_like, "gemma2": _llama_like, "gemma3_text": _llama_like,
             "opt": _opt, "falcon": _falcon}
  if model_type not in parsers:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(parsers)}")
  f = _Fields(hf)
  kwargs = parsers[model_type](f)
  f.finish()
  return kwargs


def _token_ids(f: _Fields) -> dict[str, Any]:
  eos = f.get("eos_token_id", default=())
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  return {"bos_token_id": f.get("bos_token_id", default=None), "eos_token_ids": eos}


def _activation(f: _Fields, *names: str, default: str) -> str:
  name = f.get(*names, default=default)
  if name not in _ACTIVATIONS:
    raise ValueError(f"{f.model_type}: unsupported activation {name!r}")
  return _ACTIVATIONS[name]


def _rope_from_dict(f: _Fields, d: dict[str, Any], theta: float | None) -> RopeConfig:
  unknown = sorted(set(d) - _ROPE_KEYS)
  if unknown:
    raise ValueError(f"{f.model_type}: unsupported rope parameters {unknown} in {d}")
  kind = d.get("rope_type", d.get("type", "default"))
  if kind not in ("default", "linear", "llama3"):
    raise ValueError(f"{f.model_type}: rope type {kind!r} is not supported "
                     "(supported: default, linear, llama3)")
  rope = RopeConfig(theta=float(d.get("rope_theta") or theta or 10000.0), kind=kind)
  fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  present = {k: d[k] for k in fields if d.get(k) is not None}
  return RopeConfig(**{**rope.__dict__, **present})


def _ropes(f: _Fields) -> tuple[RopeConfig, RopeConfig | None]:
  """(rope of full layers, rope of sliding layers or None), from either spelling."""
  if f.get("partial_rotary_factor", default=1.0) != 1.0:
    raise ValueError(f"{f.model_type}: partial_rotary_factor != 1 is not supported")
  params = f.get("rope_parameters", default=None)
  theta = f.get("rope_theta", default=None)
  scaling = f.get("rope_scaling", default=None)
  local_theta = f.get("rope_local_base_freq", default=None)
  if params and set(params) <= {FULL, SLIDING}:
    full = _rope_from_dict(f, params[FULL], theta)
    return full, _rope_from_dict(f, params[SLIDING], None) if SLIDING in params else None
  full = _rope_from_dict(f, {**(scaling or {}), **(params or {})}, theta)
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
  if f.get("use_bidirectional_attention", default=False):
    raise ValueError(f"{t}: use_bidirectional_attention is not supported")
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
      raise ValueError("falcon: new_decoder_architecture with parallel_attn=False is not supported")
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
