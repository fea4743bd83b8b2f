"""Dataset readers: every supported dataset becomes one pair table with ``PAIR_SCHEMA``.

One call, :func:`read_dataset`, reads any format of the registry
(:data:`tbps.data.formats.FORMATS`: webdataset tar shards, PEDES-style JSON, csv/jsonl/parquet
tables, image folders, caption files; each format module documents its fields, ``pair_id`` and
default image root)
into a Polars frame with exactly the columns of :data:`tbps.columns.PAIR_SCHEMA`
(``pair_id``, ``image_path``, ``caption``, ``person_id``, ``split``, ``source``, ``status``,
``error``), one row per caption.

Conventions (shared with the synthetic world generator):

- ``source``: the format name for the named formats; the file (or folder) stem for generic
  tables, image folders and caption files, and for each of several JSON files read as one
  dataset (a folder of ``.json`` files or a pattern: :mod:`tbps.data.formats.pedes`).
- ``split`` from the record/column when present, else null. ``person_id`` as a string
  (``12`` -> ``"12"``), null when the dataset has none (APTM/MALS has none).
- Large files: rows are gathered in plain lists and become one frame at the end; each
  distinct image path is resolved once; the garbage collector is paused while reading.

Per-row problems are statuses, and every input caption gives exactly one row: a record that
lacks a required field, holds a value of the wrong type or text that is not valid Unicode is
``bad-record`` naming the record and field, an image path that leaves the image root is
``path-outside-root`` (:mod:`tbps.data.paths`; the file is never opened), an empty or blank
caption is ``empty-caption`` (in every format). When several apply, the first in that order
wins. Problems with the file as a whole (not found, not a regular file, empty, invalid JSON,
JSON nested deeper than the parser goes, wrong top-level type, a file that is none of the
formats, a missing column or one of the wrong type) raise :class:`TbpsError` naming the path,
where in it, and the fields expected and found (:mod:`tbps.data.formats.base`). Images are not opened here; whether they exist and decode is
checked by :func:`tbps.data.images.open_image` when they are used.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tbps.columns import CAPTION, IMAGE_PATH, PAIR_ID, PERSON_ID, SOURCE, SPLIT, STATUS, STATUS_OK
from tbps.data.formats import FORMATS, webdataset
from tbps.data.formats.base import COLUMN_OPTIONS, DIRECTORY, FILE, NO_PERSON_IDS, Format, Peek, check_exists
from tbps.data.options import ReaderOptions
from tbps.data.shards import image_exists
from tbps.errors import TbpsError, UsageError


@dataclass(kw_only=True)
class ReadConfig(ReaderOptions):
    """What to read and how: a dataset path and the reader options.

    Args:
        data: the dataset file or folder, or a pattern of JSON files read as one dataset.
        format, image_root, image_col, caption_col, id_col: the reader options
            (:class:`tbps.data.options.ReaderOptions`).
    """

    data: Path

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = Path(self.data)
        _check_exists(self.data)
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
            if not self.image_root.is_dir():
                raise TbpsError("the image root is not a directory", path=self.image_root, field="image_root")


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


def detect_format(path: Path | str) -> str:
    """Tell the format of a dataset from its path and, for JSON, its records.

    Directories are image folders (or parquet datasets when they hold ``*.parquet`` files);
    ``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq`` and ``.txt`` go by suffix; ``.json``
    files are parsed and matched on their record fields (ICFG-PEDES by name or paths).

    Args:
        path: the dataset file or folder.

    Returns:
        One of :data:`tbps.data.formats.FORMATS`.

    Raises:
        TbpsError: the path does not exist, its suffix is unknown, or its JSON matches no format.
    """
    path = Path(path)
    with _gc_paused():
        return _detect(path, Peek(path)).name


def _check_exists(path: Path) -> None:
    """Refuse a dataset path that names nothing: a pattern of tar shards must match one, any other path exist."""
    if webdataset.shard_pattern(path) is not None:
        webdataset.check_pattern(path)
    else:
        check_exists(path)


def _detect(path: Path, peek: Peek) -> Format:
    """The first registered format that recognises the path (JSON records parsed into ``peek``)."""
    _check_exists(path)
    for fmt in FORMATS.values():
        if fmt.detect(path, peek):
            return fmt
    raise TbpsError(
        f"cannot tell the dataset format from the suffix {peek.suffix or '(none)'!r}",
        path=path,
        hint=f"Pass --format, one of {', '.join(FORMATS)}",
    )


# --------------------------------------------------------------------------- entry points


def _check_options(config: ReadConfig, fmt: Format) -> None:
    """Column options only where the format takes them (tables; --id-col folder for image folders)."""
    given = [name for name in COLUMN_OPTIONS if getattr(config, name) is not None]
    if set(given) <= fmt.columns:
        if given and fmt.check_columns is not None:
            fmt.check_columns(config)
        return
    tables = "/".join(f.name for f in FORMATS.values() if f.columns >= set(COLUMN_OPTIONS))
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
    raise UsageError(f"{flags} only apply to {tables} tables, not to {fmt.name} ({config.data})")


def _check_path_kind(path: Path, fmt: Format) -> None:
    """A format that reads a file refuses a directory, and the other way round."""
    if fmt.path_kind == DIRECTORY and not path.is_dir():
        raise TbpsError(f"the {fmt.name} format needs a directory", path=path, field="format")
    if fmt.path_kind == FILE and path.is_dir():
        raise TbpsError(f"the {fmt.name} format needs a file, this is a directory", path=path, field="format")


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
    peek = Peek(path)
    fmt = FORMATS[config.format] if config.format is not None else _detect(path, peek)
    _check_options(config, fmt)
    _check_path_kind(path, fmt)
    if fmt.default_root is None:  # a format without images: no image root
        return Dataset(fmt.read(path, config, None, captions_only, peek), fmt.name, path, None)
    root = config.image_root if config.image_root is not None else fmt.default_root(path)
    pairs = fmt.read(path, config, root, captions_only, peek)
    return Dataset(pairs, fmt.name, path, os.path.realpath(root))


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
        path: the dataset file or folder, or a pattern of JSON files (``"mals/*.json"``).
        format: one of :data:`tbps.data.formats.FORMATS`; detected when ``None``.
        image_root: where image paths resolve; the per-format default when ``None``.
        image_col: image path column of a table.
        caption_col: caption column of a table.
        id_col: person id column of a table; ``"folder"`` for an image folder.

    Returns:
        A Polars frame, one row per caption, every input caption accounted for.

    Raises:
        TbpsError: the file is unreadable or none of the formats.
    """
    config = ReadConfig(data=Path(path), format=format, image_root=image_root, image_col=image_col, caption_col=caption_col, id_col=id_col)
    return read(config).pairs


def read_captions(path: Path | str, split: str | None = None, **reader_opts: Any) -> list[str]:
    """The non-blank captions of a dataset or a text file (one caption per line), in order.

    Used for reference banks: images are irrelevant, so a table needs only a caption column.

    Args:
        path: any readable dataset, or a ``.txt`` file.
        split: only the rows of this split, when the dataset has splits (a bank drawn from the
            test split would rank the test captions); None: every row.
        **reader_opts: the keyword options of :func:`read_dataset`.

    Returns:
        The captions, in file order, without empty or blank ones.

    Raises:
        TbpsError: the dataset has splits but not ``split``.
    """
    config = ReadConfig(data=Path(path), **reader_opts)
    pairs = read(config, captions_only=True).pairs
    if split is not None and pairs.get_column(SPLIT).is_not_null().any():
        found = sorted(pairs.get_column(SPLIT).drop_nulls().unique().to_list())
        if split not in found:
            raise TbpsError(f"the bank has no {split!r} split (it has {', '.join(found)})", path=path, field="--bank-split", value=split)
        pairs = pairs.filter(pl.col(SPLIT) == split)
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
        persons_note: when there are none, why (the format's word: MALS has none, a table
            names no id column, ...); ``None`` when there are some.
        sources: rows per ``source`` (one per file when several files are read as one).
        images: distinct image paths (resolved ones).
        image_sample: whether a sample of those files exists (:func:`sample_images`).
        caption_words: min / mean / median / max words per non-null caption.
        head: the first rows.

    ``tbps.terminal.dataset_summary`` renders it for the terminal.
    """

    path: str
    format: str
    image_root: str | None
    rows: int
    statuses: dict[str, int]
    splits: dict[str | None, int]
    persons: int
    persons_note: str | None
    sources: dict[str, int]
    images: int
    image_sample: ImageSample
    caption_words: dict[str, float]
    head: pl.DataFrame


IMAGE_SAMPLE = 200  # image paths looked for by `tbps info` and before `tbps score` does any work


@dataclass
class ImageSample:
    """Whether a dataset's image files exist, judged on an even sample of its distinct paths.

    Attributes:
        checked: paths looked for.
        found: of them, the regular files (or members of tar shards) that exist.
        missing_example: one path that does not exist, or None.
        found_elsewhere: a directory under the dataset's folder holding a file of that name
            (where a wrong ``--image-root`` should point instead), or None.
    """

    checked: int
    found: int
    missing_example: str | None = None
    found_elsewhere: str | None = None


def sample_images(pairs: pl.DataFrame, data: Path, size: int = IMAGE_SAMPLE) -> ImageSample:
    """Look for an even sample of the ok rows' image files (no decoding: a ``stat`` each).

    Args:
        pairs: a pair table as read.
        data: the dataset's path (a missing file's name is searched for below its folder).
        size: how many distinct paths to look for.
    """
    paths = pairs.filter(pl.col(STATUS) == STATUS_OK).get_column(IMAGE_PATH).drop_nulls().unique(maintain_order=True)
    if paths.len() == 0 or paths.str.len_chars().max() == 0:
        return ImageSample(0, 0)
    sample = paths.gather_every(max(1, paths.len() // size)).head(size).to_list()
    missing = [p for p in sample if not image_exists(p)]
    result = ImageSample(len(sample), len(sample) - len(missing), missing[0] if missing else None)
    if missing:
        found = _find_file(data.parent if data.is_file() else data, Path(missing[0]).name)
        result.found_elsewhere = str(found.parent) if found is not None else None
    return result


def _find_file(top: Path, name: str, limit: int = 50_000) -> Path | None:
    """The first file named ``name`` below ``top``, looking at no more than ``limit`` entries."""
    seen = 0
    for dirpath, dirs, files in os.walk(top):
        seen += len(files) + len(dirs)
        if name in files:
            return Path(dirpath) / name
        if seen > limit:
            return None
    return None


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
    persons = pairs.get_column(PERSON_ID).drop_nulls().n_unique()
    fmt = FORMATS.get(dataset.format)
    return DatasetSummary(
        path=str(dataset.path),
        format=dataset.format,
        image_root=dataset.image_root,
        rows=pairs.height,
        statuses=statuses,
        splits=splits,
        persons=persons,
        persons_note=None if persons else (fmt.no_person_ids if fmt is not None else NO_PERSON_IDS),
        sources=dict(pairs.group_by(SOURCE).len().sort(SOURCE, nulls_last=True).iter_rows()),
        images=pairs.get_column(IMAGE_PATH).drop_nulls().n_unique(),
        image_sample=sample_images(pairs, Path(dataset.path)),
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
