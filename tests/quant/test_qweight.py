"""QuantizedWeight: dequantize(pack_result(r)) == r.Q bit for bit, layout, and clear errors."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.quant import packing
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.kernels.packed_matmul.reference import packed_matmul_reference
from cdquant_jax.quant.qweight import dequantize, pack_result
from cdquant_jax.solvers import api
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from cdquant_jax.solvers.spqr import spqr
from tests.fixtures.layer_problems import layer_problem
from tests.quant.qweight_fixtures import bit_equal, f16, spqr_like_result


@pytest.fixture(scope="module")
def problem():
  W, H = layer_problem(np.random.default_rng(0), 32, 80, dtype=np.float32)
  return W, H


@pytest.mark.parametrize("bits, group_size, fp16", [
    (2, -1, False), (3, -1, True), (4, 16, False), (4, 16, True), (3, 40, False)])
def test_rtn_round_trip_is_bit_exact(problem, bits, group_size, fp16):
  W, H = problem
  grid = GridConfig(bits=bits, group_size=group_size, fp16_stats=fp16)
  result = rtn(W, H, RTNConfig(grid=grid))
  qw = pack_result(result)
  assert bit_equal(dequantize(qw), result.Q)
  assert qw.meta.scale_format == ("f16" if fp16 else "f32")
  assert qw.meta.zero_format == "f16"  # integer zero points are exact in float16
  assert not qw.meta.has_perm and qw.perm is None and qw.meta.nnz == 0
  assert qw.meta.k_pad == 96 and qw.meta.group_size == (80 if group_size == -1 else group_size)


@pytest.mark.parametrize("cfg", [
    GPTQConfig(grid=GridConfig(bits=3, group_size=16), act_order=True),
    GPTQConfig(grid=GridConfig(bits=4, group_size=16, fp16_stats=True), act_order=True,
               static_groups=True),
    GPTQConfig(grid=GridConfig(bits=2), act_order=True),
], ids=["actorder_groups", "actorder_static", "actorder_perchannel"])
def test_gptq_round_trip_is_bit_exact(problem, cfg):
  W, H = problem
  result = gptq(W, H, cfg)
  qw = pack_result(result)
  assert bit_equal(dequantize(qw), result.Q)
  # Only act-order with dynamic groups scatters a group over the original columns.
  assert qw.meta.has_perm == (cfg.grid.group_size != -1 and not cfg.static_groups)


def test_storage_layout_of_an_act_order_result(problem):
  W, H = problem
  result = gptq(W, H, GPTQConfig(grid=GridConfig(bits=3, group_size=16), act_order=True))
  qw = pack_result(result)
  perm = np.asarray(qw.perm)
  codes = np.asarray(result.codes)
  G = qw.meta.group_size
  # Storage row k is input feature perm[k]; groups are contiguous runs of G rows.
  np.testing.assert_array_equal(np.sort(perm), np.arange(80))
  np.testing.assert_array_equal(np.asarray(result.grid.group_index)[perm], np.arange(80) // G)
  stored = np.asarray(packing.unpack_codes(qw.codes, 3))  # [k_pad, N]
  np.testing.assert_array_equal(stored[:80], codes[:, perm].T)
  assert not stored[80:].any()
  assert qw.codes.shape == (3, 3, 32)  # three word planes [3, k_pad/32, N]
  scale = np.asarray(qw.scale, np.float32)  # [n_groups_pad, N]
  assert scale.shape == (6, 32)
  assert bit_equal(scale[:5], np.asarray(result.grid.scale).T)
  assert not scale[5:].any()


@pytest.mark.parametrize("kw", [
    dict(bits=3, act_order=True),
    dict(bits=4, act_order=False, outlier_share=0.0),
    dict(bits=2, quantize_zero=False),
    dict(bits=3, d_in=80, G=16, qq_bits=2),
    dict(bits=4, d_out=48, d_in=32, G=32, qq=16, qq_bits=4),
])
def test_spqr_like_round_trip_is_bit_exact(kw):
  result = spqr_like_result(np.random.default_rng(1), **kw)
  qw = pack_result(result)
  assert bit_equal(dequantize(qw), result.Q)
  assert qw.meta.scale_format == "qq"
  assert qw.meta.zero_format == ("qq" if kw.get("quantize_zero", True) else "f16")
  assert qw.meta.nnz == int(np.sum(result.outlier_mask)) and qw.meta.qq_dtype == "f16"


def test_spqr_like_layout():
  result = spqr_like_result(np.random.default_rng(2), d_out=32, d_in=48)
  qw = pack_result(result)
  meta = qw.meta
  assert (meta.n_groups, meta.n_groups_pad, meta.k_pad) == (3, 4, 64)
  # First-level codes packed along the group axis like the weights: [3, 1, N] planes.
  assert qw.scale.shape == (3, 1, 32) and qw.scale.dtype == jnp.uint32
  groups = np.asarray(packing.unpack_codes(qw.scale, 3))  # [32, N]
  np.testing.assert_array_equal(groups[:3], result.spqr.scale_codes.T)
  assert not groups[3:].any()
  assert qw.scale_qq_scale.shape == (4, 2) and qw.scale_qq_scale.dtype == jnp.float16
  assert bit_equal(np.asarray(qw.zero_qq_zero, np.float32)[:3], result.spqr.zero_qq_zero.T)
  # CSR: row offsets over output channels, columns in original order, additive f16 values.
  offsets = np.asarray(qw.outlier_row_offsets)
  rows, cols = np.nonzero(result.outlier_mask)
  np.testing.assert_array_equal(np.diff(offsets), np.bincount(rows, minlength=32))
  np.testing.assert_array_equal(np.asarray(qw.outlier_col_idx), cols)


def test_lossy_outliers_raise_unless_allowed():
  result = spqr_like_result(np.random.default_rng(3))
  Q = np.array(result.Q)
  r, c = np.argwhere(result.outlier_mask)[0]
  Q[r, c] += np.float32(1e-5) * (1 + abs(Q[r, c]))  # no longer dense + a float16
  bad = result.replace(Q=Q)
  with pytest.raises(ValueError, match=rf"\[{r}, {c}\].*allow_lossy_outliers"):
    pack_result(bad)
  qw = pack_result(bad, allow_lossy_outliers=True)
  W = np.asarray(dequantize(qw))
  keep = ~np.asarray(result.outlier_mask)
  assert bit_equal(W[keep], Q[keep])
  assert abs(W[r, c] - Q[r, c]) <= 1e-3 * (1 + abs(Q[r, c]))


def test_second_level_stats_not_float16_are_stored_as_float32():
  result = spqr_like_result(np.random.default_rng(4), outlier_share=0.0)
  stats = result.spqr
  grid = result.grid
  s2 = np.repeat(stats.scale_qq_scale, 16, axis=0) * np.float32(1 + 2**-20)
  stats = dataclasses.replace(stats, scale_qq_scale=stats.scale_qq_scale * np.float32(1 + 2**-20))
  scale = (s2 * (stats.scale_codes.astype(np.float32) - np.repeat(stats.scale_qq_zero, 16, axis=0))
           ).astype(np.float32)
  codes = result.codes.astype(np.float32)
  dense = scale[:, grid.group_index] * (codes - grid.zero[:, grid.group_index])
  result = result.replace(grid=dataclasses.replace(grid, scale=scale), Q=dense, spqr=stats)
  qw = pack_result(result)
  assert qw.meta.qq_dtype == "f32" and qw.scale_qq_scale.dtype == jnp.float32
  assert bit_equal(dequantize(qw), dense)


def test_inconsistent_stats_and_q_raise(problem):
  result = spqr_like_result(np.random.default_rng(5))
  grid = result.grid
  scale = np.array(grid.scale)
  scale[2, 1] *= np.float32(1.5)
  with pytest.raises(ValueError, match=r"grid.scale differs.*\[2, 1\]"):
    pack_result(result.replace(grid=dataclasses.replace(grid, scale=scale)))
  W, H = problem
  good = rtn(W, H, RTNConfig(grid=GridConfig(bits=4, group_size=16)))
  Q = np.array(good.Q)
  Q[3, 7] += np.float32(0.01)
  with pytest.raises(ValueError, match=r"differs from result.Q at 1 positions; first \[3, 7\]"):
    pack_result(good.replace(Q=Q))


def test_bad_results_raise(problem):
  W, H = problem
  good = rtn(W, H, RTNConfig(grid=GridConfig(bits=4, group_size=16)))
  gi = np.array(good.grid.group_index)
  gi[0] = 1  # group 0 now has 15 columns, group 1 has 17
  with pytest.raises(ValueError, match="group 0 has 15 columns"):
    pack_result(good.replace(grid=dataclasses.replace(good.grid, group_index=gi)))
  with pytest.raises(ValueError, match=r"codes outside \[0, 15\]"):
    pack_result(good.replace(codes=np.asarray(good.codes) + 1))
  with pytest.raises(ValueError, match="qq_scale_bits"):
    spqr_like = spqr_like_result(np.random.default_rng(6))
    pack_result(spqr_like.replace(spqr=dataclasses.replace(spqr_like.spqr, qq_scale_bits=0)))
  with pytest.raises(ValueError, match="spqr.groupsize=8"):
    spqr_like = spqr_like_result(np.random.default_rng(6))
    pack_result(spqr_like.replace(spqr=dataclasses.replace(spqr_like.spqr, groupsize=8)))


def test_real_spqr_with_outliers(problem):
  W, H = problem
  cfg = config_lib.apply_overrides(api.default_config("spqr"), [
      "grid.bits=3", "grid.group_size=16", "outlier_threshold=0.1"])
  result = spqr(W, H, cfg)
  mask = np.asarray(result.outlier_mask)
  assert mask.any()
  qw = pack_result(result)  # qq bit widths come from the solver's SpQRStats
  W_hat = np.asarray(dequantize(qw))
  Q = np.asarray(result.Q)
  assert bit_equal(W_hat, Q)  # outliers included: the solver emits storable values
  assert qw.meta.has_perm and qw.meta.scale_format == qw.meta.zero_format == "qq"


def test_packed_matmul_reference_against_numpy():
  result = spqr_like_result(np.random.default_rng(7))
  qw = pack_result(result)
  x = np.random.default_rng(8).normal(size=(5, 48)).astype(np.float32)
  want = x.astype(np.float64) @ np.asarray(result.Q, np.float64).T
  np.testing.assert_allclose(np.asarray(packed_matmul_reference(jnp.asarray(x), qw)), want,
                             rtol=1e-5, atol=1e-5)
  assert len(jax.tree_util.tree_leaves(qw)) == len(qw.arrays())


def test_spqr_qq_zeros_round_trip_exactly():
  """The stored "qq" zero is the solver's f32 zero: fusing s2 · (c − z2) into q − z as one
  multiply-add (XLA:CPU does, under one jit) put 29 weights of this layer an ulp off."""
  rng = np.random.default_rng(1)
  W = rng.standard_normal((16, 96)).astype(np.float32)
  X = rng.standard_normal((192, 96)).astype(np.float32)
  X[:, 3] = 0.0  # a dead column
  X[:, 5] *= 10
  cfg = config_lib.apply_overrides(api.default_config("spqr"), [
      "simplified_outliers=true", "grid.group_size=8", "blocksize=32"])
  result = spqr(W, X.T @ X, cfg)
  qw = pack_result(result)
  assert qw.meta.zero_format == "qq" and qw.meta.nnz > 0
  assert bit_equal(dequantize(qw), result.Q)
