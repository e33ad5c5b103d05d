"""GPTQ checkpoint format, v1 ("gptq": AutoGPTQ / GPTQModel / transformers / vLLM).

Per quantized linear "<m>" (N = out_features, K = in_features, pf = 32 / bits values a word):
  <m>.qweight  int32 [K·bits/32, N]  codes packed along the INPUT dimension, low bits first:
                                     word r of column n holds code[n, r·pf + j] at bit bits·j;
                                     3 bits: every 32 rows are one 96-bit little-endian stream
                                     over 3 words (values 10 and 21 straddle two words)
  <m>.qzeros   int32 [n_groups, N·bits/32]  (zero − 1) packed the same way along the OUTPUT
                                     dimension (the v1 convention; symmetric 4-bit words read
                                     0x77777777)
  <m>.scales   float16 [n_groups, N]
  <m>.g_idx    int32 [K]             group of input column k (k // group_size, or the act-order
                                     group); desc_act = true when it is not k // group_size
  <m>.bias     unchanged, when the linear has one
  w[n, k] = scales[g, n] · (code[n, k] − (qzeros[g, n] + 1)),  g = g_idx[k]
Everything else (embeddings, norms, lm_head) is stored unquantized under its HF name; config.json
carries `quantization_config` and quantize_config.json the same fields (bits, group_size,
desc_act, sym, static_groups, true_sequential, damp_percent, checkpoint_format).

What v1 cannot hold: bits other than 2, 3, 4, 8; fractional zeros; a zero point of 0 (stored
as −1 it wraps to 2^bits − 1); scales float16 does not hold (unless rounded by request); K or N
not a multiple of 32; different bits / group size / symmetry across modules; block linears left
unquantized (loaders quantize every linear of a block).
"""

from __future__ import annotations

import os

import numpy as np

from cdquant_jax import io_utils
from cdquant_jax.export import common
from cdquant_jax.export.common import ExportOptions, LinearGrid, Run
from cdquant_jax.quant import packing

NAME = "gptq"
BITS = (2, 3, 4, 8)
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"


def why_not(g: LinearGrid, options: ExportOptions) -> str | None:
  """None when GPTQ v1 holds the grid exactly, else what it cannot hold."""
  if g.bits not in BITS:
    return f"{g.bits}-bit codes (GPTQ kernels load {', '.join(map(str, BITS))} bits)"
  if g.meta.d_in % 32 or g.meta.d_out % 32:
    return f"a {g.meta.d_out}x{g.meta.d_in} weight (packing needs multiples of 32)"
  reason = common.integer_zeros(g)
  if reason:
    return reason
  if (g.zero < 1).any() or (g.zero > g.maxq).any():
    n, grp = np.argwhere((g.zero < 1) | (g.zero > g.maxq))[0]
    return (f"zero point {g.zero[n, grp]:g} at channel {n}, group {grp} (v1 stores zero − 1 in "
            f"{g.bits} bits, so only 1..{g.maxq} survive)")
  return common.fp16_scales(g, options)


def pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
  """[R, C] ints in [0, 2^bits) -> int32 [R·bits/32, C], GPTQ order (R a multiple of 32)."""
  words = packing.pack_codes(values, bits)
  if not packing.is_flat(bits):  # planes [bits, R/32, C] -> chunk-major words [R·bits/32, C]
    words = words.transpose(1, 0, 2).reshape(-1, values.shape[1])
  return np.ascontiguousarray(words).view(np.int32)


def linear_tensors(g: LinearGrid) -> dict[str, np.ndarray]:
  """qweight, qzeros, scales, g_idx of one linear (see the module docstring)."""
  zeros_minus_one = (g.zero.astype(np.int64) - 1).T  # [n_groups, N]
  return {
      "qweight": pack_along_rows(g.codes.T, g.bits),  # [K·bits/32, N]
      "qzeros": pack_along_rows(zeros_minus_one.T, g.bits).T.copy(),  # [n_groups, N·bits/32]
      "scales": g.scale.T.astype(np.float16),
      "g_idx": g.group_index.astype(np.int32),
  }


def _scheme(g: LinearGrid) -> tuple[int, int, bool]:
  return g.bits, -1 if g.per_channel else g.meta.group_size, g.meta.sym


def quantize_config(run: Run, grids: dict[str, LinearGrid]) -> dict:
  """The GPTQ config of a run whose modules share one scheme (ExportError otherwise)."""
  schemes = {name: _scheme(g) for name, g in grids.items()}
  first = next(iter(schemes.values()))
  odd = [name for name, s in schemes.items() if s != first]
  if odd:
    raise common.ExportError(
        f"{odd[0]}: gptq cannot hold modules with different bits/group_size/sym "
        f"({schemes[odd[0]]} vs {first} of {next(iter(schemes))}); export it as "
        "compressed-tensors (one config group per scheme)")
  bits, group_size, sym = first
  return {
      "quant_method": "gptq", "bits": bits, "group_size": group_size,
      "desc_act": any(not g.contiguous_groups for g in grids.values()), "sym": sym,
      "static_groups": bool(common.knob(run, "static_groups", False)),
      "true_sequential": common.true_sequential(run),
      "damp_percent": float(common.knob(run, "percdamp", 0.01)),
      "checkpoint_format": "gptq", "model_file_base_name": None, "model_name_or_path": None,
  }


def _check_every_block_linear(run: Run, grids: dict[str, LinearGrid]) -> None:
  model = run.model
  names = [f"layers.{i}.{'.'.join(path)}" for i in range(model.num_layers)
           for path in model.linear_paths()]
  missing = [n for n in names if n not in grids]
  if missing:
    raise common.ExportError(
        f"{missing[0]}: gptq cannot hold a block linear left unquantized (GPTQ loaders "
        f"quantize every linear of a block; {len(missing)} such modules); export it as "
        "compressed-tensors (its ignore list keeps them dense)")


def write(run: Run, grids: dict[str, LinearGrid], output: str, options: ExportOptions) -> dict:
  """Writes the GPTQ v1 directory; returns its quantization config."""
  del options
  _check_every_block_linear(run, grids)
  qcfg = quantize_config(run, grids)
  state = common.hf_dense_state(run, {f"{name}.weight" for name in grids})
  for name, g in grids.items():
    for field, array in linear_tensors(g).items():
      state[f"{common.hf_name(name)}.{field}"] = array
  config = common.hf_config(run.config, run.dtype)
  config["quantization_config"] = {k: v for k, v in qcfg.items() if v is not None}
  os.makedirs(output, exist_ok=True)
  common.write_state(os.path.join(output, WEIGHTS_FILE), state)
  io_utils.atomic_write_json(os.path.join(output, QUANTIZE_CONFIG_FILE), qcfg)
  common.write_hf_side_files(run, output, config)
  return config["quantization_config"]
