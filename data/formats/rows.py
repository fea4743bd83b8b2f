"""Building a pair table row by row: the code every format reader shares.

Rows are gathered in plain lists (:class:`Rows`) and become one frame at the end
(:func:`finish`), where each distinct image path is resolved once inside the image root and
the per-row statuses are settled: a bad record found while reading, then a refused path, then
an empty caption (the first that applies wins).

Besides what the readers find, :func:`finish` marks as ``bad-record`` a caption, person id,
split or image path that is not valid Unicode (a lone surrogate, from a ``\\ud800`` escape or a
file name in another encoding: such text cannot be stored or printed) and a caption holding a
NUL byte. An empty person id or split is no id (null); an empty or blank caption is
``empty-caption`` in every format.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    polars_schema,
)
from tbps.data.formats.base import LongNumber, printable, read_bytes, type_name
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError


class Rows:
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
        """Append one row; ``status``/``error`` name a problem found while reading."""
        self.pair_id.append(pair_id)
        self.rel.append(rel)
        self.caption.append(caption)
        self.person.append(person)
        self.split.append(split)
        self.status.append(status)
        self.error.append(error)


def id_text(value: Any) -> tuple[str | None, str | None]:
    """An id-like value (a person id, a pair id, a split name) as text, or what is wrong with it.

    Text stays as written; a number is its digits (``12`` and ``12.0`` are ``"12"``, a number
    of thousands of digits too); null is no id. A list, an object, a boolean, NaN or infinity
    is not an id.

    Returns:
        ``(text, None)``, or ``(None, "a list, not a string or number")``.
    """
    if value is None or type(value) is str:
        return value, None
    if isinstance(value, bool):
        return None, "a bool, not a string or number"
    if isinstance(value, (int, LongNumber)):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"{value}, not a string or finite number"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    return None, f"a {type_name(value)}, not a string or number"


def stem(path: Path) -> str:
    """The ``source`` of a generic file or folder: the file's stem, or the folder's name."""
    return path.stem if path.is_file() else path.name


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM dropped); TbpsError when it is not a regular file or not UTF-8."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TbpsError(f"not UTF-8 text (line {line}, byte {exc.start})", path=path) from None


def finish(
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
    """Resolve the image paths (each distinct path once) and build the pair table.

    Args:
        pair_id, rel, caption, person, split, status, error: the columns of :class:`Rows`.
        source: the ``source`` value of every row.
        resolver: resolves ``rel`` inside the image root; ``None`` for a format without images.

    Returns:
        The pair table, exactly ``PAIR_SCHEMA``.
    """
    n = len(pair_id)
    none = (None, STATUS_OK, None)
    hits = resolver.resolve_all(rel) if resolver is not None else [none] * n
    image_path = [h[0] for h in hits]
    # Precedence: a bad record (found while reading), then a refused path, then an empty caption.
    keep = [s is not None and (s != STATUS_EMPTY_CAPTION or h[1] == STATUS_OK) for s, h in zip(status, hits)]
    final_status = [s if k else h[1] for s, h, k in zip(status, hits, keep)]
    final_error = [e if k else h[2] for e, h, k in zip(error, hits, keep)]
    columns = {
        PAIR_ID: pair_id,
        IMAGE_PATH: image_path,
        CAPTION: caption,
        PERSON_ID: person,
        SPLIT: split,
        SOURCE: [source] * n,
        STATUS: final_status,
        ERROR: final_error,
    }
    try:
        frame = pl.DataFrame(columns, schema=polars_schema(PAIR_SCHEMA))
    except UnicodeEncodeError:  # rare: a lone surrogate somewhere; find it row by row
        _refuse_invalid_unicode(columns)
        frame = pl.DataFrame(columns, schema=polars_schema(PAIR_SCHEMA))
    return _flag_captions(frame)


# The fields whose text a row cannot do without, as messages name them. An image path that
# is not valid Unicode is a real file whose name is in another encoding: it cannot be stored
# in the table's text column, so its row is refused rather than pointed at another name.
_TEXT_FIELDS = {CAPTION: "caption", PERSON_ID: "person id", SPLIT: "split", IMAGE_PATH: "image path"}


def _valid(text: str | None) -> bool:
    if text is None or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_invalid_unicode(columns: dict[str, list]) -> None:
    """Rows with a field that is not valid Unicode become ``bad-record`` (in place); names are escaped."""
    status, error = columns[STATUS], columns[ERROR]
    for name, what in _TEXT_FIELDS.items():
        values = columns[name]
        for k, value in enumerate(values):
            if not _valid(value):
                values[k] = None
                if status[k] != STATUS_BAD_RECORD:
                    status[k] = STATUS_BAD_RECORD
                    error[k] = f"the {what} {printable(value)!r} is not valid Unicode (a lone surrogate)"
    for name in (PAIR_ID, SOURCE, ERROR):
        columns[name] = [v if _valid(v) else printable(v) for v in columns[name]]


def _flag_captions(frame: pl.DataFrame) -> pl.DataFrame:
    """Empty ids become null; a caption with a NUL byte is ``bad-record``; a blank one ``empty-caption``.

    A NUL byte is a bad record (it is never text: a file misread, or binary data), so it
    outranks the other statuses except an earlier bad record; a null, empty or whitespace
    caption of an ``ok`` row is ``empty-caption``.
    """
    nul = (pl.col(STATUS) != STATUS_BAD_RECORD) & pl.col(CAPTION).str.contains("\x00", literal=True).fill_null(False)
    frame = frame.with_columns(
        pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in (PERSON_ID, SPLIT)
    ).with_columns(
        pl.when(nul).then(pl.lit(STATUS_BAD_RECORD)).otherwise(pl.col(STATUS)).alias(STATUS),
        pl.when(nul).then(pl.lit("the caption holds a NUL byte")).otherwise(pl.col(ERROR)).alias(ERROR),
    )
    blank = (pl.col(STATUS) == STATUS_OK) & (
        pl.col(CAPTION).is_null() | (pl.col(CAPTION).str.strip_chars() == "")
    )
    return frame.with_columns(
        pl.when(blank).then(pl.lit(STATUS_EMPTY_CAPTION)).otherwise(pl.col(STATUS)).alias(STATUS),
        pl.when(blank).then(pl.lit("empty or blank caption")).otherwise(pl.col(ERROR)).alias(ERROR),
    )
