"""Save / load a quantized NNX model: orbax for the state, a JSON of the quantized linears.

Directory layout:
  <dir>/state/            orbax StandardCheckpointer of `nnx.state(model)` (every variable:
                          params, QuantArray codes/stats, biases)
  <dir>/quantized.json    {"format_version", "linears": [{path, meta (QuantMeta fields),
                          layout (EinsumLayout), bias_dtype, dtype, options, linear_path
                          (a zoo Linear's path in its block; absent in older saves)}]}

Loading follows the flax NNX checkpointing guide: the user's constructor builds the
unquantized model under `nnx.eval_shape` (no memory), the JSON turns the listed linears into
`QuantizedLinear.placeholder`s of the same structure, and orbax restores the state into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cdquant_jax import io_utils
from cdquant_jax.models.layers import LinearOptions
from cdquant_jax.nnx import graph
from cdquant_jax.nnx.layout import EinsumLayout
from cdquant_jax.nnx.qlinear import QuantizedLinear, bias_dtype_name
from cdquant_jax.quant.qweight import QuantMeta

FORMAT_VERSION = 1
STATE_DIR = "state"
META_FILE = "quantized.json"


def _entry(path: graph.Path, module: QuantizedLinear) -> dict:
  """The JSON record that recreates one QuantizedLinear's structure."""
  dtype = None if module.dtype is None else np.dtype(module.dtype).name
  return {"path": list(path), "meta": dataclasses.asdict(module.meta),
          "layout": module.layout.to_dict(), "bias_dtype": bias_dtype_name(module),
          "dtype": dtype, "options": dataclasses.asdict(module.options),
          "linear_path": list(module.path)}


def quantized_linears(model: nnx.Module) -> list[tuple[graph.Path, QuantizedLinear]]:
  return [(p, m) for p, m in graph.modules(model) if isinstance(m, QuantizedLinear)]


def save_quantized_nnx(directory: str | os.PathLike, model: nnx.Module) -> None:
  """Writes `model` (with its QuantizedLinears) to `directory` (created; must not hold a
  previous save)."""
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, STATE_DIR), nnx.state(model))
  checkpointer.wait_until_finished()
  linears = [_entry(p, m) for p, m in quantized_linears(model)]
  io_utils.atomic_write_json(os.path.join(directory, META_FILE),
                             {"format_version": FORMAT_VERSION, "linears": linears})


def _placeholder(entry: dict) -> QuantizedLinear:
  meta = QuantMeta(**entry["meta"])
  meta.validate()
  return QuantizedLinear.placeholder(meta, EinsumLayout.from_dict(entry["layout"]),
                                     entry["bias_dtype"], dtype=entry["dtype"],
                                     options=LinearOptions(**entry["options"]),
                                     path=tuple(entry.get("linear_path", ())))


def read_entries(directory: str | os.PathLike) -> list[dict]:
  """The quantized linears recorded beside the state (ValueError on another format)."""
  with open(os.path.join(os.fspath(directory), META_FILE), encoding="utf-8") as f:
    data = json.load(f)
  if data.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{directory}: {META_FILE} format_version {data.get('format_version')!r}, "
                     f"this code reads {FORMAT_VERSION}")
  return data["linears"]


def load_quantized_nnx(directory: str | os.PathLike,
                       make_model: Callable[[], nnx.Module]) -> nnx.Module:
  """The model saved by `save_quantized_nnx`.

  Args:
    directory: the save directory.
    make_model: builds the UNQUANTIZED model (same constructor and arguments as before
      quantization); it runs under nnx.eval_shape, so no weights are materialised.
  """
  directory = os.path.abspath(os.fspath(directory))
  entries = read_entries(directory)

  def build() -> nnx.Module:
    model = make_model()
    for entry in entries:
      graph.set_node(model, tuple(entry["path"]), _placeholder(entry))
    return model

  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, STATE_DIR), abstract_state)
  return nnx.merge(graphdef, state)
