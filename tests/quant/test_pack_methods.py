"""Every method's SolveResult packs with no method-specific arguments: the metadata (bits, sym,
round_zero, second-level bits, method) comes from the result and matches the config, and the
packed weight dequantizes to result.Q bit for bit."""

import dataclasses

import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.quant import qweight
from cdquant_jax.quant.grids import Flavor
from cdquant_jax.solvers import api
from cdquant_jax.solvers.gptq import gptq
from tests.fixtures.layer_problems import layer_problem
from tests.quant.qweight_fixtures import bit_equal

BITS, QQ_BITS = 2, 2  # both differ from every default (4 or 3 bits), so a dropped setting shows
SECOND_LEVEL_BITS = ("qq_scale_bits", "qq_zero_bits", "scale_bits", "zero_bits")


def _leaves(cfg, prefix=""):
  """(dotted path, parent config, field name) of every non-dataclass field of `cfg`."""
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      yield from _leaves(value, f"{prefix}{f.name}.")
    else:
      yield f"{prefix}{f.name}", cfg, f.name


def _spqr_level(parent) -> bool:
  """Whether `parent` holds SpQR grid settings (a SpQR-flavour grid, or a flat SpQR config)."""
  return getattr(parent, "flavor", Flavor.SPQR) == Flavor.SPQR


def _configured(method: str, sym: bool, round_zero: bool):
  """The method's default config with every grid's bits / sym (and SpQR's round_zero and
  second-level bits) set, wherever the config keeps them (the layout is being reshaped)."""
  cfg = api.default_config(method)
  sets = []
  for path, parent, name in _leaves(cfg):
    if name == "bits":
      sets.append(f"{path}={BITS}")
    elif name == "sym":
      sets.append(f"{path}={str(sym).lower()}")
    elif name == "round_zero" and _spqr_level(parent):
      sets.append(f"{path}={str(round_zero).lower()}")
    elif name in SECOND_LEVEL_BITS:
      sets.append(f"{path}={QQ_BITS}")
  return config_lib.apply_overrides(cfg, sets)


@pytest.fixture(scope="module")
def problem():
  return layer_problem(np.random.default_rng(0), 32, 64, dtype=np.float32)


CASES = [(m, sym, False) for m in api.METHODS for sym in (False, True)] + [
    ("spqr", False, True)]


@pytest.mark.parametrize("method, sym, round_zero", CASES)
def test_packed_metadata_follows_the_config_and_round_trips(problem, method, sym, round_zero):
  W, H = problem
  result = api.solve(method, W, H, _configured(method, sym, round_zero))
  qw = qweight.pack_result(result)
  meta = qw.meta
  is_spqr = method.startswith("spqr")
  assert (meta.method, meta.bits, meta.sym, meta.round_zero) == (method, BITS, sym, round_zero)
  assert meta.flavor == ("spqr" if is_spqr else "gptq")
  assert meta.qq_scale_bits == (QQ_BITS if is_spqr else 0)
  # SpQR keeps rounded zeros unquantized when the second level is no narrower than the first.
  zero_quantized = is_spqr and not (round_zero and QQ_BITS >= BITS)
  assert meta.qq_zero_bits == (QQ_BITS if zero_quantized else 0)
  assert (meta.zero_format == "qq") == zero_quantized
  assert (meta.scale_format == "qq") == is_spqr
  assert bit_equal(qweight.dequantize(qw), result.Q)


def test_direct_solver_calls_pack_too(problem):
  W, H = problem
  result = gptq(W, H, _configured("gptq", True, False))
  assert result.method == "unknown"
  qw = qweight.pack_result(result)
  assert qw.meta.method == "unknown" and qw.meta.sym and qw.meta.bits == BITS
  assert bit_equal(qweight.dequantize(qw), result.Q)
