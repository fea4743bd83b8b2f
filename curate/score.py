"""``tbps score``: the cross-modal relevance of every image-caption pair, into Parquet.

For each pair: ``score``, the cosine of the L2-normalised image and caption embeddings, and
``bank_rank``, how many captions of a reference bank score *strictly* higher against the image
than the pair's own caption (0 = the own caption beats the whole bank).

The paper's rules, in bank ranks, are stated in :mod:`tbps.curate.layout`.

The engine:

* Pairs are sorted by image path and cut into parts of about ``chunk_size`` pairs that never
  split an image's pairs, so every distinct image is decoded and embedded once. Captions are
  embedded once per distinct caption within a part.
* DataLoader workers decode all images of this process's parts, while the main process runs the
  model on a GPU, or in windows between the forward passes when the model runs on the same CPU
  cores (see ``tbps.models.encode.iter_image_batches``); embeddings never accumulate beyond one part.
* On a GPU nothing waits for the GPU between batches: image and caption embeddings stay on the
  device until a part is complete, the bank rank runs there, and each part comes back in one copy.
  The next part's captions are tokenised, and the last part's tables built and written, in
  background threads while the model runs (:data:`BACKGROUND`; on a CPU, where those threads
  would take the model's cores, the same steps run in order in the main thread). The tables are
  the same bit for bit either way.
* The bank rank is a chunked matrix product against the bank embeddings, compared in fp32.
* Each part is written atomically (temporary file, then rename); a re-run skips the parts that
  exist, so a killed run resumes and ends with the table an uninterrupted run writes. A run with
  other parameters into the same directory is refused.
* ``torchrun`` ranks (or ``--shard i/N``) take parts ``k`` with ``k % N == i``; whichever process
  sees the last part written finalises ``score.json``.
* ``--split`` scores the rows of some splits only (``split`` is a column of the score table, so
  ``tbps select`` can also choose later); the rows of the other splits are counted, not scored.
* Progress is reported per batch of images and of captions (``progress(done_pairs, total_pairs)``:
  a part's pairs are credited evenly over its images and captions, and in full once it is written).

The output directory's layout is :mod:`tbps.curate.layout`.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tbps import columns as C
from tbps.curate.layout import PAPER_BANK_SIZE, ScoreDir, list_parts
from tbps.data.options import ReaderOptions
from tbps.data.readers import ReadConfig, read, read_captions, sample_images
from tbps.data.splits import splits_of
from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_write, content_hash, sweep_temps, write_json
from tbps.models import load
from tbps.models.device import autocast_dtype, barrier, check_precision, distributed
from tbps.models.encode import (
    TEXT_BATCH, Tokenized, embed_image_batch, embed_image_batch_with_state, encode_texts, encode_tokens, iter_image_batches, pair_scores,
)
from tbps.models.encode import tokenize_captions
from tbps.models.encode import place as place_model
from tbps.models.protocol import Encoder, pair_similarity, similarity
from tbps.provenance import record

# "Strictly higher" means higher by more than float32 noise: the own caption's cosine and the
# bank's come from different kernels, and a bank caption equal to the own caption must tie.
TIE_EPS = 1e-6


@dataclass(kw_only=True)
class ScoreConfig(ReaderOptions):
    """Parameters of ``tbps score``; field names equal the CLI option names.

    Attributes:
        data: the dataset to score (any format the readers support).
        model: a model spec (see ``tbps.models.load``).
        bank: the reference bank: a dataset or a text file with one caption per line.
        out: the output directory.
        format, image_root, image_col, caption_col, id_col: the reader options of ``data``
            (``tbps.data.options.ReaderOptions``).
        bank_size: captions sampled from the bank.
        bank_split: the split of a bank dataset its captions come from (``train``: never the test
            split's captions); ``all`` takes every row. A text file has no splits.
        seed: seed of the bank sample (and of random model weights).
        batch_size: images per forward pass (captions go in batches of a fixed size, so their
            embeddings do not depend on it).
        workers: DataLoader worker processes decoding images.
        precision: ``auto`` (bf16 where supported natively), ``fp32`` or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        chunk_size: pairs per output part (the unit of resume).
        shard: ``i/N`` to score only shard i of N (schedulers without torchrun).
        max_pixels: a decompression-bomb limit below Pillow's default, if any.
        split: ``NAME[,NAME...]``: score only the rows of these splits of ``data``; None scores
            every row.
        itm: when the model has an image-text matching head, also score every pair with it
            (``itm_score``); False skips that pass.
        embeddings: a clip-retrieval embeddings directory to score from instead of the forward
            pass (``tbps.curate.embeddings.score_from_embeddings`` runs such a config).
    """

    data: str
    model: str
    bank: str
    out: str
    split: str | None = None
    bank_size: int = PAPER_BANK_SIZE
    bank_split: str = "train"
    seed: int = 0
    batch_size: int = 256
    workers: int = 2
    precision: str = "auto"
    device: str = "auto"
    chunk_size: int = 16_384
    shard: str | None = None
    max_pixels: int | None = None
    itm: bool = True
    embeddings: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bank_size", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1", value=getattr(self, name))
        if self.workers < 0:
            raise UsageError("--workers must be 0 or more", value=self.workers)
        check_precision(self.precision)
        if self.shard is not None:
            self.shard_index, self.shard_count = parse_shard(self.shard)
        if self.split is not None and not self.splits():
            raise UsageError("--split names one or more splits, e.g. train or train,val", field="--split", value=self.split)

    def splits(self) -> list[str] | None:
        """The split names of ``--split`` (sorted, distinct), or None for every row."""
        if self.split is None:
            return None
        return sorted({name.strip() for name in self.split.split(",") if name.strip()})


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), checked."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError("--shard must look like i/N, e.g. 0/4", value=text) from None
    if n < 1 or not 0 <= i < n:
        raise UsageError("--shard i/N needs 0 <= i < N", value=text)
    return i, n


@dataclass
class ScoreSummary:
    """What a ``tbps score`` process did."""

    out: Path
    rows: int
    parts_total: int
    parts_done_here: int
    parts_skipped: int
    status_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    pairs_per_second: float = 0.0
    complete: bool = False
    bank_size: int = 0
    splits: list[str] | None = None
    rows_other_splits: int = 0


# --------------------------------------------------------------------------------------------
# Pure pieces: table -> table, arrays -> arrays.


def bank_rank(image_emb: torch.Tensor, own: torch.Tensor, bank_emb: torch.Tensor, chunk: int = 2048, image_vectors: int = 1) -> torch.Tensor:
    """How many bank captions score strictly higher against each image than its own caption.

    Args:
        image_emb: (n, D) L2-normalised image embeddings ((n, Q * D) with ``image_vectors`` Q).
        own: (n,) the score of each image with its own caption.
        bank_emb: (K, D) L2-normalised bank caption embeddings.
        chunk: images per matrix product (bounds memory at chunk x K floats).
        image_vectors: embeddings per image: the score is the largest cosine of an image's vectors
            (BLIP-2's ITC, :func:`tbps.models.protocol.similarity`).

    Returns:
        (n,) int32 ranks in [0, K]. Compared in fp32 whatever the inputs' dtype (bf16 products
        tie often and would make ranks coarse); "higher" means by more than ``TIE_EPS``.
    """
    bank_t = bank_emb.float().T.contiguous()
    ranks = torch.empty(len(own), dtype=torch.int32, device=own.device)
    for start in range(0, len(own), chunk):
        block = image_emb[start : start + chunk].float()
        sims = block @ bank_t if image_vectors == 1 else similarity(block, bank_t.T, image_vectors)
        ranks[start : start + chunk] = (sims > own[start : start + chunk].float().unsqueeze(1) + TIE_EPS).sum(1, dtype=torch.int32)
    return ranks


def check_unique_ids(pairs: pl.DataFrame, path: str) -> None:
    """Refuse duplicate ``pair_id``s before any work starts."""
    dups = pairs.group_by(C.PAIR_ID).len().filter(pl.col("len") > 1)
    if dups.height:
        shown = dups.sort(C.PAIR_ID).head(5)[C.PAIR_ID].to_list()
        raise TbpsError(
            f"{dups.height} pair_id values occur more than once; every pair needs its own id",
            path=path,
            field=C.PAIR_ID,
            value=shown,
        )


def keep_splits(pairs: pl.DataFrame, names: list[str] | None, path: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """The rows of the named splits, and how many rows each other split (or no split) holds.

    Args:
        pairs: the pair table as read.
        names: the splits to keep; None keeps every row.
        path: the dataset, for messages.

    Returns:
        (the kept rows in input order, ``{other split or "none": rows}``).

    Raises:
        TbpsError: the data has no splits, or a name is not one of its splits.
    """
    if names is None:
        return pairs, {}
    found = splits_of(pairs)
    if not found:
        raise TbpsError("the data has no splits, so --split selects no row", path=path, field="--split", value=",".join(names),
                        hint="drop --split to score every row")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise TbpsError(f"split {', '.join(map(repr, unknown))} not found", path=path, field="--split", value=",".join(names),
                        hint=f"splits in the file: {', '.join(found)}")
    chosen = pl.col(C.SPLIT).is_in(names).fill_null(False)
    others = pairs.filter(~chosen).group_by(pl.col(C.SPLIT).fill_null("none")).len().sort(C.SPLIT)
    return pairs.filter(chosen), dict(others.iter_rows())


def order_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """Sort pairs by image path (refused rows last), then pair id: an image's pairs become adjacent."""
    return pairs.sort([C.IMAGE_PATH, C.PAIR_ID], nulls_last=True)


def plan_parts(image_paths: list[str | None], chunk_size: int) -> list[tuple[int, int]]:
    """Cut sorted rows into parts of about ``chunk_size`` rows that never split an image's rows.

    Args:
        image_paths: the image path of each row, sorted so equal paths are adjacent.
        chunk_size: the target rows per part.

    Returns:
        (start, end) row ranges covering every row once, in order.
    """
    n = len(image_paths)
    parts, start = [], 0
    while start < n:
        end = min(start + chunk_size, n)
        # Extend to the end of the image group the cut fell into (nulls are no group).
        while end < n and image_paths[end] is not None and image_paths[end] == image_paths[end - 1]:
            end += 1
        parts.append((start, end))
        start = end
    return parts


def sample_bank(captions: list[str], size: int, seed: int) -> list[str]:
    """The distinct non-blank captions, sampled to ``size`` with a fixed seed (in sample order)."""
    distinct = sorted({c.strip() for c in captions if c and c.strip()})
    if not distinct:
        raise TbpsError("the reference bank has no non-empty captions", field="--bank")
    if len(distinct) <= size:
        return distinct
    pick = np.random.default_rng(seed).choice(len(distinct), size=size, replace=False)
    return [distinct[i] for i in pick]


def frame_hash(frame: pl.DataFrame) -> str:
    """A content hash of a table (row hashes in order, with the column names)."""
    rows = frame.hash_rows(seed=0).to_numpy().tobytes() if frame.height else b""
    return content_hash(json.dumps(frame.columns).encode() + rows)


# --------------------------------------------------------------------------------------------
# The run: reading, parts, resume, distribution.


def run_params(config: ScoreConfig, loaded: Encoder, pairs: pl.DataFrame, bank_frame: pl.DataFrame, parts: int, dtype,
               image_root: str | None, *, itm: bool, image_vectors: int) -> dict:
    """What makes a score directory's table (``params.json``): a resumed run must match it exactly."""
    return {
        "data": str(Path(config.data).resolve()),
        "data_hash": frame_hash(pairs),
        "rows": pairs.height,
        "model": loaded.identity,
        "bank": str(Path(config.bank).resolve()),
        "bank_hash": frame_hash(bank_frame),
        "bank_size": bank_frame.height,
        "bank_split": config.bank_split,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
        "parts": parts,
        "precision": "bf16" if dtype is not None else "fp32",
        "embed_dim": loaded.embed_dim,
        "text_batch": TEXT_BATCH,  # caption embeddings depend (in the last bits) on how they were batched
        "reader": config.reader_options(),
        "image_root": image_root,  # resolved: where manifest paths must lie (tbps train)
        "split": config.splits(),
        "itm": itm,  # the table has itm_score
        "image_vectors": image_vectors,
    }


def _check_params(out: ScoreDir, params: dict) -> None:
    """Write params.json, or refuse when the directory holds a run with other parameters."""
    path = out.params
    if path.exists():
        old = json.loads(path.read_text())
        if "split" not in old:
            # Its parts lack the split column: new parts beside them would make one table of two schemas.
            raise TbpsError(
                "the output directory holds a score run of an earlier tbps, whose table has no split column; it cannot be resumed or extended",
                path=out.root,
                hint="its table stays readable by tbps select and inspect; score into a new --out (or delete this one) for a table with splits",
            )
        changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in changed)
            raise TbpsError(
                "the output directory holds a score run with other parameters",
                path=out.root,
                hint=f"changed: {diffs}. Use a new --out, or delete the directory to start over",
            )
        return
    write_json(path, params)


def _bank_embeddings(out: ScoreDir, loaded: Encoder, bank: list[str], device, precision: str, rank: int, world: int) -> torch.Tensor:
    """The bank's caption embeddings, embedded once per output directory and then read from it.

    Rank 0 embeds the bank and writes it atomically; the other torchrun ranks wait and read it,
    and a resumed run reads it instead of embedding 10,000 captions again (params.json has
    already checked that model, bank and precision are the same). ``--shard`` processes started
    together each embed it once and write the same values; the last rename wins.
    """
    path = out.bank_embeddings
    emb = None
    if rank == 0 and not path.exists():
        emb = encode_texts(loaded, bank, device=device, precision=precision)
        with atomic_write(path) as fh:
            np.save(fh, emb)
    barrier(world)
    if emb is not None:  # embedded here: the file holds the same values
        return torch.from_numpy(emb)
    redo = "delete the file to embed the bank again"
    try:
        emb = np.load(path)
    except (OSError, ValueError) as exc:
        raise TbpsError(f"the stored bank embeddings cannot be read ({exc})", path=path, hint=redo) from None
    if emb.shape != (len(bank), loaded.embed_dim) or emb.dtype != np.float32:
        raise TbpsError(
            f"the stored bank embeddings have shape {emb.shape} ({emb.dtype}), not ({len(bank)}, {loaded.embed_dim}) float32",
            path=path,
            hint=redo,
        )
    return torch.from_numpy(emb)


def _write_parquet(table: pa.Table, path: Path, metadata: dict[str, str]) -> None:
    """Write one part atomically (see :func:`tbps.files.atomic_write`)."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    with atomic_write(path) as fh:
        pq.write_table(table, fh, compression="zstd")


NOT_OK_WARNING = 0.05  # a larger share of rows that are not ok is warned about


def check_images_exist(pairs: pl.DataFrame, data: Path) -> None:
    """Refuse, before any work, a dataset none of whose sampled image files exists (a wrong image root).

    Args:
        pairs: the pair table as read.
        data: the dataset's path (where to look for the files, for the hint).

    Raises:
        TbpsError: no sampled image exists; the hint names the directory where a file of the
            same name was found, when one is.
    """
    sample = sample_images(pairs, data)
    if not sample.checked or sample.found:
        return
    example = Path(sample.missing_example)
    hint = "check --image-root (or the paths in the dataset)"
    if sample.found_elsewhere is not None:
        hint = f"a file named {example.name} is in {sample.found_elsewhere}: point --image-root at the folder the dataset's paths start from"
    raise TbpsError(f"none of {sample.checked} sampled image files exists (e.g. {example})", path=data, field="--image-root", hint=hint)


def _part_is_done(out: ScoreDir, k: int, span: tuple[int, int], metadata: dict[str, str], log: Callable[[str], None]) -> bool:
    """Whether part ``k`` exists whole: both files readable, the planned rows, this run's model and bank.

    A part that fails a check (truncated by a full disk, copied from another run) is removed
    and scored again, and the log says why.
    """
    paths = (out.score_part(k), out.embedding_part(k))
    if not paths[0].exists():
        return False
    problem = None
    try:
        scores, embeddings = (pq.read_metadata(p) for p in paths)
    except (OSError, pa.ArrowException) as exc:
        problem = f"unreadable ({exc})"
    else:
        found = {key.decode(): value.decode() for key, value in (scores.metadata or {}).items()}
        if scores.num_rows != span[1] - span[0]:
            problem = f"{scores.num_rows} rows, the plan has {span[1] - span[0]}"
        elif any(found.get(key) != value for key, value in metadata.items()):
            problem = "written by another model or bank than params.json names"
        elif embeddings.num_rows > scores.num_rows:
            problem = "its embeddings have more rows than its scores"
    if problem is None:
        return True
    log(f"part {k} is not whole ({problem}): scoring it again")
    for path in paths:
        path.unlink(missing_ok=True)
    return False


def _part_tables(
    rows: pl.DataFrame,
    image_emb: np.ndarray | torch.Tensor,
    image_status: list[str],
    image_error: list[str | None],
    image_hash: list[str | None],
    image_of_row: np.ndarray,
    text_emb: np.ndarray | torch.Tensor,
    caption_of_row: np.ndarray,
    truncated: np.ndarray,
    bank_t: torch.Tensor,
    image_vectors: int = 1,
    itm: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The score table and embeddings of one part (no I/O).

    ``image_of_row`` / ``caption_of_row`` index each row's distinct image / caption (-1: none);
    ``image_vectors``: embeddings per image (BLIP-2); ``itm``: each row's ITM probability, or None
    when the model has no matching head (the table then has no ``itm_score`` column).
    ``image_emb`` and ``text_emb`` are numpy arrays or tensors; with tensors on a GPU, the scores
    and bank ranks are computed there (``bank_t`` is moved to their device) and only the results
    come back.
    """
    n = rows.height
    status = rows[C.STATUS].to_list()
    error = rows[C.ERROR].to_list()
    hashes: list[str | None] = [None] * n
    for r in range(n):
        i = image_of_row[r]
        if i < 0:
            continue
        hashes[r] = image_hash[i]
        # A row the reader accepted takes its image's outcome.
        if status[r] == C.STATUS_OK and image_status[i] != C.STATUS_OK:
            status[r], error[r] = image_status[i], image_error[i]
    ok = np.array([s == C.STATUS_OK for s in status], dtype=bool)
    ok_rows = np.flatnonzero(ok)
    score = np.full(n, np.nan, dtype=np.float32)
    rank = np.zeros(n, dtype=np.int32)
    trunc = np.zeros(n, dtype=bool)
    image_emb, text_emb = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    where = image_emb.device
    img = image_emb[torch.from_numpy(image_of_row[ok_rows]).to(where)]
    txt = text_emb[torch.from_numpy(caption_of_row[ok_rows]).to(where)]
    own = pair_similarity(img, txt, image_vectors)
    ranks = bank_rank(img, own, bank_t.to(where), image_vectors=image_vectors)
    # One copy back per part (on a GPU, the only synchronisation of the part).
    score[ok_rows], rank[ok_rows] = own.cpu().numpy(), ranks.cpu().numpy()
    img_rows, txt_rows = img.cpu().numpy(), txt.cpu().numpy()
    trunc[ok_rows] = truncated[caption_of_row[ok_rows]]
    bank_size = bank_t.shape[0]
    itm_column = {} if itm is None else {C.ITM_SCORE: pa.array(np.where(ok, itm, np.nan), pa.float32(), mask=~ok | np.isnan(itm))}
    scores = pa.table(
        {
            C.PAIR_ID: rows[C.PAIR_ID].to_arrow(),
            C.IMAGE_PATH: rows[C.IMAGE_PATH].to_arrow(),
            C.CAPTION: rows[C.CAPTION].to_arrow(),
            C.PERSON_ID: rows[C.PERSON_ID].to_arrow(),
            C.SPLIT: rows[C.SPLIT].to_arrow(),
            C.SOURCE: rows[C.SOURCE].to_arrow(),
            C.IMAGE_HASH: pa.array(hashes, pa.string()),
            C.SCORE: pa.array(score, pa.float32(), mask=~ok),
            C.BANK_RANK: pa.array(rank, pa.int32(), mask=~ok),
            C.BANK_PERCENTILE: pa.array(rank.astype(np.float32) * (100.0 / bank_size), pa.float32(), mask=~ok),
            C.TRUNCATED: pa.array(trunc, pa.bool_()),
            **itm_column,
            C.STATUS: pa.array(status, pa.string()),
            C.ERROR: pa.array(error, pa.string()),
        },
        schema=C.score_schema(itm is not None),
    )
    dim, image_dim = txt_rows.shape[1], img_rows.shape[1]

    def as_list(a: np.ndarray, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float16).ravel(), pa.float16()), width).cast(pa.list_(pa.float16(), width))

    emb = pa.table(
        {
            C.PAIR_ID: rows[C.PAIR_ID].to_arrow().take(pa.array(ok_rows)),
            C.IMAGE_EMB: as_list(img_rows, image_dim),
            C.TEXT_EMB: as_list(txt_rows, dim),
        },
        schema=C.embedding_schema(dim, image_dim),
    )
    return scores, emb


@dataclass
class _Part:
    k: int
    rows: pl.DataFrame
    images: list[str]  # distinct image paths of ok rows, in order
    image_of_row: np.ndarray
    captions: list[str]  # distinct captions of ok rows, sorted
    caption_of_row: np.ndarray
    itm: np.ndarray | None = None  # each row's ITM match probability (NaN: not scored), when the model has a head

    @property
    def work(self) -> int:
        """Images and captions to embed: the units its progress is credited in."""
        return len(self.images) + len(self.captions)


def _prepare_part(k: int, rows: pl.DataFrame) -> _Part:
    paths = rows[C.IMAGE_PATH].to_list()
    ok = rows[C.STATUS].to_list()
    images: list[str] = []
    index: dict[str, int] = {}
    image_of_row = np.full(len(paths), -1, dtype=np.int64)
    for r, (p, s) in enumerate(zip(paths, ok)):
        if p is None or s != C.STATUS_OK:
            continue
        if p not in index:
            index[p] = len(images)
            images.append(p)
        image_of_row[r] = index[p]
    # Captions are embedded once per distinct caption of the part's usable rows.
    usable = [c if s == C.STATUS_OK else None for c, s in zip(rows[C.CAPTION].to_list(), ok)]
    distinct = sorted({c for c in usable if c is not None})
    where = {c: i for i, c in enumerate(distinct)}
    caption_of_row = np.array([where.get(c, -1) if c is not None else -1 for c in usable], dtype=np.int64)
    return _Part(k, rows, images, image_of_row, distinct, caption_of_row)


class _PairProgress:
    """``progress(done_pairs, total_pairs)`` per batch: a part's pairs are credited evenly over its
    images and captions as they are embedded, and in full once the part is written.

    A part may still be being written while the next one is embedded (:func:`_pipeline`); each
    part in work keeps its own credit. Called from the main thread only.
    """

    def __init__(self, parts: list[_Part], progress: Callable[[int, int], None] | None) -> None:
        self.progress = progress
        self.total = sum(p.rows.height for p in parts)
        self.written = 0  # pairs of the parts written
        self.credit: dict[int, float] = {}  # part -> pairs credited to it, while it is in work

    def embedded(self, part: _Part, units: int) -> None:
        """``units`` images or captions of ``part`` were embedded."""
        self.credit[part.k] = min(part.rows.height, self.credit.get(part.k, 0.0) + part.rows.height * units / max(1, part.work))
        self._report(self.written + int(sum(self.credit.values())))

    def done(self, part: _Part) -> None:
        """``part`` was written."""
        self.written += part.rows.height
        self.credit.pop(part.k, None)
        self._report(self.written + int(sum(self.credit.values())))

    def _report(self, done: int) -> None:
        if self.progress:
            self.progress(done, self.total)


def _batch_itm(part: _Part, first: int, ok: np.ndarray, pixels: torch.Tensor | None, loaded: Encoder, config: ScoreConfig, device, dtype,
               state=None) -> None:
    """The ITM probability of every usable row whose image is in this batch (images ``first ..`` of the part).

    The batch's decoded images are at hand (``state`` from the embedding pass, else ``pixels``),
    so each image's side of the matching head is computed once for all of its captions.
    """
    if part.itm is None:
        part.itm = np.full(part.rows.height, np.nan, dtype=np.float32)
    local = part.image_of_row - first
    rows = np.flatnonzero((part.image_of_row >= 0) & (local >= 0) & (local < len(ok)))
    rows = rows[ok[local[rows]]]
    if not len(rows):
        return
    compact = np.cumsum(ok) - 1  # the batch's decoded pixels hold only its ok images
    captions = [part.captions[c] for c in part.caption_of_row[rows]]
    part.itm[rows] = pair_scores(loaded, pixels, captions, compact[local[rows]], device=device, dtype=dtype, batch_size=config.batch_size,
                                 image_state=state)


def _iter_part_images(
    parts: list[_Part], loaded: Encoder, config: ScoreConfig, device, dtype, on_batch: Callable[[_Part, int], None] | None = None,
    itm: bool = False,
) -> Iterator[tuple[_Part, torch.Tensor, list, list, list]]:
    """Yield each part with its image embeddings, from one DataLoader over all parts' images.

    The embeddings stay on ``device`` (a tensor; zero rows for images that did not decode): no
    batch waits for the GPU to finish the one before it. ``on_batch(part, images)`` is called
    after each batch is queued (a batch never crosses parts). With ``itm``, each part's rows also
    get their ITM match probability (``part.itm``).
    """
    flat = [p for part in parts for p in part.images]
    # Batches never cross parts: a part's floats must not depend on which parts run beside it.
    batches = iter_image_batches(
        loaded, flat, batch_size=config.batch_size, workers=config.workers, max_pixels=config.max_pixels,
        groups=[len(part.images) for part in parts], pin_memory=device.type == "cuda", overlap=device.type != "cpu",
    )
    pending = iter(parts)
    width = loaded.embed_dim * loaded.image_vectors
    buf_emb: list[torch.Tensor] = []
    buf_meta: tuple[list, list, list] = ([], [], [])
    have = 0

    def flush_ready():
        nonlocal have, buf_emb, buf_meta
        while current[0] is not None and have >= len(current[0].images):
            need = len(current[0].images)
            emb = torch.cat(buf_emb) if buf_emb else torch.zeros((0, width), dtype=torch.float32, device=device)
            yield current[0], emb[:need], buf_meta[0][:need], buf_meta[1][:need], buf_meta[2][:need]
            buf_emb = [emb[need:]]
            buf_meta = tuple(m[need:] for m in buf_meta)
            have -= need
            current[0] = next(pending, None)

    current = [next(pending, None)]
    yield from flush_ready()
    for batch in batches:
        ok = batch.ok.numpy()
        ok_emb = state = decoded = None
        if itm and ok.any():
            # One pass of the image tower for the cosine and the matching head, where the family allows it.
            decoded = batch.decoded_pixels()
            ok_emb, state = embed_image_batch_with_state(loaded, decoded, device=device, dtype=dtype)
        if ok.all():
            emb = ok_emb if ok_emb is not None else embed_image_batch(loaded, batch.pixels, device=device, dtype=dtype)
        else:
            emb = torch.zeros((len(batch.status), width), dtype=torch.float32, device=device)
            if ok.any():
                if ok_emb is None:
                    ok_emb = embed_image_batch(loaded, batch.decoded_pixels(), device=device, dtype=dtype)
                # Indices, not a bool mask: a mask on a GPU would make the copy wait for the GPU.
                rows = torch.from_numpy(np.flatnonzero(ok)).to(device, non_blocking=True)
                emb.index_copy_(0, rows, ok_emb)
        if itm and ok.any():
            _batch_itm(current[0], have, ok, decoded, loaded, config, device, dtype, state=state)
        buf_emb.append(emb)
        for m, v in zip(buf_meta, (batch.status, batch.error, batch.image_hash)):
            m.extend(v)
        have += len(batch.status)
        if on_batch:
            on_batch(current[0], len(batch.status))  # the first part not yet complete: batches never cross parts
        yield from flush_ready()


# Tokenising part k+1's captions and writing part k's tables happen in background threads while
# the main thread embeds, where the model runs on a GPU: the forward passes then follow each other
# without the CPU work between them. Where the model runs on the CPU, the threads would compete
# with its intra-op threads for the same cores; there the stages run in the main thread, in the
# same order (the tables are bit for bit the same either way; see tests/test_score_pipeline.py).
# None: decided by the device; True / False force it (benchmarks and tests).
BACKGROUND: bool | None = None


class _Inline:
    """An executor that runs each task at once, in the calling thread (the same interface)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the result, as a thread pool does
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def _executor(background: bool) -> ThreadPoolExecutor | _Inline:
    return ThreadPoolExecutor(max_workers=1) if background else _Inline()


def _write_part(part: _Part, out: ScoreDir, metadata: dict[str, str], tables: Callable[[], tuple[pa.Table, pa.Table]]) -> _Part:
    """Build a part's tables and write them: embeddings first, so a score part on disk means its embeddings are there too."""
    scores, emb = tables()
    _write_parquet(emb, out.embedding_part(part.k), metadata)
    _write_parquet(scores, out.score_part(part.k), metadata)
    return part


def run_score(config: ScoreConfig, progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None) -> ScoreSummary:
    """Score every pair of ``config.data`` into ``config.out`` (see the module docstring).

    Args:
        config: the run's parameters.
        progress: called as ``progress(done_pairs, total_pairs)`` after each batch of images or
            captions embedded and after each part written (see :class:`_PairProgress`).
        log: called with one-line messages (resume, skipped parts, finalisation).

    Returns:
        A :class:`ScoreSummary`; ``complete`` when every part of the table exists.
    """
    if config.embeddings is not None:  # stored embeddings: tbps.curate.embeddings (which imports this module) scores them
        raise UsageError("run_score embeds images; score --embeddings with tbps.curate.embeddings.score_from_embeddings", field="--embeddings")
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    place = distributed(config.device)
    rank, world, device = place.rank, place.world, place.device
    if world > 1 and config.shard is not None:
        raise UsageError("--shard cannot be combined with torchrun: torchrun already shards by rank", field="--shard")
    shard_index, shard_count = (rank, world) if world > 1 else (getattr(config, "shard_index", 0), getattr(config, "shard_count", 1))
    out = ScoreDir(Path(config.out))

    dataset = read(ReadConfig(data=Path(config.data), **config.reader_options()))
    pairs = dataset.pairs
    if pairs.height == 0:
        raise TbpsError("the dataset has no pairs", path=config.data)
    check_unique_ids(pairs, config.data)
    pairs, other_splits = keep_splits(pairs, config.splits(), config.data)
    if other_splits and rank == 0:
        shown = ", ".join(f"{name} {n:,}" for name, n in other_splits.items())
        log(f"scoring split {','.join(config.splits())}: {pairs.height:,} of {dataset.pairs.height:,} rows (not scored: {shown})")
    check_images_exist(pairs, Path(config.data))
    pairs = order_pairs(pairs)
    parts_plan = plan_parts(pairs[C.IMAGE_PATH].to_list(), config.chunk_size)

    dtype = autocast_dtype(config.precision, device)
    loaded = load(config.model, seed=config.seed)
    place_model(loaded, device)
    itm = loaded.has_pair_score and config.itm
    bank = sample_bank(read_captions(config.bank, split=None if config.bank_split == "all" else config.bank_split), config.bank_size, config.seed)
    if rank == 0:
        log(f"bank: {len(bank):,} captions from {config.bank}" + (f" ({config.bank_split} split)" if config.bank_split != "all" else ""))
        if len(bank) < config.bank_size:
            log(f"warning: the bank holds {len(bank):,} distinct captions, fewer than --bank-size {config.bank_size:,}; bank ranks count "
                f"against {len(bank):,} captions, and tbps select scales the paper's rules to that size")
    bank_frame = pl.DataFrame({"bank_index": np.arange(len(bank), dtype=np.int32), C.CAPTION: bank})

    params = run_params(config, loaded, pairs, bank_frame, len(parts_plan), dtype, dataset.image_root, itm=itm, image_vectors=loaded.image_vectors)
    if rank == 0:
        for directory in (out.root, out.scores, out.embeddings):
            directory.mkdir(parents=True, exist_ok=True)
            sweep_temps(directory)  # temps of killed runs; a live concurrent run's are left alone
        _check_params(out, params)
        if not out.bank.exists():
            with atomic_write(out.bank) as fh:
                bank_frame.write_parquet(fh)
    barrier(world)
    if rank != 0:
        _check_params(out, params)

    metadata = {"tbps.model": json.dumps(loaded.identity, sort_keys=True), "tbps.bank_size": str(len(bank))}
    mine = [k for k in range(len(parts_plan)) if k % shard_count == shard_index]
    todo = [k for k in mine if not _part_is_done(out, k, parts_plan[k], metadata, log)]
    skipped = len(mine) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(mine)} parts already written, {len(todo)} to score")

    bank_emb = _bank_embeddings(out, loaded, bank, device, config.precision, rank, world)
    parts = [_prepare_part(k, pairs.slice(s, e - s)) for k in todo for s, e in [parts_plan[k]]]
    bar = _PairProgress(parts, progress)
    t_work = time.perf_counter()
    background = BACKGROUND if BACKGROUND is not None else device.type != "cpu"
    bank_emb = bank_emb.to(device)  # the bank rank runs where the embeddings are
    tokenizer, writer = _executor(background), _executor(background)
    try:
        # Part k+1's captions are tokenised while part k is embedded; one part's tables are written while the next is embedded.
        tokens = {p.k: tokenizer.submit(tokenize_captions, loaded, p.captions) for p in parts[:1]}
        writing: Future | None = None
        ahead = iter(parts[1:])
        for part, img_emb, img_status, img_error, img_hash in _iter_part_images(parts, loaded, config, device, dtype, on_batch=bar.embedded, itm=itm):
            following = next(ahead, None)
            if following is not None:
                tokens[following.k] = tokenizer.submit(tokenize_captions, loaded, following.captions)
            tokenized: Tokenized = tokens.pop(part.k).result()
            txt = encode_tokens(loaded, tokenized.tokens, device=device, dtype=dtype, on_batch=lambda n, part=part: bar.embedded(part, n))
            itm_rows = (part.itm if part.itm is not None else np.full(part.rows.height, np.nan, np.float32)) if itm else None
            tables = partial(_part_tables, part.rows, img_emb, img_status, img_error, img_hash, part.image_of_row, txt, part.caption_of_row,
                             tokenized.truncated, bank_emb, loaded.image_vectors, itm_rows)
            if writing is not None:
                bar.done(writing.result())  # at most one part waits to be written: memory stays bounded
            writing = writer.submit(_write_part, part, out, metadata, tables)
            if writing.done():  # written in this thread (or already): the progress says so now
                bar.done(writing.result())
                writing = None
        if writing is not None:
            bar.done(writing.result())
    finally:
        # A failure (or a kill of the run's workers) lets the part being written finish: it is whole or absent.
        tokenizer.shutdown(wait=True)
        writer.shutdown(wait=True)
    done = bar.written
    elapsed = time.perf_counter() - t_work

    barrier(world)
    summary = ScoreSummary(
        out=out.root,
        rows=pairs.height,
        parts_total=len(parts_plan),
        parts_done_here=len(todo),
        parts_skipped=skipped,
        seconds=time.perf_counter() - t0,
        pairs_per_second=done / elapsed if elapsed > 0 and done else 0.0,
        bank_size=len(bank),
        splits=config.splits(),
        rows_other_splits=sum(other_splits.values()),
    )
    present = [k for k in range(len(parts_plan)) if out.score_part(k).exists()]
    summary.complete = len(present) == len(parts_plan)
    if summary.complete:
        counts = pl.scan_parquet(list_parts(out.scores)).group_by(C.STATUS).len().collect()
        summary.status_counts = dict(sorted(zip(counts[C.STATUS].to_list(), counts["len"].to_list())))
        bad = pairs.height - summary.status_counts.get(C.STATUS_OK, 0)
        if rank == 0 and bad > NOT_OK_WARNING * pairs.height:
            example = pl.scan_parquet(list_parts(out.scores)).filter(pl.col(C.STATUS) != C.STATUS_OK).select(C.ERROR).head(1).collect().item()
            shown = ", ".join(f"{k} {v:,}" for k, v in summary.status_counts.items() if k != C.STATUS_OK)
            log(f"warning: {bad:,} of {pairs.height:,} rows ({100 * bad / pairs.height:.1f}%) are not ok ({shown}); e.g. {example}")
        if rank == 0:
            _finalise(out, config, params, summary)
            log(f"finalised {out.record}")
        if not summary.status_counts.get(C.STATUS_OK):
            # Every row is accounted for in the table, but nothing can be selected from it.
            example = pl.scan_parquet(list_parts(out.scores)).select(C.ERROR).head(1).collect().item()
            raise TbpsError(f"no row scored ok: every one of the {pairs.height:,} rows failed (e.g. {example})", path=out.root,
                            hint="the statuses are in the score table; check --image-root and the images")
    if place.owns_group:
        torch.distributed.destroy_process_group()
    return summary


def _finalise(out: ScoreDir, config: ScoreConfig, params: dict, summary: ScoreSummary) -> None:
    rows = sum(summary.status_counts.values())
    if rows != params["rows"]:
        raise TbpsError(f"the score table has {rows} rows for {params['rows']} input pairs", path=out.root)
    write_json(
        out.record,
        record(
            config,
            params=params,
            rows=rows,
            status_counts=summary.status_counts,
            last_process={"seconds": summary.seconds, "pairs_per_second": summary.pairs_per_second, "parts_scored": summary.parts_done_here},
            schema=str(C.SCORE_SCHEMA),
        ),
    )


def read_score_table(path: str | Path) -> pl.LazyFrame:
    """The score table of a score run directory, a parts directory or a single file, lazily.

    A table written before the score table carried ``split`` gets a null ``split`` column (after
    ``person_id``, as in ``columns.SCORE_SCHEMA``).
    """
    path = Path(path)
    if ScoreDir(path).scores.is_dir():
        path = ScoreDir(path).scores
    if path.is_dir():
        table = pl.scan_parquet(list_parts(path))
    elif path.is_file():
        table = pl.scan_parquet(path)
    else:
        raise TbpsError("no score table here", path=path)
    names = table.collect_schema().names()
    if C.SPLIT in names:
        return table
    at = names.index(C.PERSON_ID) + 1 if C.PERSON_ID in names else len(names)
    return table.with_columns(pl.lit(None, dtype=pl.String).alias(C.SPLIT)).select([*names[:at], C.SPLIT, *names[at:]])
