"""Memory, flops and time of a run on a mesh, from shapes alone (`jax.eval_shape`, no weights).

Per device, for the largest block (data-parallel calibration: each device holds the block's
weights and its 1 / data share of the calibration sequences; solves split output rows over
every device, `distributed.solve`):

  weights      the block's parameters in the stored dtype (model.dtype), replicated; with
               mesh.shard_weights each linear weight whose d_out divides by model counts
               d_out / model rows (`weight_bytes`; the solves' one-device copy of the block
               on the first device is not counted);
  activations  the block's input and output [N / data, T, D] (activation_dtype);
  kept         the captured linear inputs kept for later groups (keep_linear_inputs): one
               [N / data, T, d_in] per distinct input, in the model dtype;
  hessians     f32 [d_in, d_in] of the largest group's distinct inputs (the pipeline frees a
               group's Hessians before the next capture); `hessians_block` adds up all of the
               block's distinct inputs (q/k/v share one, o, up/gate share one, down for Llama);
  solver       the largest solve's working arrays, rows / devices (`SOLVER_ARRAYS`);
  workspace    one forward batch's transient: f32 attention scores and probabilities
               [b, heads, T, T] plus the MLP's [b, T, intermediate] (model dtype, 3 of them);
  runtime      the JAX runtime's fixed host overhead (`runtime_overhead_bytes`);
  model_host   (not per device) the whole model's parameters, held on the host per process.

  resident = weights + activations_in + kept + max(hessians + solver, activations_out)
  peak     = resident + workspace + runtime

(capture and solve of a group need its Hessians and the solver's arrays; the propagation needs
the output activations; both hold the block, its inputs and the kept inputs). Activations and
kept inputs live where `activations` says: with "device" all of `peak` is device memory; with
"host" / "disk" they are host RAM / disk and the device holds weights + max(hessians + solver,
one batch in and out) + workspace (`device_peak`; the runtime counts on the host).

Flops (Llama-like block order: attention group, o, MLP input group, down):
  calibration  per block and token: captures of each true-sequential group (the block up to
               that group's input; with keep_linear_inputs only the part after the previous
               group's kept input) + the propagation + 2 d_in² per distinct input for the
               Hessians; linears 2 d_out d_in, attention 4 T heads head_dim (full T x T);
  solve        per solve (`solve_flops`): GPTQ / SpQR d_out d_in² + d_in³ / 3, descent
               methods their start plus their loops' matmuls.
Time = calibration / (data · throughput) + solve / (devices · throughput): a flop-rate
estimate (descent loops are latency bound, so they run slower than this).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax import config as config_lib
from cdquant_jax.distributed.mesh import MeshConfig
from cdquant_jax.models import gguf_loader, hf_loader, registry
from cdquant_jax.models.aliases import resolve_model_path
from cdquant_jax.models.params import get_path
from cdquant_jax.pipeline import capture
from cdquant_jax.pipeline.config import RunConfig
from cdquant_jax.pipeline.rules import is_included, module_name, solver_for
from cdquant_jax.solvers import api

GIB = 1024 ** 3
Path = tuple[str, ...]

_DTYPE_BYTES = {"float32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "f16": 2}

# (rows x d_in arrays, d_in x d_in arrays) a solve holds at once, f32, from the solver code:
#   rtn     W, Q, codes;
#   gptq    W, its permuted copy, Q, codes, error block (<= 1); damped H, U (Cholesky of H⁻¹);
#   spqr    gptq's + outlier mask and first-level statistics;
#   cd      the GPTQ start (gptq's) + codes C, G = (Q − W) H, W, s·z operands of the loop;
#   cyclic  cd's + the permuted, padded H of the sweep;
#   bcd     cd's + the candidate tables; spqr-cd: SpQR's + cd's loop arrays.
SOLVER_ARRAYS = {"rtn": (3, 0), "gptq": (5, 2), "spqr": (6, 2), "cd": (9, 2), "cyclic": (9, 3),
                 "bcd": (10, 3), "spqr-cd": (10, 3)}


def _llama(hidden, intermediate, layers, heads, kv_heads, vocab, theta=10000.0) -> dict:
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
          "intermediate_size": intermediate, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
          "rms_norm_eps": 1e-5, "rope_theta": theta, "max_position_embeddings": 8192,
          "hidden_act": "silu", "tie_word_embeddings": False}


# Known sizes (HF config.json values), by short name and hub id.
KNOWN_MODELS = {
    "llama2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": _llama(4096, 14336, 32, 32, 8, 128256, 500000.0),
    "llama3-70b": _llama(8192, 28672, 80, 64, 8, 128256, 500000.0),
}
HUB_IDS = {"meta-llama/Llama-2-7b-hf": "llama2-7b", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
           "meta-llama/Meta-Llama-3-70B": "llama3-70b"}


def model_for(path: str):
  """The model object of a known name / hub id, a local HF directory or a .gguf file."""
  name = HUB_IDS.get(path, path)
  if name in KNOWN_MODELS:
    return registry.model_from_hf_config(KNOWN_MODELS[name])
  path = resolve_model_path(path)
  if os.path.isdir(path):
    return registry.model_from_hf_config(hf_loader.read_config(path))
  if path.endswith(".gguf") and os.path.exists(path):
    return registry.model_from_hf_config(gguf_loader.load_gguf(path)[0])
  raise config_lib.ConfigError(f"model.path: {path!r} is neither a known size "
                               f"{sorted(KNOWN_MODELS) + sorted(HUB_IDS)} nor a local HF "
                               "directory or .gguf file")


# ----------------------------------------------------------------------------------------------
# Shapes of one block.


@dataclasses.dataclass(frozen=True)
class BlockShapes:
  """What the plan needs of one block, from `jax.eval_shape`.

  Attributes:
    param_bytes: bytes of the block's parameters (stored dtype).
    linears: path -> (d_out, d_in).
    classes: linear paths grouped by identical input (one Hessian each).
    groups: the true-sequential groups (paths), in order.
  """

  param_bytes: int
  linears: dict[Path, tuple[int, int]]
  classes: list[list[Path]]
  groups: list[list[Path]]


def block_shapes(model, layer_index: int, dtype, seqlen: int) -> BlockShapes:
  shapes = model.param_shapes(dtype)
  layer = model.layer_params(shapes, layer_index)
  paths = model.linear_paths()
  linears = {p: tuple(get_path(layer, p)["weight"].shape) for p in paths}
  hidden = model.config.hidden_size
  classes = capture.shared_input_classes(model, layer, (1, seqlen, hidden), dtype,
                                         capture.kind_index(model, layer_index))
  return BlockShapes(param_bytes=sum(int(np.prod(x.shape)) * x.dtype.itemsize
                                     for x in jax.tree.leaves(layer)),
                     linears=linears, classes=classes, groups=model.block_linears())


def _d_in(block: BlockShapes, cls: list[Path]) -> int:
  return block.linears[cls[0]][1]


def _class_of(block: BlockShapes, path: Path) -> int:
  return next(i for i, cls in enumerate(block.classes) if path in cls)


# ----------------------------------------------------------------------------------------------
# Solves.


def solve_stacks(run: RunConfig, block: BlockShapes, layer_index: int
                 ) -> list[tuple[str, Any, int, int]]:
  """(method, cfg, d_out, d_in) of each solve of the block: linears sharing an input and a
  row-separable method and config are one stacked solve, as in the pipeline."""
  stacks: dict[Any, list[Path]] = {}
  for group in block.groups:
    for path in group:
      name = module_name(layer_index, path)
      if not is_included(run.quant, name):
        continue
      method, cfg = solver_for(run.quant, name)
      key = (_class_of(block, path), method, cfg) if method in api.ROW_SEPARABLE else path
      stacks.setdefault(key, []).append(path)
  out = []
  for paths in stacks.values():
    method, cfg = solver_for(run.quant, module_name(layer_index, paths[0]))
    out.append((method, cfg, sum(block.linears[p][0] for p in paths), block.linears[paths[0]][1]))
  return out


def solver_bytes(method: str, rows: int, d_in: int) -> int:
  """Bytes of a solve's working arrays on `rows` rows (`SOLVER_ARRAYS`)."""
  per_row, per_h = SOLVER_ARRAYS[method]
  return 4 * (per_row * rows * d_in + per_h * d_in * d_in)


def _start_flops(cfg: Any, d_out: int, d_in: int) -> float:
  init = getattr(cfg, "init", None)
  if init is not None and getattr(init, "method", "gptq") == "rtn":
    return 10.0 * d_out * d_in
  return d_out * d_in ** 2 + d_in ** 3 / 3


def solve_flops(method: str, cfg: Any, d_out: int, d_in: int) -> float:
  """Flops of one solve of [d_out, d_in] (module docstring)."""
  if method == "rtn":
    return 10.0 * d_out * d_in
  if method in ("gptq", "spqr"):
    return d_out * d_in ** 2 + d_in ** 3 / 3
  start = _start_flops(cfg, d_out, d_in)
  if method == "cyclic":
    return start + cfg.sweeps * 2.0 * d_out * d_in ** 2
  steps = math.ceil(getattr(cfg, "max_steps_factor", 1.0) * d_in)
  resync = getattr(cfg, "resync_every", 512)
  # Each greedy step: gains of every coordinate and a G update per row (~10 flops each);
  # a resync recomputes G = (Q − W) H.
  loop = steps * 10.0 * d_out * d_in + (steps // resync + 1) * 2.0 * d_out * d_in ** 2
  factor = 3.0 if method in ("bcd", "spqr-cd") else 1.0  # block candidates per step
  return start + factor * loop


# ----------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of the largest block, total flops and the time estimate of one run."""

  model: str
  devices: int
  data: int
  model_axis: int
  bytes: dict[str, int]
  resident: int
  peak: int
  device_peak: int
  model_host: int
  activations_where: str
  calibration_flops: float
  solve_flops: float
  gflops: float
  seconds: float

  def row(self) -> dict[str, Any]:
    gib = {k: round(v / GIB, 3) for k, v in self.bytes.items()}
    return dict(model=self.model, devices=self.devices, mesh=f"{self.data}x{self.model_axis}",
                **gib, resident=round(self.resident / GIB, 3), peak=round(self.peak / GIB, 3),
                device_peak=round(self.device_peak / GIB, 3),
                model_host=round(self.model_host / GIB, 3),
                activations_on=self.activations_where,
                calib_pflop=round(self.calibration_flops / 1e15, 2),
                solve_pflop=round(self.solve_flops / 1e15, 3),
                hours=round(self.seconds / 3600, 3))


def _capture_flops(block: BlockShapes, model, seqlen: int, keep: bool,
                   true_sequential: bool) -> float:
  """Flops per token of a block's captures and propagation (module docstring)."""
  lin = [sum(2.0 * block.linears[p][0] * block.linears[p][1] for p in g) for g in block.groups]
  cfg = model.config
  attn = 4.0 * seqlen * cfg.num_heads * cfg.head_dim
  full = sum(lin) + attn
  if not true_sequential:
    return 2 * full  # one capture of every input, one propagation
  # Group g's input: the block up to it (attention core sits after group 0).
  prefix = [sum(lin[:g]) + (attn if g >= 1 else 0.0) for g in range(len(lin))]
  if not keep:
    return sum(prefix) + full
  # From the previous group's kept input: that group's linears (+ attention after group 0);
  # the propagation runs the groups that write the residual (o and down: 1 and last).
  steps = [0.0] + [lin[g - 1] + (attn if g == 1 else 0.0) for g in range(1, len(lin))]
  return sum(steps) + lin[1 % len(lin)] + lin[-1]


def _hessian_flops(block: BlockShapes) -> float:
  return sum(2.0 * _d_in(block, cls) ** 2 for cls in block.classes)


def _workspace(model, batch: int, seqlen: int, dtype_bytes: int) -> int:
  cfg = model.config
  scores = 2 * 4 * batch * cfg.num_heads * seqlen * seqlen
  mlp = 3 * dtype_bytes * batch * seqlen * cfg.intermediate_size
  return int(scores + mlp)


def plan(run: RunConfig, model, mesh: MeshConfig, n_devices: int, *, gflops: float,
         runtime_bytes: int, name: str = "?") -> Plan:
  """The plan of `run` for `model` on `n_devices` devices arranged as `mesh`."""
  data, model_axis = mesh.sizes(n_devices)
  used = data * model_axis
  cal = run.calibration
  n_local = -(-cal.nsamples // data)
  param_b = _DTYPE_BYTES[run.model.dtype]
  act_b = _DTYPE_BYTES[run.activation_dtype or run.model.dtype]
  dtype = registry.as_dtype(run.model.dtype)
  keep = run.keep_linear_inputs and run.quant.true_sequential
  best, calib_total, solve_total = None, 0.0, 0.0
  for i in range(model.num_layers):
    k = capture.kind_index(model, i)
    block = _block_cached(model, k, dtype, cal.seqlen)
    stacks = solve_stacks(run, block, i)
    solve_total += sum(solve_flops(m, c, r, d) for m, c, r, d in stacks)
    calib_total += cal.nsamples * cal.seqlen * (
        _capture_flops(block, model, cal.seqlen, keep, run.quant.true_sequential)
        + _hessian_flops(block))
    if k != i and best is not None:
      continue
    items = _block_bytes(run, model, block, stacks, n_local, param_b, act_b, keep, used)
    items["weights"] = weight_bytes(block, param_b, model_axis if mesh.shard_weights else 1)
    if best is None or _resident(items) > _resident(best):
      best = items
  best["runtime"] = runtime_bytes
  resident = _resident(best)
  seconds = (calib_total / data + solve_total / used) / (gflops * 1e9)
  peak = resident + best["workspace"] + runtime_bytes
  return Plan(model=name, devices=n_devices, data=data, model_axis=model_axis, bytes=best,
              resident=resident, peak=peak,
              device_peak=peak if run.activations == "device" else _device_only(run, model, best),
              model_host=_model_bytes(model, dtype),
              activations_where=run.activations, calibration_flops=calib_total,
              solve_flops=solve_total, gflops=gflops, seconds=seconds)


@functools.lru_cache(maxsize=None)
def _block_cached(model, kind: int, dtype, seqlen: int) -> BlockShapes:
  return block_shapes(model, kind, dtype, seqlen)


def _block_bytes(run, model, block: BlockShapes, stacks, n_local: int, param_b: int, act_b: int,
                 keep: bool, devices: int) -> dict[str, int]:
  hidden = model.config.hidden_size
  per_seq = run.calibration.seqlen
  groups_h = [sum(4 * _d_in(block, block.classes[c]) ** 2
                  for c in {_class_of(block, p) for p in g}) for g in block.groups]
  solver = max((solver_bytes(m, -(-r // devices), d) for m, _, r, d in stacks), default=0)
  return dict(weights=block.param_bytes,
              activations_in=n_local * per_seq * hidden * act_b,
              activations_out=n_local * per_seq * hidden * act_b,
              kept=(sum(n_local * per_seq * _d_in(block, c) * param_b for c in block.classes)
                    if keep else 0),
              hessians=max(groups_h, default=0),
              hessians_block=sum(4 * _d_in(block, c) ** 2 for c in block.classes),
              solver=solver,
              workspace=_workspace(model, min(run.forward_batch_size, n_local), per_seq,
                                   param_b))


def weight_bytes(block: BlockShapes, param_b: int, split: int) -> int:
  """Per-device bytes of the block's params with each linear weight [d_out, d_in] whose d_out
  divides by `split` held as d_out / split rows (split 1: replicated, `param_bytes`)."""
  saved = sum(d_out * d_in * param_b * (split - 1) // split
              for d_out, d_in in block.linears.values() if d_out % split == 0)
  return block.param_bytes - saved


def _model_bytes(model, dtype) -> int:
  """Bytes of every parameter of the model (the host copy the pipeline quantizes block by
  block: one per host process, not per device)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(model.param_shapes(dtype)))


def _device_only(run, model, items: dict[str, int]) -> int:
  """Device bytes when activations and kept inputs live on the host or disk."""
  batch = 2 * run.forward_batch_size * run.calibration.seqlen * model.config.hidden_size * 4
  return (items["weights"] + max(items["hessians"] + items["solver"], batch)
          + items["workspace"])


def _resident(items: dict[str, int]) -> int:
  return (items["weights"] + items["activations_in"] + items["kept"]
          + max(items["hessians"] + items["solver"], items["activations_out"]))


# ----------------------------------------------------------------------------------------------
# Measurements.


def measure_gflops(n: int = 1024, repeats: int = 3) -> float:
  """f32 matmul throughput of the first device (GFLOP/s, HIGHEST precision, best of repeats)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best / 1e9


_OVERHEAD_PROBE = ("import psutil, jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready(); "
                   "print(psutil.Process().memory_info().rss)")


@functools.lru_cache(maxsize=None)
def runtime_overhead_bytes() -> int:
  """RSS of a fresh Python that ran one empty jitted program (the JAX runtime's fixed cost)."""
  out = subprocess.run([sys.executable, "-c", _OVERHEAD_PROBE], capture_output=True, text=True,
                       check=True, timeout=300)
  return int(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Tables.

COLUMNS = ("model", "devices", "mesh", "weights", "activations_in", "activations_out", "kept",
           "hessians", "hessians_block", "solver", "workspace", "runtime", "resident", "peak",
           "device_peak", "model_host",
           "activations_on", "calib_pflop", "solve_pflop", "hours")


def markdown(plans: list[Plan]) -> str:
  """A markdown table of plans (memory columns in GiB per device)."""
  rows = [p.row() for p in plans]
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)
