"""In-kernel decoding of packed codes and statistics (plain jnp on refs; backend-neutral).

Only shifts, masks, selects, int→float casts, broadcasts and power-of-2 reshapes: no gather
(lax.gather has no Pallas GPU lowering), no concatenate (Triton joins only [..., 1] arrays).
See plan.py for the glossary (bits, bk, kw, g, class) and qweight.py for the layout.

Two orders of a tile's weights:
  slot order     slot v (0..31) of every chunk row c of the tile, one [kw, bn] array per slot,
                 decoded with static shifts (cheapest; used by the CUDA-core GEMV path);
  natural order  rows k0 .. k0 + bk - 1 as one [bk, bn] array (used by the dot path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cdquant_jax.quant import packing

F32 = jnp.float32


def load_plane(refs, bits: int, w: int, chunk0, n_chunks: int) -> jax.Array:
  """Word plane w of chunks [chunk0, chunk0 + n_chunks) -> uint32 [n_chunks, bn].

  Flat layout (one ref [rows·bits/32, bn]): word w of chunk c is row bits·c + w (strided).
  Planes layout (`bits` refs [rows/32, bn], one per plane): row c of ref w.
  """
  if packing.is_flat(bits):
    return refs[0][pl.ds(chunk0 * bits + w, n_chunks, stride=bits), :]
  return refs[w][pl.ds(chunk0, n_chunks), :]


def slot_values(planes: list[jax.Array], bits: int, v: int) -> jax.Array:
  """Codes of slot v (static) from the word planes of the same chunk rows -> uint32."""
  word, shift = divmod(bits * v, 32)
  val = planes[word] >> jnp.uint32(shift) if shift else planes[word]
  if shift > 32 - bits:  # the value continues in the low bits of the next word
    val = val | (planes[word + 1] << jnp.uint32(32 - shift))
  return val & jnp.uint32(2**bits - 1)


def dynamic_slot_values(planes: list[jax.Array], bits: int, slot: jax.Array) -> jax.Array:
  """Codes of slots `slot` (int32, any shape broadcasting against the planes) -> uint32.

  planes[w] holds word w of the chunk rows; the word and shift of each slot are selected
  arithmetically, so the slot may differ per element (no gather).
  """
  pos = slot.astype(jnp.uint32) * jnp.uint32(bits)
  word, shift = pos >> jnp.uint32(5), pos & jnp.uint32(31)
  base = planes[0]
  nxt = jnp.zeros_like(planes[0])
  for w in range(1, bits):
    base = jnp.where(word == w, planes[w], base)
    nxt = jnp.where(word + 1 == w, planes[w], nxt)
  straddles = shift > jnp.uint32(32 - bits)
  # shift-left amount is 32 − shift only where the value straddles (never a 32-bit shift)
  carry = jnp.where(straddles, jnp.uint32(32) - shift, jnp.uint32(0))
  high = jnp.where(straddles, nxt << carry, jnp.uint32(0))
  return ((base >> shift) | high) & jnp.uint32(2**bits - 1)


def natural_codes(refs, bits: int, t, bk: int) -> jax.Array:
  """Codes of tile t in natural row order -> f32 [bk, bn]."""
  if packing.is_flat(bits):
    per_word = 32 // bits
    words = refs[0][pl.ds(t * (bk * bits // 32), bk * bits // 32), :]  # [bk·bits/32, bn]
    shifts = jax.lax.broadcasted_iota(jnp.uint32, (1, per_word, 1), 1) * jnp.uint32(bits)
    # [words, 1, bn] >> [1, per_word, 1] -> [words, per_word, bn] -> [bk, bn]
    values = (words[:, None, :] >> shifts) & jnp.uint32(2**bits - 1)
    return values.reshape(bk, words.shape[1]).astype(F32)
  kw = bk // 32
  planes = [load_plane(refs, bits, w, t * kw, kw)[:, None, :] for w in range(bits)]
  slots = jax.lax.broadcasted_iota(jnp.int32, (1, 32, 1), 1)
  values = dynamic_slot_values(planes, bits, slots)  # [kw, 32, bn]
  # [kw, 32, bn] -> [bk, bn]: row 32c + v
  return values.reshape(bk, values.shape[2]).astype(F32)


def expand_columns(a: jax.Array, qq: int) -> jax.Array:
  """[n, bn/qq] -> [n, bn]: each second-level value covers qq consecutive output channels."""
  n, m = a.shape
  # [n, m] -> [n, m, qq] -> [n, m·qq]
  return jnp.broadcast_to(a[:, :, None], (n, m, qq)).reshape(n, m * qq)


def expand_rows(a: jax.Array, repeat: int) -> jax.Array:
  """[n, w] -> [n·repeat, w], each row repeated `repeat` times."""
  if repeat == 1:
    return a
  n, w = a.shape
  # [n, w] -> [n, repeat, w] -> [n·repeat, w]
  return jnp.broadcast_to(a[:, None, :], (n, repeat, w)).reshape(n * repeat, w)


def stat_values(refs, spec, row0, n_rows: int, stride: int) -> jax.Array:
  """First-level statistic rows row0 + stride·i (i < n_rows) -> f32 [n_rows, bn].

  "float": refs = [stat [rows, bn]]. "qq": refs = code refs (1 flat or `bits` planes), then
  second-level scale and zero [n_groups_pad, bn/qq]; the rows must lie in one 32-row chunk of
  the statistic codes (guaranteed by bk ≤ 32·G in the plan).
  """
  rows = pl.ds(row0, n_rows, stride=stride) if stride > 1 else pl.ds(row0, n_rows)
  if spec.kind == "float":
    return refs[0][rows, :].astype(F32)
  n_code = 1 if packing.is_flat(spec.bits) else spec.bits
  code_refs, qs_ref, qz_ref = refs[:n_code], refs[n_code], refs[n_code + 1]
  chunk = row0 // 32
  planes = [load_plane(code_refs, spec.bits, w, chunk, 1) for w in range(spec.bits)]  # [1, bn]
  slot = row0 - 32 * chunk + stride * jax.lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)
  codes = dynamic_slot_values(planes, spec.bits, slot).astype(F32)  # [n_rows, bn]
  qs = expand_columns(qs_ref[rows, :].astype(F32), spec.qq)
  qz = expand_columns(qz_ref[rows, :].astype(F32), spec.qq)
  return qs * (codes - qz)


def tile_rows(t, bk: int, g: int):
  """(first statistic row, number of rows) covering tile t's bk weight rows."""
  if g <= bk:
    return t * (bk // g), bk // g
  return t // (g // bk), 1


def natural_stat(refs, spec, t, bk: int) -> jax.Array:
  """Statistic of tile t per weight row: f32 [bk, bn], or [1, bn] when one row covers it."""
  row0, n_rows = tile_rows(t, bk, spec.g)
  values = stat_values(refs, spec, row0, n_rows, 1)
  return values if n_rows == 1 else expand_rows(values, spec.g)


def class_count(spec) -> int:
  return 32 // spec.g if spec.g < 32 else 1


def slot_class(spec, v: int) -> int:
  return v // spec.g if spec.g < 32 else 0


def class_stat(refs, spec, t, bk: int, h: int) -> jax.Array:
  """Statistic of class h for the tile's kw chunk rows -> f32 [kw, bn]."""
  kw = bk // 32
  if spec.g < 32:  # chunk row c, class h: statistic row (t·bk + 32c + h·g) / g
    return stat_values(refs, spec, t * (bk // spec.g) + h, kw, 32 // spec.g)
  row0, n_rows = tile_rows(t, bk, spec.g)
  return expand_rows(stat_values(refs, spec, row0, n_rows, 1), kw // n_rows)
