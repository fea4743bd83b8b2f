"""Webdataset tar shards: image paths that name a member inside a tar, and an offset index to read it.

A shard member's image path is its tar's path, a ``/``, and the member's name inside the tar:
``/data/pool/00003.tar/000030012.jpg``. No file on disk can have such a path (``00003.tar`` is
a regular file, so nothing lies "below" it), so the form is unambiguous: opening it as a file
fails with ``ENOTDIR``, and :func:`split_member` then finds the ``.tar`` prefix that is a file.
Such a path is resolved inside the image root like any other (:class:`tbps.data.paths.ImageResolver`:
the tar's real path must lie in the root) and opened by :func:`tbps.data.images.open_image`.

Reading a member is one ``pread`` at its offset, from an index of the tar's members
(:func:`scan`: ``tarfile`` reads the 512-byte headers and seeks over the data, so indexing a
shard reads about 2% of it). The index of the regular members is cached per process, keyed by
the tar's device, inode, size and modification time (a rewritten tar is indexed again), and the
cache holds at most :data:`CACHE_MEMBERS` members (the least recently used tars go first). The
reader indexes every shard when it reads the dataset, so DataLoader workers forked after it
inherit the index; a process that starts cold (a resumed run, training from a manifest)
indexes each tar it touches once.

Why the standard library's ``tarfile`` and not the ``webdataset`` package: webdataset streams a
shard from its start, while tbps needs random access to any one sample (score parts, ``--shard
i/N``, resume, training's shuffled batches, thumbnails); ``tarfile`` gives each member's
``offset_data`` and ``size``, which is all random access needs, and adds no dependency.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

TAR_SUFFIX = ".tar"
BLOCK = 512  # a tar header, and the unit of its end-of-archive marker
CACHE_MEMBERS = 2_000_000  # members kept in the per-process index cache (about 170 bytes each)

# Member kinds: a regular member holds bytes; a link or device member holds none to read.
REGULAR = "file"
LINK = "link"
OTHER = "other"

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Member:
    """One member of a tar, as its header says.

    Attributes:
        name: the member's name, a leading ``./`` dropped.
        offset: where its bytes start in the tar.
        size: how many bytes it holds.
        kind: ``REGULAR``, ``LINK`` (hard or symbolic) or ``OTHER`` (a device, a FIFO).
    """

    name: str
    offset: int
    size: int
    kind: str

    def cut_at(self, file_size: int) -> bool:
        """Whether the member's bytes run past the end of a tar of ``file_size`` bytes (a truncated tar)."""
        return self.kind == REGULAR and self.offset + self.size > file_size


@dataclass
class ShardIndex:
    """What a scan of one tar found.

    Attributes:
        size: the tar's size in bytes.
        members: its members in tar order (directories left out).
        problem: why the scan stopped before a proper end of the archive (truncated, a corrupt
            header, not a tar at all), naming the byte; ``None`` for a whole tar.
    """

    size: int
    members: list[Member] = field(default_factory=list)
    problem: str | None = None


def member_path(tar: str, name: str) -> str:
    """The image path of member ``name`` of ``tar`` (``/data/pool/00003.tar/KEY.jpg``)."""
    return f"{tar}/{name}"


def split_member(path: str) -> tuple[str, str] | None:
    """``(tar path, member name)`` of a shard member's image path, or ``None`` when it names none.

    The tar is the first prefix ending in ``.tar`` (any case) followed by ``/`` that is a
    regular file.
    """
    lowered = path.lower()
    start = 0
    while (at := lowered.find(TAR_SUFFIX + "/", start)) >= 0:
        tar, name = path[: at + len(TAR_SUFFIX)], path[at + len(TAR_SUFFIX) + 1 :]
        try:
            is_file = stat.S_ISREG(os.stat(tar).st_mode)
        except (OSError, ValueError):
            is_file = False
        if is_file and name:
            return tar, name
        start = at + 1
    return None


def _normal(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def scan(fd: int) -> ShardIndex:
    """Index the members of the tar open at ``fd`` (headers only; the descriptor's position is not used).

    A tar that ends early (a truncated download), holds a corrupt header or is no tar at all
    gives the members read before that point and a ``problem`` naming the byte.
    """
    size = os.fstat(fd).st_size
    index = ShardIndex(size)
    with os.fdopen(os.dup(fd), "rb") as fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as exc:
            index.problem = f"not a readable tar file ({exc})" if size else "the file is empty (0 bytes)"
            return index
        while True:
            at = tar.offset
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError, UnicodeError) as exc:
                index.problem = f"unreadable from byte {at:,} on ({exc}): the tar is truncated or corrupt"
                break
            if info is None:
                break
            tar.members.clear()  # tarfile keeps every header it read; the index is all that is needed
            if info.isdir():
                continue
            kind = LINK if (info.islnk() or info.issym()) else REGULAR if info.isfile() and not info.issparse() else OTHER
            index.members.append(Member(_normal(info.name), info.offset_data, info.size, kind))
        end = tar.offset
    if index.problem is None:
        marker = os.pread(fd, BLOCK, end) if end < size else b""
        if len(marker) < BLOCK:
            index.problem = f"ends at byte {size:,} without the end-of-archive marker: the tar is truncated"
        elif marker.count(0) != BLOCK:
            index.problem = f"unreadable header at byte {end:,}: the tar is corrupt from there on"
    cut = next((m for m in index.members if m.cut_at(size)), None)
    if cut is not None:
        index.problem = f"ends at byte {size:,}, inside the member {cut.name!r}: the tar is truncated"
    _remember(os.fstat(fd), index)
    return index


# --------------------------------------------------------------------------- the per-process cache

_CACHE: OrderedDict[tuple, dict[str, tuple[int, int]]] = OrderedDict()
_CACHED = [0]  # members held in _CACHE


def _key(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(st: os.stat_result, index: ShardIndex) -> dict[str, tuple[int, int]]:
    """Cache the regular members of a scanned tar (the first one wins for a repeated name)."""
    images: dict[str, tuple[int, int]] = {}
    for m in index.members:
        if m.kind == REGULAR:
            images.setdefault(m.name, (m.offset, m.size))
    key = _key(st)
    if key in _CACHE:
        _CACHED[0] -= len(_CACHE.pop(key))
    _CACHE[key] = images
    _CACHED[0] += len(images)
    while _CACHED[0] > CACHE_MEMBERS and len(_CACHE) > 1:
        _CACHED[0] -= len(_CACHE.popitem(last=False)[1])
    return images


def members_of(fd: int) -> dict[str, tuple[int, int]]:
    """``{member name: (offset, size)}`` of the regular members of the tar open at ``fd``, from the cache or a scan."""
    key = _key(os.fstat(fd))
    hit = _CACHE.get(key)
    if hit is None:
        scan(fd)
        hit = _CACHE[key]
    else:
        _CACHE.move_to_end(key)
    return hit


def locate(path: str) -> tuple[int, int, int] | None:
    """``(offset, size, tar size)`` of a shard member's image path; ``None`` when the path names no shard member.

    For code that looks at a file without decoding it (a size check, a content hash); no root
    check: the path is taken as resolved.

    Raises:
        FileNotFoundError: the path names a tar that has no such image member.
    """
    found = split_member(path)
    if found is None:
        return None
    tar, name = found
    try:
        fd = os.open(tar, _OPEN_FLAGS)
    except (OSError, ValueError):
        return None
    try:
        where = members_of(fd).get(name)
        if where is None:
            raise FileNotFoundError(f"{tar} has no member {name!r}")
        return where[0], where[1], os.fstat(fd).st_size
    finally:
        os.close(fd)


def member_size(path: str) -> int | None:
    """The size of a shard member's image bytes; ``None`` when the path names no shard member.

    Raises:
        FileNotFoundError: the tar has no such image member.
    """
    where = locate(path)
    return None if where is None else where[1]


def read_member(path: str, limit: int) -> bytes | None:
    """The bytes of a shard member's image path, or ``None`` when it names none, is larger than ``limit`` or is cut off."""
    try:
        where = locate(path)
    except FileNotFoundError:
        return None
    if where is None or where[1] > limit or where[0] + where[1] > where[2]:
        return None
    tar, _ = split_member(path)
    try:
        fd = os.open(tar, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        return os.pread(fd, where[1], where[0])
    except OSError:
        return None
    finally:
        os.close(fd)


def image_exists(path: str) -> bool:
    """Whether an image path names a regular file or an image member of a tar shard (no decoding)."""
    if os.path.isfile(path):
        return True
    try:
        return locate(path) is not None
    except FileNotFoundError:
        return False
