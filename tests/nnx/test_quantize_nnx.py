"""quantize_nnx on a tiny NNX decoder written in the tests (tiny_decoder.py).

The reference is the zoo pipeline (`sequential.quantize_loaded`) on the zoo Llama holding the
same weights: the packed weights must be identical, bit for bit, and the quantized logits equal
to the float tolerance at which the two unquantized models already agree. (The NNX model's
rope/attention are written independently, so activations, hence Hessians, differ in the last
bits: objectives agree to rtol 1e-5; at this size no code flips, asserted exactly.)
The Hessian oracle: inputs recorded by a plain Python wrapper in an un-jitted forward, and
H = 2/n Σ x xᵀ (n = sequences) in float64 numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cdquant_jax.nnx import QuantizedLinear, calibrate, quantize_nnx
from cdquant_jax.nnx.qlinear import weight_of
from cdquant_jax.pipeline import capture
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.solvers import api
from cdquant_jax.solvers import knobs as knobs_lib
from tests.nnx import tiny_decoder as td

NSAMPLES, SEQLEN, BATCH = 16, 16, 8
KNOBS = {"bits": 3, "group_size": 16}
LINEARS = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def calib():
  return np.random.default_rng(0).integers(0, td.TINY["vocab_size"],
                                           (NSAMPLES, SEQLEN)).astype(np.int32)


@pytest.fixture(scope="module")
def float_gap(calib):
  """Max |logits| difference of the unquantized NNX and zoo models (same weights)."""
  zoo, params = td.zoo_params(td.make_decoder())
  ours = td.make_decoder()(jnp.asarray(calib))
  return float(jnp.max(jnp.abs(ours - capture.block_logits_fn(zoo, params)(calib))))


def _zoo_run(tmp_path, method, calib):
  zoo, params = td.zoo_params(td.make_decoder())
  run = run_config_from_dict({
      "output_dir": str(tmp_path / method), "checkpoint": "none", "forward_batch_size": BATCH,
      "quant": {"method": method, "knobs": KNOBS},
      "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN}})
  result = quantize_loaded(run, zoo, params, calib, progress=False)
  return result, capture.block_logits_fn(zoo, result.params)(calib)


@pytest.mark.parametrize("method", ["gptq", "cd"])
def test_same_packed_weights_and_logits_as_the_zoo_pipeline(method, calib, float_gap,
                                                            tmp_path):
  zoo_result, zoo_logits = _zoo_run(tmp_path, method, calib)
  model = td.make_decoder()
  out = quantize_nnx(model, calib, blocks="layers.*", embed=td.embed, method=method,
                     knobs=KNOBS, batch_size=BATCH)
  assert out.model is model
  names = [f"layers.{i}.{a}.{b}" for i in range(2) for a, b in LINEARS]
  assert [r["module"] for r in out.records] == names  # call order, block by block
  assert sorted(out.qweights) == sorted(zoo_result.qweights)
  zoo_records = {r["module"]: r for r in zoo_result.records}
  for r in out.records:
    name = r["module"]
    ours, theirs = out.qweights[name], zoo_result.qweights[name]
    assert ours.meta == theirs.meta, name
    assert ours.arrays().keys() == theirs.arrays().keys()
    for field, array in theirs.arrays().items():
      np.testing.assert_array_equal(ours.arrays()[field], array, err_msg=f"{name}.{field}")
    assert r["shape"] == zoo_records[name]["shape"] and r["method"] == method
    np.testing.assert_allclose(r["objective"], zoo_records[name]["objective"], rtol=1e-5)
    assert r["block"] == name.rsplit(".", 2)[0] and r["nsamples"] == NSAMPLES
  for blk in model.layers:
    for a, b in LINEARS:
      assert isinstance(getattr(getattr(blk, a), b), QuantizedLinear)
  assert type(model.lm_head) is nnx.Linear  # outside the blocks: untouched
  logits = model(jnp.asarray(calib))
  assert float_gap < 1e-4
  np.testing.assert_allclose(logits, zoo_logits, rtol=0, atol=2 * float_gap + 1e-6)


class _Tap:
  """Records the input of a linear in a plain (un-jitted) forward, then calls it."""

  def __init__(self, inner, store, key):
    self.inner, self.store, self.key = inner, store, key

  def __call__(self, x):
    self.store[self.key] = np.asarray(x, np.float64)
    return self.inner(x)


def _oracle_inputs(block, h):
  """Every linear's input [B, T, d_in] (einsum inputs flattened), un-jitted, in float64."""
  store = {}
  for a, b in LINEARS:
    parent = getattr(block, a)
    setattr(parent, b, _Tap(getattr(parent, b), store, b))
  block(h)
  for a, b in LINEARS:
    parent = getattr(block, a)
    setattr(parent, b, getattr(parent, b).inner)
  return {k: x.reshape(x.shape[0], x.shape[1], -1) for k, x in store.items()}


def test_intercepted_hessians_equal_2xxt_over_n(calib):
  model = td.make_decoder()
  block = model.layers[0]
  acts = calibrate.block_inputs(model, calib, td.embed, BATCH)
  paths = [(a, b) for a, b in LINEARS]
  classes = calibrate.input_classes(block, calibrate.call_block, acts[0], paths)
  assert classes == [[("self_attn", p) for p in ("q_proj", "k_proj", "v_proj")],
                     [("self_attn", "o_proj")], [("mlp", "gate_proj"), ("mlp", "up_proj")],
                     [("mlp", "down_proj")]]
  reps = {cls[0]: ".".join(cls[0]) for cls in classes}
  hessians = calibrate.group_hessians(block, calibrate.call_block, acts, reps)
  inputs = _oracle_inputs(block, jnp.concatenate(acts))
  for rep, H in hessians.items():
    X = inputs[rep[1]]
    tokens = X.reshape(-1, X.shape[-1])
    want = 2.0 / X.shape[0] * tokens.T @ tokens
    np.testing.assert_allclose(H, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(),
                               err_msg=str(rep))
  # k and v share q's input: their oracle Hessians are the same matrix.
  np.testing.assert_array_equal(inputs["q_proj"], inputs["k_proj"])


def test_compiles_once_per_block_structure(calib):
  traces = []

  def block_call(block, h):  # runs only when traced: counts the compiled programs
    traces.append(1)
    return block(h)

  quantize_nnx(td.make_decoder(), calib, embed=td.embed, block_call=block_call, method="rtn",
               knobs={"bits": 4}, batch_size=BATCH)
  # per block one shape-only trace (input classes); shared by both blocks: 4 group
  # captures and 1 propagation program.
  assert len(traces) == 2 + 4 + 1


def _kernels(module):
  return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module))}


def test_linears_outside_the_pattern_or_excluded_stay_unquantized(calib):
  original = td.make_decoder()
  model = td.make_decoder()
  out = quantize_nnx(model, calib, blocks="layers.0", embed=td.embed, method="rtn",
                     knobs={"bits": 4}, quant={"exclude": [r"mlp\.down_proj$"]})
  assert {r["block"] for r in out.records} == {"layers.0"}
  assert "layers.0.mlp.down_proj" not in out.qweights and len(out.qweights) == 6
  assert type(model.layers[0].mlp.down_proj) is nnx.Einsum
  for kept in (lambda m: m.layers[1], lambda m: m.layers[0].mlp.down_proj,
               lambda m: m.lm_head, lambda m: m.embed_tokens):
    got, want = _kernels(kept(model)), _kernels(kept(original))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_blocks_callable_equals_pattern(calib):
  by_pattern = quantize_nnx(td.make_decoder(), calib, embed=td.embed, method="rtn",
                            knobs={"bits": 4})
  by_callable = quantize_nnx(td.make_decoder(), calib, embed=td.embed, method="rtn",
                             knobs={"bits": 4}, blocks=lambda m: list(m.layers))
  assert by_pattern.qweights.keys() == by_callable.qweights.keys()
  for name, qw in by_pattern.qweights.items():
    np.testing.assert_array_equal(by_callable.qweights[name].codes, qw.codes)


def test_no_matching_blocks_is_a_one_line_error(calib):
  with pytest.raises(ValueError, match=r"no blocks match pattern 'decoder\.\*'") as e:
    quantize_nnx(td.make_decoder(), calib, embed=td.embed, blocks="decoder.*")
  assert "\n" not in str(e.value)


def test_block_inputs_given_directly(calib):
  model = td.make_decoder()
  h = np.asarray(model.embed_tokens(jnp.asarray(calib)))
  direct = quantize_nnx(td.make_decoder(), h, method="rtn", knobs={"bits": 4})
  embedded = quantize_nnx(td.make_decoder(), calib, embed=td.embed, method="rtn",
                          knobs={"bits": 4})
  for name, qw in embedded.qweights.items():
    np.testing.assert_array_equal(direct.qweights[name].codes, qw.codes)


def test_without_true_sequential_every_hessian_is_from_the_unquantized_block(calib):
  original = td.make_decoder()
  inputs = _oracle_inputs(original.layers[0], original.embed_tokens(jnp.asarray(calib)))
  out = quantize_nnx(td.make_decoder(), calib, blocks="layers.0", embed=td.embed,
                     quant={"true_sequential": False, "knobs": KNOBS,
                            "rules": [{"pattern": r"o_proj$", "method": "rtn"}]},
                     batch_size=BATCH)
  records = {r["module"]: r for r in out.records}
  assert records["layers.0.self_attn.o_proj"]["method"] == "rtn"
  cfg = knobs_lib.apply(api.default_config("gptq"), **KNOBS)
  for a, b in [("self_attn", "q_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]:
    X = inputs[b].reshape(-1, inputs[b].shape[-1])
    H = jnp.asarray(2.0 / NSAMPLES * X.T @ X, jnp.float32)
    W = weight_of(getattr(getattr(original.layers[0], a), b))
    direct = float(api.solve("gptq", W, H, cfg).objective)
    np.testing.assert_allclose(records[f"layers.0.{a}.{b}"]["objective"], direct, rtol=1e-4)
