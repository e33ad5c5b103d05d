"""Bit packing of small unsigned integer codes into uint32 words, along the first axis.

Every packing is the same little-endian *bitstream*: the codes C[k, n] (0 ≤ C < 2^bits) of a
column n are cut into chunks of 32 consecutive rows (k = 32c … 32c+31), and chunk c is written
as a 32·bits-bit stream, value v at bit offset bits·v, into `bits` uint32 words
    word w of chunk c holds stream bits [32w, 32w + 32),
so value v lives in word w = (bits·v) // 32 at shift (bits·v) % 32 and, when the shift is above
32 − bits, continues in the low bits of word w + 1 (for 3 bits: values 10 and 21).

Two array layouts of those words, chosen by `bits` (K = rows, a multiple of 32):

  bits ∈ {1, 2, 4, 8} (divides 32)  "flat"    uint32 [K·bits/32, N]; word i = bits·c + w, i.e.
                                               value j of word i is C[(32/bits)·i + j, n] at
                                               bit offset j·bits (no value straddles words).
  bits ∈ {3, 5, 6, 7}               "planes"  uint32 [bits, K/32, N]; plane w, row c = word w of
                                               chunk c (environment.md 3.3(b)/(c)): a kernel
                                               unpacks slot v with one or two shifts and an or.

Packing runs in numpy (offline); unpacking is pure jnp (jit-able, vectorised over the 32 slots
of a chunk with static word/shift tables; no loop over K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 32  # rows per bitstream chunk; K must be a multiple of this.
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def is_flat(bits: int) -> bool:
  """True when `bits` divides 32, i.e. the layout is "flat" [K·bits/32, N]."""
  return 32 % bits == 0


def packed_shape(k: int, n: int, bits: int) -> tuple[int, ...]:
  """Shape of the packed words of a [k, n] code matrix (k a multiple of 32)."""
  _check_bits(bits)
  _check_rows(k)
  if is_flat(bits):
    return (k * bits // 32, n)
  return (bits, k // CHUNK, n)


def padded_rows(k: int) -> int:
  """Smallest multiple of 32 that is ≥ k (at least 32)."""
  return max(CHUNK, -(-k // CHUNK) * CHUNK)


def _check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"packing supports bits in {SUPPORTED_BITS}, got {bits!r}")


def _check_rows(k: int) -> None:
  if k % CHUNK:
    raise ValueError(f"packed row count must be a multiple of {CHUNK}, got {k}")


def _slot_table(bits: int):
  """Per slot v of a chunk: (word, shift, straddles) as static Python ints / bools."""
  table = []
  for v in range(CHUNK):
    word, shift = divmod(bits * v, 32)
    table.append((word, shift, shift > 32 - bits))
  return table


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs codes [K, N] (integers in [0, 2^bits)) into uint32 words.

  Args:
    codes: [K, N] integer array, K a multiple of 32.
    bits: code width, 1..8.
  Returns:
    uint32 [K·bits/32, N] ("flat", bits divides 32) or [bits, K/32, N] ("planes").
  Raises:
    ValueError: a code outside [0, 2^bits) (names the first one) or a bad shape.
  """
  _check_bits(bits)
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}")
  k, n = codes.shape
  _check_rows(k)
  bad = (codes < 0) | (codes >= 2**bits)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"code {codes[r, c]} at [{r}, {c}] does not fit in {bits} bits")
  # [K, N] -> [K/32, 32, N]
  chunks = codes.astype(np.uint64).reshape(k // CHUNK, CHUNK, n)
  planes = np.zeros((bits, k // CHUNK, n), np.uint64)
  for v, (word, shift, straddles) in enumerate(_slot_table(bits)):
    planes[word] |= (chunks[:, v] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
    if straddles:
      planes[word + 1] |= chunks[:, v] >> np.uint64(32 - shift)
  planes = planes.astype(np.uint32)
  if is_flat(bits):
    # [bits, K/32, N] -> [K/32, bits, N] -> [K·bits/32, N] (word i = bits·c + w)
    return np.ascontiguousarray(planes.transpose(1, 0, 2)).reshape(k * bits // 32, n)
  return planes


def words_to_planes(words: jax.Array, bits: int) -> jax.Array:
  """Any packed layout -> planes [bits, K/32, N] (a view change for the flat layout)."""
  if not is_flat(bits):
    return words
  n_words, n = words.shape
  # [K·bits/32, N] -> [K/32, bits, N] -> [bits, K/32, N]
  return words.reshape(n_words // bits, bits, n).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnums=1)
def unpack_codes(words: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack_codes`: packed words -> codes uint32 [K, N]. Pure jnp, jit-able."""
  _check_bits(bits)
  planes = words_to_planes(jnp.asarray(words, jnp.uint32), bits)  # [bits, K/32, N]
  table = _slot_table(bits)
  word = np.array([w for w, _, _ in table])  # static [32]
  shift = np.array([s for _, s, _ in table], np.uint32)[:, None, None]
  straddles = np.array([t for _, _, t in table])
  # Slot v reads its word, and the next word when it straddles (the shift is 0 otherwise).
  carry_shift = np.where(straddles, 32 - shift[:, 0, 0], 0).astype(np.uint32)[:, None, None]
  next_word = np.minimum(word + 1, bits - 1)
  low = planes[word] >> shift  # [32, K/32, N]
  high = jnp.where(straddles[:, None, None], planes[next_word] << carry_shift, jnp.uint32(0))
  values = (low | high) & jnp.uint32(2**bits - 1)  # [32, K/32, N]
  _, n_chunks, n = planes.shape
  # [32, K/32, N] -> [K/32, 32, N] -> [K, N]
  return values.transpose(1, 0, 2).reshape(n_chunks * CHUNK, n)
