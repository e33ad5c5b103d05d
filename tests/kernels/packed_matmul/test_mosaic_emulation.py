"""The Mosaic GPU kernel's numerics on CPU: its body (pallas_mosaic.decode_tile and the outlier
patch) run by mosaic_emulation with plain arrays, on every test case.

The kernel rounds each decoded weight to the operand dtype (bf16 / f16) and accumulates in f32,
so the oracle is x @ round(W)ᵀ in float64, with W = dequantize(qw) (fused outliers: rounded
together with the dense weight; separate pass: the dense weight and the outliers rounded on
their own). The emulation matches it up to f32 accumulation order (1e-6 of max|y|); any slip
in slot order, statistic runs, "qq" decode, padding or outlier buckets is O(1).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.kernels.packed_matmul import mosaic_emulation, mosaic_operands
from cdquant_jax.kernels.packed_matmul import BlockConfig
from cdquant_jax.quant.qweight import dequantize, outlier_rows, weight_without_outliers
from tests.kernels.packed_matmul.cases import BUILDERS, TEST_CONFIG, WIDE_BUILDERS, case

# (case, batch, dtype, outliers, wgmma_a)
GRID = [(name, 3, jnp.bfloat16, "separate", a) for name in BUILDERS
        for a in ("smem", "registers")] + [
    ("wide_spqr_w3_g16_qq3", 2, jnp.bfloat16, "fused", "registers"),
    ("wide_w4_g128", 2, jnp.bfloat16, "separate", "registers")] + [
    (name, 3, jnp.bfloat16, "fused", a) for name in ("spqr_w3_g16_qq3",
                                                     "spqr_w2_g16_qq2_fewoutliers")
    for a in ("smem", "registers")] + [
    ("w3_g16_actorder", 1, jnp.float16, "separate", "smem"),
    ("w4_g32_f16", 16, jnp.float32, "separate", "registers"),
    ("spqr_w3_g16_qq3", 130, jnp.bfloat16, "fused", "smem"),
    ("spqr_w3_g16_qq3", 130, jnp.bfloat16, "separate", "registers")]


def _rounded(w, dtype):
  return np.asarray(jnp.asarray(w).astype(dtype).astype(jnp.float32), np.float64)


def _oracle(x, qw, operand_dtype, outliers: str):
  """x (operand-dtype values) @ round(W)ᵀ in float64 -> [B, d_out]."""
  xr = _rounded(x, operand_dtype)
  if outliers == "fused" or qw.meta.nnz == 0:
    return xr @ _rounded(dequantize(qw), operand_dtype).T
  dense = weight_without_outliers(qw)
  # the outliers alone [d_out, d_in] (original column order, like the dense weight)
  sparse = jnp.zeros_like(dense).at[outlier_rows(qw), qw.outlier_col_idx].add(
      qw.outlier_values.astype(jnp.float32))
  return xr @ (_rounded(dense, operand_dtype) + _rounded(sparse, operand_dtype)).T


@pytest.mark.parametrize("name, batch, dtype, outliers, wgmma_a", GRID,
                         ids=[f"{n}-B{b}-{jnp.dtype(d).name}-{o}-{a}"
                              for n, b, d, o, a in GRID])
def test_emulated_kernel_matches_rounded_weights(name, batch, dtype, outliers, wgmma_a):
  _, qw = case(name)
  x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, qw.meta.d_in)), dtype)
  # model widths: the default tiles with 2 K splits (several statistic chunks per block)
  base = BlockConfig(k_splits=2) if name in WIDE_BUILDERS else TEST_CONFIG
  config = dataclasses.replace(base, outliers=outliers, wgmma_a=wgmma_a)
  y = mosaic_emulation.emulate(x, qw, config)
  operand = mosaic_operands.operand_dtype_name(dtype)
  oracle = _oracle(x, qw, operand, outliers)
  assert y.shape == (batch, qw.meta.d_out)
  np.testing.assert_allclose(y, oracle, rtol=0, atol=1e-6 * np.abs(oracle).max())


def test_plan_pads_decode_batches_to_the_wgmma_n_and_tiles_prefill():
  _, qw = case("w4_g32_actorder")
  tiles = {b: mosaic_operands.make_mosaic_plan(qw, b, jnp.bfloat16, BlockConfig())
           for b in (1, 8, 9, 16, 256)}
  assert [(p.tb, p.token_blocks) for p in tiles.values()][:4] == [
      (8, 1), (8, 1), (16, 1), (16, 1)]
  prefill = tiles[256]  # largest token block whose launch fits the shared-memory budget
  assert prefill.tb * prefill.token_blocks == 256 and prefill.tb >= 64
  plan = tiles[1]
  assert plan.bn % 64 == 0 and plan.rows % 8 == 0 and plan.k_tot >= qw.meta.k_pad
  assert plan.operand_dtype == "bfloat16"
  f16 = mosaic_operands.make_mosaic_plan(qw, 1, jnp.float16, BlockConfig())
  assert f16.operand_dtype == "float16"


@pytest.mark.parametrize("name", sorted(BUILDERS) + sorted(WIDE_BUILDERS))
def test_default_tiles_fit_shared_memory_at_prefill(name):
  _, qw = case(name)
  for outliers in ("separate", "fused"):
    plan = mosaic_operands.make_mosaic_plan(qw, 256, jnp.bfloat16,
                                            BlockConfig(outliers=outliers))
    assert mosaic_operands.smem_bytes(plan, qw.meta.nnz > 0) <= mosaic_operands.SMEM_BUDGET
    assert plan.tb * plan.token_blocks >= 256 and plan.tb % 8 == 0


def test_registers_a_operand_tiles_have_16_rows_per_slot_and_no_weight_tile():
  for name in ("w4_g32_f16", "w2_perchannel_160", "spqr_w3_g16_qq3"):
    _, qw = case(name)
    plan = mosaic_operands.make_mosaic_plan(qw, 1, jnp.bfloat16,
                                            BlockConfig(wgmma_a="registers"))
    smem = dataclasses.replace(plan, registers_a=False)
    assert plan.rows % 16 == 0 and plan.registers_a
    assert (mosaic_operands.smem_bytes(smem, False) - mosaic_operands.smem_bytes(plan, False)
            == plan.bk * plan.bn * 2)
  with pytest.raises(ValueError, match="BlockConfig.wgmma_a must be one of"):
    BlockConfig(wgmma_a="tmem")


def test_slot_order_permutes_each_tile():
  # tile of 16 rows, 4 slots per packed row: position v·4 + r holds row 4r + v
  assert mosaic_operands.slot_permutation(16, 4).tolist() == [
      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
  _, qw = case("w3_g16_actorder")  # act-order: storage order x[:, perm] first
  plan = mosaic_operands.make_mosaic_plan(qw, 2, jnp.float16, TEST_CONFIG)
  x = jnp.arange(2 * qw.meta.d_in, dtype=jnp.float16).reshape(2, qw.meta.d_in)
  storage = np.zeros((plan.tb, plan.k_tot), np.float32)
  storage[:2, :qw.meta.d_in] = np.asarray(x)[:, np.asarray(qw.perm)]
  within = np.asarray(mosaic_operands.slot_permutation(plan.bk, plan.slots))
  columns = (np.arange(plan.k_tiles)[:, None] * plan.bk + within[None, :]).reshape(-1)
  expected = storage[:, columns]  # integers < 2048 are exact in f16
  np.testing.assert_array_equal(
      np.asarray(mosaic_operands.x_slot_order(x, qw, plan).astype(jnp.float32)), expected)


def test_outlier_buckets_hold_every_outlier_once():
  _, qw = case("spqr_w3_g16_qq3")
  plan = mosaic_operands.make_mosaic_plan(qw, 1, jnp.bfloat16, TEST_CONFIG)
  buckets = mosaic_operands.outlier_buckets(qw, plan)
  assert int(buckets.offsets[-1]) == qw.meta.nnz and int(buckets.offsets[0]) == 0
  assert (np.diff(np.asarray(buckets.offsets)) >= 0).all()
  total = sum(float(np.abs(mosaic_operands.outlier_patch_reference(buckets, plan, j, t)).sum())
              for j in range(plan.n_blocks) for t in range(plan.k_tiles))
  np.testing.assert_allclose(total, np.abs(np.asarray(qw.outlier_values, np.float32)).sum(),
                             rtol=1e-6)
