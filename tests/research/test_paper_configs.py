"""Every paper sweep in configs/paper/ parses and resolves, and its published numbers name
settings the sweep has: the base builds a RunConfig, every axis value and variant applies on
its own (a path or value the config rejects raises), the sweep expands into points
(`research.sweep.expand`), and every numbers entry matches points of exactly one setting (a
baseline entry: any point) on a corpus the sweep evaluates."""

import pathlib

import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.pipeline import config as run_lib
from cdquant_jax.research import paper, results, sweep

PAPER_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "paper"
NUMBERS_SUFFIX = ".numbers.yaml"
SWEEPS = sorted(p for p in PAPER_DIR.glob("*.yaml") if not p.name.endswith(NUMBERS_SUFFIX))
NUMBERS = sorted(PAPER_DIR.glob(f"*{NUMBERS_SUFFIX}"))


def _numbers_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.stem + NUMBERS_SUFFIX)


def _row(point: sweep.Point) -> dict:
  """What a results row of `point` has for matching (name, variant, axes, config)."""
  return {"name": point.name, "variant": point.variant, "axes": point.axes,
          "config": config_lib.to_dict(point.run), "method": point.run.quant.method}


def test_the_three_papers_are_there():
  names = {p.stem for p in SWEEPS}
  assert {"gptq_readme_llama7b", "gptq_opt125m", "spqr_table1_llama7b", "cdquant_gemma"} <= names
  assert {p.name for p in NUMBERS} == {_numbers_path(p).name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_base_axes_and_variants_resolve(path):
  data = config_lib.load_yaml(str(path))
  run = run_lib.run_config_from_dict(data["base"])
  for axis, values in data.get("axes", {}).items():
    for value in values:
      changed = config_lib.apply_overrides(run, [f"{axis}={value}"]).validate()
      assert config_lib.get_path(changed, axis) == value
  for name, changes in data.get("variants", {}).items():
    changed = config_lib.apply_overrides(run, dict(changes)).validate()
    for key, value in changes.items():
      assert config_lib.get_path(changed, key) == value, (name, key)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_numbers_match_settings_of_the_sweep(path, tmp_path):
  points = sweep.expand(sweep.load_sweep(str(path)), str(tmp_path))
  rows = [_row(p) for p in points]
  numbers = paper.load_numbers(str(_numbers_path(path)))
  base = points[0].run.eval
  for entry in numbers.entries:
    kind, source = entry.metric.split(".", 1)
    assert kind in ("perplexity", "baseline_perplexity") and source in base.sources, entry
    assert kind == "perplexity" or base.baseline, f"{entry.label}: the sweep has no baseline"
    matched = [r for r in rows if entry.matches(r)]
    assert matched, f"{entry.label}: no point of {path.name} has {entry.setting}"
    if kind == "perplexity":
      assert len({results.setting_key(r) for r in matched}) == 1, (entry.label, matched)


def test_settings_that_exist_nowhere_do_not_match(tmp_path):
  path = PAPER_DIR / "gptq_readme_llama7b.yaml"
  rows = [_row(p) for p in sweep.expand(sweep.load_sweep(str(path)), str(tmp_path))]
  entry = paper.Entry("x", "perplexity.wikitext2", 1.0,
                      setting=(("quant.method", "gptq"), ("quant.knobs.bits", 2)))
  assert not any(entry.matches(r) for r in rows)
