"""Local file readers and the bundled corpus (hashes from PROVENANCE.md, fixed splits)."""

import gzip
import hashlib
import json
import re

import numpy as np
import pytest

from cdquant_jax.data import calibration_windows
from cdquant_jax.data import evaluation_ids
from cdquant_jax.data import local
from cdquant_jax.data import protocol
from tests.data.fakes import byte_encode


def provenance_hashes():
  text = (local.CORPUS_DIR / "PROVENANCE.md").read_text()
  gz = re.search(r"sha256 of `austen.txt.gz` \| `([0-9a-f]{64})`", text).group(1)
  plain = re.search(r"sha256 of the decompressed UTF-8 text \| `([0-9a-f]{64})`", text).group(1)
  return gz, plain


def test_bundled_corpus_matches_recorded_sha256():
  gz_hash, text_hash = provenance_hashes()
  raw = local.BUNDLED_PATH.read_bytes()
  assert hashlib.sha256(raw).hexdigest() == gz_hash
  assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == text_hash
  assert local.BUNDLED_TEXT_SHA256 == text_hash
  assert 300_000 < len(raw) < 1_500_000


def test_bundled_splits_disjoint_contiguous_deterministic():
  full = gzip.decompress(local.BUNDLED_PATH.read_bytes()).decode()
  cal, ev = local.bundled_text("calibration"), local.bundled_text("evaluation")
  # Contiguous, non-overlapping halves of the paragraph sequence.
  assert cal + "\n\n" + ev + "\n" == full
  n_paragraphs = full.rstrip("\n").count("\n\n") + 1
  n_cal = int(0.9 * n_paragraphs)
  assert local.bundled_split_sizes() == (n_cal, n_paragraphs - n_cal) == (2844, 317)
  assert cal.count("\n\n") + 1 == n_cal and ev.count("\n\n") + 1 == n_paragraphs - n_cal
  assert cal.startswith("PRIDE AND PREJUDICE") and ev.endswith("Finis")
  assert local.bundled_text("calibration") == cal
  with pytest.raises(ValueError, match="split"):
    local.bundled_text("train")


def test_bundled_windows_come_from_calibration_split_only():
  windows = calibration_windows("bundled", byte_encode, nsamples=6, seqlen=64, seed=0)
  again = calibration_windows("bundled", byte_encode, nsamples=6, seqlen=64, seed=0)
  other = calibration_windows("bundled", byte_encode, nsamples=6, seqlen=64, seed=1)
  np.testing.assert_array_equal(windows, again)
  assert not np.array_equal(windows, other)
  cal = local.bundled_text("calibration").encode()
  ev = local.bundled_text("evaluation").encode()
  for row in windows:
    piece = row.astype(np.uint8).tobytes()
    assert piece in cal and piece not in ev
  ids = evaluation_ids("bundled", byte_encode)
  np.testing.assert_array_equal(ids[0], np.frombuffer(ev, np.uint8))


def test_text_jsonl_json_array_and_gz(tmp_path):
  (tmp_path / "a.txt").write_text("hello\n\nworld\n")
  (tmp_path / "a.txt.gz").write_bytes(gzip.compress("hello\n\nworld\n".encode()))
  assert local.read_text(tmp_path / "a.txt") == local.read_text(tmp_path / "a.txt.gz") == "hello\n\nworld\n"
  (tmp_path / "r.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
  (tmp_path / "r.json").write_text(json.dumps([{"body": "one"}, {"body": "two"}]))
  assert local.read_rows(tmp_path / "r.jsonl") == ["one", "two"]
  assert local.read_rows(tmp_path / "r.json", field="body") == ["one", "two"]
  assert local.read_rows(tmp_path / "a.txt") == ["hello\n\nworld\n"]
  with pytest.raises(KeyError, match="no field 'text'"):
    local.read_jsonl(tmp_path / "r.json")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    local.read_jsonl(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError):
    local.read_text(tmp_path / "missing.txt")


def test_file_sources_through_entry_points(tmp_path):
  rows = [f"row {k} " + "abc" * k for k in range(20)]
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
  stream = byte_encode("\n\n".join(rows))
  np.testing.assert_array_equal(evaluation_ids("jsonl", byte_encode, path=path)[0], stream)
  np.testing.assert_array_equal(
      calibration_windows("jsonl", byte_encode, nsamples=4, seqlen=16, seed=2, path=path),
      protocol.sample_stream_windows(stream, nsamples=4, seqlen=16, seed=2))
  (tmp_path / "t.txt").write_text("x y z " * 30)
  assert evaluation_ids("text", byte_encode, path=tmp_path / "t.txt").shape == (1, 180)


def test_parquet_needs_pyarrow(tmp_path):
  try:
    import pyarrow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("pyarrow installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="pyarrow"):
    local.read_parquet(tmp_path / "x.parquet")


def test_licenses_corpus_matches_recorded_sha256_and_is_evaluation_only():
  text = (local.CORPUS_DIR / "PROVENANCE.md").read_text().split("# Second bundled corpus")[1]
  gz = re.search(r"sha256 of `licenses.txt.gz` \| `([0-9a-f]{64})`", text).group(1)
  plain = re.search(r"sha256 of the decompressed UTF-8 text \| `([0-9a-f]{64})`", text).group(1)
  raw = local.LICENSES_PATH.read_bytes()
  assert hashlib.sha256(raw).hexdigest() == gz
  assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == plain == local.LICENSES_TEXT_SHA256
  licenses = local.licenses_text()
  assert "GNU GENERAL PUBLIC LICENSE" in licenses and "Apache License" in licenses
  assert "Elizabeth" not in licenses  # nothing of the calibration corpus
  ids = evaluation_ids("licenses", byte_encode)
  np.testing.assert_array_equal(ids, byte_encode(licenses).reshape(1, -1))
  with pytest.raises(ValueError, match="unknown calibration source 'licenses'"):
    calibration_windows("licenses", byte_encode, nsamples=2, seqlen=8)
