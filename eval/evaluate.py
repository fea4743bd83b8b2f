"""``tbps eval``: text-to-image retrieval on a test split, under the standard TBPS protocol.

The gallery is every distinct (decodable) test image once, the queries are every test caption,
and a gallery image matches a query when both belong to the same person id. Metrics come from
:func:`tbps.eval.metrics.retrieval_metrics_from_embeddings` (R@1/5/10, mAP, mINP in percent;
ties ranked by gallery position, i.e. the order in which images first appear in the table).

Rows are accounted for, never silently lost:

* rows outside the split are not part of the evaluation (``rows_other_splits``);
* rows whose reader status is not ``ok`` are left out and counted by status (``rows_skipped``);
* rows without a person id are left out and counted; a split with no person id at all is an
  error (eval needs identities; ``tbps search`` does not);
* images that fail to decode leave the gallery (counted in ``images_failed``); their captions
  stay queries, so the protocol's query count is kept;
* queries whose person has no image left in the gallery are skipped by the metrics and
  counted (``queries_without_match``).

With ``rerank=K`` (``tbps eval --rerank K``) the model's image-text matching head re-ranks each
query's top K gallery images by ITC similarity, as APTM's and the paper's released evaluation
do: the K images are ordered by the head's match probability of (caption, image), the images
below K keep their ITC order, and the metrics of both rankings are reported (``metrics``: ITC;
``reranked.metrics``: ITC + ITM). A model without a head is refused before any work. Cost:
queries with the same caption share one top K, so the head runs on ``distinct captions x K``
pairs, in batches of ``batch_size`` pairs grouped by image; the images that appear in some top
K are decoded a second time, each once, in gallery order (memory: one batch of images, never
the whole gallery's pixels), and each batch of pairs runs the image tower only on its few
distinct images.

When the model is a tbps run (a run directory, an adapter export, or a merged checkpoint whose
run is still there), the training data its run recorded is compared with the evaluated split
(:mod:`tbps.eval.leakage`): shared images or persons are a warning (``warnings`` in the record,
printed on stderr), what could not be checked a note (logged), and both are stored under
``training_overlap``.

``tbps eval --html FILE`` also writes a self-contained page (:func:`render_eval_html`): the R@K
curve for K = 1..gallery (:func:`recall_curve`, from each query's first-correct rank), the histogram
of those ranks in power-of-two bins and the queries ranked worst; the JSON record names the page
(``html``) and keeps only the aggregate metrics.

The JSON record of a run holds the metrics, the model identity, a content hash of the
evaluated data (captions, person ids and the image files' bytes), the counts and the config;
``tbps eval --compare`` reads several (:func:`load_records`) and prints them side by side
(:func:`tbps.terminal.metrics_table`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.data.options import ReaderOptions
from tbps.data.readers import read_dataset
from tbps.data.splits import select_split
from tbps.errors import TbpsError, UsageError
from tbps.eval.leakage import training_overlap
from tbps.eval.metrics import (
    METRIC_KEYS,
    rerank_order,
    reranked_metrics_from_embeddings,
    retrieval_metrics_from_embeddings,
    top_k_from_embeddings,
)
from tbps.files import hasher, write_json
from tbps.models import load
from tbps.models.device import autocast_dtype, check_precision, resolve_device
from tbps.models.encode import encode_images, encode_texts, iter_image_batches, pair_scores, place
from tbps.provenance import record
from tbps.report.html import grid_table, page, power_of_two_bins, svg_histogram, svg_line_chart, write_html


@dataclass(kw_only=True)
class EvalConfig(ReaderOptions):
    """Parameters of ``tbps eval``; field names equal the CLI option names.

    Attributes:
        data: the test dataset (any format the readers support, with person ids).
        model: a model spec (see ``tbps.models.load``): run directory, exported checkpoint,
            ``NAME:TAG`` or ``NAME:/path.pt``, or ``tbps-tiny``.
        split: the split to evaluate; ``None`` means ``test`` when the data has splits, and
            every row when it has none.
        out: the JSON record to write; ``None``: ``eval-<model>-<data>-<split>.json`` in the
            current directory (see :func:`default_out`).
        format, image_root, image_col, caption_col, id_col: the reader options
            (``tbps.data.options.ReaderOptions``).
        batch_size: images / captions per forward pass.
        workers: DataLoader worker processes decoding images.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        precision: ``fp32`` (default: reproducible metrics), ``bf16`` or ``auto``.
        chunk_size: query rows per block of the similarity; ``None`` = automatic.
        seed: the seed of random weights (a bare config name such as ``tbps-tiny``).
        rerank: re-rank each query's ITC top ``rerank`` images by the model's ITM match
            probability and report both rankings' metrics; ``None``: ITC only. The model needs
            an image-text matching head.
        html: also write a self-contained HTML page (:func:`render_eval_html`): the R@K curve
            for K = 1..gallery size and the histogram of each query's first-correct rank.
    """

    data: Path
    model: str
    split: str | None = None
    out: Path | None = None
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    chunk_size: int | None = None
    seed: int = 0
    rerank: int | None = None
    html: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = Path(self.data)
        if self.out is not None:
            self.out = Path(self.out)
        if self.html is not None:
            self.html = Path(self.html)
            if self.html.is_dir():
                raise TbpsError("--html names a directory; give the page's file name", path=self.html, field="--html")
        if not str(self.model).strip():
            raise UsageError("--model must name a model", field="model", value=self.model)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1", field="batch_size", value=self.batch_size)
        if self.workers < 0:
            raise UsageError("--workers must be >= 0", field="workers", value=self.workers)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UsageError("--chunk-size must be >= 1", field="chunk_size", value=self.chunk_size)
        if self.rerank is not None and self.rerank < 1:
            raise UsageError("--rerank K re-ranks each query's top K images: K must be >= 1", field="rerank", value=self.rerank)
        check_precision(self.precision)


@dataclass
class EvalProtocol:
    """Queries and gallery of one evaluation, as built from a pair table (no model involved).

    Attributes:
        queries: the query rows (``pair_id``, ``caption``, ``person_id``), table order.
        gallery_paths: distinct image paths, in order of first appearance.
        gallery_pids: the person id of each gallery image.
        counts: how every input row was accounted for.
    """

    queries: pl.DataFrame
    gallery_paths: list[str]
    gallery_pids: list[str]
    counts: dict[str, Any] = field(default_factory=dict)


def build_protocol(pairs: pl.DataFrame) -> EvalProtocol:
    """Queries (every usable caption) and gallery (every distinct image once) of a split.

    Args:
        pairs: the rows of the evaluated split (``PAIR_SCHEMA``).

    Returns:
        The :class:`EvalProtocol`.

    Raises:
        TbpsError: no rows, no person ids at all, or an image listed under two person ids.
    """
    if pairs.height == 0:
        raise TbpsError("the data has no rows to evaluate")
    if pairs.get_column(C.PERSON_ID).null_count() == pairs.height:
        raise TbpsError(
            "eval needs person ids, and this data has none",
            field=C.PERSON_ID,
            hint="a match is an image of the same person: give the id column with --id-col "
            "(or --id-col folder for an image folder); tbps search needs no ids",
        )
    status_counts = dict(pairs.filter(pl.col(C.STATUS) != C.STATUS_OK).group_by(C.STATUS).len().iter_rows())
    usable = pairs.filter((pl.col(C.STATUS) == C.STATUS_OK) & pl.col(C.IMAGE_PATH).is_not_null())
    without_pid = usable.filter(pl.col(C.PERSON_ID).is_null()).height
    usable = usable.filter(pl.col(C.PERSON_ID).is_not_null())
    if usable.height == 0:
        raise TbpsError("no usable row with an image and a person id", value=status_counts)
    images = usable.select(C.IMAGE_PATH, C.PERSON_ID).unique(maintain_order=True)
    clash = images.filter(pl.col(C.IMAGE_PATH).is_duplicated())
    if clash.height:
        first = clash.get_column(C.IMAGE_PATH)[0]
        ids = clash.filter(pl.col(C.IMAGE_PATH) == first).get_column(C.PERSON_ID).to_list()
        raise TbpsError("one image is listed under several person ids", path=first, field=C.PERSON_ID, value=ids)
    counts = {
        "rows": pairs.height,
        "rows_skipped": status_counts,
        "rows_without_person_id": without_pid,
        "queries_total": usable.height,
        "images_total": images.height,
        "person_ids": usable.get_column(C.PERSON_ID).n_unique(),
    }
    return EvalProtocol(
        queries=usable.select(C.PAIR_ID, C.CAPTION, C.PERSON_ID),
        gallery_paths=images.get_column(C.IMAGE_PATH).to_list(),
        gallery_pids=images.get_column(C.PERSON_ID).to_list(),
        counts=counts,
    )


def check_rerank(loaded: Any, rerank: int | None, spec: str | None = None) -> None:
    """Refuse ``--rerank`` for a model without an image-text matching head (before any work).

    Raises:
        UsageError: ``rerank`` below 1.
        TbpsError: the model has no matching head.
    """
    if rerank is None:
        return
    if rerank < 1:
        raise UsageError("--rerank K re-ranks each query's top K images: K must be >= 1", field="rerank", value=rerank)
    if not loaded.has_pair_score:
        raise TbpsError(
            f"--rerank {rerank}: the {loaded.family} model {loaded.name} has no image-text matching head to re-rank with",
            field="--rerank",
            value=spec or loaded.identity.get("spec"),
            hint="use a model with one (hf: BLIP / BLIP-2, or a run trained with tbps train --itm-head), or drop --rerank",
        )


def evaluate(
    loaded: Any,
    pairs: pl.DataFrame,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    precision: str = "fp32",
    chunk_size: int | None = None,
    per_query: bool = False,
    rerank: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Text-to-image retrieval of a model on the rows of one split.

    The queries are the usable rows of ``pairs`` (status ``ok``, an image path and a person id:
    :func:`build_protocol`), one query per row, in table order; a caption repeated on several
    rows is several queries.

    Args:
        loaded: the model (:class:`tbps.models.protocol.Encoder`).
        pairs: the rows to evaluate (one split of a pair table, ``PAIR_SCHEMA``).
        batch_size: images / captions (and, re-ranking, pairs) per forward pass.
        workers: DataLoader worker processes decoding images.
        device: ``auto``, ``cpu`` or a CUDA device.
        precision: ``fp32``, ``bf16`` or ``auto`` (autocast of the forward passes).
        chunk_size: query rows per block of the similarity; ``None`` = automatic.
        per_query: also return each query's outcome (``per_query`` below).
        rerank: re-rank each query's ITC top ``rerank`` images by the model's ITM match
            probability (the model needs a matching head: ``loaded.has_pair_score``).
        log: receives one line per stage (for stderr), or ``None``.
        progress: called as ``progress(done, total)`` after each batch of gallery images, of
            distinct captions and (re-ranking) of pairs scored (``total`` = gallery images +
            distinct captions + distinct captions x K).

    Returns:
        ``{"metrics": {R1, R5, R10, mAP, mINP, queries, queries_without_match, gallery},
        "counts": {...}, "data_hash": str, "seconds": {...}}``; ``metrics`` is the ITC ranking.
        With ``rerank``, also ``"reranked": {"k", "metrics" (same keys, the re-ranked ranking),
        "pairs_scored", "images_decoded"}`` and ``seconds["rerank"]``. With ``per_query=True``
        also ``"per_query"``: the arrays of :func:`tbps.eval.metrics.retrieval_metrics`
        (``first_rank``, ``ap``, ``inp``, ``evaluated``) plus ``pair_id``, ``person_id`` and
        ``caption`` (lists of str), one entry per query in query order; re-ranking adds
        ``reranked`` (the same four arrays for the re-ranked ranking), ``gallery_paths`` (the
        decoded gallery), ``top_k`` (queries x K indices into it, ITC order), ``top_k_itm`` (their
        match probabilities) and ``top_k_reranked`` (the same indices in the re-ranked order);
        ``metrics`` itself stays as without it.

    Raises:
        TbpsError: no person ids, no usable rows, no image could be decoded, or ``rerank`` for a
            model without a matching head.
    """
    check_rerank(loaded, rerank)
    say = log or (lambda _msg: None)
    proto = build_protocol(pairs)
    dev = resolve_device(device)
    captions = proto.queries.get_column(C.CAPTION)
    distinct = captions.unique(maintain_order=True)
    pairs_total = len(distinct) * min(rerank, len(proto.gallery_paths)) if rerank else 0
    total, done = len(proto.gallery_paths) + len(distinct) + pairs_total, 0

    def embedded(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    t0 = time.perf_counter()
    say(f"encoding {len(proto.gallery_paths):,} gallery images on {dev}")
    enc = encode_images(loaded, proto.gallery_paths, batch_size=batch_size, workers=workers, device=dev, precision=precision,
                        on_batch=embedded)
    ok = enc.ok
    if not ok.any():
        raise TbpsError(
            f"none of the {len(ok)} gallery images could be decoded", path=proto.gallery_paths[0], value=enc.error[0]
        )
    if rerank:
        total -= pairs_total - len(distinct) * min(rerank, int(ok.sum()))  # the top K of the images that decoded
    t1 = time.perf_counter()
    say(f"encoding {len(distinct):,} distinct captions of {len(captions):,} queries")
    text_distinct = encode_texts(loaded, distinct.to_list(), batch_size=batch_size, device=dev, precision=precision, on_batch=embedded)
    # Each query row points at its caption's embedding: a repeated caption is encoded once.
    where = pl.DataFrame({"c": distinct, "i": np.arange(len(distinct))})
    index = proto.queries.select(pl.col(C.CAPTION).alias("c")).join(where, on="c", how="left", maintain_order="left")
    caption_of = index.get_column("i").to_numpy()
    text_emb = text_distinct[caption_of]
    t2 = time.perf_counter()
    g_pids = np.asarray(proto.gallery_pids, dtype=object)[ok]
    q_pids = proto.queries.get_column(C.PERSON_ID).to_numpy()
    vectors = loaded.image_vectors
    gallery_emb = enc.embeddings[ok]
    metrics = retrieval_metrics_from_embeddings(
        text_emb, gallery_emb, q_pids, g_pids, chunk_size=chunk_size, per_query=per_query, image_vectors=vectors,
    )
    t3 = time.perf_counter()
    failed = {}
    for status in np.asarray(enc.status, dtype=object)[~ok]:
        failed[status] = failed.get(status, 0) + 1
    counts = {**proto.counts, "images_failed": failed}
    result = {
        "metrics": metrics,
        "counts": counts,
        "data_hash": _data_hash(proto, enc.image_hash),
        "seconds": {"images": t1 - t0, "captions": t2 - t1, "metrics": t3 - t2},
    }
    reranked_per_query = None
    if rerank:
        gallery = [p for p, good in zip(proto.gallery_paths, ok) if good]
        # Queries with one caption have one embedding, so one top K: the head scores each (caption, image) once.
        top_c = top_k_from_embeddings(text_distinct, gallery_emb, rerank, chunk_size=chunk_size, image_vectors=vectors)
        say(f"re-ranking the top {top_c.shape[1]:,} of {len(distinct):,} distinct captions with the matching head "
            f"({top_c.size:,} pairs)")
        itm_c, decoded = top_k_pair_scores(loaded, top_c, distinct.to_list(), gallery, batch_size=batch_size, workers=workers,
                                           device=dev, precision=precision, on_batch=embedded)
        top, itm = top_c[caption_of], itm_c[caption_of]
        reranked = reranked_metrics_from_embeddings(
            text_emb, gallery_emb, q_pids, g_pids, top, itm, chunk_size=chunk_size, per_query=per_query, image_vectors=vectors,
        )
        reranked_per_query = reranked.pop("per_query", None)
        result["reranked"] = {"k": int(top_c.shape[1]), "metrics": reranked, "pairs_scored": int(top_c.size), "images_decoded": decoded}
        result["seconds"]["rerank"] = time.perf_counter() - t3
    if per_query:
        result["per_query"] = {
            **metrics.pop("per_query"),
            "pair_id": proto.queries.get_column(C.PAIR_ID).to_list(),
            "person_id": proto.queries.get_column(C.PERSON_ID).to_list(),
            "caption": captions.to_list(),
        }
        if rerank:
            result["per_query"].update(reranked=reranked_per_query, gallery_paths=gallery, top_k=top, top_k_itm=itm,
                                       top_k_reranked=rerank_order(top, itm))
    return result


def top_k_pair_scores(
    loaded: Any,
    top: np.ndarray,
    captions: list[str],
    gallery: list[str],
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: Any = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """The matching head's probability for every caption with each of its top-K gallery images.

    The pairs are grouped by image: the images that appear in some row of ``top`` are decoded
    once each, in gallery order, a batch at a time, and each batch's pairs are scored in batches
    of ``batch_size`` (each running the image tower on its few distinct images).

    Args:
        loaded: a model with a matching head (``loaded.has_pair_score``).
        top: (captions, K) gallery indices of each caption's top K.
        captions: the captions, one per row of ``top``.
        gallery: the gallery image paths ``top`` indexes.
        batch_size: images decoded, and pairs scored, per batch.
        workers: DataLoader worker processes decoding images.
        device: where to run.
        precision: ``fp32``, ``bf16`` or ``auto``.
        on_batch: called with the number of pairs of each batch scored (progress).

    Returns:
        ((captions, K) float32 probabilities aligned with ``top``, images decoded).

    Raises:
        TbpsError: an image that decoded for the gallery does not decode now (the file changed).
    """
    dev = place(loaded, device)  # the model and its matching head
    dtype = autocast_dtype(precision, dev)
    flat = top.reshape(-1)
    caption_row = np.repeat(np.arange(top.shape[0]), top.shape[1])
    by_image = np.argsort(flat, kind="stable")  # pairs grouped by image, in gallery order
    image_sorted = flat[by_image]
    needed = np.unique(flat)
    out = np.zeros(flat.shape[0], dtype=np.float32)
    for batch in iter_image_batches(loaded, [gallery[i] for i in needed], batch_size=batch_size, workers=workers,
                                    pin_memory=dev.type == "cuda", overlap=dev.type != "cpu"):
        images = needed[batch.index.numpy()]
        bad = np.flatnonzero(~batch.ok.numpy())
        if len(bad):
            j = int(bad[0])
            raise TbpsError(f"the image decoded for the gallery but not for re-ranking ({batch.status[j]}: {batch.error[j]}); "
                            "did the file change during the run?", path=gallery[int(images[j])])
        lo, hi = np.searchsorted(image_sorted, images[0], "left"), np.searchsorted(image_sorted, images[-1], "right")
        pairs = by_image[lo:hi]
        local = np.searchsorted(images, flat[pairs])  # each pair's image within this batch
        out[pairs] = pair_scores(loaded, batch.pixels, [captions[r] for r in caption_row[pairs]], local, device=dev, dtype=dtype,
                                 batch_size=batch_size)
        if on_batch:
            on_batch(len(pairs))
    return out.reshape(top.shape), int(len(needed))


def _data_hash(proto: EvalProtocol, image_hashes: list[str | None]) -> str:
    """blake2b-128 of what decides the metrics: queries (caption, person id) and gallery (bytes, id)."""
    h = hasher()
    for caption, pid in proto.queries.select(C.CAPTION, C.PERSON_ID).iter_rows():
        h.update(f"q\t{caption}\t{pid}\n".encode())
    for digest, pid in zip(image_hashes, proto.gallery_pids):
        h.update(f"g\t{digest}\t{pid}\n".encode())
    return h.hexdigest()


def run_eval(
    config: EvalConfig, log: Callable[[str], None] | None = None, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Load the model and the data, evaluate one split and write the JSON record.

    Args:
        config: the resolved :class:`EvalConfig`.
        log: receives progress lines (for stderr), or ``None``.
        progress: ``progress(done, total)`` per batch embedded (see :func:`evaluate`).

    Returns:
        The record written to ``config.out``: provenance, ``model``, ``data``, ``split``,
        ``metrics``, ``counts``, ``data_hash``, ``seconds``, ``training_overlap`` (what the
        model's training data shares with the split) and ``warnings`` (lines for stderr); with
        ``config.rerank``, ``reranked`` (see :func:`evaluate`).

    Raises:
        TbpsError: unreadable data or model, a missing split, data without person ids, or
            ``--rerank`` with a model without a matching head (before the data is read).
    """
    loaded = load(config.model, seed=config.seed)
    check_rerank(loaded, config.rerank, config.model)  # before the data is read: a model without a head cannot re-rank
    pairs = read_dataset(config.data, **config.reader_options())
    rows, split = select_split(pairs, config.split)
    overlap, warnings, notes = training_overlap(config.model, rows, f"{'split ' + split if split else 'the rows'} of {config.data}")
    for line in notes:
        if log:
            log(line)
    result = evaluate(
        loaded,
        rows,
        batch_size=config.batch_size,
        workers=config.workers,
        device=config.device,
        precision=config.precision,
        chunk_size=config.chunk_size,
        rerank=config.rerank,
        per_query=config.html is not None,
        log=log,
        progress=progress,
    )
    per_query = result.pop("per_query", None)  # for the page only: the record keeps the aggregate metrics
    result["counts"]["rows_other_splits"] = pairs.height - rows.height
    rec = record(
        config,
        model={"name": loaded.name, **loaded.identity},
        data={"path": str(config.data), "split": split, "rows": pairs.height},
        **result,
        training_overlap=overlap,
        warnings=warnings,
    )
    path = config.out if config.out is not None else default_out(config, split)
    if config.out is not None and Path(path).exists() and log:
        log(f"replacing the existing record {path} (--out names it)")
    rec["out"] = str(path)
    if config.html is not None:
        rec["html"] = str(config.html)
    write_json(path, rec)
    if config.html is not None:
        write_html(config.html, render_eval_html(rec, per_query))
    return rec


CURVE_POINTS = 400  # K values drawn on the R@K curve (every K up to 100, then spread on the log axis)
WORST_SHOWN = 20  # queries listed whose first correct image ranks lowest


def recall_curve(first_rank: np.ndarray, evaluated: np.ndarray, gallery: int) -> list[tuple[int, float]]:
    """R@K in percent for K = 1..``gallery``: the share of evaluated queries whose first match ranks K or better.

    Args:
        first_rank: each query's 1-based rank of its first match (0 when skipped).
        evaluated: whether each query was evaluated (it has a match in the gallery).
        gallery: the gallery size (the largest K).

    Returns:
        ``(K, R@K)`` at every K up to 100 and at about :data:`CURVE_POINTS` K spread evenly on a
        log scale above it, the last at K = ``gallery`` (100%); empty when no query was evaluated.
    """
    ranks = np.asarray(first_rank, dtype=np.int64)[np.asarray(evaluated, dtype=bool)]
    if ranks.size == 0 or gallery < 1:
        return []
    hits = np.cumsum(np.bincount(np.clip(ranks, 1, gallery), minlength=gallery + 1)[1:])  # hits[K-1]: queries found by K
    ks = np.unique(np.concatenate([np.arange(1, min(gallery, 100) + 1),
                                   np.geomspace(1, gallery, CURVE_POINTS).round().astype(np.int64), [gallery]]))
    return [(int(k), 100.0 * float(hits[k - 1]) / ranks.size) for k in ks]


def render_eval_html(rec: dict[str, Any], per_query: dict[str, Any] | None) -> str:
    """The ``tbps eval --html`` page: the metrics, the R@K curve and the histogram of first-correct ranks.

    Args:
        rec: the eval record (:func:`run_eval`'s return: ``metrics``, ``counts``, ``model``, ``data``, optional ``reranked``).
        per_query: :func:`evaluate`'s ``per_query`` (``first_rank``, ``evaluated``, ``caption``, ...), or ``None``.

    Returns:
        The HTML document as text.
    """
    metrics, counts = rec["metrics"], rec.get("counts", {})
    gallery = int(metrics.get("gallery", 0))
    rankings = {"ITC": metrics}
    if isinstance(rec.get("reranked"), dict):
        rankings[f"ITC + ITM re-rank (top {rec['reranked'].get('k')})"] = rec["reranked"]["metrics"]
    rows = [[name, *(f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-" for k in METRIC_KEYS), m.get("queries"),
             m.get("queries_without_match"), m.get("gallery")] for name, m in rankings.items()]
    sections = ["<h2>Metrics (%)</h2>" + grid_table(["ranking", *METRIC_KEYS, "queries", "without a match", "gallery"], rows)]
    skipped = counts.get("rows_skipped") or {}
    accounted = [("rows", counts.get("rows")), ("rows of other splits", counts.get("rows_other_splits")),
                 *((f"rows skipped: {k}", v) for k, v in skipped.items()),
                 ("rows without a person id", counts.get("rows_without_person_id")), ("queries", counts.get("queries_total")),
                 ("gallery images", counts.get("images_total")),
                 *((f"images failed: {k}", v) for k, v in (counts.get("images_failed") or {}).items())]
    sections.append("<h3>Rows</h3>" + grid_table(["", "count"], accounted))
    if per_query is None:
        sections.append('<p class="note">No per-query ranks: the curves are not drawn.</p>')
        return page(_eval_title(rec), _eval_subtitle(rec), "".join(sections))
    ranks = {"ITC": (per_query["first_rank"], per_query["evaluated"])}
    if isinstance(per_query.get("reranked"), dict):
        ranks[next(iter(list(rankings)[1:]), "re-ranked")] = (per_query["reranked"]["first_rank"], per_query["reranked"]["evaluated"])
    curves = {name: recall_curve(r, e, gallery) for name, (r, e) in ranks.items()}
    chart = svg_line_chart(curves, "K (log scale)", "R@K (%)", title=f"R@K, K = 1..{gallery:,}", width=620, height=300,
                           y_range=(0.0, 100.0), log_x=True, dots=False, step=True, show_legend=len(curves) > 1)
    hists = [
        svg_histogram(power_of_two_bins(np.asarray(r)[np.asarray(e, dtype=bool)], "first_rank", last=gallery), width=520, height=300,
                      title=f"Rank of the first correct image · {name}", x_label="rank (power-of-two bins: 1, 2-3, 4-7, ...)", unit="queries")
        for name, (r, e) in ranks.items()
    ]
    sections.append('<h2>Curves</h2><div class="charts">' + chart + "".join(hists) + "</div>")
    first = np.asarray(per_query["first_rank"])
    order = [i for i in np.argsort(-first, kind="stable")[:WORST_SHOWN] if per_query["evaluated"][i]]
    worst = [[per_query["pair_id"][i], per_query["person_id"][i], per_query["caption"][i], int(first[i])] for i in order]
    sections.append(f"<h2>Hardest queries ({len(worst)})</h2><p>The queries whose first correct image ranks lowest (ITC).</p>"
                    + '<div class="wide left">' + grid_table(["pair_id", "person_id", "caption", "first correct rank"], worst) + "</div>")
    return page(_eval_title(rec), _eval_subtitle(rec), "".join(sections))


def _eval_title(rec: dict[str, Any]) -> str:
    return f"tbps eval: {rec.get('model', {}).get('name', '-')}"


def _eval_subtitle(rec: dict[str, Any]) -> str:
    data = rec.get("data", {})
    return f"{data.get('path', '-')} · split {data.get('split') or 'all rows'} · record {rec.get('out', '-')}"


def default_out(config: EvalConfig, split: str | None) -> Path:
    """``eval-<model>-<data>-<split>.json``: distinct per model (its file name with suffix), dataset and split, and never an existing file.

    Args:
        config: the eval config (its ``model`` and ``data``).
        split: the split evaluated, ``None`` for all rows.

    Returns:
        A path in the current directory.
    """
    spec = str(config.model).rstrip("/")
    # The file name keeps its suffix: runs/x.pt (a checkpoint) and runs/x (a run directory) differ.
    model = Path(spec).name if ("/" in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors"))) else spec
    model = model.replace(":", "-").replace("/", "-")
    data = config.data.stem if config.data.is_file() else config.data.name
    path = Path(f"eval-{model}-{data}-{split or 'all'}.json")
    n = 2
    while path.exists():  # an earlier evaluation's record is never overwritten by a default name
        path = Path(f"eval-{model}-{data}-{split or 'all'}-{n}.json")
        n += 1
    return path


def load_records(paths: list[Path]) -> list[dict[str, Any]]:
    """Read eval JSON records for ``--compare``.

    Args:
        paths: files written by ``tbps eval --out``.

    Returns:
        The records, in order.

    Raises:
        TbpsError: a file is missing, not JSON, or not an eval record.
    """
    records = []
    for path in paths:
        path = Path(path)
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            raise TbpsError("no such eval record", path=path) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TbpsError(f"not a JSON eval record: {exc}", path=path) from None
        metrics = rec.get("metrics") if isinstance(rec, dict) else None
        missing = [k for k in (*METRIC_KEYS, "queries", "gallery") if not isinstance(metrics, dict) or k not in metrics]
        if missing:
            raise TbpsError("not a tbps eval record: metrics missing", path=path, field="metrics", value=missing)
        records.append(rec)
    return records
