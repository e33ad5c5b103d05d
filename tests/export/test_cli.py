"""`cdquant export`: writes each format, and refuses what a format cannot hold with one stderr
line naming the module, the reason and the formats that can (exit code 2, nothing written)."""

import os

import numpy as np
import pytest

from cdquant_jax.cli import main as cli
from cdquant_jax.export import ExportError, export_model
from cdquant_jax.models import registry
from cdquant_jax.pipeline import export
from cdquant_jax.quant.qweight import pack_result
from tests.quant.qweight_fixtures import spqr_like_result

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("fmt, written", [("gptq", "quantize_config.json"),
                                          ("compressed-tensors", "model.safetensors"),
                                          ("gguf", "model.gguf")])
def test_export_command_writes_the_format(run_dir, tmp_path, capsys, fmt, written):
  out = tmp_path / fmt
  code = cli.main(["export", "--model", run_dir("gptq-w4g32"), "--format", fmt,
                   "--output", str(out)])
  assert code == 0
  assert (out / written).exists()
  assert f"wrote {out} ({fmt}, 14 quantized modules)" in capsys.readouterr().out


def test_refusal_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
  out = tmp_path / "out"
  code = cli.main(["export", "--model", run_dir("gptq-w3g32-actorder"), "--format", "gguf",
                   "--output", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("error: layers.0.") and "gguf cannot hold 3-bit" in err
  assert "export it as gptq or gguf with gguf_dense_fallback" in err
  assert not out.exists()


def test_dense_gguf_fallback_writes_f32(run_dir, tmp_path, capsys):
  code = cli.main(["export", "--model", run_dir("gptq-w3g32-actorder"), "--format", "gguf",
                   "--output", str(tmp_path), "--gguf-dense"])
  assert code == 0 and '"dense_fallback": ["layers.0.mlp.down_proj"' in capsys.readouterr().out


def test_bad_run_directory(tmp_path, capsys):
  code = cli.main(["export", "--model", str(tmp_path), "--format", "gptq",
                   "--output", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2 and str(tmp_path) in err and "model.json" in err, err


@pytest.fixture(scope="module")
def spqr_run(checkpoint, tmp_path_factory):
  """A run whose layers.0.self_attn.k_proj ([32, 64]) holds SpQR statistics and outliers."""
  model, params, _ = registry.load_model(checkpoint[1], "float32", with_tokenizer=False)
  result = spqr_like_result(np.random.default_rng(0), d_out=32, d_in=64, bits=3, G=16, qq=16)
  directory = str(tmp_path_factory.mktemp("spqr_run"))
  export.write_model_dir(directory, model, params,
                         {"layers.0.self_attn.k_proj": pack_result(result)})
  return directory


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "gguf"])
def test_spqr_statistics_are_refused_by_every_format(spqr_run, tmp_path, fmt):
  with pytest.raises(ExportError) as info:
    export_model(spqr_run, fmt, str(tmp_path / "out"))
  message = str(info.value)
  assert message.startswith("layers.0.self_attn.k_proj: SpQR second-level statistics"), message
  assert "keep the run directory" in message
  assert not os.path.exists(tmp_path / "out")
