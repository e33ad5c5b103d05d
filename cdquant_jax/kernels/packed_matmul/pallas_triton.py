"""Pallas kernel for packed 2/3/4-bit weights × a small batch, lowered with the Triton backend.

Why Triton (and how to switch): on JAX 0.11 Mosaic GPU is the default Pallas GPU backend and
the Triton backend is deprecated (still shipped in 0.11.2). This kernel is written in plain
jnp on refs (shifts, masks, selects, strided `pl.ds` loads, power-of-2 reshapes, `jnp.dot`),
which the Triton lowering accepts for any block shape; Mosaic GPU's `pallas_call` lowering
needs ≤256-element block copies, explicit register layouts (`plgpu.layout_cast` after every
iota) and wgmma-shaped operands (M ≥ 64), i.e. a different kernel (swap-AB with the decoded
weight tile as the wgmma M operand, kernels.md §6). Passing `plt.CompilerParams` selects Triton
whatever `jax_pallas_use_mosaic_gpu` says. The implementation is chosen by name in
`packed_matmul(..., implementation=...)` (a model's `LinearOptions`); the Mosaic GPU kernel
(pallas_mosaic.py) is registered beside this one and is the "auto" choice on Hopper.

Grid (n_blocks, k_splits). Program (j, s) owns output channels [j·bn, (j+1)·bn) and K tiles
[s·tps, min((s+1)·tps, k_tiles)) (tps = tiles per split) and writes a partial [B_pad, bn];
XLA sums the k_splits partials (no atomics, deterministic). Two accumulation paths:
  GEMV (batch ≤ reduce_max_batch): slot order, acc [B_pad, kw, bn] += x_v · W_v on CUDA cores,
       reduced over kw once at the end;
  dot  (larger batch, padded to 16): natural order [bk, bn], acc += x_tile @ W_tile (tl.dot;
       f32 activations use Precision.HIGHEST = IEEE, bf16/f16 cast W to their dtype).
Statistics: "float" rows read directly; "qq" (SpQR) 3-bit codes + fp16 second level decoded
per tile exactly as qweight.first_level_stat does (s2 · (code − z2), then s · (q − z)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cdquant_jax.kernels.packed_matmul import decode
from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.quant import packing
from cdquant_jax.quant.qweight import QuantizedWeight

try:  # deprecated in JAX 0.11, may disappear later: the registry then reports why
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plt
  IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the installed JAX
  plt, IMPORT_ERROR = None, e

F32 = jnp.float32


def _n_refs(spec: plan_lib.StatSpec) -> int:
  if spec.kind == "float":
    return 1
  return (1 if packing.is_flat(spec.bits) else spec.bits) + 2


def _split_refs(refs, plan: plan_lib.Plan):
  """(x_ref, code refs, scale refs, zero refs, o_ref) from the flat kernel arguments."""
  n_code = 1 if packing.is_flat(plan.bits) else plan.bits
  x_ref, rest = refs[0], list(refs[1:])
  code_refs, rest = rest[:n_code], rest[n_code:]
  scale_refs, rest = rest[:_n_refs(plan.scale)], rest[_n_refs(plan.scale):]
  zero_refs, rest = rest[:_n_refs(plan.zero)], rest[_n_refs(plan.zero):]
  (o_ref,) = rest
  return x_ref, code_refs, scale_refs, zero_refs, o_ref


def _gemv_tile(t, acc, x_ref, code_refs, scale_refs, zero_refs, plan: plan_lib.Plan):
  """acc [B_pad, kw, bn] += Σ_v x[:, rows of slot v] · W[rows of slot v] for tile t."""
  kw, bk = plan.kw, plan.bk
  planes = [decode.load_plane(code_refs, plan.bits, w, t * kw, kw) for w in range(plan.bits)]
  scales = [decode.class_stat(scale_refs, plan.scale, t, bk, h)
            for h in range(decode.class_count(plan.scale))]
  zeros = [decode.class_stat(zero_refs, plan.zero, t, bk, h)
           for h in range(decode.class_count(plan.zero))]
  for v in range(32):
    q = decode.slot_values(planes, plan.bits, v).astype(F32)  # [kw, bn]
    w = scales[decode.slot_class(plan.scale, v)] * (q - zeros[decode.slot_class(plan.zero, v)])
    xv = x_ref[:, pl.ds(t * bk + v, kw, stride=32)].astype(F32)  # [B_pad, kw]: rows 32c + v
    acc = acc + xv[:, :, None] * w[None, :, :]
  return acc


def _dot_tile(t, acc, x_ref, code_refs, scale_refs, zero_refs, plan: plan_lib.Plan):
  """acc [B_pad, bn] += x[:, tile] @ W[tile] for tile t (natural row order)."""
  bk = plan.bk
  q = decode.natural_codes(code_refs, plan.bits, t, bk)  # [bk, bn]
  w = decode.natural_stat(scale_refs, plan.scale, t, bk) * (
      q - decode.natural_stat(zero_refs, plan.zero, t, bk))
  x = x_ref[:, pl.ds(t * bk, bk)]  # [B_pad, bk]
  f32_inputs = x.dtype == F32
  precision = jax.lax.Precision.HIGHEST if f32_inputs else None
  return acc + jnp.dot(x, w.astype(x.dtype), precision=precision, preferred_element_type=F32)


def _kernel(*refs, plan: plan_lib.Plan):
  x_ref, code_refs, scale_refs, zero_refs, o_ref = _split_refs(refs, plan)
  first = pl.program_id(1) * plan.tiles_per_split
  last = jnp.minimum(first + plan.tiles_per_split, plan.k_tiles)
  tile = _dot_tile if plan.dot else _gemv_tile
  shape = (plan.batch_pad, plan.bn) if plan.dot else (plan.batch_pad, plan.kw, plan.bn)
  body = lambda t, acc: tile(t, acc, x_ref, code_refs, scale_refs, zero_refs, plan)
  acc = jax.lax.fori_loop(first, last, body, jnp.zeros(shape, F32))
  o_ref[...] = acc if plan.dot else jnp.sum(acc, axis=1)


def _column_spec(shape: tuple[int, ...], bn: int) -> pl.BlockSpec:
  """All rows, output-channel block j (last axis)."""
  return pl.BlockSpec(shape[:-1] + (bn,), lambda j, s: (0,) * (len(shape) - 1) + (j,))


def _packed_specs(words: jax.Array, bits: int, bn: int) -> tuple[list, list[pl.BlockSpec]]:
  """Operands and BlockSpecs of packed words: flat once, planes once per squeezed plane."""
  if packing.is_flat(bits):
    return [words], [_column_spec(words.shape, bn)]
  _, rows, _ = words.shape
  specs = [pl.BlockSpec((None, rows, bn), lambda j, s, w=w: (w, 0, j)) for w in range(bits)]
  return [words] * bits, specs


def _stat_specs(qw: QuantizedWeight, which: str, spec: plan_lib.StatSpec, bn: int):
  arrays = plan_lib.stat_operands(qw, which, spec)
  if spec.kind == "float":
    return arrays, [_column_spec(arrays[0].shape, bn)]
  operands, specs = _packed_specs(arrays[0], spec.bits, bn)
  for a in arrays[1:]:  # second level [n_groups_pad, N / qq]: block bn / qq columns
    operands.append(a)
    specs.append(_column_spec(a.shape, bn // spec.qq))
  return operands, specs


def dense_call(x: jax.Array, qw: QuantizedWeight, plan: plan_lib.Plan, *,
               config: plan_lib.BlockConfig, interpret: bool) -> jax.Array:
  """Dense part: x [B, d_in] -> f32 [B, d_out] (outliers not included)."""
  xs = plan_lib.x_storage(x, qw, plan)  # [B_pad, k_pad]
  operands = [xs]
  specs = [pl.BlockSpec(xs.shape, lambda j, s: (0, 0))]
  for ops, sp in (_packed_specs(qw.codes, plan.bits, plan.bn),
                  _stat_specs(qw, "scale", plan.scale, plan.bn),
                  _stat_specs(qw, "zero", plan.zero, plan.bn)):
    operands += ops
    specs += sp
  compiler_params = None
  if not interpret and plt is not None:
    compiler_params = plt.CompilerParams(num_warps=config.num_warps,
                                         num_stages=config.num_stages)
  partials = pl.pallas_call(
      functools.partial(_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((plan.k_splits, plan.batch_pad, plan.d_out), F32),
      grid=(plan.n_blocks, plan.k_splits),
      in_specs=specs,
      out_specs=pl.BlockSpec((None, plan.batch_pad, plan.bn), lambda j, s: (s, 0, j)),
      compiler_params=compiler_params,
      interpret=interpret,
      name=f"packed_matmul_w{plan.bits}",
  )(*operands)
  # [k_splits, B_pad, N] -> [B, N]
  return jnp.sum(partials, axis=0)[:x.shape[0]]
