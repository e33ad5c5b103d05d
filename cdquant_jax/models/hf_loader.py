"""HF checkpoints: config.json + safetensors (single file or sharded index), local or from the hub.

Tensors are read with `safetensors.numpy` (bf16 via ml_dtypes), renamed with the model's
`hf_name_to_path` and checked strictly against `model.param_shapes()`: a missing, unexpected
or wrongly shaped tensor is an error naming it. Bad input raises `ModelLoadError` (naming the
file and the value) or FileNotFoundError (a missing file).
"""

from __future__ import annotations

import collections.abc
import functools
import json
import os
from typing import Any, Callable, Iterator, Mapping

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


class LazyTensors(collections.abc.Mapping):
  """A read-only {name: array} whose values are produced by a loader on each access (not
  cached: `items()` yields one tensor at a time, and a dropped one is freed), so a checkpoint
  is converted tensor by tensor without a second full copy of the model.

  dtypes: {name: numpy dtype name} of the stored tensors, when known without reading them.
  """

  def __init__(self, loaders: dict[str, Callable[[], np.ndarray]],
               dtypes: dict[str, str] | None = None):
    self._loaders = loaders
    self.dtypes = dtypes

  def __getitem__(self, name: str) -> np.ndarray:
    return self._loaders[name]()

  def __iter__(self) -> Iterator[str]:
    return iter(self._loaders)

  def __len__(self) -> int:
    return len(self._loaders)


# safetensors dtype codes -> numpy dtype names (the float types checkpoints hold).
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _read_tensor(path: str, name: str) -> np.ndarray:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="numpy") as f:
    return f.get_tensor(name)


def _open_file(path: str) -> LazyTensors:
  """The tensors of one safetensors file, read one at a time (the header is read now)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing safetensors file")
  try:
    with safe_open(path, framework="numpy") as f:
      dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers/data
    raise ModelLoadError(f"{path}: cannot read safetensors file "
                         f"({type(e).__name__}: {e})") from e
  return LazyTensors({name: functools.partial(_read_tensor, path, name) for name in dtypes},
                     {name: _SAFETENSORS_DTYPES.get(code, code.lower())
                      for name, code in dtypes.items()})


def load_state_dict(model_dir: str) -> LazyTensors:
  """{HF tensor name: array} from model.safetensors or the shards of its index, read lazily
  (see `LazyTensors`)."""
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.exists(index_path):
    weight_map = _read_weight_map(index_path)
    loaders, dtypes = {}, {}
    for shard in sorted(set(weight_map.values())):
      loaded = _open_file(os.path.join(model_dir, shard))
      expected = {name for name, file in weight_map.items() if file == shard}
      missing = sorted(expected - set(loaded))
      if missing:
        raise ModelLoadError(f"{os.path.join(model_dir, shard)}: lacks tensors listed in the "
                             f"index: {missing[:10]}")
      loaders.update(loaded._loaders)  # pylint: disable=protected-access
      dtypes.update(loaded.dtypes)
    return LazyTensors(loaders, dtypes)
  single = os.path.join(model_dir, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}")
  return _open_file(single)


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


def params_from_state_dict(model, state: Mapping[str, np.ndarray], dtype=jnp.float32,
                           source: str = "checkpoint") -> dict[str, Any]:
  """Nested params for `model` from HF-named tensors, cast to dtype, checked strictly.

  The tensors are read, cast and stored one at a time (with a `LazyTensors` state, at most one
  source tensor is in memory besides the params)."""
  shapes = params_lib.flat_paths(model.param_shapes(dtype))
  expected = {path: leaf.shape for path, leaf in shapes.items()}
  params: dict[str, Any] = {}
  seen, unexpected = set(), []
  for name in state:
    path = model.hf_name_to_path(name)
    if path is None:
      continue
    if path not in expected:
      unexpected.append(name)
      continue
    array = state[name]
    if tuple(array.shape) != tuple(expected[path]):
      raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(array.shape)}, expected "
                           f"{tuple(expected[path])} for {model.config.model_type}")
    converted = jnp.asarray(np.asarray(array), dtype=dtype)
    params_lib.insert_path(params, path, converted.block_until_ready())
    del array, converted  # the source tensor is freed before the next one is read
    seen.add(path)
  missing = sorted(".".join(map(str, p)) for p in set(expected) - seen)
  if unexpected or missing:
    raise ModelLoadError(f"{source}: tensors do not match {model.config.model_type}: "
                         f"unexpected {sorted(unexpected)[:20]}, missing {missing[:20]}")
  return params
