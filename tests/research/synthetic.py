"""Synthetic but realistic sweep results (the row schema of `research.store`), with values from
closed-form rules so that tests can compute every expected table cell and plot series
independently of the code under test.

Rules:
  perplexity.wikitext2 = 20 · FACTOR[method]^(5 − bits) + 0.1 · seed (+ 2 per group size 16)
  baseline_perplexity.wikitext2 = 20
  relative_objective of a linear = 2^−bits · (1 + 0.05 · block) · LEVEL[method] · KIND_SHAPE[method][kind]
  outlier_share of a linear = 0.001 · (1 + kind index) for SpQR, 0 otherwise
"""

from __future__ import annotations

import hashlib
import json
import os

# The metric and methods of `write_sweep` (the report tests read them back).
METRIC = "perplexity.wikitext2"
METHODS = ("rtn", "gptq", "cd", "bcd", "spqr")
FACTOR = {"rtn": 1.5, "gptq": 1.2, "cd": 1.1, "bcd": 1.05, "spqr": 1.01}
LEVEL = {"rtn": 2.0, "gptq": 1.0, "cd": 0.9, "bcd": 0.85, "spqr": 0.8}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = KINDS[:4]
# CD and BCD gain more on attention than on the MLP (relative to GPTQ, whose shape is flat).
ATTN_SHAPE = {"rtn": 1.0, "gptq": 1.0, "cd": 0.9, "bcd": 0.8, "spqr": 1.0}
BLOCKS = 2
GROUP = {"spqr": 16}
BITS_OVERHEAD = {16: 0.625, 128: 0.25, -1: 0.0}


def kind_shape(method: str, kind: str) -> float:
  return ATTN_SHAPE[method] if kind in ATTENTION else 1.0


def perplexity(method: str, bits: int, seed: int) -> float:
  return 20 * FACTOR[method] ** (5 - bits) + 0.1 * seed


def relative_objective(method: str, bits: int, block: int, kind: str) -> float:
  return 2.0 ** -bits * (1 + 0.05 * block) * LEVEL[method] * kind_shape(method, kind)


def outlier_share(method: str, kind: str) -> float:
  return 0.001 * (1 + KINDS.index(kind)) if method == "spqr" else 0.0


def layer_records(method: str, bits: int) -> list[dict]:
  """Per-linear records as log.jsonl has them (module, layer, ...), in block order."""
  out = []
  for block in range(BLOCKS):
    for kind in KINDS:
      part = "self_attn" if kind in ATTENTION else "mlp"
      rel = relative_objective(method, bits, block, kind)
      out.append(dict(module=f"layers.{block}.{part}.{kind}", layer=block, method=method,
                      relative_objective=rel, objective=rel * 50.0, bits_formula=bits,
                      outlier_share=outlier_share(method, kind), seconds=0.5))
  return out


def row(method: str, bits: int, seed: int, run_dir: str | None, *, mode: str = "sequential",
        status: str = "done", **extra) -> dict:
  """One results row; `extra` overrides fields."""
  group = GROUP.get(method, 128)
  config = {"model": {"path": "huggyllama/llama-7b", "dtype": "float16"},
            "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048, "seed": seed},
            "quant": {"method": method, "knobs": {"bits": bits, "group_size": group}},
            "eval": {"sources": ["wikitext2"], "seqlen": 2048}, "output_dir": run_dir}
  name = f"{method}-bits={bits}-seed={seed}"
  records = layer_records(method, bits)
  data = dict(
      point=hashlib.sha256(json.dumps([method, bits, seed, mode]).encode()).hexdigest(),
      name=name, sweep="synthetic", mode=mode, status=status, error=None, variant=method,
      axes={"quant.knobs.bits": bits, "calibration.seed": seed}, config=config,
      method=method, bits=bits, group_size=group, act_order=False, seed=seed, run_dir=run_dir,
      perplexity={"wikitext2": perplexity(method, bits, seed)},
      baseline_perplexity={"wikitext2": 20.0},
      bits_formula=bits + BITS_OVERHEAD[group], bits_stored=bits + BITS_OVERHEAD[group] + 0.01,
      objective_sum=sum(r["objective"] for r in records),
      relative_objective_sum=sum(r["relative_objective"] for r in records) / len(records),
      outlier_share=sum(r["outlier_share"] for r in records) / len(records),
      quantize_seconds=10.0 * LEVEL[method] * bits, timing={"solve": 5.0},
      peak_rss_mib=1000.0)
  if mode == "bank":
    layers = [{**{k: v for k, v in r.items() if k != "layer"},
               "kind": r["module"].rsplit(".", 1)[-1], "block": r["layer"], "steps": 7}
              for r in records]
    data.update(run_dir=None, perplexity=None, baseline_perplexity=None, layers=layers)
  if status != "done":
    data.update(error="HessianError: not positive definite", perplexity=None)
  data.update(extra)
  return data


def write_sweep(directory, methods=("rtn", "gptq", "cd", "bcd", "spqr"), bits=(2, 3, 4),
                seeds=(0, 1, 2), *, torn_tail: bool = True, extra_rows: list[dict] = ()) -> str:
  """A sequential sweep directory: results.jsonl (+ a failed point rerun as done, + a torn
  last line) and each point's run_dir/log.jsonl. Returns the directory."""
  directory = str(directory)
  rows = []
  for method in methods:
    for b in bits:
      for seed in seeds:
        run_dir = os.path.join(directory, "points", f"{method}-{b}-{seed}")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in layer_records(method, b))
        rows.append(row(method, b, seed, run_dir))
  first = rows[0]
  failed = row(first["method"], first["bits"], first["seed"], first["run_dir"], status="failed")
  lines = [json.dumps(failed)] + [json.dumps(r) for r in rows + list(extra_rows)]
  text = "\n".join(lines) + "\n"
  if torn_tail:
    text += json.dumps(row("gptq", 8, 0, None))[:40]  # a crash mid-append
  with open(os.path.join(directory, "results.jsonl"), "w") as f:
    f.write(text)
  return directory
