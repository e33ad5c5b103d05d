"""Every solver reports a `Diagnostics`; the damping is found the same way for all of them."""

import jax
import numpy as np
import pytest

from cdquant_jax.pipeline import runlog
from cdquant_jax.solvers import api
from cdquant_jax.solvers.diagnostics import Damping, Diagnostics
from tests.fixtures.layer_problems import layer_problem

# method, knobs -> whether the solve damps H (its own sweep or a GPTQ start)
CASES = [("rtn", {}, False), ("gptq", {}, True), ("cd", {}, True), ("cd", {"init": "rtn"}, False),
         ("bcd", {"init": "rtn"}, False), ("cyclic", {}, True), ("spqr", {}, True),
         ("spqr-cd", {}, True)]


@pytest.mark.parametrize("method,knobs,damped", CASES)
def test_every_method_reports_diagnostics(rng, method, knobs, damped):
  W, H = layer_problem(rng, 16, 32, dtype=np.float32)
  res = api.solve(method, W, H, bits=3, **knobs)
  diag = res.diagnostics
  assert isinstance(diag, Diagnostics)
  assert (diag.damping is not None) == damped
  logged = runlog.damping(diag)
  if damped:
    assert logged["percdamp"] > 0 and logged["damp"] > 0 and logged["escalations"] == 0
  else:
    assert logged == dict(percdamp=None, damp=None, escalations=None)
  if method not in ("rtn", "gptq", "spqr"):
    assert diag.init_objective is not None and diag.steps.shape == (16,)
    assert float(res.objective) <= float(diag.init_objective) * (1 + 1e-6)


def test_diagnostics_is_a_pytree():
  damping = Damping(percdamp=np.float32(0.01), damp=np.float32(0.5), escalations=np.int32(0))
  diag = Diagnostics(damping=damping, steps=np.arange(3))
  doubled = jax.jit(lambda d: jax.tree_util.tree_map(lambda x: 2 * x, d))(diag)
  assert isinstance(doubled, Diagnostics) and doubled.objective_trace is None
  np.testing.assert_array_equal(doubled.steps, [0, 2, 4])
  assert float(doubled.damping.damp) == 1.0
