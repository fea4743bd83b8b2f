"""De-duplication for ``tbps select``: exact keys and near-duplicate embeddings.

Rows are always handled in *best-first order*: position 0 is the row selection prefers most
(see :func:`tbps.curate.select.order_columns`). Every function here speaks in those positions,
so "keep the best member" is "keep the lowest position".

Exact duplicates (:func:`exact_duplicates`)
    Rows with equal keys (an image content hash, a normalised caption, or both) form a group;
    the first row of the group is kept and every other member is a duplicate of it. Equality is
    an equivalence, so groups need no further care. Null keys never match anything.

Near duplicates (:func:`near_duplicate_pairs`, :func:`greedy_keep`)
    Two rows are near duplicates when the cosine of their embeddings is ``>= threshold``.
    Similarity is not transitive (A~B and B~C with A and C far apart), so groups are resolved
    *greedily in best-first order*: a row is kept unless it is a near duplicate of a row that
    was kept before it; a dropped row names the best kept row it duplicates. This is the
    unique result of that greedy pass, computed in vectorised rounds rather than a row loop,
    and it never drops a row because of a row that was itself dropped (unlike connected
    components, which would drop C above).

    Finding the pairs: below ``exact_below`` rows, an exact blocked matrix product. Above it,
    a SemDeDup-style search: a random orthogonal projection to ``project_dim`` (32)
    dimensions, spherical k-means (FAISS) on a sample, each row assigned to its ``probes`` (5)
    nearest centroids, and products only between a cluster's members and the rows that probe
    that cluster. Candidates pass a looser threshold in the projected space (four standard
    deviations of the projection's error below ``threshold``) and are then checked with the
    full embeddings, so every reported pair truly has cosine ``>= threshold`` (no false
    positives). A pair is missed only when neither row's nearest centroid is among the
    other's probes; ``bench/dedup.py`` measures that recall against exact search on random
    unit vectors, the hardest case for clustering. Results are deterministic for a given
    input, seed and thread count (BLAS rounding can move a centroid assignment at a tie).
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl

# Near-duplicate search defaults; see the module docstring and bench/dedup.py.
EXACT_BELOW = 20_000
PROBES = 5
PROJECT_DIM = 32
TRAIN_POINTS_PER_CLUSTER = 16
KMEANS_ITERATIONS = 6
BLOCK = 2048  # rows per matrix product
COLUMN_BLOCK = 16_384  # columns per matrix product (a product is at most 128 MiB)

_UNDECIDED, _KEPT, _DROPPED = 0, 1, 2


# One pass: a run of two or more punctuation/whitespace characters, a single punctuation
# character, or a single whitespace character other than a plain space becomes one space
# (single spaces are left alone, so most of the text needs no rewriting).
_SEPARATORS = r"[\p{P}\s]{2,}|\p{P}|[^\S ]"
NORMALISATION = "lowercase, punctuation to spaces, whitespace collapsed, stripped"  # what normalise_caption does, for records


def normalise_caption(caption: pl.Expr) -> pl.Expr:
    """Caption text as compared by exact de-duplication.

    Lowercased; every Unicode punctuation character becomes a space; runs of whitespace become
    one space; leading and trailing spaces are removed. ``"A man, in RED."`` and
    ``"a man in red"`` normalise to the same text.

    Args:
        caption: a string expression.

    Returns:
        The normalised string expression.
    """
    return caption.str.to_lowercase().str.replace_all(_SEPARATORS, " ").str.strip_chars(" ")


def caption_key(normalised: pl.Expr, name: str) -> list[pl.Expr]:
    """A 128-bit key of a normalised caption: two 64-bit hashes with different seeds.

    Grouping by the key instead of the text keeps memory flat on tens of millions of rows; the
    chance that two different captions share both hashes is about n^2 / 2^129 (below 1e-24
    for 10 million captions). Hashes are stable within one Polars version. A null caption
    hashes to a constant: pair the key with ``caption.is_not_null()``.

    Args:
        normalised: the normalised caption (:func:`normalise_caption`), computed once.
        name: prefix of the two key columns (``name_0``, ``name_1``).

    Returns:
        Two UInt64 expressions.
    """
    return [normalised.hash(seed=s).alias(f"{name}_{s}") for s in (0, 1)]


def exact_duplicates(w0: np.ndarray, w1: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members of exact-duplicate groups that are not their group's first row.

    Rows are positions ``0 .. n-1`` in best-first order; two rows are duplicates when both
    64-bit key words are equal and both rows are valid. Most rows are unique, so one value
    sort of ``(high 32 bits of w0, position)`` packed in 64 bits finds the few rows that share
    32 key bits with another row; only those are grouped on the full 128-bit key.

    Args:
        w0: first key word (uint64) of each row.
        w1: second key word (uint64) of each row.
        valid: rows whose key exists (null keys never match).

    Returns:
        ``(dropped, kept_as)``: positions of the duplicates and, for each, the position of its
        group's first row.
    """
    idx = np.flatnonzero(valid).astype(np.uint64)
    if len(idx) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(valid) >= 2**32:
        raise ValueError("exact_duplicates handles fewer than 2**32 rows")
    low = np.uint64(0xFFFFFFFF)
    packed = np.sort((w0[idx] & ~low) | idx)
    high = packed >> np.uint64(32)
    same = high[1:] == high[:-1]
    shared = np.zeros(len(packed), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    pos = (packed[shared] & low).astype(np.int64)
    if len(pos) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = pl.DataFrame({"pos": pos, "w0": w0[pos], "w1": w1[pos]}).select(pl.col("pos").min().over("w0", "w1")).to_series().to_numpy()
    dup = pos != first
    return pos[dup], first[dup].astype(np.int64)


def as_unit_float32(x: np.ndarray) -> np.ndarray:
    """Embeddings as float32 rows of unit length (stored float16 rows are only nearly so).

    Args:
        x: an ``(n, d)`` array.

    Returns:
        A new float32 array; all-zero rows stay zero.
    """
    x = np.asarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def default_clusters(n: int, probes: int = PROBES) -> int:
    """The k-means cluster count for ``n`` rows: about ``sqrt(2 * probes * n)``.

    It balances the two costs of the search: assigning rows to centroids grows with
    ``n * k``, comparing within clusters with ``probes * n^2 / k`` (the comparison costs about
    twice as much per entry, for thresholding the products).

    Args:
        n: rows to search.
        probes: centroids each row is compared through.

    Returns:
        The cluster count, at least 1 and at most ``n // 8`` (or 1 for tiny inputs).
    """
    return int(max(1, min(max(1, n // 8), round(np.sqrt(2 * probes * n)))))


def _pairs_exact(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """All ``i < j`` with ``x_i . x_j >= threshold``, by blocked matrix products."""
    n = len(x)
    out_i, out_j = [], []
    for r0 in range(0, n, BLOCK):
        rows = x[r0 : r0 + BLOCK]
        # Upper triangle only: each row block against itself and every later row, in column blocks.
        for c0 in range(r0, n, COLUMN_BLOCK):
            r, c = np.nonzero(rows @ x[c0 : c0 + COLUMN_BLOCK].T >= threshold)
            r, c = r + r0, c + c0
            upper = c > r
            out_i.append(r[upper])
            out_j.append(c[upper])
    return _canonical(np.concatenate(out_i), np.concatenate(out_j), n)


def _canonical(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as ``i < j``, each once, sorted by ``(i, j)``."""
    lo = np.minimum(i, j).astype(np.int64)
    hi = np.maximum(i, j).astype(np.int64)
    code = np.unique(lo * n + hi)
    return code // n, code % n


def _csr(labels: np.ndarray, members: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Group ``members`` by ``labels`` (stable): the sorted members and the group offsets."""
    order = np.argsort(labels, kind="stable")
    ptr = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(labels, minlength=k), out=ptr[1:])
    return members[order], ptr


def _pairs_clustered(
    x: np.ndarray, threshold: float, *, n_clusters: int | None, probes: int, project_dim: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Candidate pairs within k-means clusters, verified exactly; see the module docstring."""
    import faiss  # heavy import (numpy-SWIG bindings); only searches above exact_below rows need it

    n, d = x.shape
    rng = np.random.default_rng(seed)
    if project_dim and project_dim < d:
        q, _ = np.linalg.qr(rng.standard_normal((d, project_dim)))
        y = as_unit_float32(x @ q.astype(np.float32))
        # A random projection to d' dimensions moves a close pair's cosine by about
        # 2 (1 - cos) / sqrt(d') (one standard deviation); the margin is four of them.
        loose = max(-1.0, threshold - 8.0 / np.sqrt(project_dim) * (1.0 - threshold))
    else:
        y, loose, project_dim = x, threshold, d
    k = int(min(n, n_clusters or default_clusters(n, probes)))
    probes = int(min(probes, k))
    t0 = time.perf_counter()
    sample = np.sort(rng.choice(n, size=min(n, k * TRAIN_POINTS_PER_CLUSTER), replace=False))
    km = faiss.Kmeans(
        project_dim, k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
        min_points_per_centroid=1, max_points_per_centroid=10**9, verbose=False,
    )
    km.train(np.ascontiguousarray(y[sample]))
    t1 = time.perf_counter()
    index = faiss.IndexFlatIP(project_dim)
    index.add(km.centroids)
    _, nearest = index.search(y, probes)
    home = nearest[:, 0].astype(np.int64)
    members, mptr = _csr(home, np.arange(n, dtype=np.int64), k)
    probers, pptr = _csr(nearest.ravel().astype(np.int64), np.repeat(np.arange(n, dtype=np.int64), probes), k)
    t2 = time.perf_counter()
    out_i, out_j = [], []
    candidates = 0
    for c in range(k):
        a = members[mptr[c] : mptr[c + 1]]
        b = probers[pptr[c] : pptr[c + 1]]
        if len(a) == 0 or len(b) < 2:
            continue  # nothing to compare in this cluster
        # Blocks on both sides keep one product small however unbalanced k-means is.
        for c0 in range(0, len(b), COLUMN_BLOCK):
            cols = b[c0 : c0 + COLUMN_BLOCK]
            yb = y[cols].T
            for r0 in range(0, len(a), BLOCK):
                rows = a[r0 : r0 + BLOCK]
                sims = y[rows] @ yb
                # Most rows have no candidate: find the few that do before listing entries.
                hot = np.flatnonzero(sims.max(axis=1) >= loose)
                r, cc = np.nonzero(sims[hot] >= loose)
                i, j = rows[hot[r]], cols[cc]
                keep = i != j
                i, j = i[keep], j[keep]
                candidates += len(i)
                if loose < threshold and len(i):
                    # Candidates from the projection are checked on the full embeddings here.
                    exact = np.einsum("ij,ij->i", x[i], x[j]) >= threshold
                    i, j = i[exact], j[exact]
                out_i.append(i)
                out_j.append(j)
    i = np.concatenate(out_i) if out_i else np.zeros(0, np.int64)
    j = np.concatenate(out_j) if out_j else np.zeros(0, np.int64)
    i, j = _canonical(i, j, n)
    t3 = time.perf_counter()
    stats = {
        "method": "clustered",
        "clusters": k,
        "probes": probes,
        "project_dim": project_dim,
        "largest_cluster": int(np.diff(mptr).max()),
        "candidates": int(candidates),
        "seconds": {"kmeans": round(t1 - t0, 3), "assign": round(t2 - t1, 3), "compare": round(t3 - t2, 3)},
    }
    return (i, j), stats


def near_duplicate_pairs(
    x: np.ndarray,
    threshold: float,
    *,
    exact_below: int = EXACT_BELOW,
    n_clusters: int | None = None,
    probes: int = PROBES,
    project_dim: int = PROJECT_DIM,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pairs of rows whose embeddings have cosine ``>= threshold``.

    Args:
        x: ``(n, d)`` embeddings (any float dtype; rows are re-normalised in float32).
        threshold: the cosine at or above which two rows are near duplicates.
        exact_below: below this many rows, search exactly (a blocked matrix product).
        n_clusters: k-means clusters for the approximate search (default
            :func:`default_clusters`).
        probes: the nearest centroids each row is compared through.
        project_dim: the dimension candidates are found in (no projection when ``d`` is not
            larger); verified pairs always use the full embeddings.
        seed: seeds the projection, the k-means sample and its initialisation.

    Returns:
        ``(i, j, stats)``: int64 arrays with ``i < j``, sorted, each pair once; ``stats`` says
        which method ran and with which parameters.
    """
    x = as_unit_float32(x)
    n = len(x)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), {"method": "exact"}
    if n < exact_below:
        i, j = _pairs_exact(x, threshold)
        return i, j, {"method": "exact"}
    (i, j), stats = _pairs_clustered(x, threshold, n_clusters=n_clusters, probes=probes, project_dim=project_dim, seed=seed)
    return i, j, stats


# The nearest-neighbour summary of a near-duplicate step that removed most of its input.
NN_QUERIES = 2_000
NN_REFERENCE = 50_000
NN_QUANTILES = {"p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}


def nearest_similarity(xs: list[np.ndarray], *, queries: int = NN_QUERIES, reference: int = NN_REFERENCE, seed: int = 0) -> tuple[np.ndarray, int]:
    """The highest cosine of each of a sample of rows to any other row (the nearest neighbour).

    With several embeddings per row (image and caption), two rows are as similar as their
    least similar embedding, as near de-duplication with ``--dedup pair`` judges them. Above
    ``reference`` rows, the neighbours are looked for among a random ``reference`` of them, so
    the cosines are then a lower bound.

    Args:
        xs: ``(n, d)`` embeddings, one array per modality (rows are re-normalised).
        queries: rows whose nearest neighbour is measured (a random sample above this).
        reference: rows searched for neighbours (a random sample above this).
        seed: seeds both samples.

    Returns:
        ``(cosines, reference rows searched)``: one cosine per sampled row (``-1`` for a single row).
    """
    n = len(xs[0])
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(n, size=min(n, queries), replace=False))
    r = np.arange(n) if n <= reference else np.sort(rng.choice(n, size=reference, replace=False))
    left = [as_unit_float32(x[q]) for x in xs]
    best = np.full(len(q), -1.0, dtype=np.float32)
    for c0 in range(0, len(r), COLUMN_BLOCK):
        cols = r[c0 : c0 + COLUMN_BLOCK]
        sims = None
        for x, lq in zip(xs, left):
            s = lq @ as_unit_float32(x[cols]).T
            sims = s if sims is None else np.minimum(sims, s)
        sims[q[:, None] == cols[None, :]] = -np.inf  # a row is not its own neighbour
        best = np.maximum(best, sims.max(axis=1))
    return best, len(r)


def nearest_similarity_summary(xs: list[np.ndarray], threshold: float, **kwargs) -> dict:
    """Quantiles of :func:`nearest_similarity` and the share of sampled rows at or above ``threshold``.

    Returns:
        ``{"queries", "reference", "p5", "p25", "median", "p75", "p95", "share_at_threshold"}``,
        cosines rounded to 4 decimals (the summary goes into the manifest's metadata).
    """
    best, searched = nearest_similarity(xs, **kwargs)
    values = np.quantile(best.astype(np.float64), list(NN_QUANTILES.values()))
    return {
        "queries": int(len(best)),
        "reference": int(searched),
        **{k: round(float(v), 4) for k, v in zip(NN_QUANTILES, values)},
        "share_at_threshold": round(float((best >= threshold).mean()), 4),
    }


def greedy_keep(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Greedy near-duplicate resolution in best-first order.

    Walking positions ``0, 1, ...``, a row is kept unless one of its near duplicates was kept
    before it. The walk is computed in rounds over the pair list: each round drops every
    undecided row with a kept better neighbour, then keeps every undecided row whose better
    neighbours are all dropped. The best undecided row is always decided in a round, so the
    loop ends; it takes as many rounds as the longest keep/drop chain (a few, in practice).

    Args:
        n: the number of rows (positions ``0 .. n-1``).
        i: one end of each near-duplicate pair.
        j: the other end.

    Returns:
        An int64 array ``dup_of`` of length ``n``: ``-1`` for kept rows; for a dropped row, the
        position of the best kept row it is a near duplicate of.
    """
    better = np.minimum(i, j).astype(np.int64)
    worse = np.maximum(i, j).astype(np.int64)
    state = np.full(n, _KEPT, dtype=np.int8)
    state[worse] = _UNDECIDED  # rows without a better neighbour are kept outright
    while True:
        open_pairs = state[worse] == _UNDECIDED
        if not open_pairs.any():
            break
        b, w = better[open_pairs], worse[open_pairs]
        # A kept better neighbour settles a row: it is dropped.
        state[w[state[b] == _KEPT]] = _DROPPED
        still = state[w] == _UNDECIDED
        b, w = b[still], w[still]
        # What is left blocking a row are undecided better neighbours; with none, it is kept.
        blocking = np.bincount(w[state[b] == _UNDECIDED], minlength=n)
        rows = np.unique(w)
        state[rows[blocking[rows] == 0]] = _KEPT
    dup_of = np.full(n, -1, dtype=np.int64)
    hit = (state[better] == _KEPT) & (state[worse] == _DROPPED)
    # The best kept neighbour: minimum over the pairs that justify the drop.
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, worse[hit], better[hit])
    gone = state == _DROPPED
    dup_of[gone] = best[gone]
    return dup_of
