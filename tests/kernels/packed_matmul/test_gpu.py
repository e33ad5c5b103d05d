"""The shared suite natively on a GPU (skipped elsewhere): Pallas kernels vs the spec.

pallas_mosaic runs on Hopper only (compute capability 9.x) and multiplies f32 activations as
bf16 (f32 accumulation), so its f32 rows use the bf16 tolerance; it runs every batch in the
kernel (the prefill row B = 130 included), both outlier modes and both wgmma A operand
sources (BlockConfig.wgmma_a).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from cdquant_jax.kernels.packed_matmul import gpu_compute_capability
from tests.kernels.packed_matmul.cases import TEST_CONFIG
from tests.kernels.packed_matmul.test_base import TOLERANCE, PackedMatmulSuite


def _is_hopper() -> bool:
  capability = gpu_compute_capability()
  return capability is not None and capability.startswith("9.")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasTritonGPU(PackedMatmulSuite):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False


@pytest.mark.gpu
@pytest.mark.skipif(not _is_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
class TestPallasMosaicGPU(PackedMatmulSuite):
  IMPLEMENTATION = "pallas_mosaic"
  INTERPRET = False
  TOLERANCE = {**TOLERANCE, jnp.float32: TOLERANCE[jnp.bfloat16]}


class TestPallasMosaicFusedOutliersGPU(TestPallasMosaicGPU):
  CONFIG = dataclasses.replace(TEST_CONFIG, outliers="fused")
  ONLY_CASES = ("spqr_w3_g16_qq3", "spqr_w2_g16_qq2_fewoutliers")  # the cases with outliers


class TestPallasMosaicRegistersAGPU(TestPallasMosaicGPU):
  CONFIG = dataclasses.replace(TEST_CONFIG, wgmma_a="registers")
  # 4-bit float statistics, 3-bit planes with act-order, 2-bit per-channel, SpQR qq + outliers
  ONLY_CASES = ("w4_g32_f16", "w3_g16_actorder", "w2_perchannel_160", "spqr_w3_g16_qq3")
