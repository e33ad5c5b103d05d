"""One adapter from any tokenizer to `text -> int32 ids`, and the token-id hash.

Accepted tokenizers (`as_encoder`):
- a `tokenizers.Tokenizer` (e.g. from `tokenizer.json`): called as
  `encode(text, add_special_tokens=...)`. Any padding/truncation stored in the
  tokenizer.json is switched off on a private copy (MiniLM's file ships
  `pad to 128, truncate at 128`, which would silently cut documents);
- any object with `encode(text) -> ids` (transformers tokenizers, our
  `cdquant_jax.models.tokenizer.load_tokenizer(path)` result, test fakes).
  When its `encode` accepts `add_special_tokens` (by name or `**kwargs`) the
  flag is passed; otherwise the object decides and `Encoder.special_tokens`
  says `"encoder-defined"`;
- a plain callable `text -> ids`;
- an `Encoder` (returned unchanged).

`ids` may be a list, an array, an object with `.ids` (a `tokenizers.Encoding`)
or a mapping with `"input_ids"` (a transformers `BatchEncoding`).

BOS: the standard protocol calls `tokenizer(text)`, i.e. special tokens ON, so a
Llama tokenizer puts one BOS at the start of each encoded string. That is our
default (`add_special_tokens=True`). lm-eval scoring uses `False`.
"""

import dataclasses
import hashlib
import inspect
from typing import Any, Callable

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Encoder:
  """`text -> np.ndarray [n] int32`, with the special-token policy recorded.

  Attributes:
    encode_fn: the underlying `text -> ids` call (flag already bound).
    special_tokens: "on", "off" or "encoder-defined" (the tokenizer's own
      `encode` has no `add_special_tokens` switch).
    description: what was wrapped, for run records.
    decode_fn: optional `ids -> text` (needed by lm-eval `generate_until`).
  """

  encode_fn: Callable[[str], Any]
  special_tokens: str
  description: str
  decode_fn: Callable[[list[int]], str] | None = None

  def encode(self, text: str) -> np.ndarray:
    """Returns the ids of `text`, shape [n], int32."""
    if not isinstance(text, str):
      raise TypeError(f"Encoder.encode expects str, got {type(text).__name__}")
    return ids_to_array(self.encode_fn(text), what=f"encode of {self.description}")

  __call__ = encode

  def decode(self, ids) -> str:
    if self.decode_fn is None:
      raise TypeError(f"tokenizer {self.description} has no decode method")
    # any shape -> flat list of Python ints
    return self.decode_fn([int(i) for i in np.asarray(ids).reshape(-1)])


def ids_to_array(ids: Any, *, what: str = "ids") -> np.ndarray:
  """Normalises list / array / Encoding / BatchEncoding ids to [n] int32."""
  if hasattr(ids, "ids") and not isinstance(ids, np.ndarray):
    ids = ids.ids
  elif isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  array = np.asarray(ids)
  if array.ndim == 2 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 1:
    raise ValueError(f"{what}: expected a 1-D id sequence, got shape {array.shape}")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{what}: ids must be integers, got dtype {array.dtype}")
  if array.size and (array.min() < 0 or array.max() > _INT32_MAX):
    raise ValueError(f"{what}: ids out of int32 range [{array.min()}, {array.max()}]")
  return array.astype(np.int32)


def _is_hf_tokenizers(obj) -> bool:
  return type(obj).__module__.startswith("tokenizers") and type(obj).__name__ == "Tokenizer"


def _unpadded_copy(tok):
  """A copy of a `tokenizers.Tokenizer` with padding and truncation disabled."""
  if tok.padding is None and tok.truncation is None:
    return tok
  copy = type(tok).from_str(tok.to_str())
  copy.no_padding()
  copy.no_truncation()
  return copy


def _accepts_special_flag(method) -> bool:
  try:
    params = inspect.signature(method).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == "add_special_tokens" or p.kind is p.VAR_KEYWORD for p in params)


def as_encoder(tokenizer, *, add_special_tokens: bool = True) -> Encoder:
  """Wraps `tokenizer` (see module docstring) into an `Encoder`."""
  if isinstance(tokenizer, Encoder):
    return tokenizer
  policy = "on" if add_special_tokens else "off"
  name = type(tokenizer).__name__
  decode = getattr(tokenizer, "decode", None)
  if _is_hf_tokenizers(tokenizer):
    tok = _unpadded_copy(tokenizer)
    return Encoder(
        lambda text: tok.encode(text, add_special_tokens=add_special_tokens).ids,
        policy, f"tokenizers.Tokenizer(add_special_tokens={add_special_tokens})",
        lambda ids: tok.decode(ids, skip_special_tokens=False))
  if hasattr(tokenizer, "encode"):
    if _accepts_special_flag(tokenizer.encode):
      return Encoder(lambda text: tokenizer.encode(text, add_special_tokens=add_special_tokens),
                     policy, f"{name}.encode(add_special_tokens={add_special_tokens})", decode)
    return Encoder(tokenizer.encode, "encoder-defined", f"{name}.encode", decode)
  if callable(tokenizer):
    return Encoder(tokenizer, "encoder-defined", f"callable {name}", None)
  raise TypeError(f"cannot use {name} as a tokenizer: it has no encode(text) method and is not callable")


def token_hash(ids) -> str:
  """sha256 hex digest of token ids: shape, then int32 little-endian values.

  Hashed bytes: `b"shape=" + ",".join(dims).encode() + b";"` followed by the
  C-order `<i4` bytes. Any integer array or nested list is accepted; values
  must fit in int32.
  """
  array = np.asarray(ids)
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"token_hash: ids must be integers, got dtype {array.dtype}")
  if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > _INT32_MAX):
    raise ValueError(f"token_hash: ids out of int32 range [{array.min()}, {array.max()}]")
  digest = hashlib.sha256()
  digest.update(b"shape=" + ",".join(str(d) for d in array.shape).encode() + b";")
  digest.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
  return digest.hexdigest()
