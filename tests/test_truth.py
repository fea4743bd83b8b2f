"""Truth metrics of ``tbps select --truth``: AUROC with ties, precision and recall by defect kind."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tbps import columns as C
from tbps.curate.truth import auroc, average_ranks, truth_metrics
from tbps.errors import TbpsError


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize(
    ("pos", "neg", "want"),
    [
        ([3, 4], [1, 2], 1.0),  # perfect
        ([1, 2], [3, 4], 0.0),  # perfectly wrong
        ([1, 1], [1, 1], 0.5),  # all tied
        # pairs (p, n): (2,1)=1 (2,2)=.5 (2,3)=0 (3,1)=1 (3,2)=1 (3,3)=.5 -> 4 / 6
        ([2, 3], [1, 2, 3], 4 / 6),
        ([5], [], None),
    ],
)
def test_auroc_hand_checked(pos, neg, want):
    got = auroc(np.array(pos, float), np.array(neg, float))
    assert got == pytest.approx(want) if want is not None else got is None


def test_auroc_equals_pair_counting_on_random_ties():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 50).astype(float), rng.integers(0, 5, 70).astype(float)
    by_pairs = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (50 * 70)
    assert auroc(pos, neg) == pytest.approx(by_pairs)


def _outcome():
    # p0..p5: two clean kept, one clean dropped, a blank image dropped, a swap kept, a dup dropped.
    return pl.DataFrame(
        {
            C.PAIR_ID: ["p0", "p1", "p2", "p3", "p4", "p5"],
            C.SCORE: [0.9, 0.8, 0.5, 0.1, 0.8, 0.7],
            C.BANK_RANK: [0, 1, 5, 9, 1, 2],
            C.STEP: [None, None, "min-score", "min-score", None, "exact-image"],
        },
        schema_overrides={C.SCORE: pl.Float32, C.BANK_RANK: pl.Int32},
    )


def _truth(extra=()):
    return pl.DataFrame(
        {
            C.PAIR_ID: ["p0", "p1", "p2", "p3", "p4", "p5", *extra],
            C.DEFECT: ["none", "none", "none", C.DEFECT_BLANK, C.DEFECT_SWAPPED, C.DEFECT_EXACT_DUP, *["none"] * len(extra)],
        }
    )


def test_truth_metrics_on_a_tiny_pool():
    m = truth_metrics(_outcome(), _truth(extra=("gone",)))
    o = m["overall"]
    assert (o["defective"], o["removed"], o["removed_defective"], o["removed_clean"]) == (3, 3, 2, 1)
    assert o["precision"] == pytest.approx(2 / 3) and o["recall"] == pytest.approx(2 / 3)
    # score: defects (0.1, 0.8, 0.7) vs clean (0.9, 0.8, 0.5); lower is worse.
    # blank 0.1 is below all 3; swap 0.8 is below 0.9, tied with 0.8, above 0.5 -> 1.5; dup 0.7: 2 -> 6.5 / 9
    assert o["auroc_score"] == pytest.approx(6.5 / 9)
    # bank_rank: defects (9, 1, 2) vs clean (0, 1, 5); higher is worse: 3 + (1 + .5) + 2 = 6.5 / 9
    assert o["auroc_bank_rank"] == pytest.approx(6.5 / 9)
    assert m["kinds"][C.DEFECT_BLANK] == {"pairs": 1, "removed": 1, "recall": 1.0, "unscored": 0, "auroc_score": 1.0, "auroc_bank_rank": 1.0}
    assert m["kinds"][C.DEFECT_SWAPPED]["recall"] == 0.0
    assert m["kinds"][C.DEFECT_SWAPPED]["auroc_score"] == pytest.approx(1.5 / 3)
    assert m["steps"]["min-score"] == {"removed": 2, "defective": 1, "precision": 0.5}
    assert m["steps"]["exact-image"]["precision"] == 1.0
    assert (m["matched"], m["unmatched_rows"], m["truth_rows_missing"]) == (6, 0, 1)


def test_truth_metrics_refuses_a_truth_of_another_pool():
    other = pl.DataFrame({C.PAIR_ID: ["x"], C.DEFECT: ["none"]})
    with pytest.raises(TbpsError, match="no pair_id of the score table is in the truth"):
        truth_metrics(_outcome(), other)


def test_a_duplicate_is_resolved_when_its_copy_or_its_original_is_gone():
    # d1 copies p0 (both kept: unresolved); d2 copies p1 and p1 went instead: resolved.
    outcome = pl.DataFrame(
        {C.PAIR_ID: ["p0", "p1", "d1", "d2"], C.SCORE: [0.5] * 4, C.BANK_RANK: [0] * 4, C.STEP: [None, "exact-image", None, None]},
        schema_overrides={C.SCORE: pl.Float32, C.BANK_RANK: pl.Int32},
    )
    truth = pl.DataFrame(
        {
            C.PAIR_ID: ["p0", "p1", "d1", "d2"],
            C.DEFECT: ["none", "none", C.DEFECT_EXACT_DUP, C.DEFECT_EXACT_DUP],
            C.DUPLICATE_OF: [None, None, "p0", "p1"],
        }
    )
    k = truth_metrics(outcome, truth)["kinds"][C.DEFECT_EXACT_DUP]
    assert (k["recall"], k["resolved"]) == (0.0, 0.5)
    assert "resolved" not in truth_metrics(outcome, truth.drop(C.DUPLICATE_OF))["kinds"][C.DEFECT_EXACT_DUP]
