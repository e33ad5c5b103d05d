"""Bits per parameter: the paper's formula on hand-computed cases, stored bytes by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.quant import grids
from cdquant_jax.quant.bits import (bits_formula, bits_formula_of, bits_report, bits_stored,
                                    stored_bytes)
from cdquant_jax.quant.qweight import pack_result
from cdquant_jax.solvers.result import SolveResult, identity_perm, no_outliers
from tests.quant.qweight_fixtures import spqr_like_result


@pytest.mark.parametrize("kw, expected", [
    # SpQR headline configs (algorithms.md 2.5): b + (3 + 3)/16 + 64/256.
    (dict(bits=3, group_size=16), 3.625),
    (dict(bits=4, group_size=16), 4.625),
    # 1 % outliers at 32 bits each.
    (dict(bits=3, group_size=16, outlier_share=0.01), 3.945),
    # round_zero: b + (s + b)/β1 + 32/(β1·β2) = 3 + 6/16 + 32/256.
    (dict(bits=3, group_size=16, round_zero=True), 3.5),
    # Unquantized statistics count 16 bits each (reference keeps the qqq term): 3 + 32/16 + 64/256.
    (dict(bits=3, group_size=16, qq_scale_bits=None, qq_zero_bits=None), 5.25),
    # GPTQ-style fp16 scale + zero per group of 128, no second level.
    (dict(bits=4, group_size=128, qq_groupsize=None, qq_scale_bits=None, qq_zero_bits=None), 4.25),
    # No groups (reference groupsize None): only the codes and the outliers.
    (dict(bits=3, group_size=None, outlier_share=0.005), 3.16),
])
def test_formula_hand_computed(kw, expected):
  assert bits_formula(**kw) == pytest.approx(expected, abs=1e-12)


def test_formula_rejects_a_bad_share():
  with pytest.raises(ValueError, match="outlier_share"):
    bits_formula(bits=3, group_size=16, outlier_share=1.5)


def _rtn_result(d_out, d_in, bits, group_size, fp16):
  W = jnp.asarray(np.random.default_rng(0).normal(size=(d_out, d_in)), jnp.float32)
  grid = grids.fit_grid(W, grids.GridConfig(bits=bits, group_size=group_size, fp16_stats=fp16))
  codes = grids.quantize(W, grid)
  return SolveResult(Q=grids.dequantize(codes, grid), codes=codes, grid=grid,
                     perm=identity_perm(d_in), objective=jnp.float32(0), outlier_mask=no_outliers(W))


def test_gptq_style_groups_stored_equals_formula():
  qw = pack_result(_rtn_result(64, 256, 4, 128, True))
  # codes 256·4/8 bytes per channel + f16 scale and zero for 2 groups.
  assert stored_bytes(qw) == 64 * 128 + 2 * 2 * 64 * 2
  assert bits_stored(qw) == 4.25
  assert bits_formula_of(qw) == 4.25


def test_per_channel_float32_scales_cost_their_real_bytes():
  qw = pack_result(_rtn_result(64, 256, 4, -1, False))
  assert (qw.meta.scale_format, qw.meta.zero_format) == ("f32", "f16")
  assert stored_bytes(qw) == 64 * 128 + 64 * 4 + 64 * 2
  assert bits_stored(qw) == 8 * (8192 + 384) / (64 * 256)
  assert bits_formula_of(qw) == 4 + 32 / 256  # the formula charges 16 + 16 bits per group


def test_spqr_like_stored_and_formula():
  result = spqr_like_result(np.random.default_rng(0), d_out=32, d_in=48, bits=3, G=16)
  nnz = int(np.sum(result.outlier_mask))
  assert nnz > 0
  qw = pack_result(result)
  expected_bytes = (
      3 * 2 * 32 * 4  # codes: 3 planes × k_pad/32 = 2 × N words
      + 2 * 3 * 1 * 32 * 4  # scale and zero codes: 3 planes × 1 × N words each
      + 4 * 4 * 2 * 2  # 4 second-level f16 arrays [n_groups_pad=4, N/16=2]
      + 48 * 4  # perm (act-order)
      + 33 * 4 + nnz * (4 + 2))  # CSR row offsets, column indices, f16 values
  assert stored_bytes(qw) == expected_bytes
  assert bits_stored(qw) == 8 * expected_bytes / (32 * 48)
  assert bits_formula_of(qw) == pytest.approx(3.625 + 32 * nnz / (32 * 48), abs=1e-12)
  report = bits_report(qw)
  assert report["outlier_share"] == nnz / (32 * 48)
  assert report["bits_formula"] == bits_formula_of(qw)
