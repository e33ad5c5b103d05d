"""Padding of solver operands to static sizes (block multiples, chunk multiples).

The column sweeps (GPTQ, SpQR, cyclic CD) run on whole blocks: their weights get extra columns
and their square matrices (U, H) an extra block that couples to nothing. Padding appends at the
end of an axis, so slicing `[..., :n]` undoes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def pad_axis(A: jax.Array, size: int, *, axis: int = 1, fill=0.0) -> jax.Array:
  """A with `fill` appended along `axis` up to `size` entries (A itself when already there)."""
  pad = size - A.shape[axis]
  if pad == 0:
    return A
  widths = [(0, 0)] * A.ndim
  widths[axis] = (0, pad)
  return jnp.pad(A, widths, constant_values=fill)


def pad_square(M: jax.Array, size: int, *, diagonal=0.0) -> jax.Array:
  """[n, n] M in the top-left corner of a [size, size] matrix, zero elsewhere but for `diagonal`
  on the new diagonal entries (1.0: the padded block is an identity, coupled to nothing)."""
  n = M.shape[0]
  if size == n:
    return M
  M = jnp.pad(M, ((0, size - n), (0, size - n)))
  if diagonal == 0.0:
    return M
  new = jnp.arange(n, size)
  return M.at[new, new].set(diagonal)
