"""The results store of a sweep: SWEEP_DIR/results.jsonl, one JSON row per finished or failed point.

Writing is append-only and crash-safe: `append_row` takes an exclusive `fcntl.flock` on
SWEEP_DIR/results.jsonl.lock (so parallel workers never interleave), drops a torn tail left by a
writer that died mid-line, then writes the whole line with one write, flush and fsync.
`read_rows` skips an unparsable LAST line (a crash mid-append) and rejects any other bad line.
A point run again after a failure appends another row: the last row of a point wins.

Row schema (flat; every key is present, null where it does not apply):
  point            sha256 of the point's resolved config (`sweep.point_hash`), the point's id
  name             readable point name ("gptq_act_order-bits=3-seed=1"); run_dir ends with
                   "<name>-<point[:8]>"
  sweep            the sweep's name; mode: "sequential" | "bank"
  status           "done" | "failed";  error: one line "<ExceptionType>: <message>" (failed)
  variant          the variant's name (None without variants)
  axes             {dotted config path: value} of the point's axis, zip and seed values
  config           the resolved RunConfig as plain data (`config.to_dict`)
  method, bits, group_size, act_order   the default method and its effective settings
                   (quant.knobs over quant.solvers[method]; rules may change some modules)
  seed             calibration.seed
  run_dir          the point's run directory (metrics.json, log.jsonl; error.txt if failed)
  git_commit       `git rev-parse HEAD` of the package checkout (None outside git);
                   git_dirty: uncommitted changes in it (None outside git)
  versions         {python, jax, jaxlib, numpy, cdquant_jax}
  started_at, finished_at   UTC ISO-8601; seconds: the point's wall time (loading included)
  calibration_token_hash    `data.token_hash` of the calibration windows [N, T]
  eval_token_hashes         {source: token hash of its evaluation ids}
  perplexity, baseline_perplexity   {source: perplexity} (sequential mode with eval.sources;
                   baseline only with eval.baseline)
  modules, params_quantized   linears solved and their weights
  bits_formula, bits_stored   parameter-weighted bits per weight (formula / as packed)
  objective_sum    Σ tr((W − Q) H (W − Q)ᵀ) over the modules
  relative_objective_sum    objective_sum / Σ tr(W H Wᵀ)
  mean_relative_objective   mean over modules of objective / energy
  outlier_share    parameter-weighted share of outlier weights (SpQR)
  quantize_seconds sequential: the pipeline's quantization time (metrics.json timing); bank:
                   the sum of the layers' solve + pack seconds (JIT compilation included)
  timing           {phase: seconds} (sequential: metrics.json "timing")
  peak_rss_mib     peak resident memory of the worker process so far (MiB);
                   peak_device_mib: accelerator peak (None on CPU)
  resumed          the point continued from its pipeline checkpoint
  bank             bank mode: the bank directory
  layers           bank mode: [{module, kind ("q_proj", ...), block, shape, method, objective,
                   energy, relative_objective, seconds, steps (accepted descent moves, None for
                   RTN/GPTQ), bits_formula, bits_stored, outlier_share}], in bank order
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Iterator

from cdquant_jax import config as config_lib

RESULTS_FILE = "results.jsonl"
LOCK_SUFFIX = ".lock"

ROW_FIELDS = (
    "point", "name", "sweep", "mode", "status", "error", "variant", "axes", "config", "method",
    "bits", "group_size", "act_order", "seed", "run_dir", "git_commit", "git_dirty", "versions",
    "started_at", "finished_at", "seconds", "calibration_token_hash", "eval_token_hashes",
    "perplexity", "baseline_perplexity", "modules", "params_quantized", "bits_formula",
    "bits_stored", "objective_sum", "relative_objective_sum", "mean_relative_objective",
    "outlier_share", "quantize_seconds", "timing", "peak_rss_mib", "peak_device_mib", "resumed",
    "bank", "layers", "device")


class StoreError(config_lib.ConfigError):
  """A results file with a bad line that is not the last one."""


def results_file(sweep_dir: str) -> str:
  return os.path.join(sweep_dir, RESULTS_FILE)


def complete_row(fields: dict) -> dict:
  """`fields` with every ROW_FIELDS key present (None where missing); unknown keys are a bug."""
  unknown = sorted(set(fields) - set(ROW_FIELDS))
  if unknown:
    raise KeyError(f"row fields {unknown} are not in store.ROW_FIELDS")
  return {key: fields.get(key) for key in ROW_FIELDS}


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive flock on `path` + LOCK_SUFFIX for the duration of the block."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + LOCK_SUFFIX, "a") as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _drop_torn_tail(fd: int) -> None:
  """Truncates the file after its last newline (a line torn by a writer that died)."""
  size = os.lseek(fd, 0, os.SEEK_END)
  if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
    return
  end = size
  while end > 0:
    start = max(0, end - 65536)
    chunk = os.pread(fd, end - start, start)
    newline = chunk.rfind(b"\n")
    if newline >= 0:
      os.ftruncate(fd, start + newline + 1)
      return
    end = start
  os.ftruncate(fd, 0)


def append_row(path: str, row: dict) -> None:
  """Appends `row` as one JSON line, atomically with respect to crashes and other writers."""
  line = (json.dumps(row, sort_keys=True) + "\n").encode()
  with _locked(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
      _drop_torn_tail(fd)
      written = os.write(fd, line)
      if written != len(line):  # a short write (disk full): drop it, then say so
        _drop_torn_tail(fd)
        raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
      os.fsync(fd)
    finally:
      os.close(fd)


def read_rows(path: str) -> list[dict]:
  """The rows of a results file in file order ([] when it does not exist).

  Raises:
    StoreError: a line other than the last is not a JSON object.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = [line for line in f.read().split(b"\n") if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      if number == len(lines):
        break  # torn by a crash mid-append
      raise StoreError(f"{path}:{number}: not a JSON line ({e})") from e
    if not isinstance(row, dict):
      raise StoreError(f"{path}:{number}: a row must be a JSON object")
    rows.append(row)
  return rows


def latest_rows(rows: list[dict]) -> dict[str, dict]:
  """{point hash: its last row}."""
  return {row["point"]: row for row in rows if "point" in row}


def done_points(path: str) -> set[str]:
  """Hashes of the points that have a "done" row."""
  return {row["point"] for row in read_rows(path) if row.get("status") == "done"}
