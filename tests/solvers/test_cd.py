"""Greedy CD against a literal float64 greedy-CD oracle, plus the properties CD promises."""

import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax._numerics import layer_objective
from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import Flavor, GridConfig
from cdquant_jax.solvers import refit as refit_lib
from cdquant_jax.solvers.cd import CDConfig, cd, refine_greedy
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.hessian import HessianError
from cdquant_jax.solvers.init import InitConfig
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles import cd_numpy as oracle

RTN_START = InitConfig(method="rtn")


def _rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def _rtn_start(W, H, grid_cfg):
  res = rtn(W, H, RTNConfig(grid=grid_cfg))
  s, z = res.grid.expand()
  return res, np.asarray(s, np.float64), np.asarray(z, np.float64)


def _check_result(res, W, H):
  """SolveResult invariants: Q from the codes exactly, objective on the given H."""
  np.testing.assert_array_equal(np.asarray(res.Q), np.asarray(grids.dequantize(res.codes,
                                                                               res.grid)))
  assert res.codes.dtype == jnp.int32
  assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= res.grid.maxq
  assert _rel(res.objective, layer_objective(jnp.asarray(W), res.Q, jnp.asarray(H))) < 1e-5


@pytest.mark.parametrize("group_size,flavor,min_rows", [(-1, Flavor.GPTQ, 4),
                                                        (16, Flavor.SPQR, 64)])
def test_matches_literal_greedy_oracle(x64, rng, group_size, flavor, min_rows):
  W, H = layer_problem(rng, 12, 64)
  grid_cfg = GridConfig(bits=3, group_size=group_size, flavor=flavor)
  start, s, z = _rtn_start(W, H, grid_cfg)
  max_steps = 40  # below convergence for some rows: the budget must cut both the same way
  # min_rows=4: row-compaction phases of 12, 6 and 4 rows; 64: a single phase.
  Q, diag = refine_greedy(W, H, start.Q, start.grid, max_steps=max_steps, resync_every=7,
                          trace_every=1, min_phase_rows=min_rows)
  Q_ref, steps_ref, _ = oracle.greedy_cd(W, H, np.asarray(start.Q), s, z, 7, max_steps)
  assert _rel(oracle.objective(W, Q, H), oracle.objective(W, Q_ref, H)) < 1e-6
  np.testing.assert_array_equal(np.asarray(diag.steps), steps_ref)
  np.testing.assert_allclose(np.asarray(Q), Q_ref, rtol=0, atol=1e-12)


def test_converges_to_one_opt_and_trace_is_monotone(x64, rng):
  W, H = layer_problem(rng, 10, 48)
  grid_cfg = GridConfig(bits=2, group_size=16)
  start, s, z = _rtn_start(W, H, grid_cfg)
  Q, diag = refine_greedy(W, H, start.Q, start.grid, max_steps=10_000, resync_every=5,
                          trace_every=1, min_phase_rows=5)
  assert int(diag.global_steps) < 10_000  # every row stopped at a 1-opt point
  for r in range(W.shape[0]):
    gain, _, _ = oracle.best_single_move(W, H, np.asarray(Q), s, z, 3, r)
    assert gain >= -1e-12 * oracle.objective(W[r:r + 1], W[r:r + 1] * 0, H)
  trace = np.asarray(diag.objective_trace)
  trace = trace[~np.isnan(trace)]
  assert len(trace) == int(diag.global_steps) + 1
  assert np.all(np.diff(trace) <= 1e-12 * trace[0])
  assert np.all(np.diff(trace)[:-1] < 0) or len(trace) < 3
  assert _rel(diag.tracked_objective, diag.recomputed_objective) < 1e-10
  assert _rel(diag.recomputed_objective, oracle.objective(W, Q, H)) < 1e-10


def test_tracked_objective_equals_recomputed_f32(rng):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32)
  cfg = CDConfig(grid=GridConfig(bits=4), init=RTN_START, resync_every=50)
  res = cd(W, H, cfg)
  _check_result(res, W, H)
  diag = res.diagnostics
  assert _rel(diag.tracked_objective, diag.recomputed_objective) < 1e-4
  assert float(diag.max_resync_drift) < 1e-4
  assert _rel(res.objective, diag.recomputed_objective) < 1e-5
  assert diag.steps.shape == (32,) and int(diag.steps.max()) <= 128
  trace = np.asarray(diag.objective_trace)
  trace = trace[~np.isnan(trace)]
  assert trace[0] == pytest.approx(float(diag.init_objective), rel=1e-5)
  assert np.all(np.diff(trace) <= 1e-5 * trace[0])


@pytest.mark.parametrize("act_order,group_size", [(False, -1), (True, 32)])
def test_cd_from_gptq_never_above_gptq(rng, act_order, group_size):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32)
  grid_cfg = GridConfig(bits=3, group_size=group_size)
  ref = gptq(W, H, GPTQConfig(grid=grid_cfg, act_order=act_order))
  res = cd(W, H, CDConfig(grid=grid_cfg, init=InitConfig(act_order=act_order)))
  _check_result(res, W, H)
  assert float(res.objective) <= float(ref.objective) * (1 + 1e-6)
  assert float(res.objective) < 0.95 * float(ref.objective)
  assert float(res.diagnostics.init_objective) == pytest.approx(float(ref.objective), rel=1e-6)
  assert res.diagnostics.damping is not None
  np.testing.assert_array_equal(np.asarray(res.perm), np.asarray(ref.perm))


@pytest.mark.parametrize("scale_search", ["minmax", "owc"])  # owc: CDQuant's OWC start
def test_cd_beats_its_rtn_start(rng, scale_search):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32)
  res = cd(W, H, CDConfig(grid=GridConfig(bits=4, scale_search=scale_search), init=RTN_START,
                          resync_every=50))
  _check_result(res, W, H)
  assert float(res.objective) < 0.7 * float(res.diagnostics.init_objective)


def test_refit_rounds_never_raise_the_objective(rng):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32)
  grid_cfg = GridConfig(bits=3, group_size=32)
  base = cd(W, H, CDConfig(grid=grid_cfg, init=RTN_START))
  res = cd(W, H, CDConfig(grid=grid_cfg, init=RTN_START, refit_rounds=2))
  _check_result(res, W, H)
  refits = np.asarray(res.diagnostics.refit_objectives)
  assert refits[0] <= float(base.objective) * (1 + 1e-6)
  assert float(res.objective) <= refits[-1] * (1 + 1e-6)
  assert float(res.objective) <= float(base.objective) * (1 + 1e-6)
  # GPTQ flavour keeps integer zero points.
  np.testing.assert_array_equal(np.asarray(res.grid.zero), np.round(np.asarray(res.grid.zero)))


@pytest.mark.parametrize("sym,flavor", [(True, Flavor.GPTQ), (False, Flavor.SPQR)])
def test_refit_is_the_least_squares_optimum(x64, rng, sym, flavor):
  """Where the refit has no rounding (fixed or fractional zeros) it solves the row's exact
  least-squares problem: compare with numpy lstsq on the H-weighted design matrix."""
  W, H = layer_problem(rng, 6, 32)
  grid_cfg = GridConfig(bits=3, group_size=8, sym=sym, flavor=flavor)
  start, _, _ = _rtn_start(W, H, grid_cfg)
  new_grid, Q, _ = refit_lib.refit_grid(jnp.asarray(W), jnp.asarray(H), start.Q, start.grid,
                                        grid_cfg)
  codes = np.asarray(start.codes, np.float64)
  # H = L Lᵀ, so ‖Lᵀ(w − A x)‖² is the row objective.
  L = np.linalg.cholesky(H + 1e-12 * np.eye(32))
  at_optimum = 0
  for r in range(W.shape[0]):
    cols = []
    for g in range(4):
      member = (np.arange(32) // 8 == g).astype(float)
      if sym:
        cols.append(member * (codes[r] - float(start.grid.zero[r, g])))
      else:
        cols += [member * codes[r], member]
    A = np.stack(cols, axis=1)
    x, *_ = np.linalg.lstsq(L.T @ A, L.T @ W[r], rcond=None)
    best = oracle.objective(W[r:r + 1], (A @ x)[None], H)
    before = oracle.objective(W[r:r + 1], np.asarray(start.Q[r:r + 1]), H)
    after = oracle.objective(W[r:r + 1], np.asarray(Q[r:r + 1]), H)
    assert after <= before
    if np.all(x[::1 if sym else 2] > 0):  # the optimum is a valid grid (positive scales)
      assert after <= best * (1 + 1e-6)
      at_optimum += 1
  assert at_optimum >= 3


def test_dead_columns(rng):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32, dead=5)
  dead = np.diag(H) == 0
  assert dead.sum() == 5
  res = cd(W, H, CDConfig(grid=GridConfig(bits=3, group_size=32)))
  _check_result(res, W, H)
  assert np.all(np.isfinite(np.asarray(res.Q)))
  zero_codes = np.asarray(grids.quantize(jnp.zeros_like(res.Q), res.grid))
  np.testing.assert_array_equal(np.asarray(res.codes)[:, dead], zero_codes[:, dead])
  assert float(res.objective) < float(res.diagnostics.init_objective)


def test_frozen_coordinates_keep_their_values(x64, rng):
  W, H = layer_problem(rng, 8, 40)
  grid_cfg = GridConfig(bits=3)
  start, s, z = _rtn_start(W, H, grid_cfg)
  frozen = rng.random(W.shape) < 0.2
  Q0 = np.where(frozen, W, np.asarray(start.Q))  # frozen weights off the grid (outliers)
  Q, diag = refine_greedy(W, H, Q0, start.grid, max_steps=64, resync_every=10, frozen=frozen)
  np.testing.assert_array_equal(np.asarray(Q)[frozen], Q0[frozen])
  Q_ref, _, _ = oracle.greedy_cd(W, H, Q0, s, z, 7, 64, frozen=frozen)
  assert _rel(oracle.objective(W, Q, H), oracle.objective(W, Q_ref, H)) < 1e-6


def test_bad_inputs_raise(rng):
  W, H = layer_problem(rng, 8, 32, dtype=np.float32)
  with pytest.raises(ValueError, match="NaN"):
    cd(np.where(np.eye(8, 32) > 0, np.nan, W), H, layer="blk.0.q")
  with pytest.raises(ValueError, match="blk.0.q"):
    cd(W, H[:16, :16], layer="blk.0.q")
  with pytest.raises(HessianError):
    cd(W, H + np.triu(np.ones_like(H)), layer="blk.0.q")
  with pytest.raises(ValueError, match="group_size"):
    cd(W, H, CDConfig(grid=GridConfig(group_size=12)))
  with pytest.raises(ValueError, match="max_steps_factor"):
    cd(W, H, CDConfig(max_steps_factor=0.0))
  with pytest.raises(ValueError, match="method must be one of"):
    cd(W, H, CDConfig(init=InitConfig(method="zeros")))
  with pytest.raises(ValueError, match=r"\['act_order'\] only apply to method='gptq'"):
    CDConfig(init=InitConfig(method="rtn", act_order=True))
