"""Bits per parameter, two ways: the SpQR paper's formula and the real stored bytes.

`bits_formula` is SpQR's `get_average_number_of_bits` (main.py; algorithms.md 2.5), unrounded:
  round_zero False:  b + (s + z)/β1 + 2·(16 + 16)/(β1·β2) + 32·outlier_share
  round_zero True:   b + (s + b)/β1 +   (16 + 16)/(β1·β2) + 32·outlier_share
with s, z the second-level code widths (None = unquantized = 16), β1 the first-level group
size and β2 the second-level group size (None = ∞; group_size None = ∞ gives b + 32·share).
The reference rounds to 2 decimals; we return the exact value.

`bits_formula_of(qw)` applies it to a packed weight. GPTQ-style (float) statistics count
16 + 16 bits per group (s = z = 16, no second level, β2 = ∞) whatever their stored dtype, and a
per-channel grid is a group of β1 = d_in columns (not ∞ as in the reference), so the formula
charges its statistics too. An f32-stored statistic costs 32 bits in `bits_stored` only.

`bits_stored(qw)` = 8 × (bytes of every stored array, padding, perm and CSR row offsets
included) / (d_out · d_in). The JSON metadata is not counted.
"""

from __future__ import annotations

import math

import numpy as np

from cdquant_jax.quant.qweight import QuantizedWeight

STAT_BITS = 16  # bits of an unquantized statistic and of each second-level fp16 value
OUTLIER_BITS = 32  # fp16 value + 16-bit column index, as the paper counts them


def bits_formula(*, bits: int, group_size: int | None, qq_groupsize: int | None = 16,
                 qq_scale_bits: int | None = 3, qq_zero_bits: int | None = 3,
                 round_zero: bool = False, outlier_share: float = 0.0) -> float:
  """Average bits per parameter by the SpQR reference formula (see the module docstring).

  Args:
    bits: weight code width b.
    group_size: β1, columns per first-level group; None = one group of infinite size.
    qq_groupsize: β2, rows per second-level group; None = ∞ (no second-level cost).
    qq_scale_bits, qq_zero_bits: second-level code widths s, z; None = unquantized (16).
    round_zero: SpQR's round_zero (integer first-level zeros of b bits, one second level).
    outlier_share: outliers / parameters.
  """
  if not 0.0 <= outlier_share <= 1.0:
    raise ValueError(f"outlier_share must be in [0, 1], got {outlier_share}")
  s = qq_scale_bits or STAT_BITS
  z = qq_zero_bits or STAT_BITS
  beta1 = group_size or math.inf
  beta2 = qq_groupsize or math.inf
  if round_zero:
    avg = bits + (s + bits) / beta1 + (2 * STAT_BITS) / (beta1 * beta2)
  else:
    avg = bits + (s + z) / beta1 + 2 * (2 * STAT_BITS) / (beta1 * beta2)
  return avg + OUTLIER_BITS * outlier_share


def outlier_share(qw: QuantizedWeight) -> float:
  """Outliers per parameter."""
  return qw.meta.nnz / (qw.meta.d_out * qw.meta.d_in)


def bits_formula_of(qw: QuantizedWeight) -> float:
  """`bits_formula` with the parameters of a packed weight."""
  meta = qw.meta
  scale_qq = meta.scale_format == "qq"
  zero_qq = meta.zero_format == "qq"
  return bits_formula(bits=meta.bits, group_size=meta.group_size,
                      qq_groupsize=meta.qq_groupsize if (scale_qq or zero_qq) else None,
                      qq_scale_bits=meta.qq_scale_bits if scale_qq else None,
                      qq_zero_bits=meta.qq_zero_bits if zero_qq else None,
                      round_zero=meta.round_zero, outlier_share=outlier_share(qw))


def stored_bytes(qw: QuantizedWeight) -> int:
  """Total bytes of the stored arrays."""
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in qw.arrays().values())


def bits_stored(qw: QuantizedWeight) -> float:
  """Real bits per parameter: 8 · stored bytes / (d_out · d_in)."""
  return 8 * stored_bytes(qw) / (qw.meta.d_out * qw.meta.d_in)


def bits_report(qw: QuantizedWeight) -> dict[str, float]:
  """Both measures (and the outlier share) for logs and tables."""
  return dict(bits_formula=bits_formula_of(qw), bits_stored=bits_stored(qw),
              outlier_share=outlier_share(qw))
