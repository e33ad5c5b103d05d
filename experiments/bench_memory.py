"""Host memory of the calibration pipeline (issue 14): peak RSS per phase and per option, beside
the accounted budget of the README's memory section.

Every measurement runs in a fresh process (`--child`), so each peak (ru_maxrss, and the
per-phase peaks the pipeline samples every 10 ms, `pipeline.memory`) belongs to that run
alone. Parts (--parts, comma separated; all by default):
  fixed    the JAX runtime's fixed overhead: RSS after one empty jitted program, with the
           pipeline's modules imported (the F term of the budget);
  smollm2  SmolLM2-135M GPTQ w3g64, 32 x 256 calibration tokens, f32 weights, baseline and
           quantized perplexity on 16 x 512 tokens (configs/demo/gptq_w3g64.yaml): as it is,
           with `weights: disk`, and twice from one persistent compile cache (first cold,
           then warm); then the memory options on the same run without evaluation;
  llama7b  one Llama-2-7B-shaped block (hidden 4096, intermediate 11008, 32 heads, random
           weights, vocabulary 256): the budget at 128 x 2048 tokens computed from the
           compiled programs' memory_analysis (not run: ~100 Tflop a block forward), and the
           pipeline actually run at --llama-tokens windows of 2048 to compare with the budget
           of that run.

    python experiments/bench_memory.py --out experiments/results/bench_memory.md
    # only some SmolLM2 rows, merged into the results already in bench_memory.json:
    python experiments/bench_memory.py --parts smollm2 --rows "weights=disk" "demo, weights=disk" \
        --out experiments/results/bench_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024
PARTS = ("fixed", "smollm2", "llama7b")
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "gptq_w3g64.yaml")
LLAMA7B_BLOCK = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "vocab_size": 256, "max_position_embeddings": 4096}
# SmolLM2 demo runs (with evaluation): (name, --set overrides, compile cache: None = no
# persistent cache, "cold" = a new empty one, "warm" = the one the "cold" row filled).
DEMO = "demo (with evaluation)"
SMOLLM2_DEMOS = (
    (DEMO, [], None),
    ("demo, weights=disk", ["weights=disk"], None),
    ("demo, compile cache cold", [], "cold"),
    ("demo, compile cache warm", [], "warm"),
)
# SmolLM2 options: (name, --set overrides), each on the run without evaluation.
FIRST_BLOCKS = r"quant.include=['^layers\.[012]\.']"  # the others only propagate
SMOLLM2_OPTIONS = (  # each with FIRST_BLOCKS
    ("activations=device (default)", []),
    ("activations=host", ["activations=host"]),
    ("activations=disk", ["activations=disk"]),
    ("activation_dtype=bfloat16", ["activations=host", "activation_dtype=bfloat16"]),
    ("keep_linear_inputs=false", ["keep_linear_inputs=false"]),
    ("weights=disk", ["weights=disk"]),
    ("exports=[compressed-tensors]", ["exports=[compressed-tensors]"]),
)


def load_avg() -> str:
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------
# The budget (README, "Memory"): F + W + 2 P + A + K + H + S.


def budget_terms(*, fixed: int, weights: int, block_params: int, tokens: int, hidden: int,
                 kept_widths: list[int], hessian_widths: list[list[int]], act_bytes: int,
                 where: str, batch_tokens: int, keep: bool, work: int) -> dict[str, int]:
  """The accounted bytes of a run.

  Args:
    fixed: F, the runtime's RSS after an empty jitted program.
    weights: W, the resident parameters in their stored dtype: every one (`weights: host`),
      or the outer ones and the packed quantized blocks (`weights: disk`).
    block_params: P, one block's params (the device copy and the written-back block: 2 P).
    tokens: N·T calibration tokens; hidden: D; act_bytes: bytes per stored activation value.
    kept_widths: d_in of each distinct linear input of a block (kept with keep).
    hessian_widths: per true-sequential group, the d_in of each of its Hessians.
    where: activations "device" / "host" / "disk" (disk: one batch of batch_tokens resident).
    work: S, the largest program's temporaries + outputs (memory_analysis), or the solver's.
  """
  resident = batch_tokens if where == "disk" else tokens
  return dict(F_runtime=fixed, W_weights=weights, P_block_copies=2 * block_params,
              A_activations=2 * resident * hidden * act_bytes,
              K_kept_inputs=resident * sum(kept_widths) * act_bytes if keep else 0,
              H_hessians=max(sum(4 * d * d for d in group) for group in hessian_widths),
              S_largest_program=work)


def program_work(compiled) -> int:
  """Temporaries + outputs of a compiled program (bytes; its arguments are accounted apart)."""
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


# ----------------------------------------------------------------------------------------------
# Children: one measurement each, printed as one JSON line.


def child_fixed() -> dict:
  from cdquant_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.configure()
  from cdquant_jax.pipeline import memory, sequential  # noqa: F401  pylint: disable=import-outside-toplevel
  return dict(fixed_mib=round(memory.empty_program_mib(), 1),
              peak_mib=round(memory.peak_host_mib(), 1))


def _block_shapes(model, layer_params) -> tuple[list[int], list[list[int]]]:
  """(d_in of each distinct linear input, [d_in of each Hessian] per true-sequential group)."""
  from cdquant_jax.models.params import get_path  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import capture  # pylint: disable=import-outside-toplevel
  width = lambda p: get_path(layer_params, p)["weight"].shape[-1]
  h = (1, 8, model.config.hidden_size)
  classes = capture.shared_input_classes(model, layer_params, h, "float32", 0)
  groups = [[width(c[0]) for c in classes if any(p in group for p in c)]
            for group in model.block_linears()]
  return [width(c[0]) for c in classes], groups


def _bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _work_bytes(model, layer_params, batch: int, seqlen: int, solve_shapes, eval_batch=None,
                params=None) -> dict[str, int]:
  """memory_analysis (temporaries + outputs, bytes) of the block forward at [batch, seqlen],
  the GPTQ solve of each distinct (d_out, d_in) problem, and the evaluation head."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import capture  # pylint: disable=import-outside-toplevel
  from cdquant_jax.solvers import api, gptq  # pylint: disable=import-outside-toplevel
  from cdquant_jax.solvers import knobs as knobs_lib  # pylint: disable=import-outside-toplevel
  spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  h = jax.ShapeDtypeStruct((batch, seqlen, model.config.hidden_size), jnp.float32)
  out = {"block_forward": program_work(capture._forward.lower(  # pylint: disable=protected-access
      model, spec(layer_params), h, 0).compile())}
  cfg = knobs_lib.apply(api.config_from_dict("gptq", None), dict(bits=3, group_size=64))
  for d_out, d_in in solve_shapes:
    W = jax.ShapeDtypeStruct((d_out, d_in), jnp.float32)
    H = jax.ShapeDtypeStruct((d_in, d_in), jnp.float32)
    out[f"gptq_{d_out}x{d_in}"] = program_work(
        gptq._solve.lower(W, H, cfg=cfg).compile())  # pylint: disable=protected-access
  if eval_batch is not None:
    ids = jax.ShapeDtypeStruct(eval_batch, jnp.int32)
    he = jax.ShapeDtypeStruct(eval_batch + (model.config.hidden_size,), jnp.float32)
    out["eval_head"] = program_work(capture._head_nll.lower(  # pylint: disable=protected-access
        model, spec({k: v for k, v in params.items() if k != "layers"}), he, ids).compile())
  return out


def _solve_shapes(model, layer_params) -> list[tuple[int, int]]:
  """(d_out, d_in) of the stacked GPTQ problems of a block (linears sharing a Hessian)."""
  from cdquant_jax.models.params import get_path  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import capture  # pylint: disable=import-outside-toplevel
  classes = capture.shared_input_classes(model, layer_params,
                                         (1, 8, model.config.hidden_size), "float32", 0)
  shapes = []
  for group in model.block_linears():
    for c in classes:
      members = [p for p in c if p in group]
      if members:
        ws = [get_path(layer_params, p)["weight"].shape for p in members]
        shapes.append((sum(w[0] for w in ws), ws[0][1]))
  return sorted(set(shapes))


def child_smollm2(overrides: list[str], fixed_mib: float, jax_cache: str | None = None) -> dict:
  """The SmolLM2 run with `overrides` (and the persistent compile cache at jax_cache)."""
  from cdquant_jax import compilation, runtime  # pylint: disable=import-outside-toplevel
  runtime.configure()
  if jax_cache is not None:
    compilation.enable_persistent_cache(jax_cache)
  stats = compilation.CompileStats()
  from cdquant_jax.pipeline import config, memory, sequential  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as out:
    run = config.load_run_config(DEMO_CONFIG, overrides + [f"output_dir={out}"])
    metrics = sequential.quantize_model(run, progress=False)
  from cdquant_jax.models import aliases, registry  # pylint: disable=import-outside-toplevel
  model = registry.model_from_hf_config(_smollm2_hf_config())
  shapes = model.param_shapes(registry.as_dtype(run.model.dtype))
  layer = model.layer_params(shapes, 0)
  kept, groups = _block_shapes(model, layer)
  eval_batch = (run.eval.batch_size, run.eval.seqlen or run.calibration.seqlen) \
      if run.eval.sources else None
  work = _work_bytes(model, layer, run.forward_batch_size, run.calibration.seqlen,
                     _solve_shapes(model, layer), eval_batch, shapes)
  c = run.calibration
  summary = metrics["summary"]
  resident = _bytes(shapes) if run.weights == "host" else (
      _bytes({k: v for k, v in shapes.items() if k != "layers"})
      + int(summary["params_quantized"] * summary["bits_stored"] / 8))
  terms = budget_terms(
      fixed=int(fixed_mib * MIB), weights=resident, block_params=_bytes(layer),
      tokens=c.nsamples * c.seqlen, hidden=model.config.hidden_size, kept_widths=kept,
      hessian_widths=groups, act_bytes=2 if run.activation_dtype in ("bfloat16", "float16") else 4,
      where=run.activations, batch_tokens=run.forward_batch_size * c.seqlen,
      keep=run.keep_linear_inputs, work=max(work.values()))
  del aliases
  return dict(peak_mib=round(memory.peak_host_mib(), 1),
              phases_mib=metrics["memory"]["phases_host_mib"],
              block_dominant=metrics["memory"]["blocks"][0]["dominant"],
              block_buffers=metrics["memory"]["blocks"][0]["buffers_bytes"],
              budget=terms, work=work, seconds=metrics["timing"]["quantize_seconds"],
              objective=metrics["summary"]["objective_sum"],
              ppl=metrics.get("perplexity", {}).get("bundled", {}).get("ppl"),
              compile=stats.report(), timing=metrics["timing"],
              peak_breakdown=metrics["memory"].get("peak_breakdown_mib"))


def _smollm2_hf_config() -> dict:
  from cdquant_jax.models import aliases, gguf_loader  # pylint: disable=import-outside-toplevel
  path = aliases.resolve_model_path(aliases.SMOLLM2)
  reader = gguf_loader.open_reader(path)
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
  return gguf_loader.hf_config_from_metadata(gguf_loader.read_metadata(reader), shapes, path)


def child_llama7b(windows: int, seqlen: int, overrides: list[str], fixed_mib: float,
                  run_it: bool) -> dict:
  """The 7B-shaped block: budget at `windows` x `seqlen` (memory_analysis), and when run_it the
  pipeline run on it with the measured peaks."""
  from cdquant_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.configure()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from cdquant_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from cdquant_jax.models import registry  # pylint: disable=import-outside-toplevel
  from cdquant_jax.pipeline import config, memory, sequential  # pylint: disable=import-outside-toplevel
  model = registry.model_from_hf_config(LLAMA7B_BLOCK)
  with tempfile.TemporaryDirectory() as out:
    run = config.run_config_from_dict(dict(
        model=dict(path="random"), calibration=dict(nsamples=windows, seqlen=seqlen),
        quant=dict(method="gptq", knobs=dict(bits=4, group_size=128)), output_dir=out,
        checkpoint="none", forward_batch_size=min(8, windows)))
    run = config_lib.apply_overrides(run, overrides).validate() if overrides else run
    shapes = model.param_shapes()
    layer = model.layer_params(shapes, 0)
    kept, groups = _block_shapes(model, layer)
    work = _work_bytes(model, layer, run.forward_batch_size, seqlen, _solve_shapes(model, layer))
    terms = budget_terms(
        fixed=int(fixed_mib * MIB), weights=_bytes(shapes), block_params=_bytes(layer),
        tokens=windows * seqlen, hidden=4096, kept_widths=kept, hessian_widths=groups,
        act_bytes=2 if run.activation_dtype in ("bfloat16", "float16") else 4,
        where=run.activations, batch_tokens=run.forward_batch_size * seqlen,
        keep=run.keep_linear_inputs, work=max(work.values()))
    result = dict(budget=terms, work=work, windows=windows, seqlen=seqlen)
    if run_it:
      params = jax.device_get(model.init_params(jax.random.key(0)))
      ids = np.random.default_rng(0).integers(0, 256, (windows, seqlen), dtype=np.int32)
      start = time.perf_counter()
      qrun = sequential.quantize_loaded(run, model, params, ids, progress=False)
      del params
      result.update(peak_mib=round(memory.peak_host_mib(), 1),
                    phases_mib=qrun.metrics["memory"]["phases_host_mib"],
                    block_buffers=qrun.metrics["memory"]["blocks"][0]["buffers_bytes"],
                    block_dominant=qrun.metrics["memory"]["blocks"][0]["dominant"],
                    seconds=round(time.perf_counter() - start, 1))
  return result


# ----------------------------------------------------------------------------------------------
# The parent: children in order, the Markdown report.


def run_child(spec: dict) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT}
  start = time.perf_counter()
  before = load_avg()
  proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    print(f"child {spec} failed:\n{proc.stderr[-4000:]}", file=sys.stderr, flush=True)
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_seconds"] = round(time.perf_counter() - start, 1)
  result["load_avg_before"] = before
  result["load_avg_after"] = load_avg()
  print(json.dumps({"spec": spec, **result}), flush=True)
  return result


def _mib(n: float) -> str:
  return f"{n / MIB:,.0f}"


def budget_table(terms: dict[str, int]) -> list[str]:
  total = sum(terms.values())
  lines = ["| term | MiB |", "|---|---:|"]
  lines += [f"| {k} | {_mib(v)} |" for k, v in terms.items()]
  lines.append(f"| **budget** | **{_mib(total)}** |")
  return lines


def phase_table(rows: list[tuple[str, dict]]) -> list[str]:
  phases = []
  for _, r in rows:
    phases += [p for p in r["phases_mib"] if p not in phases]
  short = [p.removesuffix("_seconds") for p in phases]
  lines = ["| run | peak RSS | budget | peak / budget | " + " | ".join(short) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(short)]
  for name, r in rows:
    if "error" in r:
      lines.append(f"| {name} | failed: {r['error']} |")
      continue
    total = sum(r["budget"].values()) / MIB
    cells = [f"{r['phases_mib'].get(p, float('nan')):,.0f}" for p in phases]
    lines.append(f"| {name} | {r['peak_mib']:,.0f} | {total:,.0f} | {r['peak_mib'] / total:.2f} | "
                 + " | ".join(cells) + " |")
  return lines


def breakdown_table(rows: list[tuple[str, dict]]) -> list[str]:
  """What each run's resident set was made of at its highest sample (`memory.rss_breakdown_mib`,
  taken by the sampler at that moment), against the accounted budget less F."""
  lines = ["| run | RSS at the peak sample | file-backed | anonymous | malloc in use | "
           "malloc free, kept | anonymous outside malloc | budget - F |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows:
    b = r.get("peak_breakdown")
    if not b or "malloc_in_use" not in b:
      continue
    outside = b["anonymous"] - b["malloc_in_use"] - b["malloc_free"]
    rest = (sum(r["budget"].values()) - r["budget"]["F_runtime"]) / MIB
    lines.append(f"| {name} | {b['rss']:,.0f} | {b['file']:,.0f} | {b['anonymous']:,.0f} | "
                 f"{b['malloc_in_use']:,.0f} | {b['malloc_free']:,.0f} | {outside:,.0f} | "
                 f"{rest:,.0f} |")
  return lines if len(lines) > 2 else []


def report(results: dict, args) -> str:
  out = ["# Host memory of the calibration pipeline (experiments/bench_memory.py)", "",
         f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
         f"shared with other jobs (load averages before/after each run are in the JSON lines "
         f"of the log; memory is not affected by load, times are). JAX on CPU: "
         f"`memory_stats()` is None there, so no device numbers.", ""]
  if "fixed" in results:
    out += [f"**F (runtime fixed overhead)**: {results['fixed']['fixed_mib']:.0f} MiB RSS after "
            "an empty jitted program with the pipeline's modules imported.", ""]
  if "smollm2" in results:
    rows = results["smollm2"]
    out += ["## SmolLM2-135M, GPTQ w3g64, 32 x 256 calibration tokens, f32 weights", "",
            "Peak RSS (MiB) of the whole process (ru_maxrss) and of each phase (sampled every "
            "10 ms). The demo rows are the demo run with baseline and quantized perplexity on "
            "16 x 512 tokens: as it is (no persistent compile cache), with `weights: disk`, and "
            "twice on one persistent compile cache, first empty (cold: it compiles and writes "
            "every program), then filled (warm: it loads them); the option rows are the same "
            "run without evaluation, quantizing the first 3 blocks (the other 27 only "
            "propagate). Phases are those of metrics.json's timing (nan: not in that run).", ""]
    out += phase_table(rows) + [""]
    table = breakdown_table(rows)
    if table:
      out += ["What the peak is made of (MiB; /proc/self/smaps_rollup and glibc mallinfo2 at "
              "the highest RSS sample). File-backed: resident pages of the shared libraries "
              "(jaxlib, numpy, ...). Malloc in use: bytes handed out by glibc malloc (numpy "
              "and XLA buffers, compiled programs' data, Python objects above 512 bytes); "
              "malloc free, kept: freed to malloc and held for reuse (an upper bound on its "
              "resident part). Anonymous outside malloc: pymalloc arenas, thread stacks, "
              "LLVM's code mappings.", ""] + table + [""]
    by_name = dict(rows)
    for name in (DEMO, "demo, weights=disk"):
      if name in by_name and "budget" in by_name[name]:
        out += [f"Budget of {name} (README formula):", ""]
        out += budget_table(by_name[name]["budget"]) + [""]
    out += ["Largest programs (temporaries + outputs, MiB, memory_analysis): " + ", ".join(
        f"{k} {_mib(v)}" for k, v in rows[0][1]["work"].items()), ""]
    out += ["Compile: seconds of tracing, lowering and XLA compiling (or loading from the "
            "persistent cache) in the run, programs built / loaded from the cache (- : not "
            "recorded then). Load: the 1/5/15-minute load averages before / after the run.", ""]
    out += ["| run | objective (sum) | ppl | quantize s | eval s (baseline + final) | compile s "
            "| programs built / cached | dominant buffer of block 0 | its MiB | load before "
            "| load after |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for name, r in rows:
      if "error" in r:
        continue
      dom = r["block_dominant"]
      c = r.get("compile")
      compiled = (f"{c['compile_seconds']:.0f} | {c['programs_compiled']} / {c['cache_hits']}"
                  if c else "- | -")
      ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
      t = r.get("timing", {})
      evals = (f"{t['baseline_eval_seconds']:.0f} + {t['eval_seconds']:.0f}"
               if "eval_seconds" in t and "baseline_eval_seconds" in t else "-")
      out.append(f"| {name} | {r['objective']:.6g} | {ppl} | {r['seconds']:.0f} | {evals} | "
                 f"{compiled} | "
                 f"{dom} | {r['block_buffers'][dom] / MIB:.1f} | "
                 f"{r.get('load_avg_before', '-')} | {r.get('load_avg_after', '-')} |")
    out.append("")
  if "llama7b" in results:
    out += ["## One Llama-2-7B-shaped block (random weights)", ""]
    for name, r in results["llama7b"]:
      if "error" in r:
        out += [f"### {name}: failed ({r['error']})", ""]
        continue
      out += [f"### {name}: {r['windows']} x {r['seqlen']} tokens", ""]
      out += budget_table(r["budget"]) + [""]
      out += ["Programs (MiB): " + ", ".join(f"{k} {_mib(v)}" for k, v in r["work"].items()), ""]
      if "peak_mib" in r:
        total = sum(r["budget"].values()) / MIB
        out += [f"Run: peak RSS {r['peak_mib']:,.0f} MiB = {r['peak_mib'] / total:.2f} x the "
                f"budget, {r['seconds']:.0f} s; phases (MiB): " + ", ".join(
                    f"{k.removesuffix('_seconds')} {v:,.0f}" for k, v in r["phases_mib"].items()),
                ""]
      else:
        out += ["Computed only (not run).", ""]
  return "\n".join(out) + "\n"


def smollm2_rows() -> list[tuple[str, dict]]:
  """(name, child spec without fixed_mib) of every SmolLM2 row, in the report's order."""
  rows = [(name, {"kind": "smollm2", "overrides": overrides, "jax_cache": cache})
          for name, overrides, cache in SMOLLM2_DEMOS]
  rows += [(name, {"kind": "smollm2", "overrides": overrides + ["eval.sources=[]", FIRST_BLOCKS]})
           for name, overrides in SMOLLM2_OPTIONS]
  return rows


def run_smollm2(fixed: float, names: list[str] | None, kept: dict) -> list:
  """[(name, result)] of the SmolLM2 rows: those in `names` run (all when None), the others
  taken from `kept` (earlier results by name) when there. A "warm" row runs right after its
  "cold" one, on the cache that one filled (so both are run together)."""
  known = [name for name, _ in smollm2_rows()]
  unknown = sorted(set(names or []) - set(known))
  if unknown:
    raise SystemExit(f"--rows: unknown {unknown}; known: {known}")
  out, ran = [], set()
  with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache:
    for name, spec in smollm2_rows():
      if names is not None and name not in names:
        if name in kept:
          out.append((name, kept[name]))
        continue
      if spec.get("jax_cache") == "warm" and "cold" not in ran:
        raise SystemExit(f"--rows: {name!r} needs the cold-cache row in the same invocation")
      ran.add(spec.get("jax_cache"))
      spec = {**spec, "fixed_mib": fixed,
              "jax_cache": cache if spec.get("jax_cache") else None}
      out.append((name, run_child(spec)))
  return out


def _previous(out_path: str | None) -> dict:
  """The results JSON beside out_path (bench_memory.json), {} when absent."""
  path = os.path.splitext(out_path)[0] + ".json" if out_path else None
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--out", help="Markdown report path")
  p.add_argument("--llama-tokens", type=int, default=2, help="windows of 2048 actually run")
  p.add_argument("--rows", nargs="+", help="SmolLM2 row names to run (the others, and F, are "
                 "kept from the JSON beside --out)")
  p.add_argument("--render", action="store_true",
                 help="only write --out again from the JSON beside it")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    kind = spec.pop("kind")
    result = {"fixed": child_fixed, "smollm2": child_smollm2, "llama7b": child_llama7b}[kind](
        **spec)
    print(json.dumps(result))
    return 0
  if args.render:
    _write(report(_previous(args.out), args), args.out, None)
    return 0
  parts = args.parts.split(",")
  previous = _previous(args.out) if args.rows else {}
  results: dict = {**previous, "load_avg_before": load_avg()}
  if "fixed" not in previous:
    results["fixed"] = run_child({"kind": "fixed"})
  fixed = results["fixed"]["fixed_mib"]
  if "smollm2" in parts:
    results["smollm2"] = run_smollm2(fixed, args.rows,
                                     dict(previous.get("smollm2", [])))
  if "llama7b" in parts:
    results["llama7b"] = []
    for name, overrides in (("host f32, kept inputs", ["activations=host"]),
                            ("host bf16, kept inputs",
                             ["activations=host", "activation_dtype=bfloat16"]),
                            ("host f32, keep_linear_inputs=false",
                             ["activations=host", "keep_linear_inputs=false"]),
                            ("disk f32, kept inputs", ["activations=disk"])):
      results["llama7b"].append((f"computed, {name}", run_child(
          {"kind": "llama7b", "windows": 128, "seqlen": 2048, "overrides": overrides,
           "fixed_mib": fixed, "run_it": False})))
    results["llama7b"].append(("run, host f32, kept inputs", run_child(
        {"kind": "llama7b", "windows": args.llama_tokens, "seqlen": 2048,
         "overrides": ["activations=host"], "fixed_mib": fixed, "run_it": True})))
  _write(report(results, args), args.out, results)
  return 0


def _write(text: str, out_path: str | None, results: dict | None) -> None:
  """The report to out_path (and the results to the JSON beside it, when given), and stdout."""
  if out_path:
    with open(out_path, "w") as f:
      f.write(text)
    if results is not None:
      with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
  print(text)


if __name__ == "__main__":
  sys.exit(main())
