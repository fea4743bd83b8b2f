"""Retrieval metrics against hand-computed cases and a brute-force stable ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tbps
from tbps.errors import TbpsError
from tbps.eval.metrics import (
    rerank_order,
    reranked_metrics_from_embeddings,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    top_k_from_embeddings,
)
from tbps.models.protocol import similarity


def brute_force(sim: np.ndarray, qp, gp) -> dict:
    """IRRA's rank function with a stable sort, one query at a time, skipping match-less queries."""
    qp, gp = np.asarray(qp), np.asarray(gp)
    r1 = r5 = r10 = ap = inp = 0.0
    n = 0
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        matches = gp[order] == qp[i]
        if not matches.any():
            continue
        n += 1
        ranks = np.flatnonzero(matches) + 1
        r1 += ranks[0] <= 1
        r5 += ranks[0] <= 5
        r10 += ranks[0] <= 10
        ap += np.mean(np.arange(1, len(ranks) + 1) / ranks)
        inp += len(ranks) / ranks[-1]
    return {k: 100 * v / n for k, v in zip(("R1", "R5", "R10", "mAP", "mINP"), (r1, r5, r10, ap, inp))}


def brute_force_per_query(sim: np.ndarray, qp, gp) -> dict:
    """Each query's first-match rank, AP, INP and evaluated flag, one query at a time."""
    qp, gp = np.asarray(qp), np.asarray(gp)
    n = sim.shape[0]
    out = {"first_rank": np.zeros(n, np.int64), "ap": np.zeros(n), "inp": np.zeros(n), "evaluated": np.zeros(n, bool)}
    for i in range(n):
        ranks = np.flatnonzero(gp[np.argsort(-sim[i], kind="stable")] == qp[i]) + 1
        if len(ranks):
            out["first_rank"][i] = ranks[0]
            out["ap"][i] = np.mean(np.arange(1, len(ranks) + 1) / ranks)
            out["inp"][i] = len(ranks) / ranks[-1]
            out["evaluated"][i] = True
    return out


def close(res: dict, expected: dict) -> bool:
    return all(res[k] == pytest.approx(v, abs=1e-9) for k, v in expected.items())


HAND_CASES = [
    # (similarity, query pids, gallery pids, expected) -- each worked out by hand in the comment.
    pytest.param(
        # q0 (A) ranks g0 A, g2 A, g3, g1: matches at 1, 2 -> AP 1, INP 1.
        # q1 (C) ranks g1 B, g3 C, g0, g2: match at 2 -> AP 1/2, INP 1/2.
        [[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.1, 0.7]],
        ["A", "C"],
        ["A", "B", "A", "C"],
        {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 75.0, "mINP": 75.0, "queries": 2, "queries_without_match": 0},
        id="two-queries",
    ),
    pytest.param(
        # The only match scores lowest of 12: rank 12 -> no hit at 10, AP = INP = 1/12.
        [[float(12 - j) for j in range(11)] + [-5.0]],
        [7],
        [1] * 11 + [7],
        {"R1": 0.0, "R5": 0.0, "R10": 0.0, "mAP": 100 / 12, "mINP": 100 / 12},
        id="match-last",
    ),
    pytest.param(
        # Matches at ranks 2, 5, 9 of 10: AP = (1/2 + 2/5 + 3/9) / 3, INP = 3/9.
        [[10, 9, 8, 7, 6, 5, 4, 3, 2, 1]],
        [1],
        [0, 1, 0, 0, 1, 0, 0, 0, 1, 0],
        {"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (1 / 2 + 2 / 5 + 3 / 9) / 3, "mINP": 100 * 3 / 9},
        id="several-matches",
    ),
    pytest.param(
        # All scores tie: gallery order decides, matches at ranks 2 and 4 -> AP (1/2 + 2/4)/2, INP 2/4.
        [[0.5, 0.5, 0.5, 0.5]],
        ["A"],
        ["B", "A", "C", "A"],
        {"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 50.0, "mINP": 50.0},
        id="all-tied",
    ),
    pytest.param(
        # q0 (A): g1 (D) and g2 (A) tie behind g0; the lower index g1 goes first -> match at rank 3.
        # q1 (C): the match g0 ties with g2 and has the lower index -> rank 1.
        [[0.9, 0.4, 0.4, 0.1], [0.3, 0.2, 0.3, 0.1]],
        ["A", "C"],
        ["C", "D", "A", "E"],
        {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (1 / 3 + 1) / 2, "mINP": 100 * (1 / 3 + 1) / 2},
        id="tie-before-match",
    ),
    pytest.param(
        # q1 (Z) has no match: skipped and counted; q0 hits at rank 1.
        [[0.9, 0.1], [0.2, 0.8]],
        ["A", "Z"],
        ["A", "B"],
        {"R1": 100.0, "mAP": 100.0, "mINP": 100.0, "queries": 1, "queries_without_match": 1, "gallery": 2},
        id="no-match-skipped",
    ),
]


@pytest.mark.parametrize("sim, qp, gp, expected", HAND_CASES)
def test_hand_computed(sim, qp, gp, expected):
    res = retrieval_metrics(np.asarray(sim, dtype=np.float32), qp, gp)
    assert close(res, expected), res
    assert close(res, brute_force(np.asarray(sim, dtype=np.float32), qp, gp))


def test_top_level_export_and_keys():
    res = tbps.retrieval_metrics(np.eye(3), [0, 1, 2], [0, 1, 2])
    assert {"R1", "R5", "R10", "mAP", "mINP"} <= set(res)
    assert res["R1"] == res["mAP"] == res["mINP"] == 100.0


def _random_case(seed: int, n_q: int = 60, n_g: int = 40, ids: int = 12):
    rng = np.random.default_rng(seed)
    # Scores on a coarse grid: many exact ties, so the tie rule is exercised everywhere.
    sim = rng.integers(0, 6, size=(n_q, n_g)).astype(np.float32) / 4
    qp = rng.integers(0, ids + 3, size=n_q)  # some ids absent from the gallery
    gp = rng.integers(0, ids, size=n_g)
    return sim, qp, gp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_brute_force_and_chunked(seed):
    sim, qp, gp = _random_case(seed)
    expected = brute_force(sim, qp, gp)
    dense = retrieval_metrics(sim, qp, gp)
    assert close(dense, expected)
    for chunk in (1, 7, 1000):
        assert retrieval_metrics(sim, qp, gp, chunk_size=chunk) == dense


def test_numpy_and_torch_inputs_agree():
    sim, qp, gp = _random_case(3)
    ref = retrieval_metrics(sim, qp, gp)
    assert retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(qp), torch.from_numpy(gp)) == ref
    assert retrieval_metrics(sim.astype(np.float64), list(qp), list(gp)) == ref
    assert retrieval_metrics(torch.from_numpy(sim).to(torch.bfloat16), qp, gp) == ref  # grid values are exact in bf16
    # String ids give the same result as the integer ids they spell.
    assert retrieval_metrics(sim, qp.astype(str), gp.astype(str)) == ref


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
@pytest.mark.parametrize("as_torch", [False, True])
def test_from_embeddings_equals_dense(chunk, as_torch):
    rng = np.random.default_rng(4)
    # Small integers: every dot product is exact in float32, so block and dense products are equal.
    text = rng.integers(-2, 3, size=(50, 8)).astype(np.float32)
    image = rng.integers(-2, 3, size=(30, 8)).astype(np.float32)
    qp, gp = rng.integers(0, 10, size=50), rng.integers(0, 10, size=30)
    dense = retrieval_metrics(text @ image.T, qp, gp)
    if as_torch:
        text, image = torch.from_numpy(text), torch.from_numpy(image)
    assert retrieval_metrics_from_embeddings(text, image, qp, gp, chunk_size=chunk) == dense


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_against_brute_force(seed):
    sim, qp, gp = _random_case(seed)
    res = retrieval_metrics(sim, qp, gp, per_query=True)
    pq, ref = res.pop("per_query"), brute_force_per_query(sim, qp, gp)
    assert res == retrieval_metrics(sim, qp, gp)  # the aggregate is the same with or without per_query
    assert (~pq["evaluated"]).any() and pq["evaluated"].any()  # the case has skipped queries
    assert {k: v.dtype for k, v in pq.items()} == {
        "first_rank": np.int64, "ap": np.float64, "inp": np.float64, "evaluated": np.bool_
    }
    assert all(len(v) == sim.shape[0] for v in pq.values())
    np.testing.assert_array_equal(pq["first_rank"], ref["first_rank"])
    np.testing.assert_array_equal(pq["evaluated"], ref["evaluated"])
    np.testing.assert_allclose(pq["ap"], ref["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pq["inp"], ref["inp"], rtol=0, atol=1e-12)
    # Skipped queries hold zeros; the aggregate numbers are exactly those of the arrays.
    skipped = ~pq["evaluated"]
    assert not pq["first_rank"][skipped].any() and not pq["ap"][skipped].any() and not pq["inp"][skipped].any()
    n = int(pq["evaluated"].sum())
    assert (res["queries"], res["queries_without_match"]) == (n, sim.shape[0] - n)
    for k in (1, 5, 10):
        assert res[f"R{k}"] == 100.0 * int((pq["evaluated"] & (pq["first_rank"] <= k)).sum()) / n
    assert res["mAP"] == 100.0 * float(pq["ap"].sum()) / n
    assert res["mINP"] == 100.0 * float(pq["inp"].sum()) / n


def test_per_query_does_not_depend_on_blocks_or_inputs():
    sim, qp, gp = _random_case(5)
    ref = retrieval_metrics(sim, qp, gp, per_query=True)["per_query"]
    runs = [retrieval_metrics(sim, qp, gp, chunk_size=chunk, per_query=True) for chunk in (1, 7, 1000)]
    rng = np.random.default_rng(5)
    text = rng.integers(-2, 3, size=(40, 8)).astype(np.float32)
    image = rng.integers(-2, 3, size=(25, 8)).astype(np.float32)
    tq, tg = rng.integers(0, 9, size=40), rng.integers(0, 7, size=25)
    dense = retrieval_metrics(text @ image.T, tq, tg, per_query=True)["per_query"]
    for chunk in (None, 3):
        runs_e = retrieval_metrics_from_embeddings(text, image, tq, tg, chunk_size=chunk, per_query=True)
        for key, value in dense.items():
            np.testing.assert_array_equal(runs_e["per_query"][key], value)
    for run in runs:
        for key, value in ref.items():
            np.testing.assert_array_equal(run["per_query"][key], value)
    assert "per_query" not in retrieval_metrics_from_embeddings(text, image, tq, tg)


def test_per_query_hand_case():
    # q0 (A) hits at rank 1; q1 (Z) has no match; q2 (B) ranks g0 A, g1 B: match at 2.
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], dtype=np.float32)
    pq = retrieval_metrics(sim, ["A", "Z", "B"], ["A", "B"], per_query=True)["per_query"]
    assert pq["first_rank"].tolist() == [1, 0, 2]
    assert pq["ap"].tolist() == pq["inp"].tolist() == [1.0, 0.0, 0.5]
    assert pq["evaluated"].tolist() == [True, False, True]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: retrieval_metrics(np.zeros((2, 3)), [1, 2, 3], [1, 2, 3]), "query_pids has 3 entries"),
        (lambda: retrieval_metrics(np.zeros((2, 3)), [1, 2], [1, 2]), "gallery_pids has 2 entries"),
        (lambda: retrieval_metrics(np.zeros((0, 3)), [], [1, 2, 3]), "non-empty"),
        (lambda: retrieval_metrics(np.array([[np.nan, 1.0]]), [1], [1, 2]), "NaN"),
        (lambda: retrieval_metrics(np.ones((2, 2)), [1, 2], [3, 4]), "no query has a matching"),
        (lambda: retrieval_metrics(np.ones((1, 1)), [1], [1], chunk_size=0), "chunk_size"),
        (lambda: retrieval_metrics_from_embeddings(np.ones((2, 4)), np.ones((2, 3)), [1, 2], [1, 2]), "width"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(TbpsError, match=message):
        call()


# --- several vectors per image (BLIP-2), top K and re-ranking (issue 14) ---------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_one_image_vector_is_todays_plain_dot_product():
    rng = np.random.default_rng(7)
    text, image = _unit(rng.standard_normal((40, 16))), _unit(rng.standard_normal((25, 16)))
    qp, gp = rng.integers(0, 8, 40), rng.integers(0, 8, 25)
    # One block: the product the metrics always took (text @ a contiguous image.T), bit for bit.
    today = retrieval_metrics(text @ np.ascontiguousarray(image.T), qp, gp, per_query=True)
    got = retrieval_metrics_from_embeddings(text, image, qp, gp, image_vectors=1, per_query=True)
    assert {k: v for k, v in got.items() if k != "per_query"} == {k: v for k, v in today.items() if k != "per_query"}
    assert all(np.array_equal(got["per_query"][k], today["per_query"][k]) for k in today["per_query"])


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("as_torch", [False, True])
def test_several_image_vectors_score_an_image_by_its_best_vector(chunk, as_torch):
    rng = np.random.default_rng(8)
    q, d = 3, 8
    text = _unit(rng.standard_normal((30, d)))
    image = _unit(rng.standard_normal((20, q, d))).reshape(20, q * d)  # each D-block normalised, as encode writes them
    qp, gp = rng.integers(0, 6, 30), rng.integers(0, 6, 20)
    best = np.einsum("td,gqd->tgq", text, image.reshape(20, q, d)).max(axis=2)  # BLIP-2's ITC: max over the query vectors
    want = retrieval_metrics(best, qp, gp)
    assert want == retrieval_metrics(similarity(torch.from_numpy(image), torch.from_numpy(text), q).T.numpy(), qp, gp)
    args = (torch.from_numpy(text), torch.from_numpy(image)) if as_torch else (text, image)
    got = retrieval_metrics_from_embeddings(*args, qp, gp, chunk_size=chunk, image_vectors=q)
    assert close(got, want)
    # Taken as one wide vector, the same embeddings would not even fit the captions.
    with pytest.raises(TbpsError, match="width"):
        retrieval_metrics_from_embeddings(text, image, qp, gp)
    with pytest.raises(TbpsError, match=r"width \(8 vs 24 \(2 vectors of 8 per image\)\)"):
        retrieval_metrics_from_embeddings(text, image, qp, gp, image_vectors=2)


@pytest.mark.parametrize("as_torch", [False, True])
def test_top_k_is_the_metrics_ranking_ties_included(as_torch):
    rng = np.random.default_rng(9)
    # Small integers: exact dot products with many ties, at the k-th place too.
    text = rng.integers(-1, 2, size=(40, 4)).astype(np.float32)
    image = rng.integers(-1, 2, size=(15, 4)).astype(np.float32)
    ranking = np.argsort(-(text @ image.T), axis=1, kind="stable")  # the order retrieval_metrics ranks by
    args = (torch.from_numpy(text), torch.from_numpy(image)) if as_torch else (text, image)
    for k in (1, 2, 5, 14, 15, 40):
        for chunk in (None, 3):
            assert np.array_equal(top_k_from_embeddings(*args, k, chunk_size=chunk), ranking[:, : min(k, 15)]), (k, chunk)
    with pytest.raises(TbpsError, match="k must be 1 or more"):
        top_k_from_embeddings(text, image, 0)


def test_rerank_order_sorts_by_the_second_score_and_keeps_ties_in_the_first_order():
    top = np.array([[4, 1, 7], [0, 2, 3]])
    scores = np.array([[0.1, 0.9, 0.5], [0.5, 0.5, 0.5]])
    assert rerank_order(top, scores).tolist() == [[1, 7, 4], [0, 2, 3]]
    with pytest.raises(TbpsError, match="NaN"):
        rerank_order(top, np.array([[0.1, np.nan, 0.5], [0.5, 0.5, 0.5]]))


def test_reranked_metrics_hand_case():
    # One query, person 1; gallery persons [2, 1, 1, 2]. ITC ranks 0, 1, 3, 2. Its top 2 (0, 1) re-ranked by ITM puts 1 first.
    text = np.array([[1.0, 0.0]], dtype=np.float32)
    image = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5]], dtype=np.float32)
    gp, qp = [2, 1, 1, 2], [1]
    itc = retrieval_metrics_from_embeddings(text, image, qp, gp)
    assert itc["R1"] == 0.0 and itc["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2)
    top = top_k_from_embeddings(text, image, 2)
    assert top.tolist() == [[0, 1]]
    res = reranked_metrics_from_embeddings(text, image, qp, gp, top, np.array([[0.2, 0.7]]))
    # New ranking 1, 0, 3, 2: matches at ranks 1 and 4.
    assert res["R1"] == 100.0 and res["mAP"] == pytest.approx(100 * (1 / 1 + 2 / 4) / 2) and res["mINP"] == pytest.approx(100 * 2 / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_reranked_metrics_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    text = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
    image = rng.integers(-1, 2, size=(20, 4)).astype(np.float32)
    qp, gp = rng.integers(0, 8, 30), rng.integers(0, 6, 20)
    sim = text @ image.T
    for k in (1, 4, 20):
        top = top_k_from_embeddings(text, image, k)
        scores = rng.integers(0, 3, size=top.shape) / 2  # ties among the second scores too
        order = rerank_order(top, scores)
        ranked = np.zeros_like(sim)
        for q in range(len(sim)):
            rest = [j for j in np.argsort(-sim[q], kind="stable") if j not in set(order[q].tolist())]
            ranked[q, [*order[q].tolist(), *rest]] = np.arange(sim.shape[1], 0, -1)
        want = brute_force(ranked, qp, gp)
        for chunk in (None, 4):
            got = reranked_metrics_from_embeddings(text, image, qp, gp, top, scores, chunk_size=chunk)
            assert close(got, want), (k, chunk)
        if k == 1:  # one item re-ranked among itself: the ITC ranking
            assert reranked_metrics_from_embeddings(text, image, qp, gp, top, scores) == retrieval_metrics_from_embeddings(text, image, qp, gp)
    same = reranked_metrics_from_embeddings(text, image, qp, gp, top, np.zeros(top.shape))  # equal ITM everywhere: ITC order
    assert same == retrieval_metrics_from_embeddings(text, image, qp, gp)
    with pytest.raises(TbpsError, match="top must be"):
        reranked_metrics_from_embeddings(text, image, qp, gp, top[:5], scores[:5])
