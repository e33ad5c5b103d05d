"""`cdquant layer`: the npz/JSON contract and exit code 2 on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cdquant_jax.cli.main import main
from tests.fixtures.layer_problems import layer_problem


@pytest.fixture
def problem(tmp_path, rng):
  W, H = layer_problem(rng, 16, 64, dtype=np.float32)
  path = tmp_path / "problem.npz"
  np.savez(path, W=W, H=H, note=np.arange(3))  # extra keys are ignored
  return path, W, H


def _run(capsys, *argv):
  code = main(["layer", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("method,extra", [
    ("rtn", []), ("gptq", ["--act-order"]), ("cd", ["--init", "gptq"]),
    ("gptq", ["--group-size", "16", "--static-groups", "--sym"]),
    ("spqr", ["--qq-bits", "3", "--qq-group-size", "16", "--outlier-threshold", "0.2",
              "--act-order", "--group-size", "16"]),
    ("spqr", ["--no-act-order", "--sym", "--group-size", "16"]),
])
def test_json_contract(tmp_path, capsys, problem, method, extra):
  path, W, H = problem
  out_path = tmp_path / "out.npz"
  code, out, _ = _run(capsys, "--input", path, "--output", out_path, "--method", method,
                      "--bits", 3, "--json", *extra)
  assert code == 0
  summary = json.loads(out.strip().splitlines()[-1])
  saved = np.load(out_path)
  assert saved["Q"].dtype == np.float32 and saved["Q"].shape == W.shape
  for key in ("codes", "scale", "zero"):
    assert key in saved.files
  # The reported objective is tr((W − Q) H (W − Q)ᵀ) of the saved Q, on the undamped H.
  E = W.astype(np.float64) - saved["Q"].astype(np.float64)
  objective = float(np.sum((E @ H.astype(np.float64)) * E))
  assert summary["objective"] == pytest.approx(objective, rel=1e-9)
  energy = float(np.sum((W.astype(np.float64) @ H) * W))
  assert summary["relative_objective"] == pytest.approx(objective / energy, rel=1e-9)
  assert summary["bits_per_param"] >= 3 and summary["seconds"] > 0
  assert 0 <= summary["outlier_fraction"] < 0.2


def test_set_overrides_any_field(capsys, problem):
  path, _, _ = problem
  code, out, _ = _run(capsys, "--input", path, "--method", "cd", "--bits", 4, "--json",
                      "--set", "max_steps_factor=0.01", "--set", "init.method=rtn")
  assert code == 0
  assert json.loads(out.splitlines()[-1])["config"]["max_steps_factor"] == 0.01


def _write(tmp_path, **arrays):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("case,argv_extra,match", [
    ("missing", [], "missing array"),
    ("shape", [], "d_in"),
    ("square", [], "square"),
    ("asym", [], "symmetric"),
    ("nan", [], "NaN"),
    ("ok", ["--bits", "9"], "bits"),
    ("ok", ["--group-size", "48"], "group_size"),
    ("ok", ["--set", "nonexistent=1"], "nonexistent"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, rng, case, argv_extra, match):
  W, H = layer_problem(rng, 8, 64, dtype=np.float32)
  arrays = dict(W=W, H=H)
  if case == "missing":
    arrays = dict(W=W)
  elif case == "shape":
    arrays["H"] = H[:32, :32]
  elif case == "square":
    arrays["H"] = H[:, :32]
  elif case == "asym":
    H = H.copy(); H[0, 1] += 1.0; arrays["H"] = H
  elif case == "nan":
    W = W.copy(); W[1, 1] = np.nan; arrays["W"] = W
  code, out, err = _run(capsys, "--input", _write(tmp_path, **arrays), "--method", "gptq",
                        *argv_extra)
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and match in lines[0]


def test_console_script_runs(tmp_path, problem):
  path, _, _ = problem
  proc = subprocess.run([sys.executable, "-m", "cdquant_jax.cli.main", "layer", "--input",
                         str(path), "--method", "rtn", "--bits", "4", "--json"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "relative_objective" in json.loads(proc.stdout.strip().splitlines()[-1])
