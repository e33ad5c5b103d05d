"""Perplexity of a (quantized) model on the configured evaluation sources."""

from __future__ import annotations

import gc

import jax
import numpy as np

from cdquant_jax import data
from cdquant_jax.eval.perplexity import perplexity_from_nll
from cdquant_jax.pipeline import capture, memory, weights
from cdquant_jax.pipeline.config import EvalSettings, check_token_hash


def limit_windows(ids: np.ndarray, seqlen: int, max_windows: int | None) -> np.ndarray:
  """The first max_windows · seqlen tokens of ids [1, N] (all of them when None)."""
  ids = np.asarray(ids).reshape(1, -1)
  return ids if max_windows is None else ids[:, :max_windows * seqlen]


def model_perplexity(model, params, ids, *, seqlen: int, batch_size: int,
                     progress: bool = False) -> dict:
  """GPTQ-protocol perplexity with the pipeline's block-by-block jitted forward.

  params: dense params (see `export.dense_params`), or lazy ones (`weights.LazyLayers`: each
  block read from the checkpoint for every batch). On an accelerator resident params are moved
  to the device once (lazy ones: the outer params); on the CPU backend a device copy would be
  a second full copy of the model in the same memory, so they stay where they are and each
  block is moved for its call.
  """
  if jax.default_backend() != "cpu":
    params = ({**jax.device_put(weights.outer(params)), "layers": params["layers"]}
              if weights.is_lazy(params) else jax.device_put(params))
  nll = capture.block_nll_fn(model, params)
  if weights.is_lazy(params):
    nll = _releasing(nll)
  result = perplexity_from_nll(nll, ids, seqlen=seqlen, batch_size=batch_size,
                               progress=progress)
  return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in result.items()}


def _releasing(nll):
  """nll (ids [B, T] -> [B]), then the memory its batch freed returned to the OS.

  With lazy params every batch reads (and frees) every block; glibc keeps the freed copies
  (`memory.release_freed`). On SmolLM2 (2 windows of 512 a batch) the RSS after each batch
  rose 440 -> 750 MiB over 5 batches without this, stayed at 406 MiB with a collection and a
  trim (a trim alone: 414 -> 507 MiB)."""
  def call(ids):
    out = jax.block_until_ready(nll(ids))
    gc.collect()
    memory.release_freed()
    return out
  return call


def evaluate_sources(settings: EvalSettings, model, params, tokenizer, *, default_seqlen: int,
                     progress: bool = False, expected: dict | None = None) -> dict[str, dict]:
  """{source: perplexity dict (+ seqlen, token_hash)} for every configured source.

  expected: {source: token hash} the windows must have (`RunConfig.token_hashes`); checked
  before the source is evaluated.
  """
  if settings.sources and tokenizer is None:
    raise ValueError(f"eval.sources={list(settings.sources)} needs a tokenizer; the model has none")
  seqlen = settings.seqlen or default_seqlen
  out = {}
  for source in settings.sources:
    ids = data.evaluation_ids(source, tokenizer, seqlen=seqlen, path=settings.paths.get(source))
    ids = limit_windows(ids, seqlen, settings.max_windows)
    check_token_hash(f"evaluation.{source}", data.token_hash(ids), (expected or {}).get(source))
    result = model_perplexity(model, params, ids, seqlen=seqlen, batch_size=settings.batch_size,
                              progress=progress)
    out[source] = {**result, "seqlen": seqlen, "token_hash": data.token_hash(ids)}
  return out
