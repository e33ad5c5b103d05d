"""The friendly solver settings ("knobs"), spelled once.

Each knob names one setting that means the same for every method that has it, and the config
field that holds it in that method's config: the first of its `paths` alternatives that the
method's config class has (an alternative may set several fields, e.g. qq_bits). Everything
that exposes knobs is generated from `KNOBS`: the `cdquant layer` flags (`add_arguments`), the
run config's `quant.knobs` section (`KnobSettings`) and the Python keywords of `apply`
(`cdquant_jax.solve(..., bits=3)`).

A knob a method does not have raises ConfigError naming the method; a knob value that the
method's config cannot honour is rejected by the config class itself when it is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from cdquant_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Knob:
  """One friendly setting.

  name: the Python keyword / YAML key (the flag is --name-with-dashes).
  type: int, float, bool or str.
  help: what it means, for every method that has it.
  paths: alternatives, each a tuple of config field paths set together; the first alternative
    whose fields all exist in a method's config is that method's field.
  choices: allowed values of a str knob.
  """

  name: str
  type: type
  help: str
  paths: tuple[tuple[str, ...], ...]
  choices: tuple[str, ...] | None = None

  @property
  def flag(self) -> str:
    return "--" + self.name.replace("_", "-")

  def fields_in(self, cfg: Any) -> tuple[str, ...]:
    """The field paths this knob sets in `cfg` (empty when the method has no such setting)."""
    for alternative in self.paths:
      if all(config_lib.has_path(cfg, p) for p in alternative):
        return alternative
    return ()


KNOBS: tuple[Knob, ...] = (
    Knob("bits", int, "bits per weight (2-8)", (("grid.bits",),)),
    Knob("group_size", int, "input columns per group; -1 = one group per row (per channel)",
         (("grid.group_size",),)),
    Knob("sym", bool, "symmetric grid (zero point fixed at the middle code)", (("grid.sym",),)),
    Knob("scale_search", str, "how the grid range is fitted (owc: H-weighted clipping)",
         (("grid.scale_search",),), choices=("minmax", "mse", "owc")),
    Knob("round_zero", bool, "round the fractional zero point (SpQR flavour) to an integer",
         (("grid.round_zero",),)),
    Knob("act_order", bool, "the GPTQ-style sweep processes columns by descending diag(H): "
         "GPTQ's and SpQR's own sweep, the GPTQ start of CD, BCD and cyclic CD",
         (("act_order",), ("init.act_order",))),
    Knob("static_groups", bool, "GPTQ fits every group on the original weights before the sweep",
         (("static_groups",), ("init.static_groups",))),
    Knob("percdamp", float, "relative damping of H (fraction of its mean diagonal) of the "
         "GPTQ-style sweep", (("percdamp",), ("init.percdamp",))),
    Knob("blocksize", int, "columns per block of the GPTQ-style sweep (or of cyclic CD's lazy "
         "batches); speed only", (("blocksize",), ("init.blocksize",))),
    Knob("init", str, "start of the descent solvers (OWC = rtn with --scale-search owc)",
         (("init.method",),), choices=("rtn", "gptq")),
    Knob("max_steps_factor", float, "descent step budget per row, a multiple of d_in (BCD: its "
         "block moves; SpQR+CD: its CD rounds)", (("max_steps_factor",), ("cd.max_steps_factor",))),
    Knob("refit_rounds", int, "closed-form grid refits alternating with CD (group grids)",
         (("refit_rounds",), ("cd.refit_rounds",))),
    Knob("qq_bits", int, "SpQR second-level bits of the scales and zeros",
         (("qq.scale_bits", "qq.zero_bits"),)),
    Knob("qq_group_size", int, "SpQR second-level group (output rows, β2)", (("qq.group_size",),)),
    Knob("outlier_threshold", float, "SpQR relative outlier threshold τ (inf: no outliers)",
         (("outlier_threshold",),)),
    Knob("simplified_outliers", bool, "SpQR: skip the leave-one-out outlier screen",
         (("simplified_outliers",),)),
)

BY_NAME = {k.name: k for k in KNOBS}


def apply(cfg: Any, knobs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
  """`cfg` with friendly knobs set (None values are skipped); the config is built once.

  Raises:
    ConfigError: an unknown knob, a knob this method has no setting for, or a value the
      method's config rejects.
  """
  knobs = {**(knobs or {}), **kwargs}
  changes = {}
  for name, value in knobs.items():
    if value is None:
      continue
    if name not in BY_NAME:
      raise config_lib.ConfigError(f"unknown knob {name!r}; known: {sorted(BY_NAME)}")
    fields = BY_NAME[name].fields_in(cfg)
    if not fields:
      raise config_lib.ConfigError(f"{type(cfg).__name__} has no setting for {name} "
                                   f"({BY_NAME[name].flag})")
    changes.update({path: value for path in fields})
  return config_lib.replace_paths(cfg, changes) if changes else cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """One command-line flag per knob (default None = leave the method's value)."""
  for knob in KNOBS:
    if knob.type is bool:
      parser.add_argument(knob.flag, action=argparse.BooleanOptionalAction, default=None,
                          help=knob.help)
    else:
      parser.add_argument(knob.flag, type=knob.type, choices=knob.choices, default=None,
                          help=knob.help)


def from_namespace(args: argparse.Namespace) -> dict[str, Any]:
  """{knob: value} of the flags that were given."""
  return {k.name: getattr(args, k.name) for k in KNOBS if getattr(args, k.name) is not None}


def _settings_class() -> type:
  fields = [(k.name, k.type | None, dataclasses.field(default=None)) for k in KNOBS]

  def as_dict(self) -> dict[str, Any]:
    return {k.name: getattr(self, k.name) for k in KNOBS if getattr(self, k.name) is not None}

  cls = dataclasses.make_dataclass(
      "KnobSettings", fields, frozen=True, kw_only=True, namespace={"as_dict": as_dict,
      "__doc__": "Friendly solver settings (`knobs.KNOBS`); None leaves the method's value."})
  cls.__module__ = __name__
  return cls


KnobSettings = _settings_class()
