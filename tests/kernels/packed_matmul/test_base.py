"""The shared packed_matmul suite: every implementation against the spec on every case.

Subclasses set IMPLEMENTATION and INTERPRET (test_interpret.py: Pallas in interpret mode on
CPU; test_gpu.py: natively on a GPU). Each result is compared with two independent oracles:
  - numpy float64 x @ Q.T with Q the SOLVER's weight (never decoded from the container);
  - packed_matmul_reference (dequantize the container, f32 HIGHEST): the spec.
Tolerances are relative to the output scale max|y|, keyed by the activation dtype.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.kernels import quantized_linear
from cdquant_jax.kernels.packed_matmul import packed_matmul, packed_matmul_reference
from tests.kernels.packed_matmul.cases import BUILDERS, TEST_CONFIG, case

# Relative to max|reference|. f32: f32 accumulation-order noise only. bf16/f16 activations:
# the dot path multiplies bf16 weights (relative rounding 2^-8 per weight).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}

# (case, batch, dtype): B = 1 (GEMV path) on cases covering every bit width and statistic
# kind, every case at B = 3 (dot path, padded to 16), plus B = 16, other dtypes, B = 20
# (> max_batch: Triton dequantizes + one dense dot) and a prefill batch B = 130 (Mosaic: two
# token blocks of 128 in the kernel).
GEMV_CASES = ("w4_g32_f16", "w3_g16_actorder", "w2_perchannel_160", "spqr_w3_g16_qq3",
              "spqr_w2_g16_qq2_fewoutliers")
GRID = [(name, 1, jnp.float32) for name in GEMV_CASES] + [
    (name, 3, jnp.float32) for name in BUILDERS] + [
    ("spqr_w3_g16_qq3", 16, jnp.float32), ("w2_perchannel_160", 16, jnp.float32),
    ("w3_g16_actorder", 1, jnp.bfloat16), ("spqr_w3_g16_qq3", 3, jnp.bfloat16),
    ("w4_g32_f16", 16, jnp.float16), ("w4_g32_actorder", 20, jnp.float32),
    ("spqr_w3_g16_qq3", 130, jnp.bfloat16)]


def _x(batch, d_in, dtype, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, d_in)).astype(np.float32)
  return jnp.asarray(x, dtype)


class PackedMatmulSuite:
  IMPLEMENTATION = "reference"
  INTERPRET = None
  CONFIG = TEST_CONFIG
  # An implementation that multiplies f32 activations in bf16 (pallas_mosaic) sets
  # {**TOLERANCE, jnp.float32: TOLERANCE[jnp.bfloat16]}.
  TOLERANCE = TOLERANCE
  # Variants of an implementation (another BlockConfig) may run on a subset of the cases only
  # (a GPU run compiles every row): None = all.
  ONLY_CASES = None

  def matmul(self, x, qw):
    return packed_matmul(x, qw, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET,
                         config=self.CONFIG)

  @pytest.mark.parametrize("name, batch, dtype", GRID,
                           ids=[f"{n}-B{b}-{jnp.dtype(d).name}" for n, b, d in GRID])
  def test_matches_reference_and_solver_weights(self, name, batch, dtype):
    if self.ONLY_CASES is not None and name not in self.ONLY_CASES:
      pytest.skip(f"{type(self).__name__} runs {self.ONLY_CASES} only")
    result, qw = case(name)
    x = _x(batch, qw.meta.d_in, dtype)
    y = np.asarray(self.matmul(x, qw))
    assert y.shape == (batch, qw.meta.d_out) and y.dtype == np.float32
    spec = np.asarray(packed_matmul_reference(x, qw))
    oracle = np.asarray(x, np.float64) @ np.asarray(result.Q, np.float64).T
    scale = np.abs(oracle).max()
    tol = self.TOLERANCE[dtype]
    np.testing.assert_allclose(y, spec, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(y, oracle, rtol=0, atol=max(tol, 1e-5) * scale)

  def test_quantized_linear_flattens_leading_dims_and_adds_bias(self):
    result, qw = case("spqr_w3_g16_qq3")
    # [3, d_in] -> [1, 3, d_in]: the kernel sees B = 3 (same compiled kernel as the grid)
    x = _x(3, qw.meta.d_in, jnp.float32, seed=1).reshape(1, 3, qw.meta.d_in)
    bias = jnp.linspace(-1.0, 1.0, qw.meta.d_out)
    y = quantized_linear(x, qw, bias, implementation=self.IMPLEMENTATION,
                         interpret=self.INTERPRET, config=self.CONFIG)
    oracle = np.einsum("sti,oi->sto", np.asarray(x, np.float64),
                       np.asarray(result.Q, np.float64)) + np.asarray(bias)
    assert y.shape == (1, 3, qw.meta.d_out) and y.dtype == jnp.float32
    tol = max(self.TOLERANCE[jnp.float32], 1e-5)
    np.testing.assert_allclose(np.asarray(y), oracle, rtol=0, atol=tol * np.abs(oracle).max())
