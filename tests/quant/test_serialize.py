"""Safetensors serialisation: exact round trip; truncated / corrupt files name file and tensor."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from cdquant_jax.quant.qweight import pack_result
from cdquant_jax.quant.serialize import (QuantFileError, load_quantized, read_metadata,
                                         save_quantized)
from tests.quant.qweight_fixtures import spqr_like_result


@pytest.fixture(scope="module")
def weights():
  rng = np.random.default_rng(0)
  spqr = pack_result(spqr_like_result(rng, bits=3))
  other = pack_result(spqr_like_result(rng, bits=4, d_in=64, G=32, quantize_zero=False,
                                       act_order=False, outlier_share=0.0))
  return {"layers.0.attn.q_proj": spqr, "layers.0.mlp.up_proj": other}


@pytest.fixture
def saved(tmp_path, weights):
  path = tmp_path / "model.safetensors"
  save_quantized(path, weights, extra={"model": "synthetic"})
  return path


def _header(path):
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n]), 8 + n


def test_round_trip_is_exact(saved, weights):
  loaded = load_quantized(saved)
  assert set(loaded) == set(weights)
  for name, qw in weights.items():
    assert loaded[name].meta == qw.meta
    arrays = loaded[name].arrays()
    assert set(arrays) == set(qw.arrays())
    for field, a in qw.arrays().items():
      b = np.asarray(arrays[field])
      assert b.dtype == np.asarray(a).dtype and b.shape == a.shape
      assert np.array_equal(b.view(np.uint8), np.asarray(a).view(np.uint8)), (name, field)
  assert read_metadata(saved)["extra"] == {"model": "synthetic"}


def test_file_is_standard_safetensors(saved, weights):
  tensors = safetensors.numpy.load_file(str(saved))
  qw = weights["layers.0.attn.q_proj"]
  np.testing.assert_array_equal(tensors["layers.0.attn.q_proj.codes"], np.asarray(qw.codes))
  assert tensors["layers.0.attn.q_proj.outlier_values"].dtype == np.float16


def test_truncated_file_names_file_and_tensor(saved):
  header, start = _header(saved)
  last = max((k for k in header if k != "__metadata__"),
             key=lambda k: header[k]["data_offsets"][1])
  data = saved.read_bytes()
  saved.write_bytes(data[:len(data) - 3])
  with pytest.raises(QuantFileError, match="truncated") as err:
    load_quantized(saved)
  assert str(saved) in str(err.value) and repr(last) in str(err.value)


def test_truncated_header_names_file(saved):
  saved.write_bytes(saved.read_bytes()[:100])
  with pytest.raises(QuantFileError, match="truncated") as err:
    load_quantized(saved)
  assert str(saved) in str(err.value)


def test_corrupt_tensor_names_file_and_tensor(saved):
  header, start = _header(saved)
  key = "layers.0.mlp.up_proj.scale_qq_scale"
  begin, end = header[key]["data_offsets"]
  data = bytearray(saved.read_bytes())
  data[start + (begin + end) // 2] ^= 0x10
  saved.write_bytes(bytes(data))
  with pytest.raises(QuantFileError, match="checksum") as err:
    load_quantized(saved)
  assert str(saved) in str(err.value) and repr(key) in str(err.value)


def test_wrong_dtype_names_the_tensor(saved):
  tensors = safetensors.numpy.load_file(str(saved))
  key = "layers.0.attn.q_proj.codes"
  tensors[key] = tensors[key].view(np.int32)
  safetensors.numpy.save_file(tensors, str(saved), metadata=_header(saved)[0]["__metadata__"])
  with pytest.raises(QuantFileError, match=r"stored as I32.*uint32") as err:
    load_quantized(saved)
  assert repr(key) in str(err.value)


def test_not_our_format(tmp_path):
  path = tmp_path / "plain.safetensors"
  safetensors.numpy.save_file({"w": np.zeros((2, 2), np.float32)}, str(path))
  with pytest.raises(QuantFileError, match="plain.safetensors"):
    load_quantized(path)
