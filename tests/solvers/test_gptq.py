"""GPTQ and RTN against independent float64 oracles, plus the properties GPTQ promises."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.quant import grids
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.solvers.gptq import GPTQConfig, gptq
from cdquant_jax.solvers.hessian import HessianError
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.fixtures.layer_problems import layer_problem
from tests.solvers.oracles import gptq_numpy as oracle


def _rel(a, b):
  return abs(a - b) / max(abs(b), 1e-30)


CASES = [  # (bits, group_size, sym, act_order, static_groups, blocksize) named gG-bB style
    pytest.param(4, -1, False, False, False, 128, id="w4-perchannel"),
    pytest.param(3, -1, True, True, False, 32, id="w3-sym-actorder-b32"),
    pytest.param(3, 32, False, False, False, 64, id="w3-g32b64-quirk"),
    pytest.param(2, 32, False, True, False, 32, id="w2-g32b32-actorder"),
    pytest.param(4, 32, False, True, True, 64, id="w4-g32b64-static-actorder"),
    pytest.param(3, 64, False, False, False, 64, id="w3-g64b64"),
]


@pytest.mark.parametrize("bits,gs,sym,act,static,bs", CASES)
def test_gptq_matches_reference_oracle(x64, rng, bits, gs, sym, act, static, bs):
  W, H = layer_problem(rng, 24, 128, dead=2)
  cfg = GPTQConfig(grid=GridConfig(bits=bits, group_size=gs, sym=sym), act_order=act,
                   static_groups=static, blocksize=bs)
  res = gptq(W, H, cfg)
  Q_ref = oracle.gptq_reference(W, H, bits, group_size=gs, sym=sym, act_order=act,
                                static_groups=static, blocksize=bs)
  obj_ref = oracle.objective(W, Q_ref, H)
  assert _rel(float(res.objective), obj_ref) < 1e-6
  np.testing.assert_allclose(np.asarray(res.Q), Q_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("gs,act", [(-1, False), (16, False), (16, True)])
def test_exact_groups_match_unblocked_oracle(x64, rng, gs, act):
  W, H = layer_problem(rng, 16, 96)
  # exact_groups only exists for groups (a per-channel grid rejects it).
  cfg = GPTQConfig(grid=GridConfig(bits=3, group_size=gs), act_order=act,
                   exact_groups=gs != -1, blocksize=64)
  Q_ref = oracle.gptq_unblocked(W, H, 3, group_size=gs, act_order=act)
  np.testing.assert_allclose(np.asarray(gptq(W, H, cfg).Q), Q_ref, atol=1e-9)


@pytest.mark.parametrize("gs,exact,sizes", [(-1, False, (16, 32, 128)), (32, False, (8, 16, 32)),
                                            (16, True, (16, 32, 128))])
def test_blocksize_changes_speed_only(x64, rng, gs, exact, sizes):
  # Holds for per-channel, for groups that are a multiple of the block size, and for exact
  # groups; the reference quirk (G < B, inexact) is covered by the oracle test instead.
  W, H = layer_problem(rng, 16, 128)
  results = [gptq(W, H, GPTQConfig(grid=GridConfig(bits=3, group_size=gs), blocksize=bs,
                                   exact_groups=exact)).Q for bs in sizes]
  for Q in results[1:]:
    np.testing.assert_allclose(np.asarray(Q), np.asarray(results[0]), atol=1e-10)


def test_block_size_not_dividing_d_in(x64, rng):
  W, H = layer_problem(rng, 8, 100)
  Q = gptq(W, H, GPTQConfig(grid=GridConfig(bits=4), blocksize=64)).Q
  Q_ref = oracle.gptq_reference(W, H, 4, blocksize=64)
  np.testing.assert_allclose(np.asarray(Q), Q_ref, atol=1e-9)


def test_act_order_round_trip(rng):
  W, H = layer_problem(rng, 32, 128, dtype=np.float32)
  res = gptq(W, H, GPTQConfig(grid=GridConfig(bits=4, group_size=32), act_order=True))
  perm = np.asarray(res.perm)
  assert sorted(perm.tolist()) == list(range(128))
  assert np.all(np.diff(np.diag(H)[perm]) <= 0)  # descending diag(H)
  # Q in original order is exactly the dequantized codes on the recorded grid ...
  np.testing.assert_array_equal(np.asarray(grids.dequantize(res.codes, res.grid)),
                                np.asarray(res.Q))
  # ... and groups are contiguous in processing order.
  gi = np.asarray(res.grid.group_index)[perm]
  assert np.all(gi == np.arange(128) // 32)


@pytest.mark.parametrize("bits,gs", [(4, -1), (3, -1), (3, 32), (2, 32)])
def test_gptq_beats_rtn_on_output_error_not_weight_error(rng, bits, gs):
  # qwix-style property: GPTQ is worse on the weights but better on the outputs.
  d_in = 128
  W, H = layer_problem(rng, 64, d_in, dtype=np.float32)
  grid = GridConfig(bits=bits, group_size=gs)
  q_gptq = gptq(W, H, GPTQConfig(grid=grid))
  q_rtn = rtn(W, H, RTNConfig(grid=grid))
  assert float(q_gptq.objective) < float(q_rtn.objective)
  weight_err = lambda Q: float(np.sum((np.asarray(Q) - W) ** 2))
  assert weight_err(q_gptq.Q) > weight_err(q_rtn.Q)


def test_rtn_matches_oracle(x64, rng):
  W, H = layer_problem(rng, 16, 64)
  for gs in (-1, 16):
    res = rtn(W, H, RTNConfig(grid=GridConfig(bits=3, group_size=gs)))
    np.testing.assert_allclose(np.asarray(res.Q), oracle.rtn(W, 3, gs), atol=1e-12)
    assert _rel(float(res.objective), oracle.objective(W, oracle.rtn(W, 3, gs), H)) < 1e-9


def test_dead_columns_quantize_to_zero(rng):
  W, H = layer_problem(rng, 16, 64, dtype=np.float32)
  H[5, :] = H[:, 5] = 0.0
  res = gptq(W, H, GPTQConfig(grid=GridConfig(bits=4)))
  assert np.all(np.asarray(res.Q)[:, 5] == 0.0)
  assert np.isfinite(float(res.objective))


def test_damping_escalation_recovers_and_is_reported(rng):
  W, H = layer_problem(rng, 8, 32, dtype=np.float32)
  # Make H indefinite with a negative eigenvalue of size ~0.3 of the mean diagonal.
  v = rng.normal(size=32).astype(np.float32)
  v /= np.linalg.norm(v)
  Hbad = H - (np.linalg.eigvalsh(H)[0] + 0.3 * np.mean(np.diag(H))) * np.outer(v, v)
  res = gptq(W, Hbad, GPTQConfig(grid=GridConfig(bits=4), percdamp=0.01))
  assert int(res.diagnostics.damping.escalations) >= 1
  assert float(res.diagnostics.damping.percdamp) > 0.01


def test_damping_escalation_bounded_error_names_layer(rng):
  W, H = layer_problem(rng, 8, 32, dtype=np.float32)
  with pytest.raises(HessianError, match=r"layer blk3\.q_proj.*\(32, 32\).*percdamp tried"):
    gptq(W, -H, GPTQConfig(grid=GridConfig(bits=4), max_damp_escalations=2), layer="blk3.q_proj")


@pytest.mark.parametrize("bad,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(group_size=48), "group_size"),
])
def test_bad_grid_config(rng, bad, match):
  W, H = layer_problem(rng, 8, 64, dtype=np.float32)
  with pytest.raises(ValueError, match=match):
    gptq(W, H, GPTQConfig(grid=GridConfig(**bad)))


def test_bad_inputs(rng):
  W, H = layer_problem(rng, 8, 64, dtype=np.float32)
  with pytest.raises(ValueError, match="d_in=64"):
    gptq(W, H[:32, :32], GPTQConfig())
  W_nan = W.copy()
  W_nan[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    gptq(W_nan, H, GPTQConfig(), layer="L")
  H_asym = H.copy()
  H_asym[0, 1] += 1.0
  with pytest.raises(ValueError, match="symmetric"):
    gptq(W, H_asym, GPTQConfig())


def test_large_layer_compiles_without_unrolling(rng):
  # A 4096-column problem must trace to a small program (loops are lax loops): the jaxpr of the
  # sweep stays the same size whatever d_in is.
  from cdquant_jax.solvers import gptq as gptq_mod
  sizes = []
  for d_in in (256, 4096):
    W = jnp.zeros((8, d_in), jnp.float32)
    U = jnp.eye(d_in, dtype=jnp.float32)
    cfg = GPTQConfig(grid=GridConfig(bits=4, group_size=128))
    jaxpr = jax.make_jaxpr(lambda w, u: gptq_mod._sweep(w, u, w, w, cfg=cfg, dynamic=True))(W, U)
    sizes.append(len(str(jaxpr)))
  assert sizes[1] < 1.2 * sizes[0]
