"""Pipeline benchmark on SmolLM2-135M (offline GGUF, 30 blocks, 210 linears): the targets of
issue 9, each measured side by side in one process, with the load average of the machine.

Parts (--parts, comma separated; all by default):
  matmul   the machine's f32 matmul throughput on the shapes the capture multiplies
           (jnp.matmul of [tokens, d_in] x [d_in, d_out] and the Hessian Xᵀ X), the reference of
           the capture target;
  capture  capture + Hessians of true-sequential groups (the pipeline's `group_hessians` with
           kept inputs) on `--capture-blocks` blocks: nominal flops / seconds against the same
           matmuls timed plainly;
  solve    the layer problems (W, H) of all 30 blocks (unquantized earlier blocks, 32 x 256
           calibration tokens), then solve + pack exactly as the pipeline does
           (`sequential.quantize_linears`: linears sharing H stacked) with GPTQ on all 210
           linears, against the flop estimate Σ d_out·d_in² + d_in³/3, and CD and BCD against GPTQ
           on `--descent-blocks` blocks;
  run      the whole configs/smollm2/gptq_w3.yaml run (128 x 512 calibration, baseline and
           quantized perplexity on the whole evaluation split) with its phase times.
Solve and capture times exclude compilation (a warm-up on the same shapes first); run times
include it as a user sees it (with the persistent cache `--jax-cache`, default off here).

--peer llm-compressor (alone unless --parts is given): GPTQ on both sides with the same
settings, token ids and evaluation windows, each side in its own subprocess (wall time, peak
RSS): our pipeline (`--nsamples` x `--seqlen` bundled calibration, `--bits`, groups of
`--group-size`, asymmetric min-max, percdamp 0.01, blocksize 128, no act order; evaluation on
the whole bundled split in windows of 512, baseline included) with the persistent compile cache
off, then twice with a fresh cache (filled, then warm), and llm-compressor's `oneshot` +
`GPTQModifier` in .venv-peer (`make peer-venv`; experiments/peer_llmcompressor.py, torch on 2
threads). Our side writes the calibration ids and evaluation windows to .npy, the peer reads
them, and both report their sha256 (`data.token_hash`). Our "matched" settings are
llm-compressor's semantics: static groups (its observer fits the group grids on the original
weights before the sweep) and layer-sequential Hessians (its sequential pipeline captures every
linear of a decoder layer in one pass, the previous layers quantized); `--peer-ours-default`
adds our defaults too (dynamic groups, true-sequential groups).

    python experiments/bench_pipeline.py --out experiments/results/bench_pipeline.md
    python experiments/bench_pipeline.py --parts matmul,solve --descent-blocks 0,29
    python experiments/bench_pipeline.py --peer llm-compressor --out experiments/results/bench_pipeline.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from cdquant_jax import runtime

runtime.configure()

import jax  # noqa: E402  (after the process settings)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cdquant_jax import compilation, data  # noqa: E402
from cdquant_jax import config as config_lib  # noqa: E402
from cdquant_jax._numerics import hdot  # noqa: E402
from cdquant_jax.models import aliases, registry  # noqa: E402
from cdquant_jax.models.params import get_path  # noqa: E402
from cdquant_jax.eval.perplexity import split_windows  # noqa: E402
from cdquant_jax.pipeline import capture, config, evaluation, sequential  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIG = os.path.join(ROOT, "configs", "smollm2", "gptq_w3.yaml")
PARTS = ("matmul", "capture", "solve", "run")
PEER_PYTHON = os.path.join(ROOT, ".venv-peer", "bin", "python")
PEER_SCRIPT = os.path.join(ROOT, "experiments", "peer_llmcompressor.py")
# Evaluation windows of the side by side (the gptq_w3 run's); the whole bundled split.
PEER_EVAL_SEQLEN = 512
PEER_EVAL_BATCH = 4


def load_avg() -> str:
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeats: int = 3) -> float:
  """Median wall seconds of fn() (blocking on its result) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# Model, calibration and the demo run settings.


def load(nsamples: int, seqlen: int):
  model, params, tok = registry.load_model(aliases.resolve_model_path(aliases.SMOLLM2))
  ids = data.calibration_windows("bundled", tok, nsamples=nsamples, seqlen=seqlen, seed=0)
  return model, jax.device_get(params), tok, ids


def run_config(method: str, nsamples: int, seqlen: int, out: str) -> config.RunConfig:
  """The demo's settings (3 bits, groups of 64) for `method`."""
  return config.run_config_from_dict(dict(
      model=dict(path=aliases.SMOLLM2),
      calibration=dict(source="bundled", nsamples=nsamples, seqlen=seqlen, seed=0),
      quant=dict(method=method, knobs=dict(bits=3, group_size=64)),
      output_dir=out, checkpoint="none"))


def embedded(model, params, ids, batch: int) -> capture.Activations:
  embed = jax.device_put({k: v for k, v in params.items() if k != "layers"})
  return capture.embed_calibration(model, embed, ids, batch, on_host=False)


# ----------------------------------------------------------------------------------------------
# matmul: the reference throughput.


def matmul_shapes(model, tokens: int) -> list[tuple[int, int, int]]:
  """(m, k, n) of every plain matmul a block capture runs on `tokens` rows: the linears'
  forwards and the Hessians Xᵀ X ([d_in, tokens] x [tokens, d_in])."""
  c = model.config
  d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
  return [(tokens, d, d), (tokens, d, kv), (tokens, d, f), (tokens, f, d),
          (d, tokens, d), (f, tokens, f)]


def matmul_rate(m: int, k: int, n: int) -> float:
  """Gflop/s of one f32 [m, k] x [k, n] matmul (HIGHEST, as the pipeline)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
  f = jax.jit(hdot)
  return 2 * m * k * n / timed(lambda: f(a, b), repeats=5) / 1e9


def part_matmul(model, tokens: int) -> dict:
  rates = {f"{m}x{k}x{n}": round(matmul_rate(m, k, n), 1)
           for m, k, n in matmul_shapes(model, tokens)}
  return dict(tokens=tokens, gflops=rates, load=load_avg())


# ----------------------------------------------------------------------------------------------
# capture: true-sequential group captures against their matmuls.


def group_flops(model, paths, tokens: int, seqlen: int) -> float:
  """Nominal flops of one capture of the group whose representatives are `paths`: the linears
  it must run (those upstream of its inputs that are not kept), attention, and the Hessians."""
  c = model.config
  d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
  names = {p[-1] for p in paths}
  lin = lambda k, n: 2 * tokens * k * n
  flops = sum(lin(get_d_in(model, p), get_d_in(model, p)) for p in paths)  # Hessians
  if "o_proj" in names:
    flops += lin(d, d) + 2 * lin(d, kv) + 2 * 2 * tokens * seqlen * d  # q, k, v, attention
  if "up_proj" in names or "gate_proj" in names:
    flops += lin(d, d)  # o_proj on its kept input
  if "down_proj" in names:
    flops += 2 * lin(d, f)  # up and gate on their kept input
  return flops


def get_d_in(model, path) -> int:
  c = model.config
  return c.intermediate_size if path[-1] == "down_proj" else c.hidden_size


def reference_seconds(model, paths, tokens: int, seqlen: int, batch_tokens: int) -> float:
  """The same multiplications as `group_flops`, timed as plain matmuls (per forward batch)."""
  c = model.config
  d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
  names = {p[-1] for p in paths}
  shapes = [(get_d_in(model, p), batch_tokens, get_d_in(model, p)) for p in paths]
  if "o_proj" in names:
    shapes += [(batch_tokens, d, d), (batch_tokens, d, kv), (batch_tokens, d, kv),
               (batch_tokens, seqlen, d), (batch_tokens, seqlen, d)]  # attention as matmuls
  if "up_proj" in names or "gate_proj" in names:
    shapes += [(batch_tokens, d, d)]
  if "down_proj" in names:
    shapes += [(batch_tokens, d, f), (batch_tokens, d, f)]
  per_batch = sum(2 * m * k * n / (matmul_rate(m, k, n) * 1e9) for m, k, n in shapes)
  return per_batch * tokens / batch_tokens


def part_capture(model, params, ids, blocks: list[int], batch: int) -> dict:
  """Capture + Hessian seconds and Gflop/s per group, summed over `blocks` (unquantized
  blocks; the Hessians and the reuse of kept inputs are those of the pipeline)."""
  seqlen = ids.shape[1]
  tokens = ids.shape[0] * seqlen
  run = run_config("gptq", ids.shape[0], seqlen, "/tmp/unused")
  acts = embedded(model, params, ids, batch)
  sharing: dict = {}
  rows = {}
  for i in range(max(blocks) + 1):
    layer = jax.device_put(model.layer_params(params, i))
    classes = sequential._input_classes(model, layer, acts, i, sharing)  # pylint: disable=protected-access
    if i in blocks:
      plans = sequential.group_plans(run, model, i, classes)
      for warm in (True, False):
        kept = sequential._kept_inputs(run, acts)  # pylint: disable=protected-access
        for plan in plans:
          start = time.perf_counter()
          jax.block_until_ready(capture.group_hessians(model, layer, acts, i, plan.reps, kept=kept,
                                                       sharing=plan.sharing))
          if not warm:
            key = "+".join(p[-1] for p in plan.names)
            row = rows.setdefault(key, dict(seconds=0.0, flops=0.0, paths=tuple(plan.reps)))
            row["seconds"] += time.perf_counter() - start
            row["flops"] += group_flops(model, plan.reps, tokens, seqlen)
    acts = capture.block_outputs(model, layer, acts, i)
  batch_tokens = batch * seqlen
  out = {}
  for key, row in rows.items():
    ref = reference_seconds(model, row["paths"], tokens, seqlen, batch_tokens) * len(blocks)
    out[key] = dict(seconds=round(row["seconds"], 3), gflops=round(row["flops"] / row["seconds"] / 1e9, 1),
                    matmul_seconds=round(ref, 3), share_of_matmul=round(ref / row["seconds"], 2))
  total = sum(r["seconds"] for r in rows.values())
  ref_total = sum(o["matmul_seconds"] for o in out.values())
  return dict(blocks=blocks, tokens=tokens, groups=out, seconds=round(total, 3),
              matmul_seconds=round(ref_total, 3), share_of_matmul=round(ref_total / total, 2),
              load=load_avg())


# ----------------------------------------------------------------------------------------------
# solve: all 210 linears.


def layer_problems(model, params, ids, batch: int) -> list[tuple[dict, list]]:
  """Per block: (block params, [(Hessian, {path: module name}) per set of linears sharing an
  input]) on the unquantized model."""
  acts = embedded(model, params, ids, batch)
  out = []
  for i in range(model.num_layers):
    layer = jax.device_put(model.layer_params(params, i))
    first = next(iter(acts))
    classes = capture.shared_input_classes(model, layer, first.shape, first.dtype,
                                           capture.kind_index(model, i))
    reps = {cls[0]: sequential.module_name(i, cls[0]) for cls in classes}
    hessians = capture.group_hessians(model, layer, acts, i, reps)
    out.append((layer, [(hessians[cls[0]], {p: sequential.module_name(i, p) for p in cls})
                        for cls in classes]))
    acts = capture.block_outputs(model, layer, acts, i)
  jax.block_until_ready(out[-1][1][-1][0])
  return out


def flop_estimate(model, problems) -> float:
  """Σ over linears of d_out·d_in² + d_in³/3 (the issue's GPTQ estimate)."""
  total = 0.0
  for layer, sets in problems:
    for _, names in sets:
      for path in names:
        d_out, d_in = get_path(layer, path)["weight"].shape
        total += d_out * d_in**2 + d_in**3 / 3
  return total


def solve_seconds(run, problems, blocks) -> tuple[float, float]:
  """(seconds, summed objective) to solve and pack the linears of `blocks` as the pipeline
  does, after a warm-up on the first of them (compilation excluded)."""
  def solve(i):
    layer, sets = problems[i]
    objective = 0.0
    for H, names in sets:
      for stack in sequential.solve_stacks(run, sequential.GroupPlan(
          names=names, rep_of={p: next(iter(names)) for p in names}, reps={}, sharing={})):
        _, _, records = sequential.quantize_linears(run, layer, {p: names[p] for p in stack}, H)
        objective += sum(r["objective"] for r in records)
    return objective

  solve(blocks[0])
  start = time.perf_counter()
  objective = sum(solve(i) for i in blocks)
  return time.perf_counter() - start, objective


def part_solve(model, params, ids, batch: int, descent_blocks: list[int]) -> dict:
  problems = layer_problems(model, params, ids, batch)
  all_blocks = list(range(model.num_layers))
  estimate = flop_estimate(model, problems)
  # The machine's rate: the median over the capture's matmul shapes.
  rate = float(np.median([matmul_rate(*shape) for shape in matmul_shapes(model, 2048)]))
  gptq_run = run_config("gptq", ids.shape[0], ids.shape[1], "/tmp/unused")
  seconds, objective = solve_seconds(gptq_run, problems, all_blocks)
  out = dict(linears=sum(len(n) for _, sets in problems for _, n in sets),
             flop_estimate_gflop=round(estimate / 1e9, 1), matmul_gflops=round(rate, 1),
             gptq_seconds=round(seconds, 2), gptq_objective=objective,
             gptq_gflops=round(estimate / seconds / 1e9, 1),
             flop_limit_seconds=round(estimate / rate / 1e9, 2),
             gptq_vs_flop_limit=round(seconds / (estimate / rate / 1e9), 1), load=load_avg())
  subset = {}
  for method in ("gptq", "cd", "bcd"):
    secs, obj = solve_seconds(run_config(method, ids.shape[0], ids.shape[1], "/tmp/unused"),
                              problems, descent_blocks)
    subset[method] = dict(seconds=round(secs, 2), objective=obj)
  for method in ("cd", "bcd"):
    subset[method]["x_gptq"] = round(subset[method]["seconds"] / subset["gptq"]["seconds"], 1)
  out["descent"] = dict(blocks=descent_blocks, methods=subset, load=load_avg())
  return out


# ----------------------------------------------------------------------------------------------
# run: the whole configs/smollm2/gptq_w3.yaml run.


def part_run(out_dir: str, eval_windows: int | None) -> dict:
  overrides = [f"output_dir={out_dir}", "checkpoint=none"]
  if eval_windows:
    overrides.append(f"eval.max_windows={eval_windows}")
  run = config.load_run_config(RUN_CONFIG, overrides)
  load_before = load_avg()
  start = time.perf_counter()
  metrics = sequential.quantize_model(run, progress=False)
  seconds = time.perf_counter() - start
  return dict(seconds=round(seconds, 1), timing=metrics["timing"],
              perplexity=metrics.get("perplexity", {}).get("bundled", {}).get("ppl"),
              baseline=metrics.get("baseline_perplexity", {}).get("bundled", {}).get("ppl"),
              eval_windows=eval_windows or "all", load=f"{load_before} -> {load_avg()}")


# ----------------------------------------------------------------------------------------------
# peer: llm-compressor's GPTQ side by side (each side a subprocess).


def peer_run_config(args, out_dir: str, matched: bool) -> config.RunConfig:
  """Our GPTQ run of the side by side (see the module docstring).

  matched: llm-compressor's semantics (static groups, layer-sequential Hessians); else our
  defaults (dynamic groups, true-sequential).
  """
  knobs = dict(bits=args.bits, group_size=args.group_size, sym=False, act_order=False,
               percdamp=0.01, blocksize=128, static_groups=matched)
  return config.run_config_from_dict(dict(
      model=dict(path=aliases.SMOLLM2, dtype="float32"),
      calibration=dict(source="bundled", nsamples=args.nsamples, seqlen=args.seqlen, seed=0),
      quant=dict(method="gptq", knobs=knobs, true_sequential=not matched),
      eval=dict(sources=["bundled"], seqlen=PEER_EVAL_SEQLEN, batch_size=PEER_EVAL_BATCH,
                max_windows=args.peer_eval_windows or None, baseline=True),
      output_dir=out_dir, checkpoint="none", forward_batch_size=args.batch))


def peer_inputs(run: config.RunConfig, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """What the pipeline feeds itself for `run`, built the same way (`quantize_model`,
  `evaluation.evaluate_sources`): calibration ids [N, T] int32, the evaluation ids [1, L]
  (whose `token_hash` the run's metrics record) and their windows [L // S, S] int32."""
  c, e = run.calibration, run.eval
  calib = data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                   seed=c.seed, path=c.path, field=c.field)
  ids = data.evaluation_ids(e.sources[0], tokenizer, seqlen=e.seqlen)
  ids = evaluation.limit_windows(ids, e.seqlen, e.max_windows)
  return np.asarray(calib, np.int32), ids, split_windows(ids, e.seqlen)


def write_peer_inputs(workdir: str, calib: np.ndarray, windows: np.ndarray) -> None:
  """What the peer reads (`peer_llmcompressor.read_inputs`): calibration.npy [N, T] and
  evaluation.npy [W, S], int32."""
  np.save(os.path.join(workdir, "calibration.npy"), np.asarray(calib, np.int32))
  np.save(os.path.join(workdir, "evaluation.npy"), np.asarray(windows, np.int32))


def peak_rss_mib() -> float:
  """Peak resident set of this process (Linux ru_maxrss is in KiB), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def ours_side(args) -> dict:
  """Child process: load, write the inputs (--write-inputs), quantize + evaluate as a run does."""
  start = time.perf_counter()
  run = peer_run_config(args, os.path.join(args.workdir, f"run_{args.side}"),
                        matched=args.side == "matched")
  model, params, tok = registry.load_model(aliases.resolve_model_path(run.model.path),
                                           run.model.dtype)
  calib, ids, windows = peer_inputs(run, tok)
  if args.write_inputs:
    write_peer_inputs(args.workdir, calib, windows)
  load_seconds = time.perf_counter() - start
  result = sequential.quantize_loaded(run, model, params, calib, tokenizer=tok, progress=False)
  metrics = result.metrics
  quantized, baseline = metrics["perplexity"]["bundled"], metrics["baseline_perplexity"]["bundled"]
  if quantized["token_hash"] != data.token_hash(ids) or quantized["n_windows"] != len(windows):
    raise RuntimeError("the run evaluated other ids than the windows written for the peer")
  timing = dict(load_seconds=round(load_seconds, 3), **metrics["timing"],
                total_seconds=round(time.perf_counter() - start, 3))
  keep = ("ppl", "nll_sum", "n_tokens", "n_windows")
  return dict(settings=config_lib.to_dict(run.quant), timing=timing, compile=result.compile,
              peak_rss_mib=round(peak_rss_mib(), 1), cpu_seconds=round(cpu_seconds(), 1),
              baseline={k: baseline[k] for k in keep}, quantized={k: quantized[k] for k in keep},
              calibration_hash=data.token_hash(calib), evaluation_hash=data.token_hash(windows),
              relative_objective_sum=metrics["summary"]["relative_objective_sum"],
              versions=dict(jax=jax.__version__))


def child(command: list[str], result_path: str) -> dict:
  """Runs one side; its JSON result with the wall seconds seen from here and the load average
  before and after."""
  load_before = load_avg()
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
  with open(result_path) as f:
    result = json.load(f)
  return dict(result, wall_seconds=round(wall, 1), load=f"{load_before} -> {load_avg()}")


def ours_command(args, side: str, workdir: str, cache: str, write_inputs: bool) -> list[str]:
  command = [sys.executable, os.path.abspath(__file__), "--side", side, "--workdir", workdir,
             "--jax-cache", cache, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--batch", str(args.batch), "--bits", str(args.bits),
             "--group-size", str(args.group_size), "--peer-eval-windows", str(args.peer_eval_windows)]
  return command + (["--write-inputs"] if write_inputs else [])


def peer_command(args, workdir: str) -> list[str]:
  return [PEER_PYTHON, PEER_SCRIPT, "--workdir", workdir,
          "--gguf", aliases.resolve_model_path(aliases.SMOLLM2), "--bits", str(args.bits),
          "--group-size", str(args.group_size), "--percdamp", "0.01", "--blocksize", "128",
          "--calib-batch-size", str(args.batch), "--batch-size", str(PEER_EVAL_BATCH),
          "--threads", "2"]


def part_peer(args) -> dict:
  """Both sides on the same inputs: {side label: result}; raises when the peer read other
  token ids than our side produced."""
  if args.peer != "llm-compressor":
    raise SystemExit(f"--peer: only llm-compressor is known, got {args.peer!r}")
  if not os.path.exists(PEER_PYTHON):
    raise SystemExit(f"{PEER_PYTHON} is missing: run `make peer-venv` first")
  sides = {}
  with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
    def ours(label, side, cache, write_inputs=False):
      path = os.path.join(tmp, f"{side}.json")
      sides[label] = child(ours_command(args, side, tmp, cache, write_inputs) + ["--result", path],
                           path)
      print(label, json.dumps(sides[label]), flush=True)

    ours("ours matched, cache off", "matched", "off", write_inputs=True)
    sides["llm-compressor"] = child(peer_command(args, tmp), os.path.join(tmp, "peer.json"))
    print("llm-compressor", json.dumps(sides["llm-compressor"]), flush=True)
    cache = os.path.join(tmp, "jax_cache")
    ours("ours matched, cache filling", "matched", cache)
    ours("ours matched, warm cache", "matched", cache)
    if args.peer_ours_default:
      ours("ours default, cache off", "default", "off")
  reference = sides["ours matched, cache off"]
  for label, side in sides.items():
    for key in ("calibration_hash", "evaluation_hash"):
      if side[key] != reference[key]:
        raise RuntimeError(f"{label}: {key} {side[key]} != ours {reference[key]}")
  return sides


def peer_markdown(sides: dict, args) -> str:
  """The "llm-compressor side by side" table: one column per side, ratio peer / ours."""
  peer, ours = sides["llm-compressor"], sides["ours matched, cache off"]
  labels = list(sides)
  rows = [
      ("quantize s (oneshot / quantize_seconds)", lambda r: r["timing"]["quantize_seconds"]),
      ("total s (process wall: load, 2 evals, quantize)", lambda r: r["wall_seconds"]),
      ("compile s (inside quantize)", lambda r: r.get("compile", {}).get("compile_seconds", "-")),
      ("CPU s (user + sys, whole process)", lambda r: r.get("cpu_seconds", "-")),
      ("peak RSS MiB", lambda r: r["peak_rss_mib"]),
      ("baseline ppl (unquantized)", lambda r: round(r["baseline"]["ppl"], 6)),
      ("quantized ppl", lambda r: round(r["quantized"]["ppl"], 4)),
      ("load avg before -> after", lambda r: r["load"]),
  ]
  ratio = lambda f: (round(f(peer) / f(ours), 2)
                     if isinstance(f(ours), (int, float)) and isinstance(f(peer), (int, float))
                     else "")
  lines = ["## llm-compressor side by side", "",
           f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC, {platform.machine()}, "
           f"{os.cpu_count()} CPUs; GPTQ w{args.bits} g{args.group_size} asymmetric, percdamp "
           f"0.01, blocksize 128, no act order, {args.nsamples} x {args.seqlen} bundled "
           f"calibration tokens (sha256 {ours['calibration_hash'][:12]}), evaluation "
           f"{ours['quantized']['n_windows']} x {PEER_EVAL_SEQLEN} windows "
           f"(sha256 {ours['evaluation_hash'][:12]}), identical on both sides.", "",
           "| | " + " | ".join(labels) + " | llm-compressor / ours (cache off) |",
           "|---" * (len(labels) + 2) + "|"]
  for name, f in rows:
    lines.append(f"| {name} | " + " | ".join(str(f(sides[k])) for k in labels)
                 + f" | {ratio(f)} |")
  versions = dict(peer["versions"], jax=ours["versions"]["jax"])
  lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
            "```json", json.dumps(sides, indent=1), "```", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def markdown(results: dict, args) -> str:
  lines = [f"## Measured {time.strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, "
           f"{os.cpu_count()} CPUs, jax {jax.__version__})", "",
           "```json", json.dumps(results, indent=1), "```", ""]
  del args
  return "\n".join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--parts", default=None,
                 help=f"comma separated, of {','.join(PARTS)} (default: all; none with --peer)")
  p.add_argument("--nsamples", type=int, default=32)
  p.add_argument("--seqlen", type=int, default=256)
  p.add_argument("--batch", type=int, default=8, help="calibration windows per block forward")
  p.add_argument("--capture-blocks", default="10", help="blocks timed by the capture part")
  p.add_argument("--descent-blocks", default="0,10,20,29",
                 help="blocks on which CD and BCD are timed against GPTQ")
  p.add_argument("--run-eval-windows", type=int, default=0,
                 help="run part: evaluate only the first windows (0: the whole split)")
  p.add_argument("--jax-cache", default="off", help="persistent compilation cache (run part)")
  p.add_argument("--out", default=None, help="append the Markdown results here")
  p.add_argument("--peer", default=None, help="llm-compressor: GPTQ side by side (see above)")
  p.add_argument("--peer-ours-default", action="store_true",
                 help="--peer: also run our default GPTQ (dynamic groups, true-sequential)")
  p.add_argument("--peer-eval-windows", type=int, default=0,
                 help="--peer: evaluate the first windows only (0: the whole split)")
  p.add_argument("--bits", type=int, default=3, help="--peer: bits per weight")
  p.add_argument("--group-size", type=int, default=64, help="--peer: columns per group")
  # One side of --peer, run as a child process by the parent.
  p.add_argument("--side", choices=("matched", "default"), help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  p.add_argument("--write-inputs", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  compilation.enable_persistent_cache(args.jax_cache)
  if args.side:
    result = ours_side(args)
    with open(args.result, "w") as f:
      json.dump(result, f, indent=1)
    return 0
  parts = args.parts.split(",") if args.parts else ([] if args.peer else list(PARTS))
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise SystemExit(f"--parts: unknown {sorted(unknown)}; known: {PARTS}")
  results = {"load_start": load_avg()}
  if parts:
    model, params, _, ids = load(args.nsamples, args.seqlen)
  tokens = args.batch * args.seqlen
  if "matmul" in parts:
    results["matmul"] = part_matmul(model, tokens)
    print(json.dumps(results["matmul"]), flush=True)
  if "capture" in parts:
    blocks = [int(b) for b in args.capture_blocks.split(",")]
    results["capture"] = part_capture(model, params, ids, blocks, args.batch)
    print(json.dumps(results["capture"]), flush=True)
  if "solve" in parts:
    blocks = [int(b) for b in args.descent_blocks.split(",")]
    results["solve"] = part_solve(model, params, ids, args.batch, blocks)
    print(json.dumps(results["solve"]), flush=True)
  if "run" in parts:
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
      results["run"] = part_run(tmp, args.run_eval_windows or None)
    print(json.dumps(results["run"]), flush=True)
  text = ""
  if args.peer:
    text = peer_markdown(part_peer(args), args)
  results["load_end"] = load_avg()
  if parts:
    text = markdown(results, args) + text
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
