"""Jitted block forwards over the calibration set: linear inputs (for Hessians) and block outputs.

All blocks of a model have the same parameter shapes, and a block's computation depends on its
index only through `config.layer_types[i]` (rope / sliding window), so each block runs with
the first layer index of its kind (`kind_index`): one compilation per kind, not per block.
Capturing only the inputs of one true-sequential group lets XLA drop the rest of the block
(the attention-input group costs one norm), and the Hessians are accumulated inside the same
jitted program (`_capture_step`: no [B, T, d_in] inputs leave it unless kept, no host sync per
batch).

Kept inputs (`LinearInputs`): the inputs a group captured stay valid for the rest of the block
(later groups only change linears downstream of them), so later captures and the propagation
take them as `given` inputs and XLA drops the work that produced them (attention for the MLP
groups, everything but o_proj and down_proj in the propagation for Llama).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.eval.perplexity import window_nll
from cdquant_jax.models.base import CausalLM, default_positions
from cdquant_jax.models.params import get_path
from cdquant_jax.solvers import hessian

Path = tuple[str, ...]
Params = dict[str, Any]


def kind_index(model: CausalLM, layer_index: int) -> int:
  """The first layer with the same layer type as `layer_index` (same compiled block)."""
  types = model.config.layer_types
  return types.index(types[layer_index])


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 7), donate_argnums=(6,))
def _capture_step(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int,
                  paths: tuple[Path, ...], given: dict[Path, jax.Array] | None,
                  states: tuple[hessian.HessianState, ...], return_inputs: bool):
  """One batch h [B, T, D] of block `layer_index`: the Hessian states of `paths` updated with
  their inputs (the `given` ones used as they are), whether those were all finite (bool scalar),
  and the inputs [B, T, d_in] themselves when `return_inputs` (else ())."""
  _, _, inputs = model.block(layer_params, h, default_positions(h[..., 0]), layer_index,
                             capture=True, given=given)
  xs = tuple(inputs[p] for p in paths)
  updated = [hessian.accumulate_batch(state, x) for state, x in zip(states, xs)]
  finite = jnp.all(jnp.stack([ok for _, ok in updated]))
  return tuple(state for state, _ in updated), finite, (xs if return_inputs else ())


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(model: CausalLM, layer_params: Params, h: jax.Array, layer_index: int,
             given: dict[Path, jax.Array] | None = None) -> jax.Array:
  """Block output [B, T, D] for input h [B, T, D] (linears in `given` run on those inputs)."""
  return model.block(layer_params, h, default_positions(h[..., 0]), layer_index,
                     given=given)[0]


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


class LinearInputs:
  """Captured inputs of one block's linears, per calibration batch: path -> [B, T, d_in].

  Stored like the activations (numpy on the host, or device arrays). Memory: about
  Σ d_in / D times the activations for every kept input class (≈ 5x for Llama blocks).
  """

  def __init__(self, n_batches: int, on_host: bool):
    self.on_host = on_host
    self.batches: list[dict[Path, Any]] = [{} for _ in range(n_batches)]

  def add(self, b: int, inputs: dict[Path, jax.Array]) -> None:
    self.batches[b].update({p: np.asarray(x) if self.on_host else x for p, x in inputs.items()})

  def given(self, b: int) -> dict[Path, jax.Array] | None:
    """The kept inputs of batch b (None when there are none: the plain block)."""
    return {p: jnp.asarray(x) for p, x in self.batches[b].items()} or None

  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for batch in self.batches
               for x in batch.values())


def block_outputs(model: CausalLM, layer_params: Params, acts: Activations, layer_index: int,
                  kept: LinearInputs | None = None) -> Activations:
  """Runs block `layer_index` over every batch of `acts` (on the `kept` inputs, if any)."""
  out = Activations(acts.on_host)
  k = kind_index(model, layer_index)
  for b, h in enumerate(acts):
    out.append(_forward(model, layer_params, h, k, None if kept is None else kept.given(b)))
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
  flags = []
  for b, h in enumerate(acts):
    given = None if kept is None else kept.given(b)
    states, finite, xs = _capture_step(model, layer_params, h, k, paths, given, states,
                                       kept is not None)
    flags.append(finite)
    if kept is not None:
      sharing = sharing or {}
      kept.add(b, {q: x for p, x in zip(paths, xs) for q in sharing.get(p, [p])})
  bad = [b for b, ok in enumerate(jax.device_get(flags)) if not ok]
  if bad:
    _raise_non_finite(model, layer_params, acts, k, representatives, bad[0], kept)
  return {path: state.H for path, state in zip(paths, states)}


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


@functools.partial(jax.jit, static_argnums=(0,))
def _head_nll(model: CausalLM, params: Params, h: jax.Array, ids: jax.Array) -> jax.Array:
  """[B] summed next-token NLL of each window from the last block's output h [B, T, D]
  (head and `window_nll` in one program: the [B, T, V] logits never leave it)."""
  return window_nll(model.head(params, h), ids)


def _blocks(model: CausalLM, params: Params, ids) -> jax.Array:
  h = _embed(model, params, jnp.asarray(ids))
  for i in range(model.num_layers):
    h = _forward(model, model.layer_params(params, i), h, kind_index(model, i))
  return h


def block_logits_fn(model: CausalLM, params: Params):
  """ids [B, T] -> logits [B, T, V], block by block with the same jitted blocks as the pipeline
  (so the in-memory and the reloaded quantized model give identical numbers)."""
  return lambda ids: _head(model, params, _blocks(model, params, ids))


def block_nll_fn(model: CausalLM, params: Params):
  """ids [B, T] -> [B] summed window NLLs (`window_nll`), with the blocks of
  `block_logits_fn` and the head fused with the loss."""
  return lambda ids: _head_nll(model, params, _blocks(model, params, ids), jnp.asarray(ids))
