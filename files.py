"""Writing and hashing files: the one atomic write and the one content hash of tbps.

Every file tbps writes goes through :func:`atomic_write` (or :func:`atomic_dir` for a directory):
the content goes to a temporary created exclusively in the target's directory (``mkstemp``: a
fresh name, ``O_EXCL``, never following a link), which is renamed over the target only when it
is complete. A killed process leaves either the old file or the new one, plus at most a temp
named ``.<target name>.<host>.<pid>.<random>.tbps-tmp``; :func:`sweep_temps` removes those whose
process (on this machine) is gone, and directory readers skip them (:func:`is_temp`). Written files get the permissions
the user's umask gives (``mkstemp`` alone would leave them ``0600``).

Logs are appended with :func:`append_text` (never through a link; a failed append is cut back).

A write that fails because the disk is full (``ENOSPC``), a quota is exceeded (``EDQUOT``) or a
file-size limit is hit (``EFBIG``) raises :class:`DiskFullError`: one line naming the file and
what to do, and the temporary is removed first, so the target is untouched.

Every content hash is :data:`HASH_ALGO` (blake2b with a 16-byte digest, hex), and records that
store a hash name the algorithm beside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from tbps.errors import TbpsError

HASH_ALGO = "blake2b-128"
TEMP_SUFFIX = ".tbps-tmp"
_BLOCK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def hasher() -> "hashlib._Hash":
    """A fresh :data:`HASH_ALGO` hash object, for content fed in pieces (``update``, ``hexdigest``)."""
    return hashlib.blake2b(digest_size=16)


def content_hash(data: bytes) -> str:
    """The :data:`HASH_ALGO` hex digest of ``data``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: str | Path) -> str:
    """The :data:`HASH_ALGO` hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hasher()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def is_temp(name: str | Path) -> bool:
    """Whether a file name is one of tbps's temporaries (directory readers skip them)."""
    return Path(name).name.endswith(TEMP_SUFFIX)


# Temps carry the host as well as the pid: a directory shared by several machines (SLURM arrays
# writing one score directory) must not have one machine judge another's pids.
HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _temp_prefix(target: Path, aside: bool = False) -> str:
    return f".{target.name}.{'old.' if aside else ''}{HOST_TAG}.{os.getpid()}."


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file whose content replaces ``path`` when the block ends without error.

    Args:
        path: the file to write; its directory is created when missing.

    Yields:
        A binary file object open for writing (pass it to ``pq.write_table``, ``torch.save``,
        ``np.save`` ...). On an exception the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    with _disk_full_is_one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException as exc:
            full = _is_disk_full(exc, path.parent, tmp)  # asked before the temp is removed (which frees the space)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if full is not None:
                raise DiskFullError(path, full) from None
            raise


_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is larger than the file system or the process's file-size limit allows"}
if hasattr(errno, "EDQUOT"):
    _FULL[errno.EDQUOT] = "the disk quota is exceeded"
# Libraries that write for themselves (torch.save, Polars) raise their own types; their messages carry the OS's words.
_FULL_WORDS = {os.strerror(code): code for code in _FULL}
_NEARLY_FULL = 1 << 16  # bytes free: a failed write on a file system this full failed for want of space


class DiskFullError(TbpsError):
    """A write failed for want of space (or quota, or a size limit); the target was left as it was.

    Args:
        path: the file or directory being written.
        code: the ``errno`` (``ENOSPC``, ``EDQUOT`` or ``EFBIG``).
    """

    def __init__(self, path: Path, code: int) -> None:
        self.code = code
        super().__init__(
            f"cannot write: {_FULL[code]} (the file system holding {os.path.abspath(path.parent)}); nothing half-written was kept",
            path=path,
            hint="Free space there (or write elsewhere), then run the same command again: it resumes from what is complete "
            "(tbps score keeps its finished parts; add --resume to tbps train)",
        )


def _is_disk_full(exc: BaseException, directory: Path, temp: str | Path | None = None) -> int | None:
    """The errno when ``exc`` (or what caused it) is a full disk, a quota or a size limit, else ``None``.

    Asked before the temporary ``temp`` is removed: a writer that hides the cause (numpy's "N requested
    and M written", torch's "file write failed") is told by the temp's size against the file-size
    limit, or by a file system left without free space.
    """
    if isinstance(exc, TbpsError):
        return None  # already one line (a DiskFullError of a file written inside this one names that file)
    seen: BaseException | None = exc
    for _ in range(8):  # the exception, its cause, the cause's cause...
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return seen.errno
        text = str(seen)
        for words, code in _FULL_WORDS.items():
            if words in text:
                return code
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (OSError, RuntimeError, ValueError)) and not isinstance(exc, FileNotFoundError):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        try:
            if temp is not None and limit != resource.RLIM_INFINITY and os.stat(temp).st_size >= limit:
                return errno.EFBIG
            st = os.statvfs(directory)
        except OSError:
            return None
        if st.f_bavail * st.f_frsize < _NEARLY_FULL:
            return errno.ENOSPC  # the writer's own error hides the cause, the file system tells it
    return None


def as_disk_full(exc: BaseException) -> DiskFullError | None:
    """A :class:`DiskFullError` for an ``OSError`` of a full disk raised outside :func:`atomic_write` (else ``None``).

    The CLI's last resort: a library that writes on its own (a log append, a cache) still gives one line.
    """
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return DiskFullError(Path(exc.filename if isinstance(exc.filename, str) else "."), exc.errno)
    return None


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path) -> Iterator[None]:
    """Turn a full disk met while creating the directory or the temporary into :class:`DiskFullError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise DiskFullError(path, exc.errno) from None
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (non-JSON values through ``str``) to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def append_text(path: str | Path, text: str) -> Path:
    """Append UTF-8 text to ``path`` (a log), never through a link, and never leaving part of it.

    The file is opened ``O_APPEND | O_NOFOLLOW`` (a link planted at the path is refused with a
    :class:`tbps.errors.TbpsError`, not followed); a write that fails (a full disk) is cut back to the file's previous length and
    raises :class:`DiskFullError` for a full disk, so the file holds whole appends only, unless a kill
    lands inside the write (readers of tbps logs drop a torn last line).

    Args:
        path: the file; created (with the umask's permissions) when missing.
        text: what to append.

    Returns:
        ``path``.
    """
    path = Path(path)
    data = text.encode("utf-8")
    with _disk_full_is_one_line(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), _FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(path):
                raise TbpsError("a symlink is where this file goes; tbps does not write through links", path=path) from None
            raise
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if exc.errno in _FULL:
                raise DiskFullError(path, exc.errno) from None
            raise
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces the directory ``path`` when the block succeeds.

    The old directory (if any) is renamed aside first and deleted only after the new one is in
    place, so a kill at any instant leaves the old or the new one under ``path`` or aside as a
    temp that :func:`sweep_temps` puts back.

    Args:
        path: the directory to (re)write; its parent is created when missing.

    Yields:
        The temporary directory to fill.
    """
    path = Path(path)
    with _disk_full_is_one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, _DIR_MODE)
            replace_dir(tmp, path)
        except BaseException as exc:
            # A file written inside the temporary directory names a temp path: the directory is what the user knows.
            full = exc.code if isinstance(exc, DiskFullError) else _is_disk_full(exc, path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:
                raise DiskFullError(path, full) from None
            raise


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path``, keeping the old one aside until it is there."""
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, aside=True), suffix=TEMP_SUFFIX, dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _parse_temp(name: str) -> tuple[str, str | None, int, bool] | None:
    """(target name, host tag or None, pid, is an aside copy) of ``.<target>[.old][.<host>].<pid>.<random>.tbps-tmp``."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[1 : -len(TEMP_SUFFIX)].split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        return None
    rest, pid = parts[:-2], int(parts[-2])
    host = rest.pop() if len(rest) >= 2 and len(rest[-1]) == len(HOST_TAG) and all(c in "0123456789abcdef" for c in rest[-1]) else None
    aside = len(rest) >= 2 and rest[-1] == "old"
    target = ".".join(rest[:-1] if aside else rest)
    return (target, host, pid, aside) if target else None


def _gone(host: str | None, pid: int) -> bool:
    """Whether the process that made a temp has ended (a temp of another machine never counts as ended)."""
    if host is not None and host != HOST_TAG:
        return False
    if pid == os.getpid():  # this process sweeps before it writes: a temp with its pid is a dead one's (pid reuse)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _own_directory(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def sweep_temps(directory: str | Path, *, recursive: bool = False) -> list[Path]:
    """Remove tbps temporaries left in ``directory`` by processes that no longer run.

    A temp of a live process (a concurrent run on the same directory), or of another machine, is
    left alone; a temp named with this process's pid is a dead process's (pids are reused). An aside
    copy of a directory (from :func:`atomic_dir`) is restored first when its target is missing.

    Args:
        directory: the output directory to clean.
        recursive: also clean its sub-directories.

    Returns:
        The paths removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    entries = directory.rglob(f"*{TEMP_SUFFIX}") if recursive else directory.glob(f".*{TEMP_SUFFIX}")
    for tmp in sorted(entries):
        parsed = _parse_temp(tmp.name)
        if parsed is None or not _gone(parsed[1], parsed[2]):
            continue  # not a tbps temp, or a live (or another machine's) process's
        target, _, _, aside = parsed
        # Killed between the two renames: the old copy goes back. Only from a real directory of this user's:
        # a symlink planted under an aside name must not move someone else's files into place.
        if aside and _own_directory(tmp) and not (tmp.parent / target).exists() and (tmp / target).exists():
            os.replace(tmp / target, tmp.parent / target)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        removed.append(tmp)
    return removed
