"""Jitted block forwards over the calibration set: linear inputs (for Hessians) and block outputs.

All blocks of a model have the same parameter shapes, and a block's computation depends on its
index only through `config.layer_types[i]` (rope / sliding window), so each block runs with
the first layer index of its kind (`kind_index`): one compilation per kind, not per block.
Capturing only the inputs of one true-sequential group lets XLA drop the rest of the block
(the attention-input group costs one norm).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.models.base import CausalLM, default_positions
from cdquant_jax.solvers import hessian

Path = tuple[str, ...]
Params = dict[str, Any]


def kind_index(model: CausalLM, layer_index: int) -> int:
  """The first layer with the same layer type as `layer_index` (same compiled block)."""
  types = model.config.layer_types
  return types.index(types[layer_index])


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _capture(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int,
             paths: tuple[Path, ...]) -> tuple[jax.Array, ...]:
  """Inputs [B, T, d_in] of the linears `paths` when block `layer_index` runs on h [B, T, D]."""
  _, _, inputs = model.block(layer_params, h, default_positions(h[..., 0]), layer_index,
                             capture=True)
  return tuple(inputs[p] for p in paths)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int) -> jax.Array:
  """Block output [B, T, D] for input h [B, T, D]."""
  return model.block(layer_params, h, default_positions(h[..., 0]), layer_index)[0]


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


class Activations:
  """The calibration activations between blocks, [N, T, D], on the host or on the device."""

  def __init__(self, on_host: bool):
    self.on_host = on_host
    self.batches: list[Any] = []

  def append(self, h: jax.Array) -> None:
    self.batches.append(np.asarray(h) if self.on_host else h)

  def __iter__(self) -> Iterator[jax.Array]:
    for h in self.batches:
      yield jnp.asarray(h)

  def stacked(self) -> np.ndarray:
    """[N, T, D] on the host (for checkpoints)."""
    return np.concatenate([np.asarray(h) for h in self.batches], axis=0)

  @classmethod
  def from_array(cls, array: np.ndarray, batch: int, on_host: bool) -> "Activations":
    out = cls(on_host)
    for start in range(0, array.shape[0], batch):
      out.append(jnp.asarray(array[start:start + batch]))
    return out

  def nbytes(self) -> int:
    return sum(int(np.prod(h.shape)) * h.dtype.itemsize for h in self.batches)


def embed_calibration(model: CausalLM, params: Params, ids: np.ndarray, batch: int,
                      on_host: bool) -> Activations:
  """Embeddings of the calibration windows ids [N, T], in batches of `batch` windows."""
  out = Activations(on_host)
  for start in range(0, ids.shape[0], batch):
    out.append(_embed(model, params, jnp.asarray(ids[start:start + batch])))
  return out


def block_outputs(model: CausalLM, layer_params: Params, acts: Activations, layer_index: int
                  ) -> Activations:
  """Runs block `layer_index` over every batch of `acts`."""
  out = Activations(acts.on_host)
  k = kind_index(model, layer_index)
  for h in acts:
    out.append(_forward(model, layer_params, h, k))
  if out.batches:
    jax.block_until_ready(out.batches[-1])
  return out


def group_hessians(model: CausalLM, layer_params: Params, acts: Activations, layer_index: int,
                   representatives: dict[Path, str]) -> dict[Path, jax.Array]:
  """H [d_in, d_in] (GPTQ running mean, f32 HIGHEST) of each representative linear's input.

  representatives: path -> module name (for error messages); one entry per distinct input.
  """
  paths = tuple(representatives)
  k = kind_index(model, layer_index)
  states: dict[Path, hessian.HessianState] = {}
  for h in acts:
    inputs = _capture(model, layer_params, h, k, paths)
    for path, x in zip(paths, inputs):
      if path not in states:
        states[path] = hessian.HessianState.zeros(x.shape[-1])
      states[path] = hessian.accumulate(states[path], x, layer=representatives[path])
  return {path: state.H for path, state in states.items()}


def block_logits_fn(model: CausalLM, params: Params):
  """ids [B, T] -> logits [B, T, V], block by block with the same jitted blocks as the pipeline
  (so the in-memory and the reloaded quantized model give identical numbers)."""
  head = jax.jit(model.head)

  def logits(ids):
    h = _embed(model, params, jnp.asarray(ids))
    for i in range(model.num_layers):
      h = _forward(model, model.layer_params(params, i), h, kind_index(model, i))
    return head(params, h)

  return logits
