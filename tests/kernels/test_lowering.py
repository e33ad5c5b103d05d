"""Every Pallas kernel lowers for CUDA on a CPU-only machine (Triton backend).

jax.jit(f).trace(...).lower(lowering_platforms=("cuda",)) runs the Pallas→Triton lowering, so
operations a GPU backend cannot lower (gathers from registers, non-power-of-2 arrays,
multi-argument concatenates, ...) fail here in CI rather than on the GPU machine.
"""

import jax
import jax.numpy as jnp
import pytest

from cdquant_jax.kernels.packed_matmul import BlockConfig, pallas_packed_matmul
from tests.kernels.packed_matmul.cases import BUILDERS, TEST_CONFIG, case

TRITON_CALL = "__gpu$xla.gpu.triton"
LOWER = [(name, 1, jnp.float32) for name in BUILDERS] + [
    (name, 16, jnp.float32) for name in ("w3_g16_actorder", "w2_perchannel_160",
                                         "spqr_w3_g16_qq3")] + [
    ("spqr_w3_g16_qq3", 4, jnp.bfloat16), ("w4_g32_f16", 1, jnp.float16)]


def _lowered_text(qw, batch, dtype, config):
  f = lambda x, w: pallas_packed_matmul(x, w, config=config, interpret=False)
  x = jax.ShapeDtypeStruct((batch, qw.meta.d_in), dtype)
  return jax.jit(f).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name, batch, dtype", LOWER,
                         ids=[f"{n}-B{b}-{jnp.dtype(d).name}" for n, b, d in LOWER])
def test_kernels_lower_for_cuda(name, batch, dtype):
  _, qw = case(name)
  text = _lowered_text(qw, batch, dtype, TEST_CONFIG)
  # one dense kernel, plus the outlier kernel when there are outliers
  assert text.count(TRITON_CALL) == 1 + (qw.meta.nnz > 0)


def test_default_gpu_tiles_lower_for_cuda():
  _, qw = case("spqr_w3_g16_qq3")
  text = _lowered_text(qw, 1, jnp.bfloat16, BlockConfig())
  assert text.count(TRITON_CALL) == 2
