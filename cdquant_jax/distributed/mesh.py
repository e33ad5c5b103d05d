"""The device mesh of a scaled-out run: axes "data" (calibration batch) and "model" (weights).

    cfg = MeshConfig(data="auto", model=1)   # every device on the data axis
    mesh = make_mesh(cfg)                    # jax.sharding.Mesh [data, model]
    MeshConfig(data=2, model=4, shard_weights=True)  # block weights split over "model"

"auto" takes every device the model axis leaves: data = n_devices // model. A fixed size uses
the first data · model devices (which must divide the device count, so that the rest of the
machine can form other meshes of the same shape).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import numpy as np

from cdquant_jax import config as config_lib

AXES = ("data", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Mesh sizes (the run config's `mesh` section)."""

  # Devices on the calibration-batch axis; "auto" = all devices the model axis leaves.
  data: int | Literal["auto"] = "auto"
  # Devices on the weight axis (output rows of each solve).
  model: int = 1
  # Each block's linear weights split over "model" on their output rows while the block runs
  # its capture and propagation programs; for blocks that do not fit one device.
  shard_weights: bool = False

  def __post_init__(self):
    check = config_lib.reject_unless
    data_ok = self.data == "auto" or (_is_int(self.data) and self.data > 0)
    check(data_ok, f"mesh.data must be a positive integer or 'auto', got {self.data!r}")
    check(_is_int(self.model) and self.model > 0,
          f"mesh.model must be a positive integer, got {self.model!r}")
    check(isinstance(self.shard_weights, (bool, np.bool_)),
          f"mesh.shard_weights must be true or false, got {self.shard_weights!r}")
    check(not self.shard_weights or self.model > 1,
          f"mesh.shard_weights=true needs mesh.model > 1, got model={self.model} "
          "(nothing to shard the weights over)")

  def sizes(self, n_devices: int) -> tuple[int, int]:
    """(data, model) on a machine of `n_devices` devices (ConfigError if they do not fit)."""
    check = config_lib.reject_unless
    check(n_devices % self.model == 0,
          f"mesh.model={self.model} must divide the device count {n_devices}")
    data = n_devices // self.model if self.data == "auto" else self.data
    check(n_devices % (data * self.model) == 0,
          f"mesh.data={data} x mesh.model={self.model} must divide the device count "
          f"{n_devices}")
    return data, self.model

  @classmethod
  def parse(cls, text: str) -> "MeshConfig":
    """From "data=8,model=1" (either key may be left out; data=auto is allowed), optionally
    with ",shard_weights=true"."""
    values: dict[str, int | str | bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
      key, sep, value = item.partition("=")
      key = key.strip()
      config_lib.reject_unless(bool(sep) and key in AXES + ("shard_weights",),
                               f"mesh: expected data=N,model=M, got {text!r}")
      value = value.strip()
      if key == "shard_weights":
        config_lib.reject_unless(value in ("true", "false"),
                                 f"mesh.shard_weights must be true or false, got {value!r}")
        values[key] = value == "true"
      elif value == "auto":
        values[key] = value
      else:
        config_lib.reject_unless(value.lstrip("-").isdigit(),
                                 f"mesh.{key} must be an integer, got {value!r}")
        values[key] = int(value)
    return cls(**values)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A [data, model] mesh over the first data · model of `devices` (default: jax.devices())."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = cfg.sizes(len(devices))
  # [data · model] -> [data, model]: neighbouring devices share a data index.
  grid = np.array(devices[:data * model], dtype=object).reshape(data, model)
  return jax.sharding.Mesh(grid, AXES)
