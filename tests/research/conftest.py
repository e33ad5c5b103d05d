"""Fixtures shared by the report tests: one synthetic sweep directory per module."""

import pytest

from tests.research import synthetic


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  return synthetic.write_sweep(tmp_path_factory.mktemp("sweep"))
