"""The model directory's params.safetensors is written one tensor at a time: read back by the
safetensors library itself, and never holding more than one block of a lazy layer sequence."""

import collections.abc
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from cdquant_jax import io_utils
from cdquant_jax.pipeline import export


def _arrays(rng):
  return {
      "a.weight": rng.normal(size=(3, 5)).astype(np.float32),
      "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
      "c.scalar": np.array(1.5, np.float16),
      "d.codes": rng.integers(0, 255, size=(2, 3, 4)).astype(np.uint8),
      "e.empty": np.zeros((0, 4), np.float32),
      "f.index": rng.integers(-9, 9, size=(5,)).astype(np.int32),
  }


def test_streamed_file_reads_back_with_safetensors(tmp_path, rng):
  arrays = _arrays(rng)
  specs = [(n, a.shape) for n, a in arrays.items()]
  path = tmp_path / "x.safetensors"
  io_utils.atomic_write_safetensors(path, specs, iter(arrays.values()), metadata={"k": "v"})
  back = load_file(path)
  assert set(back) == set(arrays)
  for name, a in arrays.items():
    assert back[name].dtype == a.dtype and back[name].shape == a.shape
    np.testing.assert_array_equal(back[name].reshape(-1).view(np.uint8),
                                  a.reshape(-1).view(np.uint8))
  with safe_open(path, "np") as f:
    assert f.metadata() == {"k": "v"}


def test_a_tensor_unlike_its_spec_is_refused_and_nothing_is_written(tmp_path):
  path = tmp_path / "x.safetensors"
  specs = [("a", (2,)), ("b", (3,))]
  with pytest.raises(ValueError, match=r"tensor b is float32\(4,\), expected shape \(3,\)"):
    io_utils.atomic_write_safetensors(path, specs, iter([np.zeros(2, np.float32),
                                                         np.zeros(4, np.float32)]))
  with pytest.raises(ValueError, match="1 tensors for the 2 named"):
    io_utils.atomic_write_safetensors(path, specs, iter([np.zeros(2, np.float32)]))
  with pytest.raises(ValueError, match="more tensors than the 2 named"):
    io_utils.atomic_write_safetensors(path, specs, iter([np.zeros(2), np.zeros(3), np.zeros(1)]))
  assert not list(tmp_path.iterdir())


def test_header_room_fits_the_longest_types(tmp_path):
  """The reserved header holds any dtype mix; the file is exactly header + data long."""
  specs = [("w" * 40, (1000, 1000)), ("b", (3,))]
  for arrays in ([np.zeros((1000, 1000), np.float64), np.zeros(3, bool)],
                 [np.zeros((1000, 1000), np.uint8), np.zeros(3, ml_dtypes.bfloat16)]):
    path = tmp_path / "x.safetensors"
    io_utils.atomic_write_safetensors(path, specs, iter(arrays))
    back = load_file(path)
    assert [back[n].dtype for n, _ in specs] == [a.dtype for a in arrays]
    room = int.from_bytes(path.read_bytes()[:8], "little")
    assert room % 8 == 0 and path.stat().st_size == 8 + room + sum(a.nbytes for a in arrays)


class _CountingLayers(collections.abc.Sequence):
  """Makes block i's arrays when indexed and counts how many of them are alive at once."""

  def __init__(self, blocks):
    self._blocks, self.live, self.most_live = blocks, 0, 0

  def __len__(self):
    return len(self._blocks)

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    block = {key: {"weight": p["weight"].copy()} for key, p in self._blocks[i].items()}
    for p in block.values():
      self.live += 1
      self.most_live = max(self.most_live, self.live)
      weakref.finalize(p["weight"], self._dropped)
    return block

  def _dropped(self):
    self.live -= 1


def test_model_params_file_holds_one_block_at_a_time(tmp_path, rng):
  blocks = [{"mlp": {"weight": rng.normal(size=(4, 3)).astype(np.float32)},
             "norm": {"weight": rng.normal(size=(3,)).astype(np.float32)}} for _ in range(6)]
  params = {"embed": {"weight": rng.normal(size=(5, 3)).astype(np.float32)}}
  layers = _CountingLayers(blocks)
  skip = {"layers.2.mlp.weight"}
  expected = export.flatten({**params, "layers": blocks})
  names = []
  for name, a in export.unquantized_tensors({**params, "layers": layers}, skip):
    np.testing.assert_array_equal(a, expected[name])
    names.append(name)
    del a
  assert layers.most_live == 2  # the arrays of one block (2 leaves), never two blocks'
  assert names == [n for n in expected if n not in skip]  # flatten's names and order

  layers.most_live = 0
  export.write_model_dir(str(tmp_path), _FakeModel({**params, "layers": blocks}),
                         {**params, "layers": layers}, {})
  assert layers.most_live == 2
  back = load_file(tmp_path / export.PARAMS_FILE)
  assert set(back) == set(expected)
  for name, a in expected.items():
    np.testing.assert_array_equal(back[name], a)


class _FakeModel:
  """What write_model_dir reads of a model: its config (model.json) and parameter shapes."""

  config: dict = {}

  def __init__(self, params):
    self._params = params

  def param_shapes(self, dtype):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), self._params)
