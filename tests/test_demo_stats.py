"""The demo's statistics: per-query values, bootstrap over identities, paired differences, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from tbps.demo.stats import (
    METRIC_KEYS,
    bootstrap_mean,
    non_inferior,
    paired_difference,
    query_values,
    verdict,
)
from tbps.eval import metrics as M

# 3 identities, 7 queries, 2 seeds: identity "b" has one query, "a" three, "c" three.
GROUPS = np.array(["a", "a", "b", "c", "a", "c", "c"])
SEED0 = np.array([100.0, 0.0, 100.0, 100.0, 0.0, 0.0, 100.0])
SEED1 = np.array([100.0, 100.0, 0.0, 100.0, 0.0, 100.0, 100.0])


def loop_bootstrap(values_by_seed, groups, n_boot, seed, level, resample_seeds=True):
    """The documented statistic, one draw, one seed and one drawn identity at a time."""
    ids = sorted(set(groups.tolist()))  # identity j of a draw is ids[j], as np.unique orders them
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))  # the identities first, then the seeds
    n_seeds = len(values_by_seed)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if resample_seeds and n_seeds > 1 else [range(n_seeds)] * n_boot
    stats = []
    for draw, seeds in zip(draws, seed_draws):
        per_seed = []
        for values in (values_by_seed[t] for t in seeds):
            total = count = 0.0
            for j in draw:
                mine = [v for v, g in zip(values, groups) if g == ids[j]]
                total += sum(mine)
                count += len(mine)
            per_seed.append(total / count)
        stats.append(sum(per_seed) / len(per_seed))
    tail = (1 - level) / 2
    return np.quantile(stats, [tail, 1 - tail])


def test_hand_example():
    res = bootstrap_mean([SEED0, SEED1], GROUPS, n_boot=200, seed=3, level=0.9)
    # Per-seed means 400/7 and 500/7; their mean 450/7; their sample std |100/7| / sqrt(2).
    assert res["mean"] == pytest.approx(450 / 7, abs=1e-12)
    assert res["std"] == pytest.approx(100 / 7 / np.sqrt(2), abs=1e-12)
    lo, hi = loop_bootstrap([SEED0, SEED1], GROUPS, n_boot=200, seed=3, level=0.9)
    assert (res["lo"], res["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert res["lo"] < res["mean"] < res["hi"]
    fixed = bootstrap_mean([SEED0, SEED1], GROUPS, n_boot=200, seed=3, level=0.9, resample_seeds=False)
    lo, hi = loop_bootstrap([SEED0, SEED1], GROUPS, n_boot=200, seed=3, level=0.9, resample_seeds=False)
    assert (fixed["lo"], fixed["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert fixed["mean"] == res["mean"]


def test_resampling_the_seeds_widens_the_interval_by_the_seeds_spread():
    # Every identity the same: the test set adds no variation, so the interval is the seeds' alone.
    groups = np.repeat(np.arange(20), 3)
    seeds = [np.full(60, v) for v in (40.0, 50.0, 60.0)]
    fixed = bootstrap_mean(seeds, groups, n_boot=400, resample_seeds=False)
    both = bootstrap_mean(seeds, groups, n_boot=400)
    assert fixed["lo"] == pytest.approx(50.0) and fixed["hi"] == pytest.approx(50.0)
    assert both["lo"] < 50.0 < both["hi"] and 40.0 <= both["lo"] and both["hi"] <= 60.0


def test_one_draw_by_hand():
    # With one identity every draw is that identity: the interval collapses onto the mean.
    res = bootstrap_mean([SEED0], np.zeros(7), n_boot=50)
    assert res["lo"] == pytest.approx(400 / 7) and res["hi"] == pytest.approx(400 / 7) and res["std"] is None


def test_deterministic_and_seeded():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, size=200)
    values = [rng.normal(50, 20, size=200) for _ in range(3)]
    a = bootstrap_mean(values, groups, seed=1)
    assert a == bootstrap_mean(values, groups, seed=1)
    b = bootstrap_mean(values, groups, seed=2)
    assert b["mean"] == a["mean"] and (b["lo"], b["hi"]) != (a["lo"], a["hi"])  # only the draws change
    # Identity labels of any kind, drawn in sorted order: labels sorting alike give the same interval.
    assert bootstrap_mean(values, np.char.zfill(groups.astype(str), 3), seed=1) == pytest.approx(a)


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_mean(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 40, size=300)
    effect = rng.normal(0, 10, size=40)[groups]  # identities differ: queries of one person correlate
    values = [effect + rng.normal(60, 15, size=300) for _ in range(3)]
    res = bootstrap_mean(values, groups, n_boot=500, seed=seed)
    assert res["lo"] < res["mean"] < res["hi"]


def test_identical_arms_give_zero():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 10, size=50)
    arm = [rng.normal(size=50) for _ in range(3)]
    res = paired_difference(arm, [v.copy() for v in arm], groups)
    assert res == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "std": 0.0, "per_seed": [0.0, 0.0, 0.0]}
    assert verdict(res) == "within noise"


def test_paired_difference_is_the_bootstrap_of_the_differences():
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 25, size=120)
    a = [rng.normal(55, 10, size=120) for _ in range(2)]
    b = [rng.normal(50, 10, size=120) for _ in range(2)]
    res = paired_difference(a, b, groups, n_boot=300, seed=4)
    ref = bootstrap_mean([x - y for x, y in zip(a, b)], groups, n_boot=300, seed=4)
    assert {k: res[k] for k in ref} == ref
    assert res["per_seed"] == pytest.approx([float(np.mean(x - y)) for x, y in zip(a, b)])
    assert res["mean"] == pytest.approx(bootstrap_mean(a, groups)["mean"] - bootstrap_mean(b, groups)["mean"])
    assert res["std"] == pytest.approx(float(np.std(res["per_seed"], ddof=1)))


def test_more_identities_give_a_narrower_interval():
    def width(n_ids: int) -> float:
        rng = np.random.default_rng(n_ids)
        groups = np.repeat(np.arange(n_ids), 4)
        values = rng.normal(0, 10, size=n_ids)[groups] + rng.normal(50, 10, size=len(groups))
        res = bootstrap_mean([values], groups, n_boot=500)
        return res["hi"] - res["lo"]

    assert width(400) < width(100) < width(25)
    assert width(400) < 0.6 * width(25)  # about 1 / sqrt(16) in theory


@pytest.mark.parametrize(
    "lo, hi, margin, expected",
    [
        (0.5, 2.0, 0.0, "better"),
        (-2.0, -0.5, 0.0, "worse"),
        (-1.0, 1.0, 0.0, "within noise"),
        (0.0, 1.0, 0.0, "within noise"),  # touching zero is not better
        (-1.0, 0.0, 0.0, "within noise"),
        (0.0, 0.0, 0.0, "within noise"),
        (0.5, 2.0, 1.0, "within noise"),  # above zero, not above the margin
        (1.5, 2.0, 1.0, "better"),
        (-2.0, -1.5, 1.0, "worse"),
    ],
)
def test_verdict(lo, hi, margin, expected):
    assert verdict({"lo": lo, "hi": hi}, margin=margin) == expected


@pytest.mark.parametrize(
    "lo, margin, expected",
    [(-0.5, 1.0, True), (-1.0, 1.0, False), (-1.5, 1.0, False), (0.3, 0.0, True), (0.0, 0.0, False)],
)
def test_non_inferior(lo, margin, expected):
    assert non_inferior({"lo": lo, "hi": lo + 1}, margin) is expected


def test_query_values_by_hand():
    per_query = {
        "first_rank": np.array([1, 0, 3, 7, 12]),
        "ap": np.array([1.0, 0.0, 0.5, 0.25, 0.1]),
        "inp": np.array([1.0, 0.0, 1 / 3, 0.2, 0.05]),
        "evaluated": np.array([True, False, True, True, True]),
        "person_id": ["p", "q", "p", "r", "r"],
    }
    v = query_values(per_query)
    assert v["index"].tolist() == [0, 2, 3, 4]
    assert v["R1"].tolist() == [100.0, 0.0, 0.0, 0.0]
    assert v["R5"].tolist() == [100.0, 100.0, 0.0, 0.0]
    assert v["R10"].tolist() == [100.0, 100.0, 100.0, 0.0]
    assert v["mAP"].tolist() == pytest.approx([100.0, 50.0, 25.0, 10.0])
    assert v["mINP"].tolist() == pytest.approx([100.0, 100 / 3, 20.0, 5.0])
    assert v["person_id"].tolist() == ["p", "p", "r", "r"]
    assert "person_id" not in query_values({k: x for k, x in per_query.items() if k != "person_id"})


def test_metric_keys_match_eval():
    assert METRIC_KEYS == M.METRIC_KEYS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_query_values_reproduce_the_aggregate(seed):
    rng = np.random.default_rng(seed)
    # A coarse grid of scores (many exact ties) and query ids absent from the gallery.
    sim = rng.integers(0, 6, size=(80, 50)).astype(np.float32) / 4
    qp, gp = rng.integers(0, 15, size=80), rng.integers(0, 12, size=50)
    res = M.retrieval_metrics(sim, qp, gp, per_query=True)
    assert res["queries_without_match"] > 0
    v = query_values(res["per_query"])
    assert len(v["index"]) == res["queries"]
    for key in ("R1", "R5", "R10"):
        assert float(v[key].mean()) == res[key]  # exact: sums of 0 / 100
    for key in ("mAP", "mINP"):
        assert float(v[key].mean()) == pytest.approx(res[key], rel=1e-12)
    # The bootstrap point estimate of one seed is the aggregate too.
    assert bootstrap_mean([v["R1"]], qp[v["index"]], n_boot=10)["mean"] == res["R1"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_mean([], np.zeros(0)), "no seed"),
        (lambda: bootstrap_mean([np.zeros(0)], np.zeros(0)), "no query"),
        (lambda: bootstrap_mean([np.zeros(3), np.zeros(4)], np.zeros(3)), "different numbers"),
        (lambda: bootstrap_mean([np.zeros(3)], np.zeros(4)), "groups"),
        (lambda: bootstrap_mean([np.zeros(3)], np.zeros(3), n_boot=0), "n_boot"),
        (lambda: bootstrap_mean([np.zeros(3)], np.zeros(3), level=1.0), "level"),
        (lambda: paired_difference([np.zeros(3)], [np.zeros(3)] * 2, np.zeros(3)), "not paired"),
        (lambda: query_values({"first_rank": [1], "ap": [1.0], "inp": [1.0], "evaluated": [True, False]}), "length"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
