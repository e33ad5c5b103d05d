"""The functional model API used by the calibration pipeline: block_linears covers every linear,
capture returns each linear's input, set_layer_params is pure, generation equals repeated full
forwards (no cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry
from cdquant_jax.models import params as params_lib
from cdquant_jax.models.base import default_positions

CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 61},
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 61, "max_position_embeddings": 16},
    "falcon": {"model_type": "falcon", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_kv_heads": 2, "new_decoder_architecture": True,
               "vocab_size": 61},
}


def _tiny(name):
  model = registry.model_from_hf_config(CONFIGS[name])
  return model, model.init_params(jax.random.key(0), scale=0.3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_capture_inputs_cover_block_linears(name):
  model, params = _tiny(name)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 7)))
  pos = default_positions(ids)
  h = model.embed(params, ids, pos)
  lp = model.layer_params(params, 0)
  block = jax.jit(model.block, static_argnums=3, static_argnames="capture")
  out, _ = block(lp, h, pos, 0)
  out_c, _, inputs = block(lp, h, pos, 0, capture=True)
  np.testing.assert_array_equal(out, out_c)
  linear_paths = model.linear_paths()
  assert set(inputs) == set(linear_paths) and len(linear_paths) == len(set(linear_paths))
  # Every linear (weight with ndim 2) of the layer is in exactly one group.
  weights = {tuple(k.key for k in path[:-1])
             for path, leaf in jax.tree_util.tree_flatten_with_path(lp)[0]
             if path[-1].key == "weight" and leaf.ndim == 2}
  assert weights == set(linear_paths)
  for path, x in inputs.items():
    assert x.shape[:2] == (2, 7)
    assert x.shape[2] == params_lib.get_path(lp, path)["weight"].shape[1]
  if name == "llama":  # the attention input is input_layernorm(h), checked in numpy
    h64 = np.asarray(h, np.float64)
    normed = h64 / np.sqrt(np.mean(h64**2, -1, keepdims=True) + model.config.norm_eps)
    normed *= np.asarray(lp["input_layernorm"]["weight"])
    np.testing.assert_allclose(inputs[("self_attn", "q_proj")], normed, atol=1e-5)


def test_set_layer_params_is_pure():
  model, params = _tiny("llama")
  new_layer = jax.tree.map(jnp.zeros_like, model.layer_params(params, 1))
  new = model.set_layer_params(params, 1, new_layer)
  assert new["layers"][1] is new_layer and params["layers"][1] is not new_layer
  assert float(jnp.abs(params["layers"][1]["mlp"]["down_proj"]["weight"]).sum()) > 0


@pytest.mark.parametrize("name", ["llama", "falcon"])
def test_greedy_generate_matches_uncached_argmax(name):
  model, params = _tiny(name)
  prompt = np.random.default_rng(1).integers(0, 61, size=(2, 4))
  got = np.asarray(model.generate(params, prompt, 3))
  forward = jax.jit(model.forward)
  seq = prompt
  for _ in range(3):
    nxt = np.argmax(np.asarray(forward(params, jnp.asarray(seq)))[:, -1], axis=-1)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(got, seq)
