"""Pallas kernel for packed 2/3/4-bit weights, Mosaic GPU backend (Hopper: TMA + wgmma).

Swap-AB: the decoded weights are the wgmma M operand and the tokens its N, so a decode batch
of 1-16 tokens is padded to N = 8 / 16 rather than to M = 64. Program (j, b, s) of the grid
(n_blocks, token_blocks, k_splits) owns output channels [j·bn, (j+1)·bn), tokens
[b·tb, (b+1)·tb) and a contiguous run of K tiles; it writes a partial [bn, tb] that XLA sums
over s (deterministic, no atomics). Per K tile t (an `emit_pipeline` step: TMA loads of the
x tile, the code words and the statistic rows, `max_concurrent_steps` = BlockConfig.num_stages
in flight):
  1. decode in registers: the [R, bn] uint32 word tile(s) are read transposed ([bn, R], layout
     WGMMA_TRANSPOSED); slot v gives the codes of tile rows S·r + v (decode.slot_values, the
     same static shifts as the Triton GEMV path); w_v = scale · (q − zero) (+ outlier patch) in
     f32, rounded to the operand dtype and stored into columns v·R.. of the swizzled [bn, bk]
     weight tile in shared memory (mosaic_operands.py: slot order, x is permuted to match);
  2. wgmma(acc [bn, tb] f32, weight tile [bn, bk], x tileᵀ [bk, tb]), awaited before the next
     decode overwrites the tile.
The wgmma A operand (BlockConfig.wgmma_a): the container stores the words [K·bits/32, N] (N
contiguous), so the register layout a decoded slot reaches is WGMMA_TRANSPOSED ([bn, R] read
through a transposed ref; lax.transpose has no Mosaic Lane-semantics lowering, and wgmma
rejects that layout as a register A: "ValueError: Unsupported A register array layout").
  "smem"       (default) step 1 stores every slot into the swizzled [bn, bk] tile in shared
               memory and one wgmma per tile reads it (a transposed ref) as above;
  "registers"  each slot's [bn, R] array is relaid out to WGMMA in registers (`layout_cast`:
               one shfl.bfly + prmt per register pair, FragmentedArray.to_layout) and fed to
               its own wgmma with x slot v [tb, R] (x pipelined as [S, tb, R] blocks, R·2-byte
               swizzle), no shared-memory round trip; needs R ≥ 16 (the 16-bit wgmma K step),
               so bk ≥ 128 (4 bits), 256 (2 bits), 512 (3 bits).
Which is faster is for the GPU benchmark to say; both lower and emulate exactly.
Statistics per tile: bk / g rows (or one row when g > bk) of [rows, N]; each row is a [bn]
vector broadcast over the R columns and selected by column range (`_class_stat`: for g ≥ S the
row of column r is r // (g / S); for g < S slot class h = v // g reads row r·S/g + h). "qq"
(SpQR) rows are decoded in-kernel from the packed first-level codes (one 32-row chunk per
tile) and the f16 second level (`_qq_stat_row`: s2 · (code − z2), f32).
Outliers (BlockConfig.outliers): the CSR entries are bucketed per (block, tile) in XLA
(mosaic_operands.outlier_buckets); "fused": the dense kernel scatters its bucket's values into
an f16 [bk, bn] patch in shared memory (scalar stores), adds the patch to the decoded weights
and clears it, so the tensor cores multiply the outliers with the x tile already in shared
memory; "separate": a second launch of the same kernel without codes or statistics multiplies
only the patches of the tiles that have outliers (two Mosaic calls; compare the cost with
experiments/bench_kernels.py).
Dtypes: wgmma takes 16-bit inputs; f16 x stays f16, bf16 and f32 x (and any other dtype) are
multiplied as bf16 with f32 accumulation (f32 x therefore has bf16 input rounding: the f32
tolerance of the shared suite does not apply to this implementation, see test_gpu.py). Any
batch runs in the kernel: prefill batches (B up to hundreds) use token blocks of up to 128,
each re-decoding the weight tiles into the wgmma (a quantized model never falls back to a dense
dequantized copy); mosaic_operands.make_mosaic_plan shrinks the token block (to 64), then bk,
then the token block again until a launch's shared memory fits SMEM_BUDGET (200 KiB).

What the CPU checks: the kernel lowers for CUDA on every test case, batch, dtype and outlier
mode (tests/kernels/test_lowering.py, `stablehlo.custom_call @mosaic_gpu_v2`); its body
(`decode_tile`, `patch_only_tile` with `MosaicIO` swapped for plain arrays) reproduces
x @ round(W)ᵀ to f32 accumulation order (mosaic_emulation.py,
tests/kernels/packed_matmul/test_mosaic_emulation.py). The Mosaic primitives themselves (TMA,
layouts, wgmma, barriers) run only on a Hopper GPU (tests/kernels/packed_matmul/test_gpu.py).
Interpret mode is NOT used: on
JAX 0.10.2 Mosaic GPU's interpreter (jax._src.pallas.mosaic_gpu.interpret.InterpretGPUParams,
not exported) fails on this kernel's primitives: `plgpu.load` of a tiled ref ->
"AssertionError: ((5,), (8, 32))" (core.py transform_type), `plgpu.layout_cast` ->
"NotImplementedError: MLIR translation rule for primitive 'layout_cast' not found for platform
cpu", a transposed ref (needed for swap-AB) -> "ValueError: Unsupported transform:
TransposeTransform(permutation=(1, 0))". Known Mosaic GPU lowering limits shaping this code:
≤ 256 elements per block dimension, iota layouts annotated (`layout_cast`), TMA rows of ≥ 16
bytes and copies of a multiple of 128 bytes (mosaic_operands.second_level_group), no dynamic
scalar index into a tiled ref ("Expected slice start ... to be divisible by the tile size
(8)", hence the untiled patch buffer), no in-register transpose or reshape of decoded tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cdquant_jax.kernels.packed_matmul import decode
from cdquant_jax.kernels.packed_matmul import mosaic_operands as ops
from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.quant import packing
from cdquant_jax.quant.qweight import QuantizedWeight

try:  # Mosaic GPU ships with jaxlib; the registry reports why when it cannot be imported
  from jax.experimental.pallas import mosaic_gpu as plgpu
  IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the installed JAX
  plgpu, IMPORT_ERROR = None, e

F32 = jnp.float32
SWIZZLE = 128  # bytes; a 16-bit tile row of 64 elements, a uint32 row of 32


def _tile_transforms(itemsize: int):
  """TMA/wgmma shared-memory layout: (8, 128 B) tiles, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, SWIZZLE // itemsize)), plgpu.SwizzleTransform(SWIZZLE))


def _tile_layout():
  """Register layout of a decoded [bn, R] array (the transpose of a wgmma [R, bn] tile)."""
  return plgpu.Layout.WGMMA_TRANSPOSED


def _row_layout():
  """Register layout of a [bn] vector that broadcasts over the R columns of a tile."""
  return plgpu.Layout.WGMMA_TRANSPOSED.reduce(1)


class MosaicIO:
  """The kernel body's shared-memory reads/writes and index arrays on Mosaic GPU (layouts
  annotated). mosaic_emulation.EmulatedIO provides the same methods on plain arrays, so the
  decode below runs on CPU for its numerics."""

  @staticmethod
  def read_transposed(ref) -> jax.Array:
    """[R, bn] shared-memory tile -> [bn, R] register array in the tile layout."""
    return plgpu.layout_cast(plgpu.transpose_ref(ref, (1, 0))[...], _tile_layout())

  @staticmethod
  def read_patch(patch_ref, v: int, plan) -> jax.Array:
    """Slot v's rows of the untiled f16 [bk, bn] patch -> f32 [bn, R] in the tile layout (an
    unoptimized transfer: the untiled buffer has no bank-conflict-free pattern)."""
    rows = patch_ref.at[pl.ds(v * plan.rows, plan.rows)]
    return plgpu.load(plgpu.transpose_ref(rows, (1, 0)), (), layout=_tile_layout(),
                      optimized=False).astype(F32)

  @staticmethod
  def read_row(ref, i: int) -> jax.Array:
    """Row i of a [rows, bn] shared-memory block -> [bn] (stored dtype) in the row layout."""
    return plgpu.layout_cast(ref[i], _row_layout())

  @staticmethod
  def column_index(plan) -> jax.Array:
    """int32 [bn, R]: the column r of every element."""
    iota = jax.lax.broadcasted_iota(jnp.int32, (plan.bn, plan.rows), 1)
    return plgpu.layout_cast(iota, _tile_layout())

  @staticmethod
  def channel_index(plan) -> jax.Array:
    """int32 [bn]: the output channel (within the block) of every element of a row vector."""
    iota = jax.lax.broadcasted_iota(jnp.int32, (plan.bn,), 0)
    return plgpu.layout_cast(iota, _row_layout())

  @staticmethod
  def store_slot(w_smem, w: jax.Array, v: int, plan) -> None:
    """Write slot v's [bn, R] weights into columns v·R.. of the [bn, bk] tile (stored
    [bk, bn]), rounded to the operand dtype."""
    target = plgpu.transpose_ref(w_smem.at[pl.ds(v * plan.rows, plan.rows)], (1, 0))
    target[...] = w.astype(plan.operand_dtype)


def _broadcast_row(row: jax.Array, rows: int) -> jax.Array:
  """[bn] -> [bn, R]: the same value in every column."""
  return jax.lax.broadcast_in_dim(row, (row.shape[0], rows), (0,))


def class_rows(spec: plan_lib.StatSpec, plan: ops.MosaicPlan, h: int) -> list[tuple[int, int]]:
  """(first column r, tile-local statistic row) runs of slot class h, in column order.

  Column r of slot v is tile row S·r + v, statistic row (S·r + v) // g: for g ≥ S it is
  r // (g / S) whatever v (one class); for g < S, class h = v // g reads row r·S/g + h. When
  one statistic row covers the tile (g ≥ bk) it is row 0 of the tile's one-row block.
  """
  S, R, g = plan.slots, plan.rows, spec.g
  if g >= plan.bk:
    return [(0, 0)]
  if g >= S:
    per_row = g // S  # columns per statistic row
    return [(r, r // per_row) for r in range(0, R, per_row)]
  return [(r, r * (S // g) + h) for r in range(R)]


def class_count(spec: plan_lib.StatSpec, plan: ops.MosaicPlan) -> int:
  """Slot classes with their own statistic array: S / g for g < S, else 1."""
  return plan.slots // spec.g if spec.g < plan.slots else 1


def _class_stat(row_of, runs, plan: ops.MosaicPlan, column: jax.Array) -> jax.Array:
  """f32 [bn, R] from the row vectors `row_of(i)` placed on their column runs (selects)."""
  _, row = runs[0]
  stat = _broadcast_row(row_of(row), plan.rows)
  for start, row in runs[1:]:
    stat = jnp.where(column >= start, _broadcast_row(row_of(row), plan.rows), stat)
  return stat


def _scalar_slot(words: list[jax.Array], bits: int, slot) -> jax.Array:
  """Codes of the dynamic scalar slot `slot` (0..31) of one chunk's word rows -> uint32 [bn].

  Like decode.dynamic_slot_values but with a scalar slot: word selection by 0/1 multipliers
  (no select on a scalar predicate), shifts by scalar amounts.
  """
  pos = jnp.asarray(slot, jnp.uint32) * jnp.uint32(bits)
  word, shift = pos >> jnp.uint32(5), pos & jnp.uint32(31)
  base = sum(words[w] * (word == w).astype(jnp.uint32) for w in range(len(words)))
  nxt = sum(words[w] * (word + 1 == w).astype(jnp.uint32) for w in range(1, len(words)))
  straddles = (shift > jnp.uint32(32 - bits)).astype(jnp.uint32)
  # shift-left by 32 − shift only where the value straddles (never a 32-bit shift)
  carry = straddles * (jnp.uint32(32) - shift)
  high = (nxt << carry) * straddles
  return ((base >> shift) | high) & jnp.uint32(2**bits - 1)


def _qq_stat_row(io, refs, spec: plan_lib.StatSpec, plan: ops.MosaicPlan, first_row, i: int):
  """f32 [bn] first-level statistic of tile-local row i from in-kernel "qq" codes.

  refs: the chunk's word rows (1 flat block [bits, bn] or `bits` plane blocks [1, bn]), then
  the second-level scale and zero blocks [rows, bn / qq]. stat = s2 · (code − z2), f32.
  """
  n_code = 1 if packing.is_flat(spec.bits) else spec.bits
  code_refs, qs_ref, qz_ref = refs[:n_code], refs[n_code], refs[n_code + 1]
  if n_code == 1:
    words = [io.read_row(code_refs[0], w) for w in range(spec.bits)]
  else:
    words = [io.read_row(code_refs[w], 0) for w in range(spec.bits)]
  code = _scalar_slot(words, spec.bits, (first_row + i) % 32).astype(F32)
  group = ops.second_level_group(spec, plan)
  channel_group = io.channel_index(plan) // group
  qs = jnp.zeros((plan.bn,), F32)
  qz = jnp.zeros((plan.bn,), F32)
  for m in range(plan.bn // group):  # expand the second level over its channels
    qs = jnp.where(channel_group == m, qs_ref[i, m].astype(F32), qs)
    qz = jnp.where(channel_group == m, qz_ref[i, m].astype(F32), qz)
  return qs * (code - qz)


def _stat_first_row(spec: plan_lib.StatSpec, plan: ops.MosaicPlan, t):
  """Global statistic row of the tile's first row (the block index times rows per block)."""
  if spec.g >= plan.bk:
    return t // (spec.g // plan.bk)
  return t * (plan.bk // spec.g)


def _stat_reader(io, refs, spec: plan_lib.StatSpec, plan: ops.MosaicPlan, t):
  """row_of(i) -> f32 [bn] for the tile's statistic blocks (float or in-kernel "qq")."""
  if spec.kind == "float":
    return lambda i: io.read_row(refs[0], i).astype(F32)
  first_row = _stat_first_row(spec, plan, t)
  return lambda i: _qq_stat_row(io, refs, spec, plan, first_row, i)


def _n_stat_refs(spec: plan_lib.StatSpec) -> int:
  """Blocks one statistic occupies in a pipeline step: 1 (float) or code blocks + 2 (qq)."""
  if spec.kind == "float":
    return 1
  return (1 if packing.is_flat(spec.bits) else spec.bits) + 2


def decode_tile(io, sink, code_refs, scale_refs, zero_refs, patch_ref, t, plan):
  """Decode tile t slot by slot: sink(v, w_v) receives f32 [bn, R] weights (+ outlier patch).

  code_refs: [R, bn] uint32 blocks (1 flat or `bits` planes); scale_refs / zero_refs: the
  statistic blocks (stat_blocks); patch_ref: the f16 [bk, bn] outlier patch or None.
  """
  column = io.column_index(plan)
  planes = [io.read_transposed(ref) for ref in code_refs]  # [bn, R] uint32 each
  scales = [_class_stat(_stat_reader(io, scale_refs, plan.scale, plan, t),
                        class_rows(plan.scale, plan, h), plan, column)
            for h in range(class_count(plan.scale, plan))]
  zeros = [_class_stat(_stat_reader(io, zero_refs, plan.zero, plan, t),
                       class_rows(plan.zero, plan, h), plan, column)
           for h in range(class_count(plan.zero, plan))]
  for v in range(plan.slots):
    q = decode.slot_values(planes, plan.bits, v).astype(F32)
    w = scales[v // plan.scale.g if plan.scale.g < plan.slots else 0] * (
        q - zeros[v // plan.zero.g if plan.zero.g < plan.slots else 0])
    if patch_ref is not None:
      w = w + io.read_patch(patch_ref, v, plan)
    sink(v, w)


def patch_only_tile(io, sink, patch_ref, plan) -> None:
  """The separate outlier pass: the weights of every slot are the outlier patch alone."""
  for v in range(plan.slots):
    sink(v, io.read_patch(patch_ref, v, plan))


def _patch_tile(patch_ref, bucket, offsets_ref, positions_ref, values_ref, plan, clear: bool):
  """Scatter the bucket's outlier values into the f16 [bk, bn] patch (or zero them again)."""
  lo, hi = offsets_ref[bucket], offsets_ref[bucket + 1]

  def entry(e, carry):
    pos = positions_ref[e]
    row, col = pos // plan.bn, pos % plan.bn
    value = jnp.float16(0) if clear else patch_ref[row, col] + values_ref[e]
    patch_ref[row, col] = value.astype(jnp.float16)
    return carry

  jax.lax.fori_loop(lo, hi, entry, 0)


def split_operand_refs(refs, plan: ops.MosaicPlan, dense: bool):
  """(code refs, scale refs, zero refs) of one pipeline step's shared-memory blocks."""
  refs = list(refs)
  if not dense:
    return [], [], []
  code_refs, refs = refs[:plan.planes], refs[plan.planes:]
  n_scale = _n_stat_refs(plan.scale)
  return code_refs, refs[:n_scale], refs[n_scale:]


def _slot_wgmma(acc_ref, x_smem, v: int, w: jax.Array, plan: ops.MosaicPlan) -> None:
  """"registers" A operand: acc += w_v [bn, R] (relaid out to WGMMA) @ x slot vᵀ [R, tb]."""
  a = plgpu.layout_cast(w.astype(plan.operand_dtype), plgpu.Layout.WGMMA)
  plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_smem.at[v], (1, 0)))
  plgpu.wgmma_wait(1)  # the previous slot's wgmma is done; this one overlaps the next decode


def _kernel(*refs, plan: ops.MosaicPlan, specs, dense: bool, outliers: bool):
  n_in = len(specs) + 1 + 3 * outliers  # x, pipelined operands, (offsets, positions, values)
  x_gmem, operands_gmem = refs[0], refs[1:1 + len(specs)]
  bucket_refs = refs[1 + len(specs):n_in]
  o_gmem, o_smem, *scratch = refs[n_in:]
  w_smem = None if plan.registers_a else scratch.pop(0)
  patch_ref = scratch.pop(0) if outliers else None
  j, b, s = (jax.lax.axis_index(name) for name in ("n", "b", "s"))
  first_tile = s * plan.tiles_per_split
  if outliers:
    patch_ref[...] = jnp.zeros((plan.bk, plan.bn), jnp.float16)

  def accumulate(acc_ref):
    def multiply(t, x_smem, operand_smem):
      if plan.registers_a:
        sink = lambda v, w: _slot_wgmma(acc_ref, x_smem, v, w, plan)
      else:
        sink = lambda v, w: MosaicIO.store_slot(w_smem, w, v, plan)
      if outliers:
        _patch_tile(patch_ref, j * plan.k_tiles + t, *bucket_refs, plan, clear=False)
      if dense:
        code_refs, scale_refs, zero_refs = split_operand_refs(operand_smem, plan, dense)
        decode_tile(MosaicIO, sink, code_refs, scale_refs, zero_refs, patch_ref, t, plan)
      else:
        patch_only_tile(MosaicIO, sink, patch_ref, plan)
      if outliers:
        _patch_tile(patch_ref, j * plan.k_tiles + t, *bucket_refs, plan, clear=True)
      if not plan.registers_a:
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(w_smem, (1, 0)),
                    plgpu.transpose_ref(x_smem, (1, 0)))
      plgpu.wgmma_wait(0)  # before the next tile overwrites the weights and x slots

    def step(idx, x_smem, *operand_smem):
      t = first_tile + idx[0]
      if dense:
        multiply(t, x_smem, operand_smem)
        return
      offsets_ref = bucket_refs[0]  # the separate pass skips tiles without outliers
      bucket = j * plan.k_tiles + t
      pl.when(offsets_ref[bucket + 1] > offsets_ref[bucket])(
          lambda: multiply(t, x_smem, operand_smem))

    pipeline_specs = [x_block(plan, b).spec(first_tile, j)] + [
        block.spec(first_tile, j) for block in specs]
    plgpu.emit_pipeline(step, grid=(plan.tiles_per_split,), in_specs=pipeline_specs,
                        max_concurrent_steps=plan.stages)(x_gmem, *operands_gmem)
    return acc_ref[...]

  acc = pl.run_scoped(accumulate, plgpu.ACC((plan.bn, plan.tb), F32))
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s, pl.ds(j * plan.bn, plan.bn),
                                            pl.ds(b * plan.tb, plan.tb)])
  plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------------------------
# Operands and their pipelined blocks. A Block binds a block shape to the block index of K tile t
# of output block j; the kernel turns it into a plgpu.BlockSpec over the pipeline index k
# (t = first tile of the program + k), mosaic_emulation slices the arrays with it.


@dataclasses.dataclass(frozen=True)
class Block:
  shape: tuple[int, ...]
  index_of_tile: Callable  # (t, j) -> block index
  # (8, swizzle / itemsize) tiles of the last two dims + `swizzle`-byte swizzle, or None
  swizzle: int | None = None
  itemsize: int = 4

  def spec(self, first_tile, j):
    transforms = ()
    if self.swizzle is not None:
      transforms = (plgpu.TilingTransform((8, self.swizzle // self.itemsize)),
                    plgpu.SwizzleTransform(self.swizzle))
    return plgpu.BlockSpec(self.shape, lambda k: self.index_of_tile(first_tile + k, j),
                           transforms=transforms)


def _block(shape, index_of_tile, swizzle: int | None = None, itemsize: int = 4) -> Block:
  return Block(tuple(shape), index_of_tile, swizzle, itemsize)


def x_block(plan: ops.MosaicPlan, b) -> Block:
  """Token block b's x tile: [tb, bk] ("smem") or [S, tb, R] ("registers", slot v at [v])."""
  itemsize = jnp.dtype(plan.operand_dtype).itemsize
  if plan.registers_a:  # a slot's R columns are one swizzle line (R·2 = 32 or 64 bytes)
    return _block((plan.slots, plan.tb, plan.rows), lambda t, j: (t, b, 0),
                  swizzle=min(SWIZZLE, plan.rows * itemsize), itemsize=itemsize)
  return _block((plan.tb, plan.bk), lambda t, j: (b, t), swizzle=SWIZZLE, itemsize=itemsize)


def code_blocks(qw: QuantizedWeight, plan: ops.MosaicPlan):
  """(operands, Blocks) of the weight codes: one [R, bn] block per plane and tile."""
  words = ops.code_operand(qw.codes, plan.bits, plan.k_tot, plan.n_pad)
  makers = [_block((plan.rows, plan.bn), lambda t, j, w=w: (w * plan.k_tiles + t, j),
                   swizzle=SWIZZLE) for w in range(plan.planes)]
  return [words] * plan.planes, makers


def _stat_block_index(spec: plan_lib.StatSpec, plan: ops.MosaicPlan):
  """(rows per block, index map (t, j) -> block index) of a statistic's per-tile rows."""
  rows = ops.stat_rows_per_tile(spec, plan)
  if spec.g >= plan.bk:
    return rows, lambda t, j: (t // (spec.g // plan.bk), j)
  return rows, lambda t, j: (t, j)


def stat_blocks(qw: QuantizedWeight, which: str, spec: plan_lib.StatSpec,
                plan: ops.MosaicPlan):
  arrays = ops.stat_operands(qw, which, spec, plan)
  rows, index = _stat_block_index(spec, plan)
  if spec.kind == "float":
    return arrays, [_block((rows, plan.bn), index)]
  codes, qs, qz = arrays
  chunk = lambda t: _stat_first_row(spec, plan, t) // 32
  if packing.is_flat(spec.bits):  # rows bits·c .. bits·c + bits − 1 of the flat words
    makers = [_block((spec.bits, plan.bn), lambda t, j: (chunk(t), j))]
    operands = [codes]
  else:  # plane w, chunk c: row w·chunks + c
    chunks = codes.shape[0] // spec.bits
    makers = [_block((1, plan.bn), lambda t, j, w=w: (w * chunks + chunk(t), j))
              for w in range(spec.bits)]
    operands = [codes] * spec.bits
  second = _block((rows, plan.bn // ops.second_level_group(spec, plan)), index)
  return operands + [qs, qz], makers + [second, second]


def dense_operands(qw: QuantizedWeight, plan: ops.MosaicPlan) -> tuple[list, list[Block]]:
  """(arrays, Blocks) the dense kernel pipelines: codes, then scale, then zero."""
  operands, blocks = [], []
  for arrays, array_blocks in (code_blocks(qw, plan),
                               stat_blocks(qw, "scale", plan.scale, plan),
                               stat_blocks(qw, "zero", plan.zero, plan)):
    operands += arrays
    blocks += array_blocks
  return operands, blocks


def _launch(plan: ops.MosaicPlan, x_slot, operands, makers, buckets, *, dense: bool,
            outliers: bool) -> jax.Array:
  """One Mosaic GPU kernel launch -> f32 [k_splits, n_pad, token_blocks·tb] partials."""
  dtype = jnp.dtype(plan.operand_dtype)
  scratch = [plgpu.SMEM((plan.bn, plan.tb), F32)]  # the output block
  if not plan.registers_a:  # the decoded weight tile, the wgmma A operand
    scratch.append(plgpu.SMEM((plan.bk, plan.bn), dtype,
                              transforms=_tile_transforms(dtype.itemsize)))
  extra = []
  if outliers:
    scratch.append(plgpu.SMEM((plan.bk, plan.bn), jnp.float16))
    extra = [buckets.offsets, buckets.positions, buckets.values]
  kernel = plgpu.kernel(
      functools.partial(_kernel, plan=plan, specs=makers, dense=dense, outliers=outliers),
      out_type=jax.ShapeDtypeStruct(
          (plan.k_splits, plan.n_pad, plan.token_blocks * plan.tb), F32),
      grid=(plan.n_blocks, plan.token_blocks, plan.k_splits), grid_names=("n", "b", "s"),
      scratch_types=scratch,
      kernel_name=f"packed_matmul_mosaic_w{plan.bits}" if dense else
      "packed_matmul_mosaic_outliers")
  return kernel(x_slot, *operands, *extra)


def _to_output(partials: jax.Array, batch: int, d_out: int) -> jax.Array:
  """[k_splits, n_pad, B_pad] partials -> f32 [batch, d_out]."""
  return jnp.sum(partials, axis=0)[:d_out, :batch].T


def mosaic_packed_matmul(x: jax.Array, qw: QuantizedWeight, *,
                         config: plan_lib.BlockConfig) -> jax.Array:
  """x [B, d_in] -> f32 [B, d_out] = x @ dequantize(qw)ᵀ (dense + outliers), any B."""
  if plgpu is None:
    raise ValueError(f"jax.experimental.pallas.mosaic_gpu cannot be imported ({IMPORT_ERROR})")
  plan = ops.make_mosaic_plan(qw, x.shape[0], x.dtype, config)
  x_slot = ops.x_operand(ops.x_slot_order(x, qw, plan), plan)
  operands, makers = dense_operands(qw, plan)
  buckets = ops.outlier_buckets(qw, plan) if qw.meta.nnz else None
  fused = buckets is not None and plan.fused_outliers
  partials = _launch(plan, x_slot, operands, makers, buckets, dense=True, outliers=fused)
  if buckets is not None and not fused:
    partials = partials + _launch(plan, x_slot, [], [], buckets, dense=False, outliers=True)
  return _to_output(partials, x.shape[0], qw.meta.d_out)
