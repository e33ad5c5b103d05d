"""MeshConfig validation and parsing; make_mesh on the one in-process device."""

import jax
import pytest

from cdquant_jax.config import ConfigError
from cdquant_jax.distributed.mesh import AXES, MeshConfig, make_mesh


@pytest.mark.parametrize("kwargs,field", [(dict(data=0), "mesh.data"),
                                          (dict(data=-2), "mesh.data"),
                                          (dict(data="all"), "mesh.data"),
                                          (dict(data=True), "mesh.data"),
                                          (dict(model=0), "mesh.model"),
                                          (dict(model=1.5), "mesh.model")])
def test_bad_sizes_name_the_field_and_value(kwargs, field):
  with pytest.raises(ConfigError, match=field) as e:
    MeshConfig(**kwargs)
  assert repr(next(iter(kwargs.values()))) in str(e.value)


def test_sizes_auto_and_divisibility():
  assert MeshConfig().sizes(8) == (8, 1)
  assert MeshConfig(model=2).sizes(8) == (4, 2)
  assert MeshConfig(data=2, model=2).sizes(8) == (2, 2)  # the first 4 of 8 devices
  with pytest.raises(ConfigError, match="mesh.model=3 must divide the device count 8"):
    MeshConfig(model=3).sizes(8)
  with pytest.raises(ConfigError, match="mesh.data=3 x mesh.model=1"):
    MeshConfig(data=3).sizes(8)


def test_parse():
  assert MeshConfig.parse("data=8,model=1") == MeshConfig(data=8, model=1)
  assert MeshConfig.parse("model=2") == MeshConfig(data="auto", model=2)
  assert MeshConfig.parse("data=auto") == MeshConfig()
  assert MeshConfig.parse("model=2,shard_weights=true") == MeshConfig(model=2,
                                                                      shard_weights=True)
  for bad, match in [("dat=8", "expected data=N,model=M"), ("data=x", "mesh.data must be"),
                     ("data=0", "mesh.data must be a positive"),
                     ("model=2,shard_weights=1", "mesh.shard_weights must be true or false"),
                     ("shard_weights=true", "needs mesh.model > 1, got model=1")]:
    with pytest.raises(ConfigError, match=match):
      MeshConfig.parse(bad)


def test_make_mesh_one_device():
  mesh = make_mesh(MeshConfig())
  assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 1, "model": 1}
  assert list(mesh.devices.flat) == jax.devices()[:1]


def test_from_a_yaml_mapping():
  """The run config's future `mesh:` section goes through the one config loader."""
  from cdquant_jax import config as config_lib
  assert config_lib.from_dict(MeshConfig, {"data": "auto", "model": 2}, where="mesh") == \
      MeshConfig(model=2)
  with pytest.raises(ConfigError, match="mesh: unknown field"):
    config_lib.from_dict(MeshConfig, {"dta": 1}, where="mesh")
