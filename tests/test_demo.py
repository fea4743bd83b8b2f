"""tbps demo: the plan (arms, equal epochs / equal steps), the gate, the claims, the executor, and --quick end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import polars as pl
import pytest

from tbps import columns as C
from tbps.demo.claims import COMPARISONS, NOT_JUDGED, NOT_TESTABLE, compare, judge_claims, judge_gate
from tbps.demo.plan import (
    ARM,
    ARMS,
    FINETUNE,
    GATE_POINTS,
    MARGIN,
    METHODS,
    POOL_SUBSETS,
    PRETRAIN,
    MAX_EXTENSIONS,
    DemoConfig,
    choose_lr,
    grid_extension,
    next_rate,
    ok_rows,
    oracle_rows,
    random_rows,
    read_tuning,
    steps_for,
)
from tbps.demo.run import MARKER, Job, _execute, _no_op, _Tuning, prepare_out
from tbps.errors import TbpsError, UsageError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _scores(n: int = 10) -> pl.DataFrame:
    return pl.DataFrame({
        C.PAIR_ID: [f"{i}:0" for i in reversed(range(n))],
        C.STATUS: [C.STATUS_OK if i % 5 else "bad-image" for i in reversed(range(n))],
    })


def test_ok_rows_keeps_every_ok_row_sorted():
    rows = ok_rows(_scores())
    assert rows.height == 8 and rows[C.PAIR_ID].to_list() == sorted(rows[C.PAIR_ID].to_list())


def test_random_and_oracle_rows_are_deterministic_and_of_the_asked_size():
    scores = _scores(20)
    a, b = random_rows(scores, 5, seed=3), random_rows(scores, 5, seed=3)
    assert a.equals(b) and a.height == 5 and a[C.PAIR_ID].n_unique() == 5
    assert not a.equals(random_rows(scores, 5, seed=4))
    with pytest.raises(TbpsError, match="cannot draw"):
        random_rows(scores, 99, seed=0)
    truth = pl.DataFrame({C.PAIR_ID: scores[C.PAIR_ID], C.DEFECT: [C.DEFECT_NONE if i % 2 else C.DEFECT_SWAPPED for i in range(20)]})
    oracle = oracle_rows(scores, truth, 4, seed=0)
    clean = set(truth.filter(pl.col(C.DEFECT) == C.DEFECT_NONE)[C.PAIR_ID])
    assert oracle.height == 4 and set(oracle[C.PAIR_ID]) <= clean
    assert oracle_rows(scores, truth, 100, seed=0).height == len(clean & set(ok_rows(scores)[C.PAIR_ID]))  # all of them


@pytest.mark.parametrize(("rows", "batch", "epochs", "expected"), [(100, 32, 2, 6), (31, 32, 3, 1), (64, 32, 1, 2)])
def test_steps_for_drops_the_last_incomplete_batch(rows, batch, epochs, expected):
    assert steps_for(rows, batch, epochs) == expected


def test_the_plan_has_every_arm_the_experiment_needs():
    pretrain = {a.data for a in ARMS if a.stage == PRETRAIN}
    assert pretrain == set(POOL_SUBSETS)
    for arm in ARMS:
        if arm.stage == FINETUNE:
            assert arm.init in ARM and ARM[arm.init].stage == PRETRAIN, arm
        assert arm.method in METHODS
    # Equal steps: one stage-A arm trains on the whole pool for the filtered subset's steps.
    assert [a.key for a in ARMS if a.steps_of] == ["A-full-steps"] and ARM["A-full-steps"].steps_of == "A-filtered"
    # The adapter comparison starts from one model, the filtered one.
    adapters = [a for a in ARMS if a.method != "full" and a.stage == FINETUNE]
    assert {a.init for a in adapters} == {"A-filtered"}
    assert {a.method for a in adapters} == set(METHODS) - {"alone", "full"}
    # Every comparison names measured arms.
    assert all(a in ARM and b in ARM for _, a, b, _ in COMPARISONS)


def test_methods_match_wora_scale_and_have_a_three_point_grid():
    rank = 8
    assert METHODS["dora"].train_options(rank)["lora_alpha"] == 8 * rank
    assert METHODS["lora"].train_options(rank) == {"adapter": "lora", "lora_alpha": 64.0}
    assert METHODS["wora-fixed"].train_options(rank) == {"adapter": "wora", "fixed_scale": True}
    assert "also_train" in METHODS["wora-plus"].train_options(rank)
    assert all(len(m.grid) == 3 for m in METHODS.values())
    assert METHODS["full"].grid == (1e-4, 3e-4, 1e-3) and METHODS["wora"].grid == (1e-3, 3e-3, 1e-2)


def test_the_learning_rate_is_chosen_on_val_and_a_tie_takes_the_smaller():
    chosen = choose_lr({"full": {1e-4: 10.0, 3e-4: 12.5, 1e-3: 11.0}, "wora": {1e-3: 20.0, 3e-3: 20.0, 1e-2: 5.0}})
    assert chosen == {"full": 3e-4, "wora": 1e-3}


@pytest.mark.parametrize(
    ("lr", "up", "expected"),
    [(1e-3, True, 3e-3), (3e-3, True, 1e-2), (1e-3, False, 3e-4), (3e-4, False, 1e-4), (1e-2, True, 3e-2), (3e-5, False, 1e-5)],
)
def test_the_rate_ladder_steps_by_about_three(lr, up, expected):
    assert next_rate(lr, up) == expected


def test_a_rate_off_the_ladder_is_refused():
    with pytest.raises(ValueError, match="ladder"):
        next_rate(5e-4, up=True)


@pytest.mark.parametrize(
    ("scores", "added", "expected"),
    [
        ({1e-4: 10.0, 3e-4: 12.0, 1e-3: 11.0}, 0, None),  # interior: done
        ({1e-4: 10.0, 3e-4: 11.0, 1e-3: 12.0}, 0, 3e-3),  # best at the top edge: one step up
        ({1e-3: 56.0, 3e-3: 53.0, 1e-2: 44.0}, 0, 3e-4),  # best at the bottom edge: one step down
        ({1e-4: 56.0, 3e-4: 56.0, 1e-3: 53.75}, 0, 3e-5),  # a tie takes the smaller rate, an edge
        ({1e-4: 10.0, 3e-4: 11.0, 1e-3: 12.0}, MAX_EXTENSIONS, None),  # the extensions are spent
    ],
)
def test_a_grid_grows_past_an_edge_choice_only(scores, added, expected):
    assert grid_extension(scores, added) == expected


class _FakeDemo:
    """tuning_job() of a demo whose val R@1 is a known curve of the learning rate (a job returns its spec)."""

    def __init__(self, curves):
        self.curves = curves

    def tuning_job(self, method, lr):
        return Job(f"tune/{method}/{lr:g}", (), dict, lambda done: {"val_R1": self.curves[method](lr)})


def test_tuning_grows_each_grid_until_its_choice_is_interior_and_stage_b_waits_for_all_of_it():
    import math

    def peak(at):
        return lambda lr: 50.0 - abs(math.log10(lr) - math.log10(at))

    curves = {name: peak(3e-4) if name in ("full", "alone") else peak(3e-3) for name in METHODS}
    curves["alone"] = peak(3e-3)  # beyond its first grid's top (1e-3): two steps added, 3e-3 and 1e-2
    curves["wora"] = lambda lr: 50.0 + math.log10(1.0 / lr)  # always better lower: the extensions run out
    tuner = _Tuning(_FakeDemo(curves))
    order: list[str] = []

    def on_done(name, res):
        order.append(name)
        return tuner.finished(name, res) if name.startswith("tune/") else []

    jobs = tuner.jobs() + [Job("stage-b", (_Tuning.BARRIER,), _no_op, lambda done: {})]
    _execute(jobs, 2, {}, on_done)
    record = tuner.record()
    assert record["extended"] == {"alone": [3e-3, 1e-2], "wora": [3e-4, 1e-4, 3e-5]}
    assert record["chosen"]["alone"] == 3e-3 and record["chosen"]["full"] == 3e-4 and record["chosen"]["wora"] == 3e-5
    assert record["at_edge"] == ["wora"]
    assert record["grid"]["alone"] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and record["first_grid"]["alone"] == list(METHODS["alone"].grid)
    assert set(record["val_R1"]["wora"]) == {"3e-05", "0.0001", "0.0003", "0.001", "0.003", "0.01"}
    tuned = [n for n in order if n.startswith("tune/")]
    assert len(tuned) == 3 * len(METHODS) + 5
    assert order.index(_Tuning.BARRIER) > max(order.index(n) for n in tuned) and order[-1] == "stage-b"


@pytest.mark.parametrize(
    ("oracle", "alone", "passed"),
    [([30.0, 32.0], [20.0, 30.0], True), ([25.0, 26.0], [21.0, 21.0], False), ([25.0], [20.0], True)],
)
def test_the_gate_compares_the_mean_of_the_per_seed_differences(oracle, alone, passed):
    gate = judge_gate({"oracle": oracle, "alone": alone})
    diffs = [a - b for a, b in zip(oracle, alone)]
    assert gate["passed"] is passed and gate["threshold"] == GATE_POINTS
    assert gate["mean_difference"] == pytest.approx(sum(diffs) / len(diffs))
    assert [p["difference"] for p in gate["per_seed"]] == diffs
    assert [p["seed"] for p in gate["per_seed"]] == list(range(len(diffs)))


def test_the_gate_names_the_seeds_it_was_given():
    gate = judge_gate({"oracle": [30.0, 31.0], "alone": [20.0, 20.0]}, seeds=[7, 8])
    assert [p["seed"] for p in gate["per_seed"]] == [7, 8]


def test_a_gate_without_measurements_does_not_pass():
    gate = judge_gate({})
    assert gate["passed"] is False and gate["mean_difference"] is None


def _interval(mean: float, lo: float, hi: float) -> dict:
    return {"mean": mean, "lo": lo, "hi": hi, "std": None, "per_seed": [mean]}


def _verdict(d: dict) -> str:
    return "better" if d["lo"] > 0 else "worse" if d["hi"] < 0 else "within noise"


def _comparisons(intervals: dict[tuple[str, str], dict]) -> list[dict]:
    return compare(lambda a, b, metric: intervals.get((a, b)) if metric == "R1" else None, _verdict)


PASSED = {"passed": True}


@pytest.mark.parametrize(
    ("interval", "expected"),
    [((-0.5, -1.5, 0.5), "holds"), ((-4.0, -6.0, -2.5), "does not hold"), ((-1.0, -3.0, 1.0), "inconclusive (the interval spans the margin)")],
)
def test_competitive_claims_are_judged_on_the_interval_against_the_margin(interval, expected):
    comps = _comparisons({("filtered", "full"): _interval(*interval), ("filtered-wora", "filtered"): _interval(*interval)})
    claims = {c["claim"]: c for c in judge_claims(comps, {"A-filtered": 60.0, "A-full": 100.0}, {"filtered-wora": 8.3}, None, PASSED)}
    assert claims["filtered data: competitive accuracy with less training time"]["verdict"] == expected
    assert claims["WoRA light fine-tuning is competitive with full fine-tuning"]["verdict"] == expected
    assert "40.0% fewer steps" in claims["filtered data: competitive accuracy with less training time"]["measured"]
    # With step counts given, the saving is counted in steps and the wall time is reported beside it.
    by_steps = judge_claims(comps, {"A-filtered": 90.0, "A-full": 100.0}, {}, None, PASSED, steps={"A-filtered": 300.0, "A-full": 500.0})
    measured = next(c for c in by_steps if c["claim"].startswith("filtered data"))["measured"]
    assert "40.0% fewer steps (10.0% less wall time)" in measured
    assert f"{interval[0]:+.2f}" in claims["WoRA light fine-tuning is competitive with full fine-tuning"]["measured"]
    assert MARGIN == 2.0


def test_the_filter_claim_needs_the_auroc_and_the_win_over_random():
    comps = _comparisons({("filtered", "random"): _interval(3.0, 1.0, 5.0), ("filtered", "oracle"): _interval(-2.0, -4.0, 0.5)})
    good = {"relevance": {"auroc_bank_rank": 0.8}}
    weak = {"relevance": {"auroc_bank_rank": 0.55}}
    verdict = lambda truth: judge_claims(comps, {}, {}, truth, PASSED)[0]["verdict"]  # noqa: E731
    assert verdict(good) == "holds" and verdict(weak) == "mixed"
    losing = _comparisons({("filtered", "random"): _interval(-1.0, -3.0, 1.0)})
    assert judge_claims(losing, {}, {}, weak, PASSED)[0]["verdict"] == "does not hold"


def test_wora_against_its_rivals_needs_both_wins():
    both = _comparisons({("filtered-wora", "filtered-dora"): _interval(2, 1, 3), ("filtered-wora", "filtered-lora"): _interval(2, 0.5, 3)})
    one = _comparisons({("filtered-wora", "filtered-dora"): _interval(2, 1, 3), ("filtered-wora", "filtered-lora"): _interval(0, -1, 1)})
    lost = _comparisons({("filtered-wora", "filtered-dora"): _interval(-2, -3, -1), ("filtered-wora", "filtered-lora"): _interval(0, -1, 1)})
    name = "WoRA beats DoRA and LoRA at the same rank and scale"
    verdicts = [next(c for c in judge_claims(x, {}, {}, None, PASSED) if c["claim"] == name)["verdict"] for x in (both, one, lost)]
    assert verdicts == ["holds", "within noise", "does not hold"]


def test_a_failed_gate_makes_the_curation_claims_untestable_and_quick_mode_judges_nothing():
    comps = _comparisons({("filtered", "full"): _interval(0.5, -1, 2), ("filtered", "random"): _interval(3.0, 1.0, 5.0)})
    failed = judge_claims(comps, {"A-filtered": 1.0, "A-full": 2.0}, {}, {"relevance": {"auroc_bank_rank": 0.9}}, {"passed": False})
    assert {c["verdict"] for c in failed} == {NOT_TESTABLE}
    assert all(c["measured"] for c in failed)  # the numbers are reported all the same
    rivals = _comparisons({("filtered-wora", "filtered-dora"): _interval(2, 1, 3), ("filtered-wora", "filtered-lora"): _interval(2, 0.5, 3)})
    # WoRA vs its rivals needs no pretraining gain: it is judged whatever the gate says.
    assert [c["verdict"] for c in judge_claims(rivals, {}, {}, None, {"passed": False})] == ["holds"]
    quick = judge_claims(comps, {"A-filtered": 1.0, "A-full": 2.0}, {}, None, PASSED, judged=False)
    assert {c["verdict"] for c in quick} == {NOT_JUDGED}


def test_the_executor_runs_jobs_after_their_dependencies_and_refuses_unknown_ones():
    order: list[str] = []
    jobs = [Job("b", ("a",), _no_op, lambda done: {}), Job("a", (), _no_op, lambda done: {}), Job("c", ("a", "b"), _no_op, lambda done: {})]
    done: dict = {}
    _execute(jobs, 2, done, lambda name, res: order.append(name))
    assert order == ["a", "b", "c"] and set(done) == {"a", "b", "c"}
    with pytest.raises(TbpsError, match="unknown jobs"):
        _execute([Job("x", ("nope",), _no_op, lambda done: {})], 1, {}, lambda name, res: None)
    with pytest.raises(TbpsError, match="wait on each other"):
        _execute([Job("x", ("y",), _no_op, lambda done: {}), Job("y", ("x",), _no_op, lambda done: {})], 1, {}, lambda name, res: None)


@pytest.mark.parametrize(
    ("options", "field"),
    [({"seeds": 0}, "--seeds"), ({"seeds": 11}, "--seeds"), ({"jobs": 0}, "--jobs"), ({"workers": -1}, "--workers"), ({"seed": True}, "--seed")],
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
    rows = {row["key"]: row for row in record["table"]}
    assert set(rows) <= set(ARM) and {"alone", "A-full", "full", "filtered", "random", "oracle", "filtered-wora"} <= set(rows)
    for row in rows.values():
        for m in ("R1", "R5", "R10", "mAP", "mINP"):
            stat = row["metrics"][m]
            assert 0.0 <= stat["lo"] <= stat["mean"] <= stat["hi"] <= 100.0, (row["key"], m, stat)
        assert row["metrics"]["R1"]["mean"] <= row["metrics"]["R5"]["mean"] <= row["metrics"]["R10"]["mean"]
    # Equal epochs in stage A: the same-size subsets take the same, fewer steps; equal steps: the full pool for as many.
    steps = {k: r["steps"] for k, r in rows.items()}
    assert steps["A-random"] == steps["A-oracle"] == steps["A-full-steps"] < steps["A-full"]
    assert len({steps[k] for k in ("alone", "full", "filtered", "random", "oracle", "filtered-wora")}) == 1
    assert rows["full"]["trainable"] == rows["full"]["total"] and 0 < rows["filtered-wora"]["trainable"] < rows["filtered-wora"]["non_embedding_total"]
    # The subsets have the pool's clean share; the gate, the claims and the comparisons are recorded.
    pool = json.loads((out / "world" / "pool" / "pool.json").read_text())
    assert record["subset_rows"] == int(0.6 * len(pool)) == pl.read_parquet(out / "manifests" / "random-seed0.parquet").height
    assert record["gate"]["threshold"] == GATE_POINTS and "passed" in record["gate"]
    assert {c["verdict"] for c in record["claims"]} == {NOT_JUDGED}
    assert {c["name"] for c in record["comparisons"]} >= {"filtered vs random (same size)", "WoRA vs full fine-tuning"}
    assert record["tuning"]["chosen"]["wora"] == 3e-3  # --quick: each grid's middle rate, and it says so
    # Test metrics come from test-split evaluations only; tuning never ran (no test evaluation there).
    evaluated = {p.stem for p in (out / "eval").rglob("*.json")}
    assert evaluated == set(rows)
    markdown = (out / "results.md").read_text()
    assert "| fine-tune alone (no pretraining) |" in markdown
    html = (out / "report.html").read_text()
    assert html.index("Results on the test split") < html.index("The paper's claims, as measured") and "<svg" in html
    for page in record["links"]["selections"].values():
        assert (out / page).is_file()
    if CHROMIUM:
        env = {**os.environ, "HOME": str(tmp_path)}
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                              "--dump-dom", (out / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=120, env=env)
        assert "fine-tune alone" in dom.stdout and "<svg" in dom.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "no recorded learning-rate choice"), ("{not json", "unreadable tuning record"), ('{"chosen": {"full": 0.001}}', "unreadable tuning record")],
)
def test_a_missing_or_damaged_tuning_record_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "tuning.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TbpsError, match=message):
        read_tuning(path)


def test_the_recorded_tuning_names_every_method_and_its_choice_is_on_its_grid():
    record = read_tuning()
    for name, method in METHODS.items():
        grid = record["grid"][name]
        assert set(method.grid) <= set(grid) and record["chosen"][name] in grid
        scores = record["val_R1"][name]
        assert len(scores) == len(grid)
        assert scores[f"{record['chosen'][name]:g}"] == max(scores.values())
        # Interior, or recorded as still at an edge after the grid grew as far as it may.
        if record["chosen"][name] in (min(grid), max(grid)):
            assert name in record.get("at_edge", []) and len(record["extended"][name]) == MAX_EXTENSIONS
