"""`cdquant report`: a synthetic sweep gives report.md, the .tex tables and every plot as PNG and
PDF, and prints the main table; bad input ends with one stderr line and exit code 2."""

import json
import pathlib
import statistics

import pytest
import yaml

from cdquant_jax.cli import errors, main as cli
from tests.research import synthetic

METRIC = "perplexity.wikitext2"


def _run(capsys, *argv) -> tuple[int, str, str]:
  code = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == errors.EXIT_USER_ERROR, err
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  return synthetic.write_sweep(tmp_path_factory.mktemp("sweep"), methods=("rtn", "gptq", "cd"),
                               bits=(3, 4), seeds=(0, 1))


def _numbers_file(tmp_path, data, name: str = "x") -> str:
  path = tmp_path / f"{name}.numbers.yaml"
  path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
  return str(path)


def test_report_writes_tables_and_plots(sweep_dir, tmp_path, capsys):
  numbers = _numbers_file(tmp_path, {"source": "GPTQ README", "metric": METRIC, "rows": [
      {"label": "4-bit GPTQ", "setting": {"quant.method": "gptq", "quant.knobs.bits": 4},
       "value": 21.0}]})
  out = tmp_path / "report"
  code, stdout, err = _run(capsys, "report", sweep_dir, "--paper", numbers, "--out", out)
  assert code == 0, err
  names = {p.name for p in out.iterdir()}
  assert {"report.md", "table.tex", "objective.tex", "paper.tex"} <= names
  for stem in ("pareto", "layer_ratio", "time_vs_perplexity"):
    assert {f"{stem}.png", f"{stem}.pdf"} <= names
  assert "outlier_share.png" not in names and "objective_trace.png" not in names  # no data
  assert "note: objective_trace: skipped (no row carries an objective_trace)" in stdout
  gptq3 = [synthetic.perplexity("gptq", 3, s) for s in (0, 1)]
  cell = f"{statistics.mean(gptq3):.2f} ± {statistics.stdev(gptq3):.2f}"
  assert f"| gptq | {cell} |" in stdout  # the printed main table
  report = (out / "report.md").read_text()
  assert f"| gptq | {cell} |" in report and "| 4-bit GPTQ | perplexity.wikitext2 | 21.00 |" in report
  assert "![pareto](pareto.png)" in report
  assert "\\toprule" in (out / "paper.tex").read_text()


def test_default_out_dir_and_pivot(sweep_dir, capsys):
  code, stdout, err = _run(capsys, "report", sweep_dir,
                           "--pivot", "rows=bits,cols=method,value=relative_objective_sum")
  assert code == 0, err
  assert stdout.splitlines()[2] == "| bits \\ method | rtn | gptq | cd |"
  assert (pathlib.Path(sweep_dir) / "report" / "report.md").is_file()


@pytest.mark.parametrize("case", ["missing_dir", "no_results", "unknown_field", "bad_pivot",
                                  "bad_numbers_yaml", "numbers_without_value", "no_done_rows"])
def test_bad_input_is_one_line_and_exit_2(case, sweep_dir, tmp_path, capsys):
  argv, needles = {
      "missing_dir": ([tmp_path / "nope"], ["nope", "no such directory"]),
      "no_results": ([tmp_path], ["no results.jsonl"]),
      "unknown_field": ([sweep_dir, "--pivot", "rows=metod"], ["unknown field 'metod'"]),
      "bad_pivot": ([sweep_dir, "--pivot", "rows:method"], ["--pivot", "bad part 'rows:method'"]),
      "bad_numbers_yaml": ([sweep_dir, "--paper", _numbers_file(tmp_path, "rows: [1, 2", "torn")],
                           ["torn.numbers.yaml", "not valid YAML"]),
      "numbers_without_value": ([sweep_dir, "--paper", _numbers_file(tmp_path, {
          "source": "s", "metric": METRIC, "rows": [{"setting": {}, "value": None}]})],
                                ["x.numbers.yaml: rows[0]: value must be a finite number"]),
      "no_done_rows": ([_only_failed(tmp_path)], ["no finished point"]),
  }[case]
  code, _, err = _run(capsys, "report", *argv)
  _assert_one_line_error(code, err, *needles)


def _only_failed(tmp_path) -> str:
  directory = tmp_path / "failed"
  directory.mkdir()
  row = synthetic.row("cd", 3, 0, None, status="failed")
  (directory / "results.jsonl").write_text(json.dumps(row) + "\n")
  return str(directory)
