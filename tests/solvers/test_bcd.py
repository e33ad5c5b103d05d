"""BCD: exact block minimisation against brute force, monotonicity, block tables, edge cases."""

import numpy as np
import pytest

from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.solvers.bcd import (BCDConfig, bcd, block_gains, correlation_partners,
                                     make_blocks, refine_bcd)
from cdquant_jax.solvers.init import InitConfig
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles import cd_numpy as oracle


def _rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


@pytest.mark.parametrize("k,radius", [(2, 1), (3, 1), (2, 2)])
def test_block_gains_match_brute_force(x64, rng, k, radius):
  W, H = layer_problem(rng, 5, 24)
  start = rtn(W, H, RTNConfig(grid=GridConfig(bits=3, group_size=8)))
  s, z = (np.asarray(a) for a in start.grid.expand())
  blocks = make_blocks(H, k, "correlated", n_partners=4)[:, 0, :]  # one block per anchor
  gains = np.asarray(block_gains(W, H, start.Q, start.grid, blocks, radius))
  scale = oracle.objective(W, np.asarray(start.Q), H)
  for r in range(W.shape[0]):
    for p in range(0, blocks.shape[0], 3):
      ref, _ = oracle.best_block_move(W, H, np.asarray(start.Q), s, z, 7, r, blocks[p], radius)
      assert gains[r, p] == pytest.approx(ref, abs=1e-12 * scale)
  assert np.any(gains < 0)


def test_converged_bcd_is_block_optimal(x64, rng):
  W, H = layer_problem(rng, 6, 24)
  start = rtn(W, H, RTNConfig(grid=GridConfig(bits=2)))
  s, z = (np.asarray(a) for a in start.grid.expand())
  blocks = make_blocks(H, 2, "correlated", n_partners=6)
  Q, diag = refine_bcd(W, H, start.Q, start.grid, blocks=blocks, max_steps=10_000,
                       candidates=4, rescan_every=3)
  assert int(diag.global_steps) < 10_000  # stopped because a scan found nothing
  Q = np.asarray(Q)
  for r in range(W.shape[0]):
    for block in blocks.reshape(-1, 2):
      gain, _ = oracle.best_block_move(W, H, Q, s, z, 3, r, block, 1)
      assert gain >= -1e-12 * oracle.objective(W[r:r + 1], 0 * W[r:r + 1], H)
  trace = np.asarray(diag.objective_trace)
  trace = trace[~np.isnan(trace)]
  assert len(trace) == int(diag.rounds) + 1
  assert np.all(np.diff(trace) <= 1e-12 * trace[0])
  assert _rel(diag.recomputed_objective, oracle.objective(W, Q, H)) < 1e-10
  assert _rel(diag.tracked_objective, diag.recomputed_objective) < 1e-10


@pytest.mark.parametrize("partition,init", [("correlated", "cd"), ("random", "gptq"),
                                            ("cyclic", "cd")])
def test_bcd_never_above_its_start(rng, partition, init):
  W, H = layer_problem(rng, 48, 128, dtype=np.float32)
  grid_cfg = GridConfig(bits=3)
  partners = dict(n_partners=8) if partition == "correlated" else {}
  start = InitConfig(method="rtn") if init == "cd" else InitConfig()
  cfg = BCDConfig(grid=grid_cfg, partition=partition, init=start, cd_first=init == "cd",
                  candidates=16, **partners)
  res = bcd(W, H, cfg)
  np.testing.assert_array_equal(np.asarray(res.Q), np.asarray(grids.dequantize(res.codes,
                                                                               res.grid)))
  start = float(res.diagnostics.init_objective)
  assert float(res.objective) <= start * (1 + 1e-6)
  if partition == "correlated" or init == "gptq":
    assert float(res.objective) < (0.995 if init == "cd" else 0.9) * start
  assert _rel(res.diagnostics.tracked_objective, res.diagnostics.recomputed_objective) < 1e-4


def test_dead_columns_and_groups(rng):
  W, H = layer_problem(rng, 16, 64, dtype=np.float32, dead=4)
  dead = np.diag(H) == 0
  res = bcd(W, H, BCDConfig(grid=GridConfig(bits=3, group_size=16), n_partners=6,
                            cd_first=False))
  assert np.all(np.isfinite(np.asarray(res.Q)))
  zero_codes = np.asarray(grids.quantize(np.zeros_like(W), res.grid))
  np.testing.assert_array_equal(np.asarray(res.codes)[:, dead], zero_codes[:, dead])
  assert float(res.objective) < float(res.diagnostics.init_objective)


def test_block_tables(rng):
  _, H = layer_problem(rng, 2, 30)
  corr = np.abs(H) / np.sqrt(np.outer(np.diag(H), np.diag(H)))
  partners = correlation_partners(H, 5)
  for i in range(30):
    others = np.delete(np.arange(30), i)
    top = np.sort(corr[i, others])[::-1][:5]
    np.testing.assert_allclose(corr[i, partners[i]], top)
  table = make_blocks(H, 3, "correlated", n_partners=6)
  assert table.shape == (30, 3, 3)
  np.testing.assert_array_equal(table[:, :, 0], np.repeat(np.arange(30)[:, None], 3, axis=1))
  for part in ("cyclic", "random"):
    table = make_blocks(H, 4, part, seed=1)
    assert table.shape == (8, 1, 4)
    assert set(table.ravel()) == set(range(30))
    assert all(len(set(b)) == 4 for b in table[:, 0])


def test_bad_config_raises(rng):
  W, H = layer_problem(rng, 4, 16, dtype=np.float32)
  with pytest.raises(ValueError, match="block_size"):
    bcd(W, H, BCDConfig(block_size=5))
  with pytest.raises(ValueError, match="partition"):
    bcd(W, H, BCDConfig(partition="diagonal"))
  with pytest.raises(ValueError, match="NaN"):
    bcd(W * np.nan, H)


def test_frozen_coordinates_keep_their_values(x64, rng):
  W, H = layer_problem(rng, 6, 24)
  start = rtn(W, H, RTNConfig(grid=GridConfig(bits=3)))
  frozen = rng.random(W.shape) < 0.2
  Q0 = np.where(frozen, W, np.asarray(start.Q))  # frozen weights off the grid (outliers)
  blocks = make_blocks(H, 2, "correlated", n_partners=6)
  Q, diag = refine_bcd(W, H, Q0, start.grid, blocks=blocks, max_steps=100, frozen=frozen)
  Q = np.asarray(Q)
  np.testing.assert_array_equal(Q[frozen], Q0[frozen])
  assert oracle.objective(W, Q, H) < oracle.objective(W, Q0, H)
  assert _rel(diag.recomputed_objective, oracle.objective(W, Q, H)) < 1e-10
