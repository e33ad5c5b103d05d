"""Sharded Hessians on 4 and 8 CPU devices (subprocess, see multidevice.py)."""

import pytest

from tests.distributed.multidevice import run_worker


@pytest.mark.parametrize("n_devices,shapes", [(4, ["4x1", "2x2", "1x4"]), (8, ["8x1", "2x4"])])
def test_sharded_hessian_equals_one_device(n_devices, shapes):
  out = run_worker("hessian_worker", n_devices, *shapes)
  assert out.count("mesh") == 2 * len(shapes)
