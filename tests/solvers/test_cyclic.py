"""Cyclic CD (QuantEase-style sweeps) against a literal float64 oracle, plus its properties."""

import numpy as np
import pytest

from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.solvers.cyclic import CyclicConfig, cyclic, refine_cyclic
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.init import InitConfig
from cdquant_jax.solvers.hessian import act_order_permutation
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles import cd_numpy as oracle


def _rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


@pytest.mark.parametrize("group_size,act_order", [(-1, False), (16, True)])
def test_matches_literal_cyclic_oracle(x64, rng, group_size, act_order):
  W, H = layer_problem(rng, 6, 48)
  grid_cfg = GridConfig(bits=3, group_size=group_size)
  start = rtn(W, H, RTNConfig(grid=grid_cfg))
  s, z = (np.asarray(a) for a in start.grid.expand())
  order = np.asarray(act_order_permutation(H)) if act_order else None
  # Block size 16 < d_in = 48: the lazy batches must not change the result.
  Q, diag = refine_cyclic(W, H, start.Q, start.grid, sweeps=3, blocksize=16, order=order)
  Q_ref, sweeps_ref = oracle.cyclic_cd(W, H, np.asarray(start.Q), s, z, 7, 3, order=order)
  assert _rel(oracle.objective(W, Q, H), oracle.objective(W, Q_ref, H)) < 1e-6
  np.testing.assert_allclose(np.asarray(Q), Q_ref, rtol=0, atol=1e-12)
  assert int(diag.rounds) == sweeps_ref


def test_monotone_and_below_init(rng):
  W, H = layer_problem(rng, 32, 200, dtype=np.float32)  # 200: padded to the block size 64
  grid_cfg = GridConfig(bits=3)
  res = cyclic(W, H, CyclicConfig(grid=grid_cfg, sweeps=6, blocksize=64))
  np.testing.assert_array_equal(np.asarray(res.Q), np.asarray(grids.dequantize(res.codes,
                                                                               res.grid)))
  ref = gptq(W, H, GPTQConfig(grid=grid_cfg))
  assert float(res.diagnostics.init_objective) == pytest.approx(float(ref.objective), rel=1e-6)
  assert float(res.objective) < 0.95 * float(ref.objective)
  trace = np.asarray(res.diagnostics.objective_trace)
  trace = trace[~np.isnan(trace)]
  assert len(trace) == int(res.diagnostics.rounds) + 1
  assert np.all(np.diff(trace) <= 1e-6 * trace[0])
  assert _rel(res.diagnostics.tracked_objective, res.diagnostics.recomputed_objective) < 1e-4
  assert _rel(res.objective, res.diagnostics.recomputed_objective) < 1e-5


def test_fixed_point_is_one_opt_and_dead_columns(x64, rng):
  W, H = layer_problem(rng, 8, 40, dead=3)
  dead = np.diag(H) == 0
  grid_cfg = GridConfig(bits=2, group_size=20)
  res = cyclic(W, H, CyclicConfig(grid=grid_cfg, init=InitConfig(method="rtn"), sweeps=50, blocksize=16))
  assert int(res.diagnostics.rounds) < 50  # reached a sweep without changes
  s, z = (np.asarray(a) for a in res.grid.expand())
  W0 = np.where(dead[None, :], 0.0, W)
  for r in range(W.shape[0]):
    gain, _, _ = oracle.best_single_move(W0, H, np.asarray(res.Q), s, z, 3, r)
    assert gain == 0.0
  zero_codes = np.asarray(grids.quantize(np.zeros_like(W), res.grid))
  np.testing.assert_array_equal(np.asarray(res.codes)[:, dead], zero_codes[:, dead])


def test_bad_config_raises(rng):
  W, H = layer_problem(rng, 4, 16, dtype=np.float32)
  with pytest.raises(ValueError, match="sweeps"):
    cyclic(W, H, CyclicConfig(sweeps=0))
  with pytest.raises(ValueError, match="W has d_in"):
    cyclic(W[:, :8], H, CyclicConfig())


def test_frozen_coordinates_keep_their_values(x64, rng):
  W, H = layer_problem(rng, 6, 32)
  start = rtn(W, H, RTNConfig(grid=GridConfig(bits=3)))
  frozen = rng.random(W.shape) < 0.2
  Q0 = np.where(frozen, W, np.asarray(start.Q))  # frozen weights off the grid (outliers)
  Q, diag = refine_cyclic(W, H, Q0, start.grid, sweeps=8, blocksize=16, frozen=frozen)
  Q = np.asarray(Q)
  np.testing.assert_array_equal(Q[frozen], Q0[frozen])
  assert oracle.objective(W, Q, H) < oracle.objective(W, Q0, H)
  assert _rel(diag.recomputed_objective, oracle.objective(W, Q, H)) < 1e-10
