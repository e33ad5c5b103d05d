"""Grid properties under hypothesis, and the two reference flavours against numpy transcriptions."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, GridConfig

FLAVORS = [Flavor.GPTQ, Flavor.SPQR]

# A few fixed shapes (each new shape costs XLA compilations), arbitrary values.
shapes = st.tuples(st.sampled_from([1, 3, 8]), st.sampled_from([1, 5, 16]))
weights = hnp.arrays(np.float32, shapes,
                     # Real weights are never subnormal (XLA flushes subnormal scales to zero).
                     elements=st.floats(-4, 4, width=32).map(lambda v: 0.0 if abs(v) < 1e-6 else v))


def _config(bits, sym, flavor, round_zero=False):
  return GridConfig(bits=bits, sym=sym, flavor=flavor, round_zero=round_zero)


@settings(max_examples=30, deadline=None)
@given(W=weights, bits=st.integers(2, 8), sym=st.booleans(), flavor=st.sampled_from(FLAVORS))
def test_codes_in_range_and_round_trip(W, bits, sym, flavor):
  grid = grids.fit_grid(jnp.asarray(W), _config(bits, sym, flavor))
  codes = np.asarray(grids.quantize(jnp.asarray(W), grid))
  assert codes.min() >= 0 and codes.max() <= 2**bits - 1
  Q = grids.dequantize(jnp.asarray(codes), grid)
  # Dequantized values are fixed points: re-quantizing gives the same codes.
  np.testing.assert_array_equal(np.asarray(grids.quantize(Q, grid)), codes)
  # Asymmetric min-max covers the whole row: every error is at most half a step. (The symmetric
  # GPTQ rule keeps xmin = 0 for all-positive rows and clips their top half, and SpQR maps a
  # constant row to the range (−1, 1), both as the references do.)
  scale = np.asarray(grid.expand()[0])
  rows = (W.max(1) > W.min(1)) | (flavor == Flavor.GPTQ)
  err = np.abs(np.asarray(Q) - W)[rows]
  assert sym or np.all(err <= 0.5 * scale[rows] * (1 + 1e-5) + 1e-6)


@settings(max_examples=30, deadline=None)
@given(W=weights, bits=st.integers(2, 8), sym=st.booleans())
def test_gptq_flavour_represents_zero_exactly(W, bits, sym):
  grid = grids.fit_grid(jnp.asarray(W), _config(bits, sym, Flavor.GPTQ))
  zero_w = jnp.zeros_like(jnp.asarray(W))
  assert np.all(np.asarray(grids.round_to_grid(zero_w, grid)) == 0.0)
  z = np.asarray(grid.zero)
  np.testing.assert_array_equal(z, np.round(z))  # integer zero point


@settings(max_examples=25, deadline=None)
@given(W=weights, bits=st.integers(2, 8))
def test_spqr_flavour_is_pure_minmax(W, bits):
  grid = grids.fit_grid(jnp.asarray(W), _config(bits, False, Flavor.SPQR))
  Q = np.asarray(grids.round_to_grid(jnp.asarray(W), grid))
  lo, hi = W.min(axis=1), W.max(axis=1)
  spread = hi > lo
  # Row minimum and maximum are exact grid points (codes 0 and maxq) when the row is not constant.
  np.testing.assert_allclose(Q.min(axis=1)[spread], lo[spread], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(Q.max(axis=1)[spread], hi[spread], rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(W=weights, bits=st.integers(2, 8))
def test_spqr_round_zero_gives_integer_zero(W, bits):
  grid = grids.fit_grid(jnp.asarray(W), _config(bits, False, Flavor.SPQR, round_zero=True))
  z = np.asarray(grid.zero)
  np.testing.assert_array_equal(z, np.round(z))


def _numpy_mse_search(x, bits, norm=2.4, grid=100, maxshrink=0.8):
  """Transcription of GPTQ `find_params(mse=True)` (asym, perchannel) in float64."""
  maxq = 2**bits - 1
  xmin, xmax = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
  best = np.full(x.shape[0], np.inf)
  scale = (xmax - xmin) / maxq
  zero = np.round(-xmin / scale)
  for i in range(int(maxshrink * grid)):
    p = 1 - i / grid
    s1 = (p * xmax - p * xmin) / maxq
    z1 = np.round(-p * xmin / s1)
    q = s1[:, None] * (np.clip(np.round(x / s1[:, None]) + z1[:, None], 0, maxq) - z1[:, None])
    err = np.sum(np.abs(q - x) ** norm, axis=1)
    better = err < best
    best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
  return scale, zero


def test_mse_search_matches_reference(x64, rng):
  W = rng.standard_t(3, size=(16, 64))
  grid = grids.fit_grid(jnp.asarray(W), GridConfig(bits=3, scale_search="mse"))
  scale, zero = _numpy_mse_search(W, 3)
  np.testing.assert_allclose(np.asarray(grid.scale)[:, 0], scale, rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(grid.zero)[:, 0], zero)


def test_owc_minimises_weighted_error_over_its_candidates(x64, rng):
  from tests.fixtures.layer_problems import layer_problem
  W, H = layer_problem(rng, 8, 32)
  cfg = GridConfig(bits=3, scale_search="owc")
  grid = grids.fit_grid(jnp.asarray(W), cfg, jnp.asarray(H))
  Q = np.asarray(grids.round_to_grid(jnp.asarray(W), grid))
  row_obj = lambda Q: np.einsum("ri,ij,rj->r", W - Q, H, W - Q)
  chosen = row_obj(Q)
  minmax = row_obj(np.asarray(grids.round_to_grid(jnp.asarray(W), grids.fit_grid(
      jnp.asarray(W), GridConfig(bits=3)))))
  assert np.all(chosen <= minmax + 1e-12)  # p = 1 (min-max) is among the candidates
  assert np.sum(chosen) < np.sum(minmax)


def test_groups_and_validation(rng):
  W = jnp.asarray(rng.normal(size=(4, 48)), jnp.float32)
  grid = grids.fit_grid(W, GridConfig(bits=4, group_size=16))
  assert grid.scale.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(grid.group_index), np.arange(48) // 16)
  with pytest.raises(ValueError, match="group_size"):
    grids.fit_grid(W, GridConfig(bits=4, group_size=20))
  with pytest.raises(ValueError, match="bits"):
    grids.fit_grid(W, GridConfig(bits=1))


def test_fp16_stats_are_float16_exact(rng):
  W = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
  grid = grids.fit_grid(W, GridConfig(bits=3, group_size=16, fp16_stats=True))
  s = np.asarray(grid.scale)
  np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)
