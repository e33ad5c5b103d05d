"""Row-sharded solves on 4 CPU devices equal the one-device solve (subprocess workers).

Every device compiles its own copy of a solver on the CPU backend (the persistent cache strips
the device assignment only on GPUs), so the descent solvers and SpQR, whose programs take
seconds to compile, are marked slow and run one per subprocess.
"""

import pytest

from cdquant_jax.distributed import solve as dsolve
from tests.distributed.multidevice import run_worker


def test_rtn_gptq_and_refusals():
  out = run_worker("solve_worker", 4, "4x1", "rtn,gptq,bcd,spqr-cd", timeout=300)
  assert "rtn: 4 shards" in out and "gptq: 4 shards" in out


@pytest.mark.slow
@pytest.mark.parametrize("method,n_devices,mesh", [("cd", 4, "2x2"), ("cyclic", 4, "1x4"),
                                                   ("spqr", 4, "2x2"), ("gptq", 8, "8x1")])
def test_descent_spqr_and_8_devices(method, n_devices, mesh):
  out = run_worker("solve_worker", n_devices, mesh, method, timeout=600)
  assert f"{method}: {n_devices} shards" in out and "identical" in out


def test_shard_bounds():
  assert dsolve.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
  assert dsolve.shard_bounds(64, 3, 16) == [(0, 32), (32, 48), (48, 64)]
  assert dsolve.shard_bounds(16, 4, 16) == [(0, 16)]  # never an empty shard
  for d_out, n, m in [(96, 4, 16), (7, 8, 1), (48, 5, 16)]:
    bounds = dsolve.shard_bounds(d_out, n, m)
    assert bounds[0][0] == 0 and bounds[-1][1] == d_out
    assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert all((b - a) % m == 0 and b > a for a, b in bounds)


def test_row_multiple_is_spqr_second_level_group():
  from cdquant_jax.solvers import api
  assert dsolve.row_multiple("gptq", api.default_config("gptq")) == 1
  assert dsolve.row_multiple("spqr", api.default_config("spqr")) == 16
