"""Static kernel plan (tile sizes, statistic formats) and the operands a Pallas kernel reads.

Everything here runs outside the kernel (XLA, traced under jit) and is shared by the Pallas
implementations. Glossary (shapes of one output block j of `bn` channels):

  bits   weight code width; "flat" layout when bits divides 32 (2, 4), else "planes" (3).
  bk     K rows per tile (power of 2, divides k_pad); kw = bk / 32 chunk rows per tile.
  g      rows per statistic row as the kernel sees it (a power of 2): G itself, or the largest
         power of 2 dividing G after the statistic rows were repeated G / g times here.
  class  slots v of a chunk (v = 0..31) with the same statistic row: v // g for g < 32 (32 / g
         classes), one class for g ≥ 32. Per tile the kernel builds one [kw, bn] scale and zero
         per class, then decodes slot v of every chunk row as a [kw, bn] array.

Input permutation: the kernel reads x in STORAGE order; `x_storage` applies x[:, perm] here,
as an XLA gather on the small [B, d_in] activation (a Pallas GPU kernel cannot gather from
registers), and zero-pads B and K.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cdquant_jax.quant import packing
from cdquant_jax.quant.qweight import QuantizedWeight, first_level_stat

COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# BlockConfig.outliers: "separate" = a second kernel adds the CSR outliers; "fused" = the dense
# kernel adds them itself (x is already in its shared memory).
OUTLIER_MODES = ("separate", "fused")
# BlockConfig.wgmma_a (pallas_mosaic only): where the wgmma reads the decoded weights from.
WGMMA_A_SOURCES = ("smem", "registers")
# Fields only one backend reads (`BlockConfig.require_defaults` refuses them elsewhere).
MOSAIC_ONLY = ("wgmma_a",)
TRITON_ONLY = ("reduce_max_batch", "max_batch", "num_warps", "outlier_rows", "outlier_chunk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig:
  """Tile sizes and launch parameters (all powers of 2 where they are sizes).

  pallas_mosaic reads them as: block_n rounded up to a multiple of 64 (the wgmma M granule,
  ≤ 256); block_k raised to the minimum its layout needs (mosaic_operands.make_mosaic_plan) and
  not required to divide k_pad; k_splits as here; num_stages = TMA pipeline depth; outliers and
  wgmma_a. reduce_max_batch, max_batch, num_warps (one warpgroup), outlier_rows and
  outlier_chunk are Triton-only (TRITON_ONLY: pallas_mosaic refuses them unless at their
  defaults, as pallas_triton refuses wgmma_a).
  """

  # Output channels per program (the last block may overhang d_out; its extra columns are
  # computed on padding and dropped).
  block_n: int = 128
  # Upper bound on K rows per tile; the plan takes the largest power of 2 ≤ this dividing k_pad.
  block_k: int = 256
  # Programs along K; each owns a contiguous run of tiles and writes a partial output that XLA
  # sums. 0 = heuristic (enough programs for ~2 waves on a 132-SM GPU).
  k_splits: int = 0
  # Batch rows at or below which the kernel accumulates on CUDA cores (jnp.sum(w * x)); above,
  # the batch is padded to 16 and multiplied with a dot (tl.dot needs every dim ≥ 16).
  reduce_max_batch: int = 1
  # Batches above this are not worth a weight-streaming kernel: dequantize + dense dot.
  max_batch: int = 16
  num_warps: int = 4
  num_stages: int = 2
  # Outlier kernel: output rows per program and CSR entries per vector step.
  outlier_rows: int = 16
  outlier_chunk: int = 32
  # Where the CSR outliers are added: "separate" (own kernel) or "fused" (in the dense kernel);
  # an implementation that cannot honour the value raises ValueError (see require_outliers).
  outliers: str = "separate"
  # pallas_mosaic: "smem" = the decoded [bn, bk] tile is stored to shared memory and one wgmma
  # reads it; "registers" = each slot's decoded [bn, R] array is relaid out in registers
  # (WGMMA_TRANSPOSED -> WGMMA, a shuffle) and fed to its own wgmma (needs R ≥ 16, so bk ≥ 128
  # for 4 bits, 256 for 2, 512 for 3). pallas_triton refuses "registers".
  wgmma_a: str = "smem"

  def __post_init__(self):
    if self.outliers not in OUTLIER_MODES:
      raise ValueError(f"BlockConfig.outliers must be one of {OUTLIER_MODES}, "
                       f"got {self.outliers!r}")
    if self.wgmma_a not in WGMMA_A_SOURCES:
      raise ValueError(f"BlockConfig.wgmma_a must be one of {WGMMA_A_SOURCES}, "
                       f"got {self.wgmma_a!r}")

  def require_defaults(self, implementation: str, fields: tuple[str, ...]) -> None:
    """ValueError naming the first of `fields` (ones `implementation` does not read) set to
    other than its default: such a setting would be accepted and change nothing."""
    for field in fields:
      default = next(f.default for f in dataclasses.fields(self) if f.name == field)
      if getattr(self, field) != default:
        raise ValueError(f"BlockConfig.{field}={getattr(self, field)!r} has no effect on "
                         f"{implementation!r}; leave it at {default!r}")

  def require_outliers(self, implementation: str, supported: tuple[str, ...]) -> None:
    """ValueError naming the field and value when `implementation` cannot honour it."""
    if self.outliers not in supported:
      raise ValueError(f"BlockConfig.outliers={self.outliers!r} is not supported by "
                       f"{implementation!r} (supported: {supported})")


@dataclasses.dataclass(frozen=True)
class StatSpec:
  """How the kernel reads one first-level statistic ("scale" or "zero")."""

  kind: str  # "float": rows [n, N] f16/f32; "qq": packed codes + second-level f16 stats
  g: int  # weight rows per statistic row (power of 2)
  qq: int = 0  # output channels per second-level group ("qq" only; power of 2)
  bits: int = 0  # code width of the statistic ("qq" only)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one kernel launch (hashable)."""

  bits: int
  d_out: int
  k_pad: int
  bk: int
  bn: int
  batch_pad: int
  dot: bool  # True: tl.dot on a 16-row padded batch; False: CUDA-core reduction
  k_tiles: int
  k_splits: int
  scale: StatSpec
  zero: StatSpec
  compute_dtype: str

  @property
  def kw(self) -> int:
    return self.bk // 32

  @property
  def n_blocks(self) -> int:
    return -(-self.d_out // self.bn)

  @property
  def tiles_per_split(self) -> int:
    return -(-self.k_tiles // self.k_splits)


def _pow2_divisor(n: int, cap: int) -> int:
  """Largest power of 2 that divides n and is ≤ cap."""
  p = 1
  while n % (2 * p) == 0 and 2 * p <= cap:
    p *= 2
  return p


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """bf16 / f16 / f32 activations are multiplied in their dtype; anything else as f32."""
  return jnp.dtype(x.dtype) if jnp.dtype(x.dtype) in COMPUTE_DTYPES else jnp.dtype(jnp.float32)


def stat_spec(qw: QuantizedWeight, which: str, bk: int) -> StatSpec:
  """Kernel-side format of a statistic: in-kernel "qq" decode when the shapes allow it."""
  meta = qw.meta
  G = meta.group_size
  if (getattr(meta, f"{which}_format") == "qq" and is_pow2(G) and is_pow2(meta.qq_groupsize)
      and bk <= 32 * G):
    return StatSpec("qq", G, meta.qq_groupsize, meta.stat_bits(which))
  return StatSpec("float", _pow2_divisor(G, 1 << 30))


def make_plan(qw: QuantizedWeight, batch: int, x_dtype, config: BlockConfig) -> Plan:
  """The static plan for x [batch, d_in] @ qw (batch ≤ config.max_batch)."""
  meta = qw.meta
  for name in ("block_n", "block_k", "outlier_rows", "outlier_chunk"):
    if not is_pow2(getattr(config, name)):
      raise ValueError(f"BlockConfig.{name} must be a power of 2, got {getattr(config, name)}")
  if config.block_k < 32:
    raise ValueError(f"BlockConfig.block_k must be ≥ 32, got {config.block_k}")
  bk = _pow2_divisor(meta.k_pad, config.block_k)
  for which in ("scale", "zero"):  # in-kernel "qq" decode needs a tile within one stat chunk
    if getattr(meta, f"{which}_format") == "qq" and is_pow2(meta.group_size):
      bk = min(bk, 32 * meta.group_size)
  dot = batch > config.reduce_max_batch
  batch_pad = 16 if dot else max(1, 1 << (batch - 1).bit_length())
  k_tiles = meta.k_pad // bk
  scale, zero = stat_spec(qw, "scale", bk), stat_spec(qw, "zero", bk)
  bn = max(config.block_n, scale.qq, zero.qq)  # a block holds whole second-level groups
  splits = config.k_splits or max(1, min(k_tiles, 264 // -(-meta.d_out // bn)))
  return Plan(bits=meta.bits, d_out=meta.d_out, k_pad=meta.k_pad, bk=bk, bn=bn,
              batch_pad=batch_pad, dot=dot, k_tiles=k_tiles, k_splits=min(splits, k_tiles),
              scale=scale, zero=zero,
              compute_dtype=compute_dtype_name(x_dtype))


def compute_dtype_name(x_dtype) -> str:
  dt = jnp.dtype(x_dtype)
  return dt.name if dt in COMPUTE_DTYPES else "float32"


def x_storage(x: jax.Array, qw: QuantizedWeight, plan: Plan) -> jax.Array:
  """x [B, d_in] -> [batch_pad, k_pad] in storage order (x[:, perm]), zero-padded, cast."""
  if qw.perm is not None:
    x = jnp.take(x, qw.perm, axis=1)
  b, d_in = x.shape
  x = jnp.pad(x, ((0, plan.batch_pad - b), (0, plan.k_pad - d_in)))
  return x.astype(plan.compute_dtype)


def stat_operands(qw: QuantizedWeight, which: str, spec: StatSpec) -> list[jax.Array]:
  """The arrays the kernel reads for one statistic.

  "float": [rows, N] with one row per `spec.g` weight rows (repeated here when G is not a
  power of 2: G / g copies of each row). "qq": [codes, qq_scale, qq_zero] as stored.
  """
  meta = qw.meta
  if spec.kind == "qq":
    return [getattr(qw, which), getattr(qw, f"{which}_qq_scale"),
            getattr(qw, f"{which}_qq_zero")]
  stat = getattr(qw, which) if getattr(meta, f"{which}_format") != "qq" else \
      first_level_stat(qw, which)
  repeat = meta.group_size // spec.g
  if repeat > 1:
    # [n_groups_pad, N] -> [n_groups_pad·G/g, N]: one row per g storage rows
    stat = jnp.repeat(stat, repeat, axis=0)
  return [stat]


def code_planes(qw: QuantizedWeight) -> list[jax.Array]:
  """Weight codes as the kernel receives them: flat [k_pad·bits/32, N] once, or planes
  [bits, k_pad/32, N] once per plane (each read with a squeezed plane axis)."""
  if packing.is_flat(qw.meta.bits):
    return [qw.codes]
  return [qw.codes] * qw.meta.bits
