"""`EinsumLayout`: an `nnx.Linear` or `nnx.Einsum` seen as y = x @ Wᵀ with W [d_out, d_in].

A supported einsum "lhs,rhs->out" (lhs: the input, rhs: the kernel) has three kinds of labels:
  batch       in lhs and out, not in the kernel (an optional leading "..." counts as batch);
  contracted  in lhs and the kernel, not in out: the d_in = Π sizes input features, in lhs order;
  features    in the kernel and out, not in lhs: the d_out = Π sizes output features, in kernel
              order.
Labels in all three (batched kernels) are rejected. Then
  x [batch..., C...]  -> [batch..., d_in]          (`flatten_input`)
  kernel [rhs...]     -> W [d_out, d_in]           (`weight`)
  y [batch..., d_out] -> [out...]                  (`unflatten_output`)
and einsum(x, kernel) = unflatten_output(flatten_input(x) @ Wᵀ). `nnx.Linear` is the layout of
"...i,io->...o" (kernel [d_in, d_out], so W is the kernel transposed).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

ELLIPSIS = "..."
LINEAR_EINSUM = "...i,io->...o"


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
  """A parsed einsum of a linear layer (hashable, JSON-serialisable via `to_dict`).

  Attributes:
    einsum_str: "lhs,rhs->out" without spaces.
    kernel_shape: the kernel's shape, one size per rhs label.
  """

  einsum_str: str
  kernel_shape: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "einsum_str", self.einsum_str.replace(" ", ""))
    object.__setattr__(self, "kernel_shape", tuple(int(s) for s in self.kernel_shape))
    self._check()

  # ---- parsing --------------------------------------------------------------------------------

  @property
  def _parts(self) -> tuple[str, str, str]:
    lhs, rest = self.einsum_str.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out

  @property
  def has_ellipsis(self) -> bool:
    return self._parts[0].startswith(ELLIPSIS)

  @property
  def lhs_labels(self) -> str:
    """The explicit lhs labels (after a leading "...")."""
    lhs = self._parts[0]
    return lhs[len(ELLIPSIS):] if self.has_ellipsis else lhs

  @property
  def out_labels(self) -> str:
    out = self._parts[2]
    return out[len(ELLIPSIS):] if out.startswith(ELLIPSIS) else out

  @property
  def rhs_labels(self) -> str:
    return self._parts[1]

  @property
  def contracted(self) -> str:
    return "".join(c for c in self.lhs_labels if c in self.rhs_labels)

  @property
  def batch(self) -> str:
    return "".join(c for c in self.lhs_labels if c not in self.rhs_labels)

  @property
  def features(self) -> str:
    return "".join(c for c in self.rhs_labels if c not in self.lhs_labels)

  def size(self, label: str) -> int:
    return self.kernel_shape[self.rhs_labels.index(label)]

  @property
  def d_in(self) -> int:
    return math.prod(self.size(c) for c in self.contracted)

  @property
  def d_out(self) -> int:
    return math.prod(self.size(c) for c in self.features)

  def _check(self) -> None:
    """Raises ValueError naming the einsum when it is not a plain linear map of the input."""
    s = self.einsum_str
    if s.count(",") != 1 or s.count("->") != 1:
      raise ValueError(f"einsum {s!r}: need 'lhs,rhs->out' with exactly two operands")
    lhs, rhs, out = self._parts
    if ELLIPSIS in rhs or ELLIPSIS in lhs[len(ELLIPSIS):] or ELLIPSIS in self.out_labels or (
        self.has_ellipsis != out.startswith(ELLIPSIS)):
      raise ValueError(f"einsum {s!r}: '...' is only supported leading both input and output")
    if len(self.rhs_labels) != len(self.kernel_shape):
      raise ValueError(f"einsum {s!r}: kernel has {len(self.kernel_shape)} dims, "
                       f"rhs {self.rhs_labels!r} names {len(self.rhs_labels)}")
    out_l = set(self.out_labels)
    if set(self.contracted) & out_l:
      raise ValueError(f"einsum {s!r}: labels {sorted(set(self.contracted) & out_l)} are in "
                       "input, kernel and output (batched kernels are not linear layers)")
    if not set(self.features) <= out_l or not set(self.batch) <= out_l or (
        out_l != set(self.batch) | set(self.features)) or not self.contracted:
      raise ValueError(f"einsum {s!r}: not a linear map of the input's trailing features")
    for labels in (self.lhs_labels, self.rhs_labels, self.out_labels):
      if len(set(labels)) != len(labels):
        raise ValueError(f"einsum {s!r}: a label repeats within one operand")

  # ---- the three maps ------------------------------------------------------------------------

  def weight(self, kernel: jax.Array) -> jax.Array:
    """W [d_out, d_in] from the kernel [rhs...] (rows: features, columns: contracted labels)."""
    # [rhs...] -> [features..., contracted...] (a transpose)
    permuted = jnp.einsum(f"{self.rhs_labels}->{self.features}{self.contracted}", kernel)
    # [features..., contracted...] -> [d_out, d_in]
    return permuted.reshape(self.d_out, self.d_in)

  def kernel(self, W: jax.Array) -> jax.Array:
    """The inverse of `weight`: W [d_out, d_in] -> kernel [rhs...]."""
    sizes = [self.size(c) for c in self.features + self.contracted]
    # [d_out, d_in] -> [features..., contracted...]
    unflat = W.reshape(sizes)
    # [features..., contracted...] -> [rhs...] (a transpose)
    return jnp.einsum(f"{self.features}{self.contracted}->{self.rhs_labels}", unflat)

  def flatten_input(self, x: jax.Array) -> jax.Array:
    """x [lhs...] -> [batch..., d_in] (batch dims kept, so the first one still counts
    sequences for the Hessian)."""
    e = ELLIPSIS if self.has_ellipsis else ""
    src, dst = e + self.lhs_labels, e + self.batch + self.contracted
    # [lhs...] -> [batch..., contracted...] (a transpose; none for nnx.Linear)
    moved = x if src == dst else jnp.einsum(f"{src}->{dst}", x)
    lead = moved.shape[:moved.ndim - len(self.contracted)]
    # [batch..., contracted...] -> [batch..., d_in]
    return moved.reshape(*lead, self.d_in)

  def unflatten_output(self, y: jax.Array) -> jax.Array:
    """y [batch..., d_out] -> [out...]."""
    e = ELLIPSIS if self.has_ellipsis else ""
    lead = y.shape[:-1]
    # [batch..., d_out] -> [batch..., features...]
    y = y.reshape(*lead, *(self.size(c) for c in self.features))
    src, dst = e + self.batch + self.features, e + self.out_labels
    # [batch..., features...] -> [out...] (a transpose; none for nnx.Linear)
    return y if src == dst else jnp.einsum(f"{src}->{dst}", y)

  def bias_shape(self) -> tuple[int, ...]:
    """The broadcast shape of an `nnx.Einsum` bias over the explicit output labels."""
    return tuple(self.size(c) if c in self.features else 1 for c in self.out_labels)

  def input_key(self) -> tuple[int, ...]:
    """The contracted input axes, counted from the end, in flattening order: two layers fed the
    same array with the same key see the same [.., d_in] input (one Hessian)."""
    n = len(self.lhs_labels)
    return tuple(self.lhs_labels.index(c) - n for c in self.contracted)

  def to_dict(self) -> dict:
    return {"einsum_str": self.einsum_str, "kernel_shape": list(self.kernel_shape)}

  @classmethod
  def from_dict(cls, data: dict) -> "EinsumLayout":
    return cls(data["einsum_str"], tuple(data["kernel_shape"]))


def linear_layout(d_in: int, d_out: int) -> EinsumLayout:
  """The layout of an `nnx.Linear` with kernel [d_in, d_out]."""
  return EinsumLayout(LINEAR_EINSUM, (d_in, d_out))
