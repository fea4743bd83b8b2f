"""bench/profile_score.py, bench/gpu.py and bench/itm_gpu.py: the stage timers attribute time rightly; the budget skips phases, and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tbps import columns as C

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from gpu import Budget, render, spearman  # noqa: E402
from profile_score import STAGES, Stages, profile_run  # noqa: E402

from test_score import config, make_world  # noqa: E402


def test_nested_stages_are_subtracted_and_background_threads_are_apart():
    stages = Stages(lambda: None)
    with stages.timed("part tables"):
        time.sleep(0.05)
        with stages.timed("bank rank"):
            time.sleep(0.1)
    worker = threading.Thread(target=lambda: stages.wrap(time.sleep, "parquet write")(0.05))
    worker.start()
    worker.join()
    assert 0.09 <= stages.main["bank rank"] < 0.3
    assert 0.04 <= stages.main["part tables"] < 0.09  # its own time, without the bank rank inside it
    assert stages.main.get("parquet write", 0.0) == 0.0 and stages.background["parquet write"] >= 0.04


def test_the_bank_forward_counts_as_bank_embedding_not_as_the_loop():
    stages = Stages(lambda: None)
    with stages.timed("bank embedding"):
        with stages.timed("text forward"):
            time.sleep(0.05)
    assert stages.main["bank embedding"] >= 0.04 and "text forward" not in stages.main


def test_a_phase_that_does_not_fit_the_budget_is_skipped_and_named():
    budget = Budget(10.0)
    assert budget.allows("short", 5.0)
    assert not budget.allows("training", 60.0)
    assert budget.skipped and budget.skipped[0].startswith("training")


def test_spearman_is_one_for_a_monotone_map_and_negative_for_a_reversal():
    a = np.random.default_rng(0).normal(size=100)
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_profile_run_times_every_stage_of_a_real_score_run(tmp_path):
    world = make_world(tmp_path / "world")
    res = profile_run(config(world, tmp_path / "out"), torch.device("cpu"))
    assert list(res["stages"]) == list(STAGES) and res["pairs"] == 24
    for stage in ("worker wait", "tokenise", "image forward", "text forward", "bank rank", "part tables", "parquet write", "bank embedding"):
        assert res["stages"][stage]["calls"] > 0, stage
    timed = sum(v["main_s"] for k, v in res["stages"].items() if k not in ("bank embedding", "other"))
    assert timed <= res["loop_s"] * 1.05 + 0.05  # the named stages fit inside the loop they were measured in


def test_the_results_section_shows_a_failed_option_and_the_skipped_phases():
    class A:
        pairs, workers, batch_size, large_batch, precision, fp32_pairs, train_batch = 200, 2, 32, 64, "bf16", 128, 16

    figures = {"versions": {"torch": "2", "open_clip": "3", "cpu_cores": 2}, "model": "tbps-tiny", "seconds": 12.0,
               "options": [{"option": "torch.compile (image tower)", "error": "RuntimeError: no compiler"},
                           {"option": "batch 64", "images_per_s": 10.0, "speedup": 1.5, "spearman_vs_fp32": 0.9991, "max_abs_diff": 0.002,
                            "within_tolerance": True}],
               "skipped": ["training (needed ~120 s, 3 s left)"]}
    text = render(figures, A)
    assert "failed: RuntimeError: no compiler" in text and "| batch 64 | 10 | 1.50 | 0.9991 |" in text and "training (needed" in text


@pytest.mark.slow  # a world and two score runs
def test_the_blip2_itm_gpu_script_runs_on_a_cpu_with_a_tiny_config(tmp_path):
    """bench/itm_gpu.py, prepared for a lent GPU, completes on the CPU: both runs score every pair, the second with itm_score."""
    res = subprocess.run([sys.executable, str(BENCH / "itm_gpu.py"), "--device", "cpu", "--tiny", "--pairs", "30", "--bank-size", "100",
                          "--workers", "0", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads((tmp_path / "out" / "itm-gpu.json").read_text())
    assert [r["status_counts"] for r in figures["runs"].values()] == [{"ok": 30}, {"ok": 30}]
    with_itm = pl.read_parquet(tmp_path / "work" / "scores-True" / "scores")
    assert C.ITM_SCORE in with_itm.columns and with_itm[C.ITM_SCORE].is_between(0, 1).all()
    assert C.ITM_SCORE not in pl.read_parquet(tmp_path / "work" / "scores-False" / "scores").columns
