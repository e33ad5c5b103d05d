"""The GPTQ / SpQR / AQLM calibration and evaluation protocol (`datautils.py`).

The sampling functions take rows that are already loaded (lists of strings) and
an encoder, so they run offline; `load_rows` fetches the rows through the
optional `datasets` package when it is installed and the hub is reachable.

Randomness: every sampler owns a `random.Random(seed)`; its draws are the same
as the reference code's `random.seed(seed)` followed by module-level
`random.randint` calls (the module functions are methods of one hidden
`Random` instance), without touching the global generator.

Window rules (all windows are `[i, i + seqlen)` of one encoded string):
- documents (C4 train/validation, RedPajama): draw
  `d = randint(0, n_docs - 1)` until `encode(rows[d])` has `>= seqlen` tokens
  (`> seqlen` for RedPajama, as in AQLM), then `i = randint(0, L - seqlen - 1)`.
  Edge case `L == seqlen` (only reachable with `>=`): the reference's
  `randint(0, -1)` raises in GPTQ; SpQR/AQLM C4 eval take the whole document
  without a draw. We do the latter everywhere, so any run on which GPTQ does not
  crash gets identical windows.
- stream (WikiText-2, PTB, local text): one encoded string of length `N`,
  `i = randint(0, N - seqlen - 1)` per window; needs `N > seqlen`.

Joins: WikiText-2 train `" "` (GPTQ; SpQR/AQLM use `"\\n\\n"`, pass
`wikitext2_train_join`), WikiText-2 test `"\\n\\n"`; PTB train/validation
`"\\n\\n"`; `ptb-new` train/test `" "`; `c4-new` = `" ".join` of the first 1100
validation documents truncated to 256 * seqlen tokens.
"""

import random
from typing import Callable, Sequence

import numpy as np

C4_EVAL_WINDOWS = 256
C4_NEW_DOCS = 1100
MAX_DRAWS_PER_WINDOW = 100_000

C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
# AQLM pins this revision of allenai/c4; the data files have not changed since.
C4_REVISION = "607bd4c8450a42878aa9ddc051a65a055450ef87"

Encode = Callable[[str], np.ndarray]


def _check_seqlen(seqlen: int):
  if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
    raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")


def document_window(ids: np.ndarray, seqlen: int, rng: random.Random) -> np.ndarray:
  """One `[seqlen]` window of a document with `len(ids) >= seqlen` tokens.

  Consumes one draw `randint(0, L - seqlen - 1)`, or none when `L == seqlen`
  (the SpQR edge case: the whole document is the window).
  """
  length = len(ids)
  if length < seqlen:
    raise ValueError(f"document has {length} tokens, fewer than seqlen={seqlen}")
  if length == seqlen:
    return ids
  start = rng.randint(0, length - seqlen - 1)
  return ids[start:start + seqlen]


def sample_document_windows(rows: Sequence[str], encode: Encode, *, nsamples: int, seqlen: int,
                            seed: int, strict_longer: bool = False,
                            max_draws: int = MAX_DRAWS_PER_WINDOW) -> np.ndarray:
  """GPTQ `get_c4` calibration: one random window from each of `nsamples` random docs.

  Args:
    rows: the documents, in dataset order.
    encode: `text -> [L] int32`.
    nsamples: number of windows.
    seqlen: tokens per window.
    seed: seed of the local `random.Random`.
    strict_longer: accept documents with `> seqlen` tokens (AQLM RedPajama)
      instead of `>= seqlen` (GPTQ C4).
    max_draws: give up (ValueError) after this many consecutive document draws
      that are too short, instead of looping forever as the reference does.
  Returns:
    [nsamples, seqlen] int32.
  """
  _check_seqlen(seqlen)
  if not rows:
    raise ValueError("no documents to sample calibration windows from")
  rng = random.Random(seed)
  cache: dict[int, np.ndarray] = {}
  windows = []
  for _ in range(nsamples):
    for _ in range(max_draws):
      index = rng.randint(0, len(rows) - 1)
      if index not in cache:
        cache[index] = np.asarray(encode(rows[index]), dtype=np.int32)
      ids = cache[index]
      if len(ids) > seqlen or (len(ids) == seqlen and not strict_longer):
        break
    else:
      rule = ">" if strict_longer else ">="
      raise ValueError(f"{max_draws} consecutive random documents all had fewer tokens than "
                       f"required ({rule} seqlen={seqlen}); {len(rows)} documents in total")
    windows.append(document_window(ids, seqlen, rng))
  return np.stack(windows).astype(np.int32) if windows else np.zeros((0, seqlen), np.int32)


def sample_stream_windows(ids: np.ndarray, *, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
  """GPTQ `get_wikitext2`/`get_ptb` calibration: random windows of one long stream.

  Args:
    ids: [N] (or [1, N]) token ids of the whole joined split.
  Returns:
    [nsamples, seqlen] int32; window k starts at the k-th
    `randint(0, N - seqlen - 1)` of `random.Random(seed)`.
  """
  _check_seqlen(seqlen)
  # [N] or [1, N] -> [N]
  stream = np.asarray(ids, dtype=np.int32).reshape(-1)
  if stream.size <= seqlen:
    raise ValueError(f"token stream has {stream.size} tokens; random windows need more than "
                     f"seqlen={seqlen}")
  rng = random.Random(seed)
  starts = [rng.randint(0, stream.size - seqlen - 1) for _ in range(nsamples)]
  # [nsamples, seqlen] gather of consecutive positions from each start.
  positions = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seqlen)[None, :]
  return stream[positions].reshape(nsamples, seqlen)


def c4_eval_ids(rows: Sequence[str], encode: Encode, *, seqlen: int,
                n_windows: int = C4_EVAL_WINDOWS) -> np.ndarray:
  """GPTQ `c4` evaluation: `random.seed(0)` (always 0), 256 document windows, hstack.

  Returns:
    [1, n_windows * seqlen] int32.
  """
  windows = sample_document_windows(rows, encode, nsamples=n_windows, seqlen=seqlen, seed=0)
  # [n_windows, seqlen] -> [1, n_windows * seqlen] (torch.hstack of the windows)
  return windows.reshape(1, -1)


def c4_new_eval_ids(rows: Sequence[str], encode: Encode, *, seqlen: int,
                    n_docs: int = C4_NEW_DOCS, n_windows: int = C4_EVAL_WINDOWS) -> np.ndarray:
  """GPTQ `--new-eval` c4: `" ".join` the first 1100 docs, keep 256 * seqlen tokens.

  Returns:
    [1, min(N, n_windows * seqlen)] int32.
  """
  _check_seqlen(seqlen)
  ids = np.asarray(encode(" ".join(rows[:n_docs])), dtype=np.int32)
  # [N] -> [1, min(N, n_windows * seqlen)]
  return ids[:n_windows * seqlen].reshape(1, -1)


def joined_ids(rows: Sequence[str], encode: Encode, *, separator: str) -> np.ndarray:
  """`encode(separator.join(rows))` as [1, N] int32 (WikiText-2 / PTB eval)."""
  # [N] -> [1, N]
  return np.asarray(encode(separator.join(rows)), dtype=np.int32).reshape(1, -1)


# ----- rows through `datasets` (optional, online) -----

class DatasetUnavailableError(RuntimeError):
  """The optional `datasets` package or the dataset hub is not available."""


# name -> (load_dataset positional args, kwargs per split, text field).
HUB_SPECS = {
    "c4": (("allenai/c4",), {
        "train": {"data_files": {"train": C4_TRAIN_FILE}, "split": "train"},
        "validation": {"data_files": {"validation": C4_VALIDATION_FILE}, "split": "validation"},
    }, "text"),
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), {
        "train": {"split": "train"}, "test": {"split": "test"},
    }, "text"),
    # ptb_text_only is script-based (fails with datasets>=4); the parquet
    # conversion branch of the same repo is tried second.
    "ptb": (("ptb_text_only", "penn_treebank"), {
        "train": {"split": "train"}, "validation": {"split": "validation"}, "test": {"split": "test"},
    }, "sentence"),
    "pajama": (("togethercomputer/RedPajama-Data-1T-Sample",), {"train": {"split": "train"}}, "text"),
    "refinedweb": (("tiiuae/falcon-refinedweb",), {"train": {"split": "train", "streaming": True}},
                   "content"),
}
PTB_PARQUET = (("ptb-text-only/ptb_text_only", "penn_treebank"), {"revision": "refs/convert/parquet"})
REFINEDWEB_ROWS = 20_000


def _load_dataset():
  try:
    from datasets import load_dataset  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DatasetUnavailableError(
        "this source needs the optional package `datasets` (not installed) and access to the "
        "dataset hub. Offline, use source 'bundled', or 'text'/'jsonl'/'parquet' with path=, or "
        "pass path= to a local copy of the split (e.g. the C4 shard .json.gz, the WikiText "
        "parquet file).") from None
  return load_dataset


def load_rows(name: str, split: str, *, c4_revision: str | None = C4_REVISION) -> list[str]:
  """The text rows of a hub dataset split, in dataset order (needs `datasets`)."""
  if name not in HUB_SPECS:
    raise ValueError(f"unknown hub dataset {name!r}; known: {sorted(HUB_SPECS)}")
  args, splits, field = HUB_SPECS[name]
  if split not in splits:
    raise ValueError(f"dataset {name!r} has no split {split!r} here; known: {sorted(splits)}")
  load_dataset = _load_dataset()
  kwargs = dict(splits[split])
  if name == "c4" and c4_revision:
    kwargs["revision"] = c4_revision
  try:
    data = load_dataset(*args, **kwargs)
  except Exception as err:  # pylint: disable=broad-except
    if name != "ptb":
      raise DatasetUnavailableError(f"load_dataset{args} split={split!r} failed: {err}") from err
    try:
      data = load_dataset(*PTB_PARQUET[0], split=split, **PTB_PARQUET[1])
    except Exception as err2:  # pylint: disable=broad-except
      raise DatasetUnavailableError(f"PTB: script dataset failed ({err}) and the parquet "
                                    f"mirror failed ({err2})") from err2
  if kwargs.get("streaming"):
    rows = []
    for row in data:
      rows.append(row[field])
      if len(rows) >= REFINEDWEB_ROWS:
        break
    return rows
  return list(data[field])
