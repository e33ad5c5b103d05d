"""Block output tuning: after a block is solved, fit its continuous parameters with its codes fixed.

With the integer codes of every quantized linear of block i frozen, Adam (optax; cosine or
constant learning rate) minimises the block-output MSE (f32, mean over windows × T × D)
    L(θ) = mean ‖block(θ; h) − block_fp(h)‖²
against the full-precision block's outputs on the SAME inputs h the quantized block sees (the
outputs of the already-quantized blocks 0..i-1; AQLM's targets). The last `holdout_fraction`
of the calibration windows is held out: every `eval_every` steps the parameters ROUNDED TO
THEIR STORAGE DTYPES are written into the packed weights and the held-out error of exactly
that block (the pipeline's jitted forward on `export.dequantized_weight`) is measured; the best
parameters seen, step 0 (the untuned block) included, are kept, so the step never raises the
held-out error it measures. Early stop after `patience` evaluations without improvement.

What is tuned, per parameter family (`TuneConfig.params`) and storage format (`QuantMeta`):
  family    float format ("f16"/"f32")          "qq" format (SpQR second level)
  --------  ----------------------------------  -------------------------------------------------
  scales    scale [n_groups_pad, N]             scale_qq_scale, scale_qq_zero [n_groups_pad, N/qq]
  zeros     zero, only when fractional (SpQR    zero_qq_scale, zero_qq_zero (the first-level
            flavour, not round_zero, not sym);  zeros are codes then)
            GPTQ-flavour zeros are integers
  outliers  outlier_values [nnz] (float16)      (same)
  norms     every leaf of the block's norms (input_layernorm, post_attention_layernorm, q_norm,
            ...), in the model dtype
Codes, permutations, outlier positions and the metadata never change. The optimizer keeps f32
master copies; only the evaluated (and stored) values are rounded. Learning rates are relative:
each array's Adam steps are scaled by its initial RMS (`scale_by_initial_rms`), so one rate
serves scales (~1e-2), norms (~1) and second-level zeros (code units) alike.

Cost per block: one full-precision forward over the calibration set (the targets), `steps`
forward + backward passes on `batch_windows` windows, and a held-out forward every
`eval_every` steps; memory: the block's inputs and targets as host copies ([N, T, D] f32 each).
A tuned block propagates without the kept linear inputs (they predate the tuned parameters).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdquant_jax import config as config_lib
from cdquant_jax.models.base import default_positions
from cdquant_jax.models.params import flat_paths, get_path, set_path
from cdquant_jax.pipeline import capture, export
from cdquant_jax.quant import qweight

Params = dict[str, Any]
Path = tuple[Any, ...]
Family = Literal["scales", "zeros", "outliers", "norms"]
FAMILIES = ("scales", "zeros", "outliers", "norms")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuneConfig:
  """The `tune` section of a run: per-block tuning of the continuous parameters (module doc).

  enabled: run the step after each block's solve (every other field needs it).
  steps: Adam steps per block (an upper bound with early stopping).
  learning_rate: peak learning rate, relative: an Adam step moves a tuned array by about
    learning_rate times its initial RMS (`scale_by_initial_rms`).
  schedule: "cosine" (decay to 0 over `steps`) or "constant".
  holdout_fraction: share of the calibration windows held out (the last ones; floor).
  batch_windows: calibration windows per step (and per held-out forward).
  eval_every: steps between held-out measurements.
  patience: measurements without improvement before stopping (0: never stop early).
  params: the parameter families to tune (see the module docstring); zeros and outliers
    only exist for SpQR methods.
  seed: order of the training windows.
  """

  enabled: bool = False
  steps: int = 100
  learning_rate: float = 3e-3
  schedule: Literal["cosine", "constant"] = "cosine"
  holdout_fraction: float = 0.1
  batch_windows: int = 4
  eval_every: int = 5
  patience: int = 4
  params: tuple[Family, ...] = ("scales", "norms")
  seed: int = 0

  def __post_init__(self):
    check = config_lib.reject_unless
    changed = [f.name for f in dataclasses.fields(self)
               if f.name != "enabled" and getattr(self, f.name) != f.default]
    check(self.enabled or not changed, f"tune: {changed} set but tune.enabled is false")
    check(self.steps >= 1, f"tune.steps must be >= 1, got {self.steps}")
    check(self.learning_rate > 0, f"tune.learning_rate must be > 0, got {self.learning_rate}")
    check(0 < self.holdout_fraction < 1,
          f"tune.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
    check(self.batch_windows >= 1, f"tune.batch_windows must be >= 1, got {self.batch_windows}")
    check(self.eval_every >= 1, f"tune.eval_every must be >= 1, got {self.eval_every}")
    check(self.patience >= 0, f"tune.patience must be >= 0, got {self.patience}")
    check(bool(self.params) and len(set(self.params)) == len(self.params),
          f"tune.params must list distinct families of {list(FAMILIES)}, got {list(self.params)}")

  def holdout_windows(self, nsamples: int) -> int:
    """Held-out windows of `nsamples` calibration windows (the last ones)."""
    return int(math.floor(self.holdout_fraction * nsamples))

  def check_run(self, nsamples: int, methods: tuple[str, ...]) -> None:
    """Rejects (ConfigError) what this run cannot honour: no held-out or no training windows,
    zeros/outliers when no method of the run (`methods`: default and rules') is SpQR."""
    if not self.enabled:
      return
    n_hold = self.holdout_windows(nsamples)
    config_lib.reject_unless(
        0 < n_hold < nsamples, f"tune.holdout_fraction={self.holdout_fraction} holds out "
        f"{n_hold} of calibration.nsamples={nsamples} windows; it needs 1..{nsamples - 1}")
    spqr = any(m.startswith("spqr") for m in methods)
    for family in ("zeros", "outliers"):
      config_lib.reject_unless(
          spqr or family not in self.params,
          f"tune.params has {family!r} but no method of the run ({sorted(set(methods))}) has "
          f"tunable {family} (GPTQ-flavour zeros are integers; only SpQR stores outliers)")


# ----------------------------------------------------------------------------------------------
# The tunable parameters θ: {"qw": {module: {field: f32 array}}, "norms": {path: f32 array}}.


def tunable_fields(meta: qweight.QuantMeta, families: tuple[str, ...]) -> tuple[str, ...]:
  """The QuantizedWeight fields tuned for `families` under `meta` (see the module docstring)."""
  fields = []
  for which, family in (("scale", "scales"), ("zero", "zeros")):
    if family not in families:
      continue
    if getattr(meta, f"{which}_format") == "qq":
      fields += [f"{which}_qq_scale", f"{which}_qq_zero"]
    elif which == "scale" or (meta.flavor == "spqr" and not meta.round_zero and not meta.sym):
      fields.append(which)
  if "outliers" in families and meta.nnz > 0:
    fields.append("outlier_values")
  return tuple(fields)


def norm_paths(layer_params: Params) -> list[Path]:
  """Paths of every leaf of the block's norms (a path with a key containing "norm")."""
  return [p for p in flat_paths(layer_params)
          if any(isinstance(k, str) and "norm" in k for k in p)]


def norm_tensors(layer_params: Params) -> dict[str, np.ndarray]:
  """The block's norm leaves as host arrays by dotted path (what a checkpoint saves)."""
  return {".".join(p): np.asarray(get_path(layer_params, p)) for p in norm_paths(layer_params)}


def with_tensors(layer_params: Params, tensors: dict[str, np.ndarray]) -> Params:
  """Block params with the leaves of `norm_tensors` put back (in each leaf's dtype)."""
  for name, value in tensors.items():
    path = tuple(name.split("."))
    layer_params = set_path(layer_params, path,
                            np.asarray(value, np.asarray(get_path(layer_params, path)).dtype))
  return layer_params


def initial_theta(layer_params: Params, qweights: dict[str, qweight.QuantizedWeight],
                  families: tuple[str, ...]) -> dict:
  """θ at step 0: f32 copies of the stored values."""
  copy = lambda x: jnp.array(x, jnp.float32, copy=True)
  qw_theta = {name: {f: copy(getattr(qw, f)) for f in tunable_fields(qw.meta, families)}
              for name, qw in qweights.items()}
  norms = ({p: copy(get_path(layer_params, p)) for p in norm_paths(layer_params)}
           if "norms" in families else {})
  return {"qw": {n: t for n, t in qw_theta.items() if t}, "norms": norms}


def apply_theta(theta: dict, layer_params: Params, qweights: dict[str, qweight.QuantizedWeight],
                paths: dict[str, Path]) -> Params:
  """Block params with θ in place: each quantized linear's weight dequantized (`qweight.
  dequantize`, differentiable in the replaced stats; codes are constants) in its dtype, and the
  norm leaves of θ cast to theirs. paths: module name -> linear path in the block."""
  for name, fields in theta["qw"].items():
    w = get_path(layer_params, paths[name])["weight"]
    qw = dataclasses.replace(qweights[name], **fields)
    layer_params = set_path(layer_params, paths[name] + ("weight",),
                            qweight.dequantize(qw).astype(w.dtype))
  for path, value in theta["norms"].items():
    layer_params = set_path(layer_params, path, value.astype(get_path(layer_params, path).dtype))
  return layer_params


def rounded(theta: dict, layer_params: Params, qweights: dict[str, qweight.QuantizedWeight]
            ) -> tuple[dict[str, qweight.QuantizedWeight], Params]:
  """θ rounded to the storage dtypes: (packed weights holding it, block params with its norms;
  the linear weights of those params are untouched)."""
  out = dict(qweights)
  for name, fields in theta["qw"].items():
    qw = qweights[name]
    out[name] = dataclasses.replace(qw, **{f: v.astype(getattr(qw, f).dtype)
                                           for f, v in fields.items()})
  for path, value in theta["norms"].items():
    layer_params = set_path(layer_params, path, value.astype(get_path(layer_params, path).dtype))
  return out, layer_params


def stored_block(layer_params: Params, qweights: dict[str, qweight.QuantizedWeight],
                 paths: dict[str, Path]) -> Params:
  """The block params exactly as the pipeline writes them back (`export.dequantized_weight`)."""
  for name, qw in qweights.items():
    w = get_path(layer_params, paths[name])["weight"]
    layer_params = set_path(layer_params, paths[name] + ("weight",),
                            export.dequantized_weight(qw, w.dtype))
  return layer_params


# ----------------------------------------------------------------------------------------------
# Loss, optimizer, measurement.


def block_mse(model, layer_params: Params, h: jax.Array, target: jax.Array,
              layer_index: int) -> jax.Array:
  """Mean squared error (f32 scalar) of the block's output on h [B, T, D] against target."""
  out = model.block(layer_params, h, default_positions(h[..., 0]), layer_index)[0]
  return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))


def tune_loss(theta: dict, model, layer_params: Params, qweights: dict, paths: dict,
              h: jax.Array, target: jax.Array, layer_index: int) -> jax.Array:
  """L(θ) on one batch: the block with θ applied (`apply_theta`), MSE against target."""
  return block_mse(model, apply_theta(theta, layer_params, qweights, paths), h, target,
                   layer_index)


def scale_by_initial_rms(floor: float = 1e-12) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the RMS of that leaf at `init` (at least `floor`), so a
  learning rate is relative to the size of the parameter (scales ~1e-2, norms ~1, qq zeros in
  code units ~1 all move by about lr of themselves per Adam step)."""

  def init(params):
    return jax.tree.map(lambda x: jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x))), floor), params)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, r: u * r, updates, state), state

  return optax.GradientTransformation(init, update)


def optimizer(cfg: TuneConfig) -> optax.GradientTransformation:
  """Adam with the configured schedule, its steps relative to each leaf's initial RMS."""
  lr = (optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps) if cfg.schedule == "cosine"
        else cfg.learning_rate)
  return optax.chain(optax.scale_by_adam(), scale_by_initial_rms(),
                     optax.scale_by_learning_rate(lr))


def _static_paths(paths: dict[str, Path]) -> tuple:
  return tuple(sorted(paths.items()))


def _train_step(cfg: TuneConfig, model, layer_index: int, path_items: tuple, theta: dict,
                opt_state, layer_params: Params, qweights: dict, h: jax.Array,
                target: jax.Array):
  """One Adam step: (θ, optimizer state, loss before the step)."""
  loss, grads = jax.value_and_grad(tune_loss)(theta, model, layer_params, qweights,
                                              dict(path_items), h, target, layer_index)
  updates, opt_state = optimizer(cfg).update(grads, opt_state, theta)
  return optax.apply_updates(theta, updates), opt_state, loss


# No donation: the measured (rounded) parameters may share θ's f32 buffers.
_train_step_jit = jax.jit(_train_step, static_argnums=(0, 1, 2, 3))


def heldout_mse(model, layer_params: Params, h: np.ndarray, target: np.ndarray,
                layer_index: int, batch: int) -> float:
  """Mean squared error over held-out windows h, target [n, T, D] of the block `layer_params`
  run with the pipeline's jitted forward (what the propagation computes), f64 accumulation."""
  total, count = 0.0, 0
  k = capture.kind_index(model, layer_index)
  for start in range(0, h.shape[0], batch):
    out = capture._forward(model, layer_params, jnp.asarray(h[start:start + batch]), k)  # pylint: disable=protected-access
    diff = np.asarray(out, np.float64) - np.asarray(target[start:start + batch], np.float64)
    total += float(np.sum(diff * diff))
    count += diff.size
  return total / count


# ----------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass
class _Best:
  """Best measurement so far: held-out error, step, packed weights and block params."""

  error: float
  step: int
  qweights: dict
  layer_params: Params


def _stack(acts) -> np.ndarray:
  """[N, T, D] host copy of an `Activations` (or a list of batches)."""
  return np.concatenate([np.asarray(h) for h in acts], axis=0)


def tune_block(cfg: TuneConfig, model, layer_params: Params,
               qweights: dict[str, qweight.QuantizedWeight], paths: dict[str, Path],
               inputs, targets, layer_index: int) -> tuple[Params, dict, dict]:
  """Tunes one solved block (module docstring).

  Args:
    layer_params: the solved block (weights written back as `export.dequantized_weight`).
    qweights: module name -> QuantizedWeight of the block's quantized linears.
    paths: module name -> linear path in the block.
    inputs, targets: the block's inputs and the full-precision block's outputs on them, each
      an `Activations` (or list of batches) totalling [N, T, D] windows in the same order.
    layer_index: the block's index (its kind picks the compiled block).
  Returns:
    (block params, packed weights, record): the best measured parameters (the inputs when no
    step improved the held-out error), and the record: heldout_mse_before / _after, their
    ratio, steps_run, best_step, train_loss_first / _last, tuned (element counts per kind),
    seconds.
  """
  start = time.perf_counter()
  # Keyed by the path in the block ("self_attn.q_proj"): the same jitted step for every block
  # of a kind.
  names = {".".join(paths[n]): n for n in sorted(qweights)}
  local_paths = {local: paths[n] for local, n in names.items()}
  local_qw = {local: qweights[n] for local, n in names.items()}
  layer_params, local_qw, record = _tune_local(cfg, model, layer_params, local_qw, local_paths,
                                               _stack(inputs), _stack(targets), layer_index)
  record["seconds"] = round(time.perf_counter() - start, 4)
  return layer_params, {names[local]: qw for local, qw in local_qw.items()}, record


def _tune_local(cfg: TuneConfig, model, layer_params: Params, qweights: dict, paths: dict,
                h: np.ndarray, t: np.ndarray, layer_index: int) -> tuple[Params, dict, dict]:
  """`tune_block` on weights keyed by their local names, inputs / targets h, t [N, T, D]."""
  n_hold = cfg.holdout_windows(h.shape[0])
  if not 0 < n_hold < h.shape[0]:
    raise ValueError(f"tune: {n_hold} held-out of {h.shape[0]} calibration windows")
  h_train, t_train, h_hold, t_hold = h[:-n_hold], t[:-n_hold], h[-n_hold:], t[-n_hold:]
  theta = initial_theta(layer_params, qweights, cfg.params)
  best = _Best(heldout_mse(model, layer_params, h_hold, t_hold, layer_index, cfg.batch_windows),
               0, qweights, layer_params)
  before = best.error
  opt_state = optimizer(cfg).init(theta)
  k = capture.kind_index(model, layer_index)
  order = _window_order(cfg, h_train.shape[0])
  losses, stale, step = [], 0, 0
  device_qw = jax.device_put(qweights)
  for step in range(1, cfg.steps + 1):
    idx = next(order)
    theta, opt_state, loss = _train_step_jit(cfg, model, k, _static_paths(paths), theta,
                                             opt_state, layer_params, device_qw,
                                             jnp.asarray(h_train[idx]), jnp.asarray(t_train[idx]))
    losses.append(loss)
    if step % cfg.eval_every and step != cfg.steps:
      continue
    qw_r, lp_r = rounded(theta, layer_params, qweights)
    lp_r = stored_block(lp_r, qw_r, paths)
    error = heldout_mse(model, lp_r, h_hold, t_hold, layer_index, cfg.batch_windows)
    if error < best.error:
      best, stale = _Best(error, step, qw_r, lp_r), 0
    else:
      stale += 1
      if cfg.patience and stale >= cfg.patience:
        break
  losses = [float(x) for x in jax.device_get(losses)]
  record = dict(heldout_mse_before=before, heldout_mse_after=best.error,
                heldout_ratio=best.error / before if before > 0 else None,
                heldout_windows=n_hold, steps_run=step, best_step=best.step,
                train_loss_first=losses[0] if losses else None,
                train_loss_last=losses[-1] if losses else None,
                tuned=_tuned_counts(theta))
  return best.layer_params, best.qweights, record


def _window_order(cfg: TuneConfig, n: int):
  """Endless batches of training-window indices: shuffled epochs (seeded), `batch_windows`
  each (fewer windows than that: all of them every step)."""
  rng = np.random.default_rng(cfg.seed)
  b = min(cfg.batch_windows, n)
  while True:
    perm = rng.permutation(n)
    for s in range(0, n - b + 1, b):
      yield np.sort(perm[s:s + b])


def _tuned_counts(theta: dict) -> dict[str, int]:
  """Number of tuned values per field name (norm leaves under "norms")."""
  counts: dict[str, int] = {}
  for fields in theta["qw"].values():
    for f, v in fields.items():
      counts[f] = counts.get(f, 0) + int(v.size)
  if theta["norms"]:
    counts["norms"] = sum(int(v.size) for v in theta["norms"].values())
  return counts


def summarize(records: list[dict]) -> dict:
  """Per-run totals of the blocks' tune records (each linear record of a block carries its
  block's record under "tune"): blocks, seconds, summed held-out errors before / after."""
  blocks = {}
  for r in records:
    if "tune" in r:
      blocks[r["layer"]] = r["tune"]
  if not blocks:
    return dict(blocks=0)
  before = sum(b["heldout_mse_before"] for b in blocks.values())
  after = sum(b["heldout_mse_after"] for b in blocks.values())
  return dict(blocks=len(blocks), seconds=round(sum(b["seconds"] for b in blocks.values()), 3),
              heldout_mse_before_sum=before, heldout_mse_after_sum=after,
              improved_blocks=sum(b["heldout_mse_after"] < b["heldout_mse_before"]
                                  for b in blocks.values()),
              steps_run=[blocks[i]["steps_run"] for i in sorted(blocks)])
