"""XLA-side plan and operands of the Mosaic GPU packed matmul (pallas_mosaic.py).

Everything here is plain jnp outside the kernel, testable on CPU. Glossary (see plan.py for
bits, G, g; shapes of one output block j of `bn` channels and one K tile t of `bk` rows):

  S      slots per packed row: 32 / bits for the flat layout (one word holds S codes), 32 for
         the 3-bit planes (one 32-row chunk spread over 3 word planes).
  R      packed rows per tile = bk / S (words for flat, chunks for planes); R is a multiple of 8
         so a [R, bn] uint32 tile is a whole number of (8, 32) TMA/swizzle tiles.
  slot order  slot v (0..S-1) of packed row r (0..R-1) is tile row S·r + v; the kernel decodes
         slot v of all R rows as one [bn, R] array and writes it to columns v·R .. v·R + R − 1
         of the weight tile, so x must be fed in the same order: `x_slot_order` permutes x's
         K axis per tile (x is tiny; the weights are never reordered).

Padding: operands whose K rows or N columns are not a whole number of tiles are zero-padded
here (a copy, only for odd shapes: d_in a multiple of bk and d_out of bn need none), so every
TMA block lies inside its array; padded codes and statistics are 0, padded x columns are 0,
so padded weights contribute nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.quant import packing
from cdquant_jax.quant.qweight import QuantizedWeight, outlier_rows

# Tokens per block at most (the wgmma N and the f32 accumulator's register footprint
# bn·tb/128 per thread: 128 at bn = tb = 128); decode batches use 8 or 16. Halved while the
# shared memory of a launch exceeds SMEM_BUDGET (H100: 227 KiB per block, some kept spare).
MAX_TOKEN_BLOCK = 128
SMEM_BUDGET = 200 * 1024
MIN_BLOCK_N = 64  # the wgmma M granule
MAX_BLOCK = 256  # Mosaic GPU TMA: at most 256 elements per dimension of a block copy


@dataclasses.dataclass(frozen=True)
class MosaicPlan:
  """Static description of one Mosaic GPU launch (hashable)."""

  bits: int
  slots: int  # S
  bk: int
  bn: int
  tb: int  # tokens per block (wgmma N, multiple of 8)
  token_blocks: int
  n_blocks: int
  k_tiles: int
  k_splits: int
  scale: plan_lib.StatSpec
  zero: plan_lib.StatSpec
  operand_dtype: str  # "bfloat16" | "float16": the wgmma inputs
  d_out: int
  fused_outliers: bool
  stages: int  # TMA pipeline steps in flight (BlockConfig.num_stages)
  registers_a: bool  # BlockConfig.wgmma_a == "registers": one wgmma per slot from registers

  @property
  def rows(self) -> int:  # R
    return self.bk // self.slots

  @property
  def n_pad(self) -> int:
    return self.n_blocks * self.bn

  @property
  def k_tot(self) -> int:
    return self.k_tiles * self.bk

  @property
  def tiles_per_split(self) -> int:
    return self.k_tiles // self.k_splits

  @property
  def planes(self) -> int:
    """Word planes of the codes: 1 (flat) or bits."""
    return 1 if packing.is_flat(self.bits) else self.bits


def slots_per_row(bits: int) -> int:
  return 32 // bits if packing.is_flat(bits) else 32


def operand_dtype_name(x_dtype) -> str:
  """wgmma takes 16-bit inputs: f16 stays f16, everything else (bf16, f32) becomes bf16."""
  return "float16" if jnp.dtype(x_dtype) == jnp.float16 else "bfloat16"


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def make_mosaic_plan(qw: QuantizedWeight, batch: int, x_dtype, config: plan_lib.BlockConfig
                     ) -> MosaicPlan:
  """Tile sizes for x [batch, d_in] @ qw; any batch (decode: one token block of 8 or 16)."""
  meta = qw.meta
  S = slots_per_row(meta.bits)
  # "smem": R ≥ 8 and x rows of ≥ 64 bf16 (one 128-byte swizzle line); "registers": R ≥ 16
  # (the wgmma K step of 16-bit inputs; x is blocked per slot, so bk may exceed 256)
  bk_min = max(128, 16 * S) if config.wgmma_a == "registers" else max(64, 8 * S)
  bk = max(bk_min, min(config.block_k, MAX_BLOCK))
  if not plan_lib.is_pow2(config.block_k):
    raise ValueError(f"BlockConfig.block_k must be a power of 2, got {config.block_k}")
  tb = min(MAX_TOKEN_BLOCK, -(-batch // 8) * 8)
  while True:  # shrink to the budget: tokens down to 64, then K rows, then tokens again
    plan = _plan_for(qw, batch, x_dtype, config, bk, tb)
    if tb == 8 or smem_bytes(plan, outliers=meta.nnz > 0) <= SMEM_BUDGET:
      return plan
    if tb > 64 or bk == bk_min:
      tb //= 2
    else:
      bk //= 2


def _plan_for(qw: QuantizedWeight, batch: int, x_dtype, config: plan_lib.BlockConfig,
              bk: int, tb: int) -> MosaicPlan:
  meta = qw.meta
  scale = plan_lib.stat_spec(qw, "scale", bk)
  zero = plan_lib.stat_spec(qw, "zero", bk)
  bn = min(MAX_BLOCK, max(MIN_BLOCK_N, config.block_n, scale.qq, zero.qq))
  bn = -(-bn // MIN_BLOCK_N) * MIN_BLOCK_N
  n_blocks = -(-meta.d_out // bn)
  k_tiles = -(-meta.k_pad // bk)
  token_blocks = -(-batch // tb)
  target = config.k_splits or max(1, 264 // (n_blocks * token_blocks))
  splits = _largest_divisor(k_tiles, target)
  return MosaicPlan(bits=meta.bits, slots=slots_per_row(meta.bits), bk=bk, bn=bn, tb=tb,
                    token_blocks=token_blocks, n_blocks=n_blocks, k_tiles=k_tiles,
                    k_splits=splits, scale=scale, zero=zero,
                    operand_dtype=operand_dtype_name(x_dtype), d_out=meta.d_out,
                    fused_outliers=config.outliers == "fused",
                    stages=max(1, min(config.num_stages, k_tiles // splits)),
                    registers_a=config.wgmma_a == "registers")


def smem_bytes(plan: MosaicPlan, outliers: bool) -> int:
  """Shared memory of the dense launch (the larger one): pipelined x and code blocks per
  stage, the weight tile ("smem" A operand only), the output block and (outliers) the f16
  patch; statistics blocks (≤ a few KiB) are not counted."""
  x_block = plan.tb * plan.bk * 2
  code_block = plan.planes * plan.rows * plan.bn * 4
  weight_tile = 0 if plan.registers_a else plan.bk * plan.bn * 2
  out_block = plan.bn * plan.tb * 4
  patch = plan.bk * plan.bn * 2 if outliers else 0
  return plan.stages * (x_block + code_block) + weight_tile + out_block + patch


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pad `a` at the end of every axis to `shape` (no copy when it already fits)."""
  if a.shape == tuple(shape):
    return a
  return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)])


def slot_permutation(bk: int, slots: int) -> jax.Array:
  """int32 [bk]: position v·R + r of the tile holds tile row S·r + v (R = bk / S)."""
  rows = bk // slots
  # [S, R] -> [bk]: entry (v, r) = S·r + v
  return (jnp.arange(rows)[None, :] * slots + jnp.arange(slots)[:, None]).reshape(bk)


def x_slot_order(x: jax.Array, qw: QuantizedWeight, plan: MosaicPlan) -> jax.Array:
  """x [B, d_in] -> [token_blocks·tb, k_tot] in storage order, slot order per tile, padded,
  cast to the wgmma operand dtype."""
  if qw.perm is not None:
    x = jnp.take(x, qw.perm, axis=1)
  x = pad_to(x, (plan.token_blocks * plan.tb, plan.k_tot)).astype(plan.operand_dtype)
  b = x.shape[0]
  # [B, k_tot] -> [B, k_tiles, R, S] -> [B, k_tiles, S, R] -> [B, k_tot]
  x = x.reshape(b, plan.k_tiles, plan.rows, plan.slots).transpose(0, 1, 3, 2)
  return x.reshape(b, plan.k_tot)


def x_operand(x_slot: jax.Array, plan: MosaicPlan) -> jax.Array:
  """The x array the kernel pipelines: [B_pad, k_tot] ("smem": one [tb, bk] block per tile),
  or [k_tiles·S, B_pad, R] ("registers": one [S, tb, R] block per tile, slot v at [v])."""
  if not plan.registers_a:
    return x_slot
  b = x_slot.shape[0]
  # [B_pad, k_tot] -> [B_pad, k_tiles·S, R] -> [k_tiles·S, B_pad, R]
  return x_slot.reshape(b, plan.k_tiles * plan.slots, plan.rows).transpose(1, 0, 2)


def code_operand(words: jax.Array, bits: int, rows: int, n_pad: int) -> jax.Array:
  """Packed codes of `rows` logical rows (a multiple of 32) as a 2-D uint32 array: flat
  [rows·bits/32, n_pad]; planes [bits·rows/32, n_pad] (plane w = rows w·rows/32 onwards)."""
  if packing.is_flat(bits):
    return pad_to(words, (rows * bits // 32, n_pad))
  planes = pad_to(words, (bits, rows // 32, n_pad))
  # [bits, rows/32, n_pad] -> [bits·rows/32, n_pad] (contiguous: no copy)
  return planes.reshape(bits * (rows // 32), n_pad)


def stat_rows_needed(spec: plan_lib.StatSpec, plan: MosaicPlan) -> int:
  """Statistic rows the tiles read: k_tot / g, at least 1 (g may exceed k_tot)."""
  return max(1, -(-plan.k_tot // spec.g))


def stat_rows_per_tile(spec: plan_lib.StatSpec, plan: MosaicPlan) -> int:
  """Statistic rows one K tile reads: bk / g, or 1 when one row covers the tile (g ≥ bk)."""
  return 1 if spec.g >= plan.bk else plan.bk // spec.g


def second_level_group(spec: plan_lib.StatSpec, plan: MosaicPlan) -> int:
  """Output channels per stored second-level column as the kernel reads it: qq, halved (the
  columns repeated here) until a block row is ≥ 16 bytes and a block a multiple of 128 bytes
  (TMA strides, and Mosaic copies a multiple of the warpgroup's 128 threads); no repeat at
  bn = 128, qq = 16, bk / g ≥ 8."""
  group = spec.qq
  rows = stat_rows_per_tile(spec, plan)
  while group > 1 and ((plan.bn // group) * 2 < 16 or (rows * (plan.bn // group) * 2) % 128):
    group //= 2
  return group


def stat_operands(qw: QuantizedWeight, which: str, spec: plan_lib.StatSpec,
                  plan: MosaicPlan) -> list[jax.Array]:
  """The arrays the kernel reads for one statistic, padded to whole blocks.

  "float": [stat rows, n_pad] (f16/f32 as stored, or the f32 first level of a "qq" statistic
  that cannot be decoded in-kernel). "qq": [codes (code_operand), qq_scale, qq_zero] with the
  second level [stat rows, n_pad / qq].
  """
  rows = stat_rows_needed(spec, plan)
  arrays = plan_lib.stat_operands(qw, which, spec)
  if spec.kind == "float":
    return [pad_to(arrays[0], (rows, plan.n_pad))]
  codes, qs, qz = arrays
  code_rows = -(-rows // 32) * 32
  group = second_level_group(spec, plan)
  second = (rows, plan.n_pad // group)
  # [n_groups_pad, N / qq] -> [n_groups_pad, N / group]: each column repeated qq / group times
  qs, qz = (jnp.repeat(a, spec.qq // group, axis=1) for a in (qs, qz))
  return [code_operand(codes, spec.bits, code_rows, plan.n_pad), pad_to(qs, second),
          pad_to(qz, second)]


@dataclasses.dataclass(frozen=True)
class OutlierBuckets:
  """The CSR outliers regrouped per (output block j, K tile t) for the kernel's tile patch.

  offsets int32 [n_blocks·k_tiles + 1]: entries of bucket j·k_tiles + t are
  [offsets[i], offsets[i+1]) of `positions` (int32, (v·R + r)·bn + n_local inside the tile's
  [bk, bn] slot-ordered patch) and `values` (f16, ADDITIVE like the container's).
  """

  offsets: jax.Array
  positions: jax.Array
  values: jax.Array


def outlier_buckets(qw: QuantizedWeight, plan: MosaicPlan) -> OutlierBuckets:
  """Bucket the outliers by (block, tile) with their slot-ordered position (XLA, O(nnz log))."""
  meta = qw.meta
  rows = outlier_rows(qw)  # [nnz] output channel
  cols = qw.outlier_col_idx  # [nnz] ORIGINAL input order
  if qw.perm is not None:  # storage position k of original column perm[k]
    inverse = jnp.zeros((meta.d_in,), jnp.int32).at[qw.perm].set(
        jnp.arange(meta.d_in, dtype=jnp.int32))
    cols = inverse[cols]
  tile, within = cols // plan.bk, cols % plan.bk
  slot_row = (within % plan.slots) * plan.rows + within // plan.slots
  bucket = (rows // plan.bn) * plan.k_tiles + tile
  order = jnp.argsort(bucket, stable=True)
  bucket = bucket[order]
  positions = (slot_row * plan.bn + rows % plan.bn)[order].astype(jnp.int32)
  offsets = jnp.searchsorted(bucket, jnp.arange(plan.n_blocks * plan.k_tiles + 1),
                             side="left").astype(jnp.int32)
  return OutlierBuckets(offsets, positions, qw.outlier_values[order].astype(jnp.float16))


def outlier_patch_reference(buckets: OutlierBuckets, plan: MosaicPlan, j: int, t: int
                            ) -> jax.Array:
  """The f32 [bk, bn] slot-ordered patch the kernel builds for block j, tile t (for tests)."""
  i = j * plan.k_tiles + t
  lo, hi = int(buckets.offsets[i]), int(buckets.offsets[i + 1])
  patch = jnp.zeros((plan.bk * plan.bn,), jnp.float32)
  patch = patch.at[buckets.positions[lo:hi]].add(buckets.values[lo:hi].astype(jnp.float32))
  # [bk·bn] -> [bk, bn]
  return patch.reshape(plan.bk, plan.bn)
