"""lm-evaluation-harness adapter: `JaxLM(logits_fn, tokenizer, max_length, batch_size)`.

`JaxLM` subclasses `lm_eval.api.model.LM` when `lm_eval` is importable (an
optional dependency) and plain `object` otherwise; its scoring lives in the
plain functions below, which follow lm-eval's `HFLM` conventions:

- `encode_pair`: trailing whitespace of the context moves to the continuation;
  the continuation ids are `encode(context + continuation)[len(encode(context)):]`;
  an empty context becomes `[prefix_token_id]`. Special tokens are off unless
  `add_bos_token=True`.
- `score_pairs`: input = `(context + continuation)[-(max_length + 1):][:-1]`
  (left truncation), log-probabilities of the continuation tokens from the last
  `len(continuation)` positions, in float32; `is_greedy` = every continuation
  token is the argmax.
- `rolling_pairs`: lm-eval `get_rolling_token_windows(context_len=1)` +
  `make_disjoint_window`: disjoint chunks of up to `max_length` predicted tokens,
  each conditioned on up to `max_length` preceding tokens (the first on the
  prefix token).
- `greedy_generate`: argmax decoding until `max_gen_toks`, EOS, or a stop string.

`logits_fn(ids [B, T] int32) -> [B, T, V]` must be causal: inputs are
right-padded, so padding never influences scored positions. Batches always have
B == batch_size and T a power of two (>= 16) capped at max_length, to bound
recompilation.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.data.tokenize import as_encoder

try:
  from lm_eval.api.model import LM as _LMBase  # pylint: disable=g-import-not-at-top
except ImportError:  # optional dependency
  _LMBase = object

MIN_BUCKET = 16


@jax.jit
def _target_logprobs(logits: jax.Array, targets: jax.Array):
  """Per-position log p(target) and argmax match, in float32.

  Args:
    logits: [B, T, V]; targets: [B, T] (the token that follows each position).
  Returns:
    ([B, T] float32 log-probabilities, [B, T] bool argmax == target).
  """
  logits = logits.astype(jnp.float32)
  log_normaliser = jax.nn.logsumexp(logits, axis=-1)
  # [B, T, 1] -> [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - log_normaliser, jnp.argmax(logits, axis=-1) == targets


def bucket_length(length: int, max_length: int) -> int:
  """Smallest power of two >= length (at least MIN_BUCKET), capped at max_length."""
  bucket = MIN_BUCKET
  while bucket < length:
    bucket *= 2
  return max(min(bucket, max_length), length)


def encode_pair(encode, context: str, continuation: str,
                prefix_token_id: int | None) -> tuple[list[int], list[int]]:
  """lm-eval `_encode_pair` (+ empty-context prefix token)."""
  if context == "":
    if prefix_token_id is None:
      raise ValueError("empty context needs a prefix_token_id (BOS or EOS) to condition on")
    return [int(prefix_token_id)], [int(i) for i in encode(continuation)]
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = [int(i) for i in encode(context + continuation)]
  context_ids = [int(i) for i in encode(context)]
  return context_ids, whole[len(context_ids):]


def score_pairs(logits_fn: Callable, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                max_length: int, batch_size: int = 1, pad_id: int = 0) -> list[tuple[float, bool]]:
  """(sum log p(continuation | context), is_greedy) for each (context, continuation) pair."""
  prepared = []
  for index, (context, continuation) in enumerate(pairs):
    if len(continuation) == 0:
      raise ValueError(f"request {index}: empty continuation")
    if len(continuation) > max_length:
      raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds "
                       f"max_length={max_length}")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    prepared.append((index, whole, len(continuation)))
  # Longest first (as lm-eval) so that batches share a bucket.
  prepared.sort(key=lambda item: -len(item[1]))
  results: list = [None] * len(prepared)
  for start in range(0, len(prepared), batch_size):
    chunk = prepared[start:start + batch_size]
    width = bucket_length(max(len(whole) - 1 for _, whole, _ in chunk), max_length)
    inputs = np.full((batch_size, width), pad_id, np.int32)
    targets = np.full((batch_size, width), pad_id, np.int32)
    for row, (_, whole, _) in enumerate(chunk):
      inputs[row, :len(whole) - 1] = whole[:-1]
      targets[row, :len(whole) - 1] = whole[1:]
    logits = logits_fn(jnp.asarray(inputs))
    logprobs, greedy = (np.asarray(a) for a in _target_logprobs(logits, jnp.asarray(targets)))
    for row, (index, whole, n_cont) in enumerate(chunk):
      end = len(whole) - 1
      span = slice(end - n_cont, end)
      results[index] = (float(np.sum(logprobs[row, span], dtype=np.float64)),
                        bool(np.all(greedy[row, span])))
  return results


def rolling_pairs(ids: Sequence[int], prefix_token_id: int,
                  max_length: int) -> list[tuple[list[int], list[int]]]:
  """Disjoint (context, continuation) windows covering every token of `ids` once."""
  ids = [int(i) for i in ids]
  if not ids:
    return []
  first = min(max_length, len(ids))
  pairs = [([int(prefix_token_id)], ids[:first])]
  predicted = first
  while predicted < len(ids):
    n_pred = min(len(ids) - predicted, max_length)
    end = predicted + n_pred
    window_input = ids[max(0, end - max_length - 1):end - 1]
    pairs.append((window_input[:len(window_input) - (n_pred - 1)], ids[end - n_pred:end]))
    predicted = end
  return pairs


def greedy_generate(logits_fn: Callable, context_ids: Sequence[int], *, max_length: int,
                    max_gen_toks: int, decode: Callable, stop: Sequence[str] = (),
                    eos_token_id: int | None = None, pad_id: int = 0) -> str:
  """Argmax continuation of `context_ids`, cut at the first stop string."""
  ids = [int(i) for i in context_ids][-max(1, max_length - max_gen_toks):]
  generated: list[int] = []
  for _ in range(max_gen_toks):
    window = (ids + generated)[-max_length:]
    width = bucket_length(len(window), max_length)
    inputs = np.full((1, width), pad_id, np.int32)
    inputs[0, :len(window)] = window
    logits = logits_fn(jnp.asarray(inputs))
    token = int(jnp.argmax(logits[0, len(window) - 1]))
    if eos_token_id is not None and token == eos_token_id:
      break
    generated.append(token)
    text = decode(generated)
    if any(s and s in text for s in stop):
      break
  return cut_at_stop(decode(generated) if generated else "", stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  for s in stop:
    if s and s in text:
      text = text.split(s, 1)[0]
  return text


def multiple_choice(loglikelihood: Callable, items: Sequence[dict]) -> dict:
  """acc / acc_norm of items {"context", "choices", "answer"} (lm-eval definitions).

  `loglikelihood(list of (context, continuation)) -> list of (logprob, greedy)`;
  acc_norm divides each choice's log-probability by its length in characters.
  """
  requests = [(item["context"], choice) for item in items for choice in item["choices"]]
  scores = [lp for lp, _ in loglikelihood(requests)]
  correct = correct_norm = 0
  offset = 0
  for item in items:
    n = len(item["choices"])
    item_scores = np.asarray(scores[offset:offset + n])
    lengths = np.asarray([len(c) for c in item["choices"]], dtype=np.float64)
    correct += int(np.argmax(item_scores) == item["answer"])
    correct_norm += int(np.argmax(item_scores / lengths) == item["answer"])
    offset += n
  return dict(acc=correct / len(items), acc_norm=correct_norm / len(items), n=len(items))


def _args(request):
  return tuple(getattr(request, "args", request))


class JaxLM(_LMBase):
  """lm-eval model over a JAX `logits_fn` (see module docstring for conventions)."""

  def __init__(self, logits_fn: Callable, tokenizer, max_length: int = 2048, batch_size: int = 1,
               *, prefix_token_id: int | None = None, eos_token_id: int | None = None,
               add_bos_token: bool = False, pad_token_id: int = 0):
    super().__init__()
    self.logits_fn = logits_fn
    self.encoder = as_encoder(tokenizer, add_special_tokens=add_bos_token)
    self.max_length = int(max_length)
    self.batch_size = int(batch_size)
    self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(
        tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    self.prefix_token_id = prefix_token_id if prefix_token_id is not None else (
        bos if bos is not None else self.eos_token_id)
    self.pad_token_id = pad_token_id

  def _score(self, pairs):
    return score_pairs(self.logits_fn, pairs, max_length=self.max_length,
                       batch_size=self.batch_size, pad_id=self.pad_token_id)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    pairs = [encode_pair(self.encoder, *_args(r)[:2], self.prefix_token_id) for r in requests]
    return self._score(pairs)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    if self.prefix_token_id is None:
      raise ValueError("loglikelihood_rolling needs prefix_token_id (BOS or EOS)")
    totals = []
    for request in requests:
      ids = self.encoder(_args(request)[0])
      pairs = rolling_pairs(ids, self.prefix_token_id, self.max_length)
      totals.append(sum(lp for lp, _ in self._score(pairs)) if pairs else 0.0)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    outputs = []
    for request in requests:
      context, gen_kwargs = (_args(request) + ({},))[:2]
      until = gen_kwargs.get("until", [])
      until = [until] if isinstance(until, str) else list(until)
      context_ids = list(self.encoder(context))
      if not context_ids:
        if self.prefix_token_id is None:
          raise ValueError("generate_until with an empty context needs prefix_token_id")
        context_ids = [self.prefix_token_id]
      outputs.append(greedy_generate(
          self.logits_fn, context_ids, max_length=self.max_length,
          max_gen_toks=int(gen_kwargs.get("max_gen_toks", 256)), decode=self.encoder.decode,
          stop=until, eos_token_id=self.eos_token_id, pad_id=self.pad_token_id))
    return outputs
