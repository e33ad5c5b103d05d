"""SpQR+CD: monotone improvement over SpQR, fixed grids/outliers, closed-form outlier values."""

import dataclasses
import math

import jax

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.quant.grids import dequantize
from cdquant_jax import config as config_lib
from cdquant_jax.config import ConfigError
from cdquant_jax.solvers.bcd import BlockOptions
from cdquant_jax.solvers.spqr import SPQR_GRID, SpQRConfig, spqr
from cdquant_jax.solvers.spqr_cd import SpQRCDConfig, resolve_outliers, spqr_cd
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles.spqr_numpy import our_config


def _with_cd(spqr_cfg: SpQRConfig, **cd_settings) -> SpQRCDConfig:
  """SpQR+CD on exactly the SpQR settings of `spqr_cfg`."""
  return SpQRCDConfig(**config_lib.fields_dict(spqr_cfg), **cd_settings)


def _numpy_optimal_outliers(W, H, Q, mask):
  """Per row: argmin over q_S of (w − q)ᵀ H (w − q) with the other coordinates fixed (float64)."""
  Q = np.array(Q, np.float64)
  for r in range(W.shape[0]):
    S = np.flatnonzero(mask[r])
    if S.size == 0:
      continue
    rest = np.flatnonzero(~mask[r])
    e_rest = W[r, rest] - Q[r, rest]
    # Normal equations of the quadratic in e_S: H_SS e_S = −H_S,rest e_rest.
    e_S = np.linalg.solve(H[np.ix_(S, S)], -H[np.ix_(S, rest)] @ e_rest)
    Q[r, S] = W[r, S] - e_S
  return Q


def test_outlier_resolve_matches_numpy_normal_equations(x64, rng):
  W, H = layer_problem(rng, 16, 48)
  Q = W + 0.01 * rng.normal(size=W.shape)
  mask = rng.random(W.shape) < 0.08
  mask[3] = False  # a row without outliers stays untouched
  mask[5, :6] = True  # a row with many
  ours = np.asarray(resolve_outliers(jnp.asarray(W), jnp.asarray(H), jnp.asarray(Q),
                                     jnp.asarray(mask), ridge=0.0))
  want = _numpy_optimal_outliers(W, H, Q, mask)
  np.testing.assert_allclose(ours, want, rtol=1e-8, atol=1e-10)
  np.testing.assert_array_equal(ours[~mask], Q[~mask])


def test_outlier_resolve_with_most_of_a_row_outliers(x64, rng):
  """A row with more outliers than half of d_in (34 of 40: the power-of-two padding, 64, must
  stop at d_in) — SmolLM2's 2-bit SpQR+CD down_proj failed this way."""
  W, H = layer_problem(rng, 8, 40)
  Q = W + 0.01 * rng.normal(size=W.shape)
  mask = rng.random(W.shape) < 0.1
  mask[2, 3:37] = True
  ours = np.asarray(resolve_outliers(jnp.asarray(W), jnp.asarray(H), jnp.asarray(Q),
                                     jnp.asarray(mask), ridge=0.0))
  np.testing.assert_allclose(ours, _numpy_optimal_outliers(W, H, Q, mask), rtol=1e-7,
                             atol=1e-9)


@pytest.mark.parametrize("fp16", [False, True])
def test_spqr_cd_never_worse_keeps_grid_and_outliers(rng, fp16):
  W, H = layer_problem(rng, 32, 128, dead=2)
  scfg = our_config(SpQRConfig, fp16_storage=fp16,
                    permutation_order="identity" if fp16 else "act_order")
  base = spqr(W, H, scfg)
  res = spqr_cd(W, H, _with_cd(scfg, rounds=2))
  trace = np.asarray(res.diagnostics.objective_trace)
  assert trace.shape == (5,)
  assert np.all(np.diff(trace) <= 0)
  assert float(res.objective) <= float(base.objective)
  assert float(res.objective) < 0.95 * float(base.objective)  # CD does find improvements
  np.testing.assert_array_equal(np.asarray(res.outlier_mask), np.asarray(base.outlier_mask))
  np.testing.assert_array_equal(np.asarray(res.grid.scale), np.asarray(base.grid.scale))
  np.testing.assert_array_equal(np.asarray(res.perm), np.asarray(base.perm))
  assert res.spqr.arrays().keys() == base.spqr.arrays().keys() == {
      f"{w}_{k}" for w in ("scale", "zero") for k in ("codes", "qq_scale", "qq_zero")}
  for k, v in base.spqr.arrays().items():
    np.testing.assert_array_equal(np.asarray(getattr(res.spqr, k)), np.asarray(v))
  assert jax.tree_util.tree_structure(res.spqr) == jax.tree_util.tree_structure(base.spqr)
  Q, mask = np.asarray(res.Q), np.asarray(res.outlier_mask)
  assert mask.any()
  np.testing.assert_array_equal(Q[~mask], np.asarray(dequantize(res.codes, res.grid))[~mask])
  if fp16:  # storable exactly in the packed format
    from cdquant_jax.quant import qweight
    packed = qweight.pack_result(res)
    np.testing.assert_array_equal(np.asarray(qweight.dequantize(packed)), Q)
  else:
    # The run ends with the outlier re-solve: outliers are stationary, (Q − W) H ≈ 0 there.
    G = (Q - W) @ H
    assert np.max(np.abs(G[mask])) < 1e-3 * np.max(np.abs(G[~mask]))


def test_zero_rounds_is_spqr_and_no_outliers_case(rng):
  W, H = layer_problem(rng, 16, 64)
  scfg = our_config(SpQRConfig, outlier_threshold=math.inf, groupsize=32)
  base = spqr(W, H, scfg)
  same = spqr_cd(W, H, _with_cd(scfg, rounds=0))
  np.testing.assert_array_equal(np.asarray(same.Q), np.asarray(base.Q))
  res = spqr_cd(W, H, _with_cd(scfg, rounds=1))
  assert float(res.objective) <= float(base.objective)
  assert not np.asarray(res.outlier_mask).any()


def test_bcd_refinement_is_monotone(rng):
  W, H = layer_problem(rng, 16, 64)
  scfg = our_config(SpQRConfig, groupsize=32)
  base = spqr(W, H, scfg)
  res = spqr_cd(W, H, _with_cd(scfg, refine="bcd", rounds=1))
  assert float(res.objective) < float(base.objective)
  assert int(np.sum(np.asarray(res.diagnostics.steps))) > 0
  Q, mask = np.asarray(res.Q), np.asarray(res.outlier_mask)
  np.testing.assert_array_equal(Q[~mask], np.asarray(dequantize(res.codes, res.grid))[~mask])
  np.testing.assert_array_equal(np.asarray(res.outlier_mask), np.asarray(base.outlier_mask))


def test_bad_config_raises(rng):
  with pytest.raises(ConfigError, match="rounds must be >= 0"):
    SpQRCDConfig(rounds=-1)
  with pytest.raises(ConfigError, match=r"\['bcd'\] settings are not used with refine='cd'"):
    SpQRCDConfig(bcd=BlockOptions(block_size=3))
  W, H = layer_problem(rng, 16, 2)
  per_row = SpQRCDConfig(refine="bcd", bcd=BlockOptions(block_size=3),
                         grid=dataclasses.replace(SPQR_GRID, group_size=-1))
  with pytest.raises(ValueError, match="block_size must be <= d_in=2"):
    spqr_cd(W, H, per_row, layer="fc1")
