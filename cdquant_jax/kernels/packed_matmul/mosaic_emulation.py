"""The Mosaic GPU kernel's body run on CPU with plain arrays (its numerics, without a GPU).

`emulate(x, qw, config)` executes pallas_mosaic.py's own `decode_tile` / `patch_only_tile` on
every program (j, b, s) and K tile t, with `EmulatedIO` in place of the Mosaic layout plumbing
(`MosaicIO`): the same plan, operands, Blocks (their index maps slice the arrays), slot order,
statistic runs, in-kernel "qq" decode and outlier buckets; the wgmma becomes an f32 matmul of
the operand-dtype tiles. What it does not check: the Mosaic primitives themselves (TMA, layouts,
wgmma), which only a GPU run (tests/kernels/packed_matmul/test_gpu.py) or the lowering tests
(tests/kernels/test_lowering.py) exercise. Slow (a Python loop over programs and tiles): for
the small test cases only.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from cdquant_jax.kernels.packed_matmul import mosaic_operands as ops
from cdquant_jax.kernels.packed_matmul import pallas_mosaic
from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.quant.qweight import QuantizedWeight

F32 = jnp.float32


class TileBuffer:
  """The [bk, bn] weight tile in "shared memory": a numpy array written per slot."""

  def __init__(self, plan: ops.MosaicPlan):
    self.values = np.zeros((plan.bk, plan.bn), np.float32)


class EmulatedIO:
  """MosaicIO's methods on jnp arrays (blocks already sliced from the operands)."""

  @staticmethod
  def read_transposed(block) -> jax.Array:
    return jnp.asarray(block).T  # [R, bn] -> [bn, R]

  @staticmethod
  def read_patch(patch, v: int, plan) -> jax.Array:
    # [R, bn] rows of slot v -> f32 [bn, R]
    return jnp.asarray(patch[v * plan.rows:(v + 1) * plan.rows]).T.astype(F32)

  @staticmethod
  def read_row(block, i: int) -> jax.Array:
    return jnp.asarray(block)[i]

  @staticmethod
  def column_index(plan) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (plan.bn, plan.rows), 1)

  @staticmethod
  def channel_index(plan) -> jax.Array:
    return jnp.arange(plan.bn, dtype=jnp.int32)

  @staticmethod
  def store_slot(tile: TileBuffer, w: jax.Array, v: int, plan) -> None:
    rounded = np.asarray(w.astype(plan.operand_dtype).astype(F32))  # [bn, R]
    tile.values[v * plan.rows:(v + 1) * plan.rows] = rounded.T


def _block_of(array, block: pallas_mosaic.Block, t: int, j: int) -> np.ndarray:
  """The block of `array` that the pipeline loads for tile t of output block j."""
  index = block.index_of_tile(t, j)
  starts = [i * s for i, s in zip(index, block.shape)]
  return np.asarray(array)[tuple(slice(a, a + s) for a, s in zip(starts, block.shape))]


def _tile_weights(qw, plan, operands, blocks, buckets, t: int, j: int, dense: bool,
                  outliers: bool) -> np.ndarray:
  """f32 [bk, bn] weights (operand-dtype values, slot order) the kernel multiplies at (j, t):
  what the "smem" path stores into its weight tile and the "registers" path feeds slot by
  slot (the same sums in another order)."""
  tile = TileBuffer(plan)
  sink = lambda v, w: EmulatedIO.store_slot(tile, w, v, plan)
  patch = None
  if outliers:
    patch = np.asarray(ops.outlier_patch_reference(buckets, plan, j, t)).astype(np.float16)
  if not dense:
    pallas_mosaic.patch_only_tile(EmulatedIO, sink, patch, plan)
    return tile.values
  refs = [_block_of(a, b, t, j) for a, b in zip(operands, blocks)]
  code_refs, scale_refs, zero_refs = pallas_mosaic.split_operand_refs(refs, plan, dense)
  pallas_mosaic.decode_tile(EmulatedIO, sink, code_refs, scale_refs, zero_refs, patch, t, plan)
  return tile.values


def _x_tile(x_array, plan, b: int, t: int) -> np.ndarray:
  """f32 [tb, bk] x tile (slot order) of token block b from the pipelined x operand."""
  block = _block_of(x_array, pallas_mosaic.x_block(plan, b), t, 0)
  if plan.registers_a:
    # [S, tb, R] -> [tb, S, R] -> [tb, bk]
    block = block.transpose(1, 0, 2).reshape(plan.tb, plan.bk)
  return block.astype(np.float32)


def _pass(x_array, qw, plan, operands, blocks, buckets, *, dense: bool, outliers: bool):
  """f32 [n_pad, token_blocks·tb] = Σ over programs and tiles of weight tileᵀ @ x tileᵀ."""
  out = np.zeros((plan.n_pad, plan.token_blocks * plan.tb), np.float32)
  x_f32 = np.asarray(jnp.asarray(x_array).astype(F32))  # operand-dtype values
  for j in range(plan.n_blocks):
    for t in range(plan.k_tiles):
      w = _tile_weights(qw, plan, operands, blocks, buckets, t, j, dense, outliers)
      for b in range(plan.token_blocks):
        # [bn, bk] @ [bk, tb] -> [bn, tb]
        out[j * plan.bn:(j + 1) * plan.bn, b * plan.tb:(b + 1) * plan.tb] += (
            w.T @ _x_tile(x_f32, plan, b, t).T)
  return out


def emulate(x: jax.Array, qw: QuantizedWeight, config: plan_lib.BlockConfig) -> np.ndarray:
  """f32 [B, d_out]: what pallas_mosaic.mosaic_packed_matmul computes, on CPU."""
  plan = ops.make_mosaic_plan(qw, x.shape[0], x.dtype, config)
  x_slot = ops.x_operand(ops.x_slot_order(x, qw, plan), plan)
  operands, blocks = pallas_mosaic.dense_operands(qw, plan)
  buckets = ops.outlier_buckets(qw, plan) if qw.meta.nnz else None
  fused = buckets is not None and plan.fused_outliers
  out = _pass(x_slot, qw, plan, operands, blocks, buckets, dense=True, outliers=fused)
  if buckets is not None and not fused:
    out = out + _pass(x_slot, qw, plan, [], [], buckets, dense=False, outliers=True)
  return out[:qw.meta.d_out, :x.shape[0]].T
