"""Independent float64 numpy oracles for RTN and GPTQ, written from the reference pseudo-code
(IST-DASLab/gptq quant.py + gptq.py `fasterquant`), with plain Python loops.

`gptq_reference` mirrors the reference's block structure literally (including its quirk of
fitting mid-block groups on the outer W); `gptq_unblocked` is the textbook column-by-column
algorithm where every group is fitted on fully updated weights.
"""

import numpy as np


def gptq_params(x: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reference `Quantizer.find_params` (perchannel, mse=False) over the rows of x [rows, n]."""
  maxq = 2**bits - 1
  xmin = np.minimum(x.min(axis=1), 0)
  xmax = np.maximum(x.max(axis=1), 0)
  if sym:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  both_zero = (xmin == 0) & (xmax == 0)
  xmin = np.where(both_zero, -1, xmin)
  xmax = np.where(both_zero, 1, xmax)
  scale = (xmax - xmin) / maxq
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
  return scale, zero


def quantize(x, scale, zero, bits):
  maxq = 2**bits - 1
  q = np.clip(np.round(x / scale) + zero, 0, maxq)
  return scale * (q - zero)


def rtn(W, bits, group_size=-1, sym=False):
  Q = np.empty_like(W)
  g = W.shape[1] if group_size == -1 else group_size
  for start in range(0, W.shape[1], g):
    s, z = gptq_params(W[:, start:start + g], bits, sym)
    Q[:, start:start + g] = quantize(W[:, start:start + g], s[:, None], z[:, None], bits)
  return Q


def _prepare(W, H, percdamp, act_order):
  W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(W.shape[1])
  W, H = W[:, perm], H[perm][:, perm]
  H = H + percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
  Hinv = np.linalg.inv(H)
  U = np.linalg.cholesky(Hinv).T  # upper, Hinv = Uᵀ U
  return W, U, perm


def gptq_reference(W0, H, bits, *, group_size=-1, sym=False, percdamp=0.01, act_order=False,
                   static_groups=False, blocksize=128):
  """Literal transcription of `fasterquant` in float64. Returns Q in the original order."""
  W0 = W0.astype(np.float64)
  row_scale, row_zero = gptq_params(W0, bits, sym)  # on the original W, before dead zeroing
  Wd = W0.copy()
  Wd[:, np.diag(H) == 0] = 0
  if static_groups:
    groups = [gptq_params(Wd[:, i:i + group_size], bits, sym)
              for i in range(0, W0.shape[1], group_size)]
  W, U, perm = _prepare(W0, H, percdamp, act_order)
  d_out, d_in = W.shape
  Q = np.zeros_like(W)
  scale, zero = row_scale, row_zero
  for i1 in range(0, d_in, blocksize):
    i2 = min(i1 + blocksize, d_in)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d = W1[:, i], U1[i, i]
      if group_size != -1:
        if not static_groups and (i1 + i) % group_size == 0:
          scale, zero = gptq_params(W[:, i1 + i:i1 + i + group_size], bits, sym)
        if static_groups:
          scale, zero = groups[perm[i1 + i] // group_size]
      q = quantize(w, scale, zero, bits)
      Q[:, i1 + i] = q
      err = (w - q) / d
      W1[:, i:] -= np.outer(err, U1[i, i:])
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]
  return Q[:, np.argsort(perm)]


def gptq_unblocked(W0, H, bits, *, group_size=-1, sym=False, percdamp=0.01, act_order=False):
  """Column-by-column GPTQ with groups fitted on fully updated weights (no blocks)."""
  W0 = W0.astype(np.float64)
  row_scale, row_zero = gptq_params(W0, bits, sym)
  W, U, perm = _prepare(W0, H, percdamp, act_order)
  Q = np.zeros_like(W)
  scale, zero = row_scale, row_zero
  for j in range(W.shape[1]):
    if group_size != -1 and j % group_size == 0:
      scale, zero = gptq_params(W[:, j:j + group_size], bits, sym)
    q = quantize(W[:, j], scale, zero, bits)
    Q[:, j] = q
    err = (W[:, j] - q) / U[j, j]
    W[:, j:] -= np.outer(err, U[j, j:])
  return Q[:, np.argsort(perm)]


def objective(W, Q, H):
  E = np.asarray(W, np.float64) - np.asarray(Q, np.float64)
  return float(np.sum((E @ np.asarray(H, np.float64)) * E))
