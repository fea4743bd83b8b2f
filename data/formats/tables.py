"""Generic tables: CSV, JSON Lines and Parquet (a file, or a folder of Parquet files).

A table has an image path column and a caption column (``--image-col`` / ``--caption-col``,
guessed from common names when not given) and an optional person id column (``--id-col``,
``person_id`` when present). ``pair_id`` is the table's own ``pair_id`` column when it has
one (its values must be unique), else ``"{row}:0"``; ``split`` comes from a ``split`` column;
``source`` is the file (or folder) stem. Images resolve in the file's folder by default.

Every row of the file is a row of the pair table, and what is wrong with a row is its status:

- CSV is parsed by Python's ``csv`` module (every value stays text as written, ``007`` too):
  a row with more or fewer fields than the header is ``bad-record`` naming its line; a cell
  that is not UTF-8 is ``bad-record`` naming the column; an empty caption cell is
  ``empty-caption``, like a blank one; a quote that never closes is one error naming the line
  where the record starts.
- JSON Lines is parsed line by line: a line that is not an object is ``bad-record``; an image
  path or caption that is not a string (a number, a list, null) is ``bad-record`` naming the
  column; an id, split or ``pair_id`` may be a number (kept as its digits). A line that is not
  JSON is one error naming the line.
- Parquet columns have types: an image or caption column that is not text, or an id column
  that is neither text nor numbers, is one error naming the column and its type.

A null cell in the image or caption column is ``bad-record``, naming the column (a CSV has no
nulls: its empty cells are empty text).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from tbps.columns import PAIR_ID, SPLIT, STATUS_BAD_RECORD
from tbps.data.formats.base import (
    COLUMN_OPTIONS,
    FILE,
    FILE_OR_DIRECTORY,
    ColumnOptions,
    Format,
    Peek,
    check_regular,
    parse_json,
    printable,
    read_bytes,
    type_name,
)
from tbps.data.formats.rows import finish, id_text, stem
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError

CSV = "csv"
JSONL = "jsonl"
PARQUET = "parquet"

# Column names guessed when no option names them, in order of preference.
IMAGE_COL_GUESSES = ("image_path", "image", "file_path", "img_path")
CAPTION_COL_GUESSES = ("caption", "text")
ID_COL_GUESSES = ("person_id",)

_PARQUET_SUFFIXES = (".parquet", ".pq")
_NUMBER = "number"  # a JSON Lines cell that held a number: text where an id may be one


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A table as loaded, with what the loader found wrong in its rows and cells.

    Attributes:
        frame: the table, one row per data row of the file.
        cells: ``{column: {row: kind}}`` for cells that held something other than text (a
            JSON ``number``, ``list``, ``dict``, ``bool``, or ``invalid UTF-8`` bytes); the value
            in ``frame`` is the number's digits, else null.
        rows: ``{row: reason}`` for rows broken as a whole (a ragged CSV line, a JSON Lines
            line that is not an object).
    """

    frame: pl.DataFrame
    cells: dict[str, dict[int, str]] = field(default_factory=dict)
    rows: dict[int, str] = field(default_factory=dict)


def _text_frame(columns: dict[str, list], cells: dict[str, dict[int, str]], kind: str) -> pl.DataFrame:
    """Columns of text as a frame; a value that is not valid Unicode becomes null and a ``kind`` cell."""
    schema = {name: pl.String for name in columns}
    try:
        return pl.DataFrame(columns, schema=schema)
    except UnicodeEncodeError:  # rare: find the cells row by row
        pass
    for name, values in columns.items():
        for k, value in enumerate(values):
            if value is not None and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    values[k] = None
                    cells.setdefault(name, {})[k] = kind
    return pl.DataFrame(columns, schema=schema)


def _load_csv(path: Path) -> Loaded:
    """A CSV file, every value text; ragged rows and undecodable cells are recorded, not fatal."""
    raw = read_bytes(path)
    if not raw.strip():
        raise TbpsError("the file is empty", path=path)
    try:
        text = raw.decode("utf-8-sig")
        undecodable = False
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="surrogateescape")  # bad bytes kept, found per cell below
        undecodable = True
    del raw
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start, k = 1, 0
    try:
        header = next(reader)
        names = [printable(name) for name in header]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise TbpsError(f"the header names column {twice[0]!r} more than once (columns {names})", path=path, field=twice[0])
        width = len(names)
        values: list[list[str]] = [[] for _ in names]
        appends = [v.append for v in values]
        broken: dict[int, str] = {}
        start = reader.line_num + 1
        for record in reader:
            if not record:
                start = reader.line_num + 1
                continue  # a blank line is no row
            if len(record) != width:
                broken[k] = f"row {k} (line {start}): {len(record)} fields, the header has {width}"
                record = (record + [""] * width)[:width]
            for append, value in zip(appends, record):
                append(value)
            k += 1
            start = reader.line_num + 1
    except csv.Error as exc:
        raise TbpsError(f"not readable as CSV: the record starting on line {start}: {exc}", path=path) from None
    columns = dict(zip(names, values))
    cells: dict[str, dict[int, str]] = {}
    frame = _text_frame(columns, cells, "invalid UTF-8") if undecodable else pl.DataFrame(columns, schema={n: pl.String for n in names})
    return Loaded(frame, cells, broken)


def _load_jsonl(path: Path) -> Loaded:
    """JSON Lines, parsed line by line: each value's JSON type is kept so that wrong types are per-row statuses."""
    raw = read_bytes(path)
    if not raw.strip():
        raise TbpsError("the file is empty", path=path)
    columns: dict[str, list] = {}
    cells: dict[str, dict[int, str]] = {}
    broken: dict[int, str] = {}
    row = 0
    loads = json.loads
    for line_no, line in enumerate(io.BytesIO(raw), start=1):
        if not line.strip():
            continue  # blank lines are allowed between records
        try:
            rec = loads(line)
        except (ValueError, RecursionError):
            rec = parse_json(line, path, line_no)  # one error naming the line (or a number too long for int)
        if type(rec) is not dict:
            broken[row] = f"row {row} (line {line_no}) is a JSON {type_name(rec)}, not an object"
        else:
            for key, value in rec.items():
                name = printable(key)
                col = columns.get(name)
                if col is None:
                    col = columns[name] = []
                if len(col) < row:
                    col.extend([None] * (row - len(col)))
                if value is None or type(value) is str:
                    col.append(value)
                    continue
                text, problem = id_text(value)
                # Numbers are kept as their digits (ids and splits may be numbers); anything else is null.
                kind = _NUMBER if problem is None else (str(value) if isinstance(value, float) else type_name(value))
                cells.setdefault(name, {})[row] = kind
                col.append(text)
        row += 1
    del raw
    if not columns:
        raise TbpsError("no line holds a JSON object", path=path)
    for col in columns.values():
        col.extend([None] * (row - len(col)))
    return Loaded(_text_frame(columns, cells, "invalid Unicode (a lone surrogate)"), cells, broken)


def _load_parquet(path: Path) -> Loaded:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _PARQUET_SUFFIXES and not p.name.startswith(".") and p.is_file())
    else:
        files = [path]
    for f in files:
        check_regular(f)
    return Loaded(pl.read_parquet(files))


def _load(path: Path, name: str, load: Callable[[Path], Loaded]) -> Loaded:
    """Read a table as it is, every failure a TbpsError naming the path."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise TbpsError("the file is empty", path=path)
        loaded = load(path)
    except TbpsError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise TbpsError(f"cannot be read as {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path=path) from None
    frame = loaded.frame
    loaded.frame = frame.rename({c: c.lstrip("\ufeff") for c in frame.columns if c.startswith("\ufeff")})
    return loaded


# --------------------------------------------------------------------------- columns


def _pick_column(frame: pl.DataFrame, given: str | None, guesses: Iterable[str], what: str, option: str, path: Path, required: bool) -> str | None:
    """The column named by an option, or the one guess present; TbpsError otherwise."""
    found = frame.columns
    if given is not None:
        if given not in found:
            raise TbpsError(f"no {what} column {given!r} (from {option}); found columns {found}", path=path, field=given)
        return given
    present = [g for g in guesses if g in found]
    if len(present) == 1:
        return present[0]
    if len(present) > 1:
        raise TbpsError(
            f"several possible {what} columns {present}; name one with {option}", path=path
        )
    if required:
        raise TbpsError(
            f"no {what} column: expected one of {list(guesses)} or a name given with {option}; found columns {found}",
            path=path,
        )
    return None


def _string_column(frame: pl.DataFrame, col: str, path: Path, *, text_only: bool) -> list[str | None]:
    """A column's values as text; a column of the wrong type is one error naming it.

    Image paths and captions must be text (or all null); ids, splits and ``pair_id`` may be
    numbers (``12.0`` is ``"12"``).
    """
    dtype = frame.schema[col]
    if isinstance(dtype, (pl.List, pl.Array, pl.Struct)):
        raise TbpsError(f"column holds {dtype}, expected one value per row", path=path, field=col)
    text = dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum))
    if not text and (text_only or not dtype.is_numeric()):
        expected = "text" if text_only else "text or numbers"
        raise TbpsError(f"column holds {dtype}, expected {expected}", path=path, field=col, hint="Convert the column, or name another one")
    series = frame.get_column(col)
    if dtype.is_float():
        values = series.drop_nulls()
        if (values.is_finite() & (values.abs() < 2.0**53) & (values == values.round())).all():
            series = series.cast(pl.Int64)  # person ids read as floats (12.0) are written "12"
    return series.cast(pl.String, strict=False).to_list()


def _cell_problems(loaded: Loaded, columns: dict[str, bool], problems: dict[int, list[str]]) -> None:
    """Add the loader's per-row and per-cell findings for the columns used (``{column: text only}``)."""
    for k, reason in loaded.rows.items():
        problems.setdefault(k, []).append(reason)
    for col, text_only in columns.items():
        for k, kind in loaded.cells.get(col, {}).items():
            if kind == _NUMBER and not text_only:
                continue  # an id written as a number
            what = "a string" if text_only else "a string or number"
            found = kind if kind.startswith("invalid") else f"a {kind}"
            problems.setdefault(k, []).append(f"row {k}: column {col!r} holds {found}, not {what}")


def _unique_ids(pair_id: list[str], path: Path) -> None:
    """Refuse a ``pair_id`` column whose values repeat (a pair table's ids are unique)."""
    ids = pl.Series(pair_id, dtype=pl.String)
    if ids.n_unique() == len(ids):
        return
    first = ids.filter(ids.is_duplicated())[0]
    rows = [k for k, p in enumerate(pair_id) if p == first][:2]
    raise TbpsError(
        f"pair_id {first!r} is in rows {rows[0]} and {rows[1]}; every pair needs its own id",
        path=path,
        field=PAIR_ID,
        hint="Fix the ids, or drop the pair_id column to number the rows",
    )


def _read_table(loaded: Loaded, path: Path, options: ColumnOptions, root: Path, captions_only: bool) -> pl.DataFrame:
    """The pair table of a loaded table."""
    frame = loaded.frame
    if frame.height == 0:
        raise TbpsError(f"the table has no rows (columns {frame.columns})", path=path)
    image_col = _pick_column(frame, options.image_col, IMAGE_COL_GUESSES, "image path", "--image-col", path, not captions_only)
    caption_col = _pick_column(frame, options.caption_col, CAPTION_COL_GUESSES, "caption", "--caption-col", path, True)
    id_col = _pick_column(frame, options.id_col, ID_COL_GUESSES, "person id", "--id-col", path, False)
    n = frame.height
    rel = _string_column(frame, image_col, path, text_only=True) if image_col else [None] * n
    caption = _string_column(frame, caption_col, path, text_only=True)
    person = _string_column(frame, id_col, path, text_only=False) if id_col else [None] * n
    split = _string_column(frame, SPLIT, path, text_only=False) if SPLIT in frame.columns else [None] * n
    if PAIR_ID in frame.columns:
        given = _string_column(frame, PAIR_ID, path, text_only=False)
        pair_id = [p if p else f"{k}:0" for k, p in enumerate(given)]
        _unique_ids(pair_id, path)
    else:
        pair_id = [f"{k}:0" for k in range(n)]
    used = {c: True for c in (image_col, caption_col) if c} | {c: False for c in (id_col, SPLIT, PAIR_ID) if c and c in frame.columns}
    problems: dict[int, list[str]] = {}
    _cell_problems(loaded, used, problems)
    status: list[str | None] = [None] * n
    error: list[str | None] = [None] * n
    for k, reasons in problems.items():
        status[k], error[k] = STATUS_BAD_RECORD, "; ".join(reasons)
    for k in range(n):
        # A null cell is a broken row, not an empty caption: name the column that is missing.
        if status[k] is not None:
            continue
        if image_col and rel[k] is None:
            status[k], error[k] = STATUS_BAD_RECORD, f"row {k}: missing value in column {image_col!r}"
        elif caption[k] is None:
            status[k], error[k] = STATUS_BAD_RECORD, f"row {k}: missing value in column {caption_col!r}"
    resolver = ImageResolver(root) if image_col else None
    return finish(pair_id, rel, caption, person, split, status, error, source=stem(path), resolver=resolver)


# --------------------------------------------------------------------------- the formats


def _table_format(
    name: str, description: str, files: str, detect: Callable[[Path, Peek], bool], load: Callable[[Path], Loaded], path_kind: str
) -> Format:
    """The :class:`Format` of one table kind."""

    def read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
        return _read_table(_load(path, name, load), path, options, root, captions_only)

    def default_root(path: Path) -> Path:
        return path if path.is_dir() else path.parent

    return Format(name, description, files, detect, read, default_root, path_kind, frozenset(COLUMN_OPTIONS),
                  no_person_ids="none: the table has no person id column (name one with --id-col)")


def _has_suffix(*suffixes: str) -> Callable[[Path, Peek], bool]:
    def detect(path: Path, peek: Peek) -> bool:
        return not path.is_dir() and peek.suffix in suffixes

    return detect


def _is_parquet(path: Path, peek: Peek) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in _PARQUET_SUFFIXES for p in path.iterdir() if p.is_file())
    return peek.suffix in _PARQUET_SUFFIXES


_COLUMNS_TEXT = "`--image-col`, `--caption-col` (guessed from common names), optional `--id-col`; images resolve next to the file"

FORMATS = (
    _table_format(CSV, f"a table; {_COLUMNS_TEXT}", "a `.csv` file", _has_suffix(".csv"), _load_csv, FILE),
    _table_format(JSONL, f"a table, one JSON object per line; {_COLUMNS_TEXT}", "a `.jsonl` / `.ndjson` file",
                  _has_suffix(".jsonl", ".ndjson"), _load_jsonl, FILE),
    _table_format(PARQUET, f"a table; {_COLUMNS_TEXT}", "a `.parquet` / `.pq` file, or a folder of them",
                  _is_parquet, _load_parquet, FILE_OR_DIRECTORY),
)
