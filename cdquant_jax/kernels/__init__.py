"""Kernels on packed quantized weights (see packed_matmul/ and linear.py)."""

from cdquant_jax.kernels.linear import quantized_linear
from cdquant_jax.kernels.packed_matmul import (BlockConfig, available_implementations,
                                               packed_matmul, packed_matmul_reference)

__all__ = ["BlockConfig", "available_implementations", "packed_matmul",
           "packed_matmul_reference", "quantized_linear"]
