"""The error contract of every `cdquant` command: bad input -> exit code 2 and exactly one
stderr line naming the bad thing and its value, no traceback; `-v` prints the traceback.

Every case fails before any model is quantized (tiny files in tmp_path, checks of flags).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.cli import errors, main as cli
from cdquant_jax.models import registry
from cdquant_jax.solvers import hessian

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 64}


def _run(capsys, *argv) -> tuple[int, str]:
  code = cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
  """Exit 2, one non-empty stderr line "error: ..." that contains every needle, no traceback."""
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == errors.EXIT_USER_ERROR, err
  assert "Traceback" not in err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for needle in needles:
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def _zero_state(hf_config: dict) -> dict[str, np.ndarray]:
  """HF-named zero tensors of every parameter of the model `hf_config` describes."""
  model = registry.model_from_hf_config(hf_config)
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path)
    state[("" if name.startswith("lm_head") else "model.") + name] = np.zeros(leaf.shape,
                                                                               np.float32)
  return state


def _hf_dir(directory, config: dict | None = None):
  """A loadable HF directory (config.json + model.safetensors, no tokenizer)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  directory.mkdir(exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config or TINY_LLAMA))
  save_file(_zero_state(TINY_LLAMA), str(directory / "model.safetensors"))
  return directory


def _truncated_dir(directory):
  _hf_dir(directory)
  file = directory / "model.safetensors"
  file.write_bytes(file.read_bytes()[:100])
  return directory


def _gguf(path, architecture: str):
  """A GGUF file with `architecture` in general.architecture and one tiny tensor."""
  import gguf  # pylint: disable=import-outside-toplevel
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _write(path, text: str):
  path.write_text(text)
  return path


# ----- quantize -----------------------------------------------------------------------------

def _quantize_case(tmp_path, case: str) -> tuple[list, tuple[str, ...]]:
  """(argv after "quantize", needles of the error line) of one bad input."""
  out = ["--output", tmp_path / "out"]
  if case == "missing-yaml":
    path = tmp_path / "absent.yaml"
    return ["--config", path], (f"{path}: No such file or directory",)
  if case == "unknown-field":
    path = _write(tmp_path / "x.yaml", "quant:\n  knobs:\n    bitz: 3\n")
    return ["--config", path], (f"{path}: ", "unknown field(s) ['bitz']")
  if case == "not-yaml":
    path = _write(tmp_path / "x.yaml", "quant: [unclosed\n")
    return ["--config", path], (f"{path}: not valid YAML",)
  if case == "bad-set-value":
    return ["--set", "calibration.nsamples=many", *out], ("--set calibration.nsamples=many",
                                                          "'many'")
  if case == "impossible-set":
    return ["--set", "calibration.nsamples=0", *out], ("--set", "nsamples must be >= 1, got 0")
  if case == "missing-model":
    path = tmp_path / "absent_model"
    return ["--set", f"model.path={path}", *out], (f"{path}: no such model directory",)
  if case == "truncated-safetensors":
    path = _truncated_dir(tmp_path / "model")
    return ["--set", f"model.path={path}", *out], ("model.safetensors: cannot read",)
  if case == "unsupported-gguf":
    path = _gguf(tmp_path / "m.gguf", "mamba")
    return ["--set", f"model.path={path}", *out], (f"{path}: general.architecture='mamba'",)
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-yaml", "unknown-field", "not-yaml", "bad-set-value",
                                  "impossible-set", "missing-model", "truncated-safetensors",
                                  "unsupported-gguf"])
def test_quantize_bad_input(tmp_path, capsys, case):
  argv, needles = _quantize_case(tmp_path, case)
  _assert_one_line_error(*_run(capsys, "quantize", *argv), *needles)


def test_quantize_nan_activations_are_one_line(tmp_path, capsys, monkeypatch):
  """HessianError from the real accumulation raised inside the quantize command."""
  from cdquant_jax.pipeline import sequential  # pylint: disable=import-outside-toplevel

  def quantize_model(run, **_):
    x = np.full((1, 2, 4), np.nan, np.float32)
    hessian.hessian_from_inputs(x, layer="layers.0.self_attn.q_proj")

  monkeypatch.setattr(sequential, "quantize_model", quantize_model)
  code, err = _run(capsys, "quantize", "--output", tmp_path / "out")
  _assert_one_line_error(code, err, "layers.0.self_attn.q_proj", "8 NaN/Inf values")


# ----- eval ---------------------------------------------------------------------------------

def _eval_case(tmp_path, case: str) -> tuple[list, tuple[str, ...]]:
  """(argv after "eval", needles) of one bad input."""
  if case == "missing-model":
    path = tmp_path / "absent"
    return ["--model", path], (f"{path}: no such model directory or .gguf file",)
  if case == "unsupported-gguf":
    path = _gguf(tmp_path / "m.gguf", "bert")
    return ["--model", path], (f"{path}: general.architecture='bert' is not supported",)
  if case == "truncated-safetensors":
    path = _truncated_dir(tmp_path / "model")
    return ["--model", path], (f"{path / 'model.safetensors'}: cannot read safetensors",)
  if case == "unknown-config-field":
    path = _hf_dir(tmp_path / "model", {**TINY_LLAMA, "frobnicate": 7})
    return ["--model", path], (f"{path / 'config.json'}: ", "frobnicate=7")
  if case == "no-tokenizer":
    path = _hf_dir(tmp_path / "model")
    return ["--model", path], (f"--model {path}", "no tokenizer")
  if case == "corrupt-quantized-dir":
    (tmp_path / "q").mkdir()
    _write(tmp_path / "q" / "model.json", "{not json")
    return ["--model", tmp_path / "q"], (f"{tmp_path / 'q'}: ", "Expecting property name")
  if case == "bad-seqlen":
    return ["--model", tmp_path, "--seqlen", 1], ("--seqlen must be >= 2, got 1",)
  if case == "bad-path":
    return ["--model", tmp_path, "--path", "test.txt"], ("--path", "'test.txt'")
  if case == "file-source-without-path":
    return ["--model", tmp_path, "--source", "jsonl"], ("--source jsonl needs a file",)
  if case == "unknown-source":
    return ["--model", tmp_path, "--source", "imagenet"], ("--source", "'imagenet'")
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-model", "unsupported-gguf", "truncated-safetensors",
                                  "unknown-config-field", "no-tokenizer", "corrupt-quantized-dir",
                                  "bad-seqlen", "bad-path", "file-source-without-path",
                                  "unknown-source"])
def test_eval_bad_input(tmp_path, capsys, case):
  argv, needles = _eval_case(tmp_path, case)
  _assert_one_line_error(*_run(capsys, "eval", *argv), *needles)


# ----- generate -----------------------------------------------------------------------------

def _generate_case(tmp_path, case: str) -> tuple[list, tuple[str, ...]]:
  """(argv after "generate", needles) of one bad input."""
  prompt = ["--prompt", "hello"]
  if case == "missing-model":
    return ["--model", tmp_path / "absent", *prompt], (f"{tmp_path / 'absent'}: ",
                                                       "not a quantized model directory")
  if case == "wrong-format":
    _write(tmp_path / "model.json", json.dumps({"format": "gptq-v9"}))
    return ["--model", tmp_path, *prompt], ("model.json", "'gptq-v9'")
  if case == "zero-tokens":
    return ["--model", tmp_path, *prompt, "--max-new-tokens", 0], (
        "--max-new-tokens must be >= 1, got 0",)
  if case == "non-integer-tokens":
    return ["--model", tmp_path, *prompt, "--max-new-tokens", "many"], (
        "--max-new-tokens", "'many'")
  if case == "empty-prompt":
    return ["--model", tmp_path, "--prompt", ""], ("--prompt is empty",)
  if case == "no-prompt":
    return ["--model", tmp_path], ("--prompt",)
  if case == "unknown-implementation":
    return ["--model", tmp_path, *prompt, "--implementation", "cuda"], ("--implementation",
                                                                        "'cuda'")
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-model", "wrong-format", "zero-tokens",
                                  "non-integer-tokens", "empty-prompt", "no-prompt",
                                  "unknown-implementation"])
def test_generate_bad_input(tmp_path, capsys, case):
  argv, needles = _generate_case(tmp_path, case)
  _assert_one_line_error(*_run(capsys, "generate", *argv), *needles)


# ----- layer --------------------------------------------------------------------------------

def _layer_case(tmp_path, case: str) -> tuple[list, tuple[str, ...]]:
  """(argv after "layer", needles) of one bad input."""
  W = np.ones((4, 8), np.float32)
  H = np.eye(8, dtype=np.float32)
  path = tmp_path / "problem.npz"
  if case == "missing-npz":
    return ["--input", path, "--method", "rtn"], (str(path),)
  if case == "missing-array":
    np.savez(path, W=W)
    return ["--input", path, "--method", "rtn"], (str(path), "missing array(s) ['H']")
  if case == "nan-hessian":
    np.savez(path, W=W, H=np.where(H > 0, np.nan, H))
    return ["--input", path, "--method", "gptq"], (str(path), "8 NaN/Inf")
  if case == "unknown-set-field":
    np.savez(path, W=W, H=H)
    return ["--input", path, "--method", "rtn", "--set", "bitz=3"], ("bitz",)
  if case == "unknown-method":
    return ["--input", path, "--method", "awq"], ("--method", "'awq'")
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-npz", "missing-array", "nan-hessian",
                                  "unknown-set-field", "unknown-method"])
def test_layer_bad_input(tmp_path, capsys, case):
  argv, needles = _layer_case(tmp_path, case)
  _assert_one_line_error(*_run(capsys, "layer", *argv), *needles)


# ----- demo ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needles", [
    (["--methods", "gptq,awq"], ("--methods", "['awq']")),
    (["--bits", 0], ("--bits 0", "bits", "got 0")),
    (["--group-size", 100], ("--group-size 100", "576 and 1536")),
    (["--seqlen", 1], ("--seqlen must be >= 2, got 1",)),
    (["--nsamples", 0], ("--nsamples must be >= 1, got 0",)),
    (["--layers-only", "--layers", "0,x"], ("--layers", "'0,x'")),
    (["--layers-only", "--layers", "0,9"], ("--layers 0,9", "[9]")),
    (["--layers-only", "--methods", "gptq", "--bits", 12], ("--bits 12", "got 12")),
], ids=["method", "bits", "group-size", "seqlen", "nsamples", "layers-syntax", "layers-range",
        "layers-only-bits"])
def test_demo_bad_input(capsys, argv, needles):
  _assert_one_line_error(*_run(capsys, "demo", *argv), *needles)


# ----- the contract itself ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_the_traceback(tmp_path, capsys, where):
  argv = ["eval", "--model", str(tmp_path / "absent")]
  argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
  code, err = _run(capsys, *argv)
  assert code == errors.EXIT_USER_ERROR
  assert "Traceback" in err and "FileNotFoundError" in err and "absent" in err


@pytest.mark.parametrize("error", [
    config_lib.ConfigError("run.quant: unknown method 'awq'"),
    hessian.HessianError("layer q_proj: 3 NaN/Inf values"),
    errors.UsageError("--seqlen must be >= 2, got 1"),
    FileNotFoundError(2, "No such file or directory", "x.yaml"),
    PermissionError(13, "Permission denied", "out/model.json"),
], ids=lambda e: type(e).__name__)
def test_user_errors_become_one_line(capsys, monkeypatch, error):
  def command(_):
    raise error

  monkeypatch.setitem(cli.COMMANDS, "demo", command)
  code, err = _run(capsys, "demo")
  expected = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) else str(error)
  _assert_one_line_error(code, err, expected)


@pytest.mark.parametrize("bug", [AssertionError("shapes"), TypeError("bad call"),
                                 ValueError("internal"), KeyError("layers")],
                         ids=lambda e: type(e).__name__)
def test_bugs_keep_their_traceback(monkeypatch, bug):
  def command(_):
    raise bug

  monkeypatch.setitem(cli.COMMANDS, "demo", command)
  with pytest.raises(type(bug)):
    cli.main(["demo"])


def test_multiline_messages_are_joined():
  assert errors.one_line(ValueError("a\n  b\n\nc")) == "a b c"


def test_subprocess_exit_code_and_stderr(tmp_path):
  path = _write(tmp_path / "x.yaml", "quant:\n  knobs:\n    bitz: 3\n")
  proc = subprocess.run([sys.executable, "-m", "cdquant_jax.cli.main", "quantize", "--config",
                         str(path)], capture_output=True, text=True, timeout=300, check=False)
  _assert_one_line_error(proc.returncode, proc.stderr, f"{path}: ", "['bitz']")
  assert proc.stdout == ""
