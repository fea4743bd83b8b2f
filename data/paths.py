"""Safe image paths: every image a dataset names must resolve inside its image root.

A dataset file is untrusted input. A path such as ``../../etc/passwd``, an absolute path
elsewhere, or a symlink (at any level) that points out of the image root is refused for that
row with a reason, and the file is never opened or read: resolution only looks at path
strings and at symlinks (``lstat``/``readlink``).

Missing files are *not* refused here: whether the image exists and decodes is the decoder's
business (:func:`tbps.data.images.open_image`), so the row keeps its path.

Paths are normalised before resolution: Windows-style backslashes become ``/``, so
``imgs\\cam_a\\1.jpg`` reads the same as ``imgs/cam_a/1.jpg``. A Windows drive path
(``C:/data/1.jpg``) or UNC path (``//host/share``) is treated as an absolute path.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Iterable, Sequence

from tbps.columns import STATUS_BAD_RECORD, STATUS_OK, STATUS_PATH_OUTSIDE_ROOT

_DRIVE = re.compile(r"^[A-Za-z]:/")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def normalise(relative: str) -> str:
    """A dataset path with Windows-style backslashes turned into ``/``.

    Args:
        relative: the image path as written in the dataset.

    Returns:
        The same path with ``/`` separators.
    """
    return relative.replace("\\", "/")


class ImageResolver:
    """Resolves dataset image paths inside one image root, caching per directory.

    A dataset of a million images lives in a few hundred directories. Each directory is
    resolved (symlinks followed) once and listed once to learn which of its entries are
    symlinks; a file is then checked with a set lookup instead of a system call. Listing a
    directory reads names only, never file contents. The cache assumes the tree does not
    change during one read.

    Args:
        root: the image root. It is resolved once (a root that is itself a symlink is the
            user's choice and is followed).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = os.path.realpath(os.fspath(root))
        self._prefix = self.root if self.root.endswith("/") else self.root + "/"
        self._dirs: dict[str, tuple[str, frozenset[str]]] = {}

    def _dir(self, directory: str) -> tuple[str, frozenset[str]]:
        """A directory's symlink-free path and the names of the symlinks in it, cached."""
        hit = self._dirs.get(directory)
        if hit is None:
            real = os.path.realpath(directory)
            try:
                with os.scandir(real) as entries:
                    links = frozenset(e.name for e in entries if e.is_symlink())
            except OSError:  # missing or unreadable directory: its files are the decoder's business
                links = frozenset()
            hit = self._dirs[directory] = (real, links)
        return hit

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self._prefix)

    def resolve(self, relative: str | None) -> tuple[str | None, str, str | None]:
        """Resolve one dataset image path inside the root.

        Args:
            relative: the image path as written in the dataset (relative to the root, or
                absolute).

        Returns:
            ``(absolute_path, status, error)``: the resolved path and ``STATUS_OK`` with no
            error, or ``None``, ``STATUS_PATH_OUTSIDE_ROOT`` (or ``STATUS_BAD_RECORD`` for an
            empty path) and the reason.
        """
        if type(relative) is not str:
            relative = None if relative is None else str(relative)
        if not relative or relative.isspace():
            return None, STATUS_BAD_RECORD, "empty image path"
        if _CONTROL.search(relative) or not _encodable(relative):
            # A NUL byte or a lone surrogate cannot name a file: refused here, never handed to open().
            return None, STATUS_BAD_RECORD, f"image path {relative!r} holds a control character or invalid unicode"
        given = relative.replace("\\", "/") if "\\" in relative else relative
        if _DRIVE.match(given) or given.startswith("//"):
            return None, STATUS_PATH_OUTSIDE_ROOT, f"absolute path {given!r} is outside the image root {self.root}"
        absolute = given.startswith("/")
        joined = given if absolute else self._prefix + given
        if ".." in given and ".." in given.split("/"):
            # ".." after a symlinked directory means the parent of the link's target, so
            # only a full resolution (component by component) gives the true location.
            real = os.path.realpath(joined)
        else:
            if "/." in joined or "//" in joined or joined.endswith("/"):
                joined = posixpath.normpath(joined)  # rare: "./" parts, doubled or trailing slashes
            head, _, name = joined.rpartition("/")
            real_head, links = self._dir(head or "/")
            real = real_head + "/" + name if real_head != "/" else "/" + name
            if name in links:
                real = os.path.realpath(real)
        if self._inside(real):
            return real, STATUS_OK, None
        if absolute:
            reason = f"absolute path {given!r} is outside the image root {self.root}"
        elif not self._inside(posixpath.normpath(joined)):
            reason = f"path {given!r} uses '..' to leave the image root {self.root}"
        else:
            reason = f"path {given!r} goes through a symlink that leads outside the image root {self.root} (to {real})"
        return None, STATUS_PATH_OUTSIDE_ROOT, reason

    def resolve_all(self, paths: Iterable[str | None]) -> list[tuple[str | None, str, str | None]]:
        """Resolve many dataset image paths, each distinct path once.

        Args:
            paths: image paths as written in the dataset; ``None`` means "no image path here".

        Returns:
            One ``(absolute_path, status, error)`` per path, as :meth:`resolve` gives it;
            ``(None, STATUS_OK, None)`` for a ``None`` (the caller decides what a row without
            a path means).
        """
        paths = list(paths)
        resolved = {p: self.resolve(p) for p in set(paths) if p is not None}
        none = (None, STATUS_OK, None)
        return [resolved[p] if p is not None else none for p in paths]


def resolve_image(root: Path, relative: str) -> tuple[str | None, str, str | None]:
    """Resolve one dataset image path inside ``root`` without opening the file.

    Refused (status ``path-outside-root``, with the reason): a path whose ``..`` components
    leave the root, an absolute path outside the root, and a path that passes through a
    symlink (a directory or the file itself) leading outside the root. A missing file is
    not refused. For many paths use :class:`ImageResolver`, which caches directories.

    Args:
        root: the image root directory.
        relative: the image path as written in the dataset.

    Returns:
        ``(absolute resolved path or None, status, error or None)``.
    """
    return ImageResolver(root).resolve(relative)


def resolve_in_roots(path: str | None, resolvers: Sequence[ImageResolver]) -> tuple[str | None, str | None, str, str | None]:
    """Resolve an image path a table names inside the first of several image roots that holds it.

    For tables that carry resolved paths (score tables, manifests) from one or more score runs:
    the path must resolve inside one of their roots, exactly as a reader would resolve it.

    Args:
        path: the path as the table holds it (absolute, or relative to a root).
        resolvers: one per image root; none means no root is known and nothing is accepted.

    Returns:
        ``(resolved path or None, the root that accepted it or None, status, error or None)``.
    """
    if not resolvers:
        return None, None, STATUS_PATH_OUTSIDE_ROOT, "no image root: the table's score run is not found (pass --image-root)"
    first = None
    for resolver in resolvers:
        real, status, error = resolver.resolve(path)
        if status == STATUS_OK:
            return real, resolver.root, status, None
        first = first or (status, error)
    return None, None, first[0], first[1]
