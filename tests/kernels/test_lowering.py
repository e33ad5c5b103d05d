"""Every Pallas kernel lowers for CUDA on a CPU-only machine (Triton and Mosaic GPU backends).

jax.jit(f).trace(...).lower(lowering_platforms=("cuda",)) runs the Pallas→Triton and the
Pallas→Mosaic GPU lowerings, so operations a GPU backend cannot lower (gathers from registers,
non-power-of-2 arrays, multi-argument concatenates, unannotated layouts, block copies Mosaic
cannot express, ...) fail here in CI rather than on the GPU machine. The Mosaic kernel's
numerics are checked on CPU by tests/kernels/packed_matmul/test_mosaic_emulation.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from cdquant_jax.kernels.packed_matmul import (BlockConfig, mosaic_operands,
                                               mosaic_packed_matmul, pallas_packed_matmul)
from tests.kernels.packed_matmul.cases import BUILDERS, TEST_CONFIG, WIDE_BUILDERS, case

TRITON_CALL = "__gpu$xla.gpu.triton"
LOWER = [(name, 1, jnp.float32) for name in BUILDERS] + [
    (name, 16, jnp.float32) for name in ("w3_g16_actorder", "w2_perchannel_160",
                                         "spqr_w3_g16_qq3")] + [
    ("spqr_w3_g16_qq3", 4, jnp.bfloat16), ("w4_g32_f16", 1, jnp.float16)]


def _cuda_text(f, qw, batch, dtype) -> str:
  """The StableHLO of f(x [batch, d_in] of dtype, qw) lowered for CUDA."""
  x = jax.ShapeDtypeStruct((batch, qw.meta.d_in), dtype)
  return jax.jit(f).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()


def _lowered_text(qw, batch, dtype, config):
  return _cuda_text(lambda x, w: pallas_packed_matmul(x, w, config=config, interpret=False),
                    qw, batch, dtype)


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


MOSAIC_CALL = "stablehlo.custom_call @mosaic_gpu"
# Every case at decode batches 1, 4, 16 and a prefill batch (2 token blocks of 128) in bf16;
# f16 and f32 activations (f32 is multiplied as bf16) on the cases with qq statistics.
MOSAIC_LOWER = [(name, batch, jnp.bfloat16) for name in BUILDERS for batch in (1, 4, 16, 256)
                ] + [(name, batch, dtype) for name in ("spqr_w3_g16_qq3", "w3_g16_actorder")
                     for batch in (1, 16) for dtype in (jnp.float16, jnp.float32)]


def _mosaic_text(qw, batch, dtype, config):
  return _cuda_text(lambda x, w: mosaic_packed_matmul(x, w, config=config), qw, batch, dtype)


@pytest.mark.parametrize("name, batch, dtype", MOSAIC_LOWER,
                         ids=[f"{n}-B{b}-{jnp.dtype(d).name}" for n, b, d in MOSAIC_LOWER])
def test_mosaic_kernel_lowers_for_cuda(name, batch, dtype):
  _, qw = case(name)
  text = _mosaic_text(qw, batch, dtype, TEST_CONFIG)
  # "separate" (the default): the dense kernel, plus the outlier launch when there are outliers
  assert text.count(MOSAIC_CALL) == 1 + (qw.meta.nnz > 0)


# decode (B = 1) and prefill (B = 256: several token blocks); B = 16 lowers the decode program
# with another padding (the default A operand covers it above)
REGISTERS_A = [(name, batch, outliers) for name in BUILDERS for batch in (1, 256)
               for outliers in (("separate", "fused") if name.startswith("spqr") else
                                ("separate",))]


@pytest.mark.parametrize("name, batch, outliers", REGISTERS_A,
                         ids=[f"{n}-B{b}-{o}" for n, b, o in REGISTERS_A])
def test_mosaic_registers_a_operand_lowers_for_cuda(name, batch, outliers):
  # BlockConfig.wgmma_a="registers": one wgmma per slot, A relaid out in registers
  _, qw = case(name)
  config = dataclasses.replace(TEST_CONFIG, outliers=outliers, wgmma_a="registers")
  separate_pass = qw.meta.nnz > 0 and outliers == "separate"
  assert _mosaic_text(qw, batch, jnp.bfloat16, config).count(MOSAIC_CALL) == 1 + separate_pass


FUSED = [(name, batch) for name in ("spqr_w3_g16_qq3", "spqr_w2_g16_qq2_fewoutliers")
         for batch in (1, 16, 256)]


@pytest.mark.parametrize("name, batch", FUSED, ids=[f"{n}-B{b}" for n, b in FUSED])
def test_mosaic_fused_outliers_lower_as_one_kernel(name, batch):
  _, qw = case(name)
  assert qw.meta.nnz > 0
  config = dataclasses.replace(TEST_CONFIG, outliers="fused")
  assert _mosaic_text(qw, batch, jnp.bfloat16, config).count(MOSAIC_CALL) == 1


def test_mosaic_default_gpu_tiles_lower_for_cuda():
  _, qw = case("spqr_w3_g16_qq3")
  for config in (BlockConfig(), BlockConfig(outliers="fused")):
    text = _mosaic_text(qw, 1, jnp.bfloat16, config)
    assert text.count(MOSAIC_CALL) == (2 if config.outliers == "separate" else 1)


# decode and prefill, both A operands; both outlier modes where there are outliers (a weight
# without them lowers the same program for either)
WIDE = [(name, batch, outliers, a) for name in WIDE_BUILDERS for batch in (1, 256)
        for outliers in (("separate", "fused") if "spqr" in name else ("separate",))
        for a in ("smem", "registers")]


@pytest.mark.parametrize("name, batch, outliers, wgmma_a", WIDE,
                         ids=[f"{n}-B{b}-{o}-{a}" for n, b, o, a in WIDE])
def test_mosaic_default_tiles_lower_on_model_widths(name, batch, outliers, wgmma_a):
  # default tiles (bk ≤ 256, 512 for 3-bit "registers"; bn = 128) with 2 K splits: several
  # steps per program, two pipeline stages; at B = 256 the shared-memory budget shrinks the
  # token block and bk
  _, qw = case(name)
  config = BlockConfig(outliers=outliers, k_splits=2, wgmma_a=wgmma_a)
  assert mosaic_operands.make_mosaic_plan(qw, batch, jnp.bfloat16, config).stages == 2
  text = _mosaic_text(qw, batch, jnp.bfloat16, config)
  separate_pass = qw.meta.nnz > 0 and outliers == "separate"
  assert text.count(MOSAIC_CALL) == 1 + separate_pass
