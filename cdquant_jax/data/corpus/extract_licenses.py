"""Rebuilds `licenses.txt.gz`, the second bundled corpus, from Debian `base-files`.

  python extract_licenses.py /usr/share/common-licenses licenses.txt.gz

Takes every regular file (symlinks such as GPL -> GPL-3 skipped) of the directory in sorted name
order, strips each file's leading/trailing blank lines and each line's trailing whitespace,
joins the files with "\\n\\n" and ends the text with one "\\n"; writes gzip level 9, mtime 0, no
stored file name (so the output is byte for byte reproducible). Not imported by the package.
"""

import gzip
import io
import pathlib
import sys


def build_text(directory: str) -> str:
  files = sorted(p for p in pathlib.Path(directory).iterdir() if p.is_file() and not p.is_symlink())
  texts = []
  for path in files:
    lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts.append("\n".join(lines).strip("\n"))
  return "\n\n".join(texts) + "\n"


def main(directory: str, out_path: str) -> None:
  data = build_text(directory).encode("utf-8")
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
    f.write(data)
  pathlib.Path(out_path).write_bytes(buffer.getvalue())


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
