"""Scale-out with jax.sharding: the mesh, sharded Hessians, row-sharded solves, the planner.

Public API:
  MeshConfig(data="auto", model=1), make_mesh(cfg, devices) -> Mesh        (mesh.py)
  sharded_hessian(X or batches, mesh) -> H [d_in, d_in] f32                  (hessian.py)
  solve_sharded(method, W, H, cfg, mesh_or_devices) -> SolveResult; SHARDABLE (solve.py)
  merge.merge(parts, W, H) -> SolveResult (the module, not re-exported: the name would hide it)
  placement: run_mesh, shard_rows, row_mask, replicate, local_copy, solve_devices — where a
    mesh run's arrays live (`RunConfig.mesh`; used by pipeline.capture and pipeline.sequential)
  multihost: ProcessGroup, initialize, is_writer — `jax.distributed` runs (`cdquant quantize
    --coordinator --num-processes --process-id`)
The planner (`distributed.planner`, `cdquant plan`) imports the pipeline, so it is not imported
here: the pipeline can import this package without a cycle.
"""

from cdquant_jax.distributed.hessian import sharded_hessian
from cdquant_jax.distributed.mesh import MeshConfig
from cdquant_jax.distributed.mesh import make_mesh
from cdquant_jax.distributed.solve import SHARDABLE
from cdquant_jax.distributed.solve import solve_sharded

__all__ = ["MeshConfig", "SHARDABLE", "make_mesh", "sharded_hessian", "solve_sharded"]
