"""The layer-sequential calibration pipeline (GPTQ `llama_sequential` with true-sequential groups).

For each decoder block i, on the outputs of the already-quantized blocks 0..i-1:
  for each true-sequential group ([k, v, q] → [o] → [up, gate] → [down] for Llama):
    run the block over the calibration set capturing the group's linear inputs, accumulate one
    f32 Hessian per distinct input (q/k/v share one), solve every linear of the group, pack it
    (QuantizedWeight) and write the dequantized weight back, so that later groups and blocks
    see the quantized model;
  run the quantized block to produce the inputs of block i + 1, then checkpoint.
Only one block's params (and the activations [N, T, D]) are on the device at a time.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax import data, io_utils
from cdquant_jax._numerics import layer_objective, reference_energy
from cdquant_jax.models import registry
from cdquant_jax.models.params import get_path, set_path
from cdquant_jax.pipeline import capture, checkpoint, evaluation, export, memory, runlog
from cdquant_jax.models.aliases import resolve_model_path
from cdquant_jax.pipeline.config import RunConfig
from cdquant_jax.pipeline.rules import is_included, module_name, solver_for
from cdquant_jax.quant import bits as bits_lib
from cdquant_jax.quant import qweight
from cdquant_jax.solvers import api

log = logging.getLogger(__name__)
Params = dict[str, Any]
Path = tuple[str, ...]


class Timer:
  """Wall seconds per pipeline phase, as laps that tile this process's quantization time.

  `lap(key)` charges the seconds since the previous lap (or since the timer was made) to
  `key`, so the phases add up to `quantize_seconds()` whatever runs between two laps. Laps of
  keys in `OUTSIDE` (the baseline evaluation) are reported but are not quantization time.
  """

  OUTSIDE = ("baseline_eval_seconds",)

  def __init__(self):
    self.totals: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, key: str) -> None:
    now = time.perf_counter()
    self.totals[key] = self.totals.get(key, 0.0) + now - self._last
    self._last = now

  def quantize_seconds(self) -> float:
    """Sum of the laps so far but the OUTSIDE ones (seconds)."""
    return sum(v for k, v in self.totals.items() if k not in self.OUTSIDE)

  def elapsed(self) -> float:
    """quantize_seconds() plus the current, unfinished lap."""
    return self.quantize_seconds() + time.perf_counter() - self._last


class QuantizedRun:
  """What `quantize_loaded` returns: metrics, dense quantized params, packed weights, log."""

  def __init__(self, metrics: dict, params: Params, qweights: dict, records: list[dict]):
    self.metrics, self.params, self.qweights, self.records = metrics, params, qweights, records


def quantize_model(run: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
  """Loads the model and calibration data of `run`, quantizes, exports; returns the metrics."""
  source_dtypes: dict[str, str] = {}
  model, params, tokenizer = registry.load_model(resolve_model_path(run.model.path),
                                                 run.model.dtype, source_dtypes=source_dtypes)
  c = run.calibration
  if tokenizer is None:
    raise ValueError(f"model {run.model.path}: no tokenizer, cannot build calibration data")
  ids = data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                 seed=c.seed, path=c.path, field=c.field)
  return quantize_loaded(run, model, params, ids, tokenizer=tokenizer, resume=resume,
                         progress=progress, source_dtypes=source_dtypes).metrics


def quantize_loaded(run: RunConfig, model, params: Params, calibration_ids: np.ndarray, *,
                    tokenizer=None, resume: bool = False, progress: bool = True,
                    after_block: Callable[[int], None] | None = None,
                    source_dtypes: dict[str, str] | None = None) -> QuantizedRun:
  """Quantizes a loaded model on calibration_ids [N, T] and writes run.output_dir.

  after_block(i) is called after block i is checkpointed (tests interrupt runs with it).
  source_dtypes: the checkpoint's type of each parameter (`registry.load_model` fills it), so
  that the exported unquantized tensors are no wider than they came (`export.storage_dtype`).
  Raises checkpoint.ResumeError when resuming a run of another model/data/config.
  """
  run.validate()
  out_dir = run.output_dir
  os.makedirs(out_dir, exist_ok=True)
  timer = Timer()
  params = jax.device_get(params)  # host copy; blocks move to the device one at a time
  calibration_ids = np.asarray(calibration_ids, np.int32)
  checkpointing = run.checkpoint != "none"
  fp = checkpoint.fingerprint(run, model, params, calibration_ids) if checkpointing or resume \
      else None
  state = checkpoint.load_state(out_dir) if resume else None
  timer.lap("setup_seconds")
  baseline = _baseline(run, model, params, tokenizer, progress)
  if baseline is not None:
    timer.lap("baseline_eval_seconds")
  start_block, records, qweights, saved_acts = 0, [], {}, None
  if state is not None:
    checkpoint.check_fingerprint(state["fingerprint"], fp, where=checkpoint.checkpoint_dir(out_dir))
    start_block, records = state["blocks_done"], state["records"]
    timer.totals["previous_sessions_seconds"] = state["seconds"]
    qweights = checkpoint.load_blocks(out_dir, start_block)
    params = _with_quantized(model, params, qweights)
    saved_acts = checkpoint.load_activations(out_dir, state)
    log.info("resuming %s after block %d", out_dir, start_block - 1)
  else:
    if resume:
      log.warning("resume: no checkpoint in %s; starting from block 0", out_dir)
    checkpoint.clear(out_dir)
  timer.lap("setup_seconds")

  acts = _initial_activations(run, model, params, calibration_ids, start_block, saved_acts)
  timer.lap("embed_or_replay_seconds")
  bar = runlog.Progress(model.num_layers, start_block, progress)
  sharing: dict[int, list[list[Path]]] = {}
  for i in range(start_block, model.num_layers):
    layer_params = jax.device_put(model.layer_params(params, i))
    kind = capture.kind_index(model, i)
    if kind not in sharing:
      sharing[kind] = capture.shared_input_classes(model, layer_params, next(iter(acts)).shape,
                                                   next(iter(acts)).dtype, kind)
    timer.lap("transfer_seconds")
    layer_params, block_qw, block_records = quantize_block(
        run, model, layer_params, acts, i, sharing[kind], len(calibration_ids), bar, timer)
    acts = capture.block_outputs(model, layer_params, acts, i)
    timer.lap("propagate_seconds")
    params = model.set_layer_params(params, i, jax.device_get(layer_params))
    qweights.update(block_qw)
    records = records + block_records
    timer.lap("transfer_seconds")
    if checkpointing:
      state = dict(fingerprint=fp, blocks_done=i + 1, records=records, seconds=timer.elapsed())
      checkpoint.save_block(out_dir, i, block_qw, state,
                            acts.stacked() if run.checkpoint == "activations" else None)
    runlog.write_log(out_dir, records)
    bar.advance()
    timer.lap("checkpoint_seconds")
    if after_block is not None:
      after_block(i)
  bar.close()
  timer.lap("checkpoint_seconds")
  metrics = _finish(run, model, params, qweights, records, tokenizer, progress, baseline, timer,
                    source_dtypes)
  checkpoint.clear(out_dir)
  return QuantizedRun(metrics, params, qweights, records)


def _baseline(run, model, params, tokenizer, progress) -> dict | None:
  """Perplexity of the unquantized model when run.eval.baseline is set."""
  if not (run.eval.baseline and run.eval.sources):
    return None
  return evaluation.evaluate_sources(run.eval, model, params, tokenizer,
                                     default_seqlen=run.calibration.seqlen, progress=progress)


def _initial_activations(run, model, params, ids, start_block, saved) -> capture.Activations:
  """Inputs of block `start_block`: embeddings, saved activations, or a replay of the
  quantized blocks 0..start_block-1 with the same jitted forwards."""
  on_host = run.activations == "host"
  if saved is not None:
    return capture.Activations.from_array(saved, run.forward_batch_size, on_host)
  embed_params = jax.device_put({k: v for k, v in params.items() if k != "layers"})
  acts = capture.embed_calibration(model, embed_params, ids, run.forward_batch_size, on_host)
  for i in range(start_block):
    acts = capture.block_outputs(model, jax.device_put(model.layer_params(params, i)), acts, i)
  return acts


def _with_quantized(model, params: Params, qweights: dict) -> Params:
  """params with each checkpointed linear's weight replaced by its dequantized value."""
  for i in range(model.num_layers):
    layer = model.layer_params(params, i)
    for path in model.linear_paths():
      name = module_name(i, path)
      if name in qweights:
        w = get_path(layer, path)["weight"]
        layer = set_path(layer, path + ("weight",),
                         np.asarray(export.dequantized_weight(qweights[name], w.dtype)))
    params = model.set_layer_params(params, i, layer)
  return params


def quantize_block(run: RunConfig, model, layer_params: Params, acts: capture.Activations,
                   layer_index: int, classes: list[list[Path]], nsamples: int,
                   bar: runlog.Progress, timer: "Timer") -> tuple[Params, dict, list[dict]]:
  """Quantizes every included linear of one block, group by group (see the module docstring).

  Returns (block params with dequantized weights, {module: QuantizedWeight}, log records).
  """
  qweights, records = {}, []
  groups = model.block_linears()
  if not run.quant.true_sequential:
    groups = [[path for group in groups for path in group]]
  for group in groups:
    names = {p: module_name(layer_index, p) for p in group}
    names = {p: n for p, n in names.items() if is_included(run.quant, n)}
    if not names:
      continue
    # Each linear's Hessian comes from the first included linear with the same input.
    rep_of = {p: next(q for q in cls if q in names) for cls in classes for p in cls if p in names}
    reps = {rep_of[p]: names[rep_of[p]] for p in names}
    bar.status(f"block {layer_index}: H of {', '.join(p[-1] for p in reps)}")
    hessians = capture.group_hessians(model, layer_params, acts, layer_index, reps)
    timer.lap("capture_hessian_seconds")
    for path, name in names.items():
      bar.status(f"block {layer_index}: {path[-1]}")
      layer_params, qw, record = quantize_linear(run, layer_params, path, name,
                                                 hessians[rep_of[path]])
      timer.lap("solve_pack_seconds")
      qweights[name] = qw
      records.append({**record, "layer": layer_index, "nsamples": nsamples})
  return layer_params, qweights, records


def quantize_linear(run: RunConfig, layer_params: Params, path: Path, name: str, H: jax.Array
                    ) -> tuple[Params, qweight.QuantizedWeight, dict]:
  """Solves one linear, packs it, writes the dequantized weight back; returns the log record."""
  start = time.perf_counter()
  weight = get_path(layer_params, path)["weight"]
  W = jnp.asarray(weight, jnp.float32)
  method, cfg = solver_for(run.quant, name)
  result = api.solve(method, W, H, cfg, layer=name)
  lossy = method.startswith("spqr") and run.quant.spqr_lossy_outliers
  qw = qweight.pack_result(result, allow_lossy_outliers=lossy)
  Q = export.dequantized_weight(qw, weight.dtype)
  layer_params = set_path(layer_params, path + ("weight",), Q)
  objective = float(result.objective)
  energy = float(reference_energy(W, H))
  record = dict(module=name, shape=list(W.shape), method=method, objective=objective,
                energy=energy, relative_objective=objective / energy if energy > 0 else None,
                **runlog.damping(result.diagnostics), **bits_lib.bits_report(qw),
                lossy_outliers=bool(lossy and qw.meta.nnz > 0),
                seconds=round(time.perf_counter() - start, 4))
  if record["lossy_outliers"]:
    record["objective_stored"] = float(layer_objective(W, qweight.dequantize(qw), H))
  return layer_params, qw, record


def summarize(records: list[dict]) -> dict:
  """Totals over the log: summed (relative) objectives and parameter-weighted bits."""
  n = sum(r["shape"][0] * r["shape"][1] for r in records)
  if not n:
    return dict(modules=0, params_quantized=0)
  weighted = lambda key: sum(r[key] * r["shape"][0] * r["shape"][1] for r in records) / n
  objective = sum(r["objective"] for r in records)
  energy = sum(r["energy"] for r in records)
  methods = sorted({r["method"] for r in records})
  return dict(modules=len(records), params_quantized=n, methods=methods,
              objective_sum=objective, relative_objective_sum=objective / energy if energy else None,
              mean_relative_objective=float(np.mean([r["relative_objective"] or 0.0 for r in records])),
              bits_formula=weighted("bits_formula"), bits_stored=weighted("bits_stored"),
              outlier_share=weighted("outlier_share"))


def _finish(run, model, params, qweights, records, tokenizer, progress, baseline,
            timer: Timer, source_dtypes: dict[str, str] | None) -> dict:
  """Evaluates (if configured), writes the model directory and metrics.json.

  metrics["timing"] (seconds): quantize_seconds and the phases that add up to it: setup
  (host copy, fingerprint, checkpoint loading), embed_or_replay, transfer (block params to and
  from the device, input-sharing analysis), capture_hessian, solve_pack, propagate, checkpoint
  (and log), previous_sessions (a resumed run's earlier processes); then the times outside it:
  baseline_eval_seconds (when configured), eval_seconds, export_seconds.
  """
  metrics = dict(summary=summarize(records), quantized_modules=sorted(qweights))
  if baseline is not None:
    metrics["baseline_perplexity"] = baseline
  timing = dict(quantize_seconds=round(timer.quantize_seconds(), 3),
                **{k: round(v, 3) for k, v in timer.totals.items()})
  default_seqlen = run.calibration.seqlen
  if run.eval.sources:
    start = time.perf_counter()
    metrics["perplexity"] = evaluation.evaluate_sources(run.eval, model, params, tokenizer,
                                                        default_seqlen=default_seqlen,
                                                        progress=progress)
    timing["eval_seconds"] = round(time.perf_counter() - start, 3)
  start = time.perf_counter()
  export.write_model_dir(run.output_dir, model, params, qweights, tokenizer=tokenizer,
                         run_config=run, extra=dict(run_config=config_lib.to_dict(run)),
                         source_dtypes=source_dtypes)
  timing["export_seconds"] = round(time.perf_counter() - start, 3)
  metrics["timing"] = timing
  metrics["memory"] = memory.memory_report()
  io_utils.atomic_write_json(os.path.join(run.output_dir, export.METRICS_FILE), metrics)
  return metrics
