"""Deterministic stand-in tokenizers for the data tests (no model files)."""

import numpy as np


def byte_encode(text: str) -> np.ndarray:
  """UTF-8 bytes as ids: len(ids) == len(text.encode())."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


class LookupTokenizer:
  """encode(row) returns ids registered for that exact row (doc k: k*10000 + arange(L))."""

  def __init__(self, lengths):
    self.rows = [f"doc{k}" for k in range(len(lengths))]
    self.table = {row: 10_000 * k + np.arange(n) for k, (row, n) in enumerate(zip(self.rows, lengths))}
    self.calls = 0

  def encode(self, text):
    self.calls += 1
    return list(self.table[text])


class FlagTokenizer:
  """transformers-like: encode(text, add_special_tokens=True) prepends BOS=1 to bytes+2."""

  bos_token_id = 1

  def encode(self, text, add_special_tokens=True):
    ids = [b + 2 for b in text.encode()]
    return [1] + ids if add_special_tokens else ids
