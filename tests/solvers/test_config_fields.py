"""Every leaf field of every solver config takes effect, or is rejected when the config is built.

For each method and each leaf field of its default config the test changes that one field (in
a context that enables it, e.g. `grid.mse_norm` under `grid.scale_search=mse`) and solves a
small layer problem with and without the change:
  EFFECT fields must change Q (or make the solve fail, for damping bounds);
  SPEED fields must leave Q bit-identical (they only reorganise the work);
  DRIFT fields (exact resynchronisation periods) may change float rounding only: the objective
    stays within 1e-5 relative;
  FIXED fields are settings the method cannot honour: any change is rejected with ConfigError.
A field in none of these lists fails the test, so a new config field must be classified.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.config import ConfigError
from cdquant_jax.solvers import api
from cdquant_jax.solvers.hessian import HessianError
from tests.fixtures.layer_problems import layer_problem

# Pure speed knobs: block sizes and compaction thresholds (Q must stay bit-identical).
SPEED = {"blocksize", "init.blocksize", "min_phase_rows", "cd.min_phase_rows",
         "bcd.min_phase_rows"}
# Exact-resync periods: only float drift of the tracked gradient.
DRIFT = {"resync_every", "cd.resync_every", "bcd.resync_every"}
# Settings a method cannot honour at all (every change is rejected).
FIXED = {
    "gptq": {"grid.flavor", "grid.round_zero"},
    "spqr": {"grid.flavor", "grid.scale_search", "grid.mse_norm", "grid.mse_grid",
             "grid.mse_max_shrink", "grid.owc_grid", "grid.owc_max_shrink"},
}
FIXED["spqr-cd"] = FIXED["spqr"]
# The changed value of a field (default: flip a bool; otherwise listed here).
CHANGED = {
    "grid.bits": 3, "grid.group_size": 16, "grid.flavor": "spqr", "grid.scale_search": "mse",
    "grid.mse_norm": 2.0, "grid.mse_grid": 20, "grid.mse_max_shrink": 0.05, "grid.owc_grid": 8,
    "grid.owc_max_shrink": 0.05, "percdamp": 0.3, "init.percdamp": 0.3,
    "max_damp_escalations": 0, "init.max_damp_escalations": 0, "init.method": "rtn",
    "blocksize": 16, "init.blocksize": 16, "min_phase_rows": 4, "cd.min_phase_rows": 4,
    "bcd.min_phase_rows": 4, "resync_every": 3, "cd.resync_every": 3, "bcd.resync_every": 3,
    "max_steps_factor": 0.05, "cd.max_steps_factor": 0.05, "bcd.max_steps_factor": 0.05,
    "refit_rounds": 1, "cd.refit_rounds": 1, "block_size": 3, "bcd.block_size": 3,
    "partition": "cyclic", "bcd.partition": "cyclic", "n_partners": 2, "bcd.n_partners": 2,
    "radius": 2, "bcd.radius": 2, "candidates": 1, "bcd.candidates": 1, "rescan_every": 1,
    "bcd.rescan_every": 1, "seed": 1, "bcd.seed": 1, "sweeps": 1, "visit_order": "diag_desc",
    "outlier_threshold": 0.05, "qq.scale_bits": 2, "qq.zero_bits": 2, "qq.group_size": 8,
    "refine": "bcd", "rounds": 1, "ridge": 10.0,
}
SPQR_CHANGED = {"grid.bits": 2, "grid.group_size": 32, "grid.flavor": "gptq"}
# Settings that enable a field (compared with and without the change, both in the context).
CONTEXT = {
    "grid.mse_norm": {"grid.scale_search": "mse"}, "grid.mse_grid": {"grid.scale_search": "mse"},
    "grid.mse_max_shrink": {"grid.scale_search": "mse"},
    "grid.owc_grid": {"grid.scale_search": "owc"},
    "grid.owc_max_shrink": {"grid.scale_search": "owc"},
    # Static groups differ from the reference's dynamic ones only across blocks (inside a
    # block the reference fits groups on the block-start weights, which is what static is).
    "static_groups": {"grid.group_size": 16, "blocksize": 16},
    "init.static_groups": {"grid.group_size": 16, "init.blocksize": 16},
    "exact_groups": {"grid.group_size": 16}, "init.exact_groups": {"grid.group_size": 16},
    "refit_rounds": {"grid.group_size": 16}, "cd.refit_rounds": {"grid.group_size": 16},
    "seed": {"partition": "random"}, "bcd.seed": {"refine": "bcd", "bcd.partition": "random"},
}
# Descent solvers: the SpQR flavour and round_zero need an RTN start (GPTQ has no SpQR grid).
CONTEXT["grid.flavor"] = {"init.method": "rtn"}
CONTEXT["grid.round_zero"] = {"init.method": "rtn", "grid.flavor": "spqr"}
# Damping bounds: shown on a Hessian that needs one escalation.
NEEDS_ESCALATION = {"max_damp_escalations", "init.max_damp_escalations"}


def _context(method: str, path: str) -> dict:
  """The enabling settings of `path` that this method's config has."""
  ctx = dict(CONTEXT.get(path, {}))
  if path.startswith("bcd."):
    ctx.setdefault("refine", "bcd")
  cfg = api.default_config(method)
  return {p: v for p, v in ctx.items() if config_lib.has_path(cfg, p)}


def _changed(method: str, cfg, path: str):
  if method.startswith("spqr") and path in SPQR_CHANGED:
    return SPQR_CHANGED[path]
  current = config_lib.get_path(cfg, path)
  if isinstance(current, bool):
    return not current
  return CHANGED[path]


@functools.cache
def _problem(escalation: bool) -> tuple[np.ndarray, np.ndarray]:
  """A 32 x 64 layer problem; with `escalation`, H shifted so that percdamp alone (GPTQ 0.01,
  SpQR 1.0 of mean diag) fails and 10x of it succeeds."""
  W, H = layer_problem(np.random.default_rng(0), 32, 64, dtype=np.float32)
  if not escalation:
    return W, H
  H = H.astype(np.float64)
  lam, m = float(np.linalg.eigvalsh(H)[0]), float(np.mean(np.diag(H)))
  # After H - c I: lam - c + 3 p (m - c) = 0 for p = 0.01, so p fails and 10 p works.
  p = 0.01
  c = (lam + 3 * p * m) / (1 + 3 * p)
  return W, (H - c * np.eye(64)).astype(np.float32)


def _solve(method: str, cfg, escalation: bool):
  W, H = _problem(escalation)
  try:
    return np.asarray(api.solve(method, W, H, cfg, layer="walk").Q)
  except HessianError as e:
    return e


def _cases():
  for method in api.METHODS:
    for path in config_lib.leaf_paths(api.default_config(method)):
      yield pytest.param(method, path, id=f"{method}:{path}")


@pytest.mark.parametrize("method,path", list(_cases()))
def test_field_takes_effect_or_is_rejected(method, path):
  default = api.default_config(method)
  value = _changed(method, default, path)
  if path in FIXED.get(method, ()):
    with pytest.raises(ConfigError):
      config_lib.replace_paths(default, {path: value})
    return
  ctx = _context(method, path)
  if path in NEEDS_ESCALATION and method.startswith("spqr"):
    ctx["percdamp"] = 0.01  # the shifted H is built for p = 0.01
  base_cfg = config_lib.replace_paths(default, ctx)
  changed_cfg = config_lib.replace_paths(default, {**ctx, path: value})
  escalation = path in NEEDS_ESCALATION
  base, changed = _solve(method, base_cfg, escalation), _solve(method, changed_cfg, escalation)
  assert not isinstance(base, Exception), f"{method} {ctx}: {base}"
  if path in SPEED:
    np.testing.assert_array_equal(changed, base, err_msg=f"{method}: {path} is not speed-only")
  elif path in DRIFT:
    W, H = _problem(False)
    obj = lambda Q: float(np.sum(((W - Q) @ H) * (W - Q)))
    assert obj(changed) == pytest.approx(obj(base), rel=1e-5)
  else:
    assert isinstance(changed, Exception) or not np.array_equal(changed, base), (
        f"{method}: changing {path} to {value!r} (context {ctx}) did not change Q")


@pytest.mark.parametrize("method,changes,match", [
    ("gptq", {"grid.mse_norm": 2.0}, r"\['mse_norm'\] set but scale_search='minmax'"),
    ("gptq", {"static_groups": True}, "static_groups=True needs a group grid"),
    ("cd", {"init.method": "rtn", "init.percdamp": 0.1}, r"\['percdamp'\] only apply"),
    ("bcd", {"cd_first": False, "cd.max_steps_factor": 2.0}, "cd settings only apply"),
    ("bcd", {"seed": 3}, "seed only applies to partition='random'"),
    ("spqr", {"outlier_threshold": math.inf, "simplified_outliers": True}, "needs outliers"),
    ("spqr", {"qq.scale_bits": None, "qq.zero_bits": None, "qq.group_size": 8},
     "group_size only applies"),
    ("spqr-cd", {"refine": "cd", "bcd.radius": 2}, r"\['bcd'\] settings are not used"),
    ("spqr-cd", {"rounds": 0, "cd.max_steps_factor": 2.0}, r"\['cd'\] settings are not used"),
])
def test_inapplicable_settings_are_rejected_naming_the_field(method, changes, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.replace_paths(api.default_config(method), changes)
