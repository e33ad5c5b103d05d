"""`cdquant sweep --dry-run` and `cdquant bank` through cli.main: the listing, the bank files,
and bad input ending with exit code 2 and one stderr line that names it."""

import json
import os

import pytest
import yaml

from cdquant_jax.cli import main as cli
from cdquant_jax.research import bank
from tests.research import tiny_model

BASE = {"model": {"path": "some/model"},
        "calibration": {"source": "bundled", "nsamples": 8, "seqlen": 32},
        "quant": {"method": "gptq", "knobs": {"bits": 3, "group_size": 16}}}


def _write(path, data) -> str:
  path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
  return str(path)


def _one_error_line(capsys, *named) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  for text in named:
    assert text in err, err
  return err


def test_sweep_dry_run_lists_points(tmp_path, capsys):
  config = _write(tmp_path / "s.yaml", {"base": BASE, "axes": {"quant.knobs.bits": [2, 3, 4]},
                                        "seeds": [0, 1]})
  assert cli.main(["sweep", "--config", config, "--dry-run", "--out", str(tmp_path / "o")]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("sweep s (sequential): 6 points, 0 done")
  assert lines[1].split()[0] == "bits=2-seed=0" and lines[1].split()[2] == "todo"
  assert json.loads(lines[-1].split("todo", 1)[1]) == {"quant.knobs.bits": 4,
                                                        "calibration.seed": 1}
  assert not os.path.exists(tmp_path / "o")  # nothing ran, nothing written


@pytest.mark.parametrize("case, sweep_file, extra, named", [
    ("missing file", None, [], "no_such.yaml"),
    ("not YAML", "axes: [unclosed", [], "not valid YAML"),
    ("unknown key", {"base": BASE, "axez": {}}, [], "axez"),
    ("bad axis path", {"base": BASE, "axes": {"quant.knobs.bitz": [2]}}, [], "quant.knobs.bitz"),
    ("bad axis value", {"base": BASE, "axes": {"quant.knobs.bits": [3, 12]}}, [],
     "quant.knobs.bits=12"),
    ("jobs", {"base": BASE}, ["--jobs", "0"], "--jobs must be >= 1"),
    ("devices", {"base": BASE}, ["--devices", "0,x"], "--devices must be distinct GPU ids"),
    ("repeated device", {"base": BASE}, ["--devices", "1,1"], "'1,1'"),
    ("jobs vs devices", {"base": BASE}, ["--jobs", "3", "--devices", "0,1"],
     "--jobs 3 with --devices 0,1"),
    ("unknown flag", {"base": BASE}, ["--jobz", "2"], "--jobz"),
])
def test_sweep_bad_input(tmp_path, capsys, case, sweep_file, extra, named):
  del case
  path = tmp_path / "no_such.yaml"
  if sweep_file is not None:
    _write(path, sweep_file)
  assert cli.main(["sweep", "--config", str(path), "--dry-run", *extra]) == 2
  _one_error_line(capsys, named)


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
  root = tmp_path_factory.mktemp("bank_cli")
  fixture = tiny_model.write_fixture(root)
  return _write(root / "run.yaml", tiny_model.run_dict(fixture))


@pytest.mark.slow
def test_bank_writes_once(run_yaml, tmp_path, capsys):
  out = str(tmp_path / "bank")
  assert cli.main(["bank", "--config", run_yaml, "--out", out, "--blocks", "1"]) == 0
  assert capsys.readouterr().out.startswith(f"wrote {out}: 7 layers of blocks [1]")
  info = bank.read_bank(out)
  assert [m["block"] for m in info["modules"]] == [1] * 7
  assert sorted(os.listdir(os.path.join(out, "layers"))) == sorted(
      m["module"] + ".npz" for m in info["modules"])
  assert cli.main(["bank", "--config", run_yaml, "--out", out, "--blocks", "1"]) == 0
  assert "the bank exists" in capsys.readouterr().out
  assert cli.main(["bank", "--config", run_yaml, "--out", out, "--blocks", "0"]) == 2
  _one_error_line(capsys, "another model, data or blocks")


@pytest.mark.parametrize("args, named", [
    (["--out"], "--out"),
    (["--out", "OUT", "--blocks", "0,x"], "--blocks '0,x'"),
    (["--out", "OUT", "--blocks", "5"], "blocks [5]"),
    (["--out", "OUT", "--set", "calibration.nsampless=4"], "nsampless"),
])
def test_bank_bad_input(run_yaml, tmp_path, capsys, args, named):
  args = [str(tmp_path / "b") if a == "OUT" else a for a in args]
  assert cli.main(["bank", "--config", run_yaml, *args]) == 2
  _one_error_line(capsys, named)


def test_bank_missing_config(tmp_path, capsys):
  missing = str(tmp_path / "nope.yaml")
  assert cli.main(["bank", "--config", missing, "--out", str(tmp_path / "b")]) == 2
  _one_error_line(capsys, missing)
