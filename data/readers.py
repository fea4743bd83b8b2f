"""Dataset readers: every supported dataset becomes one pair table with ``PAIR_SCHEMA``.

One call, :func:`read_dataset`, reads any of the formats below into a Polars frame with
exactly the columns of :data:`tbps.columns.PAIR_SCHEMA` (``pair_id``, ``image_path``,
``caption``, ``person_id``, ``split``, ``source``, ``status``, ``error``), one row per caption.

==============  ===================================================  =====================
format          file and fields                                      default image root
==============  ===================================================  =====================
cuhk-pedes      ``reid_raw.json`` (also ``CUHK-PEDES.json``,          ``imgs/`` next to the
                ``caption_all.json``): a list of ``{"split",          json if it exists,
                "captions": [...], "file_path", "processed_tokens",  else the json's folder
                "id"}``
icfg-pedes      ``ICFG-PEDES.json``: the same fields as CUHK-PEDES    same
rstpreid        ``data_captions.json``: ``{"id", "img_path",          same
                "captions": [...], "split"}``
aptm            APTM/MALS processed json: ``{"image", "caption",      ``images/`` next to
                "image_id", "label"}``, ``caption`` a string          the json if it exists,
                (training files) or a list (test files);             else the json's folder
                ``image_id`` is the person id
csv / jsonl /   a table with an image column and a caption column    the file's folder
parquet         (``--image-col`` / ``--caption-col``, guessed from
                common names), an optional person id column
                (``--id-col``, default ``person_id`` if present)
image-folder    a directory of images, each with a same-named         the folder itself
                ``.txt`` (one caption per line), sub-folders too
captions-txt    a text file, one caption per line (reference          none (no images)
                banks); ``image_path`` is null
==============  ===================================================  =====================

Conventions (shared with the synthetic world generator):

- ``pair_id``: JSON formats ``"{record}:{caption}"`` (caption index 0 for one-caption
  records); tables ``"{row}:0"`` unless the table has a ``pair_id`` column; image folders
  ``"{relative image path}:{line}"``; captions-txt ``"{line}:0"``.
- ``source``: the format name for the named formats; the file (or folder) stem for generic
  tables, image folders and caption files.
- ``split`` from the record/column when present, else null. ``person_id`` as a string
  (``12`` -> ``"12"``), null when the dataset has none. For an image folder, ``--id-col
  folder`` takes the person id from each image's parent folder name (null for images at
  the top of the folder).
- Image folders: an image without a ``.txt`` is one ``empty-caption`` row; a ``.txt``
  without an image gives ``bad-record`` rows; a blank line is an ``empty-caption`` row.
  Symlinked sub-folders are walked when they stay inside the image root (each real folder
  once); one leading outside is a ``path-outside-root`` row and is neither listed nor read.
- Large files: rows are gathered in plain lists and become one frame at the end; each
  distinct image path is resolved once; the garbage collector is paused while reading.

Per-row problems are statuses, and every input caption gives exactly one row: a record that
lacks a required field is ``bad-record`` naming the field, an image path that leaves the image
root is ``path-outside-root`` (:mod:`tbps.data.paths`; the file is never opened), an empty or
blank caption is ``empty-caption``. When several apply, the first in that order wins.
Problems with the file as a whole (not found, empty, invalid JSON, wrong top-level type, a file
that is none of the formats, a missing column) raise :class:`TbpsError` naming the path and
the fields expected and found. Images are not opened here; whether they exist and decode is
checked by :func:`tbps.data.images.open_image` when they are used.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from tbps.columns import (
    CAPTION,
    ERROR,
    IMAGE_PATH,
    PAIR_ID,
    PAIR_SCHEMA,
    PERSON_ID,
    SOURCE,
    SPLIT,
    STATUS,
    STATUS_BAD_RECORD,
    STATUS_EMPTY_CAPTION,
    STATUS_OK,
    STATUS_PATH_OUTSIDE_ROOT,
    polars_schema,
)
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError, UsageError

CUHK_PEDES = "cuhk-pedes"
ICFG_PEDES = "icfg-pedes"
RSTPREID = "rstpreid"
APTM = "aptm"
CSV = "csv"
JSONL = "jsonl"
PARQUET = "parquet"
IMAGE_FOLDER = "image-folder"
CAPTIONS_TXT = "captions-txt"

FORMATS = (CUHK_PEDES, ICFG_PEDES, RSTPREID, APTM, CSV, JSONL, PARQUET, IMAGE_FOLDER, CAPTIONS_TXT)
TABLE_FORMATS = (CSV, JSONL, PARQUET)

# Column names guessed for generic tables when no option names them, in order of preference.
IMAGE_COL_GUESSES = ("image_path", "image", "file_path", "img_path")
CAPTION_COL_GUESSES = ("caption", "text")
ID_COL_GUESSES = ("person_id",)
# The --id-col value that takes an image folder's person id from each image's parent folder.
FOLDER_ID = "folder"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class _JsonSpec:
    """The fields of one JSON dataset format."""

    path_key: str
    captions_key: str
    id_key: str
    fields: tuple[str, ...]  # every field of a record, as the format documents it

    @property
    def required(self) -> tuple[str, str]:
        return (self.path_key, self.captions_key)


_CUHK_FIELDS = ("split", "captions", "file_path", "processed_tokens", "id")
JSON_SPECS = {
    CUHK_PEDES: _JsonSpec("file_path", "captions", "id", _CUHK_FIELDS),
    ICFG_PEDES: _JsonSpec("file_path", "captions", "id", _CUHK_FIELDS),
    RSTPREID: _JsonSpec("img_path", "captions", "id", ("id", "img_path", "captions", "split")),
    APTM: _JsonSpec("image", "caption", "image_id", ("image", "caption", "image_id", "label")),
}
# Default image folder next to the json: the releases of CUHK-PEDES, ICFG-PEDES and RSTPReid
# ship ``imgs/``; ``tbps synth`` writes its APTM-format pool beside ``images/``.
_IMGS_DIR = {CUHK_PEDES: "imgs", ICFG_PEDES: "imgs", RSTPREID: "imgs", APTM: "images"}


@dataclass
class ReadConfig:
    """What to read and how: the reader options shared by every command that reads data.

    Args:
        data: the dataset file or folder.
        format: one of :data:`FORMATS`; detected from the path and content when ``None``.
        image_root: the directory image paths resolve in; per-format default when ``None``
            (see the module docstring).
        image_col: image path column of a csv/jsonl/parquet table.
        caption_col: caption column of a csv/jsonl/parquet table.
        id_col: person id column of a csv/jsonl/parquet table, or ``"folder"`` for an image
            folder (the parent folder name is the person id).
    """

    data: Path
    format: str | None = None
    image_root: Path | None = None
    image_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}", value=self.format)
        if not self.data.exists():
            raise TbpsError("no such file or directory", path=self.data, field="data")
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
            if not self.image_root.is_dir():
                raise TbpsError("the image root is not a directory", path=self.image_root, field="image_root")
        for name in ("image_col", "caption_col", "id_col"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise UsageError(f"--{name.replace('_', '-')} must not be empty", value=value)


@dataclass
class Dataset:
    """A dataset as read: the pair table and how it was read.

    Attributes:
        pairs: the pair table (``PAIR_SCHEMA``).
        format: the format it was read as.
        path: the file or folder read.
        image_root: the resolved image root, or ``None`` for caption files.
    """

    pairs: pl.DataFrame
    format: str
    path: Path
    image_root: str | None


# --------------------------------------------------------------------------- detection


def _load_json(path: Path) -> list:
    """Parse a JSON dataset file and check that it is a non-empty list."""
    raw = path.read_bytes()
    if not raw or raw.isspace():
        raise TbpsError("the file is empty", path=path)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TbpsError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            path=path,
            hint="If this is JSON Lines (one object per line), pass --format jsonl",
        ) from None
    except UnicodeDecodeError as exc:
        raise TbpsError(f"not UTF-8 text (byte {exc.start})", path=path) from None
    if isinstance(obj, dict):
        keys = sorted(obj)[:20]
        raise TbpsError(
            f"expected a JSON list of records at the top level, found an object with keys {keys}",
            path=path,
        )
    if not isinstance(obj, list):
        raise TbpsError(f"expected a JSON list of records at the top level, found a {type(obj).__name__}", path=path)
    if not obj:
        raise TbpsError("the file holds no records (an empty list)", path=path)
    return obj


def _found_keys(records: list, limit: int = 1000) -> list[str]:
    """The keys seen in the first ``limit`` records (for error messages)."""
    keys: set[str] = set()
    for rec in records[:limit]:
        if isinstance(rec, dict):
            keys.update(map(str, rec))
    return sorted(keys)


def _expected_fields_text() -> str:
    parts = [f"{name} expects {list(spec.fields)}" for name, spec in JSON_SPECS.items()]
    return "; ".join(parts)


def _detect_json(records: list, path: Path) -> str:
    """The JSON format whose required fields most of the first records have."""
    sample = [r for r in records[:1000] if isinstance(r, dict)]
    counts = {}
    for name in (CUHK_PEDES, RSTPREID, APTM):  # icfg-pedes shares CUHK's fields
        required = JSON_SPECS[name].required
        counts[name] = sum(1 for r in sample if all(k in r for k in required))
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        found = _found_keys(records)
        kinds = sorted({type(r).__name__ for r in records[:1000]})
        raise TbpsError(
            f"the records match none of the JSON formats: {_expected_fields_text()}; "
            f"found keys {found[:30]} in records of type {kinds}",
            path=path,
            hint="For another table, convert it to csv/jsonl/parquet and use --image-col/--caption-col",
        )
    if best == CUHK_PEDES and _looks_like_icfg(sample, path):
        return ICFG_PEDES
    return best


def _looks_like_icfg(sample: list[dict], path: Path) -> bool:
    """ICFG-PEDES has CUHK's fields; its name or its ``train/``/``test/`` paths tell it apart."""
    if "icfg" in path.name.lower():
        return True
    paths = [str(r.get("file_path", "")).replace("\\", "/") for r in sample[:100]]
    return bool(paths) and all(p.startswith(("train/", "test/")) for p in paths)


def _dir_has_parquet(path: Path) -> bool:
    return any(p.suffix.lower() in (".parquet", ".pq") for p in path.iterdir() if p.is_file())


def detect_format(path: Path | str) -> str:
    """Tell the format of a dataset from its path and, for JSON, its records.

    Directories are image folders (or parquet datasets when they hold ``*.parquet`` files);
    ``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq`` and ``.txt`` go by suffix; ``.json``
    files are parsed and matched on their record fields (ICFG-PEDES by name or paths).

    Args:
        path: the dataset file or folder.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        TbpsError: the path does not exist, its suffix is unknown, or its JSON matches no format.
    """
    with _gc_paused():
        fmt, _ = _detect(Path(path))
    return fmt


def _detect(path: Path) -> tuple[str, list | None]:
    """The format, plus the parsed JSON records when detection had to parse them."""
    if not path.exists():
        raise TbpsError("no such file or directory", path=path)
    if path.is_dir():
        return (PARQUET if _dir_has_parquet(path) else IMAGE_FOLDER), None
    suffix = path.suffix.lower()
    by_suffix = {".csv": CSV, ".jsonl": JSONL, ".ndjson": JSONL, ".parquet": PARQUET, ".pq": PARQUET}
    if suffix in by_suffix:
        return by_suffix[suffix], None
    if suffix == ".txt":
        return CAPTIONS_TXT, None
    if suffix == ".json":
        records = _load_json(path)
        return _detect_json(records, path), records
    raise TbpsError(
        f"cannot tell the dataset format from the suffix {suffix or '(none)'!r}",
        path=path,
        hint=f"Pass --format, one of {', '.join(FORMATS)}",
    )


# --------------------------------------------------------------------------- building rows


class _Rows:
    """Column lists for a pair table, filled row by row, turned into one frame at the end."""

    def __init__(self) -> None:
        self.pair_id: list[str] = []
        self.rel: list[str | None] = []  # image path as written (resolved at the end)
        self.caption: list[str | None] = []
        self.person: list[str | None] = []
        self.split: list[str | None] = []
        self.status: list[str | None] = []  # a problem found while reading; None = not yet known
        self.error: list[str | None] = []

    def add(self, pair_id, rel, caption, person, split, status=None, error=None) -> None:
        self.pair_id.append(pair_id)
        self.rel.append(rel)
        self.caption.append(caption)
        self.person.append(person)
        self.split.append(split)
        self.status.append(status)
        self.error.append(error)


def _as_id(value: Any) -> str | None:
    """A person id as a string: 12 -> "12", 12.0 -> "12", None -> None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _as_split(value: Any) -> str | None:
    return None if value is None else str(value)


def _finish(
    pair_id: list[str],
    rel: list[str | None],
    caption: list[str | None],
    person: list[str | None],
    split: list[str | None],
    status: list[str | None],
    error: list[str | None],
    source: str,
    resolver: ImageResolver | None,
) -> pl.DataFrame:
    """Resolve the image paths (each distinct path once) and build the pair table."""
    n = len(pair_id)
    resolved: dict[str, tuple[str | None, str, str | None]] = {}
    if resolver is not None:
        for r in set(rel):
            if r is not None:
                resolved[r] = resolver.resolve(r)
    none = (None, STATUS_OK, None)
    hits = [resolved.get(r, none) if r is not None else none for r in rel]
    image_path = [h[0] for h in hits]
    # Precedence: a bad record (found while reading), then a refused path, then an empty caption.
    keep = [s is not None and (s != STATUS_EMPTY_CAPTION or h[1] == STATUS_OK) for s, h in zip(status, hits)]
    final_status = [s if k else h[1] for s, h, k in zip(status, hits, keep)]
    final_error = [e if k else h[2] for e, h, k in zip(error, hits, keep)]
    frame = pl.DataFrame(
        {
            PAIR_ID: pair_id,
            IMAGE_PATH: image_path,
            CAPTION: caption,
            PERSON_ID: person,
            SPLIT: split,
            SOURCE: [source] * n,
            STATUS: final_status,
            ERROR: final_error,
        },
        schema=polars_schema(PAIR_SCHEMA),
    )
    return _flag_blank_captions(frame)


def _flag_blank_captions(frame: pl.DataFrame) -> pl.DataFrame:
    """Mark ``ok`` rows whose caption is null, empty or whitespace as ``empty-caption``."""
    blank = (pl.col(STATUS) == STATUS_OK) & (
        pl.col(CAPTION).is_null() | (pl.col(CAPTION).str.strip_chars() == "")
    )
    return frame.with_columns(
        pl.when(blank).then(pl.lit(STATUS_EMPTY_CAPTION)).otherwise(pl.col(STATUS)).alias(STATUS),
        pl.when(blank).then(pl.lit("empty or blank caption")).otherwise(pl.col(ERROR)).alias(ERROR),
    )


# --------------------------------------------------------------------------- JSON formats


def _json_rows(records: list, spec: _JsonSpec) -> _Rows:
    """One row per caption of each record; problems become per-row statuses."""
    rows = _Rows()
    appends = tuple(col.append for col in (rows.pair_id, rows.rel, rows.caption, rows.person, rows.split, rows.status, rows.error))
    pid_a, rel_a, cap_a, per_a, spl_a, st_a, err_a = appends
    path_key, caps_key, id_key = spec.path_key, spec.captions_key, spec.id_key
    for i, rec in enumerate(records):
        # Fast path for well-formed records (millions of them in MALS); anything unusual goes
        # to _record_rows, which names the field at fault.
        if type(rec) is dict and type(rel := rec.get(path_key)) is str:
            caps = rec.get(caps_key)
            if type(caps) is str:
                caps = (caps,)
            elif type(caps) is not list or not caps or not all(type(c) is str for c in caps):
                _record_rows(rows, i, rec, spec)
                continue
            person = rec.get(id_key)
            person = person if type(person) is str else _as_id(person)
            split = rec.get("split")
            split = split if split is None or type(split) is str else str(split)
            for j, cap in enumerate(caps):
                pid_a(f"{i}:{j}")
                rel_a(rel)
                cap_a(cap)
                per_a(person)
                spl_a(split)
                st_a(None)
                err_a(None)
        else:
            _record_rows(rows, i, rec, spec)
    return rows


def _record_rows(rows: _Rows, i: int, rec: Any, spec: _JsonSpec) -> None:
    """The rows of one record that is not plainly well formed, each problem named."""
    add = rows.add
    path_key, caps_key = spec.path_key, spec.captions_key
    if not isinstance(rec, dict):
        # Keep the record as a row so that nothing in the input disappears silently.
        add(f"{i}:0", None, None, None, None, STATUS_BAD_RECORD, f"record {i} is not an object (found {type(rec).__name__})")
        return
    rel = rec.get(path_key)
    problem = None
    if rel is None:
        problem = f"record {i}: missing field {path_key!r}"
    elif not isinstance(rel, str):
        problem = f"record {i}: field {path_key!r} is a {type(rel).__name__}, not a string"
        rel = None
    person, split = _as_id(rec.get(spec.id_key)), _as_split(rec.get("split"))
    caps = rec.get(caps_key)
    if isinstance(caps, str):
        caps = [caps]  # training files of APTM (and some CUHK exports) hold one caption
    if caps is None or not isinstance(caps, list):
        what = "missing field" if caps is None else f"field is a {type(caps).__name__}, not a list or string:"
        msg = f"record {i}: {what} {caps_key!r}"
        add(f"{i}:0", rel, None, person, split, STATUS_BAD_RECORD, f"{problem}; {msg}" if problem else msg)
        return
    if not caps:
        status = STATUS_BAD_RECORD if problem else STATUS_EMPTY_CAPTION
        add(f"{i}:0", rel, None, person, split, status, problem or f"record {i}: {caps_key!r} is an empty list")
        return
    for j, cap in enumerate(caps):
        # Each caption is its own pair; a non-string caption spoils only its own row.
        if problem:
            add(f"{i}:{j}", rel, cap if isinstance(cap, str) else None, person, split, STATUS_BAD_RECORD, problem)
        elif not isinstance(cap, str):
            msg = f"record {i}: {caps_key!r}[{j}] is a {type(cap).__name__}, not a string"
            add(f"{i}:{j}", rel, None, person, split, STATUS_BAD_RECORD, msg)
        else:
            add(f"{i}:{j}", rel, cap, person, split)


def _read_json(path: Path, fmt: str, records: list | None, root: Path) -> pl.DataFrame:
    if records is None:
        records = _load_json(path)
    spec = JSON_SPECS[fmt]
    sample = [r for r in records[:1000] if isinstance(r, dict)]
    if not any(all(k in r for k in spec.required) for r in sample):
        raise TbpsError(
            f"none of the first records has the fields {fmt} expects ({list(spec.fields)}, "
            f"required {list(spec.required)}); found keys {_found_keys(records)[:30]}",
            path=path,
            field="format",
            hint="Leave --format out to detect the format, or pick the matching one",
        )
    rows = _json_rows(records, spec)
    records.clear()  # our own parsed copy: free the records before the table is built
    return _finish(**vars(rows), source=fmt, resolver=ImageResolver(root))


# --------------------------------------------------------------------------- tables


def _read_table_file(path: Path, fmt: str) -> pl.DataFrame:
    """Read a csv/jsonl/parquet file (or a folder of parquet files) as it is."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise TbpsError("the file is empty", path=path)
        if fmt == CSV:
            frame = pl.read_csv(path, infer_schema=False)  # every column a string: ids stay as written
        elif fmt == JSONL:
            frame = _read_jsonl(path)
        else:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".pq")) if path.is_dir() else path
            frame = pl.read_parquet(files)
    except TbpsError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise TbpsError(f"cannot be read as {fmt}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path=path) from None
    return frame.rename({c: c.lstrip("\ufeff") for c in frame.columns if c.startswith("\ufeff")})


def _read_jsonl(path: Path) -> pl.DataFrame:
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
            records.append({str(key): _as_id(v) for key, v in rec.items()} if isinstance(rec, dict) else {})
    return pl.DataFrame(records, infer_schema_length=None)


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


def _read_table(path: Path, fmt: str, config: ReadConfig, root: Path, captions_only: bool = False) -> pl.DataFrame:
    frame = _read_table_file(path, fmt)
    if frame.height == 0:
        raise TbpsError(f"the table has no rows (columns {frame.columns})", path=path)
    image_col = _pick_column(frame, config.image_col, IMAGE_COL_GUESSES, "image path", "--image-col", path, not captions_only)
    caption_col = _pick_column(frame, config.caption_col, CAPTION_COL_GUESSES, "caption", "--caption-col", path, True)
    id_col = _pick_column(frame, config.id_col, ID_COL_GUESSES, "person id", "--id-col", path, False)
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
    return _finish(pair_id, rel, caption, person, split, status, error, source=_stem(path), resolver=resolver)


def _stem(path: Path) -> str:
    return path.stem if path.is_file() else path.name


# --------------------------------------------------------------------------- text formats


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TbpsError(f"not UTF-8 text (byte {exc.start})", path=path) from None


def _read_captions_txt(path: Path) -> pl.DataFrame:
    lines = _read_text(path).splitlines()
    if not any(line.strip() for line in lines):
        raise TbpsError("the file holds no captions (it is empty or blank)", path=path)
    n = len(lines)
    return _finish(
        [f"{k}:0" for k in range(n)], [None] * n, lines, [None] * n, [None] * n,
        [None] * n, [None] * n, source=_stem(path), resolver=None,
    )


def _read_image_folder(folder: Path, root: Path, person_from_folder: bool) -> pl.DataFrame:
    """Images with same-named ``.txt`` captions, one pair per caption line, sub-folders too."""
    rows = _Rows()
    resolver = ImageResolver(root)
    folder = Path(os.path.abspath(folder))  # resolver takes relative paths as relative to the root
    top = os.path.realpath(folder)
    seen_dirs = {top}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        rel_dir = posixpath.normpath(Path(dirpath).relative_to(folder).as_posix())
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for d in sorted(dirnames):
            # Symlinked sub-folders are followed only when they stay inside the image root,
            # and each real folder once (a link back up would loop forever).
            real = os.path.realpath(os.path.join(dirpath, d))
            rel = posixpath.join(rel_dir, d)
            refused = resolver.resolve(os.path.join(dirpath, d))
            if refused[1] != STATUS_OK:
                rows.add(f"{rel}:0", None, None, None, None, STATUS_PATH_OUTSIDE_ROOT, f"sub-folder skipped: {refused[2]}")
            elif real not in seen_dirs:
                seen_dirs.add(real)
                keep.append(d)
        dirnames[:] = keep
        person = (posixpath.basename(rel_dir) or None) if person_from_folder else None
        by_stem: dict[str, list[str]] = {}
        texts: dict[str, str] = {}
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                by_stem.setdefault(stem, []).append(name)
            elif suffix.lower() == ".txt":
                texts[stem] = name
        for stem in sorted(set(by_stem) | set(texts)):
            _folder_pairs(rows, resolver, dirpath, rel_dir, by_stem.get(stem, []), texts.get(stem), person)
    if not rows.pair_id:
        raise TbpsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or .txt captions found in the folder", path=folder)
    return _finish(**vars(rows), source=_stem(folder), resolver=resolver)


def _folder_pairs(rows: _Rows, resolver: ImageResolver, dirpath: str, rel_dir: str, images: list[str], text: str | None, person: str | None) -> None:
    """The rows of one stem: every image x every caption line of its ``.txt``."""
    lines: list[str] | None = None
    problem = None
    if text is not None:
        text_path = os.path.join(dirpath, text)
        _, status, reason = resolver.resolve(text_path)
        if status != STATUS_OK:
            problem = (status, f"caption file not read: {reason}")  # never read a file outside the root
        else:
            try:
                lines = _read_text(Path(text_path)).splitlines()
            except TbpsError as exc:
                problem = (STATUS_BAD_RECORD, str(exc))
    targets = [(posixpath.join(rel_dir, name), os.path.join(dirpath, name)) for name in images]
    if not targets:  # captions without an image: keep them visible as rows
        rel_txt = posixpath.join(rel_dir, text)
        for k, line in enumerate(lines or [None]):
            rows.add(f"{rel_txt}:{k}", None, line, person, None, STATUS_BAD_RECORD, f"no image next to the caption file {rel_txt!r}")
        return
    for rel, absolute in targets:
        if problem is not None:
            rows.add(f"{rel}:0", absolute, None, person, None, *problem)
        elif lines is None:
            rows.add(f"{rel}:0", absolute, None, person, None, STATUS_EMPTY_CAPTION, f"no caption file {posixpath.splitext(rel)[0] + '.txt'!r}")
        elif not lines:
            rows.add(f"{rel}:0", absolute, "", person, None)
        else:
            for k, line in enumerate(lines):
                # One caption per line; each line is its own pair.
                rows.add(f"{rel}:{k}", absolute, line, person, None)


# --------------------------------------------------------------------------- entry points


def _default_root(path: Path, fmt: str) -> Path:
    """The image root when none is given (see the module docstring)."""
    if fmt == IMAGE_FOLDER:
        return path
    folder = path if path.is_dir() else path.parent
    sub = _IMGS_DIR.get(fmt)
    if sub and (folder / sub).is_dir():
        return folder / sub
    return folder


def _check_options(config: ReadConfig, fmt: str) -> None:
    """Column options only make sense for tables (and --id-col folder for image folders)."""
    given = [f"--{n.replace('_', '-')}" for n in ("image_col", "caption_col", "id_col") if getattr(config, n) is not None]
    if fmt in TABLE_FORMATS or not given:
        return
    if fmt == IMAGE_FOLDER and given == ["--id-col"]:
        if config.id_col != FOLDER_ID:
            raise UsageError(f"for an image folder, --id-col only accepts {FOLDER_ID!r} (the parent folder name)", value=config.id_col)
        return
    raise UsageError(f"{', '.join(given)} only apply to csv/jsonl/parquet tables, not to {fmt} ({config.data})")


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while millions of records are built.

    Parsing and reshaping a large JSON file allocates millions of dicts and lists that all
    stay alive, so every collection scans them again for nothing (measured: ``json.loads`` of
    1.5M APTM records 39 s with the collector on, 17 s with it off). Nothing built here forms
    reference cycles. The previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read(config: ReadConfig, *, captions_only: bool = False) -> Dataset:
    """Read a dataset into a pair table.

    Args:
        config: what to read and the reader options.
        captions_only: tables need no image column (for caption banks).

    Returns:
        The :class:`Dataset`: the pair table (``PAIR_SCHEMA``), the format and image root.

    Raises:
        TbpsError: the file is unreadable or none of the formats.
        UsageError: options that do not apply to the format.
    """
    with _gc_paused():
        return _read(config, captions_only)


def _read(config: ReadConfig, captions_only: bool) -> Dataset:
    path = config.data
    records = None
    if config.format is None:
        fmt, records = _detect(path)
    else:
        fmt = config.format
    _check_options(config, fmt)
    if fmt == CAPTIONS_TXT:
        return Dataset(_read_captions_txt(path), fmt, path, None)
    if fmt == IMAGE_FOLDER and not path.is_dir():
        raise TbpsError("the image-folder format needs a directory", path=path, field="format")
    if fmt != IMAGE_FOLDER and fmt != PARQUET and path.is_dir():
        raise TbpsError(f"the {fmt} format needs a file, this is a directory", path=path, field="format")
    root = config.image_root if config.image_root is not None else _default_root(path, fmt)
    if fmt in JSON_SPECS:
        pairs = _read_json(path, fmt, records, root)
    elif fmt in TABLE_FORMATS:
        pairs = _read_table(path, fmt, config, root, captions_only=captions_only)
    else:
        pairs = _read_image_folder(path, root, person_from_folder=config.id_col == FOLDER_ID)
    return Dataset(pairs, fmt, path, os.path.realpath(root))


def read_dataset(
    path: Path | str,
    *,
    format: str | None = None,
    image_root: Path | str | None = None,
    image_col: str | None = None,
    caption_col: str | None = None,
    id_col: str | None = None,
) -> pl.DataFrame:
    """Read any supported dataset into a pair table with exactly ``PAIR_SCHEMA``.

    Args:
        path: the dataset file or folder.
        format: one of :data:`FORMATS`; detected when ``None``.
        image_root: where image paths resolve; the per-format default when ``None``.
        image_col: image path column of a table.
        caption_col: caption column of a table.
        id_col: person id column of a table; ``"folder"`` for an image folder.

    Returns:
        A Polars frame, one row per caption, every input caption accounted for.

    Raises:
        TbpsError: the file is unreadable or none of the formats.
    """
    config = ReadConfig(Path(path), format, None if image_root is None else Path(image_root), image_col, caption_col, id_col)
    return read(config).pairs


def read_captions(path: Path | str, **reader_opts: Any) -> list[str]:
    """The non-blank captions of a dataset or a text file (one caption per line), in order.

    Used for reference banks: images are irrelevant, so a table needs only a caption column.

    Args:
        path: any readable dataset, or a ``.txt`` file.
        **reader_opts: the keyword options of :func:`read_dataset`.

    Returns:
        The captions, in file order, without empty or blank ones.
    """
    config = ReadConfig(Path(path), **reader_opts)
    pairs = read(config, captions_only=True).pairs
    kept = pairs.filter(pl.col(CAPTION).is_not_null() & (pl.col(CAPTION).str.strip_chars() != ""))
    return kept.get_column(CAPTION).to_list()


# --------------------------------------------------------------------------- summary (tbps info)


@dataclass
class DatasetSummary:
    """What ``tbps info`` prints about a dataset.

    Attributes:
        path, format, image_root: how it was read.
        rows: number of pairs.
        statuses: rows per status.
        splits: rows per split (``None`` for no split).
        persons: distinct person ids.
        images: distinct image paths (resolved ones).
        caption_words: min / mean / median / max words per non-null caption.
        head: the first rows.
    """

    path: str
    format: str
    image_root: str | None
    rows: int
    statuses: dict[str, int]
    splits: dict[str | None, int]
    persons: int
    images: int
    caption_words: dict[str, float]
    head: pl.DataFrame

    def renderables(self) -> list:
        """Rich tables: the overview, the status and split counts, the first rows."""
        from rich.table import Table

        overview = Table(title=f"{self.path}", show_header=False)
        words = self.caption_words
        for key, value in (
            ("format", self.format),
            ("image root", self.image_root or "-"),
            ("rows", f"{self.rows:,}"),
            ("persons", f"{self.persons:,}"),
            ("images", f"{self.images:,}"),
            ("caption words", f"min {words['min']:.0f} | mean {words['mean']:.1f} | median {words['median']:.0f} | max {words['max']:.0f}"),
        ):
            overview.add_row(key, str(value))
        counts = Table("status", "rows", title="statuses")
        for key, value in self.statuses.items():
            counts.add_row(key, f"{value:,}")
        splits = Table("split", "rows", title="splits")
        for key, value in self.splits.items():
            splits.add_row("(none)" if key is None else key, f"{value:,}")
        head = Table(*self.head.columns, title=f"first {self.head.height} rows")
        for row in self.head.iter_rows():
            head.add_row(*("" if v is None else str(v) for v in row))
        return [overview, counts, splits, head]


def summarize(dataset: Dataset, head: int = 5) -> DatasetSummary:
    """Counts and caption statistics of a pair table.

    Args:
        dataset: a dataset as read by :func:`read`.
        head: how many first rows to keep for display.

    Returns:
        A :class:`DatasetSummary`.
    """
    pairs = dataset.pairs
    statuses = dict(pairs.group_by(STATUS).len().sort(STATUS).iter_rows())
    splits = dict(pairs.group_by(SPLIT).len().sort(SPLIT, nulls_last=True).iter_rows())
    words = pairs.select(pl.col(CAPTION).drop_nulls().str.count_matches(r"\S+").alias("w")).get_column("w")
    caption_words = {
        "min": float(words.min() or 0),
        "mean": float(words.mean() or 0),
        "median": float(words.median() or 0),
        "max": float(words.max() or 0),
    }
    return DatasetSummary(
        path=str(dataset.path),
        format=dataset.format,
        image_root=dataset.image_root,
        rows=pairs.height,
        statuses=statuses,
        splits=splits,
        persons=pairs.get_column(PERSON_ID).drop_nulls().n_unique(),
        images=pairs.get_column(IMAGE_PATH).drop_nulls().n_unique(),
        caption_words=caption_words,
        head=pairs.head(head).select(PAIR_ID, IMAGE_PATH, CAPTION, PERSON_ID, SPLIT, STATUS),
    )


def describe(config: ReadConfig, head: int = 5) -> DatasetSummary:
    """Read a dataset and summarise it (the core of ``tbps info``).

    Args:
        config: what to read.
        head: how many first rows to keep.

    Returns:
        A :class:`DatasetSummary`.
    """
    if head < 0:
        raise UsageError("--head must be 0 or more", value=head)
    return summarize(read(config), head=head)
