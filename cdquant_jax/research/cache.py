"""The on-disk cache shared by a sweep's points, content-addressed: token ids and tokenizations.

  CACHE_DIR/calibration/<key>.npy  calibration windows [nsamples, seqlen] int32; key = sha256 of
                                   the canonical JSON of {source, path, sha256 of the file at
                                   path, field, tokenizer hash, nsamples, seqlen, seed}
  CACHE_DIR/tokens/<key>.npy       ids [n] int32 of one long text (>= MIN_CACHED_CHARS
                                   characters: a corpus split); key = sha256 of {tokenizer hash,
                                   add_special_tokens, sha256 of the text}. The pipeline's
                                   evaluation (and calibration) texts go through it via
                                   `CachingTokenizer`, so points sharing data tokenize once.
  CACHE_DIR/banks/<key>/           layer-problem banks (`research.bank.ensure_bank`)
  CACHE_DIR/baselines/<key>.json   the unquantized model's perplexities; key = sha256 of {model
                                   hash (config and every parameter's bytes), eval settings,
                                   sha256 of each local eval file, tokenizer hash, default seqlen}
The tokenizer hash is the sha256 of its JSON (`tokenizers.Tokenizer.to_str`); a tokenizer
without one is not cached. Entries are written atomically (temporary file + rename), so workers
computing the same entry at once are harmless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import numpy as np

from cdquant_jax import data, io_utils
from cdquant_jax.data.tokenize import as_encoder

MIN_CACHED_CHARS = 1 << 16


def sha256_hex(data_bytes: bytes) -> str:
  return hashlib.sha256(data_bytes).hexdigest()


def key_of(fields: dict) -> str:
  """sha256 hex of the canonical JSON of `fields`."""
  return sha256_hex(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def tokenizer_hash(tokenizer: Any) -> str | None:
  """sha256 of the tokenizer's JSON, or None when it has no `to_str`."""
  to_str = getattr(tokenizer, "to_str", None)
  return sha256_hex(to_str().encode()) if callable(to_str) else None


def file_sha256(path: str | None) -> str | None:
  """sha256 of the file at `path` (None for no path or a directory); memoized per process by
  (path, size, mtime)."""
  if path is None or not os.path.isfile(path):
    return None
  stat = os.stat(path)
  return _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the memo key only
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _load_or_compute(path: str, compute) -> np.ndarray:
  if os.path.exists(path):
    return np.load(path)
  ids = np.asarray(compute(), np.int32)
  with io_utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, ids)
  return ids


def calibration_key(calibration, tok_hash: str) -> str:
  """The cache key of the calibration windows of `calibration` (pipeline CalibrationData)."""
  c = calibration
  return key_of(dict(kind="calibration", source=c.source, path=c.path,
                     path_sha256=file_sha256(c.path), field=c.field, tokenizer=tok_hash,
                     nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed))


def calibration_ids(cache_dir: str | None, calibration, tokenizer) -> np.ndarray:
  """`data.calibration_windows` of the run's calibration settings [nsamples, seqlen] int32,
  from the cache when present (computed and stored otherwise)."""
  c = calibration

  def compute():
    return data.calibration_windows(c.source, tokenizer, nsamples=c.nsamples, seqlen=c.seqlen,
                                    seed=c.seed, path=c.path, field=c.field)

  tok_hash = tokenizer_hash(tokenizer)
  if cache_dir is None or tok_hash is None:
    return np.asarray(compute(), np.int32)
  path = os.path.join(cache_dir, "calibration", calibration_key(c, tok_hash) + ".npy")
  return _load_or_compute(path, compute)


class CachingTokenizer:
  """A tokenizer whose `encode` of long texts goes through CACHE_DIR/tokens/.

  `data.as_encoder` accepts it like any object with `encode(text, add_special_tokens=...)`;
  every other attribute (`to_str` for the exported tokenizer.json, `decode`, ...) is the
  wrapped tokenizer's. hits / misses count the cached encodes.
  """

  def __init__(self, tokenizer: Any, cache_dir: str):
    self.tokenizer = tokenizer
    self.cache_dir = cache_dir
    self.tok_hash = tokenizer_hash(tokenizer)
    self.hits = self.misses = 0
    self._encoders: dict[bool, Any] = {}

  def __getattr__(self, name: str) -> Any:
    if name == "tokenizer":  # not set yet (e.g. during unpickling)
      raise AttributeError(name)
    return getattr(self.tokenizer, name)

  def _encoder(self, add_special_tokens: bool):
    if add_special_tokens not in self._encoders:
      self._encoders[add_special_tokens] = as_encoder(self.tokenizer,
                                                      add_special_tokens=add_special_tokens)
    return self._encoders[add_special_tokens]

  def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """ids [n] int32 of `text` (as `as_encoder(tokenizer).encode`)."""
    encoder = self._encoder(add_special_tokens)
    if self.tok_hash is None or len(text) < MIN_CACHED_CHARS:
      return encoder.encode(text)
    key = key_of(dict(kind="text", tokenizer=self.tok_hash, add_special_tokens=add_special_tokens,
                      text_sha256=sha256_hex(text.encode("utf-8"))))
    path = os.path.join(self.cache_dir, "tokens", key + ".npy")
    if os.path.exists(path):
      self.hits += 1
    else:
      self.misses += 1
    return _load_or_compute(path, lambda: encoder.encode(text))


def baseline_key(model_hash: str, eval_settings: dict, default_seqlen: int, tok_hash: str) -> str:
  """The cache key of a baseline evaluation; eval_settings is `config.to_dict(EvalSettings)`."""
  paths = eval_settings.get("paths") or {}
  return key_of(dict(kind="baseline", model=model_hash, eval=eval_settings,
                     paths_sha256={s: file_sha256(p) for s, p in sorted(paths.items())},
                     default_seqlen=default_seqlen, tokenizer=tok_hash))


def cached_json(cache_dir: str, kind: str, key: str, compute) -> Any:
  """CACHE_DIR/<kind>/<key>.json when present, else compute() written there atomically."""
  path = os.path.join(cache_dir, kind, key + ".json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  value = compute()
  io_utils.atomic_write_json(path, value)
  return value
