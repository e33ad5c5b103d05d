"""`quantize_nnx`: the layer-sequential pipeline on any NNX model, by intercepting its linears.

For each block (in model order), on the outputs of the already-quantized blocks before it:
  1. the block is traced once (`jax.eval_shape`, no compute) with every supported linear
     (`qlinear.SUPPORTED`) replaced by a `_Recorder`; linears fed the same traced array with the
     same contracted axes share one input, and these classes, in call order, are the block's
     true-sequential groups (e.g. [q, k, v] -> [o] -> [gate, up] -> [down] for Llama);
  2. per group, the block runs over the calibration set (one jitted program per block
     structure, `_capture_step`) with the group's representatives recorded and their
     f32 Hessians H = 2 X Xᵀ / n accumulated inside the program (`solvers.hessian`);
     the group's linears are solved and packed by the pipeline's own `quantize_linears`
     (rules, include/exclude, stacked row-separable solves: `pipeline.rules`,
     `pipeline.sequential`), then swapped in place for `QuantizedLinear`s, so later groups
     and blocks run the quantized model;
  3. the quantized block's outputs on the calibration set become the next block's inputs.
No model-specific capture code: the user names the blocks (a path glob or a callable), how to
call one (`block_call`) and how to get the first block's inputs (`embed`, or the inputs).
flax 0.12.8 has no module call hooks for NNX (only the linen bridge interceptors), so the
interception is by replacement, inside the traced function only: the user's model is only
changed by the swaps of step 2.

Not covered (yet): blocks applied under nnx.scan / nnx.vmap over stacked layer params (the
recorders replace per-block module attributes); a linear called more than once per block
(rejected); an nnx.Einsum called with an `einsum_str` override (recorded with its
constructor's layout); the zoo pipeline's kept inputs (each group's forward recomputes the
block up to its inputs) and host-resident activations; resume / checkpoints between blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cdquant_jax import config as config_lib
from cdquant_jax.models.layers import LinearOptions
from cdquant_jax.nnx import graph
from cdquant_jax.nnx.qlinear import QuantizedLinear, layout_of, weight_of
from cdquant_jax.pipeline.config import QuantSettings, RunConfig
from cdquant_jax.pipeline.rules import is_included
from cdquant_jax.pipeline.sequential import GroupPlan, quantize_linears, solve_stacks
from cdquant_jax.quant.qweight import QuantizedWeight
from cdquant_jax.solvers import hessian

log = logging.getLogger(__name__)
Path = graph.Path


def call_block(block: nnx.Module, h: jax.Array) -> jax.Array:
  """The default `block_call`: block(h), the first item when the block returns a tuple."""
  out = block(h)
  return out[0] if isinstance(out, tuple) else out


@dataclasses.dataclass
class NNXQuantResult:
  """What `quantize_nnx` returns.

  Attributes:
    model: the user's model, its quantized linears swapped for `QuantizedLinear`s.
    qweights: module name ("layers.0.attn.q_proj") -> its packed weight.
    records: one per quantized linear, in quantization order: the pipeline's log record
      (module, shape [d_out, d_in], method, objective, energy, relative_objective, damping,
      bits) plus block (the block's name) and nsamples.
  """

  model: nnx.Module
  qweights: dict[str, QuantizedWeight]
  records: list[dict]


class _Recorder:
  """Stands in for a linear while a block is traced: records (path, id of the input, the
  layout's input key, the input as [batch..., d_in]) in `sink`, then calls the linear."""

  def __init__(self, inner: nnx.Module, path: Path, sink: list):
    self.inner, self.path, self.sink = inner, path, sink
    self.layout = layout_of(inner)

  def __call__(self, x, *args, **kwargs):
    self.sink.append((self.path, id(x), self.layout.input_key(), self.layout.flatten_input(x)))
    return self.inner(x, *args, **kwargs)


def _recorded_call(graphdef, state, block_call, h, paths: Sequence[Path]) -> list[tuple]:
  """Traceable: merges the block, records the inputs of `paths`, calls it; returns the sink."""
  block = nnx.merge(graphdef, state)
  sink: list[tuple] = []
  for path in paths:
    graph.set_node(block, path, _Recorder(graph.get_node(block, path), path, sink))
  block_call(block, h)
  return sink


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def _capture_step(graphdef, block_call, reps: tuple[Path, ...], state, h: jax.Array,
                  states: tuple[hessian.HessianState, ...]):
  """One batch h [B, ...] of a block: the Hessian states of the `reps` updated with their
  inputs [B, ..., d_in], and whether those were all finite (bool scalar)."""
  sink = _recorded_call(graphdef, state, block_call, h, reps)
  xs = {path: x for path, _, _, x in sink}
  updated = [hessian.accumulate_batch(s, xs[p]) for s, p in zip(states, reps)]
  finite = jnp.all(jnp.stack([ok for _, ok in updated]))
  return tuple(s for s, _ in updated), finite


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, block_call, state, h: jax.Array) -> jax.Array:
  """The block's output for input h."""
  return block_call(nnx.merge(graphdef, state), h)


def input_classes(block: nnx.Module, block_call, h: jax.Array,
                  paths: Sequence[Path]) -> list[list[Path]]:
  """The block's linears grouped by identical input, classes and members in call order.

  Found by tracing the block once (no compute): linears called on the same traced array with
  the same contracted axes (`EinsumLayout.input_key`) share a Hessian. Linears the call never
  reaches are left out (logged); a linear called more than once raises ValueError.
  """
  graphdef, state = nnx.split(block)
  seen: list[tuple] = []

  def trace(state, h):
    seen.extend((p, key, k) for p, key, k, _ in _recorded_call(graphdef, state, block_call, h,
                                                                  paths))
    return h

  jax.eval_shape(trace, state, jax.ShapeDtypeStruct(h.shape, h.dtype))
  counts = {p: sum(1 for q, _, _ in seen if q == p) for p in paths}
  twice = [graph.dotted(p) for p, n in counts.items() if n > 1]
  if twice:
    raise ValueError(f"quantize_nnx: linears called more than once per block call: {twice}")
  unused = [graph.dotted(p) for p, n in counts.items() if n == 0]
  if unused:
    log.warning("quantize_nnx: linears never called by the block, left as they are: %s", unused)
  classes: dict[tuple, list[Path]] = {}
  for path, x_id, key in seen:
    classes.setdefault((x_id, key), []).append(path)
  return list(classes.values())


def group_hessians(block: nnx.Module, block_call, acts: Sequence[jax.Array],
                   reps: dict[Path, str]) -> dict[Path, jax.Array]:
  """H [d_in, d_in] (GPTQ running mean over sequences, f32 HIGHEST) of each representative
  linear's input over the batches `acts`. Raises HessianError on NaN/Inf inputs."""
  graphdef, state = nnx.split(block)
  paths = tuple(reps)
  states = tuple(hessian.HessianState.zeros(layout_of(graph.get_node(block, p)).d_in)
                 for p in paths)
  flags = []
  for h in acts:
    states, finite = _capture_step(graphdef, block_call, paths, state, h, states)
    flags.append(finite)
  if not all(jax.device_get(flags)):
    raise hessian.HessianError(f"layers {sorted(reps.values())}: NaN/Inf values in the "
                               "calibration activations")
  return {p: s.H for p, s in zip(paths, states)}


def _plan(run: RunConfig, group: list[Path], classes: list[list[Path]],
          names: dict[Path, str]) -> GroupPlan | None:
  """The pipeline's GroupPlan of one capture (None when no linear of the group is included)."""
  names = {p: names[p] for p in group if is_included(run.quant, names[p])}
  if not names:
    return None
  # Each linear's Hessian comes from the first included linear with the same input.
  rep_of = {p: next(q for q in cls if q in names) for cls in classes for p in cls if p in names}
  reps = {rep_of[p]: names[rep_of[p]] for p in names}
  return GroupPlan(names=names, rep_of=rep_of, reps=reps, sharing={})


def _solve_group(run: RunConfig, block: nnx.Module, plan: GroupPlan,
                 hessians: dict[Path, jax.Array]) -> tuple[dict[str, QuantizedWeight], list[dict]]:
  """Solves and packs the group's linears with the pipeline's `quantize_linears` (one stacked
  solve per shared H and row-separable solver)."""
  qweights, records = {}, []
  for stack in solve_stacks(run, plan):
    # The pipeline reads {"weight": W [d_out, d_in]} by path; here each path is its name.
    params = {plan.names[p]: {"weight": weight_of(graph.get_node(block, p))} for p in stack}
    names = {(plan.names[p],): plan.names[p] for p in stack}
    _, stack_qw, stack_records = quantize_linears(run, params, names,
                                                  hessians[plan.rep_of[stack[0]]])
    qweights.update(stack_qw)
    records += stack_records
  return qweights, records


def quantize_block(run: RunConfig, block: nnx.Module, block_name: str, acts: Sequence[jax.Array],
                   block_call, options: LinearOptions) -> tuple[dict[str, QuantizedWeight],
                                                                list[dict]]:
  """Quantizes the included linears of one block group by group, swapping each for a
  `QuantizedLinear` in place; returns ({module name: packed}, log records)."""
  paths = graph.find_linears(block)
  if not paths:
    return {}, []
  classes = input_classes(block, block_call, acts[0], paths)
  groups = classes if run.quant.true_sequential else [[p for c in classes for p in c]]
  names = {p: f"{block_name}.{graph.dotted(p)}" for c in classes for p in c}
  qweights, records = {}, []
  for group in groups:
    plan = _plan(run, group, classes, names)
    if plan is None:
      continue
    hessians = group_hessians(block, block_call, acts, plan.reps)
    group_qw, group_records = _solve_group(run, block, plan, hessians)
    for path, name in plan.names.items():
      graph.set_node(block, path, QuantizedLinear.from_linear(graph.get_node(block, path),
                                                              group_qw[name], options=options))
    qweights.update(group_qw)
    records += group_records
  return qweights, records


def block_outputs(block: nnx.Module, block_call, acts: Sequence[jax.Array]) -> list[jax.Array]:
  """The block's outputs on every batch of `acts`."""
  graphdef, state = nnx.split(block)
  return [_forward(graphdef, block_call, state, h) for h in acts]


def _batches(inputs, batch_size: int) -> list[jax.Array]:
  """A list/tuple of batches as given; an array [N, ...] in batches of `batch_size` rows."""
  if isinstance(inputs, (list, tuple)):
    return [jnp.asarray(b) for b in inputs]
  inputs = np.asarray(inputs)
  return [jnp.asarray(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]


def block_inputs(model: nnx.Module, calibration_inputs, embed, batch_size: int
                 ) -> list[jax.Array]:
  """The first block's inputs, per batch: embed(model, batch) under nnx.jit, or the
  calibration inputs themselves when `embed` is None."""
  batches = _batches(calibration_inputs, batch_size)
  if embed is None:
    return batches
  embed_fn = nnx.jit(embed)
  return [embed_fn(model, b) for b in batches]


def quant_settings(quant: QuantSettings | dict | None, method: str | None,
                   knobs: dict | None) -> QuantSettings:
  """QuantSettings from a QuantSettings or its mapping, with `method` / `knobs` on top."""
  if isinstance(quant, QuantSettings):
    quant = config_lib.to_dict(quant)
  data = dict(quant or {})
  if method is not None:
    data["method"] = method
  if knobs:
    data["knobs"] = {**data.get("knobs", {}), **knobs}
  return config_lib.from_dict(QuantSettings, data, where="quant")


def quantize_nnx(model: nnx.Module, calibration_inputs, *,
                 blocks: graph.BlocksSpec = "layers.*",
                 embed: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
                 block_call: Callable[[nnx.Module, jax.Array], jax.Array] = call_block,
                 quant: QuantSettings | dict | None = None, method: str | None = None,
                 knobs: dict[str, Any] | None = None, batch_size: int = 8,
                 options: LinearOptions = LinearOptions()) -> NNXQuantResult:
  """Quantizes the linears inside the blocks of an NNX model (see the module docstring).

  Args:
    model: any NNX model; changed in place (quantized linears become `QuantizedLinear`).
    calibration_inputs: token ids [N, T] (or any input `embed` takes), or with embed=None the
      first block's inputs [N, T, D]; an array is cut into batches of `batch_size` sequences,
      a list/tuple is taken as the batches.
    blocks: dotted glob over module paths ("layers.*") or a callable model -> [blocks], in
      the order they are applied.
    embed: (model, batch) -> the first block's input for the batch (run under nnx.jit).
    block_call: (block, h) -> the block's output hidden state (default: block(h), first item
      of a tuple); keep one function object for every call, it is a static jit argument.
    quant: the pipeline's QuantSettings (or its mapping: method, knobs, solvers, rules,
      include, exclude, true_sequential, ...); regexes are matched against module names, the
      dotted graph paths ("layers.0.attn.q_proj").
    method, knobs: shortcuts over quant.method / quant.knobs (e.g. knobs={"bits": 3}).
    batch_size: sequences per block forward when calibration_inputs is an array.
    options: the packed_matmul implementation the QuantizedLinears run.
  Returns:
    NNXQuantResult(model, qweights, records).
  Raises:
    ValueError: no block matches `blocks` (one line, naming the pattern); ConfigError: bad
    settings; HessianError: NaN/Inf activations.
  """
  run = RunConfig(quant=quant_settings(quant, method, knobs)).validate()
  found = graph.find_blocks(model, blocks)
  acts = block_inputs(model, calibration_inputs, embed, batch_size)
  nsamples = sum(int(h.shape[0]) for h in acts)
  qweights, records = {}, []
  for path, block in found:
    name = graph.dotted(path)
    block_qw, block_records = quantize_block(run, block, name, acts, block_call, options)
    qweights.update(block_qw)
    records += [{**r, "block": name, "nsamples": nsamples} for r in block_records]
    acts = block_outputs(block, block_call, acts)
  return NNXQuantResult(model=model, qweights=qweights, records=records)
