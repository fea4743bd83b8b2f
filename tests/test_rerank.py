"""``tbps eval --rerank K``: each query's ITC top K re-ranked by the matching head, on tbps-tiny with a seeded random head.

The reference is computed here from the model directly: the ITC top K from a dense similarity
of the embeddings, ``Encoder.pair_score`` on those (caption, image) pairs, and the metrics of the
resulting full ranking through :func:`tbps.eval.metrics.retrieval_metrics`.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from tbps import columns as C
from tbps.data.images import open_image
from tbps.data.readers import read_dataset
from tbps.data.splits import select_split
from tbps.errors import TbpsError, UsageError
from tbps.eval import evaluate as evaluate_module
from tbps.eval.evaluate import EvalConfig, evaluate, run_eval, top_k_pair_scores
from tbps.eval.metrics import METRIC_KEYS, retrieval_metrics
from tbps.models import load
from tbps.models.encode import encode_images, encode_texts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def head_path(tmp_path_factory) -> str:
    """tbps-tiny with a seeded random matching head, saved (the checkpoint keeps the head)."""
    loaded = load("tbps-tiny", seed=0)
    torch.manual_seed(0)
    head = loaded.attach_itm_head().eval()
    torch.nn.init.normal_(head.logit.weight, std=0.3)  # a new head starts as the cosine: give its own term a say (no near-ties)
    return str(loaded.save(tmp_path_factory.mktemp("head") / "with-head.pt"))


@pytest.fixture(scope="module")
def head_model(head_path):
    loaded = load(head_path)
    assert loaded.has_pair_score  # loaded back with its head
    return loaded


@pytest.fixture(scope="module")
def world(synth_world):
    return synth_world(seed=0) / "benchmark" / "reid_raw.json"


@pytest.fixture(scope="module")
def rows(world) -> pl.DataFrame:
    return select_split(read_dataset(world), None)[0]  # the test split: 12 captions, 6 images


def _reference(loaded, rows: pl.DataFrame, k: int):
    """ITC similarity, ITC top k, the head's probabilities of those pairs, and the re-ranked top k, all computed directly."""
    images = rows.get_column(C.IMAGE_PATH).unique(maintain_order=True).to_list()
    captions = rows.get_column(C.CAPTION).to_list()
    sim = encode_texts(loaded, captions) @ encode_images(loaded, images, workers=0).embeddings.T
    itc_top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    pixels = torch.stack([loaded.preprocess(open_image(p).image) for p in images])
    with torch.no_grad():
        probs = np.stack([loaded.pair_score(pixels[torch.from_numpy(itc_top[q])], loaded.tokenizer([c] * k)).numpy()
                          for q, c in enumerate(captions)])
    reranked = np.take_along_axis(itc_top, np.argsort(-probs, axis=1, kind="stable"), axis=1)
    return images, sim, itc_top, probs, reranked


def _metrics_of_ranking(sim: np.ndarray, first: np.ndarray, query_pids, gallery_pids) -> dict:
    """The metrics of the ranking where each row's ``first`` items lead, in that order, and the rest follow in ``sim`` order."""
    n = sim.shape[1]
    ranked = np.zeros_like(sim)
    for q in range(len(sim)):
        rest = [j for j in np.argsort(-sim[q], kind="stable") if j not in set(first[q].tolist())]
        for position, j in enumerate([*first[q].tolist(), *rest]):
            ranked[q, j] = n - position  # a score that gives exactly this order
    return retrieval_metrics(ranked, query_pids, gallery_pids)


def test_rerank_keeps_the_itc_top_k_and_orders_it_by_the_pair_score(head_model, rows):
    k = 3
    res = evaluate(head_model, rows, workers=0, device="cpu", rerank=k, per_query=True)
    images, sim, itc_top, probs, reranked = _reference(head_model, rows, k)
    pq = res["per_query"]
    assert pq["gallery_paths"] == images
    assert np.array_equal(pq["top_k"], itc_top)  # the ITC top k, in ITC order
    assert np.array_equal(np.sort(pq["top_k_reranked"], axis=1), np.sort(itc_top, axis=1))  # the same set per query ...
    assert np.allclose(pq["top_k_itm"], probs, atol=1e-5)  # ... scored by the head as a direct pair_score does ...
    assert np.array_equal(pq["top_k_reranked"], reranked)  # ... and ordered by it
    assert (reranked != itc_top).any()  # the head does reorder some query here: the test can tell the two apart

    pid_of = dict(rows.select(C.IMAGE_PATH, C.PERSON_ID).iter_rows())
    q_pids, g_pids = rows.get_column(C.PERSON_ID).to_list(), [pid_of[p] for p in images]
    want = _metrics_of_ranking(sim, reranked, q_pids, g_pids)
    got = res["reranked"]["metrics"]
    for key in (*METRIC_KEYS, "queries", "gallery"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got != res["metrics"]  # re-ranking changed the numbers
    # The ITC metrics are those of an evaluation without --rerank.
    assert res["metrics"] == evaluate(head_model, rows, workers=0, device="cpu")["metrics"]
    distinct = rows.get_column(C.CAPTION).n_unique()
    assert res["reranked"]["k"] == k and res["reranked"]["pairs_scored"] == distinct * k
    assert res["reranked"]["images_decoded"] == len(np.unique(itc_top))
    assert pq["reranked"]["first_rank"].shape == (rows.height,)


def test_rerank_1_is_the_itc_ranking_and_rerank_of_the_whole_gallery_is_the_itm_ranking(head_model, rows):
    one = evaluate(head_model, rows, workers=0, device="cpu", rerank=1)
    assert one["reranked"]["metrics"] == one["metrics"]
    # K past the gallery: every image re-ranked, i.e. the ranking by the head alone.
    res = evaluate(head_model, rows, workers=0, device="cpu", rerank=50, per_query=True)
    n_images = rows.get_column(C.IMAGE_PATH).n_unique()
    _, _, _, probs, reranked = _reference(head_model, rows, n_images)
    assert n_images == res["reranked"]["k"] == 6 and np.array_equal(res["per_query"]["top_k_reranked"], reranked)
    assert np.allclose(res["per_query"]["top_k_itm"], probs, atol=1e-5)


def test_pairs_are_scored_alike_in_any_batch_size(head_model, rows):
    images = rows.get_column(C.IMAGE_PATH).unique(maintain_order=True).to_list()
    captions = rows.get_column(C.CAPTION).unique(maintain_order=True).to_list()
    rng = np.random.default_rng(0)
    top = np.stack([rng.permutation(len(images))[:4] for _ in captions])
    done = []
    big, decoded = top_k_pair_scores(head_model, top, captions, images, batch_size=256, workers=0, on_batch=done.append)
    small, _ = top_k_pair_scores(head_model, top, captions, images, batch_size=2, workers=0)
    assert np.allclose(big, small, atol=1e-6) and decoded == len(np.unique(top)) and sum(done) == top.size
    pixels = torch.stack([head_model.preprocess(open_image(p).image) for p in images])
    with torch.no_grad():
        direct = head_model.pair_score(pixels, head_model.tokenizer([captions[2]] * len(images))).numpy()
    assert np.allclose(big[2], direct[top[2]], atol=1e-5)


def test_progress_counts_the_pairs_scored(head_model, rows):
    seen = []
    evaluate(head_model, rows, workers=0, device="cpu", rerank=3, batch_size=4, progress=lambda d, t: seen.append((d, t)))
    distinct = rows.get_column(C.CAPTION).n_unique()
    total = 6 + distinct + distinct * 3
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 3


def test_a_model_without_a_head_is_refused_before_any_work(tiny_clip, rows, world, tmp_path, monkeypatch, cli):
    def no_work(*_args, **_kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(evaluate_module, "encode_images", no_work)
    monkeypatch.setattr(evaluate_module, "read_dataset", no_work)
    with pytest.raises(TbpsError, match="--rerank 3: the open_clip model tbps-tiny has no image-text matching head"):
        evaluate(tiny_clip, rows, rerank=3)
    with pytest.raises(TbpsError, match="no image-text matching head"):
        run_eval(EvalConfig(data=world, model="tbps-tiny", rerank=3, out=tmp_path / "r.json"))
    monkeypatch.undo()
    out = tmp_path / "cli.json"
    res = cli("eval", world, "--model", "tbps-tiny", "--rerank", "3", "--out", out, "--workers", "0", "--device", "cpu", "-q")
    assert res.exit_code == 1 and "no image-text matching head" in res.output and "--itm-head" in res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize("k", [0, -2])
def test_rerank_must_be_positive(world, k, cli, tmp_path):
    with pytest.raises(UsageError, match="--rerank K"):
        EvalConfig(data=world, model="tbps-tiny", rerank=k)
    res = cli("eval", world, "--model", "tbps-tiny", "--rerank", k, "--out", tmp_path / "r.json")
    assert res.exit_code == 2 and "--rerank" in res.output and not (tmp_path / "r.json").exists()


def test_cli_eval_rerank_reports_both_rankings(head_path, world, tmp_path, cli):
    out = tmp_path / "rerank.json"
    res = cli("eval", world, "--model", head_path, "--rerank", "3", "--out", out, "--workers", "0", "--device", "cpu", "-q",
              env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["config"]["rerank"] == 3 and rec["reranked"]["k"] == 3
    assert set(METRIC_KEYS) <= set(rec["metrics"]) and set(METRIC_KEYS) <= set(rec["reranked"]["metrics"])
    assert "rerank" in rec["seconds"]
    for text in ("with-head.pt (ITC)", "with-head.pt (ITM re-rank, top 3)"):
        assert text in res.output
    # The table of --compare shows both rankings of a re-ranked record, beside a plain one.
    plain = tmp_path / "plain.json"
    assert cli("eval", world, "--model", head_path, "--out", plain, "--workers", "0", "--device", "cpu", "-q").exit_code == 0
    res = cli("eval", "--compare", out, plain, env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "rerank.json (ITM re-rank, top 3)" in res.output and "plain.json" in res.output
    assert f"{rec['reranked']['metrics']['mAP']:.2f}" in res.output


def test_rerank_with_an_image_that_does_not_decode(head_model, tmp_path):
    from _eval_world import make_world

    rows, _ = select_split(read_dataset(make_world(tmp_path, persons=4)), "test")
    broken = rows[0, C.IMAGE_PATH]
    open(broken, "wb").write(b"not a jpeg")
    res = evaluate(head_model, rows, workers=0, device="cpu", rerank=2, per_query=True)
    pq = res["per_query"]
    assert res["counts"]["images_failed"] == {C.STATUS_BAD_IMAGE: 1} and broken not in pq["gallery_paths"]
    assert len(pq["gallery_paths"]) == res["metrics"]["gallery"] == res["reranked"]["metrics"]["gallery"] == 5
    assert pq["top_k"].max() < 5 and res["reranked"]["metrics"]["queries"] == res["metrics"]["queries"]
    kept = rows.filter(pl.col(C.IMAGE_PATH) != broken)
    _, _, itc_top, probs, reranked = _reference(head_model, kept, 2)  # the same model on the images that decode
    first = {c: i for i, c in enumerate(rows.get_column(C.CAPTION).to_list())}
    for q, caption in enumerate(kept.get_column(C.CAPTION).to_list()):
        assert np.allclose(pq["top_k_itm"][first[caption]], probs[q], atol=1e-5)
        assert np.array_equal(pq["top_k_reranked"][first[caption]], reranked[q])
