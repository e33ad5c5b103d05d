"""Where the arrays of a mesh run live (`RunConfig.mesh`), on one host or many.

    mesh = run_mesh(run.mesh)                  # [data, model] over jax.devices() (all hosts)
    x, valid = shard_rows(ids[start:stop], mesh)  # rows over "data", padded to a multiple
    layer = replicate(layer_params, mesh)      # every device holds the block
    layer = shard_block(layer_params, mesh)    # or: linear weights' rows over "model"
    H = local_copy(H)                          # this process's copy of a replicated result

Calibration batches are split over "data" on their first (batch) axis; a batch whose rows do
not divide the data size is padded with zero rows (token id 0) up to the next multiple, and
`valid` says how many rows are real: the Hessian capture masks the padded rows out
(`row_mask`), so they add exactly 0 to H and nothing to its sequence count.

With `mesh.shard_weights`, a block's linear weights [d_out, d_in] are split over "model" on
their output rows for its programs (`shard_block`): no dot's contraction (d_in) is split, so
each output is summed as on one device; XLA's partitioner gathers what the next op needs.

On several processes (`jax.distributed`), every process holds the same host arrays (the same
calibration windows and params); `shard_rows` and `replicate` build each global array from
this process's part only (`jax.make_array_from_callback` calls back for its own devices, so a
process reads only its rows of a batch). Solves run on this process's devices of the "model"
axis (`solve_devices`), so each process ends with the whole quantized block.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cdquant_jax import config as config_lib
from cdquant_jax.distributed.mesh import MeshConfig, make_mesh


def run_mesh(cfg: MeshConfig | None) -> jax.sharding.Mesh | None:
  """The run's mesh over every device of every process (None without a mesh section).

  Raises ConfigError when it does not fit the devices, or, on several processes, when a data
  row of the mesh (the devices of one solve) would span processes.
  """
  if cfg is None:
    return None
  mesh = make_mesh(cfg)
  if jax.process_count() > 1:
    local = jax.local_device_count()
    config_lib.reject_unless(local % cfg.model == 0,
                             f"mesh.model={cfg.model} must divide this process's {local} "
                             "local devices (a solve runs within one process)")
  return mesh


def check_run_mesh(cfg: MeshConfig | None) -> None:
  """ConfigError, before any work, for a mesh this machine (or process group) cannot hold."""
  run_mesh(cfg)


def rows_spec(ndim: int) -> P:
  """PartitionSpec of an array [rows, ...] split over "data" on its first axis."""
  return P("data", *([None] * (ndim - 1)))


def rows_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """The sharding of an array [rows, ...] split over "data" on its first axis (whole over
  "model")."""
  return NamedSharding(mesh, rows_spec(ndim))


def padded_rows(rows: int, mesh: jax.sharding.Mesh) -> int:
  """rows rounded up to a multiple of the mesh's data size."""
  data = mesh.shape["data"]
  return -(-rows // data) * data


def shard_rows(x: np.ndarray, mesh: jax.sharding.Mesh) -> tuple[jax.Array, int]:
  """(x [rows_padded, ...] with rows over "data", rows): x [rows, ...] (a host array, the same
  on every process) padded with zero rows to `padded_rows`."""
  x = np.asarray(x)
  rows = x.shape[0]
  pad = padded_rows(rows, mesh) - rows
  if pad:
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
  sharding = rows_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), rows


def row_mask(rows: int, valid: int, mesh: jax.sharding.Mesh) -> jax.Array | None:
  """f32 [rows] over "data": 1 for the first `valid` rows, 0 for padding; None when every row
  is real (the program is then the unmasked one)."""
  if valid == rows:
    return None
  mask = (np.arange(rows) < valid).astype(np.float32)
  return jax.make_array_from_callback(mask.shape, NamedSharding(mesh, P("data")),
                                      lambda index: mask[index])


def _placed(leaf: Any, sharding: NamedSharding) -> jax.Array:
  """leaf (a host, one-device or fully replicated array, the same on every process) as a
  global array with `sharding` (kept when it already has it)."""
  if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
    return leaf
  if jax.process_count() == 1:
    return jax.device_put(leaf, sharding)
  host = np.asarray(leaf)  # a local (or fully replicated) array: the same on every process
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of an array held whole by every device of the mesh."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """tree with every array leaf on every device of the mesh (leaves already so are kept)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda leaf: _placed(leaf, sharding), tree)


def _splits_rows(path: tuple, leaf: Any, model: int) -> bool:
  """Whether leaf is a linear weight [d_out, d_in] (a 2-D "weight") with d_out % model == 0."""
  last = path[-1] if path else None
  return (getattr(last, "key", None) == "weight" and np.ndim(leaf) == 2
          and np.shape(leaf)[0] % model == 0)


def shard_block(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """A block's params on the mesh: each linear weight [d_out, d_in] whose d_out divides by the
  "model" size split over "model" on its rows (every device holds d_out / model of them,
  replicated over "data"); every other leaf replicated. Leaves already so placed are kept."""
  model = mesh.shape["model"]
  rows = NamedSharding(mesh, P("model", None))
  whole = replicated(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _placed(leaf, rows if _splits_rows(path, leaf, model) else whole),
      tree)


def local_copy(x: jax.Array) -> jax.Array:
  """This process's first copy of a replicated array (a one-device array); others as they
  are."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return x
  assert x.is_fully_replicated, f"local_copy of a sharded array {x.sharding}"
  return x.addressable_data(0)


def solve_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  """The "model"-axis devices of the first data row held entirely by this process."""
  here = jax.process_index()
  for row in mesh.devices:
    if all(d.process_index == here for d in row):
      return list(row)
  raise config_lib.ConfigError(f"mesh {dict(mesh.shape)}: no data row lies on process {here}")
