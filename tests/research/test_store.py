"""The results store: whole lines only, a torn last line skipped by readers and dropped by the
next append, concurrent appends never interleave, and a bad middle line is an error."""

import json
import threading

import pytest

from cdquant_jax.research import store


def _row(i: int, status: str = "done") -> dict:
  return store.complete_row(dict(point=f"p{i}", name=f"n{i}", status=status,
                                 perplexity={"text": 1.0 + i / 7}))


def test_rows_round_trip_and_the_last_row_of_a_point_wins(tmp_path):
  path = str(tmp_path / "results.jsonl")
  assert store.read_rows(path) == [] and store.done_points(path) == set()
  rows = [_row(0, "failed"), _row(1), _row(0)]
  for row in rows:
    store.append_row(path, row)
  assert store.read_rows(path) == rows
  assert store.latest_rows(rows)["p0"]["status"] == "done"
  assert store.done_points(path) == {"p0", "p1"}
  assert set(rows[0]) == set(store.ROW_FIELDS)


def test_torn_last_line_is_skipped_then_dropped_by_the_next_append(tmp_path):
  path = tmp_path / "results.jsonl"
  store.append_row(str(path), _row(0))
  whole = json.dumps(_row(1), sort_keys=True)
  with open(path, "a") as f:
    f.write(whole[:len(whole) // 2])  # a writer killed mid-line
  assert [r["point"] for r in store.read_rows(str(path))] == ["p0"]
  store.append_row(str(path), _row(2))
  assert [r["point"] for r in store.read_rows(str(path))] == ["p0", "p2"]
  assert path.read_text().count("\n") == 2 and path.read_text().endswith("\n")


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text('{"point": "a"}\nnot json\n{"point": "b"}\n')
  with pytest.raises(store.StoreError, match=":2: not a JSON line"):
    store.read_rows(str(path))


def test_concurrent_appends_give_whole_lines(tmp_path):
  path = str(tmp_path / "results.jsonl")
  big = "x" * 100_000  # lines much larger than a pipe buffer or a page

  def writer(k: int) -> None:
    for i in range(20):
      store.append_row(path, dict(point=f"{k}-{i}", blob=big))

  threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  rows = store.read_rows(path)
  assert sorted(r["point"] for r in rows) == sorted(f"{k}-{i}" for k in range(4) for i in range(20))
  assert all(r["blob"] == big for r in rows)


def test_unknown_row_fields_are_a_bug():
  with pytest.raises(KeyError, match="perplexty"):
    store.complete_row(dict(point="p", perplexty={}))
