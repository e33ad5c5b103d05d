"""Session fixtures of the export tests: one tiny random Llama checkpoint and its quantized run
directories, each built on first use (see tests/export/runs.py)."""

import pytest

from tests.export import runs
from tests.models import hf_reference as ref


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """(torch model, HF directory) of the tiny random Llama."""
  return runs.tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def run_dir(checkpoint, tmp_path_factory):
  """name -> run directory (built once per session)."""
  cache = {}

  def get(name: str) -> str:
    if name not in cache:
      method, knobs = runs.RUNS[name]
      cache[name] = runs.quantized_run(checkpoint[1], str(tmp_path_factory.mktemp(name)),
                                       method, **knobs)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def ids():
  return ref.random_ids(runs.TINY_LLAMA["vocab_size"], batch=2, length=12)

