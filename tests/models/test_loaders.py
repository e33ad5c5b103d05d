"""Checkpoint loading: sharded safetensors index, bf16 files, tied heads, GGUF (with llama.cpp's
q/k permutation written by an independent re-implementation of its converter), strict config
parsing and clear errors for bad files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax.models import registry
from cdquant_jax.models.hf_config import config_from_hf
from tests.models import hf_reference as ref

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5)
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 97}


@pytest.fixture(scope="module")
def torch_llama():
  return ref.build_torch_model("LlamaConfig", "LlamaForCausalLM", **BASE,
                               tie_word_embeddings=True)


@pytest.mark.hf
def test_sharded_index_and_tied_head(torch_llama, tmp_path):
  torch_llama.save_pretrained(str(tmp_path), max_shard_size="20KB")
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  assert not any(name.startswith("lm_head") for name in index["weight_map"])
  model, params, _ = registry.load_model(str(tmp_path))
  ids = ref.random_ids(BASE["vocab_size"])
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, ref.torch_logits(torch_llama, ids), atol=ref.ATOL, rtol=0)


@pytest.mark.hf
def test_bf16_checkpoint(torch_llama, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  bf16 = ref.build_torch_model("LlamaConfig", "LlamaForCausalLM", **BASE).to(torch.bfloat16)
  bf16.save_pretrained(str(tmp_path))
  _, params32, _ = registry.load_model(str(tmp_path), dtype="float32")
  expected = bf16.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params32["layers"][1]["mlp"]["down_proj"]["weight"]),
                                expected)
  model, params16, _ = registry.load_model(str(tmp_path), dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
  ids = ref.random_ids(BASE["vocab_size"])
  logits16 = np.asarray(model.forward(params16, jnp.asarray(ids)).astype(jnp.float32))
  logits32 = np.asarray(jax.jit(model.forward)(params32, jnp.asarray(ids)))
  assert np.max(np.abs(logits16 - logits32)) < 0.1 * np.max(np.abs(logits32))


def _llama_cpp_permute(w, n_head):
  # convert_hf_to_gguf.py LlamaModel.permute
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(torch_model, path):
  """A llama-architecture GGUF of torch_model, named and permuted as llama.cpp's converter."""
  c = torch_model.config
  w = ref.gguf_writer(torch_model, "llama", path)
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, tensor in torch_model.state_dict().items():
    x = tensor.detach().float().numpy()
    if name == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif name == "model.norm.weight":
      out = "output_norm.weight"
    elif name == "lm_head.weight":
      if c.tie_word_embeddings:
        continue
      out = "output.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      out = f"blk.{i}.{names[module]}.{kind}"
      if module == "self_attn.q_proj":
        x = _llama_cpp_permute(x, c.num_attention_heads)
      elif module == "self_attn.k_proj":
        x = _llama_cpp_permute(x, c.num_key_value_heads)
    w.add_tensor(out, np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.hf
def test_gguf_unpermutes_rope_rows(torch_llama, tmp_path):
  path = tmp_path / "tiny.gguf"
  _write_gguf(torch_llama, path)
  model, params, tok = registry.load_model(str(path))
  assert tok is None and model.config.tie_word_embeddings and model.config.num_kv_heads == 2
  ids = ref.random_ids(BASE["vocab_size"])
  got = np.asarray(jax.jit(model.forward)(params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, ref.torch_logits(torch_llama, ids), atol=ref.ATOL, rtol=0)


def test_unknown_config_fields_are_listed():
  with pytest.raises(ValueError, match=r"field\(s\) frobnicate=1, quantization_config=\{\};"):
    config_from_hf({**LLAMA_CONFIG, "frobnicate": 1, "quantization_config": {}})
  with pytest.raises(ValueError, match="rope_scaling: rope_type='yarn' is not supported"):
    config_from_hf({**LLAMA_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    config_from_hf({"model_type": "gpt2"})


def test_old_and_new_rope_spellings_agree():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  old = config_from_hf({**LLAMA_CONFIG, "rope_theta": 5e5, "rope_scaling": scaling,
                        "torch_dtype": "bfloat16"})
  new = config_from_hf({**LLAMA_CONFIG, "dtype": "bfloat16",
                        "rope_parameters": {**scaling, "rope_theta": 5e5}})
  assert old == new and old.rope.kind == "llama3" and old.rope.theta == 5e5


def _tiny_dir(tmp_path, tensors):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
  save_file(tensors, str(tmp_path / "model.safetensors"))


def _tiny_state():
  model = registry.model_from_hf_config(LLAMA_CONFIG)
  flat = jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]
  state = {}
  for path, leaf in flat:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path)
    prefix = "" if name.startswith("lm_head") else "model."
    state[prefix + name] = np.zeros(leaf.shape, np.float32)
  return state


def test_strict_tensor_checks(tmp_path):
  state = _tiny_state()
  del state["model.layers.1.mlp.up_proj.weight"]
  state["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  _tiny_dir(tmp_path, state)
  with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.extra.weight'\], "
                     r"missing \['layers.1.mlp.up_proj.weight'\]"):
    registry.load_model(str(tmp_path))
  state = _tiny_state()
  state["model.norm.weight"] = np.zeros((63,), np.float32)
  _tiny_dir(tmp_path, state)
  with pytest.raises(ValueError, match=r"model.norm.weight has shape \(63,\), expected \(64,\)"):
    registry.load_model(str(tmp_path))


def test_corrupt_and_missing_files(tmp_path):
  _tiny_dir(tmp_path, _tiny_state())
  file = tmp_path / "model.safetensors"
  file.write_bytes(file.read_bytes()[:100])
  with pytest.raises(ValueError, match="model.safetensors: cannot read"):
    registry.load_model(str(tmp_path))
  os.remove(file)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    registry.load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="missing GGUF file"):
    registry.load_model(str(tmp_path / "absent.gguf"))
