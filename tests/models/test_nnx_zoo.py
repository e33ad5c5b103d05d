"""The zoo as flax NNX modules: every family's model is an nnx.Module tree whose nnx.Param
paths are the dict params' paths, `nnx.split` / `nnx.merge` round-trip (a packed weight
included), and the NNX module called directly (under nnx.jit) gives transformers' logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdquant_jax.models import registry
from cdquant_jax.models.base import CausalLM
from cdquant_jax.models.layers import LinearRecorder
from cdquant_jax.models.modules import DecoderModule, Linear
from cdquant_jax.models.params import flat_paths, get_path, set_path
from cdquant_jax.quant.grids import GridConfig
from cdquant_jax.quant.qweight import QuantizedWeight, pack_result
from cdquant_jax.solvers.rtn import RTNConfig, rtn
from tests.models import hf_reference as ref

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=61)
# One small config per module layout: plain Llama, Gemma 3 (q/k norms, 4 norms per block,
# tied), OPT with project_in/out, Falcon (fused qkv, 2 parallel norms).
CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **TINY),
    "gemma3": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8,
                   sliding_window=4, **TINY),
    "opt": dict(model_type="opt", ffn_dim=48, word_embed_proj_dim=16,
                max_position_embeddings=32, **{k: v for k, v in TINY.items()
                                               if k != "intermediate_size"}),
    "falcon": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2,
                   alibi=False, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=61),
}


def _state_paths(state: nnx.State) -> dict[tuple, nnx.Variable]:
  return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def _packed(W: jax.Array) -> QuantizedWeight:
  """W [d_out, d_in] as a packed 3-bit RTN weight."""
  W = np.asarray(W, np.float32)
  result = rtn(W, np.eye(W.shape[1], dtype=np.float32),
               RTNConfig(grid=GridConfig(bits=3, group_size=16)))
  return pack_result(result)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_is_nnx_with_the_dict_param_paths(name):
  model = registry.model_from_hf_config(CONFIGS[name])
  params = model.init_params(jax.random.key(0))
  module = model.nnx_module(params)
  assert isinstance(module, DecoderModule) and isinstance(module, nnx.Module)
  assert len(module.layers) == model.num_layers
  assert all(isinstance(block, nnx.Module) for block in module.layers)
  state = _state_paths(nnx.state(module))
  assert all(isinstance(var, nnx.Param) for var in state.values())
  want = flat_paths(params)
  assert set(state) == set(want)
  for path, leaf in want.items():
    np.testing.assert_array_equal(np.asarray(state[path][...]), np.asarray(leaf))
  # Each linear of `block_linears` is a zoo Linear carrying its own path in the block.
  for path in model.linear_paths():
    linear = _node(module.layers[0], path)
    assert isinstance(linear, Linear) and linear.path == path
  # A freshly built module has the same tree as the loader's param_shapes.
  fresh = _state_paths(nnx.state(model.build_module(nnx.Rngs(0))))
  assert {p: v[...].shape for p, v in fresh.items()} == {
      p: s.shape for p, s in flat_paths(model.param_shapes()).items()}


def _node(module: nnx.Module, path: tuple) -> nnx.Module:
  for key in path:
    module = getattr(module, key)
  return module


@pytest.mark.parametrize("name", ["llama", "falcon"])
def test_split_merge_round_trip_with_a_packed_weight(name):
  model = registry.model_from_hf_config(CONFIGS[name])
  params = model.init_params(jax.random.key(1), scale=0.3)
  path = ("layers", 1) + model.linear_paths()[0] + ("weight",)
  params = set_path(params, path, _packed(get_path(params, path)))
  module = model.nnx_module(params)
  graphdef, state = nnx.split(module)
  merged = nnx.merge(graphdef, state)
  back = CausalLM.params_of(merged)
  assert isinstance(get_path(back, path), QuantizedWeight)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ids = jnp.asarray(ref.random_ids(61, length=7))
  logits = nnx.jit(lambda m, x: m(x))(merged, ids)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(jax.jit(model.forward)(params, ids)))


def test_block_recorder_captures_and_replaces_linear_inputs():
  model = registry.model_from_hf_config(CONFIGS["llama"])
  params = model.init_params(jax.random.key(2), scale=0.3)
  block = model.block_module(model.layer_params(params, 0), 0)
  h = jax.random.normal(jax.random.key(3), (2, 5, 32))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  recorder = LinearRecorder(capture=True)
  out, _ = block(h, positions, None, recorder)
  assert set(recorder.inputs) == set(model.linear_paths())
  # q, k, v all read the normed block input; down_proj reads the gated MLP product.
  np.testing.assert_array_equal(np.asarray(recorder.inputs[("self_attn", "q_proj")]),
                                np.asarray(block.input_layernorm(h)))
  # A given down_proj input replaces the computed one: zeros -> no MLP contribution.
  down = ("mlp", "down_proj")
  zeros = jnp.zeros_like(recorder.inputs[down])
  without_mlp, _ = block(h, positions, None, LinearRecorder(given={down: zeros}))
  attn_only = h + block.self_attn(block.input_layernorm(h), positions, None, None)[0]
  np.testing.assert_allclose(np.asarray(without_mlp), np.asarray(attn_only), atol=1e-6)
  assert not np.allclose(np.asarray(out), np.asarray(without_mlp))


HF_CASES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=91, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64)),
    "falcon-new": ("FalconConfig", "FalconForCausalLM",
                   dict(vocab_size=83, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, alibi=False,
                        new_decoder_architecture=True, num_kv_heads=2, bias=False)),
}


@pytest.mark.hf
@pytest.mark.parametrize("case", list(HF_CASES))
def test_nnx_module_matches_transformers(tmp_path, case):
  config_class, model_class, kwargs = HF_CASES[case]
  torch_model = ref.build_torch_model(config_class, model_class, **kwargs)
  model, params, _ = ref.save_and_load(torch_model, tmp_path)
  module = model.nnx_module(params)
  ids = ref.random_ids(kwargs["vocab_size"], length=10)
  expected = ref.torch_logits(torch_model, ids)
  graphdef, state = nnx.split(module)

  @jax.jit
  def logits_of(state, ids):
    return nnx.merge(graphdef, state)(ids)

  got = np.asarray(logits_of(state, jnp.asarray(ids)))
  assert float(np.max(np.abs(expected))) > 1.0
  np.testing.assert_allclose(got, expected, atol=ref.ATOL, rtol=0)
