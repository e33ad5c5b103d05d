"""compressed-tensors `pack-quantized` (what llm-compressor writes; vLLM and transformers load it).

Per quantized linear "<m>" (N = out_features, K = in_features, B = bits; codes are stored with
the library's offset 2^(B−1), i.e. as our unsigned codes q ∈ [0, 2^B)):
  <m>.weight_packed      int32 [N, ceil(K·B/32)]  codes packed along the INPUT dimension as one
                                                 dense little-endian bit stream per 32 values
                                                 (value j of a chunk at bit B·j; values may
                                                 straddle words for B = 3, 5, 6, 7)
  <m>.weight_scale       [N, n_groups], the model dtype when it holds the scales, else float32
  <m>.weight_zero_point  int32 [ceil(N·B/32), n_groups]  asymmetric grids only: zero + offset
                                                 packed the same way along the OUTPUT dimension
  <m>.weight_shape       int64 [2] = (N, K)
  w[n, k] = scale[n, g] · ((q − 2^(B−1)) − (zero − 2^(B−1))) = scale · (q − zero),  g = k // G
config.json `quantization_config`: quant_method "compressed-tensors", format "pack-quantized",
status "compressed", one config group per distinct (bits, group size, symmetry): targets
["Linear"] when every quantized module shares it, else the modules' names as `re:` patterns;
`ignore` lists the linears left dense (lm_head, excluded modules).

Cannot hold: act-order without static groups (compressed-tensors removed `g_idx` / actorder
"group"; use gptq), fractional zeros, and (like every format) SpQR statistics and outliers.
vLLM's WNA16 kernels load 4 and 8 bits; the library and transformers decompress 1..8.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from cdquant_jax import io_utils
from cdquant_jax.export import common
from cdquant_jax.export.common import ExportOptions, LinearGrid, Run
from cdquant_jax.quant import packing

NAME = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"
# The compressed-tensors release whose layout this writes (recorded as the config's version).
LAYOUT_VERSION = "0.20.0"


def why_not(g: LinearGrid, options: ExportOptions) -> str | None:
  """None when pack-quantized holds the grid exactly, else what it cannot hold."""
  del options
  if not g.contiguous_groups:
    return ("act-order groups that are not contiguous (g_idx; compressed-tensors removed "
            "actorder 'group' — quantize with static_groups=true)")
  reason = common.integer_zeros(g)
  if reason:
    return reason
  if (g.zero < 0).any() or (g.zero > g.maxq).any():
    return f"zero points outside 0..{g.maxq}"
  return None


def pack_dense(values: np.ndarray, bits: int) -> np.ndarray:
  """[R, C] codes in [0, 2^bits) -> int32 [R, ceil(C·bits/32)]: the dense bit stream of each
  row (compressed-tensors `pack_to_int32` with packed_dim=1, after its offset)."""
  rows, cols = values.shape
  k_pad = packing.padded_rows(cols)
  padded = np.zeros((k_pad, rows), np.int64)
  padded[:cols] = values.T
  words = packing.pack_codes(padded, bits)
  if not packing.is_flat(bits):  # planes [bits, K/32, R] -> chunk-major [K·bits/32, R]
    words = words.transpose(1, 0, 2).reshape(-1, rows)
  return np.ascontiguousarray(words.T[:, :-(-cols * bits // 32)]).view(np.int32)


def _scale_dtype(scale: np.ndarray, model_dtype: str) -> str:
  back = scale.astype(model_dtype).astype(np.float32)
  return model_dtype if np.array_equal(back.view(np.uint32), scale.view(np.uint32)) \
      else "float32"


def linear_tensors(g: LinearGrid, model_dtype: str) -> dict[str, np.ndarray]:
  """weight_packed, weight_scale, (weight_zero_point), weight_shape of one linear."""
  out = {
      "weight_packed": pack_dense(g.codes, g.bits),
      "weight_scale": g.scale.astype(_scale_dtype(g.scale, model_dtype)),
      "weight_shape": np.array([g.meta.d_out, g.meta.d_in], np.int64),
  }
  if not g.meta.sym:
    out["weight_zero_point"] = pack_dense(g.zero.astype(np.int64).T, g.bits).T
  return out


def _weights_args(g: LinearGrid) -> dict:
  return {"num_bits": g.bits, "type": "int", "symmetric": bool(g.meta.sym),
          "group_size": None if g.per_channel else g.meta.group_size,
          "strategy": "channel" if g.per_channel else "group", "block_structure": None,
          "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def quantization_config(run: Run, grids: dict[str, LinearGrid]) -> dict:
  """config.json's `quantization_config` (see the module docstring)."""
  schemes: dict[str, list[str]] = {}
  for name, g in grids.items():
    schemes.setdefault(json.dumps(_weights_args(g), sort_keys=True), []).append(name)
  one = len(schemes) == 1
  groups = {}
  for i, (args, names) in enumerate(schemes.items()):
    targets = ["Linear"] if one else [f"re:^{re.escape(common.hf_name(n))}$" for n in names]
    groups[f"group_{i}"] = {"targets": targets, "weights": json.loads(args),
                            "input_activations": None, "output_activations": None,
                            "format": "pack-quantized"}
  model = run.model
  linears = [f"layers.{i}.{'.'.join(path)}" for i in range(model.num_layers)
             for path in model.linear_paths()]
  ignore = [common.hf_name(n) for n in linears if n not in grids]
  if not run.config.tie_word_embeddings:
    ignore.append("lm_head")
  return {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
          "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
          "transform_config": {}, "version": LAYOUT_VERSION}


def write(run: Run, grids: dict[str, LinearGrid], output: str, options: ExportOptions) -> dict:
  """Writes the pack-quantized directory; returns its quantization config."""
  del options
  state = common.hf_dense_state(run, {f"{name}.weight" for name in grids})
  for name, g in grids.items():
    for field, array in linear_tensors(g, run.dtype).items():
      state[f"{common.hf_name(name)}.{field}"] = array
  config = common.hf_config(run.config, run.dtype)
  config["quantization_config"] = quantization_config(run, grids)
  os.makedirs(output, exist_ok=True)
  common.write_state(os.path.join(output, WEIGHTS_FILE), state)
  common.write_hf_side_files(run, output, config)
  return config["quantization_config"]
