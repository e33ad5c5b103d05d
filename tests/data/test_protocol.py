"""Window sampling vs an independent transcription of GPTQ datautils with global `random`."""

import contextlib
import gzip
import json
import random

import numpy as np
import pytest

from cdquant_jax.data import calibration_windows
from cdquant_jax.data import evaluation_ids
from cdquant_jax.data import protocol
from tests.data.fakes import FlagTokenizer
from tests.data.fakes import LookupTokenizer
from tests.data.fakes import byte_encode


@contextlib.contextmanager
def global_random(seed):
  """Seeds the module-level generator like the reference, restoring it afterwards."""
  state = random.getstate()
  random.seed(seed)
  try:
    yield
  finally:
    random.setstate(state)


def reference_c4_starts(lengths, nsamples, seqlen, seed):
  """(doc, start) pairs of GPTQ get_c4's loop (`>=`), SpQR's whole-doc rule when L == seqlen."""
  picks = []
  with global_random(seed):
    for _ in range(nsamples):
      while True:
        i = random.randint(0, len(lengths) - 1)
        if lengths[i] >= seqlen:
          break
      if lengths[i] == seqlen:
        picks.append((i, 0))
      else:
        picks.append((i, random.randint(0, lengths[i] - seqlen - 1)))
  return picks


def expected_windows(picks, seqlen):
  return np.stack([10_000 * doc + start + np.arange(seqlen) for doc, start in picks])


@pytest.mark.parametrize("seed", [0, 7])
def test_document_windows_match_reference_positions(seed):
  lengths = [3, 50, 17, 9, 120, 16, 64, 2, 33, 16]  # several docs shorter than seqlen
  tok = LookupTokenizer(lengths)
  got = protocol.sample_document_windows(tok.rows, tok.encode, nsamples=25, seqlen=16, seed=seed)
  want = expected_windows(reference_c4_starts(lengths, 25, 16, seed), 16)
  assert got.dtype == np.int32 and got.shape == (25, 16)
  np.testing.assert_array_equal(got, want)
  # The local generator leaves the global one alone.
  state = random.getstate()
  protocol.sample_document_windows(tok.rows, tok.encode, nsamples=3, seqlen=16, seed=seed)
  assert random.getstate() == state


def test_document_windows_exact_seqlen_edge_case():
  # Only docs of exactly seqlen tokens qualify: GPTQ would call randint(0, -1).
  lengths = [16, 4, 16, 5]
  tok = LookupTokenizer(lengths)
  got = protocol.sample_document_windows(tok.rows, tok.encode, nsamples=6, seqlen=16, seed=0)
  np.testing.assert_array_equal(got, expected_windows(reference_c4_starts(lengths, 6, 16, 0), 16))
  with pytest.raises(ValueError, match="consecutive random documents"):
    protocol.sample_document_windows(tok.rows, tok.encode, nsamples=1, seqlen=16, seed=0,
                                     strict_longer=True, max_draws=200)


def test_strict_longer_skips_exact_length_docs():
  lengths = [16, 40, 16, 16, 30]
  tok = LookupTokenizer(lengths)
  got = protocol.sample_document_windows(tok.rows, tok.encode, nsamples=10, seqlen=16, seed=3,
                                         strict_longer=True)
  picks = []
  with global_random(3):
    for _ in range(10):
      while True:
        i = random.randint(0, len(lengths) - 1)
        if lengths[i] > 16:
          break
      picks.append((i, random.randint(0, lengths[i] - 16 - 1)))
  np.testing.assert_array_equal(got, expected_windows(picks, 16))


def test_stream_windows_match_reference():
  stream = np.arange(1000, 1300, dtype=np.int32)
  got = protocol.sample_stream_windows(stream[None, :], nsamples=12, seqlen=32, seed=5)
  with global_random(5):
    starts = [random.randint(0, stream.size - 32 - 1) for _ in range(12)]
  np.testing.assert_array_equal(got, np.stack([stream[s:s + 32] for s in starts]))
  # The last token is never inside a window (randint upper bound N - seqlen - 1).
  big = protocol.sample_stream_windows(np.arange(40), nsamples=500, seqlen=32, seed=1)
  assert big.max() == 38 and big.min() == 0
  with pytest.raises(ValueError, match="more than seqlen"):
    protocol.sample_stream_windows(np.arange(32), nsamples=1, seqlen=32, seed=0)


def test_c4_eval_always_seed_zero_and_hstacked():
  lengths = [40, 10, 70, 25, 18]
  tok = LookupTokenizer(lengths)
  got = protocol.c4_eval_ids(tok.rows, tok.encode, seqlen=16, n_windows=9)
  want = expected_windows(reference_c4_starts(lengths, 9, 16, 0), 16).reshape(1, -1)
  assert got.shape == (1, 9 * 16)
  np.testing.assert_array_equal(got, want)


def test_c4_new_joins_first_1100_docs_and_truncates():
  rows = ["ab"] * 1100 + ["zz"] * 50
  joined = " ".join(["ab"] * 1100)  # 3299 bytes
  short = protocol.c4_new_eval_ids(rows, byte_encode, seqlen=4)
  np.testing.assert_array_equal(short[0], byte_encode(joined)[:1024])
  full = protocol.c4_new_eval_ids(rows, byte_encode, seqlen=64)  # 256 * 64 > 3299
  assert full.shape == (1, 3299)
  assert ord("z") not in full


def write_jsonl(path, field, rows, compress=False):
  data = "".join(json.dumps({field: r, "id": k}) + "\n" for k, r in enumerate(rows))
  if compress:
    path.write_bytes(gzip.compress(data.encode()))
  else:
    path.write_text(data)
  return path


WIKI_ROWS = ["", " = Valkyria Chronicles = \n", "", " Senjō no Valkyria 3 is a game . \n", "",
             " It was released in 2011 . \n"] * 8


def test_wikitext2_joins_from_local_rows(tmp_path):
  test_file = write_jsonl(tmp_path / "wikitext-test.jsonl", "text", WIKI_ROWS)
  ids = evaluation_ids("wikitext2", FlagTokenizer(), path=test_file)
  want = [1] + [b + 2 for b in "\n\n".join(WIKI_ROWS).encode()]
  np.testing.assert_array_equal(ids, np.asarray([want]))
  # Calibration: " ".join of the train rows (GPTQ), then stream windows with seed 0.
  windows = calibration_windows("wikitext2", byte_encode, nsamples=5, seqlen=20, path=test_file)
  stream = byte_encode(" ".join(WIKI_ROWS))
  np.testing.assert_array_equal(
      windows, protocol.sample_stream_windows(stream, nsamples=5, seqlen=20, seed=0))
  spqr = calibration_windows("wikitext2", byte_encode, nsamples=5, seqlen=20, path=test_file,
                             wikitext2_train_join="\n\n")
  assert not np.array_equal(spqr, windows)


def test_ptb_and_ptb_new_joins(tmp_path):
  sentences = [f"the n{k} market rose" for k in range(30)]
  path = write_jsonl(tmp_path / "ptb.jsonl", "sentence", sentences)
  old = evaluation_ids("ptb", byte_encode, path=path)
  new = evaluation_ids("ptb_new", byte_encode, path=path)  # SpQR/AQLM spelling
  np.testing.assert_array_equal(old[0], byte_encode("\n\n".join(sentences)))
  np.testing.assert_array_equal(new[0], byte_encode(" ".join(sentences)))


def test_c4_sources_from_local_shard(tmp_path):
  rows = ["x" * n for n in (5, 80, 12, 40, 200, 7)]
  shard = write_jsonl(tmp_path / "c4-train.00000-of-01024.json.gz", "text", rows, compress=True)
  got = calibration_windows("c4", byte_encode, nsamples=8, seqlen=16, seed=0, path=shard)
  # Dispatch check: the local shard feeds the (separately verified) document sampler.
  np.testing.assert_array_equal(got, protocol.sample_document_windows(
      rows, byte_encode, nsamples=8, seqlen=16, seed=0))
  c4_new = evaluation_ids("c4-new", byte_encode, seqlen=16, path=shard)
  np.testing.assert_array_equal(c4_new[0], byte_encode(" ".join(rows))[:256 * 16])
  c4_eval = evaluation_ids("c4", byte_encode, seqlen=16, path=shard)
  assert c4_eval.shape == (1, 256 * 16)


def test_hub_sources_need_datasets_or_path():
  try:
    import datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("datasets is installed; the offline error path is not reachable")
  except ImportError:
    pass
  with pytest.raises(protocol.DatasetUnavailableError, match="datasets"):
    calibration_windows("c4", byte_encode, nsamples=1, seqlen=8)
  with pytest.raises(protocol.DatasetUnavailableError, match="path="):
    evaluation_ids("wikitext2", byte_encode)


def test_unknown_sources_and_missing_path():
  with pytest.raises(ValueError, match="unknown calibration source"):
    calibration_windows("imagenet", byte_encode)
  with pytest.raises(ValueError, match="unknown evaluation source"):
    evaluation_ids("pajama", byte_encode)
  with pytest.raises(ValueError, match="needs path="):
    calibration_windows("jsonl", byte_encode)
