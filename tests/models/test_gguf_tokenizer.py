"""GGUF `llama` (SentencePiece) tokenizers: a tiny SentencePiece BPE model trained here, written
into a tiny GGUF the way llama.cpp's converter writes a SentencePiece vocabulary (pieces, scores,
types; bos / eos / unk ids), loaded by `registry.load_model` and compared on a set of strings
(spaces, digits, unicode the model never saw, i.e. byte fallback) with two references:

- sentencepiece itself (the model the vocabulary came from): same ids, same decoded text;
- transformers' GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`):
  same ids, except on text that starts with a space, where transformers' Metaspace pre-tokenizer
  skips the space prefix that SentencePiece and llama.cpp add (" hi" -> "▁hi", not "▁▁hi");
  for a Gemma 2 file (add_space_prefix false, transformers' GemmaTokenizer) on every string.

Text around a special token follows llama.cpp: each piece of text after a special token gets the
space prefix again, so the reference there is sentencepiece on each piece.
"""

import io
import random

import numpy as np
import pytest

from cdquant_jax.models import registry, tokenizer
from cdquant_jax.models.errors import ModelLoadError
from tests.models import hf_reference as ref

pytestmark = pytest.mark.hf
gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

WORDS = ("the quick brown fox jumps over the lazy dog hello world tokenizer piece merge score "
         "byte fallback llama gemma model weight quantization").split()
TEXTS = ["hello world", "the quick brown fox", "quantization of a llama model",
         "digits 1234567890 and 3.14", "a  b   c    d", "trailing spaces  ", "tab\tand\nnewline",
         "héllo wörld ñ 日本語 🙂", "CAPS Unseen ÄÖÜ", "x", "", " leading space",
         "  two leading spaces"]
LEADING_SPACE = tuple(t for t in TEXTS if t.startswith(" "))
THINK = "<think>"


def train_sentencepiece(add_dummy_prefix: bool = True):
  """A tiny SentencePiece BPE model with Llama's settings (byte fallback, identity
  normalization, spaces kept, digits split) and one user-defined symbol."""
  rng = random.Random(0)
  corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 99999)}"
            for _ in range(400)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0,
      user_defined_symbols=[THINK], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def llama_cpp_vocab(sp):
  """(tokens, scores, token types) as convert_hf_to_gguf.py `_create_vocab_sentencepiece`
  writes them (the user-defined symbol typed USER_DEFINED, as its added_tokens.json does)."""
  tokens, scores, types = [], [], []
  for i in range(sp.get_piece_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    if sp.is_unknown(i):
      types.append(tokenizer.UNKNOWN)
    elif sp.is_control(i):
      types.append(tokenizer.CONTROL)
    elif sp.is_unused(i):
      types.append(tokenizer.UNUSED)
    elif sp.is_byte(i):
      types.append(tokenizer.BYTE)
    else:
      types.append(tokenizer.USER_DEFINED if tokens[-1] == THINK else tokenizer.NORMAL)
  return tokens, scores, types


# GGUF architecture -> (transformers config class, model class, gguf arch)
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA),
         "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", gguf.MODEL_ARCH.GEMMA2)}


def write_gguf(sp, path, *, scores=None, model="llama", arch="llama", **flags) -> None:
  """A tiny random `arch` GGUF (tensors only so that the file loads) with sp's vocabulary;
  flags: tokenizer.ggml.{add_bos_token, add_eos_token, add_space_prefix} to write."""
  config_class, model_class, gguf_arch = ARCHS[arch]
  torch_model = ref.build_torch_model(
      config_class, model_class, vocab_size=sp.get_piece_size(), hidden_size=32,
      intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
  w = ref.gguf_writer(torch_model, arch, path)
  tokens, sp_scores, types = llama_cpp_vocab(sp)
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores(sp_scores if scores is None else scores)
  w.add_token_types(types)
  w.add_unk_token_id(sp.unk_id())
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  for key, value in flags.items():
    getattr(w, f"add_{key}")(value)
  names = gguf.get_tensor_name_map(gguf_arch, 1)
  for name, tensor in torch_model.state_dict().items():
    if name == "lm_head.weight":
      continue
    base, kind = name.rsplit(".", 1)
    w.add_tensor(f"{names.get_name(base)}.{kind}",
                 np.ascontiguousarray(tensor.detach().float().numpy()))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def sp():
  return train_sentencepiece()


@pytest.fixture(scope="module")
def gguf_dir(sp, tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
  write_gguf(sp, path)
  return path


def _ours(path):
  _, _, tok = registry.load_model(str(path), "float32")
  assert tok is not None
  return tok


def test_llama_tokenizer_matches_sentencepiece(sp, gguf_dir):
  tok = _ours(gguf_dir)
  for text in TEXTS:
    want = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False).ids == want, text
    assert tok.encode(text).ids == [sp.bos_id()] + want, text  # add_bos defaults to true
    assert tok.decode(want) == sp.decode(want) == text, text
  # the unseen characters went through byte fallback
  pieces = tok.encode("日本語 🙂", add_special_tokens=False).tokens
  assert any(p.startswith("<0x") for p in pieces)


def test_llama_tokenizer_matches_transformers_gguf_tokenizer(sp, gguf_dir):
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.AutoTokenizer.from_pretrained(str(gguf_dir.parent), gguf_file=gguf_dir.name)
  tok = _ours(gguf_dir)
  for text in TEXTS:
    if text in LEADING_SPACE:  # see module docstring; sentencepiece is the reference there
      continue
    ids = hf.encode(text)
    assert tok.encode(text).ids == ids, text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_text_around_special_tokens_is_prefixed_again_as_in_llama_cpp(sp, gguf_dir):
  tok = _ours(gguf_dir)
  think = sp.piece_to_id(THINK)
  got = tok.encode(f"hello world</s>the fox{THINK}jumps", add_special_tokens=False).ids
  assert got == (sp.encode("hello world") + [sp.eos_id()] + sp.encode("the fox") + [think]
                 + sp.encode("jumps"))


def test_no_space_prefix_and_bos_eos_flags_follow_the_metadata(tmp_path):
  sp = train_sentencepiece(add_dummy_prefix=False)
  path = tmp_path / "tiny.gguf"
  write_gguf(sp, path, add_space_prefix=False, add_bos_token=False, add_eos_token=True)
  tok = _ours(path)
  for text in TEXTS:
    want = sp.encode(text)
    assert tok.encode(text).ids == want + [sp.eos_id()], text
    assert tok.decode(want) == sp.decode(want) == text, text


def test_gemma_file_without_space_prefix_matches_transformers_gguf_tokenizer(tmp_path):
  """Gemma GGUFs carry a `llama` vocabulary with add_space_prefix false (transformers builds
  its GemmaTokenizer from them: no prefix, scores ranked by position)."""
  import transformers  # pylint: disable=import-outside-toplevel
  sp = train_sentencepiece(add_dummy_prefix=False)
  path = tmp_path / "tiny.gguf"
  write_gguf(sp, path, arch="gemma2", add_space_prefix=False)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  tok = _ours(path)
  for text in TEXTS:
    ids = hf.encode(text)
    assert tok.encode(text).ids == ids == [sp.bos_id()] + sp.encode(text), text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text, text


def test_unsupported_tokenizer_model_and_bad_scores_are_load_errors(sp, tmp_path):
  write_gguf(sp, tmp_path / "bert.gguf", model="bert")
  with pytest.raises(ModelLoadError, match=r"bert\.gguf: tokenizer\.ggml\.model='bert'"):
    _ours(tmp_path / "bert.gguf")
  write_gguf(sp, tmp_path / "short.gguf", scores=[0.0] * 10)
  with pytest.raises(ModelLoadError, match=r"short\.gguf: tokenizer\.ggml\.scores has 10 "):
    _ours(tmp_path / "short.gguf")
