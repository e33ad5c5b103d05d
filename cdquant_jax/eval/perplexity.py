"""Token-level perplexity over non-overlapping windows (GPTQ `llama_eval` protocol).

For ids of length N and window length `seqlen`:
- `n_windows = N // seqlen` windows `ids[k*seqlen:(k+1)*seqlen]`; the tail of
  `N % seqlen` tokens is dropped;
- each window predicts its own tokens 1..seqlen-1 from logits 0..seqlen-2
  (CE over `logits[:, :-1]` vs `ids[:, 1:]`), no context across windows;
- `ppl = exp(nll_sum / n_tokens)` with `n_tokens = n_windows * (seqlen - 1)`.
  GPTQ writes `exp(sum(loss_k * seqlen) / (n_windows * seqlen))` with `loss_k`
  the mean over the window's seqlen-1 tokens, which is the same number since
  every window has the same token count.

Log-softmax is computed in float32 whatever the logits dtype (llm-awq; GPTQ
uses the model dtype). Window sums are accumulated on the host in float64.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def window_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Summed next-token negative log-likelihood of each window.

  Args:
    logits: [B, T, V] any float dtype.
    ids: [B, T] int token ids.
  Returns:
    [B] float32: sum over t in [0, T-1) of -log softmax(logits[b, t])[ids[b, t+1]].
  """
  shifted = logits[:, :-1].astype(jnp.float32)
  targets = ids[:, 1:]
  log_normaliser = jax.nn.logsumexp(shifted, axis=-1)
  # [B, T-1, 1] -> [B, T-1]: the logit of each target token.
  target_logit = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(log_normaliser - target_logit, axis=-1)


def split_windows(ids, seqlen: int) -> np.ndarray:
  """[1, N] or [N] ids -> [N // seqlen, seqlen] int32 (tail dropped)."""
  array = np.asarray(ids)
  if array.ndim == 2 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 1:
    raise ValueError(f"perplexity ids must have shape [1, N] or [N], got {array.shape}")
  if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
    raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
  n_windows = array.size // seqlen
  if n_windows == 0:
    raise ValueError(f"{array.size} tokens is less than one window of seqlen={seqlen}")
  # [n_windows * seqlen] -> [n_windows, seqlen]
  return array[:n_windows * seqlen].reshape(n_windows, seqlen).astype(np.int32)


def perplexity(logits_fn: Callable[[jax.Array], jax.Array], ids, *, seqlen: int,
               batch_size: int = 1, progress: bool = False) -> dict:
  """GPTQ-protocol perplexity of `logits_fn` on `ids`.

  Args:
    logits_fn: `ids [B, T] int32 -> logits [B, T, V]`, jitted by the caller.
      Called with B == batch_size always (the last batch is padded with copies
      of its last window, whose losses are discarded), so it compiles once.
    ids: [1, N] or [N] token ids.
    seqlen: window length T.
    batch_size: windows per `logits_fn` call.
    progress: show a tqdm bar.
  Returns:
    dict(ppl, nll_sum, n_tokens, n_windows, dropped_tokens): nll in nats.
  """

  def nll_fn(batch):
    logits = logits_fn(batch)
    if logits.shape[:2] != batch.shape:
      raise ValueError(f"logits_fn returned shape {logits.shape} for ids {batch.shape}; "
                       "expected [B, T, V]")
    return window_nll(logits, batch)

  return perplexity_from_nll(nll_fn, ids, seqlen=seqlen, batch_size=batch_size,
                             progress=progress)


def perplexity_from_nll(nll_fn: Callable[[jax.Array], jax.Array], ids, *, seqlen: int,
                        batch_size: int = 1, progress: bool = False) -> dict:
  """`perplexity` with `nll_fn`: ids [B, T] int32 -> [B] summed window NLLs (`window_nll` of
  the model's logits; a caller can fuse it with its forward). Same protocol and result."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  windows = split_windows(ids, seqlen)
  n_windows = windows.shape[0]
  starts = range(0, n_windows, batch_size)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm(starts, desc="perplexity", unit="batch")
  per_batch = []
  for start in starts:
    batch = windows[start:start + batch_size]
    n_real = batch.shape[0]
    if n_real < batch_size:
      pad = np.repeat(batch[-1:], batch_size - n_real, axis=0)
      batch = np.concatenate([batch, pad], axis=0)
    # Dispatched without waiting; the host sums once all batches are queued.
    per_batch.append((nll_fn(jnp.asarray(batch)), n_real))
  nll_sum = 0.0
  for per_window, n_real in per_batch:
    nll_sum += float(np.asarray(per_window, dtype=np.float64)[:n_real].sum())
  n_tokens = n_windows * (seqlen - 1)
  return dict(ppl=math.exp(nll_sum / n_tokens), nll_sum=nll_sum, n_tokens=n_tokens,
              n_windows=n_windows, dropped_tokens=int(np.asarray(ids).size - n_windows * seqlen))
