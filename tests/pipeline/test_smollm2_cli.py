"""End to end on the real SmolLM2-135M (GGUF) through the CLI: `cdquant quantize` on block 0
only (4 x 64 calibration tokens), then `cdquant eval` of the written directory reproduces the
run's perplexity exactly; a 4-bit block 0 barely changes the perplexity. The GGUF's unquantized
tensors are Q8_0 (the embedding), Q4_1 (linears outside block 0) and F32 (norms); dequantized
Q8_0 / Q4_1 values are not all float16 (21 % of the embedding's, 68 % of the Q4_1 values are;
no such tensor fits entirely), so all stay float32."""

import json

import pytest
import yaml
from safetensors import safe_open

from cdquant_jax.cli import main as cli
from cdquant_jax.models import aliases, gguf_loader
from cdquant_jax.pipeline import config, export

pytestmark = pytest.mark.slow


def test_quantize_then_eval(tmp_path, capsys):
  try:
    aliases.resolve_model_path(aliases.SMOLLM2)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(str(e))
  out = tmp_path / "run"
  cfg = tmp_path / "run.yaml"
  cfg.write_text(yaml.safe_dump(dict(
      model=dict(path="smollm2"), calibration=dict(source="bundled", nsamples=4, seqlen=64),
      quant=dict(method="gptq", knobs=dict(bits=4, group_size=64), include=[r"^layers\.0\."]),
      eval=dict(sources=["bundled"], seqlen=64, max_windows=4, baseline=True),
      output_dir=str(out), forward_batch_size=4, checkpoint="none")))
  assert cli.main(["quantize", "--config", str(cfg), "--no-progress"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert len(metrics["quantized_modules"]) == 7
  assert all(m.startswith("layers.0.") for m in metrics["quantized_modules"])
  timing = metrics["timing"]
  phases = [v for k, v in timing.items() if k not in (
      "quantize_seconds", "baseline_eval_seconds", "eval_seconds", "export_seconds")]
  assert sum(phases) == pytest.approx(timing["quantize_seconds"], abs=0.0005 * (len(phases) + 1))
  with safe_open(str(out / "params.safetensors"), "numpy") as f:
    stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
  assert stored["embed_tokens.weight"] == stored["norm.weight"] == "F32"
  base = metrics["baseline_perplexity"]["bundled"]["ppl"]
  quant = metrics["perplexity"]["bundled"]["ppl"]
  assert 1.0 < base < 200 and abs(quant / base - 1) < 0.1, (base, quant)
  records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["module"] for r in records][:3] == [
      "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj", "layers.0.self_attn.q_proj"]
  capsys.readouterr()
  assert cli.main(["eval", "--model", str(out), "--max-windows", "4", "--seqlen", "64"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["bundled"]["ppl"] == quant
  assert cli.main(["quantize", "--config", str(cfg), "--set", "quant.knobs.bitz=3"]) == 2


def test_gguf_source_types_and_their_storage():
  try:
    path = aliases.resolve_model_path(aliases.SMOLLM2)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(str(e))
  reader = gguf_loader.open_reader(path)
  types = gguf_loader.source_dtypes(reader, path)
  assert types["model.embed_tokens.weight"] == "Q8_0"
  assert types["model.norm.weight"] == "float32"
  assert types["model.layers.0.mlp.down_proj.weight"] == "Q4_1"
  embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
  assert export.storage_dtype(gguf_loader.dequantized(embedding), "Q8_0") == "float32"
