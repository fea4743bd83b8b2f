"""Webdataset tar shards, as img2dataset writes them: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample.

The dataset path is one ``.tar``, a directory whose top level holds ``.tar`` files (and no
images), or a quoted pattern of shards: a brace range or list (``'pool/{00000..00127}.tar'``,
``'pool/{00000,00007}.tar'``) or a glob (``'pool/*.tar'``). Shards are read in the pattern's
order (a directory's in sorted order); nothing is extracted to disk.

One row per sample (all members sharing a key: the member name up to the first ``.`` of its
base name, as webdataset groups them), in tar order:

- ``pair_id``: the key. A key met again (in another shard) is ``bad-record`` with the id
  ``"<shard>/<key>"``, so ids stay unique.
- ``image_path``: the image member inside its shard, ``<tar path>/<member name>``
  (``/data/pool/00003.tar/000030012.jpg``; :mod:`tbps.data.shards`), resolved inside the image
  root (default: the folder of the shards); images are read straight from the tar.
- ``caption``: the ``.txt`` member (UTF-8, surrounding white space dropped).
- ``person_id`` and ``split``: the ``person_id`` (``--id-col FIELD``: that field) and
  ``split`` fields of the ``.json`` member, when there is one.
- ``source``: the name of the folder holding the shards.

img2dataset's per-shard table ``00000.parquet`` beside ``00000.tar`` (``key``, ``status``,
``error_message``, ``caption``) is read too: a sample that failed to download has no member
in the tar and is a ``download-failed`` row with img2dataset's status and message; a sample
listed as downloaded that the tar does not hold is ``missing-image``.

Bad members are statuses: an image without a ``.txt`` is ``empty-caption``; a caption (or
``.json``) without an image is ``missing-image``; a caption that is not UTF-8, or a ``.json``
that is not a JSON object, is ``bad-record``; an image member that a truncated tar cuts off,
or that is a link, is ``bad-image``; a member name that is absolute or uses ``..`` is
``path-outside-root``. A shard that is truncated, corrupt, not a tar, unreadable, or missing
from a brace range (with no ``.parquet`` listing its samples) is one ``bad-record`` row with the
id ``"<shard>:shard"`` saying where its samples stop; the samples before that point are read.
A pattern that matches nothing, and a dataset none of whose shards holds a sample, is one error
line.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import stat
from pathlib import Path

import polars as pl

from tbps.columns import (
    STATUS_BAD_IMAGE,
    STATUS_BAD_RECORD,
    STATUS_DOWNLOAD_FAILED,
    STATUS_EMPTY_CAPTION,
    STATUS_MISSING_IMAGE,
    STATUS_PATH_OUTSIDE_ROOT,
)
from tbps.data.formats.base import FILE_OR_DIRECTORY, IMAGE_SUFFIXES, ColumnOptions, Format, Peek, parse_json, printable
from tbps.data.formats.rows import Rows, finish, id_text
from tbps.data.paths import ImageResolver
from tbps.data.shards import REGULAR, TAR_SUFFIX, Member, ShardIndex, member_path, scan
from tbps.errors import TbpsError

WEBDATASET = "webdataset"
CAPTION_EXT = "txt"
JSON_EXT = "json"
PERSON_FIELD = "person_id"  # the .json field read as the person id (--id-col names another)
SPLIT_FIELD = "split"
DOWNLOAD_OK = "success"  # img2dataset's status of a downloaded sample
SHARD_ROW = "shard"  # the pair id of a shard's own row is "<shard>:shard"
MAX_TEXT_BYTES = 1 << 20  # a larger .txt is not a caption
MAX_JSON_BYTES = 16 << 20
MAX_SHARDS = 1_000_000  # names a brace pattern may expand to
_IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)  # "jpg", "jpeg", ... in preference order
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")

# --------------------------------------------------------------------------- which shards


def _choices(body: str) -> list[str] | None:
    """The alternatives of one ``{...}``: a numeric range (zero padding kept) or a comma list; None: literal braces."""
    span = _RANGE.fullmatch(body)
    if span:
        first, last = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).lstrip("-").startswith("0") else 0
        step = 1 if last >= first else -1
        if abs(last - first) + 1 > MAX_SHARDS:
            raise TbpsError(f"the brace range {{{body}}} names more than {MAX_SHARDS:,} shards", field="data", value=body)
        return [str(k).zfill(width) for k in range(first, last + step, step)]
    if "," in body:
        return body.split(",")
    return None


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order: ``{00000..00002}`` ranges and ``{a,b}`` lists, as webdataset reads them.

    Raises:
        TbpsError: the pattern stands for more than :data:`MAX_SHARDS` names.
    """
    names = [""]
    rest = pattern
    while (m := _BRACE.search(rest)) is not None:
        choices = _choices(m.group(1))
        head = rest[: m.end()] if choices is None else rest[: m.start()]
        if choices is None:
            names = [n + head for n in names]
        else:
            if len(names) * len(choices) > MAX_SHARDS:
                raise TbpsError(f"the pattern names more than {MAX_SHARDS:,} shards", field="data", value=pattern)
            names = [n + head + c for n in names for c in choices]
        rest = rest[m.end() :]
    return [n + rest for n in names]


def shard_pattern(path: Path) -> list[str] | None:
    """The names a pattern of tar shards expands to (globs not yet matched); None when ``path`` is no such pattern.

    A pattern is a path that does not exist, holds a brace group or a glob character, and
    whose every expansion ends in ``.tar``.
    """
    text = str(path)
    if ("{" not in text and not _GLOB_CHARS.search(text)) or path.exists():
        return None
    names = expand_braces(text)
    return names if all(n.lower().endswith(TAR_SUFFIX) for n in names) else None


def _is_tar(path: Path) -> bool:
    return path.suffix.lower() == TAR_SUFFIX and not path.name.startswith(".")


def _shards(path: Path) -> list[Path]:
    """The shards a dataset path names, in reading order, missing ones of a brace range included.

    A directory's shards are its top-level ``.tar`` files and the ``.parquet`` tables of
    img2dataset that have no tar beside them (every sample of such a shard failed, or the tar
    was lost); both are named by the tar.
    """
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        tars = {p.with_suffix(TAR_SUFFIX) for p in entries if _is_tar(p) and p.is_file()}
        tars |= {p.with_suffix(TAR_SUFFIX) for p in entries if p.suffix.lower() == ".parquet" and p.is_file() and tars}
        return sorted(tars)
    names = shard_pattern(path)
    if names is None:
        return [path]
    found: dict[str, None] = {}
    for name in names:
        if _GLOB_CHARS.search(name):
            found.update((m, None) for m in sorted(glob.glob(name)) if m.lower().endswith(TAR_SUFFIX))
        else:
            found[name] = None
    return [Path(n) for n in found]


def check_pattern(path: Path) -> None:
    """Refuse a pattern of shards that matches no tar (nor any img2dataset ``.parquet`` of one).

    Raises:
        TbpsError: nothing matches.
    """
    shards = _shards(path)
    if not any(s.is_file() or s.with_suffix(".parquet").is_file() for s in shards):
        raise TbpsError(
            f"no tar shard matches the pattern ({len(shards):,} name{'s' * (len(shards) != 1)} looked for)",
            path=path,
            field="data",
            hint="check the folder and the range; quote the pattern so the shell leaves its braces alone",
        )


def _folder(path: Path) -> Path:
    """The folder holding the shards: the image root by default, and the ``source``."""
    if path.is_dir():
        return Path(os.path.abspath(path))
    shards = [os.path.abspath(s) for s in _shards(path)]
    if not shards:
        return Path(os.path.abspath(path)).parent
    return Path(os.path.commonpath([os.path.dirname(s) for s in shards]))


# --------------------------------------------------------------------------- one shard


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: its folder and base name up to the first dot, and the rest."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext


def _unsafe(name: str) -> bool:
    parts = name.split("/")
    return name.startswith("/") or any(p in ("", ".", "..") for p in parts)


def _pread(fd: int, member: Member, limit: int) -> tuple[bytes | None, str | None]:
    """A small member's bytes, or why they cannot be read."""
    if member.kind != REGULAR:
        return None, f"the member {member.name!r} is a link or a special file, not a regular member"
    if member.size > limit:
        return None, f"the member {member.name!r} holds {member.size:,} bytes, above the {limit:,}-byte limit"
    data = os.pread(fd, member.size, member.offset)
    if len(data) < member.size:
        return None, f"the member {member.name!r} is cut off (the tar is truncated)"
    return data, None


class _ShardReader:
    """Reads the samples of each shard into one :class:`Rows`, keeping keys unique across shards."""

    def __init__(self, base: Path, id_field: str) -> None:
        self.rows = Rows()
        self.base = base
        self.id_field = id_field
        self.owner: dict[str, str] = {}  # key -> the shard it was first met in
        self.samples = 0  # rows that are samples (not a shard's own row)

    def label(self, tar: Path) -> str:
        """A shard's name in ids and messages: its path below the folder of the shards."""
        absolute = os.path.abspath(tar)
        return printable(os.path.relpath(absolute, self.base) if absolute.startswith(str(self.base) + os.sep) else absolute)

    def shard_row(self, label: str, problem: str) -> None:
        self.rows.add(f"{label}:{SHARD_ROW}", None, None, None, None, STATUS_BAD_RECORD, f"shard {label}: {problem}")

    def sample(self, key: str, label: str, rel: str | None, caption: str | None, person: str | None, split: str | None,
               status: str | None, error: str | None) -> None:
        """Add one sample's row; a key met before (in an earlier shard) is ``bad-record`` under ``"<shard>/<key>"``."""
        first = self.owner.setdefault(key, label)
        pair_id = key
        if first != label:
            pair_id = f"{label}/{key}"
            status, error = STATUS_BAD_RECORD, f"the key {key!r} is also a sample of shard {first}; keys must be unique"
        self.rows.add(pair_id, rel, caption, person, split, status, error)
        self.samples += 1

    def read(self, tar: Path) -> None:
        """Add the rows of one shard (its samples, its img2dataset table's failures, its own row for a problem)."""
        label = self.label(tar)
        listed, listing_problem = _download_table(tar.with_suffix(".parquet"))
        if listing_problem is not None:
            self.shard_row(label, listing_problem)
        try:
            fd = os.open(tar, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if listed is not None:
                self._listed_only(listed, set(), label, f"the tar {label} cannot be read ({exc.strerror})")
            else:
                what = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
                self.shard_row(label, f"the tar {what}; its samples are not known")
            return
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                self.shard_row(label, "not a regular file")
                return
            index = scan(fd)
            keys = self._members(fd, tar, label, index)
        finally:
            os.close(fd)
        if listed is not None:
            self._listed_only(listed, keys, label, None if index.problem is None else f"the tar {index.problem}")
        elif index.problem is not None:
            self.shard_row(label, f"{index.problem}; {len(keys):,} samples read before that point, the rest are not known")

    def _members(self, fd: int, tar: Path, label: str, index: ShardIndex) -> set[str]:
        """The rows of a shard's samples; returns their keys."""
        groups: dict[str, dict[str, Member]] = {}
        for member in index.members:
            key, ext = _split_name(member.name)
            groups.setdefault(key, {}).setdefault(ext.lower(), member)
        absolute = os.path.abspath(tar)
        for key, parts in groups.items():
            self._sample(fd, key, parts, absolute, label, index.size)
        return set(groups)

    def _sample(self, fd: int, key: str, parts: dict[str, Member], tar: str, label: str, tar_size: int) -> None:
        image = next((parts[e] for e in _IMAGE_EXTS if e in parts), None)
        text, meta = parts.get(CAPTION_EXT), parts.get(JSON_EXT)
        problems: list[tuple[str, str]] = []  # (status, reason), the first wins
        caption = person = split = None
        rel = None
        if image is None:
            found = ", ".join(sorted(f".{e}" for e in parts)) or "nothing"
            problems.append((STATUS_MISSING_IMAGE, f"no image member for the key {key!r} in {label} (found {found})"))
        elif _unsafe(image.name):
            problems.append((STATUS_PATH_OUTSIDE_ROOT, f"the member name {image.name!r} in {label} is absolute or uses '..'"))
        elif image.kind != REGULAR:
            problems.append((STATUS_BAD_IMAGE, f"the image member {image.name!r} in {label} is a link or a special file, not a regular member"))
        elif image.cut_at(tar_size):
            problems.append((STATUS_BAD_IMAGE, f"the image member {image.name!r} in {label} is cut off: the tar ends at byte {tar_size:,}"))
        else:
            rel = member_path(tar, image.name)
        if text is None:
            if image is not None:
                problems.append((STATUS_EMPTY_CAPTION, f"no caption member {key}.{CAPTION_EXT} in {label}"))
        else:
            raw, why = _pread(fd, text, MAX_TEXT_BYTES)
            if raw is not None:
                try:
                    caption = raw.decode("utf-8-sig").strip()
                except UnicodeDecodeError as exc:
                    why = f"the caption {text.name!r} is not UTF-8 text (byte {exc.start})"
            if why is not None:
                problems.append((STATUS_BAD_RECORD, f"{why} in {label}"))
        if meta is not None:
            person, split, why = self._sidecar(fd, meta, label)
            if why is not None:
                problems.append((STATUS_BAD_RECORD, why))
        order = (STATUS_PATH_OUTSIDE_ROOT, STATUS_MISSING_IMAGE, STATUS_BAD_IMAGE, STATUS_BAD_RECORD, STATUS_EMPTY_CAPTION)
        problems.sort(key=lambda p: order.index(p[0]))
        status, error = problems[0] if problems else (None, None)
        self.sample(key, label, rel, caption, person, split, status, error)

    def _sidecar(self, fd: int, meta: Member, label: str) -> tuple[str | None, str | None, str | None]:
        """(person id, split, problem) from a sample's ``.json`` member."""
        raw, why = _pread(fd, meta, MAX_JSON_BYTES)
        if raw is None:
            return None, None, f"{why} in {label}"
        try:
            obj = parse_json(raw, f"{label}/{meta.name}")
        except TbpsError as exc:
            return None, None, str(exc)
        if not isinstance(obj, dict):
            return None, None, f"the member {meta.name!r} in {label} is not a JSON object"
        person, bad_person = id_text(obj.get(self.id_field))
        split, bad_split = id_text(obj.get(SPLIT_FIELD))
        if bad_person or bad_split:
            name, bad = (self.id_field, bad_person) if bad_person else (SPLIT_FIELD, bad_split)
            return None, None, f"the field {name!r} of {meta.name!r} in {label} is {bad}"
        return person, split, None

    def _listed_only(self, listed: dict[str, tuple[str, str | None, str | None]], keys: set[str], label: str,
                     tar_problem: str | None) -> None:
        """Rows for the samples img2dataset's table lists and the tar does not hold."""
        for key, (status, error, caption) in listed.items():
            if key in keys:
                continue
            if status != DOWNLOAD_OK:
                reason = f"img2dataset {status}" + (f": {error}" if error else "")
                self.sample(key, label, None, caption, None, None, STATUS_DOWNLOAD_FAILED, reason)
            else:
                why = f"; {tar_problem}" if tar_problem else ""
                self.sample(key, label, None, caption, None, None, STATUS_MISSING_IMAGE,
                            f"listed as downloaded in {label[: -len(TAR_SUFFIX)]}.parquet but not in the tar{why}")


def _download_table(path: Path) -> tuple[dict[str, tuple[str, str | None, str | None]] | None, str | None]:
    """img2dataset's table of a shard: ``({key: (status, error_message, caption)}, None)``; ``(None, problem)``; ``(None, None)`` when absent."""
    if not path.is_file():
        return None, None
    try:
        table = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable sidecar is one problem line, the tar is still read
        return None, f"the img2dataset table {path.name} cannot be read ({type(exc).__name__}); download statuses are not known"
    if "key" not in table.columns or "status" not in table.columns:
        return None, f"the table {path.name} has no key/status columns (found {', '.join(table.columns[:8])}); download statuses are not known"
    keys = table.get_column("key").cast(pl.String).to_list()
    status = table.get_column("status").cast(pl.String).to_list()
    n = table.height
    error = table.get_column("error_message").cast(pl.String).to_list() if "error_message" in table.columns else [None] * n
    caption = table.get_column("caption").cast(pl.String).to_list() if "caption" in table.columns else [None] * n
    return {k: (s, e, c) for k, s, e, c in zip(keys, status, error, caption) if k is not None}, None


# --------------------------------------------------------------------------- the format


def _read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
    base = _folder(path)
    reader = _ShardReader(base, options.id_col or PERSON_FIELD)
    shards = _shards(path)
    for tar in shards:
        reader.read(tar)
    if not reader.samples:
        first = reader.rows.error[0] if reader.rows.error else "no members"
        raise TbpsError(f"none of the {len(shards):,} tar shards holds a readable sample ({first})", path=path)
    return finish(**vars(reader.rows), source=printable(base.name), resolver=ImageResolver(root))


def _detect(path: Path, peek: Peek) -> bool:
    if path.is_file():
        return _is_tar(path)
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError:
            return False
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
            return False
        return any(_is_tar(p) and p.is_file() for p in entries)
    return shard_pattern(path) is not None


FORMAT = Format(
    WEBDATASET,
    "webdataset tar shards (img2dataset's output): `KEY.jpg` + `KEY.txt` (+ `KEY.json` with `person_id`, `split`) per sample, "
    "read from the tars; `pair_id` is the key; img2dataset's `.parquet` per shard gives failed downloads a status; "
    "`--id-col FIELD`: the `.json` field of the person id",
    "a `.tar`, a folder of `.tar` files, or a quoted pattern (`'pool/{00000..00127}.tar'`, `'pool/*.tar'`)",
    _detect,
    _read,
    default_root=_folder,
    path_kind=FILE_OR_DIRECTORY,
    columns=frozenset({"id_col"}),
)
