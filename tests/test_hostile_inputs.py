"""Hostile dataset files through ``tbps info``: one error line or per-row statuses, never a traceback.

One behaviour table: each case builds a file (JSON, JSON Lines, CSV, Parquet, caption text, an
image folder) that is broken on purpose, runs ``tbps info`` on it in-process, and expects either

* ``Fails(fragment)``: exit 1, exactly one line on stderr starting ``error:``, naming the file
  and containing ``fragment`` (where in the file, which field); or
* ``Rows(counts, fragment)``: exit 0, the status counts ``tbps info`` prints, and ``fragment``
  in the reason of the rows that are not ok (read back through the library).

No case may raise out of the command (``result.exception`` is the ``SystemExit`` of a handled
exit), hang (a FIFO must not block) or print more than one line of error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import pytest
from PIL import Image

from tbps.columns import ERROR, STATUS, STATUS_BAD_RECORD, STATUS_EMPTY_CAPTION, STATUS_OK
from tbps.data.readers import read_dataset

WIDE = {"COLUMNS": "400"}
DEEP = 200_000


@dataclass(frozen=True)
class Fails:
    fragment: str


@dataclass(frozen=True)
class Rows:
    counts: dict[str, int]
    fragment: str | None = None  # in the error of every row that is not ok


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _cuhk(tmp: Path, record_text: str, name: str = "reid_raw.json") -> Path:
    """A CUHK-PEDES file of one record, written as raw JSON text (so it can hold anything)."""
    return _write(tmp, name, f"[{record_text}]")


def _parquet(tmp: Path, **columns) -> Path:
    pl.DataFrame(columns).write_parquet(tmp / "t.parquet")
    return tmp / "t.parquet"


def _fifo(tmp: Path, name: str) -> Path:
    path = tmp / name
    os.mkfifo(path)
    return path


def _folder_with_undecodable_name(tmp: Path) -> Path:
    folder = tmp / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 24)).save(folder / "ok.jpg")
    (folder / "ok.txt").write_text("a man\n", encoding="utf-8")
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"  # a Latin-1 file name: not UTF-8
    with open(raw, "wb") as fh:
        fh.write(b"\xff\xd8 not really a jpeg")
    with open(raw[:-4] + b".txt", "wb") as fh:
        fh.write(b"a woman\n")
    return folder


def _folder_with_fifo_caption(tmp: Path) -> Path:
    folder = tmp / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 24)).save(folder / "a.jpg")
    os.mkfifo(folder / "a.txt")  # reading it would block forever
    return folder


GOOD = '"file_path": "a.jpg", "captions": ["a man"], "id": 1'

# (case id, build(tmp) -> path, extra CLI arguments, expected)
CASES: list[tuple[str, Callable[[Path], Path], list[str], Fails | Rows]] = [
    # --- JSON: nesting, numbers, unicode, wrong types
    ("json-nested-200k-deep", lambda t: _write(t, "reid_raw.json", "[" * DEEP + "]" * DEEP), [], Fails("nested 200,000 levels deep at line 1")),
    ("json-record-nested-200k-deep", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": ' + "[" * DEEP + "]" * DEEP + "}"),
     [], Fails("record 0: JSON nested")),
    ("json-5000-digit-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": ' + "9" * 5000 + "}"), [], Rows({STATUS_OK: 1})),
    ("json-5000-digit-caption", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": [' + "9" * 5000 + '], "id": 1}'),
     [], Rows({STATUS_BAD_RECORD: 1}, "'captions'[0] is a int, not a string")),
    ("json-1e400-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": 1e400}'), [], Rows({STATUS_BAD_RECORD: 1}, "field 'id' is inf")),
    ("json-nan-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": NaN}'), [], Rows({STATUS_BAD_RECORD: 1}, "field 'id' is nan")),
    ("json-lone-surrogate-caption", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["a \\ud800 man", "fine"], "id": 1}'),
     [], Rows({STATUS_BAD_RECORD: 1, STATUS_OK: 1}, "caption '")),
    ("json-lone-surrogate-path", lambda t: _cuhk(t, '{"file_path": "a\\udc00.jpg", "captions": ["x"], "id": 1}'),
     [], Rows({STATUS_BAD_RECORD: 1}, "invalid unicode")),
    ("json-lone-surrogate-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": "\\udfff"}'),
     [], Rows({STATUS_BAD_RECORD: 1}, "person id")),
    ("json-lone-surrogate-split", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": 1, "split": "tr\\ud800in"}'),
     [], Rows({STATUS_BAD_RECORD: 1}, "split")),
    ("json-list-path", lambda t: _cuhk(t, '{"file_path": ["a.jpg"], "captions": ["x"], "id": 1}'), [], Rows({STATUS_BAD_RECORD: 1}, "'file_path' is a list")),
    ("json-null-captions", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": null, "id": 1}'), [], Rows({STATUS_BAD_RECORD: 1}, "'captions'")),
    ("json-number-captions", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": [1, 2.5], "id": 1}'), [], Rows({STATUS_BAD_RECORD: 2}, "not a string")),
    ("json-object-captions", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": {"en": "x"}, "id": 1}'), [], Rows({STATUS_BAD_RECORD: 1}, "is a dict")),
    ("json-aptm-number-caption", lambda t: _write(t, "pool.json", '[{"image": "a.jpg", "caption": 5, "image_id": "x"}]'),
     [], Rows({STATUS_BAD_RECORD: 1}, "is a int, not a list or string: 'caption'")),
    ("json-object-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": {"a": 1}}'), [], Rows({STATUS_BAD_RECORD: 1}, "field 'id' is a dict")),
    ("json-bool-id", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["x"], "id": true}'), [], Rows({STATUS_BAD_RECORD: 1}, "field 'id' is a bool")),
    ("json-list-split", lambda t: _cuhk(t, f'{{{GOOD}, "split": ["train"]}}'), [], Rows({STATUS_BAD_RECORD: 1}, "field 'split' is a list")),
    ("json-records-not-objects", lambda t: _write(t, "reid_raw.json", f'[{{{GOOD}}}, 7, "s", null]'), [],
     Rows({STATUS_OK: 1, STATUS_BAD_RECORD: 3}, "is not an object")),
    ("json-nul-in-caption", lambda t: _cuhk(t, '{"file_path": "a.jpg", "captions": ["a\\u0000man"], "id": 1}'), [], Rows({STATUS_BAD_RECORD: 1}, "NUL byte")),
    ("json-invalid-utf8", lambda t: _write(t, "reid_raw.json", b'[{"file_path": "a.jpg",\n "captions": ["caf\xe9"], "id": 1}]'), [],
     Fails("not UTF-8 text (line 2, byte")),
    ("json-truncated", lambda t: _write(t, "reid_raw.json", f'[{{{GOOD}}}, {{"file_'), [], Fails("invalid JSON at line 1 column")),
    ("json-top-level-number", lambda t: _write(t, "reid_raw.json", "9" * 5000), [], Fails("found a int")),
    ("json-fifo", lambda t: _fifo(t, "reid_raw.json"), [], Fails("not a regular file (a FIFO)")),
    # --- JSON Lines
    ("jsonl-nested-200k-deep", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": ' + "[" * DEEP + "]" * DEEP + "}\n"), [],
     Fails("line 1: JSON nested")),
    ("jsonl-5000-digit-id", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": "x", "person_id": ' + "9" * 5000 + "}\n"), [], Rows({STATUS_OK: 1})),
    ("jsonl-wrong-types", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": 1, "caption": ["y"]}\n{"image": "b.jpg", "caption": true}\n'),
     [], Rows({STATUS_OK: 1, STATUS_BAD_RECORD: 2}, "not a string")),
    ("jsonl-lone-surrogate", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": "x\\ud800"}\n{"image": "a.jpg", "caption": "y"}\n'),
     [], Rows({STATUS_BAD_RECORD: 1, STATUS_OK: 1}, "invalid Unicode")),
    ("jsonl-line-not-an-object", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": "x"}\n[1, 2]\n'), [],
     Rows({STATUS_OK: 1, STATUS_BAD_RECORD: 1}, "line 2) is a JSON list")),
    ("jsonl-invalid-utf8", lambda t: _write(t, "t.jsonl", b'{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "caption": "\xff"}\n'), [],
     Fails("line 2: not UTF-8 text")),
    ("jsonl-bad-line", lambda t: _write(t, "t.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": \n'), [], Fails("invalid JSON on line 2")),
    # --- CSV
    ("csv-nul-byte", lambda t: _write(t, "t.csv", b"image,caption\na.jpg,hel\x00lo\nb.jpg,fine\n"), [], Rows({STATUS_BAD_RECORD: 1, STATUS_OK: 1}, "NUL byte")),
    ("csv-ragged-rows", lambda t: _write(t, "t.csv", "image,caption\na.jpg,one,extra\nb.jpg\nc.jpg,fine\n"), [],
     Rows({STATUS_BAD_RECORD: 2, STATUS_OK: 1}, "fields, the header has 2")),
    ("csv-bom", lambda t: _write(t, "t.csv", b"\xef\xbb\xbfimage,caption\na.jpg,one\n"), [], Rows({STATUS_OK: 1})),
    ("csv-invalid-utf8", lambda t: _write(t, "t.csv", b"image,caption\na.jpg,caf\xe9\nb.jpg,fine\n"), [],
     Rows({STATUS_BAD_RECORD: 1, STATUS_OK: 1}, "column 'caption' holds invalid UTF-8")),
    ("csv-invalid-utf8-path", lambda t: _write(t, "t.csv", b"image,caption\na\xed\xa0\x80.jpg,one\n"), [], Rows({STATUS_BAD_RECORD: 1}, "column 'image'")),
    ("csv-unclosed-quote", lambda t: _write(t, "t.csv", 'image,caption\na.jpg,"never closed\nb.jpg,two\n'), [], Fails("record starting on line 2")),
    ("csv-repeated-header", lambda t: _write(t, "t.csv", "image,caption,caption\na.jpg,one,two\n"), [], Fails("names column 'caption' more than once")),
    ("csv-utf16", lambda t: _write(t, "t.csv", "image,caption\na.jpg,one\n".encode("utf-16")), [], Fails("no image path column")),
    ("csv-char-device", lambda t: Path("/dev/zero"), ["--format", "csv"], Fails("not a regular file (a character device)")),
    # --- Parquet: wrong column types
    ("parquet-number-columns", lambda t: _parquet(t, image=[1, 2], caption=[3.5, 4.0]), [], Fails("field 'image': column holds Int64, expected text")),
    ("parquet-list-caption", lambda t: _parquet(t, image=["a.jpg"], caption=[["x", "y"]]), [], Fails("field 'caption': column holds List")),
    ("parquet-struct-caption", lambda t: _parquet(t, image=["a.jpg"], caption=[{"a": 1}]), [], Fails("field 'caption': column holds Struct")),
    ("parquet-binary-columns", lambda t: _parquet(t, image=[b"a.jpg"], caption=[b"\xff\xfe"]), [], Fails("column holds Binary")),
    ("parquet-bool-path", lambda t: _parquet(t, image=[True], caption=["x"]), [], Fails("column holds Boolean")),
    ("parquet-list-person-id", lambda t: _parquet(t, image=["a.jpg"], caption=["x"], person_id=[[1]]), [], Fails("field 'person_id'")),
    ("parquet-inf-person-id", lambda t: _parquet(t, image=["a.jpg", "b.jpg"], caption=["x", "y"], person_id=[1.0, float("inf")]), [], Rows({STATUS_OK: 2})),
    ("parquet-repeated-pair-ids", lambda t: _parquet(t, pair_id=["p", "p"], image=["a.jpg", "b.jpg"], caption=["x", "y"]), [], Fails("pair_id 'p' is in rows 0 and 1")),
    ("parquet-truncated", lambda t: _write(t, "t.parquet", (_parquet(t, image=["a.jpg"], caption=["x"])).read_bytes()[:40]), [],
     Fails("cannot be read as parquet")),
    # --- caption files and image folders
    ("txt-nul-byte", lambda t: _write(t, "bank.txt", b"one\x00two\nthree\n"), [], Rows({STATUS_BAD_RECORD: 1, STATUS_OK: 1}, "NUL byte")),
    ("txt-invalid-utf8", lambda t: _write(t, "bank.txt", b"one\n\xed\xa0\x80\n"), [], Fails("not UTF-8 text (line 2")),
    ("folder-undecodable-file-name", _folder_with_undecodable_name, [], Rows({STATUS_OK: 1, STATUS_BAD_RECORD: 1}, "is not valid Unicode")),
    ("folder-fifo-caption-file", _folder_with_fifo_caption, [], Rows({STATUS_BAD_RECORD: 1}, "not a regular file (a FIFO)")),
]


def _printed_counts(stdout: str) -> dict[str, int]:
    """The status table ``tbps info`` prints, as ``{status: rows}``."""
    section = stdout.split("statuses", 1)[1].split("splits", 1)[0]
    return {s: int(n.replace(",", "")) for s, n in re.findall(r"│ ([a-z-]+)\s+│ ([\d,]+)\s+│", section)}


@pytest.mark.parametrize(("build", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_one_line_or_row_statuses(tmp_path, cli, build, args, expected):
    path = build(tmp_path)
    result = cli("info", path, *args, env=WIDE)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # handled, no traceback
    if isinstance(expected, Fails):
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, result.output
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert str(path) in lines[0] and expected.fragment in lines[0], lines[0]
        return
    assert result.exit_code == 0, result.output
    assert _printed_counts(result.stdout) == expected.counts
    if expected.fragment is not None:
        options = {"format": args[args.index("--format") + 1]} if "--format" in args else {}
        frame = read_dataset(path, **options)
        errors = frame.filter(pl.col(STATUS) != STATUS_OK).get_column(ERROR).to_list()
        assert errors and all(expected.fragment in e for e in errors), errors


def test_the_table_covers_every_kind_of_file():
    """At least the hostile inputs issue 15 names, and cases for every format family."""
    ids = {c[0] for c in CASES}
    for needed in ("json-nested-200k-deep", "json-5000-digit-id", "json-lone-surrogate-caption", "json-lone-surrogate-path",
                   "json-list-path", "json-null-captions", "json-number-captions", "csv-nul-byte", "csv-ragged-rows", "csv-bom",
                   "csv-invalid-utf8", "parquet-number-columns"):
        assert needed in ids
    assert len(ids) == len(CASES) >= 50


def test_an_empty_caption_status_is_the_same_as_a_blank_one(tmp_path):
    """A blank ("  ") and an empty ("") caption are both empty-caption (the CSV empty cell was bad-record)."""
    path = _write(tmp_path, "t.csv", 'image,caption\na.jpg,\nb.jpg,"  "\nc.jpg,""\n')
    assert read_dataset(path).get_column(STATUS).to_list() == [STATUS_EMPTY_CAPTION] * 3
    json_path = _write(tmp_path, "t.jsonl", "\n".join(json.dumps({"image": "a.jpg", "caption": c}) for c in ("", "  ")) + "\n")
    assert read_dataset(json_path).get_column(STATUS).to_list() == [STATUS_EMPTY_CAPTION] * 2
