"""Held-out data that a model trained on: the same images or the same persons.

A checkpoint chosen on a validation split, or metrics on a test split, are no held-out result
when the model trained on those images or persons. :func:`find_overlap` compares a training
table with a held-out one (``tbps train`` refuses, before training, when its rows overlap its
validation split; ``tbps eval`` warns when the evaluated model's training data, as its run
records it, overlaps the evaluated split):

* **images**: a held-out image whose resolved path is a training image's path, or whose bytes
  are a training image's (``image_hash``, blake2b-128 of the file, as ``tbps score`` writes it;
  files without a recorded hash are hashed here, and only when their size equals the size of a
  file on the other side, so a large training set costs one ``stat`` per image);
* **persons**: a held-out person id that also names training rows of the same dataset (the
  ``source`` column, when both tables have it; every row otherwise). The ids of two datasets
  (CUHK-PEDES ``12`` and ICFG-PEDES ``12``) usually name different people, so an id shared only
  across datasets is counted apart (``persons_other_sources``): worth a word, since one dataset
  under two names (a CSV export of CUHK-PEDES) shares its people, but no proof of a leak. Rows
  without an id are not compared, and the result says when persons could not be checked at all.

:func:`model_training_data` follows a model spec to the training data its run recorded: a run
directory (``run.json``), an adapter export (its copy of ``run.json``) or a merged checkpoint
(``exported_from``), and through the base model of a run trained on another run.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from tbps import columns as C
from tbps.data.images import MAX_IMAGE_BYTES
from tbps.data.paths import ImageResolver
from tbps.data.readers import read_dataset
from tbps.data.shards import member_size, read_member
from tbps.data.splits import select_split
from tbps.errors import TbpsError
from tbps.files import content_hash, file_hash, hasher
from tbps.models.openclip import CHECKPOINT_KEY, read_checkpoint
from tbps.models.runs import RUN_MARKER

_EXAMPLES = 3
_MAX_CHAIN = 8  # runs trained on runs, followed at most this deep


@dataclass
class Overlap:
    """What a training table shares with a held-out table.

    Attributes:
        images: distinct held-out images that are training images (by path or by content).
        images_by_content: of those, the ones found by content only (another path, the same bytes).
        persons: distinct held-out person ids that also name training rows of the same dataset;
            None: not checked (one side has no ids).
        persons_other_sources: distinct held-out person ids that name training rows of another
            dataset (``source``) only.
        persons_note: why persons were not (or not all) compared, or which datasets an id is
            shared across; None otherwise.
        image_examples: a few shared image paths (held-out side).
        person_examples: a few shared person ids.
    """

    images: int = 0
    images_by_content: int = 0
    persons: int | None = None
    persons_other_sources: int = 0
    persons_note: str | None = None
    image_examples: list[str] = field(default_factory=list)
    person_examples: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether any image or person is shared."""
        return self.images > 0 or bool(self.persons)

    def describe(self) -> str:
        """``4 images (e.g. /d/1.jpg) and 3 persons (e.g. 12)``: what is shared, with examples."""
        parts = []
        if self.images:
            how = f", {self.images_by_content} of them by content under another path" if self.images_by_content else ""
            parts.append(f"{self.images:,} image{'s' * (self.images != 1)} (e.g. {self.image_examples[0]}{how})")
        if self.persons:
            parts.append(f"{self.persons:,} person{'s' * (self.persons != 1)} (e.g. person_id {self.person_examples[0]})")
        return " and ".join(parts) or "nothing"

    def as_record(self) -> dict[str, Any]:
        """The overlap as a run or eval record stores it."""
        return {"images": self.images, "images_by_content": self.images_by_content, "persons": self.persons,
                "persons_checked": self.persons is not None, "persons_other_sources": self.persons_other_sources,
                "persons_note": self.persons_note,
                "image_examples": self.image_examples, "person_examples": self.person_examples}


def _digest(path: str) -> str | None:
    """The blake2b-128 hex digest of a regular file's bytes (as ``image_hash``), None when it cannot be read.

    Opened without blocking and checked on the descriptor (a FIFO or device is never read), and
    never more than an image file's size cap.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except NotADirectoryError:  # a member of a webdataset tar shard: its bytes, read at its offset
        data = read_member(path, MAX_IMAGE_BYTES)
        return None if data is None else content_hash(data)
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_IMAGE_BYTES:
            return None
        h = hasher()
        try:
            h.update(fh.read(st.st_size))
        except OSError:  # an unreadable file holds no bytes to compare
            return None
        return h.hexdigest()


def _sizes(paths: Iterable[str]) -> dict[str, int]:
    """``{path: size}`` of the paths that are regular files."""
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
        except NotADirectoryError:  # a member of a webdataset tar shard
            with contextlib.suppress(FileNotFoundError):
                if (size := member_size(path)) is not None:
                    out[path] = size
            continue
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            out[path] = st.st_size
    return out


def _column(frame: pl.DataFrame, name: str) -> list:
    return frame.get_column(name).to_list() if name in frame.columns else [None] * frame.height


def _image_overlap(train: pl.DataFrame, held: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(held-out images shared by path, held-out images shared by content only), in held-out order."""
    train_paths = {p for p in _column(train, C.IMAGE_PATH) if p is not None}
    held_paths = [p for p in dict.fromkeys(_column(held, C.IMAGE_PATH)) if p is not None]
    by_path = [p for p in held_paths if p in train_paths]
    rest = [p for p in held_paths if p not in train_paths]
    if not rest:
        return by_path, []
    known = {}  # training image path -> recorded hash
    for path, digest in zip(_column(train, C.IMAGE_PATH), _column(train, C.IMAGE_HASH)):
        if path is not None and digest is not None:
            known[path] = digest
    held_sizes = _sizes(rest)
    unhashed = [p for p in train_paths if p not in known]
    # Only files of a size the other side has can hold the same bytes: hash those alone.
    train_sizes = _sizes(unhashed)
    wanted = set(held_sizes.values())
    train_hashes = set(known.values())
    train_hashes |= {d for p, size in train_sizes.items() if size in wanted and (d := _digest(p)) is not None}
    if not train_hashes:
        return by_path, []
    compare = set(train_sizes.values()) if not known else None  # recorded hashes: every held-out file is a candidate
    by_content = [p for p, size in held_sizes.items() if (compare is None or size in compare) and _digest(p) in train_hashes]
    return by_path, by_content


def _sources(values: Iterable[str | None]) -> str:
    """The first few of some sources, for a message."""
    names = sorted({str(v) for v in values})
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _person_overlap(train: pl.DataFrame, held: pl.DataFrame) -> tuple[list[str] | None, list[str], str | None]:
    """(held-out ids shared within a dataset, or None when not checked; ids shared across datasets only; a note)."""
    train_ids, held_ids = _column(train, C.PERSON_ID), _column(held, C.PERSON_ID)
    if all(p is None for p in train_ids):
        return None, [], "the training rows have no person ids"
    if all(p is None for p in held_ids):
        return None, [], "the held-out rows have no person ids"
    scoped = C.SOURCE in train.columns and C.SOURCE in held.columns
    train_sources: dict[str, set] = {}  # person id -> the sources of its training rows
    for source, pid in zip(_column(train, C.SOURCE) if scoped else [None] * train.height, train_ids):
        if pid is not None:
            train_sources.setdefault(str(pid), set()).add(source)
    same, other, across = [], [], set()
    for source, pid in dict.fromkeys(zip(_column(held, C.SOURCE) if scoped else [None] * held.height, held_ids)):
        found = train_sources.get(str(pid)) if pid is not None else None
        if found is None:
            continue
        if source in found:
            same.append(str(pid))
        else:
            other.append(str(pid))
            across |= {(t, source) for t in found}
    same, other = list(dict.fromkeys(same)), [p for p in dict.fromkeys(other) if p not in set(same)]
    notes = []
    if other:
        notes.append(f"{len(other):,} person ids of the held-out rows (source {_sources(s for _, s in across)}) also name training rows of "
                     f"another dataset (source {_sources(t for t, _ in across)}), e.g. person_id {other[0]}: ids of different datasets "
                     "usually name different people, unless it is one dataset under two names")
    missing = sum(p is None for p in train_ids)
    if missing:
        notes.append(f"{missing:,} training rows have no person id and were not compared")
    return same, other, "; ".join(notes) or None


def find_overlap(train: pl.DataFrame, held: pl.DataFrame) -> Overlap:
    """The images and persons a training table shares with a held-out table.

    Args:
        train: training rows (``image_path``; optional ``person_id``, ``source``, ``image_hash``),
            image paths resolved as training opens them.
        held: held-out rows (``image_path``, optional ``person_id`` and ``source``), resolved the same way.

    Returns:
        The :class:`Overlap` (see the module docstring for what counts).
    """
    by_path, by_content = _image_overlap(train, held)
    persons, other, note = _person_overlap(train, held)
    images = by_path + by_content
    return Overlap(
        images=len(images),
        images_by_content=len(by_content),
        persons=None if persons is None else len(persons),
        persons_other_sources=len(other),
        persons_note=note,
        image_examples=images[:_EXAMPLES],
        person_examples=(persons or [])[:_EXAMPLES],
    )


# --------------------------------------------------------------------------- a model's training data


@dataclass
class TrainingData:
    """The training rows one run recorded, as far as they can still be read.

    Attributes:
        run: the run directory (or export) that recorded them.
        label: what trained (``manifest m.parquet``, ``dataset reid_raw.json split train``).
        rows: the training rows (``image_path``, ``person_id``, ``source``, ``image_hash`` where
            known), or None when they cannot be read.
        note: why they cannot be read, or that the file changed since training; None otherwise.
    """

    run: str
    label: str
    rows: pl.DataFrame | None
    note: str | None = None


def _run_record(spec: str) -> tuple[str, dict[str, Any]] | None:
    """(where, run record) of a model spec that names a run directory or an export of one; None otherwise."""
    path = Path(spec)
    if path.is_dir() and (path / RUN_MARKER).is_file():
        try:
            record = json.loads((path / RUN_MARKER).read_text())
        except (OSError, ValueError):
            return None
        return (str(path), record) if isinstance(record, dict) and isinstance(record.get("config"), dict) else None
    if path.is_file() and path.suffix != ".json":
        try:
            payload = read_checkpoint(path)
        except TbpsError:
            return None
        origin = ((payload or {}).get(CHECKPOINT_KEY) or {}).get("exported_from") or {}
        run = origin.get("spec")
        if run and Path(run).resolve() != path.resolve():
            found = _run_record(str(run))
            return (f"{run} (exported as {path})", found[1]) if found else (f"{run} (exported as {path}; the run is gone)", {})
    return None


def _rows_of(record: dict[str, Any]) -> tuple[str, pl.DataFrame | None, str | None]:
    """(label, training rows or None, note) of one run record."""
    config, data = record.get("config") or {}, record.get("data") or {}
    options = {k: config.get(k) for k in ("format", "image_root", "image_col", "caption_col", "id_col")}
    if config.get("manifest"):
        path = Path(config["manifest"])
        label = f"manifest {path}"
        if not path.is_file():
            return label, None, f"the training manifest {path} is gone"
        try:
            schema = pl.read_parquet_schema(path)
            if C.IMAGE_PATH not in schema:
                return label, None, f"the training manifest {path} has no {C.IMAGE_PATH} column"
            wanted = [c for c in (C.IMAGE_PATH, C.PERSON_ID, C.SOURCE, C.IMAGE_HASH, C.STATUS) if c in schema]
            frame = pl.read_parquet(path, columns=wanted)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same note
            return label, None, f"the training manifest {path} cannot be read ({type(exc).__name__})"
        frame = _resolve_relative(frame, Path(options["image_root"]) if options["image_root"] else path.resolve().parent)
        note = "the manifest changed since the run trained on it (its hash differs)" if data.get("sha") and file_hash(path) != data["sha"] else None
    elif config.get("data"):
        path = Path(config["data"])
        label = f"dataset {path}" + (f" split {config.get('train_split')}" if config.get("train_split") else "")
        try:
            frame = read_dataset(path, **options)
            frame = select_split(frame, config.get("train_split"), default=None, strict=False, what="--data", path=path)[0]
        except TbpsError as exc:
            return label, None, f"the training data cannot be read ({exc})"
        note = None
    else:
        return "no training data recorded", None, "the run record names no training data"
    if C.STATUS in frame.columns:
        frame = frame.filter(pl.col(C.STATUS) == C.STATUS_OK)  # rows training skipped were not trained on
    if C.PERSON_ID in frame.columns:
        frame = frame.with_columns(pl.col(C.PERSON_ID).cast(pl.String))
    return label, frame, note


def _resolve_relative(frame: pl.DataFrame, root: Path) -> pl.DataFrame:
    """Relative image paths resolved inside ``root`` by the readers' resolver, as ``tbps train`` opened them."""
    given = frame.get_column(C.IMAGE_PATH).cast(pl.String).to_list()
    relative = [p if p is not None and not p.startswith("/") else None for p in given]
    hits = ImageResolver(root).resolve_all(relative)
    return frame.with_columns(pl.Series(C.IMAGE_PATH, [h[0] if r is not None else p for p, r, h in zip(given, relative, hits)], dtype=pl.String))


def model_training_data(spec: str) -> list[TrainingData]:
    """The training data behind a model spec, run by run (the run, then the run it was trained on, ...).

    Args:
        spec: a model spec as ``--model`` takes it.

    Returns:
        One :class:`TrainingData` per run found; empty for a model no tbps run trained
        (``tbps-tiny``, ``ViT-B-16:openai``).
    """
    found: list[TrainingData] = []
    seen: set[str] = set()
    while spec and len(found) < _MAX_CHAIN and spec not in seen:
        seen.add(spec)
        hit = _run_record(spec)
        if hit is None:
            break
        where, record = hit
        if not record:
            found.append(TrainingData(where, "unknown", None, "the run it was exported from is gone"))
            break
        label, rows, note = _rows_of(record)
        found.append(TrainingData(where, label, rows, note))
        spec = str((record.get("config") or {}).get("model") or "")
    return found


def training_overlap(spec: str, held: pl.DataFrame, held_label: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Compare the training data behind a model with held-out rows: records, warnings and notes.

    Args:
        spec: the model spec.
        held: the held-out rows (the evaluated split).
        held_label: how the messages name them (``split test of reid_raw.json``).

    Returns:
        (one record per run found: ``run``, ``training``, ``note`` and :meth:`Overlap.as_record`;
        the warnings: shared images or persons, one line each; the notes: what could not be checked).
    """
    records, warnings, lines = [], [], []
    for data in model_training_data(spec):
        entry: dict[str, Any] = {"run": data.run, "training": data.label, "note": data.note}
        if data.rows is None:
            lines.append(f"note: the training data of {data.run} could not be checked against {held_label}: {data.note}")
            records.append(entry)
            continue
        overlap = find_overlap(data.rows, held)
        entry.update(overlap.as_record())
        records.append(entry)
        if overlap.found:
            warnings.append(f"warning: the model was trained on {overlap.describe()} of {held_label} ({data.run}: {data.label}); "
                         "these metrics are not a held-out result")
        if overlap.persons is None:
            lines.append(f"note: persons could not be checked against {held_label} ({data.run}): {overlap.persons_note}")
        elif overlap.persons_note:
            lines.append(f"note: checking persons against {held_label} ({data.run}): {overlap.persons_note}")
        if data.note:
            lines.append(f"note: {data.run}: {data.note}")
    return records, warnings, lines
