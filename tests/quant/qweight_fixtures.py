"""Synthetic SpQR-like and GPTQ-like SolveResults built independently in numpy float32."""

import numpy as np

from cdquant_jax.quant.grids import Flavor, Grid
from cdquant_jax.solvers.result import SolveResult, SpQRStats


def f16(x) -> np.ndarray:
  """Values rounded to float16, kept as float32."""
  return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def group_index_of(rng, d_in: int, G: int, act_order: bool) -> np.ndarray:
  """[d_in] groups: contiguous, or contiguous in a random processing order (act-order)."""
  order = rng.permutation(d_in) if act_order else np.arange(d_in)
  group_index = np.empty(d_in, np.int32)
  group_index[order] = np.arange(d_in) // G
  return group_index


def _second_level(rng, d_out, n_groups, qq, bits):
  """(codes [d_out, n_groups], qq_scale, qq_zero [d_out/qq, n_groups], dequantized stat)."""
  codes = rng.integers(0, 2**bits, size=(d_out, n_groups)).astype(np.int32)
  qq_scale = f16(rng.uniform(1e-3, 2e-2, size=(d_out // qq, n_groups)))
  qq_zero = f16(rng.uniform(0, 2**bits - 1, size=(d_out // qq, n_groups)))
  # SpQR dequantization per run of qq rows, in float32: s2 · (code − z2)
  stat = np.repeat(qq_scale, qq, axis=0) * (codes.astype(np.float32) - np.repeat(qq_zero, qq, axis=0))
  return codes, qq_scale, qq_zero, stat.astype(np.float32)


def spqr_like_result(rng, *, d_out=32, d_in=48, bits=3, G=16, qq=16, qq_bits=3,
                     quantize_zero=True, act_order=True, outlier_share=0.05) -> SolveResult:
  """A result with SpQR's second-level stats; outliers Q = dense + f32(f16(delta)) (storable)."""
  n_groups = d_in // G
  levels = dict(qq_scale_bits=qq_bits)
  sc, s_s2, s_z2, scale = _second_level(rng, d_out, n_groups, qq, qq_bits)
  levels.update(scale_codes=sc, scale_qq_scale=s_s2, scale_qq_zero=s_z2)
  if quantize_zero:
    zc, z_s2, z_z2, zero = _second_level(rng, d_out, n_groups, qq, qq_bits)
    levels.update(zero_codes=zc, zero_qq_scale=z_s2, zero_qq_zero=z_z2, qq_zero_bits=qq_bits)
  else:
    zero = f16(rng.uniform(0, 2**bits - 1, size=(d_out, n_groups)))
  stats = SpQRStats(**levels, qq_groupsize=qq, groupsize=G)
  group_index = group_index_of(rng, d_in, G, act_order)
  codes = rng.integers(0, 2**bits, size=(d_out, d_in)).astype(np.int32)
  dense = scale[:, group_index] * (codes.astype(np.float32) - zero[:, group_index])
  mask = rng.random((d_out, d_in)) < outlier_share
  Q = dense.copy()
  Q[mask] = dense[mask] + f16(rng.normal(size=mask.sum()))
  grid = Grid(scale=scale, zero=zero, group_index=group_index, maxq=2**bits - 1,
              flavor=Flavor.SPQR)
  return SolveResult(Q=Q, codes=codes, grid=grid, perm=np.arange(d_in, dtype=np.int32),
                     objective=np.float32(0), outlier_mask=mask, spqr=stats, method="spqr")


def bit_equal(a, b) -> bool:
  """Bit-for-bit equality of two float32 arrays."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
