"""Training and validation data: pair tables in, deterministic augmented batches out.

Where the pairs come from:

* a **manifest** (``tbps select`` output, or any Parquet file with at least ``pair_id``,
  ``image_path``, ``caption`` and ``person_id``), its paths resolved by the readers' resolver
  (:class:`tbps.data.paths.ImageResolver`): relative image paths inside ``image_root`` or the
  manifest's directory; absolute paths (``tbps select`` writes the paths its reader resolved)
  inside ``image_root`` or an image root recorded by the score runs the manifest was selected
  from (its sidecar ``NAME.json`` names them, their ``params.json`` the root). A path that leaves
  its root gets the status ``path-outside-root`` and is skipped, never opened. A hand-made
  manifest without a sidecar and without ``--image-root`` has no root to check absolute paths
  against: they are taken as they are (the report says so);
* any **dataset** the readers support (``tbps.data.readers.read_dataset``), optionally
  restricted to one split.

Rows a reader refused (``status != ok``) and rows without caption or image path are skipped and
counted. Image files are checked with one ``stat`` each before training: missing and empty files
are counted, and the run refuses when their share exceeds ``max_missing``.

Batches are a pure function of ``(seed, micro-batch number)``: micro-batch ``k`` is block
``k % per_epoch`` of the permutation of epoch ``k // per_epoch`` (numpy ``default_rng([seed,
epoch])``), the last incomplete block of an epoch is dropped, and under DDP rank ``r`` of ``W``
takes slice ``r`` of the block, so the gathered global batch is the single-process batch. The
augmentation of a sample is drawn from ``default_rng([seed, epoch, index])``. Resuming at
micro-batch ``k`` therefore needs no sampler or worker RNG state.

Augmentation (pedestrian crops): resize to the model's (height, width), horizontal flip with
probability 0.5, zero-pad by ``pad`` pixels on every side and crop back at a random offset (IRRA
pads 10 pixels at 384 x 128; ``pad`` defaults to 2.6% of the height). No colour jitter: captions
describe colours. A file that fails to decode during training (it passed the ``stat`` check, but
was overwritten with text, truncated, ...) is replaced by the next decodable pair and counted
(``Batch.undecodable`` names it); only a run of ``_MAX_REPLACEMENTS`` undecodable files in a row
stops the run, with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tbps import columns as C
from tbps.data.perturb import hard_negatives
from tbps.curate.layout import score_run_of
from tbps.data.images import open_image
from tbps.data.paths import ImageResolver
from tbps.data.readers import read_dataset
from tbps.data.shards import member_size
from tbps.data.splits import select_split
from tbps.errors import TbpsError

REQUIRED_COLUMNS = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID)
_FILE_STATUS = "_file_status"  # a temporary column: what one stat() of the image file found
# Consecutive undecodable images tolerated when looking for a replacement sample.
_MAX_REPLACEMENTS = 16


@dataclass
class PairReport:
    """How the rows of a training or validation source were used.

    Attributes:
        source: the manifest or dataset path.
        rows: rows read (after split selection).
        used: rows kept for training or validation.
        skipped: skipped rows by reason (``status`` values, ``missing-caption`` ...).
        missing_examples: a few paths of missing image files.
        image_roots: the roots a manifest's absolute image paths were checked against (empty:
            none was known, the paths were taken as they are); None for a dataset (its reader checks).
        outside_examples: a few image paths refused as outside their root.
    """

    source: str
    rows: int
    used: int
    skipped: dict[str, int] = field(default_factory=dict)
    missing_examples: list[str] = field(default_factory=list)
    image_roots: list[str] | None = None
    outside_examples: list[str] = field(default_factory=list)


def manifest_image_roots(path: str | Path, image_root: str | Path | None = None) -> list[str]:
    """The image roots a manifest's absolute paths must lie in: ``image_root``, and the roots its score runs recorded.

    ``tbps select`` writes its provenance beside the manifest (``NAME.json``, see
    :mod:`tbps.curate.select_io`); each input that is a score run recorded the image root its
    dataset was read with (:meth:`tbps.curate.layout.ScoreDir.image_root`).

    Args:
        path: the manifest.
        image_root: the explicit ``--image-root``, if any.

    Returns:
        The resolved roots, distinct, in order; empty when none is known.
    """
    path = Path(path)
    roots = [os.path.realpath(image_root)] if image_root else []
    stem = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name
    try:
        sidecar = json.loads(path.with_name(f"{stem}.json").read_text())
        inputs = sidecar.get("inputs") or [] if isinstance(sidecar, dict) else []
    except (OSError, ValueError):
        inputs = []
    for item in inputs:
        run = score_run_of(item["path"]) if isinstance(item, dict) and isinstance(item.get("path"), str) else None
        root = run.image_root() if run is not None else None
        if root is not None:
            roots.append(root)
    return list(dict.fromkeys(roots))


def read_manifest(path: str | Path, image_root: str | None = None, roots: list[str] | None = None) -> pl.DataFrame:
    """Read a manifest Parquet file and check its columns.

    Args:
        path: the manifest written by ``tbps select`` (or any Parquet with the required columns).
        image_root: where relative image paths resolve; default: the manifest's directory.
        roots: the roots absolute image paths must lie in (:func:`manifest_image_roots`; None:
            computed here); empty: absolute paths are taken as they are.

    Returns:
        The manifest with absolute ``image_path`` values; a path that leaves its image root
        gives its row the status ``path-outside-root`` (and no image path).

    Raises:
        TbpsError: the file is missing, unreadable, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise TbpsError("manifest not found", path=path, hint="write one with `tbps select`")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TbpsError(f"cannot read the manifest as Parquet: {exc}", path=path) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise TbpsError(
            f"the manifest lacks column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(REQUIRED_COLUMNS)}, found {', '.join(frame.columns) or 'none'}",
            path=path,
        )
    for name in (C.IMAGE_PATH, C.CAPTION):
        if frame.schema[name] not in (pl.String, pl.Null):
            raise TbpsError("column must hold strings", path=path, field=name, value=str(frame.schema[name]))
    root = Path(image_root) if image_root else path.resolve().parent
    frame = frame.with_columns(pl.col(C.PERSON_ID).cast(pl.String), pl.col(C.IMAGE_PATH).cast(pl.String), pl.col(C.CAPTION).cast(pl.String))
    return _resolve_image_paths(frame, root, manifest_image_roots(path, image_root) if roots is None else roots)


def _resolve_image_paths(frame: pl.DataFrame, root: Path, roots: list[str]) -> pl.DataFrame:
    """Image paths resolved by the readers' resolver: relative ones inside ``root``, absolute ones inside one of ``roots``.

    A path that leaves its root (``..``, a symlink pointing out, an absolute path elsewhere) gets
    the readers' status (``path-outside-root``) and reason, and no image path; so does a path the
    resolver refuses outright (a NUL byte: ``bad-record``). With no ``roots``, absolute paths
    are only resolved (symlinks followed, as the image opener expects them) and checked for
    characters no file name holds.
    """
    given = frame.get_column(C.IMAGE_PATH).to_list()
    relative_hits = ImageResolver(root).resolve_all([p if p is not None and not p.startswith("/") else None for p in given])
    absolute = [p if p is not None and p.startswith("/") else None for p in given]
    checkers = [ImageResolver(r) for r in roots] or [ImageResolver("/")]
    resolved, refused = [], []
    seen: dict[str, tuple[str | None, str, str | None]] = {}
    for path, rel, abs_path in zip(given, relative_hits, absolute):
        if abs_path is None:  # relative (or no path)
            hit = rel if path is not None else (None, C.STATUS_OK, None)
        elif abs_path in seen:
            hit = seen[abs_path]
        else:
            hits = [c.resolve(abs_path) for c in checkers]
            hit = next((h for h in hits if h[1] == C.STATUS_OK), hits[0])
            if hit[1] == C.STATUS_PATH_OUTSIDE_ROOT and len(checkers) > 1:
                hit = (None, hit[1], f"absolute path {abs_path!r} is outside the image roots {', '.join(roots)}")
            seen[abs_path] = hit
        resolved.append(hit[0] if path is not None else None)
        refused.append(hit if path is not None and hit[1] != C.STATUS_OK else None)
    frame = frame.with_columns(pl.Series(C.IMAGE_PATH, resolved, dtype=pl.String))
    if not any(refused):
        return frame
    status = frame.get_column(C.STATUS).to_list() if C.STATUS in frame.columns else [C.STATUS_OK] * frame.height
    error = frame.get_column(C.ERROR).to_list() if C.ERROR in frame.columns else [None] * frame.height
    for k, hit in enumerate(refused):
        # A row that already carries a problem keeps it, as in the readers.
        if hit is not None and status[k] in (None, C.STATUS_OK):
            status[k], error[k] = hit[1], hit[2]
    return frame.with_columns(pl.Series(C.STATUS, status, dtype=pl.String), pl.Series(C.ERROR, error, dtype=pl.String))


def read_split(
    path: str, split: str | None, reader_options: dict, what: str
) -> pl.DataFrame:
    """Read a dataset through the readers and keep one split when the file has splits.

    Args:
        path: the dataset path (any format the readers support).
        split: the split to keep (``train``, ``val``, ...); all rows when the file has no splits.
        reader_options: ``format``, ``image_root``, ``image_col``, ``caption_col``, ``id_col``.
        what: the option that named the dataset (``--data``, ``--val``), for messages.

    Returns:
        The pair table (``columns.PAIR_SCHEMA``) of the split.

    Raises:
        TbpsError: the split is not among the file's splits.
    """
    frame = read_dataset(path, **reader_options)
    return select_split(frame, split, default=None, strict=False, what=what, path=path)[0]


def image_file_status(path: str | None) -> str:
    """``ok``, ``missing-image``, ``empty-file`` or ``bad-image`` from one ``stat`` of the file."""
    if path is None:
        return C.STATUS_MISSING_IMAGE
    try:
        size = member_size(path)  # a member of a webdataset tar shard (its index, no decoding); None: not one
        if size is None:
            size = os.stat(path).st_size
            if not os.path.isfile(path):
                return C.STATUS_BAD_IMAGE
    except FileNotFoundError:
        return C.STATUS_MISSING_IMAGE
    except (OSError, ValueError):  # ValueError: a NUL byte (refused earlier by the resolver)
        return C.STATUS_BAD_IMAGE
    return C.STATUS_OK if size > 0 else C.STATUS_EMPTY_FILE


def usable_pairs(frame: pl.DataFrame, source: str, max_missing: float | None) -> tuple[pl.DataFrame, PairReport]:
    """Drop the rows training cannot use, count them, and refuse when too many images are missing.

    Args:
        frame: a manifest or pair table.
        source: its path, for messages and the report.
        max_missing: the largest tolerated share of rows whose image file is missing or empty;
            None never refuses (validation data).

    Returns:
        The usable rows (in input order) and the report.

    Raises:
        TbpsError: more than ``max_missing`` of the rows have no image file, or no row is usable.
    """
    skipped: dict[str, int] = {}
    outside: list[str] = []
    rows = frame.height
    if C.STATUS in frame.columns:
        refused = frame.filter(pl.col(C.STATUS).fill_null("missing-status") != C.STATUS_OK)
        for status, count in refused.group_by(C.STATUS).len().iter_rows():
            skipped[str(status)] = skipped.get(str(status), 0) + count
        if C.ERROR in refused.columns:
            outside = refused.filter(pl.col(C.STATUS) == C.STATUS_PATH_OUTSIDE_ROOT).get_column(C.ERROR).head(3).to_list()
        frame = frame.filter(pl.col(C.STATUS) == C.STATUS_OK)
    no_caption = pl.col(C.CAPTION).is_null() | (pl.col(C.CAPTION).str.strip_chars() == "")
    n_empty = frame.filter(no_caption).height
    if n_empty:
        skipped[C.STATUS_EMPTY_CAPTION] = skipped.get(C.STATUS_EMPTY_CAPTION, 0) + n_empty
        frame = frame.filter(~no_caption)
    status = [image_file_status(p) for p in frame.get_column(C.IMAGE_PATH).to_list()]
    frame = frame.with_columns(pl.Series(_FILE_STATUS, status))
    bad = frame.filter(pl.col(_FILE_STATUS) != C.STATUS_OK)
    for kind, count in bad.group_by(_FILE_STATUS).len().iter_rows():
        skipped[kind] = skipped.get(kind, 0) + count
    examples = bad.get_column(C.IMAGE_PATH).head(3).to_list()
    if max_missing is not None and rows and bad.height / rows > max_missing:
        raise TbpsError(
            f"{bad.height} of {rows} rows ({100 * bad.height / rows:.1f}%) have a missing or empty image "
            f"file, more than --max-missing {max_missing:g}; e.g. {', '.join(map(str, examples))}",
            path=source,
            hint="fix the image root (--image-root) or raise --max-missing to skip them",
        )
    frame = frame.filter(pl.col(_FILE_STATUS) == C.STATUS_OK).drop(_FILE_STATUS)
    if frame.height == 0:
        raise TbpsError(f"no usable pairs (skipped: {skipped})", path=source)
    return frame, PairReport(source, rows, frame.height, skipped, [str(e) for e in examples], outside_examples=[str(e) for e in outside])


def person_codes(person_ids: Sequence[str | None]) -> np.ndarray:
    """Dense integer codes of person ids; a pair without an id gets a code of its own.

    Args:
        person_ids: one id (or None) per pair.

    Returns:
        An int64 array, equal codes for equal ids.
    """
    ids = list(person_ids)
    known = sorted({p for p in ids if p is not None})
    code = {p: i for i, p in enumerate(known)}
    out = np.empty(len(ids), dtype=np.int64)
    fresh = len(known)
    for i, p in enumerate(ids):
        # Unknown identity: unique, so the pair is only its own positive under the sdm loss.
        if p is None:
            out[i], fresh = fresh, fresh + 1
        else:
            out[i] = code[p]
    return out


def default_pad(image_size: tuple[int, int]) -> int:
    """Crop/pad margin in pixels: 2.6% of the height (IRRA's 10 px at 384), at least 1."""
    return max(1, round(0.026 * image_size[0]))


class PedestrianAugment:
    """Resize, random horizontal flip and random crop after zero padding; then normalise.

    Args:
        image_size: the model's (height, width).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        pad: pixels of zero padding on each side before the crop back to ``image_size``.
    """

    def __init__(self, image_size: tuple[int, int], mean, std, pad: int) -> None:
        self.image_size = tuple(image_size)
        self.mean, self.std, self.pad = list(mean), list(std), pad

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = TF.resize(image, list(self.image_size), InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < 0.5:
            image = TF.hflip(image)
        if self.pad:
            top, left = (int(v) for v in rng.integers(0, 2 * self.pad + 1, size=2))
            image = TF.crop(TF.pad(image, [self.pad]), top, left, *self.image_size)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


class TrainPairs(Dataset):
    """Training pairs addressed by ``(epoch, index)`` keys, augmented deterministically.

    Args:
        image_paths: absolute image paths.
        captions: one caption per pair.
        codes: person codes (see :func:`person_codes`).
        augment: the image transform.
        seed: the run's seed.
    """

    def __init__(self, image_paths: list[str], captions: list[str], codes: np.ndarray, augment: PedestrianAugment, seed: int):
        self.image_paths, self.captions, self.codes = image_paths, captions, codes
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        undecodable = []
        for replaced in range(_MAX_REPLACEMENTS):
            # A file that stopped decoding is replaced by the next pair, the same way on every run.
            i = (index + replaced) % len(self)
            res = open_image(self.image_paths[i])
            if res.image is not None:
                rng = np.random.default_rng([self.seed, epoch, i])
                return self.augment(res.image, rng), self.captions[i], int(self.codes[i]), replaced, tuple(undecodable)
            undecodable.append(self.image_paths[i])
        raise TbpsError(
            f"{_MAX_REPLACEMENTS} consecutive training images cannot be decoded (e.g. {res.error})",
            path=self.image_paths[index],
            hint="run `tbps score` on the data to give the bad files a status, and train on its selection",
        )


@dataclass
class Batch:
    """One micro-batch of this rank."""

    pixels: torch.Tensor  # (n, 3, H, W)
    tokens: torch.Tensor  # (n, context)
    person_ids: torch.Tensor  # (n,) int64
    replaced: int  # images replaced because they did not decode
    undecodable: list[str] = field(default_factory=list)  # the files that did not decode
    negatives: torch.Tensor | None = None  # (n, context): row i's caption perturbed (--hard-negatives)
    negative_valid: torch.Tensor | None = None  # (n,) bool: row i has one (else its row is a placeholder)


class Collate:
    """Stack pixels, tokenise captions with the model's tokenizer (and their perturbations).

    Args:
        tokenizer: the model's tokenizer.
        hard_negatives: also give each row its caption perturbed (:func:`tbps.data.perturb.perturb`,
            seeded by the caption and ``seed``: the same negative in every epoch, run and rank).
        seed: the perturbations' seed.
    """

    def __init__(self, tokenizer: Callable[..., torch.Tensor], hard_negatives: bool = False, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.hard_negatives = hard_negatives
        self.seed = seed

    def __call__(self, items) -> Batch:
        pixels, captions, codes, replaced, undecodable = zip(*items)
        batch = Batch(torch.stack(pixels), self.tokenizer(list(captions)), torch.tensor(codes), sum(replaced),
                      [path for paths in undecodable for path in paths])
        if self.hard_negatives:
            rewritten = hard_negatives(captions, self.seed)
            batch.negative_valid = torch.tensor([r is not None for r in rewritten], dtype=torch.bool)
            batch.negatives = self.tokenizer([r if r is not None else c for r, c in zip(rewritten, captions)])
        return batch


class GlobalBatches(Sampler):
    """This rank's keys of micro-batches ``start .. stop - 1`` (see the module docstring).

    Args:
        n: pairs in the training set.
        batch_size: the global micro-batch size (all ranks together).
        seed: the run's seed.
        start: the first micro-batch (0, or the resume point).
        stop: one past the last micro-batch.
        rank: this process's rank.
        world: the number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.per_epoch = n // batch_size
        self.local = batch_size // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        for k in range(self.start, self.stop):
            # One block of this epoch's permutation per micro-batch; this rank takes its slice.
            e, pos = divmod(k, self.per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            block = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
            mine = block[self.rank * self.local : (self.rank + 1) * self.local]
            yield [(e, int(i)) for i in mine]
