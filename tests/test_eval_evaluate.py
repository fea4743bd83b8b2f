"""``tbps eval`` end to end on a tiny synthetic world with random tbps-tiny weights.

With random weights the numbers are near chance: the tests check structure, ranges,
determinism, row accounting and equality with ``retrieval_metrics`` on the same embeddings.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from tbps import columns as C
from tbps.data.readers import read_dataset
from tbps.data.splits import select_split
from tbps.errors import TbpsError, UsageError
from tbps.eval.evaluate import EvalConfig, build_protocol, evaluate
from tbps.eval.metrics import retrieval_metrics
from tbps.models.encode import encode_images, encode_texts

from _eval_world import make_world


@pytest.fixture(scope="module")
def world(synth_world):
    return synth_world(seed=0) / "benchmark" / "reid_raw.json"


def test_evaluate_structure_and_equals_retrieval_metrics(world, tiny_clip):
    pairs = read_dataset(world)
    rows, split = select_split(pairs, None)
    assert split == "test" and rows.height == 12  # 3 test identities x 2 images x 2 captions

    res = evaluate(tiny_clip, rows, workers=0, device="cpu")
    m = res["metrics"]
    assert set(m) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert all(0.0 <= m[k] <= 100.0 for k in ("R1", "R5", "R10", "mAP", "mINP"))
    assert m["R1"] <= m["R5"] <= m["R10"] == 100.0  # 6 gallery images: every match is within 10
    assert (m["queries"], m["gallery"], m["queries_without_match"]) == (12, 6, 0)
    assert res["counts"]["person_ids"] == 3 and res["counts"]["images_failed"] == {}

    # The same numbers from the model's embeddings and a dense similarity matrix.
    images = rows.get_column(C.IMAGE_PATH).unique(maintain_order=True).to_list()
    pid_of = dict(rows.select(C.IMAGE_PATH, C.PERSON_ID).iter_rows())
    img = encode_images(tiny_clip, images, workers=0).embeddings
    txt = encode_texts(tiny_clip, rows.get_column(C.CAPTION).to_list())
    ref = retrieval_metrics(txt @ img.T, rows.get_column(C.PERSON_ID).to_list(), [pid_of[p] for p in images])
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert m[key] == pytest.approx(ref[key], abs=1e-9)

    again = evaluate(tiny_clip, rows, workers=0, device="cpu")
    assert again["metrics"] == m and again["data_hash"] == res["data_hash"]  # deterministic


def test_rows_are_accounted_for(tmp_path, tiny_clip):
    csv = make_world(tmp_path, persons=3)
    pairs = read_dataset(csv)
    rows, _ = select_split(pairs, "test")
    # One row loses its person id, one image is corrupted, one row has a reader status.
    broken = rows[2, C.IMAGE_PATH]
    open(broken, "wb").write(b"not a jpeg")
    rows = rows.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col(C.PERSON_ID)).alias(C.PERSON_ID),
        pl.when(pl.int_range(pl.len()) == 1).then(pl.lit(C.STATUS_EMPTY_CAPTION)).otherwise(pl.col(C.STATUS)).alias(C.STATUS),
    )
    res = evaluate(tiny_clip, rows, workers=0, device="cpu")
    c = res["counts"]
    assert c["rows"] == 8 and c["rows_without_person_id"] == 1 and c["rows_skipped"] == {C.STATUS_EMPTY_CAPTION: 1}
    assert c["queries_total"] == 6 and res["metrics"]["queries"] + res["metrics"]["queries_without_match"] == 6
    # Image 0 of person 1 lost both its rows, image 1 does not decode: person 1's two remaining
    # captions have no match left in the gallery.
    assert c["images_total"] == 3 and c["images_failed"] == {C.STATUS_BAD_IMAGE: 1}
    assert res["metrics"]["gallery"] == 2 and res["metrics"]["queries_without_match"] == 2


def test_per_query_outcomes(tmp_path, tiny_clip):
    csv = make_world(tmp_path, persons=3)
    rows, _ = select_split(read_dataset(csv), "test")
    # Row 4 has a reader status (not a query). Neither image of person 1 (rows 0-3) decodes: their
    # four captions have no match and are skipped by the metrics, yet keep their place in the arrays.
    for broken in (rows[0, C.IMAGE_PATH], rows[2, C.IMAGE_PATH]):
        open(broken, "wb").write(b"not a jpeg")
    status = pl.when(pl.int_range(pl.len()) == 4).then(pl.lit(C.STATUS_EMPTY_CAPTION)).otherwise(pl.col(C.STATUS))
    rows = rows.with_columns(status.alias(C.STATUS))
    plain = evaluate(tiny_clip, rows, workers=0, device="cpu")
    res = evaluate(tiny_clip, rows, workers=0, device="cpu", per_query=True)
    assert res["metrics"] == plain["metrics"] and "per_query" not in res["metrics"] and "per_query" not in plain
    pq = res["per_query"]
    queries = rows.filter(pl.col(C.STATUS) == C.STATUS_OK)  # the queries, in table order
    assert pq["pair_id"] == queries.get_column(C.PAIR_ID).to_list()
    assert pq["person_id"] == queries.get_column(C.PERSON_ID).to_list()
    assert pq["caption"] == queries.get_column(C.CAPTION).to_list()
    assert all(isinstance(v, str) for v in pq["person_id"])
    assert all(len(pq[k]) == res["counts"]["queries_total"] == 7 for k in ("first_rank", "ap", "inp", "evaluated"))
    m = res["metrics"]
    assert pq["evaluated"].tolist() == [False] * 4 + [True] * 3 and m["queries"] == 3
    assert ((pq["first_rank"] > 0) == pq["evaluated"]).all()
    assert m["R1"] == 100.0 * int((pq["evaluated"] & (pq["first_rank"] == 1)).sum()) / m["queries"]
    assert m["mAP"] == 100.0 * float(pq["ap"].sum()) / m["queries"]


def test_bad_input(tmp_path, world):
    pairs = read_dataset(world)
    with pytest.raises(TbpsError, match="eval needs person ids"):
        build_protocol(pairs.with_columns(pl.lit(None, dtype=pl.String).alias(C.PERSON_ID)))
    with pytest.raises(TbpsError, match="no rows of split 'dev'"):
        select_split(pairs, "dev")
    with pytest.raises(TbpsError, match="no 'test' split"):
        select_split(pairs.filter(pl.col(C.SPLIT) != "test"), None)
    clash = pairs.with_columns(pl.when(pl.col(C.PAIR_ID) == "0:1").then(pl.lit("99")).otherwise(pl.col(C.PERSON_ID)).alias(C.PERSON_ID))
    with pytest.raises(TbpsError, match="several person ids"):
        build_protocol(clash)
    with pytest.raises(UsageError, match="batch-size"):
        EvalConfig(data=world, model="tbps-tiny", batch_size=0)


@pytest.mark.slow
def test_cli_eval_json_and_compare(tmp_path, world, cli):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # The dataset as the DATA argument, and as --data (the synopsis): the same run.
    for path, data_args in ((a, [world]), (b, ["--data", world])):
        res = cli("eval", *data_args, "--model", "tbps-tiny", "--workers", "0", "--device", "cpu", "--out", path, "-q")
        assert res.exit_code == 0, res.output
        assert "R1" in res.stdout and "mINP" in res.stdout
    rec = json.loads(a.read_text())
    assert rec["model"]["spec"] == "tbps-tiny" and rec["data"]["split"] == "test"
    assert len(rec["data_hash"]) == 32 and rec["counts"]["rows_other_splits"] == 12
    assert rec["metrics"] == json.loads(b.read_text())["metrics"]

    res = cli("eval", "--compare", a, b)
    assert res.exit_code == 0, res.output
    assert "a.json" in res.stdout and "b.json" in res.stdout and "DIFFERENT" not in res.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "/no/such/model.pt"], 1, "model file not found"),
        (["--model", "tbps-tiny", "--split", "dev"], 1, "no rows of split"),
        ([], 2, "--model"),
    ],
)
def test_cli_bad_input(world, args, code, message, cli):
    res = cli("eval", world, "--workers", "0", *args)
    assert res.exit_code == code, res.output
    assert message in res.output


def test_cli_eval_without_person_ids(tmp_path, cli):
    csv = make_world(tmp_path, persons=2)
    pl.read_csv(csv).drop("person_id").write_csv(csv)
    res = cli("eval", csv, "--model", "tbps-tiny", "--workers", "0")
    assert res.exit_code == 1 and "eval needs person ids" in res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a handled error, not a crash


def test_cli_compare_rejects_other_json(tmp_path, cli):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    res = cli("eval", "--compare", bad)
    assert res.exit_code == 1 and "not a tbps eval record" in res.output


def test_default_record_names_differ_per_model_file_and_never_overwrite(tmp_path, monkeypatch):
    from tbps.eval.evaluate import EvalConfig, default_out

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "reid_raw.json"
    data.write_text("[]")
    checkpoint = default_out(EvalConfig(model="runs/x.pt", data=data), "test")
    run_dir = default_out(EvalConfig(model="runs/x", data=data), "test")
    assert checkpoint != run_dir
    run_dir.write_text("{}")
    again = default_out(EvalConfig(model="runs/x", data=data), "test")
    assert again != run_dir and not again.exists() and again.name.endswith("-2.json")


def test_progress_moves_per_batch_with_the_total_known(world, tiny_clip, cli, tmp_path):
    rows, _ = select_split(read_dataset(world), None)
    calls: list[tuple[int, int]] = []
    evaluate(tiny_clip, rows, batch_size=4, workers=0, device="cpu", progress=lambda d, t: calls.append((d, t)))
    images, captions = rows[C.IMAGE_PATH].n_unique(), rows[C.CAPTION].n_unique()
    assert len(calls) == -(-images // 4) + -(-captions // 4)  # one call per batch of images, then of captions
    assert {t for _, t in calls} == {images + captions} and calls[-1][0] == images + captions
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # The command shows the bar on stderr; --quiet silences it.
    args = ("eval", world, "--model", "tbps-tiny", "--workers", "0", "--device", "cpu", "--batch-size", "4")
    res = cli(*args, "--out", tmp_path / "a.json")
    assert res.exit_code == 0 and "evaluating" in res.stderr and f"{images + captions}/{images + captions}" in res.stderr, res.output
    res = cli(*args, "--out", tmp_path / "b.json", "--quiet")
    assert res.exit_code == 0 and "evaluating" not in res.stderr, res.output
