"""A tiny Llama quantized by the pipeline with `solve_devices=N` equals the one-device run: every
packed array of every linear bit for bit, and the logged objectives (run on N CPU devices).

Also checks that the shards of the sharded run really ran on N distinct devices.
"""

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.distributed import solve as dsolve
from cdquant_jax.models import registry
from cdquant_jax.pipeline.config import run_config_from_dict
from cdquant_jax.pipeline.sequential import quantize_loaded

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 61}
KNOBS = {"gptq": {"bits": 3, "group_size": 16}, "cd": {"bits": 3, "group_size": 16},
         "spqr": {"bits": 3, "group_size": 16}}
USED: set[int] = set()


def record_devices():
  """Wraps dsolve._solve_shard to collect the ids of the devices shards ran on."""
  solve_shard = dsolve._solve_shard  # pylint: disable=protected-access

  def recording(method, W_rows, H, cfg, device, tau_abs, layer):
    USED.add(device.id)
    return solve_shard(method, W_rows, H, cfg, device, tau_abs, layer)

  dsolve._solve_shard = recording  # pylint: disable=protected-access


def run(model, params, ids, method, out, solve_devices):
  cfg = run_config_from_dict({
      "output_dir": out, "checkpoint": "none", "solve_devices": solve_devices,
      "quant": {"method": method, "knobs": KNOBS[method]},
      "calibration": {"nsamples": len(ids), "seqlen": ids.shape[1]}})
  return quantize_loaded(cfg, model, params, ids, progress=False)


def arrays(qweights):
  return {(name, k): np.asarray(v) for name, qw in qweights.items()
          for k, v in vars(qw).items() if isinstance(v, jax.Array)}


def main(n_devices, methods):
  assert jax.local_device_count() == n_devices
  model = registry.model_from_hf_config(TINY)
  params = jax.device_get(model.init_params(jax.random.key(0), scale=0.3))
  ids = np.asarray(jax.random.randint(jax.random.key(1), (16, 16), 0, 61), np.int32)
  record_devices()
  for method in methods:
    with tempfile.TemporaryDirectory() as tmp:
      one = run(model, params, ids, method, f"{tmp}/one", None)
      USED.clear()
      split = run(model, params, ids, method, f"{tmp}/split", n_devices)
    assert USED == set(range(n_devices)), (method, USED)
    a, b = arrays(one.qweights), arrays(split.qweights)
    assert a.keys() == b.keys() and a, method
    for key, value in a.items():
      assert value.dtype == b[key].dtype and np.array_equal(value, b[key]), (method, key)
    assert [r["objective"] for r in one.records] == [r["objective"] for r in split.records]
    print(f"{method}: {len(a)} arrays identical on {n_devices} devices")


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2].split(","))
