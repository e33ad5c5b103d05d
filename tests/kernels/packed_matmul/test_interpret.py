"""The shared suite on the Pallas kernels in interpret mode (CPU CI), plus registry checks."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest

from cdquant_jax.kernels.packed_matmul import BlockConfig, available_implementations
from cdquant_jax.kernels.packed_matmul import packed_matmul
from cdquant_jax.kernels.packed_matmul import mosaic_packed_matmul, select_implementation
from tests.kernels.packed_matmul.cases import case
from tests.kernels.packed_matmul.test_base import PackedMatmulSuite

# the registry module (cdquant_jax.kernels re-exports a function of the same name)
registry = importlib.import_module("cdquant_jax.kernels.packed_matmul")


class TestPallasTritonInterpret(PackedMatmulSuite):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True


def test_bad_activation_shape_names_the_expected_shape():
  _, qw = case("w4_g32_f16")
  with pytest.raises(ValueError, match=r"x must be \[B, d_in=96\]"):
    packed_matmul(jnp.zeros((2, 95)), qw)


def test_unknown_implementation_is_rejected():
  _, qw = case("w4_g32_f16")
  with pytest.raises(ValueError, match="unknown packed_matmul implementation 'cuda'"):
    packed_matmul(jnp.zeros((1, 96)), qw, implementation="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fallback")
def test_without_gpu_auto_falls_back_to_reference_and_native_pallas_explains_why():
  impl, interpret, why = select_implementation(None, None)
  assert impl.name == "reference" and not interpret and "no GPU" in why
  assert "interpret mode" in available_implementations()["pallas_triton"]
  assert available_implementations(interpret=True)["pallas_triton"] is None
  with pytest.raises(ValueError, match="cannot run: no GPU"):
    select_implementation("pallas_triton", interpret=False)
  impl, interpret, _ = select_implementation("pallas_triton", None)
  assert impl.name == "pallas_triton" and interpret


def test_block_config_rejects_an_unknown_outlier_mode():
  with pytest.raises(ValueError, match=r"BlockConfig.outliers must be one of .* got 'inline'"):
    BlockConfig(outliers="inline")


def test_triton_rejects_fused_outliers_naming_the_field():
  _, qw = case("spqr_w2_g16_qq2_fewoutliers")
  config = dataclasses.replace(BlockConfig(), outliers="fused")
  with pytest.raises(ValueError, match=r"BlockConfig.outliers='fused' .* 'pallas_triton'"):
    packed_matmul(jnp.zeros((1, 96)), qw, implementation="pallas_triton", interpret=True,
                  config=config)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fallback")
def test_without_gpu_mosaic_explains_it_needs_hopper_and_has_no_interpret_mode():
  for interpret in (False, True):
    assert "needs a Hopper GPU" in available_implementations(interpret)["pallas_mosaic"]
  with pytest.raises(ValueError, match="'pallas_mosaic' cannot run: no GPU"):
    select_implementation("pallas_mosaic", None)


@pytest.mark.parametrize("capability, expected", [("9.0", "pallas_mosaic"),
                                                  ("8.0", "pallas_triton"),
                                                  ("10.0", "pallas_triton")])
def test_auto_picks_mosaic_on_hopper_only(monkeypatch, capability, expected):
  monkeypatch.setattr(registry, "_has_gpu", lambda: True)
  monkeypatch.setattr(registry, "gpu_compute_capability", lambda: capability)
  impl, interpret, why = select_implementation(None, None)
  assert impl.name == expected and not interpret and expected in why
  # interpret=True asks for the interpreter: only the Triton kernel has one
  impl, interpret, _ = select_implementation(None, True)
  assert impl.name == "pallas_triton" and interpret
  if expected == "pallas_triton":
    with pytest.raises(ValueError, match=f"needs a Hopper GPU .* found '{capability}'"):
      select_implementation("pallas_mosaic", False)


def test_a_field_only_the_other_backend_reads_is_refused():
  _, qw = case("w4_g32_f16")
  x = jnp.zeros((1, 96))
  with pytest.raises(ValueError, match=r"BlockConfig.wgmma_a='registers' has no effect on "
                                       r"'pallas_triton'"):
    packed_matmul(x, qw, implementation="pallas_triton", interpret=True,
                  config=BlockConfig(wgmma_a="registers"))
  with pytest.raises(ValueError, match=r"BlockConfig.max_batch=32 has no effect on "
                                       r"'pallas_mosaic'; leave it at 16"):
    mosaic_packed_matmul(x, qw, config=BlockConfig(max_batch=32))
