"""What a dataset format is: the :class:`Format` record every format module builds, and the
safe reading every format shares.

A format module (``pedes.py``, ``tables.py``, ...) defines one or more :class:`Format` values;
``tbps.data.formats`` lists them, in detection order, in ``FORMATS``. Detection and reading
share one :class:`Peek` of the path, so a large JSON file is parsed once.

Dataset files are untrusted input. :func:`read_bytes` checks a file when it opens it (a regular
file: no FIFO, device or directory, so ``/dev/zero`` or a named pipe is one error line instead
of a hang), and :func:`parse_json` turns everything the JSON parser can throw (nesting deeper
than it recurses, an integer of thousands of digits, bytes that are not UTF-8) into one
:class:`TbpsError` naming the file and where in it, or into values the readers can judge per row.

A dataset path may also name several JSON files read as one dataset (:func:`json_files`): a
directory holding ``.json`` files and no images, or a glob pattern (``'mals/*.json'``, quoted
so the shell leaves it alone). Their files are read in sorted order, so ids are the same on
every run.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import polars as pl

from tbps.errors import TbpsError

# The reader options that name columns, as field names (the options are --image-col ...).
COLUMN_OPTIONS = ("image_col", "caption_col", "id_col")

# A format's ``path_kind``: what the dataset path must be.
FILE = "file"
DIRECTORY = "directory"
FILE_OR_DIRECTORY = "file or directory"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GLOB_CHARS = re.compile(r"[*?\[]")
NEWLINE = b"\n"

# What ``tbps info`` says when a dataset has no person ids at all (a format may say more).
NO_PERSON_IDS = "none in the data"


class ColumnOptions(Protocol):
    """The column options a reader sees (``tbps.data.options.ReaderOptions`` has them)."""

    image_col: str | None
    caption_col: str | None
    id_col: str | None


# --------------------------------------------------------------------------- paths


def printable(text: str) -> str:
    """A name as text that can be printed and stored: lone surrogates (undecodable bytes) escaped as ``\\udcff``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_pattern(path: Path) -> bool:
    """Whether ``path`` is a glob pattern (``*``, ``?`` or ``[``) rather than an existing path."""
    return not path.exists() and bool(_GLOB_CHARS.search(str(path)))


def check_exists(path: Path) -> None:
    """Refuse a dataset path that is neither an existing file or folder nor a pattern matching JSON files.

    Raises:
        TbpsError: nothing there, a pattern that matches nothing, or one that matches other files.
    """
    if path.exists():
        return
    if not is_pattern(path):
        raise TbpsError("no such file or directory", path=path, field="data")
    matches = sorted(glob.glob(str(path)))
    if not matches:
        raise TbpsError("no file matches the pattern", path=path, field="data")
    other = [m for m in matches if not m.lower().endswith(".json")]
    if other:
        raise TbpsError(
            f"a pattern is read as one dataset of JSON files only; it also matches {printable(other[0])!r}",
            path=path,
            field="data",
            hint="Narrow the pattern to .json files, or pass one file (a folder of Parquet files is read as one table)",
        )


def json_files(path: Path) -> list[Path] | None:
    """The JSON files a directory or a pattern names, in sorted order; ``None`` when it names none.

    A directory counts when its top level holds ``.json`` files and no image files (an image
    folder with a stray ``.json`` stays an image folder). Hidden files and tbps temporaries
    are skipped.

    Args:
        path: a dataset path.

    Returns:
        The sorted regular ``.json`` files, or ``None``.
    """
    if path.is_dir():
        try:
            entries = sorted(path.iterdir())
        except OSError:
            return None
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
            return None
        found = [p for p in entries if p.suffix.lower() == ".json" and not p.name.startswith(".") and p.is_file()]
        return found or None
    if is_pattern(path):
        found = sorted(Path(p) for p in glob.glob(str(path)) if p.lower().endswith(".json"))
        return [p for p in found if p.is_file()] or None
    return None


def file_prefixes(files: list[Path]) -> list[str]:
    """The ``pair_id`` prefix and ``source`` of each of several files: its stem, or its path when stems repeat.

    ``mals/g_4x_attrs.json`` is ``g_4x_attrs``; files of a pattern spanning folders whose stems
    repeat (``cuhk/train.json``, ``icfg/train.json``) are named by their path below the common
    folder, without the suffix (``cuhk/train``).

    Raises:
        TbpsError: two files would get the same name.
    """
    stems = [printable(f.stem) for f in files]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.abspath(f.parent) for f in files])
    names = [printable(posixpath.splitext(Path(os.path.relpath(os.path.abspath(f), common)).as_posix())[0]) for f in files]
    if len(set(names)) < len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise TbpsError(f"several files would share the name {twice[0]!r} in the pair ids", path=files[0].parent, field="data")
    return names


# --------------------------------------------------------------------------- safe reading


def _kind_of_mode(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path) -> None:
    """Refuse a path that is not a regular file (for files another library opens itself).

    Raises:
        TbpsError: missing, unreadable, or a FIFO, device, socket or directory.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TbpsError(f"cannot be read ({exc.strerror})", path=path) from None
    if not stat.S_ISREG(mode):
        raise TbpsError(f"not a regular file ({_kind_of_mode(mode)})", path=path)


def read_bytes(path: Path) -> bytes:
    """The bytes of a regular file, checked on the descriptor it is read from.

    The file is opened non-blocking, so a FIFO opens at once instead of waiting for a writer,
    and ``fstat`` of the open descriptor decides: a FIFO, device, socket or directory is refused
    without reading a byte.

    Raises:
        TbpsError: the file cannot be opened, is not a regular file, or does not fit in memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TbpsError(f"cannot be read ({exc.strerror})", path=path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TbpsError(f"not a regular file ({_kind_of_mode(info.st_mode)})", path=path)
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    except MemoryError:
        raise TbpsError(f"too large to read into memory ({info.st_size:,} bytes)", path=path) from None
    except OSError as exc:
        raise TbpsError(f"cannot be read ({exc.strerror})", path=path) from None
    finally:
        os.close(fd)


class LongNumber:
    """A JSON integer too long for Python's ``int()`` (over 4,300 digits), kept as its digits.

    Person ids and pair ids may be written as numbers; such an id is kept as the text it was
    written as. Anywhere text is required (an image path, a caption) it is a wrong type, like
    any other number.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __str__(self) -> str:
        return self.digits

    def __repr__(self) -> str:
        return f"LongNumber({len(self.digits)} digits)"


def _parse_int(text: str) -> int | LongNumber:
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return LongNumber(text)


def type_name(value: Any) -> str:
    """A value's type as messages name it (a long JSON integer is an ``int``)."""
    return "int" if isinstance(value, LongNumber) else type(value).__name__


# ``"..."`` strings (escapes included) and the characters that open, close or separate JSON values.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.S)


def _deepest(raw: bytes) -> tuple[int, int, int | None]:
    """(deepest nesting, its byte offset, the top-level record it is in) of JSON text, by a token scan."""
    depth = best = at = record = 0
    best_record = None
    for m in _JSON_TOKENS.finditer(raw):
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > best:
                best, at, best_record = depth, m.start(), record
        elif c in b"]}":
            depth -= 1
        elif c == 0x2C and depth == 1:  # a comma between top-level records
            record += 1
    return best, at, best_record


def _too_deep(raw: bytes, path: object, line_no: int | None = None) -> TbpsError:
    """The error for JSON nested deeper than the parser recurses, naming where."""
    depth, at, record = _deepest(raw)
    limit = f"; the parser stops at about {sys.getrecursionlimit():,} levels"
    if line_no is not None:
        return TbpsError(f"line {line_no}: JSON nested {depth:,} levels deep{limit}", path=path)
    line = raw.count(b"\n", 0, at) + 1
    column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
    return TbpsError(f"JSON nested {depth:,} levels deep at line {line} column {column}{limit}", path=path, record=record)


def parse_json(raw: bytes, path: object, line_no: int | None = None) -> Any:
    """Parse JSON text; every way it can fail is one :class:`TbpsError` naming the place.

    An integer too long for ``int()`` is kept as a :class:`LongNumber` (a second parse, only
    when the first one meets such an integer).

    Args:
        raw: the JSON text (UTF-8; a leading BOM is allowed).
        path: the file, for messages.
        line_no: the line of a JSON Lines file this text is, for messages.

    Raises:
        TbpsError: invalid JSON, not UTF-8, or nested deeper than the parser recurses.
    """
    where = f"line {line_no}: " if line_no is not None else ""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    hook: dict = {}
    for _attempt in range(2):
        try:
            return json.loads(raw, **hook)
        except json.JSONDecodeError as exc:
            if line_no is not None:
                raise TbpsError(f"invalid JSON on line {line_no} (column {exc.colno}): {exc.msg}", path=path) from None
            raise TbpsError(
                f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path,
                hint="If this is JSON Lines (one object per line), pass --format jsonl",
            ) from None
        except UnicodeDecodeError as exc:
            at = f"byte {exc.start}" if line_no is not None else f"line {raw.count(NEWLINE, 0, exc.start) + 1}, byte {exc.start}"
            raise TbpsError(f"{where}not UTF-8 text ({at})", path=path) from None
        except RecursionError:
            raise _too_deep(raw, path, line_no) from None
        except ValueError as exc:
            if hook:
                raise TbpsError(f"{where}not readable as JSON ({exc})", path=path) from None
            hook = {"parse_int": _parse_int}  # an integer of thousands of digits: parse again, keeping it as text
    raise AssertionError("unreachable")


def load_json(path: Path) -> list:
    """Parse a JSON dataset file and check that it is a non-empty list.

    Args:
        path: the JSON file.

    Returns:
        The parsed list of records.

    Raises:
        TbpsError: the file is not a regular file, empty, invalid JSON, not UTF-8, nested too
            deeply, or not a non-empty list.
    """
    raw = read_bytes(path)
    if not raw or raw.isspace():
        raise TbpsError("the file is empty", path=path)
    obj = parse_json(raw, path)
    del raw
    if isinstance(obj, dict):
        keys = sorted(obj)[:20]
        raise TbpsError(
            f"expected a JSON list of records at the top level, found an object with keys {keys}",
            path=path,
        )
    if not isinstance(obj, list):
        raise TbpsError(f"expected a JSON list of records at the top level, found a {type_name(obj)}", path=path)
    if not obj:
        raise TbpsError("the file holds no records (an empty list)", path=path)
    return obj


# --------------------------------------------------------------------------- formats


class Peek:
    """A dataset path and its parsed content, read at most once and shared by detection and reading.

    For several JSON files (:func:`json_files`), :meth:`json` holds the first file's records:
    detection looks at that file, and the reader reads the others itself.

    Args:
        path: the dataset file or folder, or a pattern.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list | None = None
        self._files: list[Path] | None | bool = False  # False: not looked for yet

    @property
    def suffix(self) -> str:
        """The path's suffix, lower case (``".json"``)."""
        return self.path.suffix.lower()

    @property
    def files(self) -> list[Path] | None:
        """The JSON files a directory or pattern names (:func:`json_files`), else ``None``."""
        if self._files is False:
            self._files = json_files(self.path)
        return self._files

    @property
    def json_path(self) -> Path:
        """The JSON file :meth:`json` parses: the path itself, or the first of several files."""
        return self.files[0] if self.files else self.path

    def json(self) -> list:
        """The file parsed as a JSON list of records (parsed on the first call only).

        Raises:
            TbpsError: the file is empty, not JSON, not UTF-8, or not a non-empty list.
        """
        if self._records is None:
            self._records = load_json(self.json_path)
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
        no_person_ids: what ``tbps info`` says when the data read has no person id at all.
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
    no_person_ids: str = NO_PERSON_IDS
