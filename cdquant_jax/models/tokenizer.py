"""`tokenizers.Tokenizer` from a HF directory (tokenizer.json) or a GGUF file's metadata, offline.

GGUF files carry the tokenizer as `tokenizer.ggml.*` metadata; `tokenizer.ggml.model` says which:

  gpt2   byte-level BPE (tokens already spelled in the byte alphabet, plus merges), as in
         SmolLM, Qwen2, Llama 3 exports. The pre-tokenizer split follows `tokenizer.ggml.pre`.
  llama  SentencePiece BPE (Llama 1/2, Mistral, Gemma): tokens, their scores and types, no
         merges. Encoded as llama.cpp's SPM tokenizer does: a space is prepended to the text and
         after every special token (when `add_space_prefix`, the default), spaces become U+2581,
         then adjacent pieces are joined highest-scoring join first; a piece not in the vocabulary
         falls back to its UTF-8 bytes (<0xXX> tokens). BOS is added unless `add_bos_token` is
         false, EOS when `add_eos_token` is true.

In both, tokens typed CONTROL (3) (and for `llama` UNKNOWN (2), as llama.cpp parses it) become
special added tokens and USER_DEFINED (4) plain added tokens, matched whole in the text before
anything else.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from cdquant_jax.models.errors import ModelLoadError

TOKENIZER_JSON = "tokenizer.json"
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_MARK = "\u2581"  # SentencePiece's spelling of a space
SUPPORTED_MODELS = ("gpt2", "llama")

# Split regexes of llama.cpp pre-tokenizer names (as in transformers' GGUF converter).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


@dataclasses.dataclass(frozen=True)
class SentencePieceVocab:
  """A GGUF `llama` (SentencePiece) vocabulary, with llama.cpp's defaults for absent keys.

  tokens / scores / token_types: one entry per token id (tokenizer.ggml.tokens, .scores,
  .token_type); bos_id / eos_id / unk_id: tokenizer.ggml.{bos,eos,unknown}_token_id;
  add_bos / add_eos: tokenizer.ggml.add_{bos,eos}_token; add_space_prefix:
  tokenizer.ggml.add_space_prefix (SentencePiece's add_dummy_prefix; Gemma 3 files say false).
  """
  tokens: list[str]
  scores: list[float]
  token_types: list[int]
  bos_id: int | None = 1
  eos_id: int | None = 2
  unk_id: int = 0
  add_bos: bool = True
  add_eos: bool = False
  add_space_prefix: bool = True


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
  """The `tokenizers.Tokenizer` a GGUF file's tokenizer.ggml.* metadata describes."""
  from cdquant_jax.models import gguf_loader  # pylint: disable=import-outside-toplevel
  reader = reader or gguf_loader.open_reader(path)
  fields = reader.fields

  def get(key, default=None):
    return fields[key].contents() if key in fields else default

  kind = get("tokenizer.ggml.model")
  if kind == "gpt2":
    return byte_level_bpe(get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges", []),
                          get("tokenizer.ggml.token_type", []), get("tokenizer.ggml.pre"),
                          get("tokenizer.ggml.add_bos_token", False),
                          get("tokenizer.ggml.bos_token_id"))
  if kind == "llama":
    return sentencepiece_bpe(sentencepiece_vocab(get, path))
  raise ModelLoadError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: "
                       f"{', '.join(SUPPORTED_MODELS)})")


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str | None,
                   add_bos: bool = False, bos_id: int | None = None):
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary lists."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
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
  _add_typed_tokens(tok, tokens, list(token_types) or [NORMAL] * len(tokens))
  _add_bos_eos(tok, tokens, bos_id if add_bos else None, None)
  return tok


def sentencepiece_vocab(get: Callable[..., Any], path: str) -> SentencePieceVocab:
  """The `SentencePieceVocab` of a GGUF file; `get(key, default)` reads its metadata."""
  tokens = list(get("tokenizer.ggml.tokens"))
  n = len(tokens)
  scores = list(get("tokenizer.ggml.scores", [0.0] * n))
  types = list(get("tokenizer.ggml.token_type", [NORMAL] * n))
  for key, values in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
    if len(values) != n:
      raise ModelLoadError(f"{path}: {key} has {len(values)} entries for {n} tokens")
  vocab = SentencePieceVocab(
      tokens=tokens, scores=[float(s) for s in scores], token_types=[int(t) for t in types],
      bos_id=get("tokenizer.ggml.bos_token_id", 1), eos_id=get("tokenizer.ggml.eos_token_id", 2),
      unk_id=get("tokenizer.ggml.unknown_token_id", 0),
      add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
      add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
      add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)))
  for key, token_id in (("bos_token_id", vocab.bos_id), ("eos_token_id", vocab.eos_id),
                        ("unknown_token_id", vocab.unk_id)):
    if token_id is not None and not 0 <= token_id < n:
      raise ModelLoadError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the "
                           f"{n}-token vocabulary")
  return vocab


def merges_by_score(vocab: SentencePieceVocab) -> list[tuple[str, str]]:
  """BPE merges (left, right) that build each NORMAL token from two vocabulary pieces, best
  first: by the joined token's score (descending), then its id, then the split point.

  SentencePiece BPE (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
  join is the highest-scoring token; a BPE model whose merges are ranked by that score makes the
  same joins in the same order.
  """
  ids: dict[str, int] = {}
  for index, token in enumerate(vocab.tokens):
    ids.setdefault(token, index)
  ranked = []
  for index, (token, score, kind) in enumerate(zip(vocab.tokens, vocab.scores,
                                                   vocab.token_types)):
    if kind != NORMAL:
      continue
    for cut in range(1, len(token)):
      left, right = token[:cut], token[cut:]
      if left in ids and right in ids:
        ranked.append((-score, index, cut, left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(vocab: SentencePieceVocab):
  """A `tokenizers.Tokenizer` that encodes as llama.cpp's SPM tokenizer (see module docstring).

  The space prefix is a normalizer, not a `Metaspace` pre-tokenizer: Metaspace skips it for a
  text that already starts with a space (" hi" -> "▁hi"), SentencePiece and llama.cpp do not
  ("▁▁hi"); and a normalizer runs again on the text after each special token, as llama.cpp does.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, normalizers
  ids: dict[str, int] = {}
  for index, token in enumerate(vocab.tokens):
    ids.setdefault(token, index)
  tok = Tokenizer(models.BPE(vocab=ids, merges=merges_by_score(vocab),
                             unk_token=vocab.tokens[vocab.unk_id], fuse_unk=True,
                             byte_fallback=True))
  spaces = [normalizers.Replace(" ", SPACE_MARK)]
  tok.normalizer = normalizers.Sequence(
      ([normalizers.Prepend(SPACE_MARK)] if vocab.add_space_prefix else []) + spaces)
  steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
  if vocab.add_space_prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  # llama.cpp matches the unknown token's text like a control token's (parse_special).
  _add_typed_tokens(tok, vocab.tokens, vocab.token_types, special_types=(CONTROL, UNKNOWN))
  _add_bos_eos(tok, vocab.tokens, vocab.bos_id if vocab.add_bos else None,
               vocab.eos_id if vocab.add_eos else None)
  return tok


def _add_typed_tokens(tok, tokens: list[str], token_types: list[int],
                      special_types: tuple[int, ...] = (CONTROL,)) -> None:
  """Tokens of `special_types` as special added tokens, USER_DEFINED ones as plain added
  tokens (both matched whole in the text, before the model)."""
  from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, token_types) if k in special_types])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, token_types) if k == USER_DEFINED])


def _add_bos_eos(tok, tokens: list[str], bos_id: int | None, eos_id: int | None) -> None:
  """A post-processor adding BOS before / EOS after each sequence (None: that one is not)."""
  from tokenizers import processors  # pylint: disable=import-outside-toplevel
  if bos_id is None and eos_id is None:
    return
  bos = [tokens[bos_id]] if bos_id is not None else []
  eos = [tokens[eos_id]] if eos_id is not None else []
  single = " ".join(bos + ["$A"] + eos)
  pair = " ".join(bos + ["$A"] + eos + bos + ["$B"] + eos)
  special = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
  tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                     special_tokens=list(special.items()))
