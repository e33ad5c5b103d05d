"""Pallas kernel for the sparse outlier side path: y[b, n] += Σ_j x[b, col_j] · value_j.

A separate kernel (not fused into the dense one) so the dense kernel keeps its small register
footprint and grid, and the outlier pass can be skipped statically when nnz = 0. Whether fusing
wins on a GPU is to be measured (experiments/bench_kernels.py times both parts).

Grid (cdiv(N, R),): program i owns output rows [i·R, (i+1)·R). For each row r it walks the
row's CSR range [off[r], off[r+1]) in vector steps of E entries: loads E column indices and
values (the load start is clamped to nnz − E so it never reads past the arrays; entries outside
the row's range are masked to 0), gathers x[b, col] through the ref (integer-array ref indexing,
which the Triton lowering supports; no register gather) and accumulates in f32. Outlier columns
are in ORIGINAL input order, so x is used un-permuted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cdquant_jax.kernels.packed_matmul import pallas_triton
from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.quant.qweight import QuantizedWeight

F32 = jnp.float32


def _outlier_kernel(off_ref, col_ref, val_ref, x_ref, o_ref, *, n_out: int, nnz: int,
                    rows: int, chunk: int):
  batch_pad = x_ref.shape[0]
  n0 = pl.program_id(0) * rows
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
  batch_index = jax.lax.broadcasted_iota(jnp.int32, (batch_pad, chunk), 0)
  row_id = jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)

  def row(r, out):
    n = jnp.minimum(n0 + r, n_out)  # rows past N (last block) get the empty range [nnz, nnz)
    start, end = off_ref[n], off_ref[jnp.minimum(n + 1, n_out)]

    def step(i, acc):
      first = start + i * chunk
      base = jnp.minimum(first, nnz - chunk)
      cols = col_ref[pl.ds(base, chunk)]  # [E]
      values = val_ref[pl.ds(base, chunk)].astype(F32)[None, :]  # [1, E]
      pos = base + lane
      values = jnp.where((pos >= first) & (pos < end), values, 0.0)
      # [B_pad, E] gather through the ref: x[b, col_e]
      xs = x_ref[batch_index, jnp.broadcast_to(cols[None, :], (batch_pad, chunk))]
      return acc + xs.astype(F32) * values

    steps = (end - start + chunk - 1) // chunk
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((batch_pad, chunk), F32))
    total = jnp.sum(acc, axis=1, keepdims=True)  # [B_pad, 1]
    return jnp.where(row_id == r, total, out)

  o_ref[...] = jax.lax.fori_loop(0, rows, row, jnp.zeros((batch_pad, rows), F32))


def outlier_call(x: jax.Array, qw: QuantizedWeight, *, config: plan_lib.BlockConfig,
                 interpret: bool) -> jax.Array:
  """x [B, d_in] -> f32 [B, d_out]: the outliers' contribution (zeros when nnz = 0)."""
  meta = qw.meta
  b = x.shape[0]
  if meta.nnz == 0:
    return jnp.zeros((b, meta.d_out), F32)
  batch_pad = max(1, 1 << (b - 1).bit_length())
  xp = jnp.pad(x.astype(F32), ((0, batch_pad - b), (0, 0)))  # [B_pad, d_in]
  chunk = min(config.outlier_chunk, 1 << (meta.nnz.bit_length() - 1))  # ≤ nnz, power of 2
  rows = config.outlier_rows
  whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  operands = (qw.outlier_row_offsets, qw.outlier_col_idx, qw.outlier_values, xp)
  compiler_params = None
  if not interpret and pallas_triton.plt is not None:
    compiler_params = pallas_triton.plt.CompilerParams(num_warps=config.num_warps,
                                                       num_stages=1)
  out = pl.pallas_call(
      functools.partial(_outlier_kernel, n_out=meta.d_out, nnz=meta.nnz, rows=rows,
                        chunk=chunk),
      out_shape=jax.ShapeDtypeStruct((batch_pad, meta.d_out), F32),
      grid=(pl.cdiv(meta.d_out, rows),),
      in_specs=[whole(a) for a in operands],
      out_specs=pl.BlockSpec((batch_pad, rows), lambda i: (0, i)),
      compiler_params=compiler_params,
      interpret=interpret,
      name="packed_matmul_outliers",
  )(*operands)
  return out[:b]
