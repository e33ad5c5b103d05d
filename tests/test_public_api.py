"""The curated top level: every `cq.<name>` the README uses exists, is documented, and the
README's Python example runs as written."""

import re
from pathlib import Path

import cdquant_jax as cq

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_readme_name_is_public_and_documented():
  names = set(re.findall(r"\bcq\.([A-Za-z_]\w*)", README.read_text()))
  assert names, "the README should show the curated API"
  for name in sorted(names):
    assert name in cq.__all__, name
    value = getattr(cq, name)
    assert getattr(value, "__doc__", None) or isinstance(value, tuple), name


def test_every_public_name_resolves():
  for name in cq.__all__:
    assert getattr(cq, name) is not None


def test_readme_python_examples_run():
  blocks = _python_blocks()
  assert blocks
  for code in blocks:
    exec(compile(code, str(README), "exec"), {})  # pylint: disable=exec-used
