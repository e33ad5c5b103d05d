"""Float64 numpy oracle of the SpQR sweep, written column by column from the reference pseudo-code.

Independent of cdquant_jax: it re-implements the SpQR quantizer (quant_groups.Quantizer), the
leave-one-out screen and SPQRUtil.quantize (algorithms.md 2.1-2.3) with plain Python loops over
columns, in-place updates and no vectorisation tricks. `fp16_storage` mirrors the project's one
documented deviation (stored statistics rounded to float16 before use, outliers stored as the
dense value of their code plus a float16 correction).
"""

from __future__ import annotations

import numpy as np


def _f16(x):
  return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


class Quantizer:
  """Per-row min-max quantizer of the SpQR flavour, optionally with second-level statistics."""

  def __init__(self, bits, *, sym=False, round_zero=False, qq_scale_bits=None, qq_zero_bits=None,
               qq_groupsize=16, qq_zero_sym=False, fp16_storage=False):
    self.bits, self.maxq = bits, 2**bits - 1
    self.sym, self.round_zero = sym, round_zero
    self.qq_scale_bits, self.qq_zero_bits = qq_scale_bits, qq_zero_bits
    self.qq_groupsize, self.qq_zero_sym = qq_groupsize, qq_zero_sym
    self.fp16 = fp16_storage
    self.second = {}

  def find_params(self, x):
    """x [rows, cols]: one (scale, zero) per row."""
    xmin = x.min(axis=1).copy()
    xmax = x.max(axis=1).copy()
    if self.sym:
      xmax = np.maximum(np.abs(xmin), xmax)
      neg = xmin < 0
      xmin[neg] = -xmax[neg]
    same = xmin == xmax
    xmin[same] = -1.0
    xmax[same] = 1.0
    scale = (xmax - xmin) / self.maxq
    if self.sym:
      zero = np.full_like(scale, (self.maxq + 1) / 2)
    else:
      zero = -xmin / scale
      if self.round_zero:
        zero = np.round(zero)
    self.second = {}
    if self.qq_scale_bits is not None:
      scale = self._second_level("scale", scale, self.qq_scale_bits, False)
    elif self.fp16:
      scale = _f16(scale)
    if self.qq_zero_bits is not None and (not self.round_zero or self.qq_zero_bits < self.bits):
      zero = self._second_level("zero", zero, self.qq_zero_bits, self.qq_zero_sym)
    elif self.fp16:
      zero = _f16(zero)
    self.scale, self.zero = scale, zero

  def _second_level(self, name, v, bits, sym):
    runs = v.reshape(-1, self.qq_groupsize)
    qq = Quantizer(bits, sym=sym)
    qq.find_params(runs)
    if self.fp16:
      qq.scale, qq.zero = _f16(qq.scale), _f16(qq.zero)
    codes = qq.quantize(runs)
    self.second[name] = (codes.reshape(-1).astype(np.int64), qq.scale.copy(), qq.zero.copy())
    return qq.dequantize(codes).reshape(-1)

  def quantize(self, x):
    """Codes of x [rows, cols] with this quantizer's per-row statistics."""
    s = self.scale[:, None]
    return np.clip(np.round(x / np.maximum(s, 1e-9) + self.zero[:, None]), 0, self.maxq)

  def dequantize(self, q):
    return self.scale[:, None] * (q - self.zero[:, None])


def leave_one_out_reduction(group_weight, u, bits, sym):
  """[rows, g] base error − error of the fit without weight j (errors scaled by 1 / u)."""
  rows, g = group_weight.shape
  base = Quantizer(bits, sym=sym)
  base.find_params(group_weight)
  base_err = np.sum(((base.dequantize(base.quantize(group_weight)) - group_weight) / u) ** 2,
                    axis=1)
  out = np.zeros((rows, g))
  for j in range(g):
    keep = [k for k in range(g) if k != j]
    data = group_weight[:, keep]
    qz = Quantizer(bits, sym=sym)
    qz.find_params(data)
    err = np.sum(((qz.dequantize(qz.quantize(data)) - data) / u[keep]) ** 2, axis=1)
    out[:, j] = base_err - err
  return out


def spqr_reference(W, H, *, bits=3, groupsize=16, qq_scale_bits=3, qq_zero_bits=3,
                   qq_groupsize=16, outlier_threshold=0.2, permutation_order="act_order",
                   percdamp=1.0, blocksize=128, simplified_outliers=False, round_zero=False,
                   sym=False, qq_zero_sym=False, fp16_storage=False):
  """Runs the reference SpQR sweep in float64.

  Returns a dict with Q (original column order), mask (outliers, original order), perm, the
  first-level statistics per group in processing order (scales, zeros [rows, n_groups]) and the
  second-level codes/statistics per group (lists indexed by group).
  """
  W = np.array(W, np.float64)
  H = np.array(H, np.float64)
  rows, cols = W.shape
  if permutation_order == "act_order":
    perm = np.argsort(-np.diag(H), kind="stable")
  else:
    perm = np.arange(cols)
  W = W[:, perm]
  H = H[perm][:, perm]
  dead = np.diag(H) == 0
  if percdamp > 0:
    H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.abs(np.diag(H)))
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  Hinv = np.linalg.inv(H)
  U = np.linalg.cholesky(Hinv).T
  u = np.diag(U)
  if groupsize == -1:
    groupsize = cols

  scale_of_outliers = np.mean(np.var(W, axis=0, ddof=1) / u**2)
  tau = outlier_threshold * scale_of_outliers
  quantizer = Quantizer(bits, sym=sym, round_zero=round_zero, qq_scale_bits=qq_scale_bits,
                        qq_zero_bits=qq_zero_bits, qq_groupsize=qq_groupsize,
                        qq_zero_sym=qq_zero_sym, fp16_storage=fp16_storage)
  errors = np.zeros_like(W)
  mask = np.zeros(W.shape, bool)
  scales, zeros, second = [], [], []
  for block_start in range(0, cols, blocksize):
    block_end = min(block_start + blocksize, cols)
    for c in range(block_start, block_end):
      if c % groupsize == 0:
        group = W[:, c:c + groupsize].copy()
        if simplified_outliers or tau == np.inf:
          quantizer.find_params(group)
        else:
          red = leave_one_out_reduction(group, u[c:c + groupsize], bits, sym)
          likely = (red > tau).astype(np.float64)
          keep = 1.0 - likely
          mean = np.sum(group * keep, axis=1, keepdims=True) / np.maximum(
              np.sum(keep, axis=1, keepdims=True), 1.0)
          quantizer.find_params(group * keep + mean * likely)
        scales.append(quantizer.scale.copy())
        zeros.append(quantizer.zero.copy())
        second.append(dict(quantizer.second))
      w = W[:, c].copy()
      q = quantizer.dequantize(quantizer.quantize(w[:, None]))[:, 0]
      errors[:, c] = (w - q) / U[c, c]
      if tau != np.inf:
        out = errors[:, c] ** 2 > tau
        mask[:, c] = out
        # fp16 storage: an outlier is the dense value of its nearest code plus a float16 correction.
        kept = q + _f16(w - q) if fp16_storage else w
        q_wo = quantizer.dequantize(quantizer.quantize((w * (1.0 - out))[:, None]))[:, 0]
        q = np.where(out, kept, q_wo)
        errors[:, c] = (w - q) / U[c, c]
      W[:, c] = q
      W[:, c + 1:block_end] -= np.outer(errors[:, c], U[c, c + 1:block_end])
    W[:, block_end:] -= errors[:, block_start:block_end] @ U[block_start:block_end, block_end:]
  inv = np.argsort(perm)
  return dict(Q=W[:, inv], mask=mask[:, inv], perm=perm, scales=np.stack(scales, 1),
              zeros=np.stack(zeros, 1), second=second, tau=tau)


# The reference's flat keyword names -> this project's SpQRConfig field paths.
_OUR_PATHS = dict(bits="grid.bits", groupsize="grid.group_size", sym="grid.sym",
                  round_zero="grid.round_zero", fp16_storage="grid.fp16_stats",
                  qq_scale_bits="qq.scale_bits", qq_zero_bits="qq.zero_bits",
                  qq_groupsize="qq.group_size", qq_zero_sym="qq.zero_sym")


def our_config(cls, **reference_kwargs):
  """`cls` (SpQRConfig or SpQRCDConfig) with the settings given in the reference's spelling."""
  from cdquant_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  changes = {}
  for name, value in reference_kwargs.items():
    if name == "permutation_order":
      changes["act_order"] = value == "act_order"
    else:
      changes[_OUR_PATHS.get(name, name)] = value
  return config_lib.replace_paths(cls(), changes)
