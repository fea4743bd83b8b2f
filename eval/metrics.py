"""Text-to-image retrieval metrics under the standard TBPS protocol.

Each query (a caption) ranks the whole gallery (the images) by similarity, highest first. A
gallery item *matches* a query when both have the same person id. The metrics are those of
IRRA's ``rank`` function (Jiang & Ye, CVPR 2023), in percent:

``R1``, ``R5``, ``R10``
    the share of queries with a match within the first 1 / 5 / 10 ranked items (CMC).
``mAP``
    the mean over queries of the average precision over the *full* ranking:
    ``AP = mean_k (k / r_k)`` where ``r_k`` is the 1-based rank of the k-th match.
``mINP``
    the mean over queries of the inverse negative penalty ``m / r_m``: the number of matches
    divided by the rank of the last (hardest) match (Ye et al., TPAMI 2021).

Tied scores are ordered deterministically: among gallery items with exactly equal similarity,
the one with the lower gallery index ranks first. This is the order a *stable* sort by
descending score gives (``np.argsort(-s, kind="stable")``); IRRA's unstable ``torch.argsort``
leaves it to the sorting kernel.

A query without any match in the gallery has no defined AP or INP (IRRA would divide by zero).
Such queries are skipped and counted: the result carries ``queries`` (evaluated) and
``queries_without_match`` (skipped), and every metric is averaged over the evaluated queries.

With ``per_query=True`` the result also carries each query's outcome, in query order (the
arrays the aggregate numbers are computed from): ``first_rank`` (1-based rank of the first
match, 0 when skipped), ``ap`` and ``inp`` (0 when skipped) and ``evaluated``.

The computation never builds a ranking: per block of queries it sorts the scores of each row
(values only) and finds the rank of every matching item by binary search, so its memory is one
block of rows and its cost about one sort of the similarity matrix.
:func:`retrieval_metrics_from_embeddings` also computes the similarity block by block, so a
100,000 x 100,000 evaluation never holds the dense matrix. A model with several vectors per
image (BLIP-2's query tokens: ``image_vectors``) scores an image by the largest of its vectors'
cosines (:func:`tbps.models.protocol.similarity`); with one vector the similarity is the plain
dot product, computed as it always was.

Re-ranking (``tbps eval --rerank K``, as APTM's and the paper's released evaluation do): each
query's top K gallery items by that similarity (:func:`top_k_from_embeddings`, ties by gallery
index as in the metrics) are put in the order of a second score, the image-text matching
head's probability, and the items below K keep their order
(:func:`reranked_metrics_from_embeddings`). The K items ranked first stay the same set, so R@K
does not change; R@1, R@5, mAP and mINP can.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from tbps.errors import TbpsError
from tbps.models.protocol import similarity

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
_CMC_KS = (1, 5, 10)
# Default block: about 2**26 similarity values (256 MiB in float32) per block of query rows.
_BLOCK_ELEMENTS = 1 << 26


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """A numpy view or copy of a numpy array, a torch tensor (any device/dtype) or a sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16 have no numpy counterpart that sorts exactly alike
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TbpsError(f"cannot read {what} as an array: {exc}", field=what) from exc


def _pid_codes(query_pids: Any, gallery_pids: Any, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for the person ids, shared by queries and gallery (ids may be str or int)."""
    q = _to_numpy(query_pids, "query_pids").reshape(-1)
    g = _to_numpy(gallery_pids, "gallery_pids").reshape(-1)
    if len(q) != n_queries:
        raise TbpsError(
            f"query_pids has {len(q)} entries but the similarity has {n_queries} query rows", field="query_pids"
        )
    if len(g) != n_gallery:
        raise TbpsError(
            f"gallery_pids has {len(g)} entries but the similarity has {n_gallery} gallery columns",
            field="gallery_pids",
        )
    if q.dtype.kind != g.dtype.kind and {q.dtype.kind, g.dtype.kind} != {"i", "u"}:
        # Mixed kinds (e.g. int vs str) would never match silently: compare as strings instead.
        q, g = q.astype(str), g.astype(str)
    both = np.concatenate([q, g])
    if both.dtype == object:
        if any(v is None for v in both):
            raise TbpsError("person ids contain null values", field="person_id")
        both = both.astype(str)
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.reshape(-1)
    return codes[: len(q)], codes[len(q) :]


class _Accumulator:
    """Collects per-query first-match rank, AP and INP over blocks of queries."""

    def __init__(self, query_codes: np.ndarray, gallery_codes: np.ndarray) -> None:
        n_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
        # Gallery indices grouped by person id (CSR layout): the matches of a query are one slice.
        self.order = np.argsort(gallery_codes, kind="stable")
        self.starts = np.searchsorted(gallery_codes[self.order], np.arange(n_codes + 1))
        self.query_codes = query_codes
        self.n_gallery = len(gallery_codes)
        # Per-query outcomes, summed once at the end: the result does not depend on the blocks.
        self.first_rank = np.zeros(len(query_codes), dtype=np.int64)
        self.ap = np.zeros(len(query_codes))
        self.inp = np.zeros(len(query_codes))
        self.has_match = np.zeros(len(query_codes), dtype=bool)

    def add(self, start: int, sim: np.ndarray) -> None:
        """Account for the queries ``start .. start + len(sim)`` given their similarity rows."""
        if not np.isfinite(sim).all():
            bad = int(np.argwhere(~np.isfinite(sim))[0, 0]) + start
            raise TbpsError("similarity contains NaN or infinite values", record=f"query {bad}")
        codes = self.query_codes[start : start + len(sim)]
        n_match = self.starts[codes + 1] - self.starts[codes]
        has = n_match > 0
        self.has_match[start : start + len(sim)] = has
        if not has.any():
            return
        # One flat entry per (query, matching gallery item) of this block, grouped by query.
        row = np.repeat(np.arange(len(sim)), n_match)
        slot = np.arange(len(row)) - np.repeat(np.cumsum(n_match) - n_match, n_match)
        col = self.order[np.repeat(self.starts[codes], n_match) + slot]
        value = sim[row, col]

        sorted_rows = np.sort(sim, axis=1)  # ascending values; ranks come from binary search
        t_sorted = torch.from_numpy(sorted_rows)
        per_row = np.zeros((len(sim), int(n_match.max())), dtype=sim.dtype)
        per_row[row, slot] = value
        t_vals = torch.from_numpy(per_row)
        right = torch.searchsorted(t_sorted, t_vals, right=True).numpy()[row, slot]
        left = torch.searchsorted(t_sorted, t_vals, right=False).numpy()[row, slot]
        greater = self.n_gallery - right
        # Exact ties with other items: those with a lower gallery index rank first (stable order).
        rank0 = greater.astype(np.int64)
        tied = np.flatnonzero(right - left > 1)
        for lo in range(0, len(tied), 256):
            # Blocks of tied entries: each needs a pass over its row, bounded to 256 rows at a time.
            t = tied[lo : lo + 256]
            rows = sim[row[t]]
            before = (rows == value[t, None]) & (np.arange(self.n_gallery)[None, :] < col[t, None])
            rank0[t] += np.count_nonzero(before, axis=1)

        # Order each query's matches by rank; k-th match (1-based) at 1-based rank r: precision k / r.
        # Sorting by (row, rank) keeps the rows' groups in place, so ``slot`` is the k-1 of each entry.
        rank_s = rank0[np.lexsort((rank0, row))] + 1
        k = slot + 1
        ap = np.bincount(row, weights=k / rank_s, minlength=len(sim))[has] / n_match[has]
        idx = start + np.flatnonzero(has)
        self.ap[idx] = ap
        end = np.cumsum(n_match)[has]  # one past each query's last entry in the flat arrays
        self.inp[idx] = n_match[has] / rank_s[end - 1]
        self.first_rank[idx] = rank_s[end - n_match[has]]

    def result(self, per_query: bool = False) -> dict[str, Any]:
        """The aggregate metrics, and with ``per_query`` the per-query arrays they come from."""
        evaluated = int(self.has_match.sum())
        skipped = len(self.has_match) - evaluated
        if evaluated == 0:
            raise TbpsError(
                f"no query has a matching gallery item (all {skipped} queries skipped)",
                field="person_id",
                hint="queries and gallery must share person ids",
            )
        # A skipped query has first_rank 0: the mask keeps it out of every hit count.
        res = {
            f"R{top}": 100.0 * int((self.has_match & (self.first_rank <= top)).sum()) / evaluated for top in _CMC_KS
        }
        res["mAP"] = 100.0 * float(self.ap.sum()) / evaluated
        res["mINP"] = 100.0 * float(self.inp.sum()) / evaluated
        res["queries"] = evaluated
        res["queries_without_match"] = skipped
        res["gallery"] = self.n_gallery
        if per_query:
            res["per_query"] = {
                "first_rank": self.first_rank,
                "ap": self.ap,
                "inp": self.inp,
                "evaluated": self.has_match,
            }
        return res


def _block_rows(chunk_size: int | None, n_gallery: int) -> int:
    if chunk_size is None:
        return max(1, _BLOCK_ELEMENTS // max(1, n_gallery))
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise TbpsError("chunk_size must be a positive integer", field="chunk_size", value=chunk_size)
    return int(chunk_size)


def retrieval_metrics(
    similarity: Any, query_pids: Any, gallery_pids: Any, *, chunk_size: int | None = None, per_query: bool = False
) -> dict[str, Any]:
    """R@1/5/10, mAP and mINP (percent) of text-to-image retrieval from a similarity matrix.

    Args:
        similarity: [queries x gallery] scores, higher = more similar; numpy array or torch
            tensor (any device and float dtype; bf16/fp16 are compared in float32).
        query_pids: the person id of each query (length = rows), ints or strings.
        gallery_pids: the person id of each gallery item (length = columns).
        chunk_size: query rows processed at a time (memory: about 3 x rows x gallery values);
            default: about 2**26 values per block.
        per_query: also return each query's outcome (``per_query`` below).

    Returns:
        ``{"R1", "R5", "R10", "mAP", "mINP"}`` as floats in percent, plus ``queries`` (queries
        evaluated), ``queries_without_match`` (skipped: no gallery item with their id) and
        ``gallery`` (gallery size). Ties are ranked by gallery index (see the module docstring).
        With ``per_query=True`` also ``"per_query": {"first_rank": int64, "ap": float64,
        "inp": float64, "evaluated": bool}``, arrays with one entry per query in query (row)
        order: the 1-based rank of the query's first match, its AP and INP as fractions (not
        percent), and whether it was evaluated; a skipped query has ``first_rank`` 0, ``ap`` and
        ``inp`` 0 and ``evaluated`` False. The aggregate numbers are computed from these arrays.

    Raises:
        TbpsError: shapes disagree, the matrix is empty or not finite, or no query has a match.
    """
    sim = _to_numpy(similarity, "similarity")
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise TbpsError("similarity must be a non-empty [queries x gallery] matrix", value=tuple(sim.shape))
    if sim.dtype.kind not in "fiu":
        raise TbpsError("similarity must be numeric", value=str(sim.dtype))
    if sim.dtype not in (np.float32, np.float64):
        sim = sim.astype(np.float32)
    q_codes, g_codes = _pid_codes(query_pids, gallery_pids, sim.shape[0], sim.shape[1])
    acc = _Accumulator(q_codes, g_codes)
    rows = _block_rows(chunk_size, sim.shape[1])
    for start in range(0, sim.shape[0], rows):
        # Blocks of query rows bound the sorted copy's memory.
        acc.add(start, np.ascontiguousarray(sim[start : start + rows]))
    return acc.result(per_query)


def _similarity_blocks(text_emb: Any, image_emb: Any, rows: int, image_vectors: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, text_emb[rows] @ image_emb.T) blocks, on the tensors' device when torch.

    With ``image_vectors > 1`` each block is :func:`tbps.models.protocol.similarity` transposed
    (an image's score is the largest of its vectors' cosines), on the tensors' device.
    """
    if image_vectors > 1:
        t = text_emb.detach().float() if isinstance(text_emb, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(_to_numpy(text_emb, "text_emb"), dtype=np.float32))
        g = image_emb.detach().float() if isinstance(image_emb, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(_to_numpy(image_emb, "image_emb"), dtype=np.float32))
        g = g.to(t.device)
        for start in range(0, t.shape[0], rows):
            # (gallery, block) maxima over each image's vectors, as BLIP-2's ITC takes them.
            yield start, np.ascontiguousarray(similarity(g, t[start : start + rows], image_vectors).T.cpu().numpy())
        return
    is_torch = type(text_emb).__module__.startswith("torch") and type(image_emb).__module__.startswith("torch")
    if is_torch:
        t, g = text_emb.detach().float(), image_emb.detach().float().to(text_emb.device)
        for start in range(0, t.shape[0], rows):
            # A block's matrix product runs where the embeddings are (GPU when they are there).
            yield start, (t[start : start + rows] @ g.T).cpu().numpy()
        return
    t = np.ascontiguousarray(_to_numpy(text_emb, "text_emb"), dtype=np.float32)
    g = np.ascontiguousarray(_to_numpy(image_emb, "image_emb"), dtype=np.float32)
    gt = np.ascontiguousarray(g.T)
    for start in range(0, t.shape[0], rows):
        # One block of the similarity at a time: the dense matrix never exists.
        yield start, t[start : start + rows] @ gt


def _check_embeddings(text_emb: Any, image_emb: Any, image_vectors: int) -> None:
    """Refuse empty or mismatched embeddings: an image row is ``image_vectors`` caption-wide blocks."""
    for name, emb in (("text_emb", text_emb), ("image_emb", image_emb)):
        if len(getattr(emb, "shape", ())) != 2 or emb.shape[0] == 0:
            raise TbpsError("embeddings must be a non-empty [n x dim] matrix", field=name, value=tuple(getattr(emb, "shape", ())))
    if not isinstance(image_vectors, (int, np.integer)) or image_vectors < 1:
        raise TbpsError("image_vectors must be a positive integer", field="image_vectors", value=image_vectors)
    if text_emb.shape[1] * image_vectors != image_emb.shape[1]:
        per = f" ({image_vectors} vectors of {text_emb.shape[1]} per image)" if image_vectors > 1 else ""
        raise TbpsError(
            f"text and image embeddings differ in width ({text_emb.shape[1]} vs {image_emb.shape[1]}{per})",
            field="image_emb",
        )


def _rows_per_block(chunk_size: int | None, n_gallery: int, image_vectors: int) -> int:
    # Several vectors per image: the per-vector products are image_vectors times the block.
    return _block_rows(chunk_size, n_gallery * image_vectors)


def retrieval_metrics_from_embeddings(
    text_emb: Any,
    image_emb: Any,
    query_pids: Any,
    gallery_pids: Any,
    chunk_size: int | None = None,
    per_query: bool = False,
    image_vectors: int = 1,
) -> dict[str, Any]:
    """The metrics of :func:`retrieval_metrics` for ``text_emb @ image_emb.T``, block by block.

    Memory stays at a few blocks of ``chunk_size x gallery`` values, so 100,000 x 100,000 runs
    without the dense 40 GB matrix. Pass L2-normalised embeddings for cosine similarity.

    Args:
        text_emb: [queries x dim] query (caption) embeddings, numpy or torch.
        image_emb: [gallery x image_vectors * dim] gallery (image) embeddings, numpy or torch.
        query_pids: the person id of each query.
        gallery_pids: the person id of each gallery item.
        chunk_size: query rows per block; default about 2**26 similarity values per block.
        per_query: also return each query's outcome, as :func:`retrieval_metrics` does.
        image_vectors: embeddings per image (the model's ``image_vectors``; BLIP-2: its query
            tokens): an image scores the largest of its vectors' cosines.

    Returns:
        The same dict as :func:`retrieval_metrics`.

    Raises:
        TbpsError: the shapes disagree or are empty, or no query has a match.
    """
    _check_embeddings(text_emb, image_emb, image_vectors)
    q_codes, g_codes = _pid_codes(query_pids, gallery_pids, text_emb.shape[0], image_emb.shape[0])
    acc = _Accumulator(q_codes, g_codes)
    rows = _rows_per_block(chunk_size, image_emb.shape[0], image_vectors)
    for start, block in _similarity_blocks(text_emb, image_emb, rows, image_vectors):
        acc.add(start, block)
    return acc.result(per_query)


def _top_k_block(sim: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` highest columns, best first; equal values: the lower column first (the metrics' order)."""
    n = sim.shape[1]
    if k >= n:
        return np.argsort(-sim, axis=1, kind="stable")
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(sim, part, axis=1)
    top = np.take_along_axis(part, np.lexsort((part, -values), axis=-1), axis=1)
    # argpartition picks any of the items tied with the k-th value: rows where some tied item was
    # left out are ordered in full, so the lower gallery index wins as in the ranking.
    kth = np.take_along_axis(sim, top[:, -1:], axis=1)
    inside = (np.take_along_axis(sim, top, axis=1) == kth).sum(axis=1)
    for r in np.flatnonzero((sim == kth).sum(axis=1) > inside):
        top[r] = np.argsort(-sim[r], kind="stable")[:k]
    return top


def top_k_from_embeddings(text_emb: Any, image_emb: Any, k: int, *, chunk_size: int | None = None, image_vectors: int = 1) -> np.ndarray:
    """Each query's ``k`` most similar gallery items, in ranking order, block by block.

    Args:
        text_emb: [queries x dim] query embeddings, numpy or torch.
        image_emb: [gallery x image_vectors * dim] gallery embeddings.
        k: items per query (all of them when the gallery is smaller).
        chunk_size: query rows per block, as for :func:`retrieval_metrics_from_embeddings`.
        image_vectors: embeddings per image.

    Returns:
        (queries, min(k, gallery)) int64 gallery indices, best first, ties by lower index
        (the order :func:`retrieval_metrics` ranks by).

    Raises:
        TbpsError: bad shapes, ``k < 1``, or a similarity that is not finite.
    """
    _check_embeddings(text_emb, image_emb, image_vectors)
    if k < 1:
        raise TbpsError("k must be 1 or more", field="k", value=k)
    k = min(int(k), image_emb.shape[0])
    top = np.zeros((text_emb.shape[0], k), dtype=np.int64)
    for start, block in _similarity_blocks(text_emb, image_emb, _rows_per_block(chunk_size, image_emb.shape[0], image_vectors), image_vectors):
        if not np.isfinite(block).all():
            bad = int(np.argwhere(~np.isfinite(block))[0, 0]) + start
            raise TbpsError("similarity contains NaN or infinite values", record=f"query {bad}")
        top[start : start + len(block)] = _top_k_block(block, k)
    return top


def rerank_order(top: np.ndarray, top_scores: np.ndarray) -> np.ndarray:
    """``top`` (each row's items, best first) reordered by ``top_scores``, higher first; equal scores keep their order.

    Args:
        top: (queries, k) item indices, in their first ranking's order.
        top_scores: (queries, k) the second score of each of them.

    Returns:
        (queries, k) the same items per row, in the new order.
    """
    top = np.asarray(top)
    scores = np.asarray(top_scores, dtype=np.float64)
    if top.shape != scores.shape:
        raise TbpsError(f"top-k items {top.shape} and their scores {scores.shape} differ in shape", field="top_scores")
    if not np.isfinite(scores).all():
        bad = int(np.argwhere(~np.isfinite(scores))[0, 0])
        raise TbpsError("re-ranking scores contain NaN or infinite values", record=f"query {bad}")
    position = np.broadcast_to(np.arange(top.shape[1]), top.shape)
    return np.take_along_axis(top, np.lexsort((position, -scores), axis=-1), axis=1)


def _reranked_block(sim: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``sim`` with each row's ``order`` items above every other item, in that order (the others keep their values)."""
    out = sim.copy()
    k = order.shape[1]
    # Above the block's largest similarity, a step apart that float32 keeps distinct (cosines: a step of 1).
    top = float(out.max())
    step = max(1.0, abs(top) * 2.0**-16)
    lifted = (top + step * np.arange(k, 0, -1, dtype=np.float64)).astype(out.dtype)
    np.put_along_axis(out, order, np.broadcast_to(lifted, order.shape), axis=1)
    return out


def reranked_metrics_from_embeddings(
    text_emb: Any,
    image_emb: Any,
    query_pids: Any,
    gallery_pids: Any,
    top: np.ndarray,
    top_scores: np.ndarray,
    *,
    chunk_size: int | None = None,
    per_query: bool = False,
    image_vectors: int = 1,
) -> dict[str, Any]:
    """The metrics when each query's top items are re-ranked by a second score (ITM), the rest kept in similarity order.

    Args:
        text_emb, image_emb, query_pids, gallery_pids, chunk_size, image_vectors: as for
            :func:`retrieval_metrics_from_embeddings`.
        top: (queries, k) each query's top items by similarity (:func:`top_k_from_embeddings`).
        top_scores: (queries, k) the second score of each of those (query, item) pairs.
        per_query: also return each query's outcome.

    Returns:
        The dict of :func:`retrieval_metrics` for the ranking where each query's ``top`` items
        come first, in :func:`rerank_order`, and every other item after them in similarity order.

    Raises:
        TbpsError: bad shapes, ``top`` with another row count than the queries, or no query has a match.
    """
    _check_embeddings(text_emb, image_emb, image_vectors)
    top = np.asarray(top)
    if top.ndim != 2 or top.shape[0] != text_emb.shape[0] or top.shape[1] < 1 or top.shape[1] > image_emb.shape[0]:
        raise TbpsError(f"top must be (queries={text_emb.shape[0]}, k <= {image_emb.shape[0]})", field="top", value=tuple(top.shape))
    order = rerank_order(top, top_scores)
    q_codes, g_codes = _pid_codes(query_pids, gallery_pids, text_emb.shape[0], image_emb.shape[0])
    acc = _Accumulator(q_codes, g_codes)
    rows = _rows_per_block(chunk_size, image_emb.shape[0], image_vectors)
    for start, block in _similarity_blocks(text_emb, image_emb, rows, image_vectors):
        acc.add(start, _reranked_block(block, order[start : start + len(block)]))
    return acc.result(per_query)
