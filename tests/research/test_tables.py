"""Results rows and tables: the torn tail and reruns, field lookup, pivots checked cell by cell
against `statistics` on the closed-form values of `synthetic`, Markdown/LaTeX shape, and the
paper-vs-ours comparison."""

import statistics

import pytest

from cdquant_jax.research import paper, results, tables
from cdquant_jax.solvers import api
from tests.research import synthetic

METRIC, METHODS = synthetic.METRIC, synthetic.METHODS


@pytest.fixture(scope="module")
def rows(sweep_dir):
  return results.load_sweep(sweep_dir)


def test_torn_tail_skipped_and_rerun_point_counted_once(rows):
  # 5 methods x 3 bits x 3 seeds; the first point failed, then was run again: its last row wins.
  assert len(rows) == 45
  assert len(results.done(rows)) == 45 and not results.failed(rows)
  assert len({r["point"] for r in rows}) == 45


def test_failed_rows_are_kept_apart(tmp_path):
  directory = synthetic.write_sweep(tmp_path, methods=("gptq",), bits=(3,), seeds=(0,),
                                    extra_rows=[synthetic.row("cd", 3, 0, None,
                                                              status="failed")])
  rows = results.load_sweep(directory)
  assert [r["method"] for r in results.failed(rows)] == ["cd"]
  assert [r["method"] for r in results.done(rows)] == ["gptq"]


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
  (tmp_path / "results.jsonl").write_text('{"point": "a"}\nnot json\n{"point": "b"}\n')
  with pytest.raises(results.store.StoreError, match=":2:"):
    results.load_sweep(str(tmp_path))


def test_missing_directory_and_file_are_results_errors(tmp_path):
  with pytest.raises(results.ResultsError, match="no such directory"):
    results.results_path(str(tmp_path / "nope"))
  with pytest.raises(results.ResultsError, match="results.jsonl"):
    results.results_path(str(tmp_path))


def test_field_looks_in_row_then_axes_then_config():
  row = {"bits": 3, "axes": {"quant.knobs.bits": 4, "calibration.seed": 2},
         "config": {"quant": {"method": "cd", "knobs": {"bits": 5, "init": "gptq"}}},
         "perplexity": {"wikitext2": 7.5}}
  assert results.field(row, "bits") == 3
  assert results.field(row, "perplexity.wikitext2") == 7.5
  assert results.field(row, "quant.knobs.bits") == 4  # the axis value
  assert results.field(row, "calibration.seed") == 2
  assert results.field(row, "quant.knobs.init") == "gptq"  # from the config
  assert results.field(row, "config.quant.knobs.bits") == 5
  assert results.field(row, "quant.knobs.sym") is results.MISSING
  assert results.field({"perplexity": None}, "perplexity.c4") is results.MISSING


def test_method_order_lists_every_method():
  assert sorted(results.METHOD_ORDER) == sorted(api.METHODS)


def test_pivot_cells_are_mean_and_sample_std_over_seeds(rows):
  table = tables.pivot(results.done(rows), tables.PivotSpec(("method",), ("bits",), METRIC))
  assert table.row_keys == tuple((m,) for m in METHODS)  # METHOD_ORDER, not alphabetical
  assert table.col_keys == ((2,), (3,), (4,))
  for method in METHODS:
    for bits in (2, 3, 4):
      values = [synthetic.perplexity(method, bits, s) for s in (0, 1, 2)]
      cell = table.cells[((method,), (bits,))]
      assert cell.n == 3 and cell.settings == 1
      assert cell.mean == pytest.approx(statistics.mean(values))
      assert cell.std == pytest.approx(statistics.stdev(values))  # ddof = 1


def test_one_seed_shows_no_std(tmp_path):
  rows = results.done(results.load_sweep(
      synthetic.write_sweep(tmp_path, methods=("gptq", "cd"), bits=(3,), seeds=(1,))))
  table = tables.pivot(rows, tables.PivotSpec(value=METRIC))
  assert table.cells[(("cd",), (3,))].std is None
  text = tables.markdown(table)
  assert "±" not in text.split("\n\n", 1)[1]
  assert f"| cd | {synthetic.perplexity('cd', 3, 1):.2f} |" in text


def test_cells_that_average_several_settings_are_marked(rows):
  table = tables.pivot(results.done(rows), tables.PivotSpec(("method",), ("seed",), METRIC))
  assert table.cells[(("gptq",), (0,))].settings == 3  # bits 2, 3, 4
  assert tables.MIXED_MARK in tables.markdown(table) and tables.MIXED_NOTE in tables.markdown(table)
  by_bits = tables.pivot(results.done(rows), tables.PivotSpec(value=METRIC))
  assert tables.MIXED_MARK not in tables.markdown(by_bits)


def test_combined_fields_and_config_paths(rows):
  spec = tables.parse_pivot("rows=method+group_size,cols=quant.knobs.bits,value=" + METRIC, "x")
  table = tables.pivot(results.done(rows), spec)
  assert ("spqr", 16) in table.row_keys and ("gptq", 128) in table.row_keys
  assert table.col_keys == ((2,), (3,), (4,))
  assert tables.grid(table)[0][0] == "method+group_size \\ quant.knobs.bits"


def test_markdown_and_latex_shapes(rows):
  table = tables.pivot(results.done(rows), tables.PivotSpec(value=METRIC))
  md = [l for l in tables.markdown(table).splitlines() if l.startswith("|")]
  assert len(md) == 2 + len(METHODS)
  assert md[0] == "| method \\ bits | 2 | 3 | 4 |"
  assert all(l.count("|") == 5 for l in md)
  tex = tables.latex(table)
  lines = tex.splitlines()
  assert lines[1] == r"\begin{tabular}{lrrr}" and lines[-1] == r"\end{tabular}"
  assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
  assert r"method \textbackslash{} bits & 2 & 3 & 4 \\" in lines
  gptq = next(l for l in lines if l.startswith("gptq &"))
  values = [synthetic.perplexity("gptq", 2, s) for s in (0, 1, 2)]
  assert gptq.startswith(f"gptq & {statistics.mean(values):.2f} $\\pm$ "
                         f"{statistics.stdev(values):.2f} &")


def test_latex_escapes_specials():
  assert tables.latex_escape("spqr_cd 5% & #1 ±") == r"spqr\_cd 5\% \& \#1 $\pm$"


@pytest.mark.parametrize("text, message", [
    ("rows=method,cols", "bad part 'cols'"),
    ("rows=method,colour=bits", "bad part 'colour=bits'"),
    ("value=", "bad part 'value='"),
])
def test_bad_pivot_specs(text, message):
  with pytest.raises(results.ResultsError, match=message):
    tables.parse_pivot(text, METRIC)


def test_unknown_field_is_an_error_listing_known_fields(rows):
  with pytest.raises(results.ResultsError, match=r"unknown field 'perplexity.ptb'.*wikitext2"):
    tables.pivot(results.done(rows), tables.PivotSpec(value="perplexity.ptb"))


def test_default_value_is_perplexity_else_objective(rows):
  assert tables.default_value_field(rows) == METRIC
  bank = [synthetic.row("gptq", 3, 0, None, mode="bank")]
  assert tables.default_value_field(bank) == "relative_objective_sum"


def _numbers(*entries, **top):
  return paper.numbers_from_dict({"source": "a table", "metric": METRIC, "rows": list(entries),
                                  **top}, "n.yaml")


def test_paper_vs_ours(rows):
  numbers = _numbers(
      {"label": "3-bit GPTQ", "setting": {"quant.method": "gptq", "quant.knobs.bits": 3},
       "value": 9.0},
      {"label": "FP16", "metric": "baseline_perplexity.wikitext2", "setting": {}, "value": 19.5},
      {"label": "8-bit CD", "setting": {"method": "cd", "bits": 8}, "value": 5.0})
  gptq, fp16, missing = tables.compare(results.done(rows), numbers)
  values = [synthetic.perplexity("gptq", 3, s) for s in (0, 1, 2)]
  assert gptq.ours.mean == pytest.approx(statistics.mean(values)) and gptq.ours.n == 3
  assert gptq.delta == pytest.approx(statistics.mean(values) - 9.0)
  assert fp16.ours.mean == pytest.approx(20.0) and fp16.delta == pytest.approx(0.5)
  assert missing.ours is None and missing.delta is None
  text = tables.comparison_markdown([gptq, fp16, missing], numbers.source)
  assert "| 8-bit CD | perplexity.wikitext2 | 5.00 | – | – |" in text
  assert "| FP16 | baseline_perplexity.wikitext2 | 19.50 | 20.00 ± 0.00 | +0.50 |" in text


@pytest.mark.parametrize("data, message", [
    ([1, 2], "top level must be a mapping"),
    ({"metric": METRIC, "rows": []}, "source"),
    ({"source": "s", "rows": {}}, "rows"),
    ({"source": "s", "rows": [], "extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ({"source": "s", "rows": [{"setting": {}, "value": 1.0}]}, "no metric"),
    ({"source": "s", "metric": METRIC, "rows": [{"setting": {}, "value": "six"}]}, "finite"),
    ({"source": "s", "metric": METRIC, "rows": [{"value": 1.0}]}, "exactly one of"),
    ({"source": "s", "metric": METRIC, "rows": [{"setting": [], "value": 1.0}]}, "mapping"),
])
def test_malformed_numbers(data, message):
  with pytest.raises(results.ResultsError, match=message):
    paper.numbers_from_dict(data, "n.yaml")


def test_auto_digits_give_the_smallest_mean_three_significant_digits(rows):
  spec = tables.PivotSpec(value="relative_objective_sum")
  table = tables.pivot(results.done(rows), spec)
  smallest = min(c.mean for c in table.cells.values())  # bcd at 4 bits, about 0.05
  digits = tables.auto_digits(table)
  assert len(f"{smallest:.{digits}f}".replace(".", "").lstrip("0")) == 3
  assert tables.auto_digits(tables.pivot(results.done(rows), tables.PivotSpec(value=METRIC))) == 2


def test_synthetic_rows_use_the_store_schema(rows):
  """The fixture rows have only fields `research.store` writes (so the tests read real rows)."""
  for row in rows + [synthetic.row("cd", 3, 0, None, mode="bank")]:
    results.store.complete_row(row)  # raises on a field the store does not know
