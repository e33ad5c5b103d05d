"""Jitted block forwards over the calibration set: linear inputs (for Hessians) and block outputs.

All blocks of a model have the same parameter shapes, and a block's computation depends on its
index only through `config.layer_types[i]` (rope / sliding window), so each block runs with
the first layer index of its kind (`kind_index`): one compilation per kind, not per block.
Capturing only the inputs of one true-sequential group lets XLA drop the rest of the block
(the attention-input group costs one norm), and the Hessians are accumulated inside the same
jitted program (`_capture_step`: no [B, T, d_in] inputs leave it unless kept, no host sync per
batch).

On a mesh (`RunConfig.mesh`, `distributed.placement`), every batch is a global array split
over "data" on its batch axis and padded to a multiple of the data size; the block params are
replicated for each program, XLA partitions the jitted forwards over the batch and adds the
per-device partial sums X_dᵀ X_d of each Hessian with an all-reduce, and padded rows are masked
out of the sums (`_accumulate`). H equals the one-device H up to f32 summation order.
With `mesh.shard_weights` (`Activations.shard_weights`), the block's linear weights are split
over "model" on their output rows instead (`placement.shard_block`), and the programs pin
their results: Hessian states replicated, block outputs (and kept inputs) rows over "data"
and whole over "model" (`_whole`, `_rows`), as the replicated-weights programs leave them.

Kept inputs (`LinearInputs`): the inputs a group captured stay valid for the rest of the block
(later groups only change linears downstream of them), so later captures and the propagation
take them as `given` inputs and XLA drops the work that produced them (attention for the MLP
groups, everything but o_proj and down_proj in the propagation for Llama).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import weakref
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.distributed import placement
from cdquant_jax.models.base import CausalLM, default_positions
from cdquant_jax.models.params import get_path
from cdquant_jax.solvers import hessian

Path = tuple[str, ...]
Params = dict[str, Any]


def kind_index(model: CausalLM, layer_index: int) -> int:
  """The first layer with the same layer type as `layer_index` (same compiled block)."""
  types = model.config.layer_types
  return types.index(types[layer_index])


def _accumulate(state: hessian.HessianState, x: jax.Array, mask: jax.Array | None
                ) -> tuple[hessian.HessianState, jax.Array]:
  """`hessian.accumulate_batch` of x [B, T, d_in], counting only the rows where mask [B] is 1
  (None: every row). Masked rows are set to exact zeros, so they add 0 to Σ x xᵀ, and the
  running mean's n grows by the number of real rows, as for the unpadded batch."""
  if mask is None:
    return hessian.accumulate_batch(state, x)
  keep = (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1))
  return hessian.accumulate_batch(state, jnp.where(keep, x, 0), rows=jnp.sum(mask))


def _whole(tree: Any, pin: jax.sharding.Mesh | None) -> Any:
  """tree (in a jitted program) held whole by every device of mesh `pin` (None: unchanged)."""
  return tree if pin is None else jax.lax.with_sharding_constraint(
      tree, placement.replicated(pin))


def _rows(x: jax.Array, pin: jax.sharding.Mesh | None) -> jax.Array:
  """x [B, ...] (in a jitted program) split over "data" on B and whole over "model" of mesh
  `pin` (None: unchanged)."""
  return x if pin is None else jax.lax.with_sharding_constraint(
      x, placement.rows_sharding(pin, x.ndim))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 7), static_argnames=("pin",),
                   donate_argnums=(6,))
def _capture_step(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int,
                  paths: tuple[Path, ...], given: dict[Path, jax.Array] | None,
                  states: tuple[hessian.HessianState, ...], return_inputs: bool,
                  mask: jax.Array | None = None, *, pin: jax.sharding.Mesh | None = None):
  """One batch h [B, T, D] of block `layer_index`: the Hessian states of `paths` updated with
  their inputs (the `given` ones used as they are; rows where mask [B] is 0 left out), whether
  those were all finite (bool scalar), and the inputs [B, T, d_in] themselves when
  `return_inputs` (else ()). pin: the mesh of sharded weights (states come out replicated,
  inputs rows over "data"), or None."""
  _, _, inputs = model.block(layer_params, h, default_positions(h[..., 0]), layer_index,
                             capture=True, given=given)
  xs = tuple(_rows(inputs[p], pin) for p in paths)
  updated = [_accumulate(state, x, mask) for state, x in zip(states, xs)]
  finite = jnp.all(jnp.stack([ok for _, ok in updated]))
  states = _whole(tuple(state for state, _ in updated), pin)
  return states, finite, (xs if return_inputs else ())


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames=("pin",))
def _forward(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int,
             given: dict[Path, jax.Array] | None = None, *,
             pin: jax.sharding.Mesh | None = None) -> jax.Array:
  """Block output [B, T, D] for input h [B, T, D] (linears in `given` run on those inputs);
  pin: the mesh of sharded weights (the output is pinned to rows over "data"), or None."""
  return _rows(model.block(layer_params, h, default_positions(h[..., 0]), layer_index,
                           given=given)[0], pin)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(model: CausalLM, params: Params, ids: jax.Array) -> jax.Array:
  return model.embed(params, ids, default_positions(ids))


def shared_input_classes(model: CausalLM, layer_params: Params, h_shape, dtype,
                         layer_index: int) -> list[list[Path]]:
  """Linear paths grouped by identical input (e.g. [[k, v, q], [o], [up, gate], [down]]).

  Found by tracing the block once (no compute): linears called on the same traced array share
  a Hessian, so it is accumulated once per class.
  """
  classes: list[list[Path]] = []

  def trace(lp, h):
    _, _, inputs = model.block(lp, h, default_positions(h[..., 0]), layer_index, capture=True)
    by_id: dict[int, list[Path]] = {}
    for path, x in inputs.items():
      by_id.setdefault(id(x), []).append(path)
    classes.extend(by_id.values())
    return h

  jax.eval_shape(trace, layer_params, jax.ShapeDtypeStruct(h_shape, dtype))
  return classes


@dataclasses.dataclass(frozen=True)
class Storage:
  """Where calibration activations (and kept linear inputs) live between block programs.

  where: "device" (accelerator memory), "host" (numpy in RAM) or "disk" (one .npy file per
    batch in a temporary folder under `directory`, read back memory-mapped one batch at a time
    and removed with its container).
  dtype: the stored dtype (None: as the block produced it, the model dtype). Each batch is cast
    back to the dtype it was produced in when read, so the blocks run, and the Hessians
    accumulate (f32), exactly as without it, on rounded inputs.
  """

  where: str = "device"
  dtype: str | None = None
  directory: str | None = None

  @classmethod
  def of(cls, storage: "Storage | bool") -> "Storage":
    """A Storage from itself or from the older `on_host` flag."""
    return storage if isinstance(storage, Storage) else cls("host" if storage else "device")

  def put(self, x: jax.Array, folder: "_Folder") -> Any:
    """x stored (cast to `dtype`): a device array, a numpy array or a `_DiskArray`."""
    if self.dtype is not None and x.dtype != jnp.dtype(self.dtype):
      x = jnp.asarray(x).astype(self.dtype)
    if self.where == "device":
      return x
    if self.where == "host":
      return np.asarray(x)
    return folder.save(np.asarray(x))

  @staticmethod
  def get(stored: Any, dtype) -> jax.Array:
    """A stored batch on the device in `dtype` (the dtype it was produced in)."""
    if isinstance(stored, _DiskArray):
      stored = stored.load()
    return jnp.asarray(stored).astype(dtype)


@dataclasses.dataclass(frozen=True)
class _DiskArray:
  """A batch saved as an .npy file (shape and dtype kept for the byte counts)."""

  path: str
  shape: tuple[int, ...]
  dtype: np.dtype

  def load(self) -> np.ndarray:
    """The batch, memory-mapped (its pages are mapped only until the copy to the device)."""
    # .npy stores bfloat16 as raw 2-byte voids: viewed as the saved dtype again.
    return np.asarray(np.load(self.path, mmap_mode="r")).view(self.dtype)


class _Folder:
  """A temporary folder (made on the first save) for one container's .npy batches, removed
  when the folder object is dropped with its container."""

  def __init__(self, parent: str | None):
    self._parent, self._path, self._count = parent, None, 0

  def save(self, a: np.ndarray) -> _DiskArray:
    if self._path is None:
      if self._parent:
        os.makedirs(self._parent, exist_ok=True)
      self._path = tempfile.mkdtemp(prefix="activations_", dir=self._parent)
      weakref.finalize(self, shutil.rmtree, self._path, True)
    path = os.path.join(self._path, f"{self._count:05d}.npy")
    self._count += 1
    np.save(path, a)
    return _DiskArray(path, tuple(a.shape), a.dtype)


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


class Activations:
  """The calibration activations between blocks, [N, T, D], as batches kept where `storage`
  says (a `Storage`, or True / False for host / device).

  On a mesh (`mesh` set), each batch is a global array [B_padded, T, D] split over "data"
  (`placement.shard_rows`) and `valid[b]` is the number of its real rows (the rest padding);
  `shard_weights` (`MeshConfig.shard_weights`): the blocks run on them with their linear
  weights split over "model" (`placement.shard_block`) instead of replicated.
  """

  def __init__(self, storage: "Storage | bool" = False, mesh: jax.sharding.Mesh | None = None,
               shard_weights: bool = False):
    self.storage = Storage.of(storage)
    self.mesh = mesh
    self.shard_weights = bool(shard_weights and mesh is not None)
    self.batches: list[Any] = []
    self.valid: list[int] = []
    self.compute_dtype = None  # the dtype the batches were produced in
    self._folder = _Folder(self.storage.directory)

  @property
  def on_host(self) -> bool:
    return self.storage.where != "device"

  def append(self, h: jax.Array, valid: int | None = None) -> None:
    """Adds batch h [B, T, D] of which the first `valid` rows are real (None: all)."""
    self.compute_dtype = self.compute_dtype or h.dtype
    self.batches.append(self.storage.put(h, self._folder))
    self.valid.append(h.shape[0] if valid is None else valid)

  def __iter__(self) -> Iterator[jax.Array]:
    for h in self.batches:
      yield Storage.get(h, self.compute_dtype)

  def masks(self) -> Iterator[jax.Array | None]:
    """Per batch, the f32 [B] mask of its real rows on the mesh, or None (all rows real)."""
    for h, valid in zip(self.batches, self.valid):
      yield None if self.mesh is None else placement.row_mask(h.shape[0], valid, self.mesh)

  @property
  def pin(self) -> jax.sharding.Mesh | None:
    """The mesh the block programs pin their results to (sharded weights), or None."""
    return self.mesh if self.shard_weights else None

  @classmethod
  def from_array(cls, array: np.ndarray, batch: int, storage: "Storage | bool",
                 mesh: jax.sharding.Mesh | None = None, compute_dtype=None, *,
                 shard_weights: bool = False) -> "Activations":
    """array [N, T, D] in batches of `batch` rows (split over the mesh's "data" when given),
    produced in `compute_dtype` (default: array's; saved activations are in the stored dtype,
    which may be narrower: each batch is cast back, exactly, as when it was first stored)."""
    out = cls(storage, mesh, shard_weights)
    for start in range(0, array.shape[0], batch):
      rows = array[start:start + batch]
      out.append(*_placed(rows if compute_dtype is None else rows.astype(compute_dtype), mesh))
    return out

  def like(self) -> "Activations":
    """An empty container with the same storage, mesh and weight placement."""
    return Activations(self.storage, self.mesh, self.shard_weights)

  def nbytes(self) -> int:
    """Bytes of the stored batches, wherever they are."""
    return sum(_nbytes(h) for h in self.batches)

  def resident_nbytes(self) -> int:
    """Bytes of the batches held in memory (host or device; 0 on disk)."""
    return 0 if self.storage.where == "disk" else self.nbytes()


def _placed(rows: np.ndarray, mesh: jax.sharding.Mesh | None) -> tuple[jax.Array, int]:
  """(rows on the device, or split over the mesh's "data" and padded; the real row count)."""
  if mesh is None:
    return jnp.asarray(rows), rows.shape[0]
  return placement.shard_rows(rows, mesh)


def embed_calibration(model: CausalLM, params: Params, ids: np.ndarray, batch: int,
                      on_host: "Storage | bool", mesh: jax.sharding.Mesh | None = None, *,
                      shard_weights: bool = False) -> Activations:
  """Embeddings of the calibration windows ids [N, T], in batches of `batch` windows, stored
  as `on_host` says (a `Storage`, or True / False for host / device). With a mesh, each batch
  of ids is split over "data" (each process supplies its rows) and embedded there (the
  embeddings replicated; `shard_weights` applies to the blocks run on the result)."""
  out = Activations(on_host, mesh, shard_weights)
  if mesh is not None:
    params = placement.replicate(params, mesh)
  for start in range(0, ids.shape[0], batch):
    x, valid = _placed(np.asarray(ids[start:start + batch]), mesh)
    out.append(_embed(model, params, x), valid)
  return out


class LinearInputs:
  """Captured inputs of one block's linears, per calibration batch: path -> [B, T, d_in].

  Stored like the activations (`Storage`: device, host or disk, in its dtype). Memory: about
  Σ d_in / D times the activations for every kept input class (≈ 5x for Llama blocks).
  """

  def __init__(self, n_batches: int, storage: "Storage | bool"):
    self.storage = Storage.of(storage)
    self.batches: list[dict[Path, Any]] = [{} for _ in range(n_batches)]
    self._dtypes: dict[Path, Any] = {}
    self._folder = _Folder(self.storage.directory)

  @property
  def on_host(self) -> bool:
    return self.storage.where != "device"

  def add(self, b: int, inputs: dict[Path, jax.Array]) -> None:
    """Keeps batch b's inputs; one array given under several paths (q/k/v) is stored once."""
    stored: dict[int, Any] = {}
    for p, x in inputs.items():
      self._dtypes.setdefault(p, x.dtype)
      if id(x) not in stored:
        stored[id(x)] = self.storage.put(x, self._folder)
      self.batches[b][p] = stored[id(x)]

  def given(self, b: int) -> dict[Path, jax.Array] | None:
    """The kept inputs of batch b (None when there are none: the plain block)."""
    return {p: Storage.get(x, self._dtypes[p]) for p, x in self.batches[b].items()} or None

  def nbytes(self) -> int:
    """Bytes of the stored inputs (an input kept under several paths counted once)."""
    return sum(_nbytes(x) for batch in self.batches
               for x in {id(x): x for x in batch.values()}.values())

  def resident_nbytes(self) -> int:
    """Bytes of the inputs held in memory (host or device; 0 on disk)."""
    return 0 if self.storage.where == "disk" else self.nbytes()


def _on_mesh(layer_params: Params, acts: Activations) -> Params:
  """The block params where the activations' programs run: on their mesh, replicated, or
  with the linear weights' rows split over "model" (`acts.shard_weights`)."""
  if acts.mesh is None:
    return layer_params
  if acts.shard_weights:
    return placement.shard_block(layer_params, acts.mesh)
  return placement.replicate(layer_params, acts.mesh)


def block_outputs(model: CausalLM, layer_params: Params, acts: Activations, layer_index: int,
                  kept: LinearInputs | None = None) -> Activations:
  """Runs block `layer_index` over every batch of `acts` (on the `kept` inputs, if any)."""
  out = acts.like()
  k = kind_index(model, layer_index)
  layer_params = _on_mesh(layer_params, acts)
  for b, h in enumerate(acts):
    out.append(_forward(model, layer_params, h, k, None if kept is None else kept.given(b),
                        pin=acts.pin), acts.valid[b])
  if out.batches:
    jax.block_until_ready(out.batches[-1])
  return out


def _input_width(layer_params: Params, path: Path) -> int:
  return get_path(layer_params, path)["weight"].shape[-1]


def group_hessians(model: CausalLM, layer_params: Params, acts: Activations, layer_index: int,
                   representatives: dict[Path, str], *, kept: LinearInputs | None = None,
                   sharing: dict[Path, list[Path]] | None = None) -> dict[Path, jax.Array]:
  """H [d_in, d_in] (GPTQ running mean, f32 HIGHEST) of each representative linear's input.

  Args:
    representatives: path -> module name (for error messages); one entry per distinct input.
    kept: inputs captured by earlier groups of this block: used instead of recomputing them,
      and this group's inputs are added to it, under every path of `sharing[rep]` (default:
      the representative alone).
  Raises:
    HessianError: NaN/Inf in a captured input (checked once, after the last batch).
  """
  paths = tuple(representatives)
  k = kind_index(model, layer_index)
  states = tuple(hessian.HessianState.zeros(_input_width(layer_params, p)) for p in paths)
  if acts.mesh is not None:
    states = placement.replicate(states, acts.mesh)
  layer_params = _on_mesh(layer_params, acts)
  flags = []
  for b, (h, mask) in enumerate(zip(acts, acts.masks())):
    given = None if kept is None else kept.given(b)
    states, finite, xs = _capture_step(model, layer_params, h, k, paths, given, states,
                                       kept is not None, mask, pin=acts.pin)
    flags.append(finite)
    if kept is not None:
      sharing = sharing or {}
      kept.add(b, {q: x for p, x in zip(paths, xs) for q in sharing.get(p, [p])})
  bad = [b for b, ok in enumerate(jax.device_get(flags)) if not ok]
  if bad:
    _raise_non_finite(model, layer_params, acts, k, representatives, bad[0], kept)
  # On a mesh H is replicated (all-reduced); the solves take this process's copy.
  return {path: placement.local_copy(state.H) for path, state in zip(paths, states)}


def _raise_non_finite(model, layer_params, acts, k, representatives, b, kept) -> None:
  """Raises the HessianError of batch b (the first with NaN/Inf inputs), naming the linear."""
  h = list(acts)[b]
  _, _, inputs = model.block(layer_params, h, default_positions(h[..., 0]), k, capture=True,
                             given=None if kept is None else kept.given(b))
  for path, name in representatives.items():
    x = inputs[path]
    bad = int(jnp.sum(~jnp.isfinite(x)))
    if bad:
      raise hessian.HessianError(f"layer {name}: {bad} NaN/Inf values in the calibration "
                                 f"activations of shape {tuple(x.shape)}")


@functools.partial(jax.jit, static_argnums=(0,))
def _head(model: CausalLM, params: Params, h: jax.Array) -> jax.Array:
  return model.head(params, h)


# Tokens whose logits the evaluation head computes at once: [HEAD_CHUNK_TOKENS, V] f32 (25 MiB
# for SmolLM2's V = 49152) instead of the batch's [B, T, V] (1.6 GB for 16 x 512 tokens).
HEAD_CHUNK_TOKENS = 128


@functools.partial(jax.jit, static_argnums=(0,))
def _head_nll(model: CausalLM, params: Params, h: jax.Array, ids: jax.Array) -> jax.Array:
  """[B] summed next-token NLL of each window from the last block's output h [B, T, D]: the
  head and `window_nll` on HEAD_CHUNK_TOKENS tokens at a time (`lax.map`), so at most
  [HEAD_CHUNK_TOKENS, V] logits exist at once (the per-token terms are those of `window_nll`
  on the whole batch)."""
  B, T, D = h.shape
  n = B * T
  chunks = -(-n // HEAD_CHUNK_TOKENS)
  pad = chunks * HEAD_CHUNK_TOKENS - n
  # Each position's target is the next token of its window; the last position has none
  # (target 0, masked out below). [B, T] -> [B * T + pad]
  targets = jnp.pad(jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
                    .reshape(n), (0, pad))
  # [B, T, D] -> [B * T + pad, D] -> [chunks, HEAD_CHUNK_TOKENS, D]
  xs = jnp.pad(h.reshape(n, D), ((0, pad), (0, 0))).reshape(chunks, HEAD_CHUNK_TOKENS, D)

  def chunk_nll(args):
    x, t = args
    # [1, HEAD_CHUNK_TOKENS, V] -> [HEAD_CHUNK_TOKENS, V] f32
    logits = model.head(params, x[None])[0].astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit

  per_token = jax.lax.map(chunk_nll, (xs, targets.reshape(chunks, HEAD_CHUNK_TOKENS)))
  # [chunks, HEAD_CHUNK_TOKENS] -> [B, T]; the last position of each window has no target.
  per_token = per_token.reshape(-1)[:n].reshape(B, T)
  return jnp.sum(per_token[:, :-1], axis=-1)


def _outer(params: Params) -> Params:
  """The params outside the blocks (embeddings, final norm, lm_head): all embed / head use, so
  a jitted call does not take (nor, for host arrays, copy) every block's params with them."""
  return {k: v for k, v in params.items() if k != "layers"}


def _blocks(model: CausalLM, params: Params, ids) -> jax.Array:
  """The last block's output [B, T, D] for ids [B, T]; params may stay on the host (each block
  is then moved to the device for its call and freed after it)."""
  h = _embed(model, _outer(params), jnp.asarray(ids))
  for i in range(model.num_layers):
    h = _forward(model, model.layer_params(params, i), h, kind_index(model, i))
  return h


def block_logits_fn(model: CausalLM, params: Params):
  """ids [B, T] -> logits [B, T, V], block by block with the same jitted blocks as the pipeline
  (so the in-memory and the reloaded quantized model give identical numbers)."""
  return lambda ids: _head(model, _outer(params), _blocks(model, params, ids))


def block_nll_fn(model: CausalLM, params: Params):
  """ids [B, T] -> [B] summed window NLLs (`window_nll`), with the blocks of
  `block_logits_fn` and the head fused with the loss."""
  return lambda ids: _head_nll(model, _outer(params), _blocks(model, params, ids),
                               jnp.asarray(ids))
