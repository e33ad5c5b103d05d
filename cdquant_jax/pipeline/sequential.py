"""The layer-sequential calibration pipeline (GPTQ `llama_sequential` with true-sequential groups).

For each decoder block i, on the outputs of the already-quantized blocks 0..i-1:
  for each true-sequential group ([k, v, q] → [o] → [up, gate] → [down] for Llama):
    run the block over the calibration set capturing the group's linear inputs, accumulate one
    f32 Hessian per distinct input (q/k/v share one), solve every linear of the group, pack it
    (QuantizedWeight) and write the dequantized weight back, so that later groups and blocks
    see the quantized model;
  run the quantized block to produce the inputs of block i + 1, then checkpoint.
Only one block's params (and the activations [N, T, D]) are on the device at a time; with
`weights: disk` the unquantized blocks are not in host memory either (`pipeline.weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import compilation, data, io_utils
from cdquant_jax import config as config_lib
from cdquant_jax._numerics import layer_objective, reference_energy
from cdquant_jax.distributed import multihost, placement
from cdquant_jax.models import registry
from cdquant_jax.models.aliases import resolve_model_path
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.params import get_path, set_path
from cdquant_jax.pipeline import (capture, checkpoint, evaluation, export, memory, runlog, tune,
                                  weights)
from cdquant_jax.pipeline.config import RunConfig, check_token_hash
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
  Each lap also charges the host memory peak since the previous one to `key`
  (`memory.tracking`, started with the timer unless already active; stopped when the timer is
  dropped).
  """

  OUTSIDE = ("baseline_eval_seconds",)

  def __init__(self):
    self.totals: dict[str, float] = {}
    self._memory = contextlib.ExitStack()
    self.memory = self._memory.enter_context(memory.tracking())
    self._last = time.perf_counter()

  def __del__(self):
    self._memory.close()

  def lap(self, key: str) -> None:
    now = time.perf_counter()
    self.totals[key] = self.totals.get(key, 0.0) + now - self._last
    self._last = now
    memory.mark(key)

  def quantize_seconds(self) -> float:
    """Sum of the laps so far but the OUTSIDE ones (seconds)."""
    return sum(v for k, v in self.totals.items() if k not in self.OUTSIDE)

  def elapsed(self) -> float:
    """quantize_seconds() plus the current, unfinished lap."""
    return self.quantize_seconds() + time.perf_counter() - self._last


class RunObserver:
  """Progress and timing of a run: the block loop reports phases and status to it.

  `phase(key)` ends the current lap of the Timer under `key`; `status(text)` and `block_done()`
  drive the progress bar (`runlog.Progress`, a no-op without `progress`).
  """

  def __init__(self, progress: bool):
    self.timer = Timer()
    self.progress = progress
    self.bar: runlog.Progress | None = None

  def phase(self, key: str) -> None:
    self.timer.lap(key)

  def start_blocks(self, n_blocks: int, first: int) -> None:
    self.bar = runlog.Progress(n_blocks, first, self.progress)

  def status(self, text: str) -> None:
    self.bar.status(text)

  def block_done(self) -> None:
    self.bar.advance()

  def close(self) -> None:
    self.bar.close()


class QuantizedRun:
  """What `quantize_loaded` returns: metrics, dense quantized params, packed weights, log, and
  the compile work of the run (`compilation.CompileStats.report`: compile_seconds, inside the
  metrics' times, programs_compiled, cache_hits)."""

  def __init__(self, metrics: dict, params: Params, qweights: dict, records: list[dict],
               compile_report: dict | None = None):
    self.metrics, self.params, self.qweights, self.records = metrics, params, qweights, records
    self.compile = compile_report or {}


@dataclasses.dataclass
class RunState:
  """Where the block loop stands: next block, host params (quantized blocks dequantized),
  packed weights and log records so far, and saved activations of a resumed run (or None)."""

  block: int
  params: Params
  qweights: dict
  records: list[dict]
  saved_acts: np.ndarray | None = None


def quantize_model(run: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
  """Loads the model and calibration data of `run`, quantizes, exports; returns the metrics.

  The loaded params are handed over to `quantize_loaded` (no reference is kept here), so the
  quantized blocks replace the loaded ones instead of adding a second copy of the model. With
  run.weights "disk" only the outer params are loaded (`weights.load_model`).
  """
  source_dtypes: dict[str, str] = {}
  load = weights.load_model if run.weights == "disk" else registry.load_model
  with memory.tracking():
    model, params, tokenizer = load(resolve_model_path(run.model.path), run.model.dtype,
                                    source_dtypes=source_dtypes)
    memory.release_freed()
    memory.mark("load_seconds")
    c = run.calibration
    if tokenizer is None:
      raise ModelLoadError(f"model {run.model.path}: no tokenizer, cannot build calibration data")
    ids = data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                   seed=c.seed, path=c.path, field=c.field)
    memory.mark("calibration_data_seconds")
    handed = [params]
    del params
    return quantize_loaded(run, model, handed.pop(), ids, tokenizer=tokenizer, resume=resume,
                           progress=progress, source_dtypes=source_dtypes).metrics


def quantize_loaded(run: RunConfig, model, params: Params, calibration_ids: np.ndarray, *,
                    tokenizer=None, resume: bool = False, progress: bool = True,
                    after_block: Callable[[int], None] | None = None,
                    source_dtypes: dict[str, str] | None = None,
                    baseline: dict | None = None) -> QuantizedRun:
  """Quantizes a loaded model on calibration_ids [N, T] and writes run.output_dir.

  Steps: resume (or start), embed (or replay), then per block: capture + solve (`quantize_block`),
  propagate, checkpoint; finally evaluate and export (`_finish`).
  after_block(i) is called after block i is checkpointed (tests interrupt runs with it).
  source_dtypes: the checkpoint's type of each parameter (`registry.load_model` fills it), so
  that the exported unquantized tensors are no wider than they came (`export.storage_dtype`).
  baseline: the unquantized model's perplexities when already known (a sweep computes them once
  per model and evaluation settings); None computes them here when run.eval.baseline is set.
  Raises checkpoint.ResumeError when resuming a run of another model/data/config.
  Memory: the blocks of `params` are replaced as they are quantized; a caller that keeps its
  own reference to `params` keeps the unquantized copy alive too (`quantize_model` does not).
  run.weights "disk" needs lazy params (`weights.load_model`; ConfigError for loaded ones);
  the returned QuantizedRun.params are then lazy too (params["layers"][i] reads block i).
  """
  run.validate()
  params = weights.check_storage(run, params)
  os.makedirs(run.output_dir, exist_ok=True)
  obs = RunObserver(progress)
  compiles = compilation.CompileStats()
  params = _host_params(params)  # blocks move to the device one at a time
  calibration_ids = np.asarray(calibration_ids, np.int32)
  check_token_hash("calibration", data.token_hash(calibration_ids),
                   run.expected_hash("calibration"))
  check_solve_devices(run)
  placement.check_run_mesh(run.mesh)
  fp = _fingerprint(run, model, params, calibration_ids) \
      if run.checkpoint != "none" or resume else None
  obs.phase("setup_seconds")
  if baseline is None:
    baseline = _baseline(run, model, params, tokenizer, progress)
  if baseline is not None:
    memory.release_freed()
    obs.phase("baseline_eval_seconds")
  state = _resume_or_start(run, model, params, fp, resume, obs.timer)
  del params  # state.params holds the blocks now; each quantized block replaces its original
  obs.phase("setup_seconds")
  acts = _initial_activations(run, model, state, calibration_ids)
  obs.phase("embed_or_replay_seconds")
  obs.start_blocks(model.num_layers, state.block)
  sharing: dict[int, list[list[Path]]] = {}
  for i in range(state.block, model.num_layers):
    acts = _quantize_and_propagate(run, model, state, acts, i, sharing, len(calibration_ids), obs)
    _checkpoint(run, model, fp, state, acts, i, obs)
    if after_block is not None:
      after_block(i)
  obs.close()
  obs.phase("checkpoint_seconds")
  metrics = _finish(run, model, state.params, state.qweights, state.records, tokenizer, progress,
                    baseline, obs.timer, source_dtypes,
                    calibration_hash=data.token_hash(calibration_ids))
  checkpoint.clear(run.output_dir)
  return QuantizedRun(metrics, state.params, state.qweights, state.records, compiles.report())


def _fingerprint(run, model, params, calibration_ids) -> dict[str, Any]:
  """`checkpoint.fingerprint` with the model hashed one block at a time for lazy params and
  run.weights left out (it does not change the result: a run may resume with the other)."""
  config = {k: v for k, v in checkpoint.quant_config_dict(run).items() if k != "weights"}
  return dict(model=weights.model_hash(model, params), data=data.token_hash(calibration_ids),
              config=config)


def _host_params(params: Params) -> Params:
  """`host_params` of resident params; of lazy ones the outer params (blocks are read when
  needed)."""
  if weights.is_lazy(params):
    return {**host_params(weights.outer(params)), "layers": params["layers"]}
  return host_params(params)


def _resume_or_start(run, model, params, fp, resume: bool, timer: Timer) -> RunState:
  """The checkpointed state of run.output_dir when resuming (checked against `fp`), else a
  fresh state (and any stale checkpoint removed)."""
  out_dir = run.output_dir
  saved = checkpoint.load_state(out_dir) if resume else None
  if saved is None:
    if resume:
      log.warning("resume: no checkpoint in %s; starting from block 0", out_dir)
    checkpoint.clear(out_dir)
    return RunState(block=0, params=params, qweights={}, records=[])
  checkpoint.check_fingerprint(saved["fingerprint"], fp, where=checkpoint.checkpoint_dir(out_dir))
  timer.totals["previous_sessions_seconds"] = saved["seconds"]
  qweights = checkpoint.load_blocks(out_dir, saved["blocks_done"])
  log.info("resuming %s after block %d", out_dir, saved["blocks_done"] - 1)
  params = _with_tuned_params(model, _with_quantized(model, params, qweights), out_dir,
                              saved["blocks_done"])
  return RunState(block=saved["blocks_done"], params=params,
                  qweights=qweights, records=saved["records"],
                  saved_acts=checkpoint.load_activations(out_dir, saved))


def _quantize_and_propagate(run, model, state: RunState, acts: capture.Activations, i: int,
                            sharing: dict, nsamples: int, obs: RunObserver) -> capture.Activations:
  """Quantizes block i (updating `state`) and returns the inputs of block i + 1."""
  obs.timer.memory.reset_window()
  layer_params = jax.device_put(model.layer_params(state.params, i))
  classes = _input_classes(model, layer_params, acts, i, sharing)
  obs.phase("transfer_seconds")
  kept = _kept_inputs(run, acts)
  targets = None
  if run.tune.enabled and any(is_included(run.quant, module_name(i, p))
                              for p in model.linear_paths()):
    # the full-precision block on the inputs the quantized block sees
    targets = capture.block_outputs(model, layer_params, acts, i)
    obs.phase("tune_seconds")
  layer_params, block_qw, block_records = quantize_block(run, model, layer_params, acts, i,
                                                         classes, nsamples, obs, kept=kept)
  if targets is not None:
    layer_params, block_qw, block_records = _tune(run, model, layer_params, block_qw,
                                                  block_records, acts, targets, i, obs)
    kept = None  # the kept linear inputs predate the tuned parameters
  buffers = _block_buffers(run, model, layer_params, acts, kept, i, classes)
  acts = capture.block_outputs(model, layer_params, acts, i, kept)
  buffers["activations_out"] = acts.resident_nbytes()
  obs.phase("propagate_seconds")
  state.params = weights.set_block(model, state.params, i, host_params(layer_params),
                                   _by_path(model, i, block_qw))
  state.qweights.update(block_qw)
  report = memory.block_report(buffers, obs.timer.memory.window_peak())
  state.records = state.records + [{**r, "block_memory": report} for r in block_records]
  memory.release_freed()  # the replaced block's buffers (see `memory.release_freed`)
  compilation.release_programs_near_map_limit()  # a long run's programs (see there)
  state.block = i + 1
  obs.phase("transfer_seconds")
  return acts


def _block_buffers(run, model, layer_params: Params, acts: capture.Activations,
                   kept: capture.LinearInputs | None, i: int, classes: list[list[Path]]
                   ) -> dict[str, int]:
  """Bytes of block i's accounted buffers in memory (host or device; activations on disk count
  0): its params, input activations, kept linear inputs and the Hessians of its largest group
  (each group's are freed once it is solved)."""
  hessians = [sum(4 * _input_width(layer_params, rep) ** 2 for rep in plan.reps)
              for plan in group_plans(run, model, i, classes)]
  return dict(block_params=sum(x.nbytes for x in jax.tree.leaves(layer_params)),
              activations_in=acts.resident_nbytes(),
              kept_inputs=0 if kept is None else kept.resident_nbytes(),
              hessians_largest_group=max(hessians, default=0))


def _input_width(layer_params: Params, path: Path) -> int:
  return get_path(layer_params, path)["weight"].shape[-1]


def _by_path(model, i: int, qweights: dict) -> dict[Path, qweight.QuantizedWeight]:
  """{linear path in block i: packed weight} of the modules of block i in `qweights`."""
  return {p: qweights[module_name(i, p)] for p in model.linear_paths()
          if module_name(i, p) in qweights}


def _tune(run, model, layer_params: Params, block_qw: dict, block_records: list[dict],
          acts: capture.Activations, targets: capture.Activations, i: int, obs: RunObserver):
  """`tune.tune_block` on solved block i: (params, packed weights, records, each carrying the
  block's tune record under "tune")."""
  obs.status(f"block {i}: tune")
  paths = {module_name(i, p): p for p in model.linear_paths()}
  layer_params, block_qw, record = tune.tune_block(run.tune, model, layer_params, block_qw,
                                                   paths, acts, targets, i)
  obs.phase("tune_seconds")
  return layer_params, block_qw, [{**r, "tune": record} for r in block_records]


def _with_tuned_params(model, params: Params, out_dir: str, blocks_done: int) -> Params:
  """params with the tuned unquantized params of the checkpointed blocks put back."""
  for i in range(blocks_done):
    saved = checkpoint.load_block_params(out_dir, i)
    if saved and weights.is_lazy(params):
      dtype = params["layers"].reader.dtype  # each leaf's dtype, as `tune.with_tensors` casts
      params = weights.with_stored(params, i, {}, {
          tuple(name.split(".")): np.asarray(value, dtype) for name, value in saved.items()})
    elif saved:
      params = model.set_layer_params(params, i, tune.with_tensors(model.layer_params(params, i),
                                                                   saved))
  return params


def host_params(tree: Any) -> Any:
  """tree where the pipeline keeps the model between block programs: host numpy arrays, or on
  the CPU backend the arrays as they are (host memory is device memory there: a numpy copy
  would be copied back to the device for every call)."""
  return tree if jax.default_backend() == "cpu" else jax.device_get(tree)


def _input_classes(model, layer_params, acts: capture.Activations, i: int,
                   sharing: dict) -> list[list[Path]]:
  """Which linears of block i share an input (found once per kind of block, cached in
  `sharing`)."""
  kind = capture.kind_index(model, i)
  if kind not in sharing:
    first = next(iter(acts))
    sharing[kind] = capture.shared_input_classes(model, layer_params, first.shape, first.dtype,
                                                 kind)
  return sharing[kind]


def _kept_inputs(run: RunConfig, acts: capture.Activations) -> capture.LinearInputs | None:
  """Storage for the block's captured linear inputs, when the run keeps them (see RunConfig)."""
  if not (run.keep_linear_inputs and run.quant.true_sequential):
    return None
  return capture.LinearInputs(len(acts.batches), acts.storage)


def replay_block(run: RunConfig, model, layer_params: Params, acts: capture.Activations, i: int,
                 classes: list[list[Path]]) -> capture.Activations:
  """The outputs of the quantized block i exactly as the run computed them: with kept inputs,
  the group captures run again (the same programs on the same values) before the propagation,
  so a resumed run is bit-identical to an uninterrupted one (a tuned block propagates without
  kept inputs, as `_quantize_and_propagate` does)."""
  kept = None if run.tune.enabled else _kept_inputs(run, acts)
  if kept is not None:
    for plan in group_plans(run, model, i, classes):
      capture.group_hessians(model, layer_params, acts, i, plan.reps, kept=kept,
                             sharing=plan.sharing)
  return capture.block_outputs(model, layer_params, acts, i, kept)


def _checkpoint(run, model, fp, state: RunState, acts: capture.Activations, i: int,
                obs: RunObserver) -> None:
  """Saves block i's packed weights (and the activations if configured) and the log."""
  if run.checkpoint != "none":
    saved = dict(fingerprint=fp, blocks_done=i + 1, records=state.records,
                 seconds=obs.timer.elapsed())
    block_qw = {k: v for k, v in state.qweights.items() if k.startswith(module_name(i, ()) + ".")}
    if run.tune.enabled and "norms" in run.tune.params:
      checkpoint.save_block_params(run.output_dir, i,
                                   tune.norm_tensors(model.layer_params(state.params, i)))
    checkpoint.save_block(run.output_dir, i, block_qw, saved,
                          acts if run.checkpoint == "activations" else None)
  if multihost.is_writer():
    runlog.write_log(run.output_dir, state.records)
  obs.block_done()
  obs.phase("checkpoint_seconds")


def _baseline(run, model, params, tokenizer, progress) -> dict | None:
  """Perplexity of the unquantized model when run.eval.baseline is set."""
  if not (run.eval.baseline and run.eval.sources):
    return None
  return evaluation.evaluate_sources(run.eval, model, params, tokenizer,
                                     default_seqlen=run.calibration.seqlen, progress=progress,
                                     expected=run.expected_hash("evaluation"))


def _initial_activations(run, model, state: RunState, ids) -> capture.Activations:
  """Inputs of block `state.block`: saved activations, or the embeddings run through the
  quantized blocks 0..state.block-1 again (the same jitted forwards)."""
  on_host = activation_storage(run)
  mesh = placement.run_mesh(run.mesh)
  shard = bool(run.mesh and run.mesh.shard_weights)
  if state.saved_acts is not None:
    return capture.Activations.from_array(state.saved_acts, run.forward_batch_size, on_host,
                                          mesh, registry.as_dtype(run.model.dtype),
                                          shard_weights=shard)
  embed_params = jax.device_put({k: v for k, v in state.params.items() if k != "layers"})
  acts = capture.embed_calibration(model, embed_params, ids, run.forward_batch_size, on_host,
                                   mesh, shard_weights=shard)
  sharing: dict[int, list[list[Path]]] = {}
  for i in range(state.block):
    layer = jax.device_put(model.layer_params(state.params, i))
    acts = replay_block(run, model, layer, acts, i, _input_classes(model, layer, acts, i,
                                                                   sharing))
  return acts


def activation_storage(run: RunConfig) -> capture.Storage:
  """Where and in which dtype run's activations and kept inputs live (see RunConfig);
  "disk" ones under the checkpoint folder (removed at the end of the run)."""
  return capture.Storage(where=run.activations, dtype=run.activation_dtype,
                         directory=os.path.join(checkpoint.checkpoint_dir(run.output_dir),
                                                "scratch"))


def _with_quantized(model, params: Params, qweights: dict) -> Params:
  """params with each checkpointed linear's weight replaced by its dequantized value (lazy
  params keep the packed weights: dequantized when the block is read)."""
  if weights.is_lazy(params):
    for i in range(model.num_layers):
      params = weights.with_stored(params, i, _by_path(model, i, qweights), {})
    return params
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


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """One capture of a block: the included linears of a true-sequential group (or of the whole
  block) and the linears whose inputs are captured for them.

  Attributes:
    names: included linear path -> module name.
    rep_of: included path -> its representative (the first included linear with its input).
    reps: representative path -> module name (one per distinct input).
    sharing: representative -> every linear path with its input (kept inputs serve them all).
  """

  names: dict[Path, str]
  rep_of: dict[Path, Path]
  reps: dict[Path, str]
  sharing: dict[Path, list[Path]]


def group_plans(run: RunConfig, model, layer_index: int,
                classes: list[list[Path]]) -> list[GroupPlan]:
  """The captures of block `layer_index` in order (groups without included linears skipped)."""
  groups = model.block_linears()
  if not run.quant.true_sequential:
    groups = [[path for group in groups for path in group]]
  plans = []
  for group in groups:
    names = {p: module_name(layer_index, p) for p in group}
    names = {p: n for p, n in names.items() if is_included(run.quant, n)}
    if not names:
      continue
    # Each linear's Hessian comes from the first included linear with the same input.
    rep_of = {p: next(q for q in cls if q in names) for cls in classes for p in cls if p in names}
    reps = {rep_of[p]: names[rep_of[p]] for p in names}
    sharing = {rep: list(cls) for cls in classes for rep in reps if rep in cls}
    plans.append(GroupPlan(names=names, rep_of=rep_of, reps=reps, sharing=sharing))
  return plans


def quantize_block(run: RunConfig, model, layer_params: Params, acts: capture.Activations,
                   layer_index: int, classes: list[list[Path]], nsamples: int,
                   obs: RunObserver, kept: capture.LinearInputs | None = None
                   ) -> tuple[Params, dict, list[dict]]:
  """Quantizes every included linear of one block, group by group (see the module docstring).

  kept: storage for the captured inputs (reused by later groups and the propagation), or None.
  Returns (block params with dequantized weights, {module: QuantizedWeight}, log records).
  """
  qweights, records = {}, []
  for plan in group_plans(run, model, layer_index, classes):
    obs.status(f"block {layer_index}: H of {', '.join(p[-1] for p in plan.reps)}")
    hessians = capture.group_hessians(model, layer_params, acts, layer_index, plan.reps,
                                      kept=kept, sharing=plan.sharing)
    obs.phase("capture_hessian_seconds")
    for stack in solve_stacks(run, plan):
      obs.status(f"block {layer_index}: {'+'.join(p[-1] for p in stack)}")
      layer_params, stack_qw, stack_records = quantize_linears(
          run, layer_params, {p: plan.names[p] for p in stack}, hessians[plan.rep_of[stack[0]]])
      obs.phase("solve_pack_seconds")
      qweights.update(stack_qw)
      records += [{**r, "layer": layer_index, "nsamples": nsamples} for r in stack_records]
    del hessians  # freed before the next group's capture (one group's Hessians at a time)
  return layer_params, qweights, records


def solve_stacks(run: RunConfig, plan: GroupPlan) -> list[list[Path]]:
  """The group's linears in solves: linears with one Hessian, one row-separable method and one
  config are solved as one stacked problem (`api.ROW_SEPARABLE`), the others alone; in the
  group's order of first appearance."""
  stacks: dict[Any, list[Path]] = {}
  for path, name in plan.names.items():
    method, cfg = solver_for(run.quant, name)
    key = (plan.rep_of[path], method, cfg) if method in api.ROW_SEPARABLE else path
    stacks.setdefault(key, []).append(path)
  return list(stacks.values())


def quantize_linears(run: RunConfig, layer_params: Params, names: dict[Path, str], H: jax.Array
                     ) -> tuple[Params, dict[str, qweight.QuantizedWeight], list[dict]]:
  """Solves linears that share H and their solver (rows stacked when more than one), packs each,
  writes the dequantized weights back; returns (params, {module: packed}, log records)."""
  start = time.perf_counter()
  weights = {p: get_path(layer_params, p)["weight"] for p in names}
  Ws = {p: jnp.asarray(w, jnp.float32) for p, w in weights.items()}
  method, cfg = solver_for(run.quant, next(iter(names.values())))
  W = next(iter(Ws.values())) if len(Ws) == 1 else jnp.concatenate(list(Ws.values()), axis=0)
  result = _solve(run, method, W, H, cfg, "+".join(names.values()))
  solve_share = (time.perf_counter() - start) / len(names)
  qweights, records, row = {}, [], 0
  for path, name in names.items():
    start = time.perf_counter()
    d_out = Ws[path].shape[0]
    part = result if len(names) == 1 else result.rows(row, row + d_out, Ws[path], H)
    row += d_out
    layer_params, qweights[name], record = _pack_linear(run, layer_params, path, name,
                                                        Ws[path], weights[path].dtype, H, part)
    record["seconds"] = round(solve_share + time.perf_counter() - start, 4)
    records.append(record)
  return layer_params, qweights, records


def _solve(run: RunConfig, method: str, W: jax.Array, H: jax.Array, cfg, layer: str):
  """`api.solve`, or its rows split over run.solve_devices local devices (or the mesh's
  "model" devices of this process)."""
  devices = (placement.solve_devices(placement.run_mesh(run.mesh)) if run.mesh else
             jax.local_devices()[:run.solve_devices or 1])
  if len(devices) == 1:
    return api.solve(method, W, H, cfg, layer=layer)
  from cdquant_jax.distributed import solve as dsolve  # pylint: disable=import-outside-toplevel
  return dsolve.solve_sharded(method, W, H, cfg, devices, layer=layer)


def check_solve_devices(run: RunConfig) -> None:
  """ConfigError when run.solve_devices exceeds this process's local devices."""
  available = jax.local_device_count()
  if (run.solve_devices or 1) > available:
    raise config_lib.ConfigError(f"solve_devices={run.solve_devices}: this process has "
                                 f"{available} local device(s)")


def _pack_linear(run: RunConfig, layer_params: Params, path: Path, name: str, W: jax.Array,
                 dtype, H: jax.Array, result) -> tuple[Params, qweight.QuantizedWeight, dict]:
  """Packs one linear's solution, writes its dequantized weight back; returns the log record
  (without seconds)."""
  method = result.method
  lossy = method.startswith("spqr") and run.quant.spqr_lossy_outliers
  qw = qweight.pack_result(result, allow_lossy_outliers=lossy)
  layer_params = set_path(layer_params, path + ("weight",), export.dequantized_weight(qw, dtype))
  objective, energy = (float(x) for x in jax.device_get((result.objective,
                                                          reference_energy(W, H))))
  record = dict(module=name, shape=list(W.shape), method=method, objective=objective,
                energy=energy, relative_objective=objective / energy if energy > 0 else None,
                **runlog.damping(result.diagnostics), **bits_lib.bits_report(qw),
                lossy_outliers=bool(lossy and qw.meta.nnz > 0))
  if record["lossy_outliers"]:
    record["objective_stored"] = float(layer_objective(W, qweight.dequantize(qw), H))
  return layer_params, qw, record


def block_memory(records: list[dict]) -> list[dict]:
  """[{"block": i, **memory.block_report}] of the blocks in the log (from their first record)."""
  blocks: dict[int, dict] = {}
  for r in records:
    if "block_memory" in r:
      blocks.setdefault(r["layer"], {"block": r["layer"], **r["block_memory"]})
  return [blocks[i] for i in sorted(blocks)]


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


def _export_formats(run: RunConfig, model, params: Params, qweights: dict, tokenizer,
                    hashes: dict) -> dict:
  """Writes output_dir/export/<format> for every format in run.exports; their summaries.

  Resident params are exported as they are in memory (the quantized linears' packed weights in
  place of their dequantized copies): reading the run directory back would hold a second copy
  of the model beside them. Lazy ones (weights "disk") are read back from the directory."""
  from cdquant_jax import export as export_formats  # pylint: disable=import-outside-toplevel
  if weights.is_lazy(params):
    source = run.output_dir
  else:
    source = export_formats.common.Run(
        directory=run.output_dir, model=model,
        params=export.with_quantized(model, params, qweights), tokenizer=tokenizer,
        run_config=export.run_record(run, hashes))
  return {fmt: export_formats.export_model(source, fmt,
                                           os.path.join(run.output_dir, "export", fmt))
          for fmt in run.exports}


def token_hashes(calibration_hash: str, metrics: dict) -> dict:
  """{"calibration": hash, "evaluation": {source: hash}} (`data.token_hash`) of a run's token
  windows, the evaluation ones from its perplexity results (baseline or quantized)."""
  evaluated = {**metrics.get("baseline_perplexity", {}), **metrics.get("perplexity", {})}
  return dict(calibration=calibration_hash,
              evaluation={source: r.get("token_hash") for source, r in evaluated.items()})


def _finish(run, model, params, qweights, records, tokenizer, progress, baseline,
            timer: Timer, source_dtypes: dict[str, str] | None, *, calibration_hash: str) -> dict:
  """Evaluates (if configured), writes the model directory and metrics.json.

  metrics["token_hashes"] (also in run_config.json): `token_hashes`, whatever the checkpoint
  mode. metrics["memory"]: `memory.memory_report` (the host peak of each phase of "timing",
  plus load / calibration_data under `quantize_model`) and "blocks", each block's
  `memory.block_report`.

  metrics["timing"] (seconds): quantize_seconds and the phases that add up to it: setup
  (host copy, fingerprint, checkpoint loading), embed_or_replay, transfer (block params to and
  from the device, input-sharing analysis), capture_hessian, solve_pack, tune (with the
  full-precision targets; tuned runs only), propagate, checkpoint (and log), previous_sessions
  (a resumed run's earlier processes); then the times outside it: baseline_eval_seconds
  (when configured), eval_seconds, export_seconds.
  """
  metrics = dict(summary=summarize(records), quantized_modules=sorted(qweights))
  if run.tune.enabled:
    metrics["tune"] = tune.summarize(records)
  if baseline is not None:
    metrics["baseline_perplexity"] = baseline
  timing = dict(quantize_seconds=round(timer.quantize_seconds(), 3),
                **{k: round(v, 3) for k, v in timer.totals.items()})
  default_seqlen = run.calibration.seqlen
  if run.eval.sources:
    start = time.perf_counter()
    metrics["perplexity"] = evaluation.evaluate_sources(run.eval, model, params, tokenizer,
                                                        default_seqlen=default_seqlen,
                                                        progress=progress,
                                                        expected=run.expected_hash("evaluation"))
    timing["eval_seconds"] = round(time.perf_counter() - start, 3)
    memory.release_freed()
    memory.mark("eval_seconds")
  metrics["token_hashes"] = token_hashes(calibration_hash, metrics)
  if not multihost.is_writer():  # a multi-process run's outputs are process 0's to write
    return dict(metrics, timing=timing, memory=dict(memory.memory_report(),
                                                    blocks=block_memory(records)))
  start = time.perf_counter()
  export.write_model_dir(run.output_dir, model, weights.for_export(params), qweights,
                         tokenizer=tokenizer,
                         run_config=run, extra=dict(run_config=config_lib.to_dict(run),
                                                    token_hashes=metrics["token_hashes"]),
                         source_dtypes=source_dtypes, token_hashes=metrics["token_hashes"])
  timing["export_seconds"] = round(time.perf_counter() - start, 3)
  memory.mark("export_seconds")
  metrics["timing"] = timing
  metrics["memory"] = dict(memory.memory_report(), blocks=block_memory(records))
  metrics_path = os.path.join(run.output_dir, export.METRICS_FILE)
  io_utils.atomic_write_json(metrics_path, metrics)
  if run.exports:  # after the run directory is complete, so a refused format loses nothing
    start = time.perf_counter()
    metrics["exports"] = _export_formats(run, model, params, qweights, tokenizer,
                                         metrics["token_hashes"])
    timing["export_formats_seconds"] = round(time.perf_counter() - start, 3)
    io_utils.atomic_write_json(metrics_path, metrics)
  return metrics
