"""`packed_matmul(x, qw)`: x [B, d_in] @ dequantize(qw)ᵀ -> f32 [B, d_out] on packed weights.

Implementations (registry by name; the `implementation=` argument picks one, default "auto"; a
model passes its `LinearOptions.implementation`, see models/layers.py):
  "reference"      dequantize the container, f32 matmul at HIGHEST (reference.py, the spec).
  "pallas_triton"  Pallas kernels (pallas_triton.py dense, sparse.py outliers), Triton backend;
                   natively on a GPU, or in interpret mode anywhere (`interpret=True`).
                   Outliers: BlockConfig.outliers="separate" only. Batches above
                   BlockConfig.max_batch (16) dequantize and run one dense dot.
  "pallas_mosaic"  Pallas kernel on Mosaic GPU (pallas_mosaic.py): TMA pipeline, in-register
                   decode, swap-AB wgmma; Hopper only (compute capability 9.x), natively (no
                   interpret mode, see its docstring). Any batch (decode 1-16 and prefill) runs
                   in the kernel; BlockConfig.outliers "separate" (second launch) or "fused";
                   BlockConfig.wgmma_a "smem" or "registers" (where wgmma reads the weights).
"auto": "pallas_mosaic" on a Hopper GPU, "pallas_triton" natively on other GPUs (or
interpreted when interpret=True is passed), else "reference" (on CPU the interpreter is slower
than the reference); the reason is logged once. An explicitly named implementation that cannot
run raises ValueError with the reason; a BlockConfig.outliers value it cannot honour, or a
field only the other backend reads set to other than its default (plan.TRITON_ONLY,
MOSAIC_ONLY), raises ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from cdquant_jax.kernels.packed_matmul import pallas_mosaic, pallas_triton, sparse
from cdquant_jax.kernels.packed_matmul import plan as plan_lib
from cdquant_jax.kernels.packed_matmul.plan import BlockConfig, make_plan
from cdquant_jax.kernels.packed_matmul.reference import packed_matmul_reference
from cdquant_jax.quant.qweight import QuantizedWeight, dequantize

__all__ = ["BlockConfig", "IMPLEMENTATIONS", "available_implementations",
           "gpu_compute_capability", "mosaic_packed_matmul", "packed_matmul",
           "packed_matmul_reference", "pallas_packed_matmul", "select_implementation"]

_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:  # pragma: no cover
    return False


def gpu_compute_capability() -> str | None:
  """The first GPU's CUDA compute capability ("9.0"), or None (no GPU, or not CUDA)."""
  if not _has_gpu():
    return None
  return getattr(jax.devices()[0], "compute_capability", None)


def _is_hopper(capability: str | None) -> bool:
  return capability is not None and capability.split(".")[0] == "9"


def dequantized_dot(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """Large-batch path (an implementation, not a reference): the reference for f32 inputs, else
  the dequantized weight cast to x's dtype, multiplied with f32 accumulation."""
  if x.dtype == jnp.float32:
    return packed_matmul_reference(x, qw)
  # [B, d_in] x [d_out, d_in] -> [B, d_out]
  return jnp.einsum("bi,oi->bo", x, dequantize(qw).astype(x.dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def pallas_packed_matmul(x: jax.Array, qw: QuantizedWeight, *,
                         config: BlockConfig = BlockConfig(),
                         interpret: bool = False) -> jax.Array:
  """Dense Pallas kernel + outlier Pallas kernel: x [B, d_in] -> f32 [B, d_out]."""
  config.require_outliers("pallas_triton", ("separate",))
  config.require_defaults("pallas_triton", plan_lib.MOSAIC_ONLY)
  if x.shape[0] > config.max_batch:
    return dequantized_dot(x, qw)
  plan = make_plan(qw, x.shape[0], x.dtype, config)
  y = pallas_triton.dense_call(x, qw, plan, config=config, interpret=interpret)
  if qw.meta.nnz:
    y = y + sparse.outlier_call(x, qw, config=config, interpret=interpret)
  return y


@functools.partial(jax.jit, static_argnames=("config",))
def mosaic_packed_matmul(x: jax.Array, qw: QuantizedWeight, *,
                         config: BlockConfig = BlockConfig()) -> jax.Array:
  """The Mosaic GPU kernel (every batch, outliers per config.outliers): x [B, d_in] ->
  f32 [B, d_out]."""
  config.require_defaults("pallas_mosaic", plan_lib.TRITON_ONLY)
  return pallas_mosaic.mosaic_packed_matmul(x, qw, config=config)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A named implementation: `unavailable(interpret)` gives None or the reason it cannot run."""

  name: str

  def unavailable(self, interpret: bool) -> str | None:
    if self.name == "reference":
      return None
    if self.name == "pallas_mosaic":
      return _mosaic_unavailable(interpret)
    if pallas_triton.plt is None:
      return f"jax.experimental.pallas.triton cannot be imported ({pallas_triton.IMPORT_ERROR})"
    if not interpret and not _has_gpu():
      return (f"no GPU (jax backend {jax.default_backend()!r}); Pallas runs on CPU only in "
              "interpret mode (pass interpret=True)")
    return None

  def __call__(self, x, qw, *, interpret: bool, config: BlockConfig = BlockConfig()):
    if self.name == "reference":
      return packed_matmul_reference(x, qw)
    if self.name == "pallas_mosaic":
      return mosaic_packed_matmul(x, qw, config=config)
    return pallas_packed_matmul(x, qw, config=config, interpret=interpret)


def _mosaic_unavailable(interpret: bool) -> str | None:
  if pallas_mosaic.plgpu is None:
    return (f"jax.experimental.pallas.mosaic_gpu cannot be imported "
            f"({pallas_mosaic.IMPORT_ERROR})")
  if not _has_gpu():
    return (f"no GPU (jax backend {jax.default_backend()!r}); it needs a Hopper GPU (no "
            "interpret mode)")
  if interpret:
    return ("no interpret mode (Mosaic GPU's interpreter does not support the kernel's "
            "transposed and tiled refs, see pallas_mosaic.py); it runs natively on Hopper only")
  capability = gpu_compute_capability()
  if not _is_hopper(capability):
    return f"needs a Hopper GPU (compute capability 9.x), found {capability!r}"
  return None


IMPLEMENTATIONS = {name: Implementation(name)
                   for name in ("pallas_mosaic", "pallas_triton", "reference")}


def available_implementations(interpret: bool = False) -> dict[str, str | None]:
  """name -> None when it can run here, else the reason it cannot."""
  return {name: impl.unavailable(interpret) for name, impl in IMPLEMENTATIONS.items()}


def select_implementation(implementation: str | None = None, interpret: bool | None = None
                          ) -> tuple[Implementation, bool, str]:
  """(implementation, interpret flag, why it was chosen) for the given request (None = "auto")."""
  name = implementation or "auto"
  if name != "auto":
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"unknown packed_matmul implementation {name!r}; "
                       f"choose one of {sorted(IMPLEMENTATIONS)} or 'auto'")
    interp = (not _has_gpu()) if interpret is None else bool(interpret)
    reason = IMPLEMENTATIONS[name].unavailable(interp)
    if reason:
      raise ValueError(f"packed_matmul implementation {name!r} cannot run: {reason}")
    return IMPLEMENTATIONS[name], interp, f"requested {name!r}"
  interp = bool(interpret)
  if not interp and IMPLEMENTATIONS["pallas_mosaic"].unavailable(False) is None:
    return IMPLEMENTATIONS["pallas_mosaic"], False, "auto: pallas_mosaic (Hopper GPU)"
  reason = IMPLEMENTATIONS["pallas_triton"].unavailable(interp)
  if reason is None:
    return IMPLEMENTATIONS["pallas_triton"], interp, "auto: pallas_triton"
  return IMPLEMENTATIONS["reference"], False, f"auto: reference, since pallas_triton: {reason}"


def packed_matmul(x: jax.Array, qw: QuantizedWeight, *, implementation: str | None = None,
                  interpret: bool | None = None,
                  config: BlockConfig = BlockConfig()) -> jax.Array:
  """x [B, d_in] @ dequantize(qw)ᵀ -> f32 [B, d_out] (dense codes + CSR outliers).

  Args:
    x: [B, d_in] activations, f32 / bf16 / f16 (other dtypes are computed in f32).
    qw: the packed weight (2/3/4-bit codes, float or SpQR "qq" statistics, optional
      permutation and outliers).
    implementation: "pallas_mosaic", "pallas_triton", "reference" or "auto"/None (see the
      module docstring).
    interpret: run Pallas in interpret mode; None = only where there is no GPU.
    config: tile sizes (BlockConfig).
  """
  if x.ndim != 2 or x.shape[1] != qw.meta.d_in:
    raise ValueError(f"packed_matmul: x must be [B, d_in={qw.meta.d_in}], got {x.shape}")
  impl, interp, why = select_implementation(implementation, interpret)
  if why not in _logged:
    _logged.add(why)
    _log.info("packed_matmul: %s", why)
  return impl(x, qw, interpret=interp, config=config)
