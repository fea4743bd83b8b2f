"""``tbps search``: free-text person search over a gallery of images, with a cached FAISS index.

The gallery is any dataset the readers support (captions and person ids are not needed: a
plain folder of images works). Every distinct image is embedded once with the model; the
L2-normalised embeddings go into a FAISS ``IndexFlatIP``, whose inner product is then the
cosine similarity. A flat index is exact and, at gallery scale (up to a few million images of
dimension 512, about 2 GB in float32), fast enough: a query is one matrix-vector product.

A model with several vectors per image (BLIP-2's query tokens, ``Encoder.image_vectors`` = Q)
scores an image by the largest of its vectors' cosines (:func:`tbps.models.protocol.similarity`).
The index then holds each image's Q vectors as Q rows; a query asks for its ``top_k x Q``
nearest rows and keeps each image's best row. That is exact: the rows scoring above the k-th
best image's best row belong to the k - 1 images above it, at most ``(k - 1) x Q`` rows.

Cache: the index lives in ``CACHE/<key>/`` (default cache: ``$TBPS_CACHE_DIR`` or
``$XDG_CACHE_HOME/tbps``/``~/.cache/tbps``, then ``search/``). The key is a hash of

* the gallery: every image path with its file size and modification time (nanoseconds), and
* the model: its identity (spec, weights, checkpoint hash), input size and the precision,

so adding, removing, replacing or touching an image, or switching the model, builds a new
index, while an unchanged gallery is loaded without running the model on any image. (An edit
that keeps both a file's size and its mtime is not noticed; ``--rebuild`` forces a build.)
Entries are written to a temporary directory and renamed into place, so a crash never
leaves a half-written index. Old entries are not deleted; remove the directory to reclaim space.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.data.options import ReaderOptions
from tbps.data.readers import read_dataset
from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_dir, hasher, write_json
from tbps.models import load
from tbps.models.device import check_precision, resolve_device
from tbps.models.encode import encode_images, encode_texts
from tbps.report.html import contact_sheet, esc, page, write_html

INDEX_FILE = "index.faiss"
GALLERY_FILE = "gallery.parquet"
META_FILE = "meta.json"
INDEX_KIND = "IndexFlatIP"


def default_cache_dir() -> Path:
    """``$TBPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/tbps``, else ``~/.cache/tbps``."""
    if os.environ.get("TBPS_CACHE_DIR"):
        return Path(os.environ["TBPS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tbps"


@dataclass(kw_only=True)
class SearchConfig(ReaderOptions):
    """Parameters of ``tbps search``; field names equal the CLI option names.

    Attributes:
        queries: free-text queries.
        gallery: the images to search: any dataset the readers support, or a folder of images.
        model: a model spec (see ``tbps.models.load``).
        queries_file: more queries, one per line (blank lines are skipped).
        top_k: matches per query.
        html: write a page of thumbnails per query to this file.
        cache_dir: where indexes are cached (default :func:`default_cache_dir`).
        rebuild: build the index even when a cached one matches.
        format, image_root, image_col, caption_col, id_col: the reader options of ``gallery``
            (``tbps.data.options.ReaderOptions``).
        batch_size, workers, device, precision: the encoding options.
        seed: the seed of random weights (a bare config name such as ``tbps-tiny``).
    """

    queries: list[str]
    gallery: Path
    model: str
    queries_file: Path | None = None
    top_k: int = 10
    html: Path | None = None
    cache_dir: Path | None = None
    rebuild: bool = False
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gallery = Path(self.gallery)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        self.queries = [q.strip() for q in (self.queries or []) if q and q.strip()]
        if self.queries_file is not None:
            self.queries_file = Path(self.queries_file)
            try:
                lines = self.queries_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise TbpsError(f"cannot read the queries file: {exc}", path=self.queries_file, field="queries_file") from None
            self.queries += [line.strip() for line in lines if line.strip()]
        if not self.queries:
            raise UsageError("give at least one QUERY or a --queries file", field="queries")
        if self.top_k < 1:
            raise UsageError("--top-k must be >= 1", field="top_k", value=self.top_k)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be >= 1", field="batch_size", value=self.batch_size)
        if self.workers < 0:
            raise UsageError("--workers must be >= 0", field="workers", value=self.workers)
        check_precision(self.precision)
        if self.html is not None:
            self.html = Path(self.html)


@dataclass
class GalleryIndex:
    """A FAISS index over a gallery's image embeddings, with the path of each indexed row.

    Attributes:
        index: the FAISS index (``IndexFlatIP`` over L2-normalised embeddings).
        paths: image path of each index row.
        failed: ``{path: "status: reason"}`` for gallery images that could not be embedded.
        key: the cache key; ``directory``: the cache entry.
        built: whether this call built it (``False``: loaded from the cache).
        image_vectors: index rows per image (row ``r`` is image ``r // image_vectors``).
    """

    index: Any
    paths: list[str]
    failed: dict[str, str]
    key: str
    directory: Path
    built: bool
    image_vectors: int = 1


def gallery_paths(pairs: pl.DataFrame) -> list[str]:
    """The distinct image paths of a pair table, in order of first appearance.

    Rows of any caption status are used (search needs no caption); rows without a resolved
    image path (refused by the reader) are not.

    Raises:
        TbpsError: the table has no image path at all.
    """
    paths = pairs.get_column(C.IMAGE_PATH).drop_nulls().unique(maintain_order=True).to_list()
    if not paths:
        raise TbpsError("the gallery has no images", value=dict(pairs.group_by(C.STATUS).len().iter_rows()))
    return paths


def cache_key(paths: list[str], identity: dict[str, Any], extra: dict[str, Any]) -> str:
    """blake2b-128 over each image's (path, size, mtime_ns) and the model identity.

    Args:
        paths: the gallery image paths, in index order.
        identity: the model identity (spec, weights, hash).
        extra: anything else that changes the embeddings (input size, precision).

    Returns:
        The hex key.
    """
    h = hasher()
    h.update(json.dumps({"model": identity, **extra}, sort_keys=True, default=str).encode())
    for path in paths:
        # Size and mtime: a cheap stat per image instead of re-reading every file.
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def build_index(embeddings: np.ndarray, image_vectors: int = 1):
    """An ``IndexFlatIP`` holding the (L2-normalised) embeddings: ``image_vectors`` rows per image."""
    import faiss  # heavy (about 0.5 s): imported by the commands that index, not by every importer

    rows = embeddings.reshape(embeddings.shape[0] * image_vectors, -1)  # each image's vectors, one row each
    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(np.ascontiguousarray(rows, dtype=np.float32))
    return index


def gallery_index(
    loaded: Any,
    paths: list[str],
    cache_dir: Path,
    *,
    precision: str = "fp32",
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    rebuild: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GalleryIndex:
    """Load the cached index of a gallery, or embed the images and build (and cache) it.

    Args:
        loaded: the model (:class:`tbps.models.protocol.Encoder`).
        paths: the gallery's image paths.
        cache_dir: the cache root; the entry is ``cache_dir/search/<key>``.
        precision, batch_size, workers, device: encoding options.
        rebuild: ignore a cached entry.
        log: receives progress lines, or ``None``.
        progress: ``progress(done, total)`` after each batch of gallery images embedded (not
            called when the cached index is loaded).

    Returns:
        The :class:`GalleryIndex`.

    Raises:
        TbpsError: no gallery image could be decoded.
    """
    import faiss  # heavy (about 0.5 s): imported by the commands that index, not by every importer

    say = log or (lambda _msg: None)
    identity = {"name": loaded.name, **loaded.identity}
    vectors = loaded.image_vectors
    extra = {"image_size": list(loaded.image_size), "precision": precision, "index": INDEX_KIND}
    if vectors > 1:  # in the key only when several, so the keys of existing one-vector caches stay as they were
        extra["image_vectors"] = vectors
    key = cache_key(paths, identity, extra)
    entry = Path(cache_dir) / "search" / key
    if not rebuild and (entry / META_FILE).is_file():
        try:
            meta = json.loads((entry / META_FILE).read_text())
            index = faiss.read_index(str(entry / INDEX_FILE))
            cached = pl.read_parquet(entry / GALLERY_FILE).get_column(C.IMAGE_PATH).to_list()
            if index.ntotal != len(cached) * vectors:
                raise ValueError(f"{index.ntotal} vectors for {len(cached)} paths")
        except Exception as exc:  # noqa: BLE001 - a damaged entry of any kind is rebuilt
            say(f"the cached index in {entry} is unreadable ({exc}); rebuilding it")
        else:
            say(f"loaded the cached index of {len(cached):,} images from {entry}")
            return GalleryIndex(index, cached, meta.get("failed", {}), key, entry, built=False, image_vectors=vectors)

    dev = resolve_device(device)
    say(f"embedding {len(paths):,} gallery images on {dev} (index cache {entry})")
    t0 = time.perf_counter()
    done = 0

    def embedded(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(paths))

    enc = encode_images(loaded, paths, batch_size=batch_size, workers=workers, device=dev, precision=precision, on_batch=embedded)
    ok = enc.ok
    failed = {p: f"{s}: {e}" for p, s, e, good in zip(paths, enc.status, enc.error, ok) if not good}
    if not ok.any():
        raise TbpsError(f"none of the {len(paths)} gallery images could be decoded", path=paths[0], value=enc.error[0])
    kept = [p for p, good in zip(paths, ok) if good]
    index = build_index(enc.embeddings[ok], vectors)
    # Written beside the final place, then renamed: readers never see a partial entry.
    meta = {"key": key, "model": identity, "images": len(paths), "indexed": len(kept), "failed": failed,
            "index": INDEX_KIND, "dim": int(index.d), "image_vectors": vectors, "seconds": time.perf_counter() - t0, "precision": precision}
    with atomic_dir(entry) as tmp:  # --rebuild replaces an existing entry
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pl.DataFrame({C.IMAGE_PATH: kept}, schema={C.IMAGE_PATH: pl.String}).write_parquet(tmp / GALLERY_FILE)
        write_json(tmp / META_FILE, meta)
    return GalleryIndex(index, kept, failed, key, entry, built=True, image_vectors=vectors)


@dataclass
class SearchResult:
    """Matches per query.

    Attributes:
        queries: the queries, in order.
        matches: per query, ``(image path, score)`` best first (score = cosine similarity).
        index: the :class:`GalleryIndex` searched.
    """

    queries: list[str]
    matches: list[list[tuple[str, float]]]
    index: GalleryIndex = field(repr=False)


def search(loaded: Any, gindex: GalleryIndex, queries: list[str], top_k: int = 10, *, device: str = "auto", precision: str = "fp32") -> SearchResult:
    """The ``top_k`` gallery images closest to each query.

    Args:
        loaded: the model that built the index.
        gindex: the gallery index.
        queries: free-text queries.
        top_k: matches per query (fewer when the gallery is smaller).
        device, precision: text encoding options.

    Returns:
        A :class:`SearchResult`.
    """
    text = encode_texts(loaded, queries, device=resolve_device(device), precision=precision)
    vectors = gindex.image_vectors
    k = min(top_k, len(gindex.paths))
    scores, rows = gindex.index.search(np.ascontiguousarray(text, dtype=np.float32), min(k * vectors, gindex.index.ntotal))
    matches = []
    for srow, jrow in zip(scores, rows):
        found: dict[int, float] = {}
        for s, j in zip(srow, jrow):
            # Rows come best first: an image's first row is its best vector (the max over them).
            if j >= 0 and int(j) // vectors not in found:
                found[int(j) // vectors] = float(s)
        matches.append([(gindex.paths[i], s) for i, s in list(found.items())[:k]])
    return SearchResult(queries, matches, gindex)


def render_search_html(result: SearchResult, gallery: str, model: str) -> str:
    """A self-contained page: per query, the matches as thumbnails with rank and score."""
    body = []
    for query, found in zip(result.queries, result.matches):
        rows = [{C.IMAGE_PATH: p, C.PAIR_ID: Path(p).name, "score": s, "rank": r} for r, (p, s) in enumerate(found, 1)]
        body.append(f"<h2>“{esc(query)}”</h2>" + contact_sheet(rows, fields=("rank", "score")))
    sub = f"gallery {gallery} · {len(result.index.paths):,} images indexed · model {model} · index {result.index.key[:12]}"
    return page("tbps search", sub, "".join(body))


def run_search(
    config: SearchConfig, log: Callable[[str], None] | None = None, progress: Callable[[int, int], None] | None = None
) -> SearchResult:
    """Read the gallery, load or build its index, search every query (and write the page).

    Args:
        config: the resolved :class:`SearchConfig`.
        log: receives progress lines (for stderr), or ``None``.
        progress: ``progress(done, total)`` per batch of gallery images embedded (see :func:`gallery_index`).

    Returns:
        The :class:`SearchResult`.

    Raises:
        TbpsError: unreadable gallery or model, or no decodable image.
    """
    pairs = read_dataset(config.gallery, **config.reader_options())
    paths = gallery_paths(pairs)
    loaded = load(config.model, seed=config.seed)
    gindex = gallery_index(
        loaded, paths, config.cache_dir, precision=config.precision, batch_size=config.batch_size,
        workers=config.workers, device=config.device, rebuild=config.rebuild, log=log, progress=progress,
    )
    if gindex.failed and log:
        log(f"{len(gindex.failed):,} gallery images could not be decoded and are not searched")
    result = search(loaded, gindex, config.queries, config.top_k, device=config.device, precision=config.precision)
    if config.html is not None:
        write_html(config.html, render_search_html(result, str(config.gallery), config.model))
    return result
