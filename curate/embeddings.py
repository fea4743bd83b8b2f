"""Embeddings in and out, in clip-retrieval's layout: ``tbps score --embeddings`` and ``tbps export-embeddings``.

clip-retrieval's ``clip_inference`` writes, per output partition ``N`` (zero-padded to the digits
of the partition count: ``0`` for one partition, ``00``..``11`` for twelve)::

    DIR/img_emb/img_emb_N.npy          (rows, D) float16, each row L2-normalised
    DIR/text_emb/text_emb_N.npy        (rows, D) float16, each row L2-normalised
    DIR/metadata/metadata_N.parquet    one row per sample: image_path, caption, then the
                                       columns of the sample's metadata (url, key, ...)

Row i of the three files of a partition is the same sample; a sample whose image failed to
load is not written. Readers (embedding-reader, autofaiss) take the files in sorted name order,
which the zero-padding makes partition-number order.

Reading (``tbps score DATA --embeddings DIR``). Each dataset row takes its embeddings from the
metadata row that names it, by the first key the metadata has:

1. ``pair_id`` (what ``tbps export-embeddings`` writes): the dataset's ``pair_id``.
2. ``image_path`` + ``caption``: the same caption (surrounding blanks ignored) of the same image.
   A metadata path names a dataset image when it equals the dataset's resolved path, or when
   its trailing components equal the image's path relative to the dataset's image root (the
   longest such tail wins): paths written relative to another directory or on another machine
   still match.
3. neither: row order. Row i of the partitions, concatenated in partition order, is row i of
   the dataset as read (every row, before ``--split``), and the counts must be equal.

Rows the reader accepted but no metadata row names get status ``no-embedding``; rows whose
stored vector is zero or not finite get ``bad-embedding``. The image file is still read once
(its hash is ``image_hash``, for exact de-duplication; a missing file is ``missing-image``), but
never decoded or embedded. The bank captions are embedded by ``--model``'s text tower (its width
must equal the embeddings'), and ``score``, ``bank_rank`` and the rest are computed as in
:func:`tbps.curate.score.run_score`, into the same score directory layout; there is no
``itm_score`` (that would need the images' forward pass).

Writing (``tbps export-embeddings SCORE_DIR --format clip-retrieval --out DIR``): the ok rows
of a complete score run, in score-table order, as float16 L2-normalised vectors, ``--rows-per-file``
rows per partition; the metadata holds ``image_path``, ``caption``, ``pair_id``, ``person_id``,
``split``, ``source`` and ``image_hash``. Rows that are not ok have no embedding and are counted,
not written (clip-retrieval writes only the samples that loaded).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tbps import columns as C
from tbps.curate.layout import ScoreDir, list_parts
from tbps.curate.score import (
    NOT_OK_WARNING,
    ScoreConfig,
    ScoreSummary,
    _bank_embeddings,
    _check_params,
    _part_is_done,
    _part_tables,
    _write_parquet,
    check_images_exist,
    check_unique_ids,
    keep_splits,
    order_pairs,
    plan_parts,
    run_params,
    sample_bank,
)
from tbps.data import shards
from tbps.data.images import MAX_IMAGE_BYTES
from tbps.data.readers import ReadConfig, read, read_captions
from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_dir, atomic_write, content_hash, file_hash, is_temp, sweep_temps, write_json
from tbps.models import load
from tbps.models.device import autocast_dtype, check_device
from tbps.models.encode import caption_truncated
from tbps.provenance import record

CLIP_RETRIEVAL = "clip-retrieval"
EXPORT_FORMATS = (CLIP_RETRIEVAL,)
IMG_DIR, TEXT_DIR, META_DIR = "img_emb", "text_emb", "metadata"
EXPORT_RECORD = "tbps-export.json"  # beside clip-retrieval's folders: what was exported, from where
ROWS_PER_FILE = 1_000_000  # clip-retrieval's write_batch_size default: samples per output partition

MATCH_PAIR_ID = C.PAIR_ID
MATCH_PATH_CAPTION = f"{C.IMAGE_PATH}+{C.CAPTION}"
MATCH_ROW_ORDER = "row-order"

EMB_ROW = "_emb_row"  # the dataset row's row in the concatenated embeddings (null: none)
EXPORT_METADATA = (C.IMAGE_PATH, C.CAPTION, C.PAIR_ID, C.PERSON_ID, C.SPLIT, C.SOURCE, C.IMAGE_HASH)


# --------------------------------------------------------------------------------------------
# Reading a clip-retrieval directory.


@dataclass
class EmbeddingStore:
    """A clip-retrieval embeddings directory, opened: the arrays memory-mapped, the metadata's keys read.

    Attributes:
        root: the directory.
        partitions: the partition numbers, in order.
        image, text: one (rows, D) array per partition (memory-mapped).
        offsets: the first global row of each partition, and the total rows last.
        metadata: the key columns the match uses, with ``_emb_row`` (the global row).
        match: how rows are matched (``pair_id``, ``image_path+caption`` or ``row-order``).
        dim: the embedding width.
        dtype: the stored dtype.
        hash: a content hash of every file, in order.
    """

    root: Path
    partitions: list[int]
    image: list[np.ndarray]
    text: list[np.ndarray]
    offsets: np.ndarray
    metadata: pl.DataFrame
    match: str
    dim: int
    dtype: str
    hash: str

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The image and text vectors of global ``rows``, as float32 arrays (n, D)."""
        img = np.zeros((len(rows), self.dim), np.float32)
        txt = np.zeros((len(rows), self.dim), np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(which):
            sel = np.flatnonzero(which == p)
            local = rows[sel] - self.offsets[p]
            img[sel] = self.image[p][local]
            txt[sel] = self.text[p][local]
        return img, txt


def _partition_files(root: Path, sub: str, ext: str) -> dict[int, Path]:
    """``{N: path}`` of ``root/sub/sub_N.ext`` (temporaries of an unfinished write skipped)."""
    folder = root / sub
    if not folder.is_dir():
        raise TbpsError(f"no {sub}/ folder: a clip-retrieval embeddings directory holds {IMG_DIR}/, {TEXT_DIR}/ and {META_DIR}/",
                        path=root, hint="scoring from embeddings needs image and text embeddings (clip-retrieval inference with --enable_text)")
    pattern = re.compile(rf"{re.escape(sub)}_(\d+)\.{ext}")
    found = {int(m.group(1)): p for p in folder.iterdir() if not is_temp(p) and (m := pattern.fullmatch(p.name))}
    if not found:
        raise TbpsError(f"no {sub}_N.{ext} files", path=folder)
    return found


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise TbpsError(f"not a readable .npy file ({exc})", path=path) from None
    if arr.ndim != 2 or arr.dtype not in (np.float16, np.float32):
        raise TbpsError("expected a 2-D float16 or float32 array of embeddings", path=path, value=f"{arr.dtype} {arr.shape}")
    return arr


def open_clip_retrieval(path: str | Path) -> EmbeddingStore:
    """Open a clip-retrieval embeddings directory and check that its files agree.

    Args:
        path: the directory holding ``img_emb/``, ``text_emb/`` and ``metadata/``.

    Returns:
        An :class:`EmbeddingStore`.

    Raises:
        TbpsError: a folder or a partition's file is missing, a file is unreadable, the widths
            differ, or the row counts of ``img_emb``, ``text_emb`` and ``metadata`` disagree
            (named, with the first partition where they do).
    """
    root = Path(path)
    if not root.is_dir():
        raise TbpsError("no embeddings directory here", path=root, field="--embeddings")
    files = {sub: _partition_files(root, sub, ext) for sub, ext in ((IMG_DIR, "npy"), (TEXT_DIR, "npy"), (META_DIR, "parquet"))}
    numbers = sorted(set().union(*(f.keys() for f in files.values())))
    for sub, found in files.items():
        missing = [n for n in numbers if n not in found]
        if missing:
            having = " and ".join(s for s, f in files.items() if missing[0] in f)
            raise TbpsError(f"partition {missing[0]} has {having} but no {sub} file ({len(missing)} partition(s) lack one)",
                            path=root / sub, hint="row i of each partition's three files is one sample: every partition needs all three")
    image = [_open_npy(files[IMG_DIR][n]) for n in numbers]
    text = [_open_npy(files[TEXT_DIR][n]) for n in numbers]
    meta_rows = []
    for n in numbers:
        try:
            meta_rows.append(pq.read_metadata(files[META_DIR][n]).num_rows)
        except (OSError, pa.ArrowException) as exc:
            raise TbpsError(f"not a readable Parquet file ({exc})", path=files[META_DIR][n]) from None
    counts = [(n, a.shape[0], t.shape[0], m) for n, a, t, m in zip(numbers, image, text, meta_rows)]
    bad = [c for c in counts if len({c[1], c[2], c[3]}) > 1]
    if bad:
        n, a, t, m = bad[0]
        total = [sum(c[i] for c in counts) for i in (1, 2, 3)]
        raise TbpsError(
            f"the embeddings' counts disagree: img_emb {total[0]:,} rows, text_emb {total[1]:,}, metadata {total[2]:,} "
            f"(partition {n}: {a:,} / {t:,} / {m:,}); row i of each file must be the same sample",
            path=root, field="--embeddings",
        )
    dims = {a.shape[1] for a in image + text}
    if len(dims) > 1:
        raise TbpsError(f"the image and text embeddings have different widths ({', '.join(map(str, sorted(dims)))})", path=root)
    schema = pq.read_schema(files[META_DIR][numbers[0]])
    if C.PAIR_ID in schema.names:
        match, keys = MATCH_PAIR_ID, [C.PAIR_ID]
    elif C.IMAGE_PATH in schema.names and C.CAPTION in schema.names:
        match, keys = MATCH_PATH_CAPTION, [C.IMAGE_PATH, C.CAPTION]
    else:
        match, keys = MATCH_ROW_ORDER, []
    offsets = np.concatenate([[0], np.cumsum([c[1] for c in counts])]).astype(np.int64)
    frames = []
    for n, start in zip(numbers, offsets):
        try:
            frame = pl.read_parquet(files[META_DIR][n], columns=keys) if keys else pl.DataFrame()
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise TbpsError(f"the metadata cannot be read ({exc})", path=files[META_DIR][n], field=",".join(keys)) from None
        index = pl.Series(EMB_ROW, np.arange(start, start + meta_rows[numbers.index(n)], dtype=np.int64))
        frames.append(frame.select([pl.col(k).cast(pl.String) for k in keys]).with_columns(index) if keys else pl.DataFrame([index]))
    digest = content_hash(json.dumps([[str(p.relative_to(root)), file_hash(p)] for n in numbers for p in
                                      (files[IMG_DIR][n], files[TEXT_DIR][n], files[META_DIR][n])]).encode())
    return EmbeddingStore(root=root, partitions=numbers, image=image, text=text, offsets=offsets, metadata=pl.concat(frames),
                          match=match, dim=dims.pop(), dtype=str(image[0].dtype), hash=digest)


# --------------------------------------------------------------------------------------------
# Matching dataset rows to embedding rows (table -> table).


@dataclass
class Match:
    """How the dataset's rows met the embeddings' rows."""

    key: str
    matched_rows: int = 0  # dataset rows that found an embedding
    used_embeddings: int = 0  # distinct embedding rows some dataset row took
    duplicate_keys: int = 0  # metadata rows whose key an earlier row already had (the first one is used)


def _dataset_path(meta_path: str | None, known: set[str], by_relative: dict[str, str]) -> str | None:
    """The dataset image a metadata path names: the same path, or the longest tail equal to a path under the image root."""
    if meta_path is None:
        return None
    if meta_path in known:
        return meta_path
    parts = [p for p in PurePosixPath(meta_path.replace("\\", "/")).parts if p not in ("/", ".")]
    for i in range(len(parts)):
        hit = by_relative.get("/".join(parts[i:]))
        if hit is not None:
            return hit
    return None


def match_embeddings(pairs: pl.DataFrame, store: EmbeddingStore, image_root: str | None) -> tuple[pl.DataFrame, Match]:
    """Each dataset row's embedding row, by the rule of :attr:`EmbeddingStore.match` (module docstring).

    Args:
        pairs: the pair table as read (every row, in reader order).
        store: the opened embeddings.
        image_root: the dataset's resolved image root (paths relative to it match), or None.

    Returns:
        (``pairs`` with an ``_emb_row`` column, null where no embedding matches; the counts).

    Raises:
        TbpsError: row order is the rule and the counts differ.
    """
    meta, found = store.metadata, Match(store.match)
    if store.match == MATCH_ROW_ORDER:
        if meta.height != pairs.height:
            raise TbpsError(
                f"the metadata has no {C.PAIR_ID} or {C.IMAGE_PATH}+{C.CAPTION} columns, so rows match by position, and "
                f"{meta.height:,} embedding rows cannot be matched to {pairs.height:,} dataset rows",
                path=store.root, field="--embeddings", hint="write the metadata with image_path and caption (clip-retrieval does)",
            )
        joined = pairs.with_columns(pl.Series(EMB_ROW, np.arange(pairs.height, dtype=np.int64)))
    else:
        if store.match == MATCH_PAIR_ID:
            keys, left = [C.PAIR_ID], pairs
        else:
            known = set(pairs[C.IMAGE_PATH].drop_nulls().to_list())
            root = os.path.realpath(image_root) if image_root else None
            by_relative = {}
            for p in known:
                rel = os.path.relpath(p, root) if root else None
                if rel is not None and not rel.startswith(".."):
                    by_relative[rel.replace(os.sep, "/")] = p
            paths = [_dataset_path(p, known, by_relative) for p in meta[C.IMAGE_PATH].to_list()]
            meta = meta.with_columns(pl.Series(C.IMAGE_PATH, paths, pl.String), pl.col(C.CAPTION).str.strip_chars())
            keys = [C.IMAGE_PATH, "_caption"]
            meta = meta.rename({C.CAPTION: "_caption"})
            left = pairs.with_columns(pl.col(C.CAPTION).str.strip_chars().alias("_caption"))
        keyed = meta.filter(pl.all_horizontal(pl.col(k).is_not_null() for k in keys))
        first = keyed.unique(subset=keys, keep="first", maintain_order=True)
        found.duplicate_keys = keyed.height - first.height
        joined = left.join(first.select([*keys, EMB_ROW]), on=keys, how="left", maintain_order="left").select([*pairs.columns, EMB_ROW])
    ok = joined[EMB_ROW].is_not_null() & (joined[C.STATUS] == C.STATUS_OK)
    found.matched_rows = int(ok.sum())
    found.used_embeddings = joined.filter(ok)[EMB_ROW].n_unique()
    return joined, found


# --------------------------------------------------------------------------------------------
# tbps score --embeddings


@dataclass
class EmbeddingScoreSummary(ScoreSummary):
    """What ``tbps score --embeddings`` did: :class:`ScoreSummary` and how the embeddings matched."""

    embeddings: Path | None = None
    match: str = ""
    embedding_rows: int = 0
    embeddings_used: int = 0
    duplicate_keys: int = 0


def _image_outcome(path: str) -> tuple[str, str | None, str | None]:
    """(status, error, hash) of an image file or tar-shard member read (not decoded): missing, empty, unreadable or ok."""
    try:
        size = shards.member_size(path)  # None: not a shard member
        if size is not None:
            data = shards.read_member(path, MAX_IMAGE_BYTES)
            if data is None:
                return C.STATUS_BAD_IMAGE, f"{path}: the shard member cannot be read (cut off, or above {MAX_IMAGE_BYTES:,} bytes)", None
            if not data:
                return C.STATUS_EMPTY_FILE, f"{path}: the member is empty (0 bytes)", content_hash(data)
            return C.STATUS_OK, None, content_hash(data)
        if os.path.getsize(path) == 0:
            return C.STATUS_EMPTY_FILE, f"{path}: the file is empty (0 bytes)", file_hash(path)
        return C.STATUS_OK, None, file_hash(path)
    except FileNotFoundError:
        return C.STATUS_MISSING_IMAGE, f"{path}: no such file", None
    except (OSError, ValueError) as exc:
        return C.STATUS_BAD_IMAGE, f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})", None


def _score_part(rows: pl.DataFrame, store: EmbeddingStore, loaded, bank_emb: torch.Tensor, pool: ThreadPoolExecutor) -> tuple[pa.Table, pa.Table]:
    """The score table and embeddings of one part from stored embeddings (reads image files only to hash them)."""
    status, error, all_paths = rows[C.STATUS].to_list(), rows[C.ERROR].to_list(), rows[C.IMAGE_PATH].to_list()
    emb_row = rows[EMB_ROW].fill_null(-1).to_numpy()
    reader_ok = np.array([s == C.STATUS_OK for s in status], dtype=bool)
    distinct = sorted({all_paths[r] for r in np.flatnonzero(reader_ok)})
    outcomes = dict(zip(distinct, pool.map(_image_outcome, distinct)))
    for r in np.flatnonzero(reader_ok & (emb_row < 0)):
        # The image's own problem, as a normal run reports it, before the missing embedding.
        s, e, _ = outcomes[all_paths[r]]
        status[r], error[r] = (s, e) if s != C.STATUS_OK else (C.STATUS_NO_EMBEDDING, f"no row of {store.root} matches its {store.match}")
    have = np.flatnonzero(reader_ok & (emb_row >= 0))
    img, txt = store.take(emb_row[have])
    # Re-normalised in fp32: stored float16 rows are normalised to ~1e-3, another writer's maybe not at all.
    norms = np.minimum(np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1))
    usable = np.isfinite(norms) & (norms > 0) & np.isfinite(img).all(1) & np.isfinite(txt).all(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        img = np.where(usable[:, None], img / np.linalg.norm(img, axis=1, keepdims=True), 0).astype(np.float32)
        txt = np.where(usable[:, None], txt / np.linalg.norm(txt, axis=1, keepdims=True), 0).astype(np.float32)
    paths = [all_paths[r] for r in have]
    image_status, image_error, image_hash = [], [], []
    for i, p in enumerate(paths):
        s, e, h = outcomes[p]
        if s == C.STATUS_OK and not usable[i]:
            s, e = C.STATUS_BAD_EMBEDDING, f"its stored image or text embedding (row {int(emb_row[have[i]])} of {store.root}) is zero or not finite"
        image_status.append(s)
        image_error.append(e)
        image_hash.append(h)
    index = np.full(rows.height, -1, dtype=np.int64)
    index[have] = np.arange(len(have))
    all_captions = rows[C.CAPTION].to_list()
    captions = [all_captions[r] for r in have]
    truncated = caption_truncated(loaded, captions, loaded.tokenizer(captions)) if captions else np.zeros(0, bool)
    frame = rows.with_columns(pl.Series(C.STATUS, status, pl.String), pl.Series(C.ERROR, error, pl.String))
    return _part_tables(frame, img, image_status, image_error, image_hash, index, txt, index, truncated, bank_emb)


def score_from_embeddings(config: ScoreConfig, progress: Callable[[int, int], None] | None = None,
                          log: Callable[[str], None] | None = None) -> EmbeddingScoreSummary:
    """``tbps score --embeddings``: the score table of ``config.data`` from stored embeddings (module docstring).

    Args:
        config: the run's parameters, with ``embeddings`` the directory. ``batch_size``,
            ``max_pixels`` and ``itm`` do not apply (no image is decoded); ``workers`` threads
            hash the image files; ``model`` embeds the bank.
        progress: called as ``progress(done_pairs, total_pairs)`` after each part written.
        log: called with one-line messages (matching, resume, warnings).

    Returns:
        An :class:`EmbeddingScoreSummary`; the directory has the layout of ``tbps score``'s.

    Raises:
        TbpsError: bad embeddings (counts that disagree, a width other than the model's), no
            dataset row with an embedding, or every row failed.
        UsageError: no ``embeddings``, ``shard`` given, or under torchrun.
    """
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    if config.embeddings is None:
        raise UsageError("score_from_embeddings needs --embeddings DIR", field="--embeddings")
    if config.shard is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--embeddings scores in one process: drop --shard and torchrun (there is no forward pass to share)", field="--embeddings")
    device = check_device(config.device)
    out = ScoreDir(Path(config.out))
    store = open_clip_retrieval(config.embeddings)

    dataset = read(ReadConfig(data=Path(config.data), **config.reader_options()))
    if dataset.pairs.height == 0:
        raise TbpsError("the dataset has no pairs", path=config.data)
    check_unique_ids(dataset.pairs, config.data)
    joined, found = match_embeddings(dataset.pairs, store, dataset.image_root)
    pairs, other_splits = keep_splits(joined, config.splits(), config.data)
    if other_splits:
        shown = ", ".join(f"{name} {n:,}" for name, n in other_splits.items())
        log(f"scoring split {','.join(config.splits())}: {pairs.height:,} of {dataset.pairs.height:,} rows (not scored: {shown})")
    matched = pairs.filter(pl.col(EMB_ROW).is_not_null() & (pl.col(C.STATUS) == C.STATUS_OK)).height
    if not matched:
        example = store.metadata.drop(EMB_ROW).head(1).to_dicts()
        raise TbpsError(
            f"no dataset row to score has an embedding in the directory (matched on {store.match}; {store.rows:,} embedding rows)",
            path=store.root, field="--embeddings", value=example[0] if example else None,
            hint=f"e.g. the dataset's first image is {pairs[C.IMAGE_PATH][0] if pairs.height else None!r}; check --image-root and the metadata's paths",
        )
    log(f"embeddings: {matched:,} of {pairs.height:,} rows matched on {store.match} ({store.rows:,} rows, {store.dim}-d {store.dtype})")
    if found.used_embeddings < store.rows:
        log(f"{store.rows - found.used_embeddings:,} of {store.rows:,} embedding rows name no dataset row and are not used")
    if found.duplicate_keys:
        log(f"warning: {found.duplicate_keys:,} metadata rows repeat an earlier row's {store.match}; the first one's embeddings are used")
    check_images_exist(pairs, Path(config.data))
    pairs = order_pairs(pairs)
    parts_plan = plan_parts(pairs[C.IMAGE_PATH].to_list(), config.chunk_size)

    loaded = load(config.model, seed=config.seed)
    if loaded.image_vectors != 1 or loaded.embed_dim != store.dim:
        width = f"{loaded.embed_dim}-d" + (f" with {loaded.image_vectors} image vectors" if loaded.image_vectors != 1 else "")
        raise TbpsError(f"the embeddings are {store.dim}-d and --model {config.model} embeds {width}: the bank must be embedded "
                        "by the model that made the embeddings", path=store.root, field="--model")
    if loaded.has_pair_score and config.itm:
        log("note: no itm_score from stored embeddings (the matching head needs the images); bank_rank and score are the ITC cosine")
    bank = sample_bank(read_captions(config.bank, split=None if config.bank_split == "all" else config.bank_split), config.bank_size, config.seed)
    log(f"bank: {len(bank):,} captions from {config.bank}" + (f" ({config.bank_split} split)" if config.bank_split != "all" else ""))
    bank_frame = pl.DataFrame({"bank_index": np.arange(len(bank), dtype=np.int32), C.CAPTION: bank})
    dtype = autocast_dtype(config.precision, device)
    params = {
        **run_params(config, loaded, pairs.drop(EMB_ROW), bank_frame, len(parts_plan), dtype, dataset.image_root, itm=False, image_vectors=1),
        "embeddings": {"path": str(store.root.resolve()), "hash": store.hash, "rows": store.rows, "match": store.match},
    }
    for directory in (out.root, out.scores, out.embeddings):
        directory.mkdir(parents=True, exist_ok=True)
        sweep_temps(directory)
    _check_params(out, params)
    if not out.bank.exists():
        with atomic_write(out.bank) as fh:
            bank_frame.write_parquet(fh)
    metadata = {"tbps.model": json.dumps(loaded.identity, sort_keys=True), "tbps.bank_size": str(len(bank))}
    todo = [k for k in range(len(parts_plan)) if not _part_is_done(out, k, parts_plan[k], metadata, log)]
    if len(todo) < len(parts_plan):
        log(f"resuming: {len(parts_plan) - len(todo)} of {len(parts_plan)} parts already written, {len(todo)} to score")
    bank_emb = _bank_embeddings(out, loaded, bank, device, config.precision, 0, 1)

    t_work, done = time.perf_counter(), 0
    total = sum(parts_plan[k][1] - parts_plan[k][0] for k in todo)
    with ThreadPoolExecutor(max(1, config.workers)) as pool:
        for k in todo:
            start, end = parts_plan[k]
            scores, emb = _score_part(pairs.slice(start, end - start), store, loaded, bank_emb, pool)
            _write_parquet(emb, out.embedding_part(k), metadata)  # embeddings first, as run_score writes them
            _write_parquet(scores, out.score_part(k), metadata)
            done += end - start
            if progress:
                progress(done, total)
    elapsed = time.perf_counter() - t_work

    counts = pl.scan_parquet(list_parts(out.scores)).group_by(C.STATUS).len().collect()
    status_counts = dict(sorted(zip(counts[C.STATUS].to_list(), counts["len"].to_list())))
    summary = EmbeddingScoreSummary(
        out=out.root, rows=pairs.height, parts_total=len(parts_plan), parts_done_here=len(todo), parts_skipped=len(parts_plan) - len(todo),
        status_counts=status_counts, seconds=time.perf_counter() - t0, pairs_per_second=done / elapsed if elapsed > 0 and done else 0.0,
        complete=True, bank_size=len(bank), splits=config.splits(), rows_other_splits=sum(other_splits.values()),
        embeddings=store.root, match=store.match, embedding_rows=store.rows, embeddings_used=found.used_embeddings,
        duplicate_keys=found.duplicate_keys,
    )
    if sum(status_counts.values()) != pairs.height:
        raise TbpsError(f"the score table has {sum(status_counts.values())} rows for {pairs.height} input pairs", path=out.root)
    bad = pairs.height - status_counts.get(C.STATUS_OK, 0)
    if bad > NOT_OK_WARNING * pairs.height:
        shown = ", ".join(f"{k} {v:,}" for k, v in status_counts.items() if k != C.STATUS_OK)
        log(f"warning: {bad:,} of {pairs.height:,} rows ({100 * bad / pairs.height:.1f}%) are not ok ({shown})")
    write_json(out.record, record(
        config, params=params, rows=pairs.height, status_counts=status_counts, schema=str(C.SCORE_SCHEMA),
        embeddings={"match": store.match, "rows": store.rows, "used": found.used_embeddings, "duplicate_keys": found.duplicate_keys},
        last_process={"seconds": summary.seconds, "pairs_per_second": summary.pairs_per_second, "parts_scored": len(todo)},
    ))
    log(f"finalised {out.record}")
    if not status_counts.get(C.STATUS_OK):
        example = pl.scan_parquet(list_parts(out.scores)).select(C.ERROR).head(1).collect().item()
        raise TbpsError(f"no row scored ok: every one of the {pairs.height:,} rows failed (e.g. {example})", path=out.root,
                        hint="the statuses are in the score table")
    return summary


# --------------------------------------------------------------------------------------------
# tbps export-embeddings


@dataclass(kw_only=True)
class ExportEmbeddingsConfig:
    """Parameters of ``tbps export-embeddings``; field names equal the CLI option names.

    Attributes:
        score_dir: a complete ``tbps score`` output directory.
        out: the directory to write (replaced when it holds an earlier export; refused when it
            holds anything else).
        format: the layout written: ``clip-retrieval``.
        rows_per_file: embedding rows per output partition.
    """

    score_dir: str | Path
    out: str | Path
    format: str = CLIP_RETRIEVAL
    rows_per_file: int = ROWS_PER_FILE

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}", field="--format", value=self.format)
        if self.rows_per_file < 1:
            raise UsageError("--rows-per-file must be at least 1", field="--rows-per-file", value=self.rows_per_file)


@dataclass
class ExportSummary:
    """What ``tbps export-embeddings`` wrote."""

    out: Path
    rows: int  # score table rows
    written: int  # embedding rows written
    partitions: int
    dim: int
    skipped: dict[str, int] = field(default_factory=dict)  # rows not ok, by status: no embedding


def partition_label(n: int, count: int) -> str:
    """Partition ``n``'s label among ``count``: zero-padded to the digits of ``count``, as clip-retrieval names them."""
    return str(n).zfill(int(math.log10(max(1, count))) + 1)


def export_embeddings(config: ExportEmbeddingsConfig, log: Callable[[str], None] | None = None) -> ExportSummary:
    """Write a score run's embeddings in clip-retrieval's layout (module docstring).

    Args:
        config: what to export and where.
        log: called with one-line messages.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        TbpsError: not a complete score run, no embeddings (every row failed), BLIP-2's several
            image vectors, or an output directory that holds something else.
    """
    log = log or (lambda _msg: None)
    run, target = ScoreDir(Path(config.score_dir)), Path(config.out)
    if not run.is_score_run():
        raise TbpsError("not a tbps score output directory (no params.json or scores/)", path=run.root)
    if not run.is_complete():
        raise TbpsError("the score run is not complete (no score.json yet)", path=run.root, hint="re-run its tbps score command to finish it")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / EXPORT_RECORD).is_file())):
        raise TbpsError("the output exists and is not an earlier tbps export; it is not replaced", path=target, field="--out",
                        hint="give a new --out")
    score_parts, emb_parts = list_parts(run.scores), list_parts(run.embeddings)
    if [p.name for p in score_parts] != [p.name for p in emb_parts]:
        raise TbpsError(f"{len(score_parts)} score parts but {len(emb_parts)} embeddings parts", path=run.root)
    emb_schema = pq.read_schema(emb_parts[0]) if emb_parts else None
    if emb_schema is None or C.IMAGE_EMB not in emb_schema.names:
        raise TbpsError("the score run has no embeddings", path=run.embeddings)
    dim, image_dim = emb_schema.field(C.TEXT_EMB).type.list_size, emb_schema.field(C.IMAGE_EMB).type.list_size
    if dim != image_dim:
        raise TbpsError(f"the image embeddings hold {image_dim // dim} vectors per image (BLIP-2's queries); clip-retrieval holds one",
                        path=run.embeddings, field=C.IMAGE_EMB)
    written = sum(pq.read_metadata(p).num_rows for p in emb_parts)
    statuses = pl.scan_parquet(score_parts).group_by(C.STATUS).len().collect()
    by_status = dict(zip(statuses[C.STATUS].to_list(), statuses["len"].to_list()))
    rows = sum(by_status.values())
    if not written:
        raise TbpsError(f"no row of the {rows:,} has an embedding (none scored ok)", path=run.root)
    count = math.ceil(written / config.rows_per_file)
    skipped = {k: v for k, v in sorted(by_status.items()) if k != C.STATUS_OK}
    with atomic_dir(target) as tmp:
        for sub in (IMG_DIR, TEXT_DIR, META_DIR):
            (tmp / sub).mkdir()
        buffer: list[tuple[np.ndarray, np.ndarray, pl.DataFrame]] = []
        n = have = 0
        for score_part, emb_part in zip(score_parts, emb_parts):
            emb = pl.read_parquet(emb_part)
            # An embeddings part holds its score part's ok rows, in the same order.
            meta = emb.select(C.PAIR_ID).join(pl.read_parquet(score_part), on=C.PAIR_ID, how="left", maintain_order="left")
            buffer.append((_vectors(emb[C.IMAGE_EMB], dim), _vectors(emb[C.TEXT_EMB], dim), meta.select([c for c in EXPORT_METADATA if c in meta.columns])))
            have += emb.height
            while have >= config.rows_per_file:
                buffer = _write_partition(tmp, partition_label(n, count), buffer, config.rows_per_file)
                n, have = n + 1, have - config.rows_per_file
        if have:
            _write_partition(tmp, partition_label(n, count), buffer, have)
        write_json(tmp / EXPORT_RECORD, record(config, source=str(run.root.resolve()), rows=rows, written=written, partitions=count,
                                               skipped=skipped, dim=dim, dtype="float16"))
    log(f"wrote {written:,} embeddings in {count} partition(s) to {target}")
    return ExportSummary(out=target, rows=rows, written=written, partitions=count, dim=dim, skipped=skipped)


def _vectors(column: pl.Series, dim: int) -> np.ndarray:
    """A fixed-size-list column of float16 -> a (n, dim) float16 array."""
    arr = column.to_arrow()
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, dim)


def _write_partition(tmp: Path, label: str, buffer: list, rows: int) -> list:
    """Write the first ``rows`` buffered rows as partition ``label``; return what is left."""
    img = np.concatenate([b[0] for b in buffer])
    txt = np.concatenate([b[1] for b in buffer])
    meta = pl.concat([b[2] for b in buffer])
    for sub, arr in ((IMG_DIR, img[:rows]), (TEXT_DIR, txt[:rows])):
        with atomic_write(tmp / sub / f"{sub}_{label}.npy") as fh:
            np.save(fh, np.ascontiguousarray(arr))
    with atomic_write(tmp / META_DIR / f"{META_DIR}_{label}.parquet") as fh:
        meta.head(rows).write_parquet(fh)
    return [(img[rows:], txt[rows:], meta.slice(rows))] if len(img) > rows else []
