"""Sweep expansion: cartesian axes, zipped axes, variants and seeds; stable point hashes; bad
axis paths and values rejected at expansion, naming them."""

import itertools
import os

import pytest
import yaml

from cdquant_jax import config as config_lib
from cdquant_jax.research import sweep

BASE = {"model": {"path": "some/model"},
        "calibration": {"source": "bundled", "nsamples": 8, "seqlen": 32},
        "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}}}


def _sweep(**fields) -> sweep.SweepConfig:
  data = {"base": BASE, **fields}
  if isinstance(data.get("zip"), dict):
    data["zip"] = [data["zip"]]
  return config_lib.from_dict(sweep.SweepConfig, data)


def _expand(tmp_path, **fields):
  return sweep.expand(_sweep(**fields), str(tmp_path))


def test_cartesian_product_in_axis_order(tmp_path):
  points = _expand(tmp_path, axes={"quant.method": ["gptq", "cd"], "quant.knobs.bits": [2, 3, 4]})
  expected = list(itertools.product(["gptq", "cd"], [2, 3, 4]))
  assert [(p.run.quant.method, p.run.quant.knobs.bits) for p in points] == expected
  assert [p.axes for p in points] == [{"quant.method": m, "quant.knobs.bits": b}
                                      for m, b in expected]
  assert points[0].name == "method=gptq-bits=2"
  assert len({p.hash for p in points}) == 6
  for p in points:
    assert p.run_dir == os.path.join(str(tmp_path), "points", f"{p.name}-{p.hash[:8]}")
    assert p.hash == sweep.point_hash(p.run)  # output_dir is not hashed


def test_zip_varies_together_and_crosses_other_axes(tmp_path):
  points = _expand(tmp_path, axes={"quant.method": ["gptq", "rtn"]},
                   zip={"quant.knobs.bits": [2, 4], "quant.knobs.group_size": [8, 32]})
  got = [(p.run.quant.method, p.run.quant.knobs.bits, p.run.quant.knobs.group_size)
         for p in points]
  assert got == [("gptq", 2, 8), ("gptq", 4, 32), ("rtn", 2, 8), ("rtn", 4, 32)]
  assert points[1].name == "method=gptq-bits=4-group_size=32"


def test_variants_are_the_outermost_axis_and_seeds_the_innermost(tmp_path):
  variants = {"gptq": {"quant.method": "gptq"},
              "gptq_act_order": {"quant.method": "gptq", "quant.knobs.act_order": True},
              "cd": {"quant.method": "cd", "quant.knobs.init": "rtn"}}
  points = _expand(tmp_path, variants=variants, axes={"quant.knobs.bits": [2, 3]}, seeds=[0, 5])
  assert len(points) == 3 * 2 * 2
  assert [p.variant for p in points[:4]] == ["gptq"] * 4
  assert [(p.run.quant.knobs.bits, p.run.calibration.seed) for p in points[:4]] == [
      (2, 0), (2, 5), (3, 0), (3, 5)]
  act = [p for p in points if p.variant == "gptq_act_order"]
  assert all(p.run.quant.knobs.act_order is True for p in act)
  assert all(p.run.quant.knobs.act_order is None for p in points if p.variant == "gptq")
  assert [p.run.quant.knobs.init for p in points if p.variant == "cd"] == ["rtn"] * 4
  assert points[5].name == "gptq_act_order-bits=2-seed=5"
  assert points[5].axes == {"quant.knobs.bits": 2, "calibration.seed": 5}


def test_hash_is_stable_and_a_new_base_makes_new_hashes(tmp_path):
  axes = {"quant.knobs.bits": [2, 3]}
  first = _expand(tmp_path, axes=axes)
  again = _expand(tmp_path / "elsewhere", axes=axes)
  assert [p.hash for p in first] == [p.hash for p in again]
  assert [p.run_dir for p in first] != [p.run_dir for p in again]  # same hash, other sweep dir
  changed = sweep.expand(_sweep(axes=axes, overrides={"calibration.nsamples": 16}), str(tmp_path))
  assert not {p.hash for p in first} & {p.hash for p in changed}
  assert not {p.run_dir for p in first} & {p.run_dir for p in changed}
  assert sweep.point_hash(first[0].run, "bank", (0,)) != first[0].hash  # the mode is hashed


def test_base_config_file_with_overrides(tmp_path):
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "base.yaml").write_text(yaml.safe_dump(BASE))
  path = tmp_path / "sweeps" / "s.yaml"
  path.parent.mkdir()
  path.write_text(yaml.safe_dump({"base_config": "../runs/base.yaml",
                                  "overrides": {"quant.knobs.group_size": 8},
                                  "axes": {"quant.knobs.bits": [2, 4]}}))
  spec = sweep.load_sweep(str(path))
  assert spec.name == "s"
  points = sweep.expand(spec, str(tmp_path / "out"))
  assert [(p.run.quant.knobs.bits, p.run.quant.knobs.group_size) for p in points] == [
      (2, 8), (4, 8)]
  assert points[0].run.model.path == "some/model"


@pytest.mark.parametrize("fields, named", [
    ({"axes": {"quant.knobs.bitz": [2, 3]}}, "quant.knobs.bitz"),
    ({"axes": {"quant.knobs.bits": [3, "three"]}}, "'three'"),
    ({"axes": {"quant.knobs.bits": [3, 99]}}, "quant.knobs.bits=99"),
    ({"axes": {"quant.method": ["gptq", "gptqq"]}}, "'gptqq'"),
    ({"axes": {"quant.solvers.gptq.blocksizee": [64]}}, "quant.solvers.gptq.blocksizee"),
    ({"axes": {"quant.solvers.cd.max_steps_factor": [1.0]}}, "has no effect"),
    ({"zip": {"quant.knobs.bits": [2, 3], "calibration.seqlenn": [8, 16]}}, "calibration.seqlenn"),
    ({"variants": {"bad": {"quant.knobs.act_orderr": True}}}, "variant bad"),
    ({"axes": {"quant.knobs.bits": []}}, "axis quant.knobs.bits"),
    ({"axes": {"quant.knobs.bits": 3}}, "axis quant.knobs.bits"),
    ({"zip": {"quant.knobs.bits": [2, 3], "quant.knobs.group_size": [8]}}, "equal numbers"),
    ({"axes": {"quant.knobs.bits": [2]}, "seeds": [1], "zip": {"calibration.seed": [0]}},
     "calibration.seed is set by both"),
    ({"variants": {"a": {"quant.knobs.bits": 2}}, "axes": {"quant.knobs": [{"bits": 3}]}},
     "is set by both"),
    ({"axes": {"quant.knobs.sym": [True, True]}}, "resolve to the same config"),
])
def test_bad_axes_are_rejected_at_expansion_naming_them(tmp_path, fields, named):
  with pytest.raises(config_lib.ConfigError) as info:
    _expand(tmp_path, **fields)
  assert named in str(info.value), str(info.value)


def test_sweep_schema_errors():
  with pytest.raises(config_lib.ConfigError, match="axez"):
    config_lib.from_dict(sweep.SweepConfig, {"base": BASE, "axez": {}})
  with pytest.raises(config_lib.ConfigError, match="exactly one of base"):
    config_lib.from_dict(sweep.SweepConfig, {})
  with pytest.raises(config_lib.ConfigError, match="blocks is for mode: bank"):
    config_lib.from_dict(sweep.SweepConfig, {"base": BASE, "blocks": [0]})
  with pytest.raises(config_lib.ConfigError, match="repeated"):
    config_lib.from_dict(sweep.SweepConfig, {"base": BASE, "seeds": [1, 1]})
