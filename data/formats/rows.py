"""Building a pair table row by row: the code every format reader shares.

Rows are gathered in plain lists (:class:`Rows`) and become one frame at the end
(:func:`finish`), where each distinct image path is resolved once inside the image root and
the per-row statuses are settled: a bad record found while reading, then a refused path, then
an empty caption (the first that applies wins).
"""

from __future__ import annotations

import json
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
    STATUS_EMPTY_CAPTION,
    STATUS_OK,
    polars_schema,
)
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


def as_id(value: Any) -> str | None:
    """A person id as a string: 12 -> "12", 12.0 -> "12", None -> None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def as_split(value: Any) -> str | None:
    """A split name as a string, None when absent."""
    return None if value is None else str(value)


def stem(path: Path) -> str:
    """The ``source`` of a generic file or folder: the file's stem, or the folder's name."""
    return path.stem if path.is_file() else path.name


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM dropped); TbpsError when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TbpsError(f"not UTF-8 text (byte {exc.start})", path=path) from None


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
