"""`experiments/device_check.sh --cpu-smoke`: the one-shot GPU check runs end to end on CPU.

The dry run (interpret mode, tiny shapes, JAX_PLATFORMS=cpu) goes through every part of the
GPU run: device info and bandwidth, the `pytest -m gpu` run (all skipped here) and its summary,
SmolLM2 decode tokens/s on a tiny random-weight model, and bench_kernels.py with its targets.
The report must have every table, finite numbers and every correctness check passed.
"""

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "experiments", "device_check.sh")
PARTS = ("info", "tests", "decode", "kernels")
TARGETS = ("w4 g128 7B, B 1-16: % of ideal speedup", "SpQR 1 % outliers vs 0 %: extra time",
           "prefill B = 256: kernel vs bf16 jnp.dot")


def run_script(*args, timeout=240):
  env = dict(os.environ, PYTHON=sys.executable)
  return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def table_after(text: str, heading: str) -> list[dict[str, str]]:
  """The first Markdown table after the line `heading`, as one dict per row (header -> cell)."""
  lines = text.splitlines()
  i = lines.index(heading)
  while not lines[i].startswith("|"):
    i += 1
  header = [c.strip() for c in lines[i].strip("|").split("|")]
  rows = []
  for line in lines[i + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    rows.append(dict(zip(header, cells)))
  return rows


def number(cell: str) -> float:
  """The leading number of a cell ("1.23×", "+5 %", "3.0e-07")."""
  m = re.match(r"[+-]?\d+(\.\d+)?(e[+-]?\d+)?", cell)
  assert m, cell
  return float(m.group(0))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  proc = run_script("--cpu-smoke", str(out))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(out / "bench_kernels_cpu_smoke.md") as f:
    return f.read()


@pytest.mark.slow
def test_every_part_ran(report):
  status = {r["part"]: r["status"] for r in table_after(report, "| part | status | seconds |")}
  assert status == dict.fromkeys(PARTS, "ok")


@pytest.mark.slow
def test_device_and_bandwidth(report):
  # "| what | value |" rows under an empty header
  rows = {cells[1].strip(): cells[2].strip() for cells in
          (line.split("|") for line in report.splitlines()) if len(cells) == 4}
  assert rows["jax / jaxlib"].count("/") == 1
  bandwidths = [number(v) for k, v in rows.items() if k.startswith("bandwidth")]
  assert len(bandwidths) == 2 and all(math.isfinite(b) and b > 0 for b in bandwidths)


@pytest.mark.slow
def test_gpu_tests_summary(report):
  rows = table_after(report, "## GPU tests")
  assert rows[-1]["test class"] == "**all**"
  assert int(rows[-1]["failed"]) == int(rows[-1]["errors"]) == 0
  assert int(rows[-1]["skipped"]) > 0  # no GPU: the GPU suite is collected and skipped


@pytest.mark.slow
def test_kernel_rows_are_finite_and_correct(report):
  rows = table_after(report, "### All rows")
  ran = [r for r in rows if not r["µs"].startswith("n/a")]
  assert not [r for r in ran if r["µs"].startswith("error")]
  assert {(r["B"], r["format"]) for r in ran if r["implementation"] == "pallas_triton"} == {
      (b, f) for b in ("1", "16", "256") for f in (
          "w4 g128", "w3 g128", "SpQR w3 g16 qq3, 0% outl.", "SpQR w3 g16 qq3, 0.5% outl.",
          "SpQR w3 g16 qq3, 1% outl.")}
  for r in ran:
    assert r["check"] == "pass", r
    for col in ("bits", "µs", "GB/s", "% BW", "bf16 µs", "speedup", "ideal", "% ideal",
                "deq+dot µs", "max rel err"):
      assert math.isfinite(number(r[col])), (col, r)
    assert number(r["µs"]) > 0 and number(r["max rel err"]) <= 1e-5


@pytest.mark.slow
def test_targets_are_judged(report):
  summary = table_after(report, "### Targets")
  assert {r["target"] for r in summary} == set(TARGETS)
  assert {r["verdict"] for r in summary} <= {"met", "missed"}
  detail = table_after(report, "| target | shape | B | format | implementation | outliers | "
                       "value | threshold | met |")
  assert {r["target"] for r in detail} == set(TARGETS)
  for r in detail:
    assert r["met"] in ("met", "missed") and math.isfinite(number(r["value"]))


@pytest.mark.slow
def test_decode_tokens_per_second(report):
  rows = table_after(report, "## SmolLM2-135M decode")
  assert [r["implementation"] for r in rows][:2] == ["dense", "pallas_triton"]
  for r in rows:
    assert math.isfinite(number(r["tokens/s"])) and number(r["tokens/s"]) > 0
  assert "random weights" in report


@pytest.mark.parametrize("args, message", [
    ((), "OUTDIR missing"), (("--gpu", "x"), "unknown option '--gpu'"),
    (("a", "b"), "one OUTDIR expected, got 'a' and 'b'")])
def test_bad_arguments_exit_2_with_one_line(args, message):
  proc = run_script(*args, timeout=30)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and message in proc.stderr
