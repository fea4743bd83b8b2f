"""Image folders: images with same-named ``.txt`` captions (one per line), sub-folders too.

``pair_id`` is ``"{relative image path}:{line}"`` and ``source`` the folder's name. With
``--id-col folder`` the person id is each image's parent folder name (null for images at the
top of the folder). An image without a ``.txt`` is one ``empty-caption`` row; a ``.txt``
without an image gives ``bad-record`` rows; a blank line is an ``empty-caption`` row.
Symlinked sub-folders are walked when they stay inside the image root (each real folder
once); one leading outside is a ``path-outside-root`` row and is neither listed nor read.
The folder is its own image root by default.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import polars as pl

from tbps.columns import STATUS_BAD_RECORD, STATUS_EMPTY_CAPTION, STATUS_OK, STATUS_PATH_OUTSIDE_ROOT
from tbps.data.formats.base import DIRECTORY, IMAGE_SUFFIXES, ColumnOptions, Format, Peek
from tbps.data.formats.rows import Rows, finish, read_text, stem
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError, UsageError

IMAGE_FOLDER = "image-folder"
# The --id-col value that takes an image folder's person id from each image's parent folder.
FOLDER_ID = "folder"


def _read_image_folder(folder: Path, root: Path, person_from_folder: bool) -> pl.DataFrame:
    """Images with same-named ``.txt`` captions, one pair per caption line, sub-folders too."""
    rows = Rows()
    resolver = ImageResolver(root)
    folder = Path(os.path.abspath(folder))  # resolver takes relative paths as relative to the root
    top = os.path.realpath(folder)
    seen_dirs = {top}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        rel_dir = posixpath.normpath(Path(dirpath).relative_to(folder).as_posix())
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for d in sorted(dirnames):
            # Symlinked sub-folders are followed only when they stay inside the image root,
            # and each real folder once (a link back up would loop forever).
            real = os.path.realpath(os.path.join(dirpath, d))
            rel = posixpath.join(rel_dir, d)
            refused = resolver.resolve(os.path.join(dirpath, d))
            if refused[1] != STATUS_OK:
                rows.add(f"{rel}:0", None, None, None, None, STATUS_PATH_OUTSIDE_ROOT, f"sub-folder skipped: {refused[2]}")
            elif real not in seen_dirs:
                seen_dirs.add(real)
                keep.append(d)
        dirnames[:] = keep
        person = (posixpath.basename(rel_dir) or None) if person_from_folder else None
        by_stem: dict[str, list[str]] = {}
        texts: dict[str, str] = {}
        for name in sorted(filenames):
            file_stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                by_stem.setdefault(file_stem, []).append(name)
            elif suffix.lower() == ".txt":
                texts[file_stem] = name
        for file_stem in sorted(set(by_stem) | set(texts)):
            _folder_pairs(rows, resolver, dirpath, rel_dir, by_stem.get(file_stem, []), texts.get(file_stem), person)
    if not rows.pair_id:
        raise TbpsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or .txt captions found in the folder", path=folder)
    return finish(**vars(rows), source=stem(folder), resolver=resolver)


def _folder_pairs(rows: Rows, resolver: ImageResolver, dirpath: str, rel_dir: str, images: list[str], text: str | None, person: str | None) -> None:
    """The rows of one stem: every image x every caption line of its ``.txt``."""
    lines: list[str] | None = None
    problem = None
    if text is not None:
        text_path = os.path.join(dirpath, text)
        _, status, reason = resolver.resolve(text_path)
        if status != STATUS_OK:
            problem = (status, f"caption file not read: {reason}")  # never read a file outside the root
        else:
            try:
                lines = read_text(Path(text_path)).splitlines()
            except TbpsError as exc:
                problem = (STATUS_BAD_RECORD, str(exc))
    targets = [(posixpath.join(rel_dir, name), os.path.join(dirpath, name)) for name in images]
    if not targets:  # captions without an image: keep them visible as rows
        rel_txt = posixpath.join(rel_dir, text)
        for k, line in enumerate(lines or [None]):
            rows.add(f"{rel_txt}:{k}", None, line, person, None, STATUS_BAD_RECORD, f"no image next to the caption file {rel_txt!r}")
        return
    for rel, absolute in targets:
        if problem is not None:
            rows.add(f"{rel}:0", absolute, None, person, None, *problem)
        elif lines is None:
            rows.add(f"{rel}:0", absolute, None, person, None, STATUS_EMPTY_CAPTION, f"no caption file {posixpath.splitext(rel)[0] + '.txt'!r}")
        elif not lines:
            rows.add(f"{rel}:0", absolute, "", person, None)
        else:
            for k, line in enumerate(lines):
                # One caption per line; each line is its own pair.
                rows.add(f"{rel}:{k}", absolute, line, person, None)


def _detect(path: Path, peek: Peek) -> bool:
    return path.is_dir()


def _read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
    return _read_image_folder(path, root, person_from_folder=options.id_col == FOLDER_ID)


def _check_columns(options: ColumnOptions) -> None:
    if options.id_col is not None and options.id_col != FOLDER_ID:
        raise UsageError(f"for an image folder, --id-col only accepts {FOLDER_ID!r} (the parent folder name)", value=options.id_col)


FORMAT = Format(
    IMAGE_FOLDER,
    "images with same-named `.txt` captions, one per line, sub-folders too; `--id-col folder`: "
    "the parent folder name is the person id",
    "a directory",
    _detect,
    _read,
    default_root=lambda path: path,
    path_kind=DIRECTORY,
    columns=frozenset({"id_col"}),
    check_columns=_check_columns,
    no_person_ids="none: --id-col folder takes them from the parent folder names",
)
