"""Generic tables: CSV, JSON Lines and Parquet (a file, or a folder of Parquet files).

A table has an image path column and a caption column (``--image-col`` / ``--caption-col``,
guessed from common names when not given) and an optional person id column (``--id-col``,
``person_id`` when present). ``pair_id`` is the table's own ``pair_id`` column when it has
one, else ``"{row}:0"``; ``split`` comes from a ``split`` column; ``source`` is the file (or
folder) stem. A null cell in the image or caption column makes the row ``bad-record``, naming
the column. Images resolve in the file's folder by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from tbps.columns import PAIR_ID, SPLIT, STATUS_BAD_RECORD
from tbps.data.formats.base import COLUMN_OPTIONS, FILE, FILE_OR_DIRECTORY, ColumnOptions, Format, Peek
from tbps.data.formats.rows import as_id, finish, stem
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


# --------------------------------------------------------------------------- loading


def _load_csv(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema=False)  # every column a string: ids stay as written


def _load_jsonl(path: Path) -> pl.DataFrame:
    """JSON Lines via Polars; on failure, line by line to name the bad line."""
    try:
        return pl.read_ndjson(path, infer_schema_length=None)
    except pl.exceptions.PolarsError:
        pass
    records = []
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh):
            if not line.strip():
                continue  # blank lines are allowed between records
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TbpsError(f"invalid JSON on line {k + 1}: {exc.msg}", path=path, record=k) from None
            # Mixed value types are why Polars failed: keep every value as text.
            records.append({str(key): as_id(v) for key, v in rec.items()} if isinstance(rec, dict) else {})
    return pl.DataFrame(records, infer_schema_length=None)


def _load_parquet(path: Path) -> pl.DataFrame:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _PARQUET_SUFFIXES) if path.is_dir() else path
    return pl.read_parquet(files)


def _load(path: Path, name: str, load: Callable[[Path], pl.DataFrame]) -> pl.DataFrame:
    """Read a table as it is, every failure a TbpsError naming the path."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise TbpsError("the file is empty", path=path)
        frame = load(path)
    except TbpsError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise TbpsError(f"cannot be read as {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path=path) from None
    return frame.rename({c: c.lstrip("\ufeff") for c in frame.columns if c.startswith("\ufeff")})


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


def _string_column(frame: pl.DataFrame, col: str, path: Path) -> list[str | None]:
    dtype = frame.schema[col]
    if isinstance(dtype, (pl.List, pl.Array, pl.Struct)):
        raise TbpsError(f"column holds {dtype}, expected one value per row", path=path, field=col)
    series = frame.get_column(col)
    if dtype.is_float():
        values = series.drop_nulls()
        if (values == values.round()).all():
            series = series.cast(pl.Int64)  # person ids read as floats (12.0) are written "12"
    return series.cast(pl.String, strict=False).to_list()


def _read_table(frame: pl.DataFrame, path: Path, options: ColumnOptions, root: Path, captions_only: bool) -> pl.DataFrame:
    """The pair table of a loaded table."""
    if frame.height == 0:
        raise TbpsError(f"the table has no rows (columns {frame.columns})", path=path)
    image_col = _pick_column(frame, options.image_col, IMAGE_COL_GUESSES, "image path", "--image-col", path, not captions_only)
    caption_col = _pick_column(frame, options.caption_col, CAPTION_COL_GUESSES, "caption", "--caption-col", path, True)
    id_col = _pick_column(frame, options.id_col, ID_COL_GUESSES, "person id", "--id-col", path, False)
    n = frame.height
    rel = _string_column(frame, image_col, path) if image_col else [None] * n
    caption = _string_column(frame, caption_col, path)
    person = _string_column(frame, id_col, path) if id_col else [None] * n
    split = _string_column(frame, SPLIT, path) if SPLIT in frame.columns else [None] * n
    if PAIR_ID in frame.columns:
        given = _string_column(frame, PAIR_ID, path)
        pair_id = [p if p is not None else f"{k}:0" for k, p in enumerate(given)]
    else:
        pair_id = [f"{k}:0" for k in range(n)]
    status: list[str | None] = [None] * n
    error: list[str | None] = [None] * n
    for k in range(n):
        # A null cell is a broken row, not an empty caption: name the column that is missing.
        if image_col and rel[k] is None:
            status[k], error[k] = STATUS_BAD_RECORD, f"row {k}: missing value in column {image_col!r}"
        elif caption[k] is None:
            status[k], error[k] = STATUS_BAD_RECORD, f"row {k}: missing value in column {caption_col!r}"
    resolver = ImageResolver(root) if image_col else None
    return finish(pair_id, rel, caption, person, split, status, error, source=stem(path), resolver=resolver)


# --------------------------------------------------------------------------- the formats


def _table_format(
    name: str, description: str, files: str, detect: Callable[[Path, Peek], bool], load: Callable[[Path], pl.DataFrame], path_kind: str
) -> Format:
    """The :class:`Format` of one table kind."""

    def read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
        return _read_table(_load(path, name, load), path, options, root, captions_only)

    def default_root(path: Path) -> Path:
        return path if path.is_dir() else path.parent

    return Format(name, description, files, detect, read, default_root, path_kind, frozenset(COLUMN_OPTIONS))


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
