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
from tbps.eval.metrics import METRIC_KEYS, retrieval_metrics_from_embeddings
from tbps.files import hasher, write_json
from tbps.models import load
from tbps.models.device import check_precision, resolve_device
from tbps.models.encode import encode_images, encode_texts
from tbps.provenance import record


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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = Path(self.data)
        if self.out is not None:
            self.out = Path(self.out)
        if not str(self.model).strip():
            raise UsageError("--model must name a model", field="model", value=self.model)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1", field="batch_size", value=self.batch_size)
        if self.workers < 0:
            raise UsageError("--workers must be >= 0", field="workers", value=self.workers)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UsageError("--chunk-size must be >= 1", field="chunk_size", value=self.chunk_size)
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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Text-to-image retrieval of a model on the rows of one split.

    The queries are the usable rows of ``pairs`` (status ``ok``, an image path and a person id:
    :func:`build_protocol`), one query per row, in table order; a caption repeated on several
    rows is several queries.

    Args:
        loaded: the model (:class:`tbps.models.protocol.Encoder`).
        pairs: the rows to evaluate (one split of a pair table, ``PAIR_SCHEMA``).
        batch_size: images / captions per forward pass.
        workers: DataLoader worker processes decoding images.
        device: ``auto``, ``cpu`` or a CUDA device.
        precision: ``fp32``, ``bf16`` or ``auto`` (autocast of the forward passes).
        chunk_size: query rows per block of the similarity; ``None`` = automatic.
        per_query: also return each query's outcome (``per_query`` below).
        log: receives one line per stage (for stderr), or ``None``.

    Returns:
        ``{"metrics": {R1, R5, R10, mAP, mINP, queries, queries_without_match, gallery},
        "counts": {...}, "data_hash": str, "seconds": {...}}``. With ``per_query=True`` also
        ``"per_query"``: the arrays of :func:`tbps.eval.metrics.retrieval_metrics` (``first_rank``,
        ``ap``, ``inp``, ``evaluated``) plus ``pair_id``, ``person_id`` and ``caption`` (lists of
        str), one entry per query in query order; ``metrics`` itself stays as without it.

    Raises:
        TbpsError: no person ids, no usable rows, or no image could be decoded.
    """
    say = log or (lambda _msg: None)
    proto = build_protocol(pairs)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    say(f"encoding {len(proto.gallery_paths):,} gallery images on {dev}")
    enc = encode_images(loaded, proto.gallery_paths, batch_size=batch_size, workers=workers, device=dev, precision=precision)
    ok = enc.ok
    if not ok.any():
        raise TbpsError(
            f"none of the {len(ok)} gallery images could be decoded", path=proto.gallery_paths[0], value=enc.error[0]
        )
    t1 = time.perf_counter()
    captions = proto.queries.get_column(C.CAPTION)
    distinct = captions.unique(maintain_order=True)
    say(f"encoding {len(distinct):,} distinct captions of {len(captions):,} queries")
    text_distinct = encode_texts(loaded, distinct.to_list(), batch_size=batch_size, device=dev, precision=precision)
    # Each query row points at its caption's embedding: a repeated caption is encoded once.
    where = pl.DataFrame({"c": distinct, "i": np.arange(len(distinct))})
    index = proto.queries.select(pl.col(C.CAPTION).alias("c")).join(where, on="c", how="left", maintain_order="left")
    text_emb = text_distinct[index.get_column("i").to_numpy()]
    t2 = time.perf_counter()
    g_pids = np.asarray(proto.gallery_pids, dtype=object)[ok]
    metrics = retrieval_metrics_from_embeddings(
        text_emb,
        enc.embeddings[ok],
        proto.queries.get_column(C.PERSON_ID).to_numpy(),
        g_pids,
        chunk_size=chunk_size,
        per_query=per_query,
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
    if per_query:
        result["per_query"] = {
            **metrics.pop("per_query"),
            "pair_id": proto.queries.get_column(C.PAIR_ID).to_list(),
            "person_id": proto.queries.get_column(C.PERSON_ID).to_list(),
            "caption": captions.to_list(),
        }
    return result


def _data_hash(proto: EvalProtocol, image_hashes: list[str | None]) -> str:
    """blake2b-128 of what decides the metrics: queries (caption, person id) and gallery (bytes, id)."""
    h = hasher()
    for caption, pid in proto.queries.select(C.CAPTION, C.PERSON_ID).iter_rows():
        h.update(f"q\t{caption}\t{pid}\n".encode())
    for digest, pid in zip(image_hashes, proto.gallery_pids):
        h.update(f"g\t{digest}\t{pid}\n".encode())
    return h.hexdigest()


def run_eval(config: EvalConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the model and the data, evaluate one split and write the JSON record.

    Args:
        config: the resolved :class:`EvalConfig`.
        log: receives progress lines (for stderr), or ``None``.

    Returns:
        The record written to ``config.out``: provenance, ``model``, ``data``, ``split``,
        ``metrics``, ``counts``, ``data_hash`` and ``seconds``.

    Raises:
        TbpsError: unreadable data or model, a missing split, or data without person ids.
    """
    pairs = read_dataset(config.data, **config.reader_options())
    rows, split = select_split(pairs, config.split)
    loaded = load(config.model, seed=config.seed)
    result = evaluate(
        loaded,
        rows,
        batch_size=config.batch_size,
        workers=config.workers,
        device=config.device,
        precision=config.precision,
        chunk_size=config.chunk_size,
        log=log,
    )
    result["counts"]["rows_other_splits"] = pairs.height - rows.height
    rec = record(
        config,
        model={"name": loaded.name, **loaded.identity},
        data={"path": str(config.data), "split": split, "rows": pairs.height},
        **result,
    )
    path = config.out if config.out is not None else default_out(config, split)
    if config.out is not None and Path(path).exists() and log:
        log(f"replacing the existing record {path} (--out names it)")
    rec["out"] = str(path)
    write_json(path, rec)
    return rec


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
