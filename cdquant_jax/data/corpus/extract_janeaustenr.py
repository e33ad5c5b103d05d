"""Rebuilds `austen.txt.gz` from the Debian package r-cran-janeaustenr.

Not imported by the package: a provenance tool. Usage (needs only the .deb):

  apt-get download r-cran-janeaustenr        # 1.0.0-1
  dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb x
  python extract_janeaustenr.py x/usr/lib/R/site-library/janeaustenr/data out.txt.gz

The package stores each novel as an R character vector (one element per line
of the Project Gutenberg text) in an R lazy-load database (`Rdata.rdx` index +
`Rdata.rdb` records, each record a 4-byte big-endian length followed by a zlib
stream of R's XDR serialization; the index is a gzip-compressed RDS file). This file holds a minimal reader for the
subset of the serialization format those objects use.
"""

import gzip
import struct
import sys
import zlib

# The novels bundled, in this order (R object names in the package).
NOVELS = ("prideprejudice", "persuasion")
_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 16, 19, 255


class _Reader:
  """Reads R's XDR serialization (format version 2 or 3)."""

  def __init__(self, data: bytes):
    self.data, self.pos, self.refs = data, 0, []

  def _int(self) -> int:
    (value,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return value

  def header(self):
    if self.data[:2] != b"X\n":
      raise ValueError(f"not an XDR R serialization: {self.data[:2]!r}")
    self.pos = 2
    version = self._int()
    self._int(), self._int()  # writer version, min reader version
    if version == 3:
      encoding_length = self._int()  # then the native encoding name
      self.pos += encoding_length
    return self

  def item(self):
    flags = self._int()
    kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if kind == _NIL:
      return None
    if kind == _REF:
      return self.refs[(flags >> 8) - 1]
    if kind == _SYM:
      name = self.item()
      self.refs.append(name)
      return name
    if kind == _CHAR:
      length = self._int()
      if length == -1:
        return None
      text = self.data[self.pos:self.pos + length].decode("utf-8")
      self.pos += length
      return text
    if kind == _LIST:  # pairlist: attr?, tag?, car, cdr
      attrs = self.item() if has_attr else None
      tag = self.item() if has_tag else None
      car = self.item()
      cdr = self.item()
      del attrs
      return [(tag, car)] + (cdr or [])
    if kind in (_STR, _VEC, _INT, _LGL):
      length = self._int()
      if kind in (_INT, _LGL):
        values = list(struct.unpack_from(f">{length}i", self.data, self.pos))
        self.pos += 4 * length
      else:
        values = [self.item() for _ in range(length)]
      attrs = dict(self.item()) if has_attr else {}
      if "names" in attrs:
        return dict(zip(attrs["names"], values))
      return values
    raise ValueError(f"unsupported R SEXP type {kind} at byte {self.pos}")


def _unserialize(blob: bytes):
  return _Reader(blob).header().item()


def read_lazyload(data_dir: str) -> dict:
  """Returns {object name: python value} for every object in `Rdata.rdb`."""
  with gzip.open(f"{data_dir}/Rdata.rdx", "rb") as f:  # saveRDS: gzip file
    index = _unserialize(f.read())
  with open(f"{data_dir}/Rdata.rdb", "rb") as f:
    db = f.read()
  objects = {}
  for name, (offset, length) in index["variables"].items():
    record = db[offset:offset + length]
    objects[name] = _unserialize(zlib.decompress(record[4:]))
  return objects


def build_text(objects: dict) -> str:
  """Joins the chosen novels' lines with "\\n"; novels separated by a blank line.

  Trailing whitespace of each line is stripped and runs of blank lines are
  collapsed to one, so paragraphs are separated by exactly "\\n\\n".
  """
  paragraphs = []
  for novel in NOVELS:
    current = []
    for line in objects[novel]:
      line = (line or "").rstrip()
      if line:
        current.append(line)
      elif current:
        paragraphs.append("\n".join(current))
        current = []
    if current:
      paragraphs.append("\n".join(current))
  return "\n\n".join(paragraphs) + "\n"


def main(data_dir: str, out_path: str):
  text = build_text(read_lazyload(data_dir))
  # mtime=0 and no file name: the .gz bytes depend only on the text.
  with open(out_path, "wb") as raw:
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
      f.write(text.encode("utf-8"))
  print(f"{len(text)} characters, {text.count(chr(10) * 2) + 1} paragraphs -> {out_path}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
