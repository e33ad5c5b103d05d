"""Sharded Hessians equal the one-device pipeline Hessian on every mesh shape of the devices.

Tolerance: both are f32 sums of the same n_tok products in different orders, so each differs
from the exact (float64) value by at most γ · (2/n) Σ_t |x_ti| |x_tj| with γ = (n_tok + 2) ε
(recursive summation bound, ε = 2^-24, plus the rounding of the products and of the scaling),
and from each other by at most twice that.
"""

import sys

import jax
import numpy as np

from cdquant_jax.distributed.hessian import sharded_hessian
from cdquant_jax.distributed.mesh import MeshConfig, make_mesh
from cdquant_jax.solvers.hessian import hessian_from_inputs


def check(X, batches, mesh_shape):
  mesh = make_mesh(MeshConfig(data=mesh_shape[0], model=mesh_shape[1]))
  H = sharded_hessian(batches, mesh)
  n = X.shape[0]
  X64 = X.reshape(-1, X.shape[-1]).astype(np.float64)
  exact = 2.0 / n * X64.T @ X64
  gamma = (X64.shape[0] + 2) * 2.0 ** -24
  bound = gamma * 2.0 / n * np.abs(X64).T @ np.abs(X64)
  one = np.asarray(hessian_from_inputs(X))
  got = np.asarray(H)
  assert got.shape == one.shape and got.dtype == np.float32, (got.shape, got.dtype)
  assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)
  assert np.all(np.abs(got - one) <= 2 * bound), np.max(np.abs(got - one) / bound)
  # H's columns live on the model axis, replicated over data.
  assert len(H.sharding.device_set) == mesh_shape[0] * mesh_shape[1]
  rel = np.linalg.norm(got - one) / np.linalg.norm(one)
  print(f"mesh {mesh_shape}: max |H - H_1dev| / bound = "
        f"{np.max(np.abs(got - one) / np.maximum(bound, 1e-30)):.3g}, rel Frobenius {rel:.2e}")


def main(shapes):
  n_dev = jax.device_count()
  rng = np.random.default_rng(0)
  # 10 sequences (not a multiple of 4: padded), 8 tokens, d_in = 22 (padded on the model axis).
  X = (rng.standard_normal((10, 8, 22)) * rng.uniform(0.1, 3.0, 22)).astype(np.float32)
  X[:, :, 5] = 0.0  # a dead feature stays exactly zero
  for shape in shapes:
    assert shape[0] * shape[1] == n_dev
    check(X, X, shape)                       # one array
    check(X, [X[:3], X[3:7], X[7:]], shape)  # uneven batches
    H = np.asarray(sharded_hessian(X, make_mesh(MeshConfig(data=shape[0], model=shape[1]))))
    assert np.all(H[5] == 0) and np.all(H[:, 5] == 0)


if __name__ == "__main__":
  main([tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]])
