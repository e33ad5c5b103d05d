"""Entry points: calibration windows and evaluation ids by source name.

Sources (names are case-insensitive, `_` and `-` are interchangeable, so the
SpQR/AQLM spellings `c4_new`/`ptb_new` work too):

| source | calibration | evaluation |
|---|---|---|
| c4 | C4 train shard 0, document windows (`>=`) | C4 validation shard 0, 256 windows, seed 0 |
| c4-new | as c4 | first 1100 validation docs `" "`-joined, 256*seqlen tokens |
| wikitext2 | train `" "`-joined, stream windows | test `"\\n\\n"`-joined |
| ptb | train `"\\n\\n"`-joined, stream windows | validation `"\\n\\n"`-joined |
| ptb-new | train `" "`-joined, stream windows | test `" "`-joined |
| pajama, redpajama | RedPajama-1T-Sample, document windows (`>`) | - |
| refinedweb | first 20k rows of falcon-refinedweb, document windows (`>=`) | - |
| bundled | Austen calibration split, stream windows | Austen evaluation split |
| licenses | - | the second bundled corpus (Debian licence texts), whole |
| text | the file as one document, stream windows | the file |
| jsonl, parquet | rows `"\\n\\n"`-joined, stream windows | rows `"\\n\\n"`-joined |

Hub sources load through `datasets` (online); with `path=` they read a local
copy of the needed split instead (a `.jsonl[.gz]`/`.json.gz` or `.parquet` file
in dataset row order, e.g. the C4 shard itself), and follow the same protocol.
Special tokens default to on (one BOS per encoded string), as in the protocol.
"""

import numpy as np

from cdquant_jax.data import local
from cdquant_jax.data import protocol
from cdquant_jax.data.tokenize import as_encoder

HUB_FIELDS = {"c4": "text", "wikitext2": "text", "ptb": "sentence", "pajama": "text",
              "refinedweb": "content"}
FILE_SOURCES = ("text", "jsonl", "parquet")
CALIBRATION_SOURCES = ("c4", "c4-new", "wikitext2", "ptb", "ptb-new", "pajama", "redpajama",
                       "refinedweb", "bundled") + FILE_SOURCES
EVALUATION_SOURCES = ("wikitext2", "c4", "c4-new", "ptb", "ptb-new", "bundled",
                      "licenses") + FILE_SOURCES
LOCAL_JOIN = "\n\n"
WIKITEXT2_TRAIN_JOIN = " "


def canonical_source(source: str) -> str:
  name = source.strip().lower().replace("_", "-")
  return {"redpajama": "pajama", "red-pajama": "pajama", "wikitext-2": "wikitext2",
          "wikitext": "wikitext2"}.get(name, name)


def _rows(dataset: str, split: str, path, field: str | None) -> list[str]:
  field = field or HUB_FIELDS[dataset]
  if path is not None:
    return local.read_rows(path, field=field)
  return protocol.load_rows(dataset, split)


def _file_document(source: str, path, field: str | None) -> str:
  if path is None:
    raise ValueError(f"source {source!r} needs path= (a local file)")
  if source == "text":
    return local.read_text(path)
  reader = local.read_jsonl if source == "jsonl" else local.read_parquet
  return LOCAL_JOIN.join(reader(path, field=field or "text"))


def calibration_windows(source: str, tokenizer, *, nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, path=None, field: str | None = None,
                        add_special_tokens: bool = True,
                        wikitext2_train_join: str = WIKITEXT2_TRAIN_JOIN) -> np.ndarray:
  """Calibration token windows following the GPTQ protocol.

  Args:
    source: one of `CALIBRATION_SOURCES` (see module table).
    tokenizer: anything `as_encoder` accepts.
    nsamples: number of windows (128 in the papers).
    seqlen: tokens per window (2048 in the papers).
    seed: Python `random` seed (0 in the papers).
    path: local file (required for text/jsonl/parquet; optional local copy
      of the train split for hub sources).
    field: JSON/parquet column holding the text (default per source).
    add_special_tokens: passed to the tokenizer (BOS per encoded string).
    wikitext2_train_join: `" "` (GPTQ) or `"\\n\\n"` (SpQR/AQLM).
  Returns:
    [nsamples, seqlen] int32.
  """
  name = canonical_source(source)
  encode = as_encoder(tokenizer, add_special_tokens=add_special_tokens)
  stream_kwargs = dict(nsamples=nsamples, seqlen=seqlen, seed=seed)
  if name in ("c4", "c4-new", "pajama", "refinedweb"):
    dataset = "c4" if name == "c4-new" else name
    rows = _rows(dataset, "train", path, field)
    return protocol.sample_document_windows(rows, encode, strict_longer=(name == "pajama"),
                                            **stream_kwargs)
  if name in ("wikitext2", "ptb", "ptb-new"):
    dataset = "ptb" if name == "ptb-new" else name
    join = {"wikitext2": wikitext2_train_join, "ptb": "\n\n", "ptb-new": " "}[name]
    text = join.join(_rows(dataset, "train", path, field))
  elif name == "bundled":
    text = local.bundled_text("calibration")
  elif name in FILE_SOURCES:
    text = _file_document(name, path, field)
  else:
    raise ValueError(f"unknown calibration source {source!r}; known: {CALIBRATION_SOURCES}")
  return protocol.sample_stream_windows(encode(text), **stream_kwargs)


def evaluation_ids(source: str, tokenizer, *, seqlen: int = 2048, path=None,
                   field: str | None = None, add_special_tokens: bool = True) -> np.ndarray:
  """Evaluation token ids following the GPTQ protocol.

  Args:
    source: one of `EVALUATION_SOURCES` (see module table).
    tokenizer: anything `as_encoder` accepts.
    seqlen: used by c4 (window length) and c4-new (truncation to 256*seqlen);
      the other sources return the whole encoded split.
    path: local file (required for text/jsonl/parquet; optional local copy
      of the evaluation split for hub sources).
  Returns:
    [1, N] int32; `perplexity` cuts it into N // seqlen windows.
  """
  name = canonical_source(source)
  encode = as_encoder(tokenizer, add_special_tokens=add_special_tokens)
  if name == "c4":
    return protocol.c4_eval_ids(_rows("c4", "validation", path, field), encode, seqlen=seqlen)
  if name == "c4-new":
    return protocol.c4_new_eval_ids(_rows("c4", "validation", path, field), encode, seqlen=seqlen)
  if name == "wikitext2":
    return protocol.joined_ids(_rows("wikitext2", "test", path, field), encode, separator="\n\n")
  if name == "ptb":
    return protocol.joined_ids(_rows("ptb", "validation", path, field), encode, separator="\n\n")
  if name == "ptb-new":
    return protocol.joined_ids(_rows("ptb", "test", path, field), encode, separator=" ")
  # [N] -> [1, N] for the single-document sources below.
  if name == "bundled":
    return encode(local.bundled_text("evaluation")).reshape(1, -1)
  if name == "licenses":
    return encode(local.licenses_text()).reshape(1, -1)
  if name in FILE_SOURCES:
    return encode(_file_document(name, path, field)).reshape(1, -1)
  raise ValueError(f"unknown evaluation source {source!r}; known: {EVALUATION_SOURCES}")
