"""``tbps train --log-to csv,tensorboard``: the scalars of log.jsonl in RUN/log.csv and RUN/tensorboard/, a resume appending without duplicates."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tbps.errors import UsageError
from tbps.train.loop import TrainConfig, train
from tbps.train.sinks import CSV_LOG_FILE, TENSORBOARD_DIR, LogSinks, parse_log_to

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAVE_TENSORBOARD, reason="the tensorboard package (tbps[tensorboard]) is not installed")
FAST = ["--model", "tbps-tiny", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--lr", "3e-3"]


def _jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _csv(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / CSV_LOG_FILE, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def _same(cell: str, value) -> bool:
    return cell == "" if value is None else (float(cell) == pytest.approx(float(value), rel=1e-12) if isinstance(value, (int, float)) else cell == str(value))


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def data(synth_world) -> Path:
    return synth_world(0) / "benchmark" / "reid_raw.json"


def test_csv_has_one_header_and_a_row_per_logged_step_and_validation(cli, data, tmp_path):
    run = tmp_path / "run"
    res = cli("train", "--data", data, "--val", data, "--out", run, *FAST, "--steps", "3", "--val-every", "2", "--log-every", "1",
              "--log-to", "csv", "--quiet")
    assert res.exit_code == 0, res.output
    lines = _jsonl(run)
    header, rows = _csv(run)
    assert (run / CSV_LOG_FILE).read_text().count("kind,step") == 1
    assert [(r["kind"], int(r["step"])) for r in rows] == [(ln["kind"], ln["step"]) for ln in lines] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("val", 3)]
    assert header[:7] == ["kind", "step", "epoch", "loss", "lr", "img_per_s", "wall_s"] and {"R1", "mAP"} <= set(header)
    for row, line in zip(rows, lines):
        assert all(_same(row[key], line.get(key)) for key in header), (row, line)
    assert not (run / TENSORBOARD_DIR).exists()  # only what --log-to asked for


def test_without_log_to_only_jsonl_is_written(cli, data, tmp_path):
    res = cli("train", "--data", data, "--out", tmp_path / "run", *FAST, "--steps", "1", "--quiet")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "log.jsonl").is_file() and not (tmp_path / "run" / CSV_LOG_FILE).exists()
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()


class _Crash(Exception):
    pass


def _crash_at_3(step: int, total: int) -> None:
    if step == 3:
        raise _Crash  # killed after step 3: RUN/last holds step 2, log.jsonl has step 3


@pytest.mark.parametrize("targets", [("csv",), pytest.param(("csv", "tensorboard"), marks=[needs_tensorboard, pytest.mark.slow])])
def test_a_resume_appends_without_duplicating_rows(data, tmp_path, targets):
    run = tmp_path / "run"
    config = dict(out=str(run), model="tbps-tiny", data=str(data), batch_size=8, workers=0, precision="fp32", device="cpu", warmup=1,
                  lr=3e-3, steps=4, save_every=2, log_every=1)
    with pytest.raises(_Crash), LogSinks(run, targets) as sinks:
        train(TrainConfig(**config), progress=sinks.follow(_crash_at_3))
    assert [int(r["step"]) for r in _csv(run)[1]] == [1, 2, 3]  # step 3 was logged past the checkpoint
    with LogSinks(run, targets) as sinks:
        train(TrainConfig(**config, resume=True), progress=sinks.follow())
    lines = _jsonl(run)
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4]  # log.jsonl cut back to step 2, then steps 3 and 4 again
    assert [(int(r["step"]), float(r["loss"])) for r in _csv(run)[1]] == [(ln["step"], ln["loss"]) for ln in lines]
    if "tensorboard" in targets:
        events = _events(run)
        assert set(events) == {f"train/{k}" for k in ("epoch", "loss", "lr", "img_per_s", "wall_s")}
        assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4]  # each step once after the resume
        assert [v for _, v in events["train/loss"]] == pytest.approx([ln["loss"] for ln in lines], rel=1e-6)  # float32 in the event file
        assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1


@needs_tensorboard
def test_tensorboard_holds_the_scalars_of_log_jsonl(cli, data, tmp_path):
    run = tmp_path / "run"
    res = cli("train", "--data", data, "--val", data, "--out", run, *FAST, "--steps", "2", "--val-every", "2", "--log-every", "1",
              "--log-to", "tensorboard", "--quiet")
    assert res.exit_code == 0, res.output
    events, lines = _events(run), _jsonl(run)
    val = [ln for ln in lines if ln["kind"] == "val"]
    assert [s for s, _ in events["val/R1"]] == [2] and events["val/R1"][0][1] == pytest.approx(val[0]["R1"], rel=1e-6)
    assert [v for _, v in events["train/lr"]] == pytest.approx([ln["lr"] for ln in lines if ln["kind"] == "train"], rel=1e-6)
    assert not (run / CSV_LOG_FILE).exists()


def test_log_to_is_checked_before_anything_runs(cli, data, tmp_path, monkeypatch):
    assert parse_log_to(None) == () and parse_log_to(["jsonl"]) == ()
    assert parse_log_to(["csv,jsonl", "csv"]) == ("csv",)
    with pytest.raises(UsageError, match="--log-to takes jsonl, csv, tensorboard"):
        parse_log_to("wandb")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the package were not installed
    res = cli("train", "--data", data, "--out", tmp_path / "run", *FAST, "--steps", "1", "--log-to", "csv,tensorboard")
    assert res.exit_code == 2, res.output
    assert "pip install 'tbps[tensorboard]'" in " ".join(res.output.replace("│", " ").split())
    assert not (tmp_path / "run").exists()


def test_a_new_key_widens_the_header_and_a_line_being_written_waits(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = run / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1, "loss": 2.5}\n')
    with LogSinks(run, ("csv",)) as sinks:
        sinks.sync()
        assert (run / CSV_LOG_FILE).read_text() == "kind,step,loss\ntrain,1,2.5\n"
        with open(log, "a") as f:
            f.write('{"kind": "train", "step": 2, "loss": 2.25}\n{"kind": "val", "step": 2, "R1": 50.0, "note": null}\n{"kind": "tr')
        sinks.sync()
        assert (run / CSV_LOG_FILE).read_text() == "kind,step,loss,R1,note\ntrain,1,2.5,,\ntrain,2,2.25,,\nval,2,,50.0,\n"
        with open(log, "a") as f:
            f.write('ain", "step": 3, "loss": 2.0}\n')
        sinks.sync()
        assert (run / CSV_LOG_FILE).read_text().endswith("val,2,,50.0,\ntrain,3,2.0,,\n")


def test_log_to_may_come_from_a_config_file(cli, data, tmp_path):
    (tmp_path / "train.yaml").write_text(f"data: {data}\nsteps: 1\nlog-to: [csv]\n")
    res = cli("train", "--config", tmp_path / "train.yaml", "--out", tmp_path / "run", *FAST, "--quiet")
    assert res.exit_code == 0, res.output
    assert [int(r["step"]) for r in _csv(tmp_path / "run")[1]] == [1]
