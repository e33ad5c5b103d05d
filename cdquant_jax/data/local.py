"""Offline text sources: plain text, JSON lines, parquet, and the bundled corpus.

Every reader returns Python strings (documents); tokenization and window
sampling live in `protocol.py`. Files ending in `.gz` are decompressed.

The bundled corpus (`corpus/austen.txt.gz`, provenance in
`corpus/PROVENANCE.md`) is Jane Austen's *Pride and Prejudice* + *Persuasion*
(public domain, from Debian `r-cran-janeaustenr` 1.0.0-1). Its fixed splits are
by paragraph (`"\\n\\n"`-separated): calibration = the first
`floor(0.9 * n_paragraphs)` paragraphs, evaluation = the rest.
The second bundled corpus (`corpus/licenses.txt.gz`, evaluation only) is the
licence texts of Debian `base-files` (GPL, LGPL, GFDL, MPL, Apache, Artistic,
BSD, CC0): legal English, out of the calibration text's domain.
"""

import gzip
import hashlib
import json
import pathlib

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
BUNDLED_PATH = CORPUS_DIR / "austen.txt.gz"
# sha256 of the decompressed UTF-8 text (see PROVENANCE.md).
BUNDLED_TEXT_SHA256 = "21cf93e0b46793fa81582013a23b52a7b04f3a6ba3ca11fb038da04f1c418eeb"
LICENSES_PATH = CORPUS_DIR / "licenses.txt.gz"
LICENSES_TEXT_SHA256 = "6ad8dbfc39d11fc7c0fb06cfdc2d9d54b75d12d5639ae94c7fbb1acdf687dfbf"
BUNDLED_CALIBRATION_FRACTION = 0.9
PARAGRAPH_SEPARATOR = "\n\n"
SPLITS = ("calibration", "evaluation", "all")


def _open_text(path) -> str:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text source not found: {path}")
  raw = path.read_bytes()
  if path.suffix == ".gz":
    raw = gzip.decompress(raw)
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(f"{path} is not UTF-8 text: {err}") from None


def read_text(path) -> str:
  """The whole file as one document (`.txt`, `.txt.gz`, any UTF-8 text)."""
  return _open_text(path)


def read_jsonl(path, *, field: str = "text") -> list[str]:
  """`field` of every JSON object, one per line (`.jsonl`, `.json.gz` C4 shards).

  A file whose first non-blank character is `[` is read as one JSON array of
  objects instead.
  """
  content = _open_text(path)
  if content.lstrip().startswith("["):
    records = json.loads(content)
  else:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as err:
          raise ValueError(f"{path}:{number}: invalid JSON line: {err}") from None
  return [_field(record, field, path, index) for index, record in enumerate(records)]


def _field(record, field: str, path, index: int) -> str:
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise KeyError(f"{path}: record {index} has no field {field!r} (has {keys})")
  value = record[field]
  if not isinstance(value, str):
    raise TypeError(f"{path}: record {index} field {field!r} is {type(value).__name__}, not str")
  return value


def read_parquet(path, *, field: str = "text") -> list[str]:
  """Column `field` of a parquet file, in row order (needs `pyarrow`)."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"reading parquet ({path}) needs the optional package `pyarrow`, which is not "
        "installed; convert the file to JSON lines or install pyarrow") from None
  table = pq.read_table(str(path), columns=[field])
  return [str(value) for value in table.column(field).to_pylist()]


def read_rows(path, *, field: str = "text") -> list[str]:
  """Documents of a local file, by extension: parquet, jsonl/json(.gz), else text."""
  name = pathlib.Path(path).name.lower()
  if name.endswith(".parquet"):
    return read_parquet(path, field=field)
  if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
    return read_jsonl(path, field=field)
  return [read_text(path)]


def _verified_text(path: pathlib.Path, sha256: str, verify: bool) -> str:
  """The decompressed corpus at path; with verify, checks its sha256 (PROVENANCE.md)."""
  text = _open_text(path)
  if verify:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != sha256:
      raise ValueError(f"bundled corpus {path} has sha256 {digest}, expected {sha256}: "
                       "the file was modified")
  return text


def bundled_full_text(*, verify: bool = True) -> str:
  """The decompressed bundled corpus; checks its sha256 against PROVENANCE.md."""
  return _verified_text(BUNDLED_PATH, BUNDLED_TEXT_SHA256, verify)


def licenses_text(*, verify: bool = True) -> str:
  """The second bundled corpus (licence texts, evaluation only) as one document."""
  return _verified_text(LICENSES_PATH, LICENSES_TEXT_SHA256, verify)


def bundled_paragraphs() -> list[str]:
  """The bundled corpus split on blank lines, in order."""
  return bundled_full_text().rstrip("\n").split(PARAGRAPH_SEPARATOR)


def bundled_split_sizes() -> tuple[int, int]:
  """(calibration, evaluation) paragraph counts of the fixed split."""
  n_paragraphs = len(bundled_paragraphs())
  n_cal = int(n_paragraphs * BUNDLED_CALIBRATION_FRACTION)
  return n_cal, n_paragraphs - n_cal


def bundled_text(split: str) -> str:
  """One split of the bundled corpus as a single document.

  Args:
    split: "calibration" (first 90% of paragraphs), "evaluation" (last 10%),
      or "all".
  Returns:
    the split's paragraphs joined with "\\n\\n".
  """
  if split not in SPLITS:
    raise ValueError(f"bundled corpus split must be one of {SPLITS}, got {split!r}")
  paragraphs = bundled_paragraphs()
  n_cal, _ = bundled_split_sizes()
  chosen = {"calibration": paragraphs[:n_cal], "evaluation": paragraphs[n_cal:], "all": paragraphs}[split]
  return PARAGRAPH_SEPARATOR.join(chosen)
