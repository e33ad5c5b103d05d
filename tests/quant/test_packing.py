"""Bit packing: layout against an independent big-integer bitstream oracle, round trips, errors."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from cdquant_jax.quant import packing


def oracle_words(codes: np.ndarray, bits: int) -> np.ndarray:
  """[K/32, bits, N] words built from one Python big integer per (chunk, column)."""
  k, n = codes.shape
  out = np.zeros((k // 32, bits, n), np.uint32)
  for c in range(k // 32):
    for col in range(n):
      stream = 0
      for v in range(32):
        stream |= int(codes[32 * c + v, col]) << (bits * v)
      for w in range(bits):
        out[c, w, col] = (stream >> (32 * w)) & 0xFFFFFFFF
  return out


def as_chunk_words(packed: np.ndarray, bits: int) -> np.ndarray:
  """Documented layouts -> [K/32, bits, N]: flat word i = bits·c + w; planes [w, c, n]."""
  if packing.is_flat(bits):
    return packed.reshape(-1, bits, packed.shape[1])
  return packed.transpose(1, 0, 2)


@st.composite
def code_matrices(draw):
  bits = draw(st.sampled_from(packing.SUPPORTED_BITS))
  k = 32 * draw(st.integers(1, 3))
  n = draw(st.integers(1, 7))
  seed = draw(st.integers(0, 2**31))
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(k, n))
  # Make the extremes appear: all-ones rows exercise every bit of straddling values.
  codes[draw(st.integers(0, k - 1))] = 2**bits - 1
  return bits, codes


@settings(max_examples=40, deadline=None)
@given(code_matrices())
def test_layout_matches_bitstream_oracle(case):
  bits, codes = case
  packed = packing.pack_codes(codes, bits)
  assert packed.dtype == np.uint32
  assert packed.shape == packing.packed_shape(*codes.shape, bits)
  np.testing.assert_array_equal(as_chunk_words(packed, bits), oracle_words(codes, bits))


@settings(max_examples=30, deadline=None)
@given(code_matrices())
def test_unpack_inverts_pack(case):
  bits, codes = case
  unpacked = np.asarray(packing.unpack_codes(packing.pack_codes(codes, bits), bits))
  assert unpacked.dtype == np.uint32
  np.testing.assert_array_equal(unpacked, codes)


def test_shapes_of_the_kernel_layouts():
  assert packing.packed_shape(64, 5, 4) == (8, 5)
  assert packing.packed_shape(64, 5, 2) == (4, 5)
  assert packing.packed_shape(64, 5, 3) == (3, 2, 5)


def test_four_bit_word_hand_computed():
  codes = np.arange(1, 33).reshape(32, 1) % 16  # 1, 2, ..., 15, 0, 1, ...
  packed = packing.pack_codes(codes, 4)
  assert packed[0, 0] == 0x87654321  # value j of word 0 at bit 4j
  assert packed[1, 0] == 0x0FEDCBA9


def test_two_bit_word_hand_computed():
  codes = np.zeros((32, 1), int)
  codes[0], codes[15], codes[16] = 1, 3, 2
  packed = packing.pack_codes(codes, 2)
  assert packed[0, 0] == 0xC0000001 and packed[1, 0] == 0x2


@pytest.mark.parametrize("slot, planes", [
    (10, (0xC0000000, 0x1, 0x0)),  # bits 30..32 straddle planes 0 and 1
    (21, (0x0, 0x80000000, 0x3)),  # bits 63..65 straddle planes 1 and 2
    (31, (0x0, 0x0, 0xE0000000)),
])
def test_three_bit_straddling_values(slot, planes):
  codes = np.zeros((32, 2), int)
  codes[slot, 1] = 7
  packed = packing.pack_codes(codes, 3)
  assert tuple(int(p) for p in packed[:, 0, 1]) == planes
  assert not packed[:, :, 0].any()


def test_unpack_is_jittable():
  codes = np.random.default_rng(0).integers(0, 8, size=(96, 3))
  packed = packing.pack_codes(codes, 3)
  out = jax.jit(packing.unpack_codes, static_argnums=1)(packed, 3)
  np.testing.assert_array_equal(np.asarray(out), codes)


def test_padded_rows():
  assert [packing.padded_rows(k) for k in (1, 31, 32, 33, 80, 96)] == [32, 32, 32, 64, 96, 96]


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"code 8 at \[3, 1\] does not fit in 3 bits"):
    codes = np.zeros((32, 2), int)
    codes[3, 1] = 8
    packing.pack_codes(codes, 3)
  with pytest.raises(ValueError, match="multiple of 32"):
    packing.pack_codes(np.zeros((40, 2), int), 4)
  with pytest.raises(ValueError, match="bits in"):
    packing.pack_codes(np.zeros((32, 2), int), 9)
