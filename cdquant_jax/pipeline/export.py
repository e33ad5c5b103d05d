"""The quantized model directory: write it, load it back, and dequantize it for evaluation.

Layout (every file written atomically):
  model.json             {"config": ModelConfig fields, "dtype": "float32", "format": ...}
  params.safetensors     every parameter that is not a quantized linear weight (embeddings,
                         norms, biases, excluded linears), named by dotted path
                         ("layers.0.input_layernorm.weight"), each in the narrowest float type
                         that holds it exactly among the source checkpoint's own type of the
                         tensor and the model dtype (see `storage_dtype`); read back as the
                         model dtype
  quantized.safetensors  the QuantizedWeight of each quantized linear, named by module
                         ("layers.0.self_attn.q_proj"; `quant.serialize` format, sha256-checked)
  tokenizer.json         the tokenizer, when the model has one
  run_config.json        the resolved RunConfig (+ "token_hashes" of the calibration and
                         evaluation windows, from the pipeline)
  metrics.json, log.jsonl  written by the pipeline
`load_quantized_model(dir)` returns params with a QuantizedWeight at p["weight"] of each
quantized linear; `dense_params` turns them into arrays of the model dtype (what the pipeline
wrote back into the model while quantizing, so evaluation reproduces it exactly).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors.numpy import load_file

from cdquant_jax import config as config_lib
from cdquant_jax import io_utils
from cdquant_jax.models import params as params_lib
from cdquant_jax.models import registry
from cdquant_jax.models.config import ModelConfig
from cdquant_jax.quant import qweight, serialize
from cdquant_jax.quant.qweight import QuantizedWeight

MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"
QUANTIZED_FILE = "quantized.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
DIR_FORMAT = "cdquant_jax.quantized_model/1"
Params = dict[str, Any]


def _is_qweight(x) -> bool:
  return isinstance(x, QuantizedWeight)


def flatten(params: Params) -> dict[str, Any]:
  """Nested params (dicts and the layers list) -> {"a.0.b.weight": leaf}."""
  return {params_lib.dotted(path): leaf
          for path, leaf in params_lib.flat_paths(params, is_leaf=_is_qweight).items()}


def unflatten_like(model, dtype, flat: dict[str, Any], where: str) -> Params:
  """The params tree of `model` with leaves taken from `flat` by dotted name."""
  shapes = model.param_shapes(dtype)
  names = list(flatten(shapes))
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f"{where}: missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
  extra = sorted(set(flat) - set(names))
  if extra:
    raise ValueError(f"{where}: unexpected parameters {extra[:5]}")
  treedef = jax.tree_util.tree_structure(shapes)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


FLOAT_TYPES = ("float16", "bfloat16", "float32")  # storable types, narrowest first


def _holds_exactly(a: np.ndarray, dtype: str) -> bool:
  """Whether casting `a` to `dtype` and back gives the same bits."""
  back = a.astype(dtype).astype(a.dtype)
  bits = f"u{a.dtype.itemsize}"
  return np.array_equal(back.view(bits), a.view(bits))


def storage_dtype(a: np.ndarray, source: str | None) -> str:
  """The float type an unquantized parameter `a` is stored in.

  Candidates: the source checkpoint's type of the tensor when it is one of FLOAT_TYPES (a
  GGUF F16 / BF16 / F32 tensor, a safetensors tensor), float16 when the source is a
  block-quantized GGUF type (e.g. "Q8_0": its dequantized values need not be float16), and the
  in-memory dtype. The narrowest candidate that holds every value exactly wins (the in-memory
  dtype always does). Other dtypes (not a model parameter's) are stored as float32.

  Args:
    a: the parameter as held in memory (any shape; float16 / bfloat16 / float32).
    source: the checkpoint's type name of the tensor, or None when unknown.
  """
  if a.dtype.name not in FLOAT_TYPES:
    return "float32"
  candidates = [source if source in FLOAT_TYPES else "float16"] if source else []
  candidates.append(a.dtype.name)
  candidates.sort(key=lambda t: np.dtype(t).itemsize)  # stable: ties keep the source first
  return next(t for t in candidates if _holds_exactly(a, t))


def unquantized_tensors(params: Params, skip: set[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(dotted name, host array) of every parameter whose name is not in `skip`, in `flatten`'s
  order, reading params["layers"] one block at a time (`layers[i]`: a lazy sequence reads
  block i from disk here and drops it after its tensors are used)."""
  for key in sorted(params):
    if key != "layers":
      yield from _named_host_arrays({key: params[key]}, skip)
      continue
    layers = params[key]
    for i in range(len(layers)):
      # {"layers": {i: block i}}: flatten's dotted names; freed before block i + 1 is read
      yield from _named_host_arrays({key: {i: layers[i]}}, skip)


def _named_host_arrays(part: Params, skip: set[str]) -> Iterator[tuple[str, np.ndarray]]:
  for name, leaf in flatten(part).items():
    if name not in skip:
      yield name, np.asarray(leaf)


def _stored_arrays(params: Params, skip: set[str], specs, source_dtypes: dict[str, str]
                   ) -> Iterator[np.ndarray]:
  """The tensors of `unquantized_tensors`, each in its `storage_dtype`, one at a time; their
  names are checked against `specs` (name, shape), the model's, in the same order."""
  count = 0  # not zip/enumerate: their reused result tuple keeps the last array
  for name, a in unquantized_tensors(params, skip):
    if count >= len(specs) or name != specs[count][0]:
      expected = specs[count][0] if count < len(specs) else "no more"
      raise ValueError(f"params: parameter {name} where the model has {expected}")
    yield a.astype(storage_dtype(a, source_dtypes.get(name)), copy=False)
    del a  # not held while the next block is read
    count += 1


def params_dtype(params: Params) -> np.dtype:
  """The model dtype of params: that of its first leaf outside the blocks (the embeddings;
  params["layers"] may be a lazy sequence, which is not read)."""
  return np.asarray(jax.tree.leaves({k: v for k, v in params.items() if k != "layers"})[0]).dtype


def write_model_dir(directory: str, model, params: Params, qweights: dict[str, QuantizedWeight],
                    *, tokenizer=None, run_config=None, extra: dict | None = None,
                    source_dtypes: dict[str, str] | None = None,
                    token_hashes: dict | None = None) -> None:
  """Writes model.json, params.safetensors, quantized.safetensors (+ tokenizer, run config).

  params: the model's params (the entries at quantized linears' weights are not written);
    params["layers"] may be any sequence of blocks: params.safetensors is written one tensor
    at a time and the blocks are indexed one at a time, twice (types and shapes, then data),
    so a lazy sequence (`weights.for_export`) is never held whole;
  qweights: module name -> QuantizedWeight;
  source_dtypes: dotted parameter name -> the source checkpoint's type of the tensor (what
    `registry.load_model(..., source_dtypes=)` fills in); names left out are stored in their
    in-memory dtype (see `storage_dtype`).
  token_hashes: the run's calibration / evaluation token hashes, recorded in run_config.json
    under "token_hashes" (beside the RunConfig's fields).
  """
  os.makedirs(directory, exist_ok=True)
  skip = {f"{name}.weight" for name in qweights}
  source_dtypes = source_dtypes or {}
  dtype = params_dtype(params)
  specs = [(name, leaf.shape) for name, leaf in flatten(model.param_shapes(dtype)).items()
           if name not in skip]
  io_utils.atomic_write_safetensors(os.path.join(directory, PARAMS_FILE), specs,
                                    _stored_arrays(params, skip, specs, source_dtypes))
  with io_utils.atomic_path(os.path.join(directory, QUANTIZED_FILE)) as tmp:
    serialize.save_quantized(tmp, qweights, extra=extra)
  io_utils.atomic_write_json(os.path.join(directory, MODEL_FILE), dict(
      format=DIR_FORMAT, config=config_lib.to_dict(model.config), dtype=dtype_name(dtype)))
  if tokenizer is not None and hasattr(tokenizer, "to_str"):
    io_utils.atomic_write_text(os.path.join(directory, TOKENIZER_FILE), tokenizer.to_str())
  if run_config is not None:
    io_utils.atomic_write_json(os.path.join(directory, RUN_CONFIG_FILE),
                               run_record(run_config, token_hashes))


def run_record(run_config, token_hashes: dict | None = None) -> dict:
  """What run_config.json holds: the RunConfig's fields (+ "token_hashes" when given)."""
  record = config_lib.to_dict(run_config)
  if token_hashes is not None:
    record["token_hashes"] = token_hashes
  return record


def with_quantized(model, params: Params, qweights: dict[str, QuantizedWeight]) -> Params:
  """Resident params with the QuantizedWeight of each quantized linear (module name ->
  weight) at its p["weight"], as `load_quantized_model` reads them back; the other leaves are
  the same arrays (nothing is copied)."""
  flat = flatten(params)
  flat.update({f"{name}.weight": qw for name, qw in qweights.items()})
  dtype = params_dtype(params)
  return unflatten_like(model, dtype, flat, where="params")


def load_quantized_model(directory: str):
  """(model, params, tokenizer or None) of a quantized model directory; each quantized linear's
  p["weight"] is a QuantizedWeight (use `dense_params` to evaluate with plain arrays)."""
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory}: not a quantized model directory (no {MODEL_FILE})")
  with open(path) as f:
    doc = json.load(f)
  if doc.get("format") != DIR_FORMAT:
    raise ValueError(f"{path}: format {doc.get('format')!r}, this code reads {DIR_FORMAT!r}")
  model = registry.model_for_config(config_lib.from_dict(ModelConfig, doc["config"]))
  dtype = registry.as_dtype(doc["dtype"])
  flat = {k: jnp.asarray(v, dtype) for k, v in
          load_file(os.path.join(directory, PARAMS_FILE)).items()}
  qweights = serialize.load_quantized(os.path.join(directory, QUANTIZED_FILE))
  flat.update({f"{name}.weight": qw for name, qw in qweights.items()})
  params = unflatten_like(model, dtype, flat, where=directory)
  tok = None
  tok_path = os.path.join(directory, TOKENIZER_FILE)
  if os.path.exists(tok_path):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    tok = Tokenizer.from_file(tok_path)
  return model, params, tok


@functools.partial(jax.jit, static_argnames="dtype")
def dequantized_weight(qw: QuantizedWeight, dtype) -> jax.Array:
  """The dequantized [d_out, d_in] weight, outliers included, in the model dtype (as written back
  while quantizing; one compiled program per weight format and shape)."""
  return qweight.dequantize(qw).astype(dtype)


def dense_params(params: Params, dtype=None) -> Params:
  """params with every QuantizedWeight replaced by its dequantized weight (model dtype)."""
  if dtype is None:
    dtype = next(x.dtype for x in jax.tree.leaves(params, is_leaf=_is_qweight)
                 if not _is_qweight(x))
  return jax.tree.map(lambda x: dequantized_weight(x, dtype) if _is_qweight(x) else x, params,
                      is_leaf=_is_qweight)


def quantized_weights(params: Params) -> dict[str, QuantizedWeight]:
  """module name -> QuantizedWeight of a loaded quantized model."""
  return {name[:-len(".weight")]: leaf for name, leaf in flatten(params).items()
          if _is_qweight(leaf)}
