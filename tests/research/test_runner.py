"""Running sweeps of the pipeline on a tiny random Llama (a HF directory with a tokenizer):
killed mid-point then re-run gives the rows of an uninterrupted sweep (finished points skipped,
the interrupted one resumed from its checkpoint), a failing point is recorded and the sweep goes
on, --jobs 2 gives the rows of --jobs 1, and points share the cached token ids."""

import os
import signal

import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.models import registry
from cdquant_jax.pipeline import checkpoint, evaluation
from cdquant_jax.pipeline import config as run_lib
from cdquant_jax.research import runner, store, sweep
from tests.research import tiny_model

pytestmark = pytest.mark.slow
# Row fields that are measured results (not times, paths or provenance).
MEASURED = ("point", "name", "status", "method", "bits", "group_size", "seed", "axes",
            "calibration_token_hash", "eval_token_hashes", "perplexity", "baseline_perplexity",
            "modules", "params_quantized", "bits_formula", "bits_stored", "objective_sum",
            "relative_objective_sum", "mean_relative_objective", "outlier_share")


class Killed(BaseException):
  """Stands for a kill: not an Exception, so the sweep stops without recording the point."""


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  return tiny_model.write_fixture(tmp_path_factory.mktemp("tiny"))


def _spec(fixture, **fields) -> sweep.SweepConfig:
  data = {"name": "tiny", "base": tiny_model.run_dict(fixture),
          "axes": {"quant.method": ["rtn", "gptq", "cd"]}, **fields}
  return config_lib.from_dict(sweep.SweepConfig, data)


def _measured(rows: list[dict]) -> dict[str, dict]:
  return {r["point"]: {k: r[k] for k in MEASURED} for r in rows}


@pytest.fixture(scope="module")
def reference(fixture, tmp_path_factory):
  """(outcome, rows) of the uninterrupted sweep, jobs=1."""
  out = str(tmp_path_factory.mktemp("reference"))
  outcome = runner.run_sweep(_spec(fixture), out=out)
  return outcome, store.read_rows(store.results_file(out))


def test_uninterrupted_sweep_rows(reference):
  outcome, rows = reference
  assert outcome.done == ("method=rtn", "method=gptq", "method=cd") and not outcome.failed
  assert [r["status"] for r in rows] == ["done"] * 3
  assert [r["method"] for r in rows] == ["rtn", "gptq", "cd"]
  for r in rows:
    assert r["run_dir"].endswith(f"{r['name']}-{r['point'][:8]}")
    assert set(r["perplexity"]) == set(r["baseline_perplexity"]) == {"text"}
    assert r["perplexity"]["text"] > 1 and r["baseline_perplexity"]["text"] > 1
    assert r["modules"] == 14 and r["bits"] == 3 and r["group_size"] == 16 and r["seed"] == 0
    assert r["versions"]["jax"] and r["quantize_seconds"] > 0 and r["resumed"] is False
    assert os.path.exists(os.path.join(r["run_dir"], "tokenizer.json"))  # through the cache
  # GPTQ and CD beat RTN on the layer objective; CD starts from GPTQ and only descends.
  by = {r["method"]: r["objective_sum"] for r in rows}
  assert by["cd"] <= by["gptq"] < by["rtn"]


def test_points_share_the_cached_token_ids(reference):
  outcome, rows = reference
  cache = os.path.join(outcome.directory, "cache")
  assert len(os.listdir(os.path.join(cache, "calibration"))) == 1  # one seed, one source
  assert len(os.listdir(os.path.join(cache, "tokens"))) == 2  # calibration + evaluation text
  assert len({r["calibration_token_hash"] for r in rows}) == 1


def test_points_share_one_baseline_equal_to_a_direct_evaluation(fixture, reference):
  outcome, rows = reference
  assert len(os.listdir(os.path.join(outcome.directory, "cache", "baselines"))) == 1
  run = run_lib.run_config_from_dict(tiny_model.run_dict(fixture))
  model, params, tokenizer = registry.load_model(fixture["model"], "float32")
  direct = evaluation.evaluate_sources(run.eval, model, params, tokenizer,
                                       default_seqlen=run.calibration.seqlen)
  assert [r["baseline_perplexity"] for r in rows] == [{"text": direct["text"]["ppl"]}] * 3


def test_killed_sweep_resumes_to_the_same_rows(fixture, reference, tmp_path):
  _, expected = reference
  spec = _spec(fixture)
  points = sweep.expand(spec, str(tmp_path))

  def kill_in_second_point(name, block):
    if name == points[1].name and block == 0:
      raise Killed

  with pytest.raises(Killed):
    runner.run_sweep(spec, out=str(tmp_path), after_block=kill_in_second_point)
  rows = store.read_rows(store.results_file(str(tmp_path)))
  assert [r["name"] for r in rows] == [points[0].name]
  assert checkpoint.load_state(points[1].run_dir)["blocks_done"] == 1

  outcome = runner.run_sweep(spec, out=str(tmp_path))
  assert outcome.skipped == (points[0].name,)
  assert outcome.done == (points[1].name, points[2].name)
  rows = store.read_rows(store.results_file(str(tmp_path)))
  assert [r["resumed"] for r in rows] == [False, True, False]
  assert _measured(rows) == _measured(expected)

  again = runner.run_sweep(spec, out=str(tmp_path))
  assert again.done == () and len(again.skipped) == 3
  assert len(store.read_rows(store.results_file(str(tmp_path)))) == 3


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(fixture, tmp_path):
  missing = str(tmp_path / "no_such_corpus.txt")
  spec = _spec(fixture, axes={}, variants={"broken": {"calibration.path": missing},
                                           "rtn": {"quant.method": "rtn"}})
  outcome = runner.run_sweep(spec, out=str(tmp_path / "sweep"))
  assert outcome.failed == ("broken",) and outcome.done == ("rtn",)
  broken, ok = store.read_rows(store.results_file(outcome.directory))
  assert broken["status"] == "failed" and ok["status"] == "done"
  assert broken["error"].startswith("FileNotFoundError") and missing in broken["error"]
  assert "\n" not in broken["error"] and broken["perplexity"] is None
  assert "Traceback" in open(os.path.join(broken["run_dir"], runner.ERROR_FILE)).read()
  retry = runner.run_sweep(spec, out=str(tmp_path / "sweep"))  # failed points run again
  assert retry.failed == ("broken",) and retry.skipped == ("rtn",)


def test_two_jobs_give_the_rows_of_one(fixture, reference, tmp_path):
  _, expected = reference
  outcome = runner.run_sweep(_spec(fixture), out=str(tmp_path), jobs=2)
  assert sorted(outcome.done) == sorted(r["name"] for r in expected)
  rows = store.read_rows(store.results_file(str(tmp_path)))
  assert _measured(rows) == _measured(expected)


def test_weights_on_disk_give_the_rows_of_host_weights(fixture, reference, tmp_path):
  """A sweep whose base keeps the block weights on disk (`weights: disk`: the points load
  only the outer params) measures what the host-weights sweep measured."""
  _, expected = reference
  data = {"name": "tiny", "base": {**tiny_model.run_dict(fixture), "weights": "disk"},
          "axes": {"quant.method": ["rtn", "gptq", "cd"]}}
  outcome = runner.run_sweep(config_lib.from_dict(sweep.SweepConfig, data), out=str(tmp_path))
  rows = store.read_rows(store.results_file(outcome.directory))
  by_name = lambda rs: {r["name"]: {k: r[k] for k in MEASURED if k != "point"} for r in rs}
  assert by_name(rows) == by_name(expected) and len(rows) == 3


def test_only_runs_the_matching_points(fixture, reference, tmp_path):
  _, expected = reference
  outcome = runner.run_sweep(_spec(fixture), out=str(tmp_path), only=("*=rtn",))
  assert outcome.done == ("method=rtn",) and not outcome.skipped
  rows = store.read_rows(store.results_file(outcome.directory))
  assert _measured(rows) == {k: v for k, v in _measured(expected).items()
                             if v["method"] == "rtn"}
  with pytest.raises(config_lib.ConfigError, match="'method=gtpq' matches no point"):
    runner.run_sweep(_spec(fixture), out=str(tmp_path), only=("method=gtpq",))


def _segfault_gptq(job: runner.Job, device) -> None:
  """A point process that dies of SIGSEGV for the GPTQ point and runs the others."""
  if job.name == "method=gptq":
    os.kill(os.getpid(), signal.SIGSEGV)
  runner._point_process(job, device)  # pylint: disable=protected-access


def test_a_point_whose_process_dies_fails_alone(fixture, reference, tmp_path):
  """Each point has its own process: one dying of a signal gets a failed row naming it, the
  others finish with the reference rows, and the next run retries only the dead point."""
  _, expected = reference
  spec = _spec(fixture)
  directory, points, _ = runner.plan(spec, str(tmp_path))
  jobs = runner._jobs(spec, directory, None, points)  # pylint: disable=protected-access
  statuses = runner._run_isolated(jobs, 2, lambda line: None,  # pylint: disable=protected-access
                                  target=_segfault_gptq)
  assert statuses == {"method=rtn": "done", "method=gptq": "failed", "method=cd": "done"}
  rows = {r["name"]: r for r in store.read_rows(store.results_file(directory))}
  assert rows["method=gptq"]["error"] == "WorkerDied: the point's process died (signal SIGSEGV)"
  assert rows["method=gptq"]["perplexity"] is None
  done = [r for r in rows.values() if r["status"] == "done"]
  assert _measured(done) == {k: v for k, v in _measured(expected).items()
                             if k != rows["method=gptq"]["point"]}
  retry = runner.run_sweep(spec, out=str(tmp_path))
  assert retry.done == ("method=gptq",) and set(retry.skipped) == {"method=rtn", "method=cd"}


def test_one_worker_per_device(fixture, reference, tmp_path):
  """With devices, each worker process owns one id (its CUDA_VISIBLE_DEVICES) and records it;
  the results are those of one process."""
  _, expected = reference
  outcome = runner.run_sweep(_spec(fixture), out=str(tmp_path), jobs=2, devices=("0", "1"))
  rows = store.read_rows(store.results_file(outcome.directory))
  assert {r["device"] for r in rows} <= {"0", "1"} and all(r["device"] for r in rows)
  assert _measured(rows) == _measured(expected)
  assert {r["device"] for r in expected} == {None}
  with pytest.raises(config_lib.ConfigError, match="one distinct device per job"):
    runner.run_sweep(_spec(fixture), out=str(tmp_path), jobs=2, devices=("0",))
