"""Quantized models: logits through packed_matmul equal those of the dequantized model.

models.layers.linear dispatches a QuantizedWeight to kernels.quantized_linear with the model's
LinearOptions; the `quantized_dispatch` fixture pins exactly that dispatch so these tests do not
depend on it (test_linear_options_reach_packed_matmul checks the real one).
"""

import argparse
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from cdquant_jax.cli import generate
from cdquant_jax.kernels import linear as kernels_linear
from cdquant_jax.kernels import quantized_linear
from cdquant_jax.kernels.packed_matmul import pallas_mosaic
from cdquant_jax.models import layers, registry
from cdquant_jax.models.layers import LinearOptions, get_path
from cdquant_jax.pipeline import export
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.quant.qweight import QuantizedWeight, pack_result
from cdquant_jax.solvers.rtn import RTNConfig, rtn

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}


@pytest.fixture
def quantized_dispatch(monkeypatch):
  dense_linear = layers.linear

  def linear(x, p, options=LinearOptions()):
    if isinstance(p["weight"], QuantizedWeight):
      return quantized_linear(x, p["weight"], p.get("bias"),
                              implementation=options.implementation, interpret=options.interpret)
    return dense_linear(x, p, options)

  monkeypatch.setattr(layers, "linear", linear)


def quantize_layers(model, params, layer_ids, bits=3, group_size=16):
  """params with the linears of `layer_ids` replaced by packed RTN QuantizedWeights."""
  new_layers = list(params["layers"])
  for i in layer_ids:
    layer = jax.tree.map(lambda a: a, new_layers[i])  # copy of the nested dicts
    for path in model.linear_paths():
      p = get_path(layer, path)
      W = np.asarray(p["weight"], np.float32)
      result = rtn(W, np.eye(W.shape[1], dtype=np.float32),
                   RTNConfig(grid=GridConfig(bits=bits, group_size=group_size)))
      p["weight"] = pack_result(result)
    new_layers[i] = layer
  return {**params, "layers": new_layers}


@pytest.fixture(scope="module")
def tiny():
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  qparams = quantize_layers(model, params, range(model.num_layers))
  return model, qparams, export.dense_params(qparams)


def _assert_close(got, want, rel=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def test_tiny_prefill_and_cached_decode_logits_equal_dequantized(tiny, quantized_dispatch):
  model, qparams, dparams = tiny
  # pallas_triton runs interpreted on CPU
  model = model.with_linear_options(LinearOptions(implementation="pallas_triton"))
  ids = jnp.asarray([[5, 17, 3, 42]], jnp.int32)
  step = jax.jit(model.decode_step)
  cache = model.init_cache(1, 8)
  # prefill: B·T = 4 rows (dot path); then one cached decode step: B = 1 (GEMV path)
  (q_pre, q_cache), (d_pre, d_cache) = step(qparams, ids, cache), step(dparams, ids, cache)
  _assert_close(q_pre, d_pre)
  nxt = jnp.asarray([[7]], jnp.int32)
  _assert_close(step(qparams, nxt, q_cache)[0], step(dparams, nxt, d_cache)[0])


def test_tiny_model_lowers_with_one_mosaic_kernel_per_linear(tiny, quantized_dispatch,
                                                             monkeypatch):
  """With pallas_mosaic (Hopper pretended), prefill (B·T = 2·130 rows) and decode (B = 2) lower
  for CUDA with one Mosaic GPU kernel per packed linear: no dense dequantized fallback."""
  packed_registry = importlib.import_module("cdquant_jax.kernels.packed_matmul")
  monkeypatch.setattr(packed_registry, "_mosaic_unavailable", lambda interpret: None)
  model, qparams, _ = tiny
  model = model.with_linear_options(LinearOptions(implementation="pallas_mosaic",
                                                  interpret=False))
  launches = []
  real_launch = pallas_mosaic._launch
  monkeypatch.setattr(pallas_mosaic, "_launch",
                      lambda plan, *a, **k: launches.append(plan) or real_launch(plan, *a, **k))
  # mosaic_packed_matmul is jitted: linears with equal metadata share one trace (one launch)
  metas = {get_path(layer, path)["weight"].meta for layer in qparams["layers"]
           for path in model.linear_paths()}
  for tokens in (130, 1):
    launches.clear()
    ids = jax.ShapeDtypeStruct((2, tokens), jnp.int32)
    text = jax.jit(model.forward).trace(qparams, ids).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(launches) == len(metas)  # RTN weights: no outliers, one launch per linear
    assert all(p.tb * p.token_blocks >= 2 * tokens for p in launches)
    assert text.count("stablehlo.custom_call @mosaic_gpu") == len(metas)


@pytest.mark.gpu
@pytest.mark.skipif(not (jax.default_backend() == "gpu" and str(
    getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")),
                    reason="needs a Hopper GPU")
def test_tiny_model_logits_with_mosaic_kernels_equal_dequantized(tiny, quantized_dispatch):
  model, qparams, dparams = tiny
  model = model.with_linear_options(LinearOptions(implementation="pallas_mosaic"))
  ids = jnp.asarray([[5, 17, 3, 42]], jnp.int32)
  forward = jax.jit(model.forward)
  # f32 activations are multiplied as bf16 by the Mosaic kernel (f32 accumulation)
  _assert_close(forward(qparams, ids), forward(dparams, ids), rel=2e-2)


@pytest.mark.parametrize("options", [LinearOptions(),
                                     LinearOptions(implementation="reference", interpret=False)],
                         ids=["default", "reference"])
def test_linear_options_reach_packed_matmul(tiny, monkeypatch, options):
  """The model's LinearOptions arrive at packed_matmul for every packed linear, nothing else."""
  calls = []
  real = kernels_linear.packed_matmul

  def spy(x, qw, **kwargs):
    calls.append((kwargs["implementation"], kwargs["interpret"]))
    return real(x, qw, **kwargs)

  monkeypatch.setattr(kernels_linear, "packed_matmul", spy)
  model, qparams, _ = tiny
  model.with_linear_options(options).forward(qparams, jnp.asarray([[5, 17, 3]], jnp.int32))
  assert calls == [(options.implementation, options.interpret)] * len(model.linear_paths())


def _word_tokenizer(vocab_size):
  vocab = {f"w{i}": i for i in range(vocab_size)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def test_generate_cli_on_a_quantized_model_directory(tiny, quantized_dispatch, tmp_path,
                                                     capsys):
  model, qparams, _ = tiny
  weights = {".".join(str(k) for k in ("layers", i) + path): get_path(qparams["layers"][i],
                                                                         path)["weight"]
             for i in range(model.num_layers) for path in model.linear_paths()}
  export.write_model_dir(str(tmp_path), model, qparams, weights,
                         tokenizer=_word_tokenizer(TINY["vocab_size"]))
  outputs = []
  for dense in (False, True):
    args = argparse.Namespace(model=str(tmp_path), prompt="w5 w17 w3", max_new_tokens=5,
                              implementation="reference", dense=dense)
    assert generate.run(args) == 0
    outputs.append(capsys.readouterr().out.splitlines()[0])
  assert outputs[0] == outputs[1] and len(outputs[0].split()) == 5


@pytest.mark.slow
def test_smollm2_logits_equal_dequantized(quantized_dispatch):
  """SmolLM2-135M with layer 0's seven linears packed (w4 g64), kernel interpreted on CPU."""
  from tests.models.test_smollm2 import _gguf_path  # skips when the package is missing
  model, params, tok = registry.load_model(_gguf_path())
  qparams = quantize_layers(model, params, [0], bits=4, group_size=64)
  dparams = export.dense_params(qparams)
  model = model.with_linear_options(LinearOptions(implementation="pallas_triton"))
  ids = jnp.asarray([tok.encode("The capital of France is").ids], jnp.int32)
  forward = jax.jit(model.forward)
  _assert_close(forward(qparams, ids), forward(dparams, ids), rel=1e-4)


def test_an_unknown_implementation_is_refused_when_the_options_are_built():
  with pytest.raises(ValueError, match="LinearOptions.implementation: unknown 'cuda'"):
    LinearOptions(implementation="cuda")
  assert LinearOptions(implementation="pallas_mosaic").implementation == "pallas_mosaic"
