"""Packed weights for the kernel tests, each with the solver's own weight Q as the oracle.

Small odd shapes (d_out 40/48/72, d_in 96/160) covering 2/3/4-bit codes, power-of-2 and
non-power-of-2 groups (per-channel G = d_in), act-order permutations, f16/f32 statistics,
SpQR "qq" statistics (3-bit and 2-bit second level, quantized and float zeros) and outliers
(many, and fewer than one vector step).
"""

import functools

import numpy as np

from cdquant_jax.kernels.packed_matmul import BlockConfig
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.quant.qweight import pack_result
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.fixtures.layer_problems import layer_problem
from tests.quant.qweight_fixtures import spqr_like_result

# Small tiles so the odd shapes exercise overhanging N blocks, several K tiles and K splits.
TEST_CONFIG = BlockConfig(block_n=32, block_k=64, k_splits=2)


def _rtn(bits, group_size, d_out, d_in, fp16=False):
  W, H = layer_problem(np.random.default_rng(bits), d_out, d_in, dtype=np.float32)
  result = rtn(W, H, RTNConfig(grid=GridConfig(bits=bits, group_size=group_size,
                                               fp16_stats=fp16)))
  return result, pack_result(result)


def _gptq(bits, group_size, d_out, d_in):
  W, H = layer_problem(np.random.default_rng(10 + bits), d_out, d_in, dtype=np.float32)
  cfg = GPTQConfig(grid=GridConfig(bits=bits, group_size=group_size), act_order=True)
  result = gptq(W, H, cfg)
  return result, pack_result(result)


def _spqr(bits, qq_bits, d_out, d_in, quantize_zero, outlier_share):
  result = spqr_like_result(np.random.default_rng(20 + bits), d_out=d_out, d_in=d_in,
                            bits=bits, qq_bits=qq_bits, quantize_zero=quantize_zero,
                            outlier_share=outlier_share)
  return result, pack_result(result)


BUILDERS = {
    "w4_g32_f16": lambda: _rtn(4, 32, 40, 96, fp16=True),
    "w3_g16_actorder": lambda: _gptq(3, 16, 72, 160),
    "w2_perchannel_160": lambda: _rtn(2, -1, 40, 160),
    "w3_perchannel_96": lambda: _rtn(3, -1, 72, 96),
    "w4_g32_actorder": lambda: _gptq(4, 32, 40, 160),
    "spqr_w3_g16_qq3": lambda: _spqr(3, 3, 48, 160, True, 0.05),
    "spqr_w2_g16_qq2_fewoutliers": lambda: _spqr(2, 2, 48, 96, False, 0.003),
}


# Model-like widths (not in BUILDERS: too large for the interpreted suite): default tiles,
# several pipeline steps and K splits, shared-memory budget at prefill.
WIDE_BUILDERS = {
    "wide_w4_g128": lambda: _rtn(4, 128, 256, 4096),
    "wide_spqr_w3_g16_qq3": lambda: _spqr(3, 3, 256, 2048, True, 0.01),
}


@functools.lru_cache(maxsize=None)
def case(name: str):
  """(SolveResult, QuantizedWeight) of a named case (built once per test session)."""
  return {**BUILDERS, **WIDE_BUILDERS}[name]()
