"""Perplexity vs a direct numpy float64 computation; batching, tail, analytic cases."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cdquant_jax.eval import perplexity

V, SEQLEN = 11, 8


def make_logits_fn(seed=0, dtype=jnp.float32):
  """Deterministic logits depending on the token and its position: [B, T] -> [B, T, V]."""
  rng = np.random.default_rng(seed)
  token_table = jnp.asarray(rng.normal(size=(V, V)) * 2.0, jnp.float32)
  position_table = jnp.asarray(rng.normal(size=(64, V)), jnp.float32)
  calls = []

  @jax.jit
  def logits_fn(ids):
    return (token_table[ids] + position_table[None, :ids.shape[1]]).astype(dtype)

  def recorded(ids):
    calls.append(ids.shape)
    return logits_fn(ids)

  return recorded, calls, np.asarray(token_table, np.float64), np.asarray(position_table, np.float64)


def numpy_nll(ids, seqlen, token_table, position_table, round_to=None):
  """Direct float64 loop: windows, shifted CE, tail dropped."""
  flat = np.asarray(ids).reshape(-1)
  total, count = 0.0, 0
  for w in range(flat.size // seqlen):
    window = flat[w * seqlen:(w + 1) * seqlen]
    for t in range(seqlen - 1):
      logits = token_table[window[t]] + position_table[t]
      if round_to is not None:
        logits = logits.astype(np.float32).astype(round_to).astype(np.float64)
      m = logits.max()
      log_z = m + math.log(np.exp(logits - m).sum())
      total += log_z - logits[window[t + 1]]
      count += 1
  return total, count


def test_matches_numpy_reference():
  ids = np.random.default_rng(1).integers(0, V, size=(1, 5 * SEQLEN))
  fn, _, token_table, position_table = make_logits_fn()
  got = perplexity(fn, ids, seqlen=SEQLEN, batch_size=2)
  nll, count = numpy_nll(ids, SEQLEN, token_table, position_table)
  assert got["n_windows"] == 5 and got["n_tokens"] == count == 5 * (SEQLEN - 1)
  np.testing.assert_allclose(got["nll_sum"], nll, rtol=1e-5)
  np.testing.assert_allclose(got["ppl"], math.exp(nll / count), rtol=1e-5)


def test_batch_size_invariance_and_fixed_batch_shape():
  ids = np.random.default_rng(2).integers(0, V, size=7 * SEQLEN)
  results = {}
  for batch_size in (1, 2, 3, 7, 10):
    fn, calls, _, _ = make_logits_fn()
    results[batch_size] = perplexity(fn, ids, seqlen=SEQLEN, batch_size=batch_size)
    assert set(calls) == {(batch_size, SEQLEN)}  # padded last batch: one compiled shape
    assert len(calls) == -(-7 // batch_size)
  for r in results.values():
    np.testing.assert_allclose(r["nll_sum"], results[1]["nll_sum"], rtol=1e-6)
    assert r["n_tokens"] == results[1]["n_tokens"]


def test_tail_is_dropped():
  ids = np.random.default_rng(3).integers(0, V, size=(1, 4 * SEQLEN + 5))
  fn, _, _, _ = make_logits_fn()
  with_tail = perplexity(fn, ids, seqlen=SEQLEN, progress=True)
  without = perplexity(fn, ids[:, :4 * SEQLEN], seqlen=SEQLEN)
  assert with_tail["n_windows"] == 4 and with_tail["dropped_tokens"] == 5
  assert with_tail["nll_sum"] == without["nll_sum"]
  changed_tail = ids.copy()
  changed_tail[0, -5:] = (changed_tail[0, -5:] + 1) % V
  assert perplexity(fn, changed_tail, seqlen=SEQLEN)["nll_sum"] == with_tail["nll_sum"]


@pytest.mark.parametrize("vocab", [2, 50, 1000])
def test_uniform_logits_give_ppl_equal_vocab(vocab):
  ids = np.random.default_rng(4).integers(0, vocab, size=(1, 3 * 16))
  uniform = jax.jit(lambda x: jnp.full(x.shape + (vocab,), 3.25, jnp.bfloat16))
  got = perplexity(uniform, ids, seqlen=16, batch_size=2)
  np.testing.assert_allclose(got["ppl"], vocab, rtol=1e-5)
  np.testing.assert_allclose(got["nll_sum"], 3 * 15 * math.log(vocab), rtol=1e-5)


def test_bf16_logits_use_f32_log_softmax():
  ids = np.random.default_rng(5).integers(0, V, size=(3 * SEQLEN,))
  fn, _, token_table, position_table = make_logits_fn(dtype=jnp.bfloat16)
  got = perplexity(fn, ids, seqlen=SEQLEN, batch_size=3)
  nll, _ = numpy_nll(ids, SEQLEN, token_table, position_table, round_to=ml_dtypes.bfloat16)
  np.testing.assert_allclose(got["nll_sum"], nll, rtol=1e-5)


def test_bad_inputs():
  fn, _, _, _ = make_logits_fn()
  with pytest.raises(ValueError, match="less than one window"):
    perplexity(fn, np.zeros((1, SEQLEN - 1), np.int32), seqlen=SEQLEN)
  with pytest.raises(ValueError, match=r"\[1, N\]"):
    perplexity(fn, np.zeros((2, 4 * SEQLEN), np.int32), seqlen=SEQLEN)
  with pytest.raises(ValueError, match="logits_fn returned shape"):
    perplexity(lambda x: jnp.zeros((1, 2, V)), np.zeros(2 * SEQLEN, np.int32), seqlen=SEQLEN)
