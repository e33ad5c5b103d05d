"""The tune step (`pipeline.tune`) on a tiny random Llama.

Tokens are sampled from the unquantized model itself (as in test_sequential.py). The checks:
the held-out error never rises (and does fall with a sane learning rate), codes and the format
never change, stored values are exactly their storage dtypes, the exported model is the
evaluated one, each parameter family moves only its own fields, and the gradient of the loss
agrees with central finite differences of an independent recomputation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdquant_jax import config as config_lib
from cdquant_jax.models import registry
from cdquant_jax.models.base import default_positions
from cdquant_jax.models.params import get_path
from cdquant_jax.pipeline import capture, checkpoint, export, tune
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded
from cdquant_jax.quant import qweight

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}
SEQLEN = 16
NSAMPLES = 24
SPQR_KNOBS = {"bits": 3, "group_size": 16, "qq_group_size": 8}
# What each family may change in a packed SpQR weight (qq stats: second-level stats).
FAMILY_FIELDS = {"scales": {"scale_qq_scale", "scale_qq_zero"},
                 "zeros": {"zero_qq_scale", "zero_qq_zero"},
                 "outliers": {"outlier_values"}, "norms": set()}


@pytest.fixture(scope="module")
def tiny():
  model = registry.model_from_hf_config(TINY)
  params = model.init_params(jax.random.key(0), scale=0.3)
  ids = np.asarray(model.generate(params, jnp.zeros((NSAMPLES, 1), jnp.int32), SEQLEN - 1,
                                  greedy=False, key=jax.random.key(1)))
  return model, params, ids


def _run(tmp_path, name, method="gptq", knobs=None, tune_cfg=None, **fields):
  data = {"output_dir": str(tmp_path / name),
          "quant": {"method": method, "knobs": knobs or {"bits": 3, "group_size": 16}},
          "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN}, "forward_batch_size": 8,
          **fields}
  if tune_cfg is not None:
    data["tune"] = {"enabled": True, "holdout_fraction": 0.25, **tune_cfg}
  return run_config_from_dict(data)


# ----------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("tune_cfg, match", [
    ({"steps": 5}, r"\['steps'\] set but tune.enabled is false"),
    ({"enabled": True, "holdout_fraction": 0.01}, "holds out 0 of calibration.nsamples=24"),
    ({"enabled": True, "params": ["outliers"]}, "no method of the run .* has tunable outliers"),
    ({"enabled": True, "params": ["scales", "zeros"]}, "tunable zeros"),
    ({"enabled": True, "params": ["scales", "scales"]}, "distinct families"),
    ({"enabled": True, "learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_config_rejects_what_cannot_be_honoured(tmp_path, tune_cfg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    run_config_from_dict({"output_dir": str(tmp_path), "tune": tune_cfg,
                          "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN}})


def test_config_accepts_spqr_families(tmp_path):
  run = _run(tmp_path, "ok", "spqr", SPQR_KNOBS, {"params": list(tune.FAMILIES)})
  assert run.tune.params == tune.FAMILIES and run.tune.holdout_windows(NSAMPLES) == 6
  # A rule switching some modules to SpQR makes outliers tunable too.
  run_config_from_dict({"output_dir": str(tmp_path), "calibration": {"nsamples": NSAMPLES},
                        "quant": {"rules": [{"pattern": "down_proj", "method": "spqr"}]},
                        "tune": {"enabled": True, "params": ["outliers"]}})


# ----------------------------------------------------------------------------------------------
# The pipeline with tuning.


@pytest.fixture(scope="module")
def tuned_runs(tiny, tmp_path_factory):
  """(untuned run, tuned run) of GPTQ 3-bit with scales and norms tuned."""
  model, params, calib = tiny
  tmp = tmp_path_factory.mktemp("tune")
  plain = quantize_loaded(_run(tmp, "plain"), model, params, calib, progress=False)
  run = _run(tmp, "tuned", tune_cfg={"steps": 30, "learning_rate": 3e-3, "eval_every": 3})
  return plain, run, quantize_loaded(run, model, params, calib, progress=False)


def test_heldout_error_never_rises_and_falls(tuned_runs):
  _, _, tuned = tuned_runs
  blocks = {r["layer"]: r["tune"] for r in tuned.records}
  assert sorted(blocks) == [0, 1]
  for rec in blocks.values():
    assert rec["heldout_mse_after"] <= rec["heldout_mse_before"]
    assert rec["heldout_windows"] == 6 and rec["steps_run"] >= 1
  assert any(r["heldout_mse_after"] < 0.99 * r["heldout_mse_before"] for r in blocks.values())
  assert tuned.metrics["tune"]["blocks"] == 2
  assert tuned.metrics["timing"]["tune_seconds"] > 0


def test_codes_and_format_unchanged_scales_moved(tuned_runs):
  plain, _, tuned = tuned_runs
  moved = 0
  for name, qw in plain.qweights.items():
    got = tuned.qweights[name]
    assert got.meta == qw.meta
    qweight.check_arrays(got, name)  # storage dtypes as the format says
    if name.startswith("layers.0."):  # block 1's inputs (and so its solve) differ once tuned
      np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(qw.codes), err_msg=name)
      np.testing.assert_array_equal(np.asarray(got.zero), np.asarray(qw.zero), err_msg=name)
      moved += not np.array_equal(np.asarray(got.scale), np.asarray(qw.scale))
  assert moved > 0


def test_stored_values_are_their_storage_dtype_and_written_back(tuned_runs, tiny):
  model, _, _ = tiny
  _, _, tuned = tuned_runs
  for name, qw in tuned.qweights.items():
    dtype = {"f16": np.float16, "f32": np.float32}[qw.meta.scale_format]
    assert np.asarray(qw.scale).dtype == dtype
    i, path = int(name.split(".")[1]), tuple(name.split(".")[2:])
    written = get_path(model.layer_params(tuned.params, i), path)["weight"]
    np.testing.assert_array_equal(np.asarray(written), np.asarray(qweight.dequantize(qw)))


def test_export_reproduces_the_evaluated_tuned_model(tuned_runs, tiny):
  model, params, calib = tiny
  plain, run, tuned = tuned_runs
  _, loaded, _ = export.load_quantized_model(run.output_dir)
  ids = jnp.asarray(calib[:8])
  ours = capture.block_logits_fn(model, jax.device_put(tuned.params))(ids)
  theirs = capture.block_logits_fn(model, jax.device_put(export.dense_params(loaded)))(ids)
  np.testing.assert_array_equal(np.asarray(theirs), np.asarray(ours))
  norm = ("input_layernorm", "weight")
  tuned_norm = get_path(model.layer_params(tuned.params, 0), norm)
  assert not np.array_equal(np.asarray(tuned_norm),
                            np.asarray(get_path(model.layer_params(params, 0), norm)))
  np.testing.assert_array_equal(np.asarray(get_path(model.layer_params(loaded, 0), norm)),
                                np.asarray(tuned_norm))
  plain_logits = capture.block_logits_fn(model, jax.device_put(plain.params))(ids)
  assert not np.array_equal(np.asarray(plain_logits), np.asarray(ours))


class Interrupt(Exception):
  pass


def _stop_after_block_0(i):
  if i == 0:
    raise Interrupt(i)


def test_resume_restores_tuned_norms_bit_identically(tuned_runs, tiny, tmp_path):
  model, params, calib = tiny
  _, run, full = tuned_runs
  run = dataclasses.replace(run, output_dir=str(tmp_path / "resumed"))
  with pytest.raises(Interrupt):
    quantize_loaded(run, model, params, calib, progress=False, after_block=_stop_after_block_0)
  resumed = quantize_loaded(run, model, params, calib, progress=False, resume=True)
  for name, qw in full.qweights.items():
    for field, array in qw.arrays().items():
      np.testing.assert_array_equal(np.asarray(resumed.qweights[name].arrays()[field]),
                                    np.asarray(array), err_msg=f"{name}.{field}")
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not checkpoint.load_state(run.output_dir)


# ----------------------------------------------------------------------------------------------
# `tune_block` on one solved SpQR block.


@pytest.fixture(scope="module")
def spqr_block(tiny, tmp_path_factory):
  """Block 0 solved by SpQR (qq stats, outliers; only block 0 quantized): (layer params,
  {name: QuantizedWeight}, paths, inputs [N, T, D], full-precision targets [N, T, D])."""
  model, params, calib = tiny
  run = run_config_from_dict({
      "output_dir": str(tmp_path_factory.mktemp("spqr") / "spqr"),
      "quant": {"method": "spqr", "knobs": SPQR_KNOBS, "include": [r"^layers\.0\."]},
      "calibration": {"nsamples": NSAMPLES, "seqlen": SEQLEN}})
  result = quantize_loaded(run, model, params, calib, progress=False)
  ids = jnp.asarray(calib)
  h = model.embed(params, ids, default_positions(ids))
  fp = model.layer_params(params, 0)
  targets = model.block(fp, h, default_positions(ids), 0)[0]
  paths = {n: tuple(n.split(".")[2:]) for n in result.qweights}
  assert all(qw.meta.nnz > 0 and qw.meta.scale_format == "qq" for qw in result.qweights.values())
  return (model.layer_params(result.params, 0), result.qweights, paths, np.asarray(h),
          np.asarray(targets))


def _tune_cfg(**fields):
  return tune.TuneConfig(enabled=True, holdout_fraction=0.25, **{"steps": 12, "eval_every": 2,
                                                                 "learning_rate": 3e-3, **fields})


@pytest.mark.parametrize("family", tune.FAMILIES)
def test_each_family_changes_only_its_parameters(tiny, spqr_block, family):
  model = tiny[0]
  layer_params, qweights, paths, h, t = spqr_block
  new_params, new_qw, record = tune.tune_block(_tune_cfg(params=(family,)), model, layer_params,
                                               qweights, paths, [h], [t], 0)
  assert record["heldout_mse_after"] < record["heldout_mse_before"]
  changed = set()
  for name, qw in qweights.items():
    assert new_qw[name].meta == qw.meta
    for field, array in qw.arrays().items():
      if not np.array_equal(np.asarray(new_qw[name].arrays()[field]), np.asarray(array)):
        changed.add(field)
  assert changed <= FAMILY_FIELDS[family] and bool(changed) == (family != "norms"), changed
  norms = tune.norm_paths(layer_params)
  norms_changed = [p for p in norms if not np.array_equal(np.asarray(get_path(new_params, p)),
                                                          np.asarray(get_path(layer_params, p)))]
  assert bool(norms_changed) == (family == "norms")


def test_a_harmful_learning_rate_returns_the_untuned_block(tiny, spqr_block):
  model = tiny[0]
  layer_params, qweights, paths, h, t = spqr_block
  new_params, new_qw, record = tune.tune_block(
      _tune_cfg(params=tune.FAMILIES, learning_rate=10.0, patience=0), model, layer_params,
      qweights, paths, [h], [t], 0)
  assert record["best_step"] == 0 and record["steps_run"] == 12
  assert record["heldout_mse_after"] == record["heldout_mse_before"]
  for name, qw in qweights.items():
    for field, array in qw.arrays().items():
      np.testing.assert_array_equal(np.asarray(new_qw[name].arrays()[field]), np.asarray(array))
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(layer_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _reference_loss(model, layer_params, qweights, paths, theta, h, t):
  """The loss recomputed from scratch: each weight rebuilt from its unpacked codes and θ's
  stats (the SpQR two-level formula of the qweight docstring, not `qweight.dequantize`), the
  model's plain block, mean squared error."""
  from cdquant_jax.quant import packing  # pylint: disable=import-outside-toplevel
  for name, qw in qweights.items():
    m, fields = qw.meta, theta["qw"].get(name, {})
    get = lambda f: fields.get(f, jnp.asarray(getattr(qw, f), jnp.float32))

    def stat(which):
      codes = packing.unpack_codes(getattr(qw, which), m.stat_bits(which))[:m.n_groups]
      codes = codes.astype(jnp.float32)
      # [n_groups, N / qq] -> [n_groups, N]
      scale = jnp.repeat(get(f"{which}_qq_scale")[:m.n_groups], m.qq_groupsize, axis=1)
      zero = jnp.repeat(get(f"{which}_qq_zero")[:m.n_groups], m.qq_groupsize, axis=1)
      return scale * (codes - zero)

    codes = packing.unpack_codes(qw.codes, m.bits)[:m.d_in].astype(jnp.float32)  # [d_in, N]
    # [n_groups, N] -> [d_in, N] (group of storage row k = k // G)
    s, z = (jnp.repeat(stat(w), m.group_size, axis=0) for w in ("scale", "zero"))
    dense = (s * (codes - z)).T  # [N, d_in], columns in storage order
    W = dense if qw.perm is None else jnp.zeros_like(dense).at[:, qw.perm].set(dense)
    rows = np.repeat(np.arange(m.d_out), np.diff(np.asarray(qw.outlier_row_offsets)))
    W = W.at[rows, np.asarray(qw.outlier_col_idx)].add(get("outlier_values"))
    layer_params = _set(layer_params, paths[name] + ("weight",), W)
  for path, value in theta["norms"].items():
    layer_params = _set(layer_params, path, value)
  out = model.block(layer_params, h, default_positions(h[..., 0]), 0)[0]
  return jnp.mean((out - t) ** 2)


def _set(tree, path, value):
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def test_gradient_matches_finite_differences_of_a_direct_recomputation(tiny, spqr_block):
  model = tiny[0]
  layer_params, qweights, paths, h, t = spqr_block
  h, t = jnp.asarray(h[:8]), jnp.asarray(t[:8])
  theta = tune.initial_theta(layer_params, qweights, tune.FAMILIES)
  loss, grad = jax.value_and_grad(tune.tune_loss)(theta, model, layer_params, qweights, paths,
                                                  h, t, 0)
  ref = lambda th: _reference_loss(model, layer_params, qweights, paths, th, h, t)
  np.testing.assert_allclose(float(loss), float(ref(theta)), rtol=1e-5)
  leaves, treedef = jax.tree.flatten(theta)
  key = jax.random.key(3)
  for j in range(len(leaves)):  # one random direction per leaf, the others fixed
    d = jax.random.normal(jax.random.fold_in(key, j), leaves[j].shape)
    d = d * (1e-3 * (float(jnp.max(jnp.abs(leaves[j]))) + 1e-3) / float(jnp.max(jnp.abs(d))))
    shifted = lambda sign: jax.tree.unflatten(
        treedef, [x + sign * d if i == j else x for i, x in enumerate(leaves)])
    fd = (float(ref(shifted(1.0))) - float(ref(shifted(-1.0)))) / 2
    ad = float(jnp.vdot(jax.tree.leaves(grad)[j], d))
    assert ad == pytest.approx(fd, rel=0.05, abs=1e-7 * float(loss)), jax.tree_util.keystr(
        jax.tree_util.tree_flatten_with_path(theta)[0][j][0])
