"""`tokenizers.Tokenizer` from a HF directory (tokenizer.json) or a GGUF file's metadata, offline.

GGUF files carry the tokenizer as `tokenizer.ggml.*` metadata. Supported: `gpt2` (byte-level
BPE: tokens already spelled in the byte alphabet, plus merges) as used by SmolLM, Qwen2,
Llama 3 exports. The pre-tokenizer split follows `tokenizer.ggml.pre`; tokens typed CONTROL (3)
become special added tokens, USER_DEFINED (4) plain added tokens.
"""

from __future__ import annotations

import os

from cdquant_jax.models.errors import ModelLoadError

TOKENIZER_JSON = "tokenizer.json"
CONTROL, USER_DEFINED = 3, 4

# Split regexes of llama.cpp pre-tokenizer names (as in transformers' GGUF converter).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def has_tokenizer(path: str, reader=None) -> bool:
  """Whether the HF directory has tokenizer.json / the GGUF file has tokenizer metadata."""
  if path.endswith(".gguf"):
    from cdquant_jax.models import gguf_loader  # pylint: disable=import-outside-toplevel
    return "tokenizer.ggml.tokens" in (reader or gguf_loader.open_reader(path)).fields
  return os.path.exists(os.path.join(path, TOKENIZER_JSON))


def load_tokenizer(path: str, reader=None):
  """A `tokenizers.Tokenizer` from a HF model directory or a .gguf file.

  `reader`: optional open `gguf.GGUFReader` of a .gguf path (saves re-parsing the metadata).
  """
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  if path.endswith(".gguf"):
    return tokenizer_from_gguf(path, reader)
  file = os.path.join(path, TOKENIZER_JSON)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: missing tokenizer.json")
  try:
    return Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a plain Exception for unreadable files
    raise ModelLoadError(f"{file}: cannot read tokenizer ({e})") from e


def tokenizer_from_gguf(path: str, reader=None):
  from cdquant_jax.models import gguf_loader  # pylint: disable=import-outside-toplevel
  reader = reader or gguf_loader.open_reader(path)
  fields = reader.fields

  def get(key, default=None):
    return fields[key].contents() if key in fields else default

  kind = get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ModelLoadError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: "
                         "gpt2 byte-level BPE)")
  return byte_level_bpe(get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges"),
                        get("tokenizer.ggml.token_type", []), get("tokenizer.ggml.pre"),
                        get("tokenizer.ggml.add_bos_token", False),
                        get("tokenizer.ggml.bos_token_id"))


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str | None,
                   add_bos: bool = False, bos_id: int | None = None):
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary lists."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors
  vocab = {token: index for index, token in enumerate(tokens)}
  pairs = [tuple(merge.split(" ", 1)) for merge in merges]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"), byte_level])
  elif pre == "smollm":  # SmolLM's tokenizer.json: each digit alone, then GPT-2 byte level
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  types = list(token_types) or [0] * len(tokens)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == USER_DEFINED])
  if add_bos and bos_id is not None:
    bos = tokens[bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  return tok
