"""The shared suite natively on a GPU (skipped elsewhere): Pallas kernels vs the spec."""

import jax
import pytest

from tests.kernels.packed_matmul.test_base import PackedMatmulSuite


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestPallasTritonGPU(PackedMatmulSuite):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
