"""Saving / loading `QuantizedWeight`s as one safetensors file with JSON metadata.

File = a standard safetensors file (written by `safetensors.numpy.save_file`). Tensor
"<layer>.<field>" holds the array `field` of layer `layer` (e.g. "encoder.0.query.codes").
The safetensors header metadata has one key, "cdquant_jax", a JSON document:
  {"format": "cdquant_jax.quantized", "format_version": 1,
   "layers": {layer: {"meta": {QuantMeta fields},
                      "tensors": {field: {"key", "dtype", "shape", "sha256"}}}},
   "extra": {...caller's JSON-able metadata...}}
Loading parses the header itself (so a truncated file is reported per tensor), then checks for
every tensor: present, dtype and shape as recorded AND as the layout of its metadata requires,
byte range inside the file, and the SHA-256 of its bytes. Every error is a `QuantFileError`
naming the file and, where one is involved, the tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from cdquant_jax.quant.qweight import FORMAT_VERSION, QuantizedWeight, QuantMeta, check_arrays

FORMAT_NAME = "cdquant_jax.quantized"
METADATA_KEY = "cdquant_jax"
_SAFETENSORS_DTYPES = {"U32": np.uint32, "I32": np.int32, "F16": np.float16, "F32": np.float32}


class QuantFileError(ValueError):
  """A quantized-weights file that cannot be read back exactly."""


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_quantized(path: str | os.PathLike, weights: Mapping[str, QuantizedWeight], *,
                   extra: Mapping[str, Any] | None = None) -> None:
  """Writes `weights` (layer name -> QuantizedWeight) to `path` as safetensors + JSON metadata."""
  tensors, layers = {}, {}
  for layer, qw in weights.items():
    check_arrays(qw, name=layer)
    specs = {}
    for field, array in qw.arrays().items():
      key = f"{layer}.{field}"
      if key in tensors:
        raise ValueError(f"tensor name {key!r} is produced twice; rename layer {layer!r}")
      a = np.ascontiguousarray(np.asarray(array))
      tensors[key] = a
      specs[field] = dict(key=key, dtype=a.dtype.name, shape=list(a.shape), sha256=_sha256(a))
    layers[layer] = dict(meta=dataclasses.asdict(qw.meta), tensors=specs)
  doc = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, layers=layers,
             extra=dict(extra or {}))
  save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(doc, sort_keys=True)})


def read_metadata(path: str | os.PathLike) -> dict:
  """The JSON metadata document of a file written by `save_quantized` (header only)."""
  return _parse(path, _read_header_only(path))[1]


def load_quantized(path: str | os.PathLike) -> dict[str, QuantizedWeight]:
  """Reads and verifies a file written by `save_quantized`: layer name -> QuantizedWeight."""
  data = _read(path)
  header, doc, body = _parse(path, data)
  out = {}
  for layer, entry in doc["layers"].items():
    try:
      meta = QuantMeta(**entry["meta"])
      meta.validate()
    except (TypeError, ValueError) as e:
      raise QuantFileError(f"{path}: layer {layer!r} has invalid metadata: {e}") from e
    arrays = {field: _tensor(path, header, body, spec) for field, spec in entry["tensors"].items()}
    try:
      qw = QuantizedWeight(**{k: jnp.asarray(v) for k, v in arrays.items()}, meta=meta)
      check_arrays(qw, name=f"{path}: layer {layer!r}")
    except (TypeError, ValueError) as e:
      raise QuantFileError(str(e)) from e
    out[layer] = qw
  return out


def _read(path) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise QuantFileError(f"{path}: cannot read: {e}") from e


def _read_header_only(path) -> bytes:
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    return head + f.read(n)


def _parse(path, data: bytes) -> tuple[dict, dict, memoryview]:
  """(safetensors header, our JSON document, tensor data bytes); raises QuantFileError."""
  if len(data) < 8:
    raise QuantFileError(f"{path}: {len(data)} bytes, too short for a safetensors header "
                         "(file truncated?)")
  n = int.from_bytes(data[:8], "little")
  if 8 + n > len(data):
    raise QuantFileError(f"{path}: header of {n} bytes runs past the end of the file "
                         f"({len(data)} bytes): file truncated or corrupt")
  try:
    header = json.loads(data[8:8 + n])
    doc = json.loads(header["__metadata__"][METADATA_KEY])
  except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise QuantFileError(f"{path}: not a readable {FORMAT_NAME} safetensors header "
                         f"({type(e).__name__}: {e})") from e
  if doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
    raise QuantFileError(f"{path}: format {doc.get('format')!r} version "
                         f"{doc.get('format_version')!r}, expected {FORMAT_NAME!r} "
                         f"version {FORMAT_VERSION}")
  return header, doc, memoryview(data)[8 + n:]


def _tensor(path, header: dict, body: memoryview, spec: dict) -> np.ndarray:
  """One tensor, checked against its recorded dtype, shape, byte range and checksum."""
  key = spec["key"]
  where = f"{path}: tensor {key!r}"
  info = header.get(key)
  if info is None:
    raise QuantFileError(f"{where} is missing from the file")
  dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
  shape = tuple(info.get("shape", ()))
  if dtype is None or np.dtype(dtype).name != spec["dtype"] or list(shape) != spec["shape"]:
    raise QuantFileError(f"{where}: stored as {info.get('dtype')}{list(shape)}, metadata says "
                         f"{spec['dtype']}{spec['shape']}")
  begin, end = info["data_offsets"]
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if end - begin != size:
    raise QuantFileError(f"{where}: byte range {begin}..{end} does not hold {size} bytes")
  if end > len(body):
    raise QuantFileError(f"{where}: bytes {begin}..{end} run past the end of the data "
                         f"({len(body)} bytes): file truncated")
  array = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
  if _sha256(array) != spec["sha256"]:
    raise QuantFileError(f"{where}: checksum mismatch, the data is corrupt")
  return array
