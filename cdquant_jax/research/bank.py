"""Layer-problem banks: every linear's (W, H) on the full-precision model's activations.

The layer-wise comparison of the CDQuant and QuantEase papers: each block runs on the outputs
of the unquantized blocks before it (no sequential propagation), each linear's input Hessian
is accumulated with the pipeline's capture code (`capture.group_hessians`, f32 running mean,
the same `forward_batch_size` batches), and solvers are then compared on identical problems.

BANK_DIR/
  layers/<module>.npz  W [d_out, d_in] f32 (the weight as the pipeline solves it),
                       H [d_in, d_in] f32 (undamped), name (str), shape [2] int64; the
                       `cdquant layer --input` format
  bank.json            {"format", "model": {path, dtype, hash}, "calibration": {the run's
                       calibration fields, token_hash}, "forward_batch_size", "blocks",
                       "modules": [{module, kind ("q_proj", ...), block, shape, file}]};
                       written last, so a bank with bank.json is complete
Linears sharing an input (q/k/v) share one Hessian, stored in each of their files.
`solve_bank` runs a run config's solver settings (`pipeline.rules.solver_for`: method, knobs,
solvers, rules; include/exclude) on every layer and returns one record per layer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax import data, io_utils
from cdquant_jax._numerics import reference_energy
from cdquant_jax.models.params import get_path
from cdquant_jax.pipeline import capture, checkpoint
from cdquant_jax.pipeline.config import QuantSettings, RunConfig
from cdquant_jax.pipeline.rules import is_included, module_name, solver_for
from cdquant_jax.quant import bits as bits_lib
from cdquant_jax.quant import qweight
from cdquant_jax.research import cache
from cdquant_jax.solvers import api

BANK_FILE = "bank.json"
LAYERS_DIR = "layers"
FORMAT = "cdquant_jax.layer_bank/1"


class BankError(config_lib.ConfigError):
  """A bank directory that is missing, incomplete, of another format or of other data."""


def select_blocks(blocks, num_layers: int) -> list[int]:
  """Sorted distinct block indices (all blocks for None); ConfigError for one out of range."""
  if blocks is None:
    return list(range(num_layers))
  chosen = sorted(set(int(b) for b in blocks))
  bad = [b for b in chosen if not 0 <= b < num_layers]
  if bad or not chosen:
    raise config_lib.ConfigError(f"blocks {list(blocks)}: the model has blocks "
                                 f"0..{num_layers - 1}")
  return chosen


# ----------------------------------------------------------------------------------------------
# Writing.


def _block_problems(model, layer_params, acts: capture.Activations, i: int):
  """[(path, W [d_out, d_in] f32, H [d_in, d_in] f32)] of block i's linears on `acts`."""
  first = next(iter(acts))
  classes = capture.shared_input_classes(model, layer_params, first.shape, first.dtype,
                                         capture.kind_index(model, i))
  reps = {cls[0]: module_name(i, cls[0]) for cls in classes}
  hessians = capture.group_hessians(model, layer_params, acts, i, reps)
  rep_of = {p: cls[0] for cls in classes for p in cls}
  order = [p for group in model.block_linears() for p in group if p in rep_of]
  return [(p, np.asarray(get_path(layer_params, p)["weight"], np.float32),
           np.asarray(hessians[rep_of[p]], np.float32)) for p in order]


def _write_layer(out_dir: str, name: str, W: np.ndarray, H: np.ndarray) -> str:
  file = os.path.join(LAYERS_DIR, name + ".npz")
  io_utils.atomic_write_npz(os.path.join(out_dir, file), dict(
      W=W, H=H, name=np.asarray(name), shape=np.asarray(W.shape, np.int64)))
  return file


def write_bank(out_dir: str, model, params, calibration_ids: np.ndarray, *, blocks=None,
               forward_batch_size: int = 8, on_host: bool = False, meta: dict | None = None
               ) -> dict:
  """Writes the layer problems of `blocks` (None: all) to out_dir; returns bank.json's content.

  calibration_ids: [N, T] int32 windows. meta: extra bank.json fields (model, calibration).
  Blocks run in order from the embeddings up to the last selected one, on unquantized weights.
  """
  chosen = select_blocks(blocks, model.num_layers)
  params = jax.device_get(params)
  ids = np.asarray(calibration_ids, np.int32)
  embed = jax.device_put({k: v for k, v in params.items() if k != "layers"})
  acts = capture.embed_calibration(model, embed, ids, forward_batch_size, on_host)
  modules = []
  for i in range(chosen[-1] + 1):
    layer_params = jax.device_put(model.layer_params(params, i))
    if i in chosen:
      for path, W, H in _block_problems(model, layer_params, acts, i):
        name = module_name(i, path)
        modules.append(dict(module=name, kind=path[-1], block=i, shape=list(W.shape),
                            file=_write_layer(out_dir, name, W, H)))
    if i < chosen[-1]:
      acts = capture.block_outputs(model, layer_params, acts, i)
  meta = dict(meta or {})
  meta["calibration"] = {**meta.get("calibration", {}), "token_hash": data.token_hash(ids)}
  bank = dict(format=FORMAT, **meta, forward_batch_size=forward_batch_size, blocks=chosen,
              modules=modules)
  io_utils.atomic_write_json(os.path.join(out_dir, BANK_FILE), bank)
  return bank


def bank_meta(run: RunConfig, model_hash: str) -> dict:
  """bank.json's model and calibration fields for a bank of `run`'s model and data."""
  return dict(model=dict(path=run.model.path, dtype=run.model.dtype, hash=model_hash),
              calibration=config_lib.to_dict(run.calibration))


def build_bank(run: RunConfig, out_dir: str, model, params, calibration_ids, *, blocks=None,
               model_hash: str | None = None) -> dict:
  """`write_bank` with `run`'s batching, activation placement and bank.json metadata."""
  model_hash = model_hash or checkpoint.model_hash(model, params)
  return write_bank(out_dir, model, params, calibration_ids, blocks=blocks,
                    forward_batch_size=run.forward_batch_size, on_host=run.activations == "host",
                    meta=bank_meta(run, model_hash))


def bank_key(run: RunConfig, model_hash: str, token_hash: str, blocks: list[int]) -> str:
  """Content address of a bank: model parameters, calibration tokens, blocks, batching."""
  return cache.key_of(dict(kind="bank", format=FORMAT, model=model_hash, dtype=run.model.dtype,
                           tokens=token_hash, blocks=list(blocks),
                           forward_batch_size=run.forward_batch_size))


def ensure_bank(cache_dir: str, run: RunConfig, model, params, calibration_ids, *,
                blocks=None) -> str:
  """CACHE_DIR/banks/<bank_key>, written first when absent (into a temporary directory that is
  renamed into place, so a bank directory is always complete)."""
  chosen = select_blocks(blocks, model.num_layers)
  model_hash = checkpoint.model_hash(model, params)
  key = bank_key(run, model_hash, data.token_hash(calibration_ids), chosen)
  target = os.path.join(cache_dir, "banks", key)
  if os.path.exists(os.path.join(target, BANK_FILE)):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{key[:12]}.")
  try:
    build_bank(run, tmp, model, params, calibration_ids, blocks=chosen, model_hash=model_hash)
    os.rename(tmp, target)
  except OSError:
    if not os.path.exists(os.path.join(target, BANK_FILE)):  # not another worker's bank
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


# ----------------------------------------------------------------------------------------------
# Reading and solving.


def read_bank(bank_dir: str) -> dict:
  """bank.json of `bank_dir`; BankError when it is missing or of another format."""
  path = os.path.join(bank_dir, BANK_FILE)
  if not os.path.exists(path):
    raise BankError(f"{bank_dir}: not a bank (no {BANK_FILE}; write one with `cdquant bank`)")
  bank = _read_json(path)
  if bank.get("format") != FORMAT:
    raise BankError(f"{path}: format {bank.get('format')!r}, expected {FORMAT!r}")
  return bank


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise BankError(f"{path}: not JSON ({e})") from e


def load_layer(bank_dir: str, entry: dict) -> tuple[np.ndarray, np.ndarray]:
  """(W [d_out, d_in], H [d_in, d_in]) of one bank.json module entry."""
  with np.load(os.path.join(bank_dir, entry["file"]), allow_pickle=False) as f:
    W, H = f["W"], f["H"]
  if list(W.shape) != entry["shape"] or H.shape != (W.shape[1], W.shape[1]):
    raise BankError(f"{bank_dir}/{entry['file']}: W {W.shape} / H {H.shape} do not match "
                    f"bank.json's shape {entry['shape']}")
  return W, H


def _steps(result) -> int | None:
  steps = result.diagnostics.steps
  return None if steps is None else int(np.sum(np.asarray(steps)))


def solve_layer(quant: QuantSettings, entry: dict, W: np.ndarray, H: np.ndarray) -> dict:
  """Solves one bank layer with the run's settings for its module; returns its record."""
  name = entry["module"]
  method, cfg = solver_for(quant, name)
  start = time.perf_counter()
  result = api.solve(method, jnp.asarray(W), jnp.asarray(H), cfg, layer=name)
  lossy = method.startswith("spqr") and quant.spqr_lossy_outliers
  qw = qweight.pack_result(result, allow_lossy_outliers=lossy)
  objective = float(result.objective)
  seconds = time.perf_counter() - start
  energy = float(reference_energy(jnp.asarray(W), jnp.asarray(H)))
  return dict(module=name, kind=entry["kind"], block=entry["block"], shape=list(W.shape),
              method=method, objective=objective, energy=energy,
              relative_objective=objective / energy if energy > 0 else None,
              seconds=round(seconds, 4), steps=_steps(result), **bits_lib.bits_report(qw))


def solve_bank(bank_dir: str, quant: QuantSettings) -> list[dict]:
  """One record per included layer of the bank, in bank order (see `solve_layer`)."""
  bank = read_bank(bank_dir)
  records = []
  for entry in bank["modules"]:
    if is_included(quant, entry["module"]):
      W, H = load_layer(bank_dir, entry)
      records.append(solve_layer(quant, entry, W, H))
  return records
