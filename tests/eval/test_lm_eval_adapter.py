"""lm-eval adapter core scoring on a tiny character-level task with analytic answers.

The model: character tokenizer over ALPHABET; logits at position t depend on the
current token and the previous one, `A[ids[t]] + B[ids[t-1]]` (B[prefix] at
t = 0), so log-probabilities are known in closed form and checked in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.eval import JaxLM
from cdquant_jax.eval import lm_eval_adapter as adapter

ALPHABET = "^ abcdefghijklmnopqrstuvwxyz.?=+0123456789"  # id 0 '^' = BOS/prefix
V = len(ALPHABET)


class CharTokenizer:
  bos_token_id = 0
  eos_token_id = None

  def encode(self, text, add_special_tokens=False):
    ids = [ALPHABET.index(c) for c in text]
    return [0] + ids if add_special_tokens else ids

  def decode(self, ids, **unused):
    return "".join(ALPHABET[i] for i in ids)


def tables(seed=0, boosts=()):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(V, V)) * 0.5
  b = rng.normal(size=(V, V)) * 0.5
  for prev, nxt, value in boosts:
    a[ALPHABET.index(prev), ALPHABET.index(nxt)] += value
  return a, b


def make_logits_fn(a, b, use_prev=True):
  a_j, b_j = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  @jax.jit
  def logits_fn(ids):
    # [B, T] -> previous token [B, T] (position 0 sees itself), -> [B, T, V]
    prev = jnp.concatenate([ids[:, :1], ids[:, :-1]], axis=1)
    return a_j[ids] + (b_j[prev] if use_prev else 0.0)

  return logits_fn


def numpy_logprob(a, b, context, continuation, use_prev=True):
  """log p(continuation | context) under the closed-form model (float64)."""
  seq = list(context) + list(continuation)
  total = 0.0
  for pos in range(len(context), len(seq)):
    t = pos - 1  # predicting position
    prev = seq[t - 1] if t > 0 else seq[0]
    logits = a[seq[t]] + (b[prev] if use_prev else 0.0)
    total += logits[seq[pos]] - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
  return total


def ids_of(text):
  return [ALPHABET.index(c) for c in text]


def test_score_pairs_matches_closed_form_and_batching():
  a, b = tables()
  fn = make_logits_fn(a, b)
  pairs = [(ids_of("the sky is"), ids_of(" blue")), (ids_of("2+2="), ids_of("4")),
           (ids_of("a"), ids_of("bcdefghij")), ([0], ids_of("x"))]
  for batch_size in (1, 3, 8):
    got = adapter.score_pairs(fn, pairs, max_length=32, batch_size=batch_size)
    for (context, continuation), (logprob, _) in zip(pairs, got):
      np.testing.assert_allclose(logprob, numpy_logprob(a, b, context, continuation), rtol=1e-5)


def test_greedy_flag():
  a, b = tables(boosts=[("a", "b", 50.0), ("b", "c", 50.0)])
  fn = make_logits_fn(a, b)
  got = adapter.score_pairs(fn, [(ids_of("a"), ids_of("bc")), (ids_of("a"), ids_of("bd"))],
                            max_length=16)
  assert got[0][1] is True and got[1][1] is False


def test_left_truncation_keeps_scored_positions_aligned():
  # Token-only model (no previous-token term): truncating context cannot change scores,
  # but a misaligned slice would.
  a, b = tables(1)
  fn = make_logits_fn(a, b, use_prev=False)
  context, continuation = ids_of("abcdefghijklmnop"), ids_of("qrs")
  full = adapter.score_pairs(fn, [(context, continuation)], max_length=64)[0][0]
  short = adapter.score_pairs(fn, [(context, continuation)], max_length=4)[0][0]
  np.testing.assert_allclose(short, full, rtol=1e-6)
  np.testing.assert_allclose(full, numpy_logprob(a, b, context, continuation, use_prev=False),
                             rtol=1e-5)


def test_encode_pair_moves_trailing_space_and_uses_prefix():
  enc = CharTokenizer().encode
  assert adapter.encode_pair(enc, "sky is ", "blue", 0) == (ids_of("sky is"), ids_of(" blue"))
  assert adapter.encode_pair(enc, "", "hi", 0) == ([0], ids_of("hi"))
  with pytest.raises(ValueError, match="prefix_token_id"):
    adapter.encode_pair(enc, "", "hi", None)


@pytest.mark.parametrize("max_length", [1, 3, 7, 40])
def test_rolling_windows_cover_each_token_once(max_length):
  ids = ids_of("it is a truth universally acknowledged")
  pairs = adapter.rolling_pairs(ids, 0, max_length)
  assert sum((cont for _, cont in pairs), []) == ids
  position = 0
  for context, continuation in pairs:
    assert 1 <= len(context) + len(continuation) - 1 <= max_length
    expected_context = ([0] + ids)[max(0, position + 1 - len(context)):position + 1]
    assert context == expected_context  # the tokens right before the continuation
    position += len(continuation)


def test_rolling_loglikelihood_token_model_is_window_independent():
  a, b = tables(2)
  fn = make_logits_fn(a, b, use_prev=False)
  text = "we are all fools in love."
  exact = numpy_logprob(a, b, [0], ids_of(text), use_prev=False)
  for max_length in (2, 5, 64):
    lm = JaxLM(fn, CharTokenizer(), max_length=max_length, batch_size=2)
    np.testing.assert_allclose(lm.loglikelihood_rolling([(text,)])[0], exact, rtol=1e-5)


# A bigram model that, after a space, always continues " blue"; "2+2=" -> "4"; "?" -> "yes".
# So item 3 ("grass is" -> " green") is the one it gets wrong: acc = acc_norm = 3/4.
TINY_TASK = [
    {"context": "the sky is", "choices": [" blue", " red"], "answer": 0},
    {"context": "2+2=", "choices": ["4", "5"], "answer": 0},
    {"context": "grass is", "choices": [" blue", " green"], "answer": 1},
    {"context": "is it?", "choices": ["no", "yes"], "answer": 1},
]
BOOSTS = [(prev, nxt, 20.0) for prev, nxt in
          [("s", " "), (" ", "b"), ("b", "l"), ("l", "u"), ("u", "e"), ("=", "4"), ("?", "y"),
           ("y", "e"), ("e", "s")]]


def test_tiny_multiple_choice_task():
  a, b = tables(3, BOOSTS)
  lm = JaxLM(make_logits_fn(a, b, use_prev=False), CharTokenizer(), max_length=32, batch_size=4)
  result = adapter.multiple_choice(lm.loglikelihood, TINY_TASK)
  assert result == dict(acc=0.75, acc_norm=0.75, n=4)
  # The scores themselves against the closed form.
  requests = [(item["context"], c) for item in TINY_TASK for c in item["choices"]]
  for (context, choice), (logprob, greedy) in zip(requests, lm.loglikelihood(requests)):
    expected = numpy_logprob(a, b, ids_of(context), ids_of(choice), use_prev=False)
    np.testing.assert_allclose(logprob, expected, rtol=1e-5, atol=1e-6)
    assert greedy == (expected > -1.0)


def test_generate_until_greedy_with_stop():
  a, b = tables(4, [("a", "b", 40.0), ("b", "c", 40.0), ("c", ".", 40.0), (".", "a", 40.0)])
  lm = JaxLM(make_logits_fn(a, b), CharTokenizer(), max_length=32)
  out = lm.generate_until([("xa", {"until": ["."], "max_gen_toks": 10}),
                           ("a", {"until": [], "max_gen_toks": 6})])
  assert out == ["bc", "bc.abc"]


def test_adapter_base_class():
  try:
    from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top
  except ImportError:
    assert JaxLM.__mro__[1] is object
  else:
    assert issubclass(JaxLM, LM)
