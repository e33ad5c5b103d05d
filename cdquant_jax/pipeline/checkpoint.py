"""Resumable runs: a fingerprint of (model, calibration data, config) and per-block checkpoints.

Checkpoint directory `<output_dir>/checkpoint/`:
  block_0003.safetensors   the QuantizedWeights of block 3 (`quant.serialize` format)
  block_0003_params.npz    block 3's tuned unquantized params (dotted path -> array; runs with
                           tune.params norms only)
  activations_0003/        outputs of block 3 = inputs of the next block (checkpoint
                           "activations" only; older ones are removed after state.json): an
                           orbax checkpoint of the stored batches as they are (sharded over a
                           mesh: each process writes its shards) and their real row counts
  state.json               {"fingerprint", "blocks_done", "records", "seconds",
                           "activation_batches"}; written last, so a crash between files
                           leaves the previous consistent state
Only process 0 of a multi-process run writes or removes files, except the activations, which
every process saves (orbax: its shards, committed atomically once all are written); every
process reads them when resuming (a filesystem all hosts see). Resuming rebuilds the quantized
params from the block files (dequantized exactly as the run wrote them back) and the next
block's inputs from the saved activations (read as host arrays and split again over the
resumed run's mesh, whatever its shape) or by replaying the quantized blocks with the same
jitted forwards, so a resumed run on the same devices is bit-identical to an uninterrupted one
(on another mesh shape: up to the f32 summation order of the Hessians).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cdquant_jax import config as config_lib
from cdquant_jax import io_utils
from cdquant_jax.data import token_hash
from cdquant_jax.distributed import multihost
from cdquant_jax.quant import serialize

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
# RunConfig fields that do not change the quantized result (not fingerprinted).
_UNFINGERPRINTED = ("output_dir", "eval", "activations", "checkpoint", "token_hashes",
                    "solve_devices", "mesh")


class ResumeError(RuntimeError):
  """The checkpoint belongs to a different model, calibration set or configuration."""


def model_hash(model, params) -> str:
  """sha256 over the model config and every parameter (name, dtype, shape, bytes)."""
  digest = hashlib.sha256(json.dumps(config_lib.to_dict(model.config), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
    digest.update(a.view(np.uint8).reshape(-1).data)
  return digest.hexdigest()


def quant_config_dict(run_config) -> dict:
  """The fingerprinted part of a RunConfig as plain data."""
  data = config_lib.to_dict(run_config)
  return {k: v for k, v in data.items() if k not in _UNFINGERPRINTED}


def fingerprint(run_config, model, params, calibration_ids) -> dict[str, Any]:
  return dict(model=model_hash(model, params), data=token_hash(calibration_ids),
              config=quant_config_dict(run_config))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Dotted paths where two plain-data trees differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new), key=str):
      out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
  """Raises ResumeError naming every component (and config field) that changed."""
  problems = []
  if saved["model"] != current["model"]:
    problems.append("the model parameters/config changed")
  if saved["data"] != current["data"]:
    problems.append("the calibration data changed (token hash "
                    f"{saved['data'][:12]} -> {current['data'][:12]})")
  changes = _diff(saved["config"], current["config"])
  if changes:
    problems.append("the config changed: " + "; ".join(changes))
  if problems:
    raise ResumeError(f"cannot resume from {where}: " + ", and ".join(problems) +
                      ". Use a new output_dir or run without --resume to start over.")


def checkpoint_dir(output_dir: str) -> str:
  return os.path.join(output_dir, CHECKPOINT_DIR)


def block_file(output_dir: str, block: int) -> str:
  return os.path.join(checkpoint_dir(output_dir), f"block_{block:04d}.safetensors")


def load_state(output_dir: str) -> dict | None:
  path = os.path.join(checkpoint_dir(output_dir), STATE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save_block(output_dir: str, block: int, qweights: dict, state: dict,
               activations=None) -> None:
  """Writes the activations (optional; a `capture.Activations`, every process), then block
  `block`'s weights and state.json (process 0 only; the others hold the same state)."""
  if activations is not None:
    _save_activations(activations_dir(output_dir, block), activations)
    state = dict(state, activation_batches=len(activations.batches))
  if not multihost.is_writer():
    return
  with io_utils.atomic_path(block_file(output_dir, block)) as tmp:
    serialize.save_quantized(tmp, qweights, extra=dict(block=block))
  io_utils.atomic_write_json(os.path.join(checkpoint_dir(output_dir), STATE_FILE), state)
  if block > 0:
    shutil.rmtree(activations_dir(output_dir, block - 1), ignore_errors=True)


def _save_activations(path: str, activations) -> None:
  """An orbax checkpoint {"batches": the stored batches [B, T, D] as they are (device, host or
  disk; a mesh's global arrays), "valid": [n_batches] real rows of each} (every process)."""
  batches = [np.asarray(h.load()) if hasattr(h, "load") else h for h in activations.batches]
  tree = {"batches": batches, "valid": np.asarray(activations.valid, np.int64)}
  ocp.PyTreeCheckpointer().save(os.path.abspath(path), tree, force=True)


def block_params_file(output_dir: str, block: int) -> str:
  return os.path.join(checkpoint_dir(output_dir), f"block_{block:04d}_params.npz")


def save_block_params(output_dir: str, block: int, tensors: dict[str, np.ndarray]) -> None:
  """Writes block `block`'s tuned unquantized params (dotted path in the block -> array);
  call it before `save_block`, whose state.json then covers it. Process 0 only."""
  if not multihost.is_writer():
    return
  with io_utils.atomic_path(block_params_file(output_dir, block)) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **tensors)


def load_block_params(output_dir: str, block: int) -> dict[str, np.ndarray]:
  """What `save_block_params` wrote for `block` ({} when nothing was)."""
  path = block_params_file(output_dir, block)
  if not os.path.exists(path):
    return {}
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def activations_dir(output_dir: str, block: int) -> str:
  return os.path.join(checkpoint_dir(output_dir), f"activations_{block:04d}")


def load_blocks(output_dir: str, blocks_done: int) -> dict:
  """module name -> QuantizedWeight of blocks 0..blocks_done-1."""
  out = {}
  for block in range(blocks_done):
    out.update(serialize.load_quantized(block_file(output_dir, block)))
  return out


def load_activations(output_dir: str, state: dict) -> np.ndarray | None:
  """The saved inputs of block `blocks_done`, [N, T, D] host rows without padding, in the
  stored dtype (None when not saved: replay instead). Every process reads all of them."""
  path = os.path.abspath(activations_dir(output_dir, state["blocks_done"] - 1))
  if not os.path.exists(path):
    return None
  as_host = ocp.RestoreArgs(restore_type=np.ndarray)
  args = {"batches": [as_host] * state["activation_batches"], "valid": as_host}
  tree = ocp.PyTreeCheckpointer().restore(path, restore_args=args)
  return np.concatenate([np.asarray(h)[:int(n)] for h, n in zip(tree["batches"], tree["valid"])],
                        axis=0)


def clear(output_dir: str) -> None:
  """Removes the checkpoint folder (process 0 only)."""
  if not multihost.is_writer():
    return
  shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)
