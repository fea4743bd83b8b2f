"""What a dataset format is: the :class:`Format` record every format module builds.

A format module (``pedes.py``, ``tables.py``, ...) defines one or more :class:`Format` values;
``tbps.data.formats`` lists them, in detection order, in ``FORMATS``. Detection and reading
share one :class:`Peek` of the path, so a large JSON file is parsed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import polars as pl

from tbps.errors import TbpsError

# The reader options that name columns, as field names (the options are --image-col ...).
COLUMN_OPTIONS = ("image_col", "caption_col", "id_col")

# A format's ``path_kind``: what the dataset path must be.
FILE = "file"
DIRECTORY = "directory"
FILE_OR_DIRECTORY = "file or directory"


class ColumnOptions(Protocol):
    """The column options a reader sees (``tbps.data.options.ReaderOptions`` has them)."""

    image_col: str | None
    caption_col: str | None
    id_col: str | None


class Peek:
    """A dataset path and its parsed content, read at most once and shared by detection and reading.

    Args:
        path: the dataset file or folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list | None = None

    @property
    def suffix(self) -> str:
        """The path's suffix, lower case (``".json"``)."""
        return self.path.suffix.lower()

    def json(self) -> list:
        """The file parsed as a JSON list of records (parsed on the first call only).

        Raises:
            TbpsError: the file is empty, not JSON, not UTF-8, or not a non-empty list.
        """
        if self._records is None:
            self._records = load_json(self.path)
        return self._records

    def take_json(self) -> list:
        """The parsed records, handed over: this peek forgets them (the reader may empty the list)."""
        records = self.json()
        self._records = None
        return records


@dataclass(frozen=True)
class Format:
    """One dataset format: how to recognise it, read it, and where its images are.

    Attributes:
        name: the ``--format`` value.
        description: one line for ``--help`` and the README table.
        files: the file (and fields) it reads, for the README table.
        detect: ``detect(path, peek)``: whether an existing ``path`` is in this format. Formats
            are tried in ``FORMATS`` order and the first that says yes wins.
        read: ``read(path, options, root, captions_only, peek)``: the pair table
            (``PAIR_SCHEMA``); ``root`` is the image root (``None`` for formats without
            images); ``captions_only`` means no image column is needed (caption banks).
        default_root: ``default_root(path)``: the image root when ``--image-root`` is not
            given; ``None`` for a format without images (the root is then ignored).
        path_kind: ``FILE``, ``DIRECTORY`` or ``FILE_OR_DIRECTORY``.
        columns: the column options (:data:`COLUMN_OPTIONS` names) the format accepts.
        check_columns: further checks of the accepted column options' values, or ``None``.
    """

    name: str
    description: str
    files: str
    detect: Callable[[Path, Peek], bool]
    read: Callable[[Path, ColumnOptions, Path | None, bool, Peek], pl.DataFrame]
    default_root: Callable[[Path], Path] | None
    path_kind: str = FILE
    columns: frozenset[str] = field(default_factory=frozenset)
    check_columns: Callable[[ColumnOptions], None] | None = None


def load_json(path: Path) -> list:
    """Parse a JSON dataset file and check that it is a non-empty list.

    Args:
        path: the JSON file.

    Returns:
        The parsed list of records.

    Raises:
        TbpsError: the file is empty, invalid JSON, not UTF-8, or not a non-empty list.
    """
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
