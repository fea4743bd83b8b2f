"""The reader options every command that reads a dataset takes, as one dataclass.

:class:`ReaderOptions` is the base of ``ReadConfig`` and of the stage configs that read data
(``ScoreConfig``, ``TrainConfig``, ``EvalConfig``, ``SearchConfig``): the five fields, their
checks, and :meth:`ReaderOptions.reader_options`, the keyword options of
:func:`tbps.data.readers.read_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbps.data.formats import FORMATS
from tbps.data.formats.base import COLUMN_OPTIONS
from tbps.errors import UsageError


@dataclass(kw_only=True)
class ReaderOptions:
    """How to read a dataset; field names equal the CLI option names.

    Attributes:
        format: one of :data:`tbps.data.formats.FORMATS`; detected from the path and content
            when ``None``.
        image_root: the directory image paths resolve in; the format's default when ``None``
            (next to the file, see each format module).
        image_col: image path column of a csv/jsonl/parquet table.
        caption_col: caption column of a csv/jsonl/parquet table.
        id_col: person id column of a csv/jsonl/parquet table, or ``"folder"`` for an image
            folder (the parent folder name is the person id).
    """

    format: str | None = None
    image_root: str | Path | None = None
    image_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}", value=self.format)
        for name in COLUMN_OPTIONS:
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise UsageError(f"--{name.replace('_', '-')} must not be empty", value=value)

    def reader_options(self) -> dict[str, Any]:
        """The keyword options of :func:`tbps.data.readers.read_dataset`, as given."""
        return {
            "format": self.format,
            "image_root": self.image_root,
            "image_col": self.image_col,
            "caption_col": self.caption_col,
            "id_col": self.id_col,
        }
