"""Plots: each Figure's series (labels, x/y data, bar heights) equal what the closed-form rules
of `synthetic` give, computed here independently; files are real PNG/PDF."""

import math
import statistics

import numpy as np
import pytest

from cdquant_jax.research import plots, results
from tests.research import synthetic

METRIC, METHODS = synthetic.METRIC, synthetic.METHODS


@pytest.fixture(scope="module")
def rows(sweep_dir):
  return results.done(results.load_sweep(sweep_dir))


def _lines(ax) -> dict:
  return {line.get_label(): line for line in ax.get_lines()}


def _expected_points(method):
  """(bits_formula, mean ppl over seeds) per bits, computed from the rules."""
  group = synthetic.GROUP.get(method, 128)
  return [(b + synthetic.BITS_OVERHEAD[group],
           statistics.mean(synthetic.perplexity(method, b, s) for s in (0, 1, 2)))
          for b in (2, 3, 4)]


def _brute_force_front(points):
  return sorted(p for p in points
                if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points))


def test_pareto_series(rows):
  fig = plots.pareto(rows, METRIC)
  (ax,) = fig.axes
  lines = _lines(ax)
  assert set(lines) == set(METHODS) | {"Pareto front", "16-bit baseline"}
  everything = []
  for method in METHODS:
    expected = _expected_points(method)
    np.testing.assert_allclose(lines[method].get_xdata(), [x for x, _ in expected])
    np.testing.assert_allclose(lines[method].get_ydata(), [y for _, y in expected])
    everything += expected
  front = _brute_force_front(everything)
  np.testing.assert_allclose(np.c_[lines["Pareto front"].get_xdata(),
                                   lines["Pareto front"].get_ydata()], front)
  assert list(lines["16-bit baseline"].get_ydata()) == [20.0, 20.0]
  assert ax.get_xlabel() == "bits per parameter (bits_formula)" and ax.get_ylabel() == METRIC
  assert [t.get_text() for t in ax.get_legend().get_texts()][:len(METHODS)] == list(METHODS)


def test_pareto_falls_back_to_bits_and_skips_without_values(rows):
  stripped = [{k: v for k, v in r.items() if k != "bits_formula"} for r in rows]
  (ax,) = plots.pareto(stripped, METRIC).axes
  np.testing.assert_allclose(_lines(ax)["gptq"].get_xdata(), [2, 3, 4])
  assert plots.pareto(rows, "perplexity.c4") is None


def test_time_vs_perplexity_one_series_per_method(rows):
  (ax,) = plots.time_vs_perplexity(rows, METRIC).axes
  series = {c.get_label(): c.get_offsets() for c in ax.collections}
  assert set(series) == set(METHODS)
  for method in METHODS:
    expected = sorted((10.0 * synthetic.LEVEL[method] * b, synthetic.perplexity(method, b, s))
                      for b in (2, 3, 4) for s in (0, 1, 2))
    np.testing.assert_allclose(sorted(map(tuple, series[method])), expected)
  assert ax.get_xscale() == "log"


def _expected_ratio(method, kind):
  return (synthetic.LEVEL[method] * synthetic.kind_shape(method, kind)
          / (synthetic.LEVEL["gptq"] * synthetic.kind_shape("gptq", kind)))


@pytest.mark.parametrize("mode", ["sequential", "bank"])
def test_layer_ratio_by_kind_and_block(sweep_dir, rows, mode):
  if mode == "bank":  # per-layer records in the rows instead of run_dir/log.jsonl
    rows = [synthetic.row(r["method"], r["bits"], r["seed"], None, mode="bank") for r in rows]
  fig = plots.layer_ratio(rows, sweep_dir)
  by_kind, by_block = fig.axes
  # Neither the reference (gptq) nor rtn; nor spqr, whose group size (16) no GPTQ row has.
  compared = ("cd", "bcd")
  assert [c.get_label() for c in by_kind.containers] == list(compared)
  assert [t.get_text() for t in by_kind.get_xticklabels()] == list(synthetic.KINDS)
  for container, method in zip(by_kind.containers, compared):
    heights = [bar.get_height() for bar in container]
    np.testing.assert_allclose(heights, [_expected_ratio(method, k) for k in synthetic.KINDS])
  lines = _lines(by_block)
  for method in compared:
    geomean = math.exp(statistics.mean(math.log(_expected_ratio(method, k))
                                       for k in synthetic.KINDS))
    np.testing.assert_allclose(lines[method].get_xdata(), range(synthetic.BLOCKS))
    np.testing.assert_allclose(lines[method].get_ydata(), [geomean] * synthetic.BLOCKS)


def test_layer_ratio_needs_a_reference_row(rows):
  assert plots.layer_ratio([r for r in rows if r["method"] != "gptq"]) is None


def test_layer_ratio_pairs_only_equal_settings(sweep_dir, rows):
  # A row without a GPTQ row of the same bits, group size and seed contributes nothing:
  # 2-bit rows once GPTQ's are gone, SpQR rows (groups of 16) always.
  kept = [r for r in rows if not (r["method"] == "gptq" and r["bits"] == 2)]
  ratios = plots.layer_ratios(kept, sweep_dir)
  assert {r["method"] for r in ratios} == {"cd", "bcd"}
  n_rows = 2 * 2 * 3  # methods x bits with a partner x seeds
  assert len(ratios) == n_rows * synthetic.BLOCKS * len(synthetic.KINDS)


def test_outlier_share_only_rows_with_outliers(sweep_dir, rows):
  (ax,) = plots.outlier_share(rows, sweep_dir).axes
  lines = ax.get_lines()  # one per SpQR setting, seeds averaged
  assert [l.get_label() for l in lines] == [f"spqr, bits={b}" for b in (2, 3, 4)]
  expected = [100 * synthetic.outlier_share("spqr", k)
              for _ in range(synthetic.BLOCKS) for k in synthetic.KINDS]
  for line in lines:
    np.testing.assert_allclose(line.get_ydata(), expected)
  assert list(ax.get_xticks()) == [0, len(synthetic.KINDS)]  # first linear of each block
  assert plots.outlier_share([r for r in rows if r["method"] != "spqr"], sweep_dir) is None


def test_objective_trace_only_when_rows_carry_one(rows):
  assert plots.objective_trace(rows) is None
  traced = [dict(rows[0], name="a", objective_trace=[5.0, 4.0, 3.5]),
            dict(rows[1], name="b", objective_trace={"steps": [0, 10, 20], "objective": [6, 5, 4]})]
  (ax,) = plots.objective_trace(traced + rows[2:]).axes
  lines = _lines(ax)
  assert set(lines) == {"a", "b"}
  assert list(lines["a"].get_xdata()) == [0, 1, 2] and list(lines["a"].get_ydata()) == [5, 4, 3.5]
  assert list(lines["b"].get_xdata()) == [0, 10, 20]


def test_save_figure_writes_png_and_pdf(rows, tmp_path):
  paths = plots.save_figure(plots.pareto(rows, METRIC), str(tmp_path / "out"), "pareto")
  assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "pdf"]
  with open(paths[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths[1], "rb") as f:
    assert f.read(5) == b"%PDF-"


def test_variants_of_one_method_are_separate_series(sweep_dir, rows):
  """A variant sweep (variants gptq and gptq_act_order, both method gptq) plots one line per
  variant, and only the variant named gptq is the layer-ratio reference."""
  gptq = [r for r in rows if r["method"] == "gptq"]
  act_order = [dict(r, variant="gptq_act_order", act_order=True,
                    perplexity={METRIC.split(".")[1]: r["perplexity"]["wikitext2"] / 2})
               for r in gptq]
  mixed = rows + act_order
  lines = _lines(plots.pareto(mixed, METRIC).axes[0])
  assert set(lines) == set(METHODS) | {"gptq_act_order", "Pareto front", "16-bit baseline"}
  np.testing.assert_allclose(lines["gptq_act_order"].get_ydata(),
                             [y / 2 for _, y in _expected_points("gptq")])
  np.testing.assert_allclose(lines["gptq"].get_ydata(), [y for _, y in _expected_points("gptq")])
  ratios = plots.layer_ratios(mixed, sweep_dir)
  assert {r["method"] for r in ratios} == {"cd", "bcd", "gptq_act_order"}
  # The act-order copies have GPTQ's own layer records: ratio 1 on every layer.
  assert all(r["ratio"] == 1.0 for r in ratios if r["method"] == "gptq_act_order")
