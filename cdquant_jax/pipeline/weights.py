"""Where a run's unquantized decoder-block weights live (`RunConfig.weights`).

"host": `registry.load_model` converts every tensor once and the params stay in host memory
  (W = every parameter in the run dtype); each block is moved to the device for its programs.
"disk": `load_model` here converts only the outer params (embeddings, final norm, lm_head);
  params["layers"] is a `LazyLayers`, a read-only sequence whose item i is block i's params
  read from the checkpoint file (safetensors slices, GGUF tensors dequantized) and converted
  to the run dtype one tensor at a time, each time it is indexed: the file on disk is the
  store, no second copy is written. The pipeline indexes one block at a time (quantization,
  propagation, every evaluation batch) and drops it after. A quantized block is kept as its
  packed weights (`QuantizedWeight`, dequantized on access exactly as the run wrote them back)
  plus the few leaves that differ from the checkpoint (tuned norms); the rest is read again.

Both give the same arrays bit for bit (the same conversion of the same tensors), so a run's
quantized model, objectives and perplexities do not depend on the setting.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import operator
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax.models import registry
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.params import flat_paths, insert_path
from cdquant_jax.pipeline import checkpoint, export, memory
from cdquant_jax.quant.qweight import QuantizedWeight

Params = dict[str, Any]
Path = tuple[Any, ...]


class BlockReader:
  """Reads a checkpoint's tensors by block: `outer()` the params outside the blocks, `block(i)`
  block i's, each tensor converted to `dtype` like `hf_loader.params_from_state_dict` does.

  Names are checked against `model.param_shapes()` when the reader is made (a missing or
  unexpected tensor is a ModelLoadError naming it); shapes when a tensor is read.
  """

  def __init__(self, model, tensors: Mapping[str, np.ndarray], dtype, source: str):
    self.model, self.dtype, self.source = model, dtype, source
    self._tensors = tensors
    self._shapes = {path: leaf.shape
                    for path, leaf in flat_paths(model.param_shapes(dtype)).items()}
    self._outer: dict[Path, str] = {}
    self._blocks: list[dict[Path, str]] = [{} for _ in range(model.num_layers)]
    unexpected = []
    for name in tensors:
      path = model.hf_name_to_path(name)
      if path is None:
        continue
      if path not in self._shapes:
        unexpected.append(name)
      elif path[0] == "layers":
        self._blocks[path[1]][path[2:]] = name
      else:
        self._outer[path] = name
    seen = set(self._outer) | {("layers", i) + p for i, b in enumerate(self._blocks) for p in b}
    missing = sorted(".".join(map(str, p)) for p in set(self._shapes) - seen)
    if unexpected or missing:
      raise ModelLoadError(f"{source}: tensors do not match {model.config.model_type}: "
                           f"unexpected {sorted(unexpected)[:20]}, missing {missing[:20]}")

  @property
  def num_layers(self) -> int:
    return len(self._blocks)

  def _read(self, name: str, path: Path) -> jax.Array:
    """Tensor `name` (params path `path`) read, shape-checked and converted to the run dtype."""
    array = self._tensors[name]
    if tuple(array.shape) != tuple(self._shapes[path]):
      raise ModelLoadError(f"{self.source}: tensor {name} has shape {tuple(array.shape)}, "
                           f"expected {tuple(self._shapes[path])} for "
                           f"{self.model.config.model_type}")
    return jnp.asarray(np.asarray(array), dtype=self.dtype).block_until_ready()

  def outer(self) -> Params:
    """The params outside the blocks (embeddings, final norm, lm_head), converted."""
    out: Params = {}
    for path, name in self._outer.items():
      insert_path(out, path, self._read(name, path))
    return out

  def block(self, i: int, skip: frozenset = frozenset()) -> Params:
    """Block i's params (nested dict, as params["layers"][i] of `registry.load_model`) but the
    leaves whose in-block paths are in `skip`, read now one tensor at a time.

    The memory the blocks read before freed is returned to the OS first (`memory.
    release_freed`): each read allocates a block's size anew, and glibc would keep the freed
    copies (SmolLM2's evaluation batch peaked ~120 MiB higher without it)."""
    memory.release_freed()
    out: Params = {}
    for path, name in self._blocks[i].items():
      if path not in skip:
        insert_path(out, path, self._read(name, ("layers", i) + path))
    return out


@dataclasses.dataclass(frozen=True)
class StoredBlock:
  """What a `LazyLayers` keeps of a block that no longer equals the checkpoint.

  quantized: linear path -> its packed weight (the block's weight there is
    `export.dequantized_weight(qw, dtype)`, as the pipeline writes it back);
  tensors: leaf path -> host array, the other leaves that differ from the checkpoint.
  """

  quantized: dict[Path, QuantizedWeight]
  tensors: dict[Path, np.ndarray]

  def skip(self) -> frozenset:
    """Leaf paths not to read from the checkpoint (given here instead)."""
    return frozenset({p + ("weight",) for p in self.quantized} | set(self.tensors))

  def nbytes(self) -> int:
    return (sum(_tree_nbytes(qw.arrays()) for qw in self.quantized.values())
            + sum(a.nbytes for a in self.tensors.values()))


def _tree_nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class LazyLayers(collections.abc.Sequence):
  """params["layers"] of a "disk" run: item i is block i's params, read when indexed.

  Immutable: `with_block` / `with_stored` return a new sequence sharing the reader. Only
  integer indices (one block at a time; a slice would read several blocks at once).
  """

  def __init__(self, reader: BlockReader, stored: dict[int, StoredBlock] | None = None):
    self.reader = reader
    self._stored = dict(stored or {})

  def __len__(self) -> int:
    return self.reader.num_layers

  def __getitem__(self, i):
    if isinstance(i, slice):
      raise TypeError("LazyLayers: index one block at a time (a slice reads several)")
    i = operator.index(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"block {i} of {len(self)}")
    stored = self._stored.get(i)
    if stored is None:
      return self.reader.block(i)
    layer = self.reader.block(i, stored.skip())  # a new dict: filled in place
    for path, qw in stored.quantized.items():
      insert_path(layer, path + ("weight",), export.dequantized_weight(qw, self.reader.dtype))
    for path, a in stored.tensors.items():
      insert_path(layer, path, a)
    return layer

  def unquantized(self, i: int) -> Params:
    """Block i without the weights of its quantized linears (what an export writes)."""
    stored = self._stored.get(i, StoredBlock({}, {}))
    layer = self.reader.block(i, stored.skip())
    for path, a in stored.tensors.items():
      insert_path(layer, path, a)
    return layer

  def with_block(self, i: int, layer_params: Params,
                 quantized: dict[Path, QuantizedWeight]) -> "LazyLayers":
    """This sequence with block i replaced by `layer_params`, whose weight at each linear path
    of `quantized` is that packed weight dequantized: keeps the packed weights and the leaves
    that differ (bit for bit) from the checkpoint, which is read once more to compare."""
    skip = frozenset(p + ("weight",) for p in quantized)
    source = flat_paths(self.reader.block(i, skip))
    tensors = {path: np.array(leaf) for path, leaf in flat_paths(layer_params).items()
               if path not in skip and not _same_bits(leaf, source[path])}
    return self.with_stored(i, StoredBlock(dict(quantized), tensors))

  def with_stored(self, i: int, stored: StoredBlock) -> "LazyLayers":
    """This sequence with block i given by `stored` (merged over what it kept of block i)."""
    old = self._stored.get(i, StoredBlock({}, {}))
    merged = StoredBlock({**old.quantized, **stored.quantized}, {**old.tensors, **stored.tensors})
    return LazyLayers(self.reader, {**self._stored, i: merged})

  def kept_nbytes(self) -> int:
    """Bytes held in memory for the replaced blocks (packed weights and changed leaves)."""
    return sum(s.nbytes() for s in self._stored.values())


def _same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
      a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------------------------
# The params of a run, either kind.


def load_model(path_or_hub_id: str, dtype=jnp.float32, with_tokenizer: bool = True, *,
               source_dtypes: dict[str, str] | None = None):
  """(model, params, tokenizer or None) like `registry.load_model`, with only the outer params
  read: params["layers"] is a `LazyLayers` over the checkpoint."""
  dtype = registry.as_dtype(dtype)
  model, tensors, source, tok = registry.open_checkpoint(path_or_hub_id, with_tokenizer,
                                                         source_dtypes=source_dtypes)
  reader = BlockReader(model, tensors, dtype, source)
  return model, {**reader.outer(), "layers": LazyLayers(reader)}, tok


def is_lazy(params: Params) -> bool:
  return isinstance(params.get("layers"), LazyLayers)


def outer(params: Params) -> Params:
  """The params outside the blocks (a dict sharing their arrays)."""
  return {k: v for k, v in params.items() if k != "layers"}


def check_storage(run, params: Params) -> Params:
  """params as run.weights wants them: resident ones refused for "disk" (ConfigError: they
  are already in memory), lazy ones read into memory for "host"."""
  if run.weights == "disk" and not is_lazy(params):
    raise config_lib.ConfigError("weights=disk: the params given are loaded in memory; load "
                                 "them with pipeline.weights.load_model (quantize_model does)")
  if run.weights == "host" and is_lazy(params):
    layers = params["layers"]
    return {**outer(params), "layers": [layers[i] for i in range(len(layers))]}
  return params


def set_block(model, params: Params, i: int, layer_params: Params,
              quantized: dict[Path, QuantizedWeight]) -> Params:
  """params with block i replaced by `layer_params` (its quantized linears' weights being the
  packed `quantized` ones, by linear path, dequantized): `model.set_layer_params` for resident
  params, `LazyLayers.with_block` for lazy ones."""
  if is_lazy(params):
    return {**params, "layers": params["layers"].with_block(i, layer_params, quantized)}
  return model.set_layer_params(params, i, layer_params)


def with_stored(params: Params, i: int, quantized: dict[Path, QuantizedWeight],
                tensors: dict[Path, np.ndarray]) -> Params:
  """Lazy params with block i's packed weights and changed leaves given (a resumed run)."""
  if not quantized and not tensors:
    return params
  return {**params, "layers": params["layers"].with_stored(i, StoredBlock(quantized, tensors))}


class UnquantizedLayers(collections.abc.Sequence):
  """A view of a `LazyLayers` whose item i is `layers.unquantized(i)`, read when indexed."""

  def __init__(self, layers: LazyLayers):
    self._layers = layers

  def __len__(self) -> int:
    return len(self._layers)

  def __getitem__(self, i):
    if isinstance(i, slice):
      raise TypeError("UnquantizedLayers: index one block at a time (a slice reads several)")
    i = operator.index(i)
    if not 0 <= i < len(self):
      raise IndexError(f"block {i} of {len(self)}")
    return self._layers.unquantized(i)


def for_export(params: Params) -> Params:
  """params for `export.write_model_dir`: resident ones as they are; for lazy ones a view
  whose blocks lack the quantized linears' weights (not written), each read from the
  checkpoint when the export indexes it."""
  if not is_lazy(params):
    return params
  return {**outer(params), "layers": UnquantizedLayers(params["layers"])}


def model_hash(model, params: Params) -> str:
  """`checkpoint.model_hash` of params, streamed one block at a time for lazy ones (the same
  digest: leaves in the same order, under the same key paths)."""
  if not is_lazy(params):
    return checkpoint.model_hash(model, params)
  digest = hashlib.sha256(json.dumps(config_lib.to_dict(model.config), sort_keys=True).encode())
  for key in sorted(params):
    if key == "layers":
      parts = (((jax.tree_util.DictKey(key), jax.tree_util.SequenceKey(i)), params[key][i])
               for i in range(len(params[key])))
    else:
      parts = iter((((jax.tree_util.DictKey(key),), params[key]),))
    for prefix, tree in parts:
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(prefix + tuple(path))}:{a.dtype}:{a.shape};"
                      .encode())
        digest.update(a.view(np.uint8).reshape(-1).data)
  return digest.hexdigest()
