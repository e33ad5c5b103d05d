"""Layer Hessians from calibration inputs sharded over the mesh (the pipeline's convention).

    H = (2 / n) Σ_tokens x xᵀ   (f32, HIGHEST), n = number of SEQUENCES, as `solvers.hessian`.

The batch axis of X [N, T, d_in] is split over "data"; each device forms its partial sum
X_dᵀ X_d (tokens flattened) for the columns of H it owns on "model" (column block j of
d_in / model columns, so a 1 x 4 mesh splits the work, not only a 4 x 1 one), the partial sums
are added across "data" with `psum`, and the result is H sharded by columns over "model".

Uneven batches are PADDED with zero sequences up to a multiple of the data size: a zero row
adds exactly 0 to every sum, and n counts only the real sequences, so padding changes nothing.
d_in is padded with zero features to a multiple of the model size in the same way and the
padding is cut off H.

Equal to the one-device H up to f32 summation order: the pipeline (`hessian.accumulate_batch`)
scales every batch by sqrt(2 / n) and keeps a running mean; here the raw sums are added and
scaled by 2 / n once at the end.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cdquant_jax._numerics import hdot
from cdquant_jax.solvers import padding


def _pad_to(x: jax.Array, data: int, model: int) -> jax.Array:
  """x [N, ..., d_in] with zero sequences and features up to multiples of data and model."""
  x = padding.pad_axis(x, padding.round_up(x.shape[-1], model), axis=x.ndim - 1)
  pad_n = padding.round_up(x.shape[0], data) - x.shape[0]
  return jnp.pad(x, [(0, pad_n)] + [(0, 0)] * (x.ndim - 1)) if pad_n else x


def _local_sum(x: jax.Array) -> jax.Array:
  """One device's share: [d_in, d_in / model] columns of Σ x xᵀ over its sequences x
  [n_local, ..., d_in], summed over "data"."""
  d_in = x.shape[-1]
  width = d_in // jax.lax.axis_size("model")
  # [n_local, ..., d_in] -> [tokens, d_in]
  tokens = x.reshape(-1, d_in).astype(jnp.float32)
  cols = jax.lax.dynamic_slice_in_dim(tokens, jax.lax.axis_index("model") * width, width, 1)
  return jax.lax.psum(hdot(tokens.T, cols), "data")


@functools.lru_cache(maxsize=None)
def _sum_program(mesh: jax.sharding.Mesh, ndim: int):
  """Jitted x [N, ..., d_in] (batch on "data") -> Σ x xᵀ [d_in, d_in] (columns on "model")."""
  spec = P("data", *([None] * (ndim - 1)))
  mapped = jax.shard_map(_local_sum, mesh=mesh, in_specs=(spec,), out_specs=P(None, "model"))
  return jax.jit(mapped)


def shard_batch(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """x [N, ..., d_in] padded (module docstring) and placed with its batch axis over "data"."""
  x = _pad_to(jnp.asarray(x), mesh.shape["data"], mesh.shape["model"])
  spec = P("data", *([None] * (x.ndim - 1)))
  return jax.device_put(x, NamedSharding(mesh, spec))


def sharded_sum(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """Σ_tokens x xᵀ of x [N, T, d_in] (or [N, d_in]), f32 [d_in_padded, d_in_padded]."""
  x = shard_batch(x, mesh)
  return _sum_program(mesh, x.ndim)(x)


def sharded_hessian(X, mesh: jax.sharding.Mesh) -> jax.Array:
  """H [d_in, d_in] f32 = (2 / n) Σ x xᵀ over every token of X.

  Args:
    X: one array [N, T, d_in] (or [N, d_in]), or an iterable of such batches (the pipeline's
      `Activations`); n = total number of sequences N.
    mesh: a mesh with axes "data" and "model" (`mesh.make_mesh`).
  Returns:
    H, sharded by columns over "model" (replicated over "data").
  """
  batches = [X] if hasattr(X, "shape") else list(X)
  d_in = batches[0].shape[-1]
  total, n = None, 0
  for x in batches:
    part = sharded_sum(x, mesh)
    total = part if total is None else total + part
    n += x.shape[0]
  return (total * np.float32(2.0 / n))[:d_in, :d_in]

