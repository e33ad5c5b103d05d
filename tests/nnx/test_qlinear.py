"""EinsumLayout against explicit numpy index maps; QuantizedLinear against the source module
run on the dequantized weight (the packed container's spec, `qweight.dequantize`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdquant_jax.nnx.layout import EinsumLayout, linear_layout
from cdquant_jax.nnx.qlinear import QuantArray, QuantizedLinear, layout_of, weight_of
from cdquant_jax.quant import qweight
from cdquant_jax.solvers import api


def _random(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_linear_weight_is_the_kernel_transposed():
  k = _random((6, 5), 0)  # [d_in, d_out]
  layout = linear_layout(6, 5)
  np.testing.assert_array_equal(layout.weight(jnp.asarray(k)), k.T)
  np.testing.assert_array_equal(layout.kernel(jnp.asarray(k.T)), k)


def test_multihead_einsum_weight_rows_are_head_major():
  k = _random((7, 3, 4), 1)  # "BTD,DNH->BTNH": kernel [D, N, H]
  layout = EinsumLayout("BTD,DNH->BTNH", k.shape)
  W = np.asarray(layout.weight(jnp.asarray(k)))
  assert W.shape == (12, 7) and layout.input_key() == (-1,)
  for n in range(3):
    for h in range(4):
      np.testing.assert_array_equal(W[n * 4 + h], k[:, n, h])
  np.testing.assert_array_equal(layout.kernel(jnp.asarray(W)), k)


def test_two_axis_contraction_flattens_in_input_order():
  k = _random((3, 4, 5), 2)  # "BTNH,NHD->BTD": contracted N, H
  layout = EinsumLayout("BTNH,NHD->BTD", k.shape)
  x = _random((2, 6, 3, 4), 3)
  assert layout.d_in == 12 and layout.input_key() == (-2, -1)
  np.testing.assert_array_equal(layout.flatten_input(jnp.asarray(x)), x.reshape(2, 6, 12))
  np.testing.assert_array_equal(layout.weight(jnp.asarray(k)), k.reshape(12, 5).T)


@pytest.mark.parametrize("spec", ["BTD,BDF->BTF", "BTD,DF->BT", "BTD,DF->BTFD", "BTD,EF->BTF"])
def test_non_linear_einsums_are_rejected(spec):
  shape = {"BTD,BDF->BTF": (2, 4, 5), "BTD,DF->BT": (4, 5), "BTD,DF->BTFD": (4, 5),
           "BTD,EF->BTF": (4, 5)}[spec]
  with pytest.raises(ValueError, match="einsum"):
    EinsumLayout(spec, shape)


MODULES = {
    "linear_bias": (lambda r: nnx.Linear(64, 48, rngs=r), (2, 3, 64)),
    "linear_1d": (lambda r: nnx.Linear(64, 48, use_bias=False, rngs=r), (5, 64)),
    "gemma_q": (lambda r: nnx.Einsum("BTD,NDH->BTNH", (4, 64, 8), (4, 1, 8), rngs=r), (2, 3, 64)),
    "gemma_gating": (lambda r: nnx.Einsum("...F,NHF->...NH", (2, 8, 64), rngs=r), (2, 3, 64)),
    "gemma_kv_first": (lambda r: nnx.Einsum("BTD,SNDH->SBTNH", (2, 2, 64, 8), rngs=r),
                       (2, 3, 64)),
    "attn_out_bias": (lambda r: nnx.Einsum("BTNH,NHD->BTD", (4, 8, 32), (32,), rngs=r),
                      (2, 3, 4, 8)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_quantized_linear_matches_module_on_dequantized_weight(name):
  make, x_shape = MODULES[name]
  module = make(nnx.Rngs(0))
  if module.bias is not None:
    module.bias[...] = jnp.asarray(_random(module.bias[...].shape, 4))
  W = weight_of(module)
  result = api.solve("rtn", W, jnp.eye(W.shape[1]), bits=3)
  qw = qweight.pack_result(result)
  ql = QuantizedLinear.from_linear(module, qw)
  x = jnp.asarray(_random(x_shape, 5))
  y = ql(x)
  module.kernel[...] = layout_of(module).kernel(qweight.dequantize(qw))
  want = module(x)
  assert y.shape == want.shape
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Under nnx.jit and through split/merge: the packed arrays are state, the meta static.
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(ql, x), y)
  graphdef, state = nnx.split(ql)
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), y)
  packed = nnx.state(ql, QuantArray)
  assert {str(p[0]) for p, _ in nnx.to_flat_state(packed)} == set(qw.arrays())
  params = nnx.to_flat_state(nnx.state(ql, nnx.Param))
  assert [str(p[0]) for p, _ in params] == ([] if module.bias is None else ["bias"])


def test_shape_mismatch_is_one_line_error():
  module = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
  W = jnp.asarray(_random((48, 32), 0))
  qw = qweight.pack_result(api.solve("rtn", W, jnp.eye(32), bits=4))
  with pytest.raises(ValueError, match="does not match the layout"):
    QuantizedLinear.from_linear(module, qw)
