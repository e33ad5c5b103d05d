"""`cdquant plan --config X.yaml [--mesh data=8,model=1] [--devices N] [--gflops G]
[--model NAME] [--set a.b=c ...] [--markdown]`: per-device memory, flops and time of a run.

Nothing is loaded or allocated: the model's shapes come from `jax.eval_shape`
(`distributed.planner`), so a 70B plan runs on a laptop. --model overrides model.path with a
known size (llama2-7b, llama3-8b, llama3-70b), a hub id of one, a local HF directory or a .gguf
file. --devices defaults to this machine's device count; --gflops to a measured f32 matmul
throughput of the first device. Bad input ends with one stderr line and exit code 2.
"""

from __future__ import annotations

import argparse

from cdquant_jax.cli import errors


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, metavar="YAML", help="a run config")
  p.add_argument("--set", action="append", default=[], metavar="A.B=C",
                 help="override a config field (repeatable)")
  p.add_argument("--mesh", default="data=auto,model=1", metavar="data=N,model=M",
                 help="mesh sizes (data=auto: every device the model axis leaves)")
  p.add_argument("--devices", type=int, default=None, metavar="N",
                 help="devices to plan for (default: this machine's)")
  p.add_argument("--gflops", type=float, default=None, metavar="G",
                 help="per-device f32 GFLOP/s (default: measured with a 1024^3 matmul)")
  p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                 help="model to plan for instead of the config's model.path")
  p.add_argument("--markdown", action="store_true", help="print a markdown table")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import jax
  from cdquant_jax.distributed import planner
  from cdquant_jax.distributed.mesh import MeshConfig
  from cdquant_jax.pipeline.config import load_run_config
  with errors.about(f"--mesh {args.mesh}"):
    mesh = MeshConfig.parse(args.mesh)
  errors.require(args.devices is None or args.devices > 0,
                 f"--devices must be positive, got {args.devices}")
  errors.require(args.gflops is None or args.gflops > 0,
                 f"--gflops must be positive, got {args.gflops}")
  with errors.about(args.config):
    run_cfg = load_run_config(args.config, args.set)
  path = args.model or run_cfg.model.path
  model = planner.model_for(path)
  n_devices = args.devices or jax.device_count()
  with errors.about(f"--mesh {args.mesh} on {n_devices} devices"):
    mesh.sizes(n_devices)
  gflops = args.gflops or planner.measure_gflops()
  result = planner.plan(run_cfg, model, mesh, n_devices, gflops=gflops,
                        runtime_bytes=planner.runtime_overhead_bytes(), name=path)
  if args.markdown:
    print(planner.markdown([result]))
  else:
    for key, value in result.row().items():
      print(f"{key:>16}  {value}")
    print(f"{'gflops':>16}  {gflops:.1f} per device (memory in GiB per device)")
  return 0
