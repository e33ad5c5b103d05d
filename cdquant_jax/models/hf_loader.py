"""HF checkpoints: config.json + safetensors (single file or sharded index), local or from the hub.

Tensors are read with `safetensors.numpy` (bf16 via ml_dtypes), renamed with the model's
`hf_name_to_path` and checked strictly against `model.param_shapes()`: a missing, unexpected
or wrongly shaped tensor is an error naming it. Bad input raises `ModelLoadError` (naming the
file and the value) or FileNotFoundError (a missing file).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads)
import numpy as np
import jax
import jax.numpy as jnp

from cdquant_jax.models import params as params_lib
from cdquant_jax.models.errors import ModelLoadError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def looks_like_hub_id(text: str) -> bool:
  """Whether `text` reads as "owner/name" rather than a local path."""
  return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")


def resolve_model_dir(path_or_hub_id: str) -> str:
  """A local directory as is; otherwise a hub id downloaded with huggingface_hub (online)."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id):
    raise ModelLoadError(f"{path_or_hub_id}: not a model directory (expected config.json + "
                         "safetensors) nor a .gguf file")
  if not looks_like_hub_id(path_or_hub_id):
    raise FileNotFoundError(f"{path_or_hub_id}: no such model directory or .gguf file")
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  try:
    return snapshot_download(path_or_hub_id, allow_patterns=[
        "*.json", "*.safetensors", "tokenizer*", "*.model"])
  except Exception as e:  # huggingface_hub: offline, unknown repo, network or auth errors
    raise ModelLoadError(f"{path_or_hub_id}: not a local path, and the hub download failed "
                         f"({type(e).__name__}: {e})") from e


def read_config(model_dir: str) -> dict[str, Any]:
  """The config.json dict of a model directory."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing config.json")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelLoadError(f"{path}: invalid JSON ({e})") from e
  if not isinstance(config, dict):
    raise ModelLoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def _load_file(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing safetensors file")
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types for corrupt headers/data
    raise ModelLoadError(f"{path}: cannot read safetensors file "
                         f"({type(e).__name__}: {e})") from e


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  """{HF tensor name: array} from model.safetensors or the shards of its index."""
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.exists(index_path):
    weight_map = _read_weight_map(index_path)
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      loaded = _load_file(os.path.join(model_dir, shard))
      expected = {name for name, file in weight_map.items() if file == shard}
      missing = sorted(expected - set(loaded))
      if missing:
        raise ModelLoadError(f"{os.path.join(model_dir, shard)}: lacks tensors listed in the "
                             f"index: {missing[:10]}")
      tensors.update(loaded)
    return tensors
  single = os.path.join(model_dir, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}")
  return _load_file(single)


def _read_weight_map(index_path: str) -> dict[str, str]:
  """{tensor name: shard file} of a sharded checkpoint's index."""
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelLoadError(f"{index_path}: invalid JSON ({e})") from e
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise ModelLoadError(f"{index_path}: no 'weight_map' object in the index")
  return weight_map


def params_from_state_dict(model, state: dict[str, np.ndarray], dtype=jnp.float32,
                           source: str = "checkpoint") -> dict[str, Any]:
  """Nested params for `model` from HF-named tensors, cast to dtype, checked strictly."""
  shapes = params_lib.flat_paths(model.param_shapes(dtype))
  expected = {path: leaf.shape for path, leaf in shapes.items()}
  params: dict[str, Any] = {}
  seen, unexpected = set(), []
  for name, array in state.items():
    path = model.hf_name_to_path(name)
    if path is None:
      continue
    if path not in expected:
      unexpected.append(name)
      continue
    if tuple(array.shape) != tuple(expected[path]):
      raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(array.shape)}, expected "
                           f"{tuple(expected[path])} for {model.config.model_type}")
    params_lib.insert_path(params, path, jnp.asarray(np.asarray(array), dtype=dtype))
    seen.add(path)
  missing = sorted(".".join(map(str, p)) for p in set(expected) - seen)
  if unexpected or missing:
    raise ModelLoadError(f"{source}: tensors do not match {model.config.model_type}: "
                         f"unexpected {sorted(unexpected)[:20]}, missing {missing[:20]}")
  return params
