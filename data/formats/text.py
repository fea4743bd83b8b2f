"""Caption files: a text file, one caption per line (reference banks), no images.

``pair_id`` is ``"{line}:0"``, ``image_path`` is null, ``source`` is the file stem. A blank
line is an ``empty-caption`` row; a file with no caption at all is an error.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tbps.data.formats.base import ColumnOptions, Format, Peek
from tbps.data.formats.rows import finish, read_text, stem
from tbps.errors import TbpsError

CAPTIONS_TXT = "captions-txt"


def _detect(path: Path, peek: Peek) -> bool:
    return not path.is_dir() and peek.suffix == ".txt"


def _read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
    lines = read_text(path).splitlines()
    if not any(line.strip() for line in lines):
        raise TbpsError("the file holds no captions (it is empty or blank)", path=path)
    n = len(lines)
    return finish(
        [f"{k}:0" for k in range(n)], [None] * n, lines, [None] * n, [None] * n,
        [None] * n, [None] * n, source=stem(path), resolver=None,
    )


FORMAT = Format(
    CAPTIONS_TXT,
    "one caption per line (reference banks); `image_path` is null",
    "a `.txt` file",
    _detect,
    _read,
    default_root=None,
    no_person_ids="none in this format",
)
