"""How well a selection removes the synthetic world's defects (``tbps select --truth``).

The world's ``pool/truth.parquet`` (``columns.TRUTH_SCHEMA``) says which pairs are defective
and how (``columns.DEFECT_*``, ``none`` for clean pairs). Against a selection's per-row outcome:

* **precision** of the removal: the share of removed pairs that are defective;
* **recall**: the share of defective pairs that were removed (overall and per defect kind);
* for duplicates, **resolved**: the share of duplicate pairs of which the copy *or* its
  original is gone (which member of a duplicate group the truth calls the defect is arbitrary;
  de-duplication keeps the better-scored one, which may be the copy). Needs ``duplicate_of``;
* **AUROC** of ``score`` and of ``bank_rank`` as defect detectors: the probability that a
  defective pair looks worse than a clean one (a lower score; a higher bank rank), ties counting
  one half. Computed per kind against all clean pairs, and overall. Pairs without a score
  (status not ok) are left out of the AUROC and counted.

AUROC is the Mann-Whitney U statistic divided by ``n_pos * n_neg``, from average ranks, so
ties are handled exactly; no scikit-learn.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.errors import TbpsError


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks.

    Args:
        values: a 1-d array without NaN.

    Returns:
        float64 ranks, aligned with ``values``.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    _, first, counts = np.unique(ordered, return_index=True, return_counts=True)
    # A tie group occupying 1-based ranks first+1 .. first+count has mean rank first + (count+1)/2.
    ranks_sorted = np.repeat(first + (counts + 1) / 2.0, counts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """The area under the ROC curve of a detector that calls higher values positive.

    Args:
        positive: detector values of the positive (defective) items.
        negative: detector values of the negative (clean) items.

    Returns:
        ``U / (n_pos * n_neg)`` with U the Mann-Whitney statistic (ties count one half), or
        None when either side is empty.
    """
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(np.concatenate([positive, negative]))
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


DUPLICATE_KINDS = (C.DEFECT_EXACT_DUP, C.DEFECT_NEAR_DUP)


def truth_metrics(outcome: pl.DataFrame, truth: pl.DataFrame) -> dict:
    """Precision, recall and AUROCs of a selection against the defect ground truth.

    Args:
        outcome: one row per input row with ``pair_id``, ``score``, ``bank_rank`` and ``step``
            (null for kept rows), as :attr:`tbps.curate.select.Selection.outcome`.
        truth: ``pair_id`` and ``defect`` (``none`` or a defect kind) per pool pair.

    Returns:
        ``{"matched", "unmatched_rows", "truth_rows_missing", "overall": {...}, "relevance": {...},
        "kinds": {kind: {...}}, "steps": {step: {"removed", "defective", "precision"}}}``;
        ``relevance`` is the defects a relevance score can see (all but the duplicates) against
        the clean pairs.

    Raises:
        TbpsError: when no input row has a truth entry, or the truth repeats a pair_id.
    """
    if truth.get_column(C.PAIR_ID).n_unique() < truth.height:
        raise TbpsError("the truth sidecar repeats pair_ids", field=C.PAIR_ID)
    has_dup = C.DUPLICATE_OF in truth.columns
    joined = outcome.select(C.PAIR_ID, C.SCORE, C.BANK_RANK, C.STEP).join(
        truth.select(C.PAIR_ID, C.DEFECT, *([C.DUPLICATE_OF] if has_dup else [])), on=C.PAIR_ID, how="left"
    )
    if has_dup:
        gone = outcome.select(pl.col(C.PAIR_ID).alias(C.DUPLICATE_OF), pl.col(C.STEP).is_not_null().alias("_original_gone"))
        joined = joined.join(gone, on=C.DUPLICATE_OF, how="left")
    matched = joined.filter(pl.col(C.DEFECT).is_not_null())
    if matched.height == 0:
        raise TbpsError(
            "no pair_id of the score table is in the truth sidecar",
            field=C.PAIR_ID,
            value=outcome.get_column(C.PAIR_ID)[0] if outcome.height else None,
            hint="--truth takes the pool/truth.parquet of the world the scored pool came from",
        )
    defect = matched.get_column(C.DEFECT).to_numpy()
    removed = matched.get_column(C.STEP).is_not_null().to_numpy()
    step = matched.get_column(C.STEP).to_numpy()
    score = matched.get_column(C.SCORE).cast(pl.Float64).fill_nan(None).to_numpy()
    rank = matched.get_column(C.BANK_RANK).cast(pl.Float64).to_numpy()
    scored = ~np.isnan(score) & ~np.isnan(rank)
    bad = defect != C.DEFECT_NONE
    clean = ~bad

    def detectors(pos: np.ndarray) -> dict:
        # Lower scores and higher bank ranks should mark the defects; clean scored pairs are the negatives.
        neg = clean & scored
        pos = pos & scored
        return {"auroc_score": auroc(-score[pos], -score[neg]), "auroc_bank_rank": auroc(rank[pos], rank[neg])}

    tp = int((removed & bad).sum())
    overall = {
        "pairs": int(len(defect)),
        "defective": int(bad.sum()),
        "removed": int(removed.sum()),
        "removed_defective": tp,
        "removed_clean": int((removed & clean).sum()),
        "precision": _ratio(tp, int(removed.sum())),
        "recall": _ratio(tp, int(bad.sum())),
        "unscored": int((~scored).sum()),
        **detectors(bad),
    }
    # What a relevance score can see: every defect but the duplicates (de-duplication's job, judged by its recall).
    relevant = bad & ~np.isin(defect, DUPLICATE_KINDS)
    relevance = {"defective": int(relevant.sum()), "removed": int((relevant & removed).sum()),
                 "recall": _ratio(int((relevant & removed).sum()), int(relevant.sum())), **detectors(relevant)}
    kinds = {}
    known = [k for k in C.DEFECT_KINDS if (defect == k).any()]
    extra = sorted(set(defect[bad].tolist()) - set(C.DEFECT_KINDS))
    original_gone = matched.get_column("_original_gone").fill_null(False).to_numpy() if has_dup else None
    has_original = matched.get_column(C.DUPLICATE_OF).is_not_null().to_numpy() if has_dup else None
    for kind in known + extra:
        mask = defect == kind
        kinds[kind] = {
            "pairs": int(mask.sum()),
            "removed": int((mask & removed).sum()),
            "recall": _ratio(int((mask & removed).sum()), int(mask.sum())),
            "unscored": int((mask & ~scored).sum()),
            **detectors(mask),
        }
        if has_dup and kind in (C.DEFECT_EXACT_DUP, C.DEFECT_NEAR_DUP):
            dup = mask & has_original
            kinds[kind]["resolved"] = _ratio(int((dup & (removed | original_gone)).sum()), int(dup.sum()))
    steps = {}
    for name in sorted(set(step[removed].tolist())):
        at = step == name
        steps[name] = {
            "removed": int(at.sum()),
            "defective": int((at & bad).sum()),
            "precision": _ratio(int((at & bad).sum()), int(at.sum())),
        }
    return {
        "matched": int(matched.height),
        "unmatched_rows": int(joined.height - matched.height),
        "truth_rows_missing": int(truth.height - matched.height),
        "overall": overall,
        "relevance": relevance,
        "kinds": kinds,
        "steps": steps,
    }
