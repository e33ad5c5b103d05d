"""SpQR sweep: float64 oracle parity and properties."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant.grids import dequantize
from cdquant_jax.solvers.spqr import SpQRConfig, spqr
from cdquant_jax.solvers.spqr_stats import StatsConfig, leave_one_out_reduction
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles import spqr_numpy as oracle

ORACLE_CASES = {
    "default": dict(),
    "identity_simplified": dict(permutation_order="identity", simplified_outliers=True,
                                percdamp=0.01),
    "no_outliers_sym_qq_zero_sym": dict(outlier_threshold=math.inf, sym=True, qq_zero_sym=True),
    "sym": dict(sym=True, qq_zero_bits=None),
    # round_zero: zeros get a second level only when qq_zero_bits < bits.
    "round_zero_b4": dict(round_zero=True, bits=4),
    "round_zero_unquantized_stats": dict(round_zero=True, bits=2, qq_scale_bits=None),
    "group_spans_blocks": dict(groupsize=32, blocksize=16, qq_scale_bits=2),
    "small_blocks_low_tau": dict(blocksize=32, outlier_threshold=0.05),
}


def _compare(ours, ref, W, H):
  mask = np.asarray(ours.outlier_mask)
  np.testing.assert_array_equal(mask, ref["mask"])
  np.testing.assert_allclose(np.asarray(ours.Q), ref["Q"], atol=1e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(ours.perm), ref["perm"])
  np.testing.assert_allclose(np.asarray(ours.grid.scale), ref["scales"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(np.asarray(ours.grid.zero), ref["zeros"], rtol=1e-9, atol=1e-9)
  for name in ("scale", "zero"):
    if ours.spqr.level(name) is None:
      assert all(name not in s for s in ref["second"])
      continue
    codes = np.stack([s[name][0] for s in ref["second"]], 1)
    np.testing.assert_array_equal(np.asarray(getattr(ours.spqr, f"{name}_codes")), codes)
    s2 = np.stack([s[name][1] for s in ref["second"]], 1)
    np.testing.assert_allclose(np.asarray(getattr(ours.spqr, f"{name}_qq_scale")), s2, rtol=1e-9)


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False)])
def test_leave_one_out_screen_matches_oracle(x64, rng, bits, sym):
  Wg = rng.normal(size=(32, 16))
  Wg[0] = 0.5  # constant row
  Wg[1, :3] = Wg[1].min()  # tied minimum
  Wg[2, 5] = Wg[2].max()  # tied maximum
  u = rng.random(16) + 0.5
  cfg = StatsConfig(bits=bits, sym=sym, round_zero=False, qq_scale_bits=None, qq_zero_bits=None,
                    qq_groupsize=16, qq_zero_sym=False, fp16_storage=False)
  ours = leave_one_out_reduction(jnp.asarray(Wg), jnp.asarray(u), cfg)
  np.testing.assert_allclose(np.asarray(ours), oracle.leave_one_out_reduction(Wg, u, bits, sym),
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_float64_oracle(x64, rng, case):
  kw = ORACLE_CASES[case]
  W, H = layer_problem(rng, 32, 64)
  ours = spqr(W, H, oracle.our_config(SpQRConfig, fp16_storage=False, **kw))
  ref = oracle.spqr_reference(W, H, fp16_storage=False, **kw)
  _compare(ours, ref, W, H)
  if "outlier_threshold" not in kw:
    assert ref["mask"].any(), "the case should exercise outliers"


def test_matches_oracle_with_padding_dead_columns_and_fp16_storage(x64, rng):
  # d_in = 96 is not a multiple of the block size 64; one group spans the whole row.
  W, H = layer_problem(rng, 32, 96, dead=3)
  for kw in (dict(blocksize=64, groupsize=-1), dict(blocksize=64, groupsize=16)):
    ours = spqr(W, H, oracle.our_config(SpQRConfig, fp16_storage=True, **kw))
    ref = oracle.spqr_reference(W, H, fp16_storage=True, **kw)
    _compare(ours, ref, W, H)


def test_result_invariants_and_second_level_grid(rng):
  W, H = layer_problem(rng, 48, 64)
  cfg = oracle.our_config(SpQRConfig, qq_groupsize=16)
  res = spqr(W, H, cfg)
  Q, codes, mask = map(np.asarray, (res.Q, res.codes, res.outlier_mask))
  assert Q.dtype == np.float32 and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() <= cfg.maxq
  deq = np.asarray(dequantize(res.codes, res.grid))
  np.testing.assert_array_equal(Q[~mask], deq[~mask])
  # Group of the j-th processed column is j // groupsize.
  np.testing.assert_array_equal(np.asarray(res.grid.group_index)[np.asarray(res.perm)],
                                np.arange(64) // 16)
  # Outliers are storable exactly (dense value of their code + a float16 correction: the packed
  # format round-trips Q bit for bit); second-level statistics are float16-representable and
  # the dequantized first-level statistics lie exactly on their second-level grids.
  assert mask.any()
  from cdquant_jax.quant import qweight
  packed = qweight.pack_result(res)
  np.testing.assert_array_equal(np.asarray(qweight.dequantize(packed)), Q)
  n_groups = 4
  for name in ("scale", "zero"):
    c, s2, z2 = map(np.asarray, res.spqr.level(name))
    assert c.shape == (48, n_groups) and s2.shape == z2.shape == (3, n_groups)
    assert c.min() >= 0 and c.max() <= 7
    for v in (s2, z2):
      np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float32))
    # [d_out // β2, n_groups] -> one value per row
    first = np.repeat(s2, 16, axis=0) * (c - np.repeat(z2, 16, axis=0))
    np.testing.assert_allclose(np.asarray(getattr(res.grid, name)), first, rtol=1e-6, atol=1e-7)
  assert res.spqr.groupsize == 16 and res.spqr.qq_groupsize == 16
  assert (res.spqr.qq_scale_bits, res.spqr.qq_zero_bits) == (3, 3)  # the defaults
  np.testing.assert_allclose(float(res.objective), float(layer_objective(W, Q, H)), rtol=1e-5)


def test_outliers_lower_the_objective_and_higher_tau_gives_fewer(rng):
  W, H = layer_problem(rng, 32, 128)
  W[rng.random(W.shape) < 0.01] *= 8.0  # a few heavy weights
  base = spqr(W, H, SpQRConfig(outlier_threshold=math.inf))
  counts, objectives = [], []
  for tau in (0.05, 0.2, 1.0, 5.0):
    res = spqr(W, H, SpQRConfig(outlier_threshold=tau))
    counts.append(int(np.sum(np.asarray(res.outlier_mask))))
    objectives.append(float(res.objective))
  assert all(o < float(base.objective) for o in objectives[:3])
  assert counts[0] > counts[1] > counts[2] >= counts[3]
  assert counts[2] > 0


def test_bad_shapes_raise_clear_errors(rng):
  W, H = layer_problem(rng, 24, 64)
  with pytest.raises(ValueError, match=r"layer q_proj.*qq.group_size.*d_out=24"):
    spqr(W, H, SpQRConfig(), layer="q_proj")
  # Without a second level any d_out works.
  res = spqr(W, H, oracle.our_config(SpQRConfig, qq_scale_bits=None, qq_zero_bits=None,
                                           outlier_threshold=math.inf))
  assert res.spqr.level("scale") is None and res.spqr.level("zero") is None
  assert res.spqr.qq_scale_bits == res.spqr.qq_zero_bits == 0
  assert res.grid.scale.shape == (24, 4)
  W, H = layer_problem(rng, 32, 64)
  with pytest.raises(ValueError, match=r"group_size.*d_in=64"):
    spqr(W, H, oracle.our_config(SpQRConfig, groupsize=24), layer="q_proj")
  with pytest.raises(ValueError, match=r"straddles"):
    spqr(W, H, oracle.our_config(SpQRConfig, groupsize=32, blocksize=48), layer="q_proj")
