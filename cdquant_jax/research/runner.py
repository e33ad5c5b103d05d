"""Running a sweep: each point once, in order or in N worker processes, rows into the store.

`run_sweep` expands the sweep, skips points that already have a "done" row in
SWEEP_DIR/results.jsonl and runs the others: a point whose run dir holds a pipeline checkpoint
(a sweep killed mid-point) resumes from it (`quantize_loaded(..., resume=True)`); a point that
raises an Exception gets a "failed" row with its error (traceback in RUN_DIR/error.txt) and the
sweep goes on. Anything else (KeyboardInterrupt, a kill) stops the sweep with no row, so the
next run picks the point up again.

Sequential points run the pipeline with calibration windows and tokenizations from the shared
cache (`research.cache`); bank points solve every layer of the bank of their model and
calibration data (`research.bank`, cached by content) and write RUN_DIR/log.jsonl and
metrics.json. With jobs > 1 (or `isolate`) every point runs in a spawned process of its own,
at most `jobs` at once, each appending its own rows under the store's file lock; a point whose
process dies (a segfault or an out-of-memory kill, which would take an in-process sweep down
with it) gets a failed row naming the signal and the sweep goes on. The banks of bank points
are built by the parent before the points are handed out. With `devices` (accelerator ids,
e.g. the GPUs "0,1,2,3"), each running point owns one of them (`DEVICE_ENV` is set before its
first JAX computation), so points run one per device.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jaxlib
import numpy

import cdquant_jax
from cdquant_jax import config as config_lib
from cdquant_jax import compilation, data, io_utils
from cdquant_jax.models import registry
from cdquant_jax.models.aliases import resolve_model_path
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.pipeline import checkpoint, evaluation, memory, runlog, sequential
from cdquant_jax.pipeline import config as run_lib
from cdquant_jax.pipeline import weights as block_weights
from cdquant_jax.research import bank, cache, store
from cdquant_jax.research import sweep as sweep_lib
from cdquant_jax.solvers import api
from cdquant_jax.solvers import knobs as knobs_lib

ERROR_FILE = "error.txt"
FAILED_EXIT = 3  # exit code of a point process whose point failed (its row is written)
SWEEP_FILE = "sweep.json"
# The variable that limits a worker to its device (NVIDIA GPUs; read at backend start).
DEVICE_ENV = "CUDA_VISIBLE_DEVICES"
_WORKER_DEVICE: str | None = None  # this worker's device id, set by `_pin_device`


@dataclasses.dataclass(frozen=True)
class Job:
  """What a worker needs to run one point (plain data, so it pickles into spawned workers)."""

  point: str
  name: str
  sweep: str
  mode: str
  run: dict
  axes: dict
  variant: str | None
  blocks: tuple[int, ...] | None
  bank_dir: str | None
  cache_dir: str
  results: str
  provenance: dict


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
  """Point names by what happened to them in this call."""

  directory: str
  skipped: tuple[str, ...]
  done: tuple[str, ...]
  failed: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Provenance.


def git_state() -> dict[str, Any]:
  """{git_commit, git_dirty} of the checkout holding the package (None outside git)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=30, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return dict(git_commit=None, git_dirty=None)
  return dict(git_commit=commit or None, git_dirty=bool(status.strip()))


def versions() -> dict[str, str]:
  return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              numpy=numpy.__version__, cdquant_jax=cdquant_jax.__version__)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def one_line_error(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Row fields.


def effective_settings(quant: run_lib.QuantSettings) -> dict[str, Any]:
  """{method, bits, group_size, act_order} of the default method after quant.knobs."""
  cfg = knobs_lib.apply(api.config_from_dict(quant.method, quant.solvers.get(quant.method)),
                        quant.knobs.as_dict())
  out: dict[str, Any] = dict(method=quant.method)
  for knob in ("bits", "group_size", "act_order"):
    fields = knobs_lib.BY_NAME[knob].fields_in(cfg)
    out[knob] = config_lib.get_path(cfg, fields[0]) if fields else None
  return out


_SUMMARY_KEYS = ("modules", "params_quantized", "bits_formula", "bits_stored", "objective_sum",
                 "relative_objective_sum", "mean_relative_objective", "outlier_share")


def _summary_fields(summary: dict) -> dict[str, Any]:
  return {k: summary.get(k) for k in _SUMMARY_KEYS}


def _ppl(results: dict | None) -> dict | None:
  return None if results is None else {s: r["ppl"] for s, r in results.items()}


def sequential_fields(metrics: dict) -> dict[str, Any]:
  """Row fields of a finished pipeline run's metrics.json."""
  timing = metrics.get("timing", {})
  memory = metrics.get("memory", {})
  return dict(
      **_summary_fields(metrics["summary"]), perplexity=_ppl(metrics.get("perplexity")),
      baseline_perplexity=_ppl(metrics.get("baseline_perplexity")),
      eval_token_hashes={s: r.get("token_hash") for s, r in metrics.get("perplexity", {}).items()},
      quantize_seconds=timing.get("quantize_seconds"), timing=timing,
      peak_rss_mib=memory.get("peak_host_mib"), peak_device_mib=memory.get("peak_device_mib"))


# ----------------------------------------------------------------------------------------------
# Running one point (in this process or a worker).


_LOADED: dict[tuple, tuple] = {}  # (path, dtype) -> (model, params, tokenizer, source dtypes)


def load_model_once(model_source: run_lib.ModelSource, weights: str = "host") -> tuple:
  """The point's model, loaded once per process (only the latest model is kept); with
  weights "disk" only its outer params (`pipeline.weights.load_model`)."""
  key = (model_source.path, model_source.dtype, weights)
  if key not in _LOADED:
    _LOADED.clear()
    dtypes: dict[str, str] = {}
    load = block_weights.load_model if weights == "disk" else registry.load_model
    model, params, tokenizer = load(resolve_model_path(model_source.path), model_source.dtype,
                                    source_dtypes=dtypes)
    if tokenizer is None:
      raise ModelLoadError(f"model {model_source.path}: no tokenizer, cannot build "
                           "calibration data")
    _LOADED[key] = (model, params, tokenizer, dtypes)
  return _LOADED[key]


def _calibration(job: Job, run: run_lib.RunConfig):
  """(model, params, caching tokenizer, source dtypes, calibration ids) of the point."""
  model, params, tokenizer, dtypes = load_model_once(run.model, run.weights)
  tok = cache.CachingTokenizer(tokenizer, job.cache_dir)
  ids = cache.calibration_ids(job.cache_dir, run.calibration, tok)
  return model, params, tok, dtypes, ids


_MODEL_HASHES: dict[tuple, str] = {}  # (path, dtype) -> checkpoint.model_hash of the loaded model


def _baseline(job: Job, run: run_lib.RunConfig, model, params, tok) -> dict | None:
  """The unquantized model's perplexities, evaluated once per model and eval settings
  (CACHE_DIR/baselines/), or None when the point asks for no baseline."""
  if not (run.eval.baseline and run.eval.sources) or tok.tok_hash is None:
    return None
  source = (run.model.path, run.model.dtype)
  if source not in _MODEL_HASHES:
    _MODEL_HASHES.clear()
    _MODEL_HASHES[source] = block_weights.model_hash(model, params)
  key = cache.baseline_key(_MODEL_HASHES[source], config_lib.to_dict(run.eval),
                           run.calibration.seqlen, tok.tok_hash)
  return cache.cached_json(job.cache_dir, "baselines", key, lambda: evaluation.evaluate_sources(
      run.eval, model, params, tok, default_seqlen=run.calibration.seqlen))


def _run_sequential(job: Job, run: run_lib.RunConfig, after_block, progress: bool) -> dict:
  model, params, tok, dtypes, ids = _calibration(job, run)
  resume = run.checkpoint != "none" and checkpoint.load_state(run.output_dir) is not None
  result = sequential.quantize_loaded(run, model, params, ids, tokenizer=tok, resume=resume,
                                      progress=progress, after_block=after_block,
                                      source_dtypes=dtypes,
                                      baseline=_baseline(job, run, model, params, tok))
  return dict(**sequential_fields(result.metrics), calibration_token_hash=data.token_hash(ids),
              resumed=resume)


_BANKS: dict[str, str] = {}  # canonical JSON of (model, calibration, blocks, batching) -> dir


def _point_bank(job: Job, run: run_lib.RunConfig) -> str:
  """The bank directory of the point: the sweep's bank_dir, else the cached bank."""
  if job.bank_dir is not None:
    return job.bank_dir
  key = sweep_lib.canonical_json([config_lib.to_dict(run.model), config_lib.to_dict(
      run.calibration), job.blocks, run.forward_batch_size, job.cache_dir])
  if key not in _BANKS:
    model, params, _, _, ids = _calibration(job, run)
    _BANKS[key] = bank.ensure_bank(job.cache_dir, run, model, params, ids, blocks=job.blocks)
  return _BANKS[key]


def _run_bank(job: Job, run: run_lib.RunConfig) -> dict:
  bank_dir = _point_bank(job, run)
  records = bank.solve_bank(bank_dir, run.quant)
  summary = sequential.summarize(records)
  seconds = round(sum(r["seconds"] for r in records), 4)
  os.makedirs(run.output_dir, exist_ok=True)
  runlog.write_log(run.output_dir, records)
  mem = memory.memory_report()
  token_hash = bank.read_bank(bank_dir)["calibration"]["token_hash"]
  io_utils.atomic_write_json(os.path.join(run.output_dir, "metrics.json"), dict(
      summary=summary, bank=bank_dir, memory=mem, timing=dict(quantize_seconds=seconds),
      run_config=config_lib.to_dict(run)))
  return dict(**_summary_fields(summary), layers=records, bank=bank_dir, quantize_seconds=seconds,
              calibration_token_hash=token_hash, peak_rss_mib=mem["peak_host_mib"],
              peak_device_mib=mem["peak_device_mib"])


def _base_fields(job: Job, run: run_lib.RunConfig) -> dict:
  return dict(point=job.point, name=job.name, sweep=job.sweep, mode=job.mode,
              variant=job.variant, axes=job.axes, config=job.run, seed=run.calibration.seed,
              run_dir=run.output_dir, device=_WORKER_DEVICE, **job.provenance,
              **effective_settings(run.quant))


def run_point(job: Job, *, after_block: Callable[[int], None] | None = None,
              progress: bool = False) -> dict:
  """Runs one point and appends its row (done or failed) to the store; returns the row."""
  run = run_lib.run_config_from_dict(job.run)
  row = dict(_base_fields(job, run), started_at=_now())
  start = time.perf_counter()
  try:
    if job.mode == "bank":
      row.update(_run_bank(job, run))
    else:
      row.update(_run_sequential(job, run, after_block, progress))
    row["status"] = "done"
  except Exception as e:  # pylint: disable=broad-except  # recorded; the sweep goes on
    row.update(status="failed", error=one_line_error(e))
    os.makedirs(run.output_dir, exist_ok=True)
    io_utils.atomic_write_text(os.path.join(run.output_dir, ERROR_FILE), traceback.format_exc())
  row.update(finished_at=_now(), seconds=round(time.perf_counter() - start, 3))
  row = store.complete_row(row)
  store.append_row(job.results, row)
  return row


def _point_process(job: Job, device: str | None) -> None:
  """Entry point of a point's spawned process: pins `device` (before the first JAX
  computation), runs the point and exits 0 when it is done, `FAILED_EXIT` when it failed."""
  global _WORKER_DEVICE  # pylint: disable=global-statement  # one value per process
  if device is not None:
    _WORKER_DEVICE = device
    os.environ[DEVICE_ENV] = device
  status = run_point(job)["status"]
  sys.exit(0 if status == "done" else FAILED_EXIT)


def died_row(job: Job, exitcode: int, device: str | None) -> dict:
  """The failed row of a point whose process died without writing one (a segfault, an
  out-of-memory kill: exitcode < 0 is the signal number, negated)."""
  run = run_lib.run_config_from_dict(job.run)
  cause = (f"signal {signal.Signals(-exitcode).name}" if exitcode < 0
           else f"exit code {exitcode}")
  row = dict(_base_fields(job, run), device=device, status="failed", started_at=None,
             finished_at=_now(), error=f"WorkerDied: the point's process died ({cause})")
  return store.complete_row(row)


# ----------------------------------------------------------------------------------------------
# The sweep.


def plan(sweep: sweep_lib.SweepConfig, out: str | None = None
         ) -> tuple[str, list[sweep_lib.Point], set[str]]:
  """(SWEEP_DIR as an absolute path, points, hashes of the points already done); the rows'
  run_dir are absolute too, so reports find them from any working directory."""
  directory = os.path.abspath(sweep_lib.sweep_dir(sweep, out))
  points = sweep_lib.expand(sweep, directory)
  if sweep.mode == "bank" and sweep.bank_dir is not None:
    check_bank_matches(sweep.bank_dir, points)
  return directory, points, store.done_points(store.results_file(directory))


def check_bank_matches(bank_dir: str, points: list[sweep_lib.Point]) -> None:
  """ConfigError when a point's model or calibration settings differ from the bank's."""
  info = bank.read_bank(bank_dir)
  for p in points:
    calibration = config_lib.to_dict(p.run.calibration)
    recorded = {k: v for k, v in info.get("calibration", {}).items() if k != "token_hash"}
    model = dict(path=p.run.model.path, dtype=p.run.model.dtype)
    if recorded != calibration or {k: info["model"].get(k) for k in model} != model:
      raise config_lib.ConfigError(
          f"point {p.name}: model/calibration {model} {calibration} differ from bank "
          f"{bank_dir} ({info['model']} {recorded}); drop bank_dir to build banks per point")


def _jobs(sweep: sweep_lib.SweepConfig, directory: str, cache: str | None,
          points: list[sweep_lib.Point]) -> list[Job]:
  provenance = dict(**git_state(), versions=versions())
  cache_dir = sweep_lib.cache_dir(sweep, directory, cache)
  return [Job(point=p.hash, name=p.name, sweep=sweep.name or "sweep", mode=sweep.mode,
              run=config_lib.to_dict(p.run), axes=p.axes, variant=p.variant, blocks=sweep.blocks,
              bank_dir=sweep.bank_dir, cache_dir=cache_dir, results=store.results_file(directory),
              provenance=provenance) for p in points]


def _write_sweep_file(sweep: sweep_lib.SweepConfig, directory: str,
                      points: list[sweep_lib.Point]) -> None:
  io_utils.atomic_write_json(os.path.join(directory, SWEEP_FILE), dict(
      sweep=config_lib.to_dict(sweep), points=[dict(name=p.name, point=p.hash, axes=p.axes,
                                                    variant=p.variant, run_dir=p.run_dir)
                                               for p in points]))


def run_sweep(sweep: sweep_lib.SweepConfig, *, out: str | None = None, cache: str | None = None,
              jobs: int = 1, progress: bool = False,
              report: Callable[[str], None] = lambda line: None,
              after_block: Callable[[str, int], None] | None = None,
              devices: tuple[str, ...] | None = None, isolate: bool = False,
              only: tuple[str, ...] | None = None) -> SweepOutcome:
  """Runs the points of `sweep` that have no "done" row yet (see the module docstring).

  after_block(point name, block): called after each checkpointed block of a sequential point
  (jobs=1 only; tests interrupt sweeps with it).
  devices: accelerator ids, one per running point (jobs must equal their number); None shares
  the devices this process sees.
  isolate: each point in its own process even with jobs=1 (always so with jobs > 1 or devices).
  only: shell-style patterns of point names (e.g. "spqr_cd-*"): only the matching points run;
    ConfigError when a pattern matches no point (a typo would silently run nothing).
  """
  if jobs < 1:
    raise config_lib.ConfigError(f"jobs must be >= 1, got {jobs}")
  if devices is not None and (len(devices) != jobs or len(set(devices)) != jobs):
    raise config_lib.ConfigError(f"devices {list(devices)}: one distinct device per job needed "
                                 f"(jobs={jobs})")
  directory, points, done = plan(sweep, out)
  os.makedirs(directory, exist_ok=True)
  _write_sweep_file(sweep, directory, points)
  todo = [p for p in selected(points, only) if p.hash not in done]
  skipped = tuple(p.name for p in points if p.hash in done)
  report(f"sweep {sweep.name}: {len(points)} points, {len(skipped)} done, {len(todo)} to run "
         f"in {directory}")
  results: dict[str, str] = {}
  all_jobs = _jobs(sweep, directory, cache, todo)
  if devices is None and not isolate and (jobs == 1 or len(all_jobs) <= 1):
    for k, job in enumerate(all_jobs, 1):
      hook = None if after_block is None else (lambda i, name=job.name: after_block(name, i))
      results[job.name] = run_point(job, after_block=hook, progress=progress)["status"]
      report(f"[{k}/{len(all_jobs)}] {job.name}: {results[job.name]}")
      compilation.release_programs_near_map_limit()  # points compile distinct programs
  else:
    results = _run_isolated([_with_bank(job) for job in all_jobs], jobs, report, devices)
  return SweepOutcome(directory, skipped, tuple(n for n, s in results.items() if s == "done"),
                      tuple(n for n, s in results.items() if s != "done"))


def selected(points: list[sweep_lib.Point], only: tuple[str, ...] | None
             ) -> list[sweep_lib.Point]:
  """The points whose name matches one of the `only` patterns (fnmatch), all when None."""
  if only is None:
    return points
  for pattern in only:
    if not any(fnmatch.fnmatchcase(p.name, pattern) for p in points):
      raise config_lib.ConfigError(f"--only {pattern!r} matches no point of the sweep (points: "
                                   f"{', '.join(p.name for p in points[:4])}, ...)")
  return [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in only)]


def _with_bank(job: Job) -> Job:
  """A bank point with its bank built here first (once per model and data, not per worker);
  unchanged when building fails (its worker then records the error)."""
  if job.mode != "bank" or job.bank_dir is not None:
    return job
  try:
    run = run_lib.run_config_from_dict(job.run)
    return dataclasses.replace(job, bank_dir=_point_bank(job, run))
  except Exception:  # pylint: disable=broad-except  # recorded by the worker
    return job


def _run_isolated(all_jobs: list[Job], jobs: int, report,
                  devices: tuple[str, ...] | None = None,
                  target: Callable[[Job, str | None], None] = _point_process
                  ) -> dict[str, str]:
  """Runs each job in a spawned process of its own, at most `jobs` at once (each on one of
  `devices` when given; a device is handed to the next point when its process ends), so a
  point whose process dies (segfault, out-of-memory kill) gets a failed row naming the signal
  and the others go on, and no process accumulates the compiled programs of many points;
  {point name: status}. `target(job, device)` runs in the child (tests swap it)."""
  context = multiprocessing.get_context("spawn")
  free: list[str | None] = list(devices) if devices is not None else [None] * jobs
  pending, running, results = list(all_jobs), {}, {}
  try:
    while pending or running:
      while pending and free:
        job, device = pending.pop(0), free.pop(0)
        process = context.Process(target=target, args=(job, device), name=job.name)
        process.start()
        running[process.sentinel] = (process, job, device)
      for sentinel in multiprocessing.connection.wait(list(running)):
        process, job, device = running.pop(sentinel)
        process.join()
        results[job.name] = _exit_status(job, process.exitcode, device)
        free.append(device)
        report(f"[{len(results)}/{len(all_jobs)}] {job.name}: {results[job.name]}")
  except BaseException:
    for process, _, _ in running.values():
      process.terminate()
    raise
  return results


def _exit_status(job: Job, exitcode: int, device: str | None) -> str:
  """"done" or "failed" from a point process's exit code; a died process gets its row here."""
  if exitcode == 0:
    return "done"
  if exitcode != FAILED_EXIT:
    store.append_row(job.results, died_row(job, exitcode, device))
  return "failed"
