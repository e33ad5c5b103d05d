"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename.

Files end up with the permissions a plain `open(path, "w")` gives (0o666 less the umask), not
the 0o600 of the `tempfile.mkstemp` file they are written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np


def current_umask() -> int:
  """The process umask (read by setting it and restoring it at once)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~current_umask())
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


# safetensors' dtype names (the format's header), by numpy dtype name.
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                      "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                      "bool": "BOOL"}


_LONGEST_CODE = max(SAFETENSORS_DTYPES.values(), key=len)


def _header_json(entries: Sequence[tuple[str, str, tuple[int, ...], int, int]],
                 metadata: dict[str, str] | None) -> bytes:
  """safetensors' JSON header of `entries` (name, dtype code, shape, begin, end byte offset)."""
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  for name, code, shape, begin, end in entries:
    header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [begin, end]}
  return json.dumps(header, separators=(",", ":")).encode()


def _header_room(specs: Sequence[tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> int:
  """Bytes that hold the header of `specs` (name, shape) whatever their dtypes (every code and
  offset at its longest: the longest code, 8 bytes an element), rounded up to 8."""
  entries, offset = [], 0
  for name, shape in specs:
    size = int(np.prod(shape, dtype=np.int64)) * 8
    entries.append((name, _LONGEST_CODE, shape, offset, offset + size))
    offset += size
  room = len(_header_json(entries, metadata))
  return room + -room % 8


def atomic_write_safetensors(path: str | os.PathLike,
                             specs: Sequence[tuple[str, tuple[int, ...]]],
                             arrays: Iterable[np.ndarray],
                             metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file one tensor at a time, in one pass: tensor k is named and shaped
  by specs[k] (name, shape) and has the dtype of the k-th array of `arrays` (an iterable
  producing them in order; each is written as it comes and dropped).

  The header is written last into room reserved before the data (`_header_room`) and padded
  with spaces, as the format allows. `safetensors.numpy.save_file` instead needs every tensor
  in memory at once and copies them all to bytes; this holds one (what lets an export stream
  a model's blocks from disk).
  """
  room = _header_room(specs, metadata)
  entries, offset = [], 0
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.seek(8 + room)
    for array in arrays:  # not zip/enumerate: their reused result tuple keeps the last array
      if len(entries) == len(specs):
        raise ValueError(f"{path}: more tensors than the {len(specs)} named")
      name, shape = specs[len(entries)]
      if tuple(array.shape) != tuple(shape) or array.dtype.name not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name} is {array.dtype.name}{tuple(array.shape)}, "
                         f"expected shape {tuple(shape)} of a safetensors dtype")
      # [*shape] -> [size] -> [nbytes]: raw little-endian bytes, in C order
      data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
      f.write(data.data)
      entries.append((name, SAFETENSORS_DTYPES[array.dtype.name], shape, offset,
                      offset + data.size))
      offset += data.size
      del array, data  # not held while the next one is produced
    if len(entries) != len(specs):
      raise ValueError(f"{path}: {len(entries)} tensors for the {len(specs)} named")
    f.seek(0)
    f.write(struct.pack("<Q", room) + _header_json(entries, metadata).ljust(room, b" "))
