"""``tbps demo``: the pure pieces (manifests, aggregation, claims, tables) and ``--quick`` end to end."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from tbps import columns as C
from tbps.demo.claims import aggregate, judge_claims, paired
from tbps.demo.plan import VARIANTS, DemoConfig, full_manifest, random_manifest, steps_for
from tbps.demo.report import markdown_table
from tbps.demo.run import MARKER, prepare_out
from tbps.errors import TbpsError, UsageError


def _scores(n: int = 10, bad: int = 2) -> pl.DataFrame:
    """A score table of ``n`` rows, the last ``bad`` of them with a non-ok status."""
    return pl.DataFrame({
        C.PAIR_ID: [f"{i}:0" for i in range(n)],
        C.IMAGE_PATH: [f"/img/{i}.jpg" for i in range(n)],
        C.CAPTION: [f"caption {i}" for i in range(n)],
        C.SCORE: [float(i) / n for i in range(n)],
        C.STATUS: [C.STATUS_OK] * (n - bad) + [C.STATUS_MISSING_IMAGE] * bad,
    })


def test_full_manifest_keeps_every_ok_row_sorted():
    scores = _scores().reverse()
    full = full_manifest(scores)
    assert full.height == 8
    assert full.get_column(C.PAIR_ID).to_list() == sorted(f"{i}:0" for i in range(8))
    assert set(full.get_column(C.STATUS).to_list()) == {C.STATUS_OK}


def test_random_manifest_draws_ok_rows_once_deterministically():
    scores = _scores(50, bad=5)
    a, b = random_manifest(scores, 20, seed=3), random_manifest(scores, 20, seed=3)
    assert a.equals(b)
    ids = a.get_column(C.PAIR_ID).to_list()
    assert len(ids) == 20 == len(set(ids)) and ids == sorted(ids)
    assert set(a.get_column(C.STATUS).to_list()) == {C.STATUS_OK}
    assert random_manifest(scores, 20, seed=4).get_column(C.PAIR_ID).to_list() != ids
    with pytest.raises(TbpsError, match="cannot draw 46 random rows from 45 ok rows"):
        random_manifest(scores, 46, seed=0)


@pytest.mark.parametrize(("rows", "batch", "epochs", "expected"), [(100, 32, 2, 6), (31, 32, 3, 1), (64, 32, 1, 2)])
def test_steps_for_drops_the_last_incomplete_batch(rows, batch, epochs, expected):
    assert steps_for(rows, batch, epochs) == expected


def _run(r1: float, mAP: float | None = None, trainable: int = 100, seconds: float = 10.0) -> dict:
    return {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 if mAP is None else mAP, "mINP": r1 / 2, "trainable": trainable,
            "total": 1000, "train_seconds": seconds, "pairs_seen": 640, "steps": 20, "val_R1": r1, "best_step": 20}


def test_aggregate_gives_mean_and_sample_std_in_variant_order():
    measured = {"filtered-wora": [_run(10.0), _run(14.0)], "baseline": [_run(30.0)]}
    rows = aggregate(measured)
    assert [r["key"] for r in rows] == ["baseline", "filtered-wora"]
    assert rows[0]["R1"] == {"mean": 30.0, "std": None} and rows[0]["seeds"] == 1
    assert rows[1]["R1"]["mean"] == 12.0 and rows[1]["R1"]["std"] == pytest.approx(math.sqrt(8.0))


def test_paired_differences_are_taken_seed_by_seed():
    measured = {"a": [_run(10.0), _run(20.0), _run(30.0)], "b": [_run(9.0), _run(21.0), _run(27.0)]}
    d = paired(measured, "a", "b", "R1")
    assert d["diff"] == pytest.approx(1.0) and d["diff_std"] == pytest.approx(2.0) and d["noise"] is True
    one = paired({"a": [_run(5.0)], "b": [_run(3.0)]}, "a", "b", "R1")
    assert one["diff"] == 2.0 and one["diff_std"] is None and one["noise"] is False


def _measured(filtered: float, full: float, random: float, wora: float, dora: float, lora: float, full_ft: float,
              t_filtered: float = 4.0, t_full: float = 10.0) -> dict:
    return {
        "pretrain-filtered": [_run(filtered, seconds=t_filtered, trainable=1000)],
        "pretrain-full": [_run(full, seconds=t_full, trainable=1000)],
        "pretrain-random": [_run(random, seconds=t_filtered, trainable=1000)],
        "filtered-wora": [_run(wora, trainable=20)],
        "full-wora": [_run(full)],
        "random-wora": [_run(random)],
        "filtered-dora": [_run(dora)],
        "filtered-lora": [_run(lora)],
        "filtered-full": [_run(full_ft, trainable=1000)],
    }


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        # Every claim holds: filtered beats full and random, WoRA beats full FT, DoRA and LoRA.
        (_measured(5, 3, 2, 40, 35, 30, 39), ["holds", "holds", "holds", "holds"]),
        # Full pool and random control win (the subset still trains faster); WoRA trails full FT and LoRA.
        (_measured(5, 3, 2, 20, 15, 25, 30) | {"full-wora": [_run(25)], "random-wora": [_run(22)]},
         ["mixed", "does not hold", "does not hold", "mixed"]),
        # Slower and worse than the full pool: nothing of that claim holds (random still loses).
        (_measured(5, 3, 2, 20, 15, 25, 30, t_filtered=12.0) | {"full-wora": [_run(25)]},
         ["does not hold", "holds", "does not hold", "mixed"]),
        # Filtered wins on R@1 but the full pool trained faster: mixed.
        (_measured(5, 3, 2, 40, 35, 30, 39, t_filtered=12.0, t_full=10.0), ["mixed", "holds", "holds", "holds"]),
    ],
)
def test_claims_are_judged_as_measured(measured, expected):
    claims = judge_claims(measured, None)
    assert [c.name for c in claims] == ["filtered 40% vs the full pool", "filtered 40% vs a random 40%",
                                        "WoRA vs full fine-tuning", "WoRA vs DoRA vs LoRA at the same rank"]
    assert [c.verdict for c in claims] == expected


def test_verdicts_that_rest_on_seed_noise_say_so():
    measured = _measured(5, 3, 2, 40, 35, 30, 39)
    # Two seeds: WoRA beats DoRA by 1 and 9 points (mean 5, std 5.66: within noise), LoRA by 10 and 11.
    measured["filtered-wora"] = [_run(40, trainable=20), _run(48, trainable=20)]
    measured["filtered-dora"] = [_run(39), _run(39)]
    measured["filtered-lora"] = [_run(30), _run(37)]
    claim = judge_claims(measured, None)[3]
    assert claim.verdict == "holds (within seed noise)"
    assert "WoRA - DoRA +5.00 ± 5.66 pts (within seed noise)" in claim.measured


def test_claims_state_the_numbers():
    claims = judge_claims(_measured(5, 3, 2, 40, 35, 30, 39), None)
    data, _, wora_full, _ = claims
    assert "60.0% less" in data.measured and data.numbers["time_saving_pct"] == pytest.approx(60.0)
    assert "gap +1.00 pts" in wora_full.measured and "2.00% of the parameters" in wora_full.measured


def test_filter_claim_reads_the_truth_metrics():
    overall = {"auroc_bank_rank": 0.8, "auroc_score": 0.75, "removed_defective": 30, "defective": 40, "recall": 0.75,
               "precision": 0.5, "pairs": 100, "removed": 60}
    kinds = {"blank-image": {"auroc_bank_rank": 0.99, "recall": 1.0}, "exact-duplicate": {"auroc_bank_rank": 0.5, "recall": 0.9}}
    truth = {"overall": overall, "kinds": kinds, "paper_rule": {"overall": {**overall, "removed": 20, "recall": 0.3, "precision": 0.6}}}
    (claim,) = judge_claims({}, truth)
    # Duplicates are de-duplication's job: their AUROC does not count against the filter.
    assert claim.verdict == "holds" and claim.numbers["weak_kinds"] == []
    assert "AUROC of bank_rank 0.800" in claim.measured and "80 pairs kept" in claim.measured
    assert "exact-duplicate 0.900" in claim.measured
    kinds["swapped-attribute"] = {"auroc_bank_rank": 0.52, "recall": 0.3}
    (claim,) = judge_claims({}, truth)
    assert claim.verdict == "mixed" and claim.numbers["weak_kinds"] == ["swapped-attribute"]
    assert "swapped-attribute 0.520" in claim.measured
    truth["overall"] = {**overall, "auroc_bank_rank": 0.4}
    assert judge_claims({}, truth)[0].verdict == "does not hold"


def test_markdown_table_has_a_line_per_variant_with_std_over_seeds():
    measured = {v.key: [_run(10.0), _run(12.0)] for v in VARIANTS}
    text = markdown_table(aggregate(measured))
    lines = text.splitlines()
    assert len(lines) == 2 + len(VARIANTS)
    assert lines[0].startswith("| variant | R@1 |")
    assert all(v.label in text for v in VARIANTS)
    assert "11.00 ± 1.41" in lines[2]


@pytest.mark.parametrize(
    ("options", "field"),
    [({"seeds": 0}, "--seeds"), ({"seeds": 11}, "--seeds"), ({"keep": 1.0}, "--keep"), ({"keep": 0.0}, "--keep"),
     ({"workers": -1}, "--workers"), ({"threads": -1}, "--threads"), ({"seed": True}, "--seed")],
)
def test_config_refuses_bad_options(options, field):
    with pytest.raises(UsageError) as info:
        DemoConfig(**options)
    assert info.value.field == field


def test_prepare_out_replaces_only_a_previous_demo(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(TbpsError, match="holds no previous tbps demo"):
        prepare_out(other)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(TbpsError, match="is a file"):
        prepare_out(tmp_path / "file")
    out = prepare_out(tmp_path / "demo")
    (out / "old.txt").write_text("from the last demo")
    assert prepare_out(out) == out and sorted(p.name for p in out.iterdir()) == [MARKER]


def test_cli_reports_bad_options_and_a_foreign_out_dir(tmp_path, cli):
    res = cli("demo", "--seeds", "0", "--out", tmp_path / "d")
    assert res.exit_code == 2 and "--seeds" in res.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = cli("demo", "--quick", "--out", tmp_path / "mine")
    assert res.exit_code == 1 and "holds no previous tbps demo" in res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, cli):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "R@1" in res.output and "the paper's claims" in res.output
    record = json.loads((out / "results.json").read_text())
    assert [row["key"] for row in record["table"]] == [v.key for v in VARIANTS]
    for row in record["table"]:
        assert all(0.0 <= row[m]["mean"] <= 100.0 for m in ("R1", "R5", "R10", "mAP", "mINP")), row
        assert row["R1"]["mean"] <= row["R5"]["mean"] <= row["R10"]["mean"]
        assert row["pairs_seen"]["mean"] > 0 and row["train_seconds"]["mean"] > 0
    shares = {row["key"]: row["trainable"]["mean"] / row["total"]["mean"] for row in record["table"]}
    assert shares["filtered-full"] == 1.0 and 0 < shares["filtered-wora"] < 0.05
    # Equal epochs in stage A: the 40% subsets take fewer steps than the whole pool.
    steps = {row["key"]: row["steps"]["mean"] for row in record["table"]}
    assert steps["pretrain-filtered"] == steps["pretrain-random"] < steps["pretrain-full"]
    assert len({steps[v.key] for v in VARIANTS if v.stage == "fine-tune"}) == 1
    # The filter kept 40% of the pool; the random control drew as many rows; truth metrics are there.
    pool = json.loads((out / "world" / "pool" / "pool.json").read_text())
    filtered = pl.read_parquet(out / "manifests" / "filtered.parquet")
    assert filtered.height == int(0.4 * len(pool)) == pl.read_parquet(out / "manifests" / "random-seed0.parquet").height
    assert record["selections"]["keep 0.4"]["overall"]["pairs"] == len(pool)
    assert {c["name"] for c in record["claims"]} >= {"the filter finds the defects", "WoRA vs full fine-tuning"}
    markdown = (out / "results.md").read_text()
    assert "Quick mode" in markdown and "| filtered 40% -> WoRA (per-input norm) |" in markdown
    assert (out / "report.html").stat().st_size > 1000 and (out / "report-scores.html").stat().st_size > 1000
    # Test metrics come from test-split evaluations only: one record per evaluated model.
    assert len(list((out / "eval").glob("*.json"))) == len(VARIANTS)
