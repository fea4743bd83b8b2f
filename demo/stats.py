"""The demo's statistics: per-query retrieval values and bootstrap intervals over test identities.

A claim such as "filtered 40% beats the full pool on R@1" is judged on an interval, not on one
number. The unit resampled is the *test identity*: the queries of one person are not
independent of each other (they share the person's gallery images), so resampling queries would
make the intervals too narrow. The training seeds are resampled too (a two-level bootstrap), so
an interval holds the seed-to-seed variation as well as the test set's: each draw uses the same
identities for every seed (and for both arms of a paired difference, whose seeds pair up).

For the value ``v[s, q]`` of query ``q`` (of identity ``g(q)``) under seed ``s``, a draw picks identities
``i_1 .. i_n`` (``n`` = number of test identities, with replacement), then seeds ``t_1 .. t_m`` (``m`` =
number of seeds, with replacement), and its statistic is::

    mean over k of  sum_j S[t_k, i_j] / sum_j N[i_j]

with ``S[s, i]`` the sum of ``v[s, q]`` over the queries of identity ``i`` and ``N[i]`` their
count: the mean over the drawn queries, an identity drawn twice counted twice. The interval is
the percentile interval of the draws' statistics. (With ``resample_seeds=False`` every draw takes
each seed once: the interval of the test set's variation alone.)

Everything here is numpy over arrays (no torch, no file I/O); :func:`query_values` turns the
``per_query`` outcome of ``tbps.eval.metrics.retrieval_metrics(per_query=True)`` (or of
``tbps.eval.evaluate.evaluate(per_query=True)``) into the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The metric names of ``tbps.eval.metrics.METRIC_KEYS`` (not imported: that module loads torch).
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
_CMC_KS = (1, 5, 10)

BETTER = "better"
WORSE = "worse"
WITHIN_NOISE = "within noise"


def query_values(per_query: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each evaluated query's R@1/5/10, AP and INP, in percent, in query order.

    The mean of ``R1`` over the returned queries is the aggregate R@1 of the same evaluation, and
    so on for every metric (mAP and mINP up to float rounding: the aggregate sums the fractions
    before scaling them by 100).

    Args:
        per_query: ``{"first_rank", "ap", "inp", "evaluated"}`` arrays, one entry per query (the
            ``per_query`` of ``retrieval_metrics`` or ``evaluate``); other keys are ignored except
            ``person_id``, which is passed through for the kept queries.

    Returns:
        ``{"R1", "R5", "R10": 0.0 or 100.0 per query, "mAP": 100 * ap, "mINP": 100 * inp}``
        (float64) over the evaluated queries only, plus ``"index"`` (int64: the positions of
        those queries in the input) and, when the input has it, ``"person_id"`` of those queries
        (the ``groups`` of :func:`bootstrap_mean`). Evaluations of the same test data (every
        seed and arm) keep the same queries; compare their ``index`` before pairing them.

    Raises:
        ValueError: the arrays differ in length.
    """
    evaluated = np.asarray(per_query["evaluated"], dtype=bool)
    first_rank = np.asarray(per_query["first_rank"], dtype=np.int64)
    ap = np.asarray(per_query["ap"], dtype=np.float64)
    inp = np.asarray(per_query["inp"], dtype=np.float64)
    if not (len(evaluated) == len(first_rank) == len(ap) == len(inp)):
        raise ValueError(
            f"per_query arrays differ in length: evaluated {len(evaluated)}, first_rank {len(first_rank)}, "
            f"ap {len(ap)}, inp {len(inp)}"
        )
    index = np.flatnonzero(evaluated)
    rank = first_rank[index]
    values = {f"R{k}": np.where(rank <= k, 100.0, 0.0) for k in _CMC_KS}
    values["mAP"] = 100.0 * ap[index]
    values["mINP"] = 100.0 * inp[index]
    values["index"] = index
    if "person_id" in per_query:
        values["person_id"] = np.asarray(per_query["person_id"], dtype=object)[index]
    return values


def bootstrap_mean(
    values_by_seed: Sequence[np.ndarray],
    groups: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    resample_seeds: bool = True,
) -> dict[str, Any]:
    """Mean of a per-query value over seeds, with a percentile bootstrap interval over identities and seeds.

    Args:
        values_by_seed: ``values_by_seed[s][q]``: the value of query ``q`` under training seed
            ``s`` (every seed on the same queries, in the same order).
        groups: ``groups[q]``: the test identity of query ``q`` (strings or numbers). The draws
            number the identities in the sorted order of these labels.
        n_boot: bootstrap draws.
        seed: seed of the draws; the same seed gives the same interval.
        level: coverage of the interval (0.95: the 2.5th to the 97.5th percentile).
        resample_seeds: draw the seeds with replacement too (the default), or take each once.

    Returns:
        ``{"mean", "lo", "hi", "std"}``: the mean over seeds of the per-seed query means, the
        interval's ends, and the sample std of the per-seed means (``None`` for one seed).

    Raises:
        ValueError: no seeds or no queries, seeds of different lengths, ``groups`` of another
            length, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    values = _stack(values_by_seed, "values_by_seed")
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != values.shape[1]:
        raise ValueError(f"groups has shape {groups.shape} but there are {values.shape[1]} queries")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_seeds = values.shape[0]

    _, ident = np.unique(groups, return_inverse=True)
    ident = ident.reshape(-1)
    n_ids = int(ident.max()) + 1
    counts = np.bincount(ident, minlength=n_ids).astype(np.float64)
    # Per-identity sums of every seed in one bincount: seed s's identities are offset by s * n_ids.
    offset = (np.arange(n_seeds)[:, None] * n_ids + ident[None, :]).ravel()
    sums = np.bincount(offset, weights=values.ravel(), minlength=n_seeds * n_ids).reshape(n_seeds, n_ids)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_ids, size=(n_boot, n_ids))
    # How often each identity was drawn, per draw: the statistic is linear in these multiplicities.
    times = np.bincount((np.arange(n_boot)[:, None] * n_ids + draws).ravel(), minlength=n_boot * n_ids)
    times = times.reshape(n_boot, n_ids).astype(np.float64)
    per_draw = (times @ sums.T) / (times @ counts)[:, None]  # [draw, seed]: each seed's mean over the drawn queries
    if resample_seeds and n_seeds > 1:
        per_draw = np.take_along_axis(per_draw, rng.integers(0, n_seeds, size=(n_boot, n_seeds)), axis=1)
    stat = per_draw.mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stat, [tail, 1.0 - tail])

    per_seed = values.mean(axis=1)
    return {
        "mean": float(per_seed.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "std": float(per_seed.std(ddof=1)) if n_seeds > 1 else None,
    }


def paired_difference(
    a_by_seed: Sequence[np.ndarray],
    b_by_seed: Sequence[np.ndarray],
    groups: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    resample_seeds: bool = True,
) -> dict[str, Any]:
    """``a - b`` query by query and seed by seed, with the interval of :func:`bootstrap_mean`.

    Args:
        a_by_seed: per-seed per-query values of arm ``a``.
        b_by_seed: the same of arm ``b``: seed ``s`` of ``b`` pairs with seed ``s`` of ``a``, on the
            same queries in the same order.
        groups: the test identity of each query.
        n_boot: bootstrap draws.
        seed: seed of the draws.
        level: coverage of the interval.
        resample_seeds: as for :func:`bootstrap_mean` (the seed pairs are drawn together).

    Returns:
        ``{"mean", "lo", "hi", "std", "per_seed"}``: :func:`bootstrap_mean` of the differences,
        and ``per_seed`` the mean difference of each seed (a list of floats).

    Raises:
        ValueError: the arms differ in seeds or queries, or as for :func:`bootstrap_mean`.
    """
    a = _stack(a_by_seed, "a_by_seed")
    b = _stack(b_by_seed, "b_by_seed")
    if a.shape != b.shape:
        raise ValueError(f"the arms are not paired: a has {a.shape} (seeds, queries), b has {b.shape}")
    diff = a - b
    res = bootstrap_mean(list(diff), groups, n_boot=n_boot, seed=seed, level=level, resample_seeds=resample_seeds)
    res["per_seed"] = [float(m) for m in diff.mean(axis=1)]
    return res


def verdict(interval: Mapping[str, float], *, margin: float = 0.0) -> str:
    """The reading of a difference's interval.

    Args:
        interval: ``{"lo", "hi"}`` of a difference (``a - b``), e.g. from :func:`paired_difference`.
        margin: the smallest difference that counts; 0 (the default) judges against zero.

    Returns:
        ``"better"`` if ``lo > margin``, ``"worse"`` if ``hi < -margin``, ``"within noise"``
        otherwise.
    """
    if interval["lo"] > margin:
        return BETTER
    if interval["hi"] < -margin:
        return WORSE
    return WITHIN_NOISE


def non_inferior(interval: Mapping[str, float], margin: float) -> bool:
    """Whether ``a`` is no worse than ``b`` by more than ``margin``: ``lo > -margin``.

    Args:
        interval: ``{"lo", "hi"}`` of ``a - b``.
        margin: the loss still tolerated (in the metric's units, e.g. 1.0 R@1 points).

    Returns:
        True when the whole interval lies above ``-margin``.
    """
    return bool(interval["lo"] > -margin)


def _stack(values_by_seed: Sequence[np.ndarray], what: str) -> np.ndarray:
    """[seeds x queries] float64 array of per-seed value arrays, checked to be one rectangle."""
    if len(values_by_seed) == 0:
        raise ValueError(f"{what} holds no seed")
    arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values_by_seed]
    lengths = {len(v) for v in arrays}
    if len(lengths) != 1:
        raise ValueError(f"{what}: the seeds have different numbers of queries {sorted(lengths)}")
    if 0 in lengths:
        raise ValueError(f"{what} has no query")
    return np.stack(arrays)
