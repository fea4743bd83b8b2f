"""The demo's report rendered from its results record: ``results.md``, ``report.html``, the terminal tables.

The record is made up here (2 seeds, a few arms, one arm that was not run); two runs have a
small ``log.jsonl``. The page is also opened in a headless Chromium and screenshotted.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from tbps.demo.report import TABLE_HEADER, interval_cell, render_report_html, results_markdown, share_cell, table_cells
from tbps.report.html import nice_ticks, svg_bar_chart, svg_line_chart, write_html
from tbps.terminal import demo_tables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _stat(mean: float, half: float = 1.0) -> dict:
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "std": half / 2}


def _arm(key: str, label: str, stage: str, r1: float, trainable: int, lr: float = 1e-3) -> dict:
    return {
        "key": key, "label": label, "stage": stage, "adapter": "wora" if "wora" in key else "full", "seeds": 2, "lr": lr,
        "metrics": {"R1": _stat(r1, 2.2), "R5": _stat(r1 + 20), "R10": _stat(r1 + 30), "mAP": _stat(r1 - 5), "mINP": _stat(r1 - 20)},
        "trainable": trainable, "total": 2_000_000, "non_embedding_total": 1_000_000,
        "train_seconds": {"mean": 125.4, "std": 3.1}, "pairs_seen": 48_000, "steps": 750,
    }


def _results() -> dict:
    """A results record as ``tbps demo --seeds 2`` writes it; the LoRA arm was not run."""
    table = [
        _arm("pretrain-full", "pretrain: full pool", "pretrain", 20.0, 2_000_000),
        _arm("pretrain-filtered", "pretrain: filtered 40%", "pretrain", 22.5, 2_000_000),
        _arm("ft-wora", "fine-tune: WoRA <r8>", "fine-tune", 31.2, 17_000),
        _arm("alone", "fine-tune alone (no pretraining)", "fine-tune", 12.0, 2_000_000),
        {"key": "ft-lora", "label": "fine-tune: LoRA", "stage": "fine-tune", "adapter": "lora", "seeds": 0, "lr": None,
         "metrics": {"R1": None, "mAP": {"mean": None, "lo": None, "hi": None, "std": None}}, "trainable": None, "total": None},
    ]
    return {
        "quick": False, "seconds": 1500.0, "load": {"start_1min": 1.2, "end_1min": 2.3},
        "command": "tbps demo --seeds 2 --out runs/demo",
        "design": ["equal epochs in each stage", "learning rates chosen on val R@1, never on test"],
        "gate": {"metric": "val R@1", "pretrained": "ft-wora", "alone": "alone", "threshold": 5.0,
                 "per_seed": [{"seed": 0, "pretrained": 30.5, "alone": 12.25, "difference": 18.25},
                              {"seed": 1, "pretrained": 31.0, "alone": 11.75, "difference": 19.25}],
                 "mean_difference": 18.75, "passed": True, "note": "pretraining helps well beyond the threshold"},
        "tuning": {"grid": {"wora": [0.001, 0.003], "full": [0.0001, 0.001]},
                   "val_R1": {"wora": {"0.001": 28.5, "0.003": 30.25}, "full": {"0.0001": 25.0, "0.001": None}},
                   "chosen": {"wora": 0.003, "full": 0.0001}, "note": "seed 0, a quarter of the steps"},
        "table": table,
        "comparisons": [
            {"name": "filtered vs full", "a": "pretrain-filtered", "b": "pretrain-full", "metric": "R1",
             "per_seed": [2.0, 3.0], "mean": 2.5, "lo": 1.5, "hi": 3.5, "verdict": "better"},
            {"name": "WoRA vs LoRA", "a": "ft-wora", "b": "ft-lora", "metric": "mAP",
             "per_seed": [], "mean": None, "lo": None, "hi": None, "verdict": None},
        ],
        "claims": [
            {"claim": "filtering finds the defects", "paper": "AUROC well above chance", "verdict": "holds", "measured": "AUROC 0.81"},
            {"claim": "WoRA matches full fine-tuning", "paper": "within 1 point", "verdict": "does not hold", "measured": "-4.0 R@1"},
        ],
        "filter": {
            "selections": {
                "keep 0.4": {"kept": 4000, "rows": 10000, "precision": 0.612, "recall": 0.833, "auroc_score": 0.801,
                             "auroc_bank_rank": 0.845, "auroc_relevance_score": 0.77, "auroc_relevance_bank_rank": 0.9,
                             "per_kind": {"swapped-attribute": {"pairs": 500, "removed": 300, "recall": 0.6, "auroc_score": 0.55, "auroc_bank_rank": 0.62},
                                          "exact-duplicate": {"pairs": 200, "removed": 200, "recall": 1.0, "auroc_score": None, "auroc_bank_rank": None}}},
                "paper-pretrain rule": {"kept": 6100, "rows": 10000, "precision": None, "recall": 0.5, "auroc_score": 0.801,
                                        "auroc_bank_rank": 0.845, "per_kind": {}},
            },
            "duplicate_kinds": ["exact-duplicate", "near-duplicate"],
        },
        "runs": [
            {"key": "ft-wora", "seed": 0, "dir": "runs/seed0/ft-wora"},
            {"key": "ft-wora", "seed": 1, "dir": "runs/seed1/ft-wora"},
            {"key": "ft-lora", "seed": 0, "dir": "runs/seed0/ft-lora"},  # never ran: no log
        ],
        "links": {"pool": "report-scores.html", "selections": {"keep 0.4": "inspect-keep-0.4.html"}},
    }


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A demo directory with two small ``log.jsonl`` files and one of the inspect pages."""
    out = tmp_path / "demo"
    for seed, scale in ((0, 1.0), (1, 1.1)):
        run = out / "runs" / f"seed{seed}" / "ft-wora"
        run.mkdir(parents=True)
        lines = []
        for step in (0, 50, 100, 150, 200):
            lines.append({"kind": "train", "step": step, "loss": 3.0 - step / 100, "lr": 1e-3})
            lines.append({"kind": "val", "step": step, "R1": scale * (5 + step / 8), "mAP": step / 10})
        run.joinpath("log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated", encoding="utf-8")
    (out / "report-scores.html").write_text("<html></html>", encoding="utf-8")
    return out


def _md_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize(
    ("stat", "kwargs", "expected"),
    [({"mean": 31.2, "lo": 29.0, "hi": 33.4}, {}, "31.2 [29.0, 33.4]"),
     ({"mean": 31.2, "lo": None, "hi": None}, {}, "31.2"),
     ({"mean": None, "lo": 1.0, "hi": 2.0}, {}, "-"),
     (None, {}, "-"),
     ({"mean": float("nan")}, {}, "-"),
     (12.345, {}, "12.3"),
     ({"mean": 2.5, "lo": -0.5, "hi": 3.5}, {"spec": ".2f", "signed": True}, "+2.50 [-0.50, +3.50]")],
)
def test_interval_cell(stat, kwargs, expected):
    assert interval_cell(stat, **kwargs) == expected


@pytest.mark.parametrize(
    ("part", "whole", "expected"),
    [(17_000, 2_000_000, "0.85%"), (2_000_000, 2_000_000, "100.0%"), (17, 2_000_000, "0.001%"), (None, 10, "-"), (5, 0, "-"), (5, None, "-")],
)
def test_share_cell(part, whole, expected):
    assert share_cell(part, whole) == expected


def test_table_cells_of_an_arm():
    cells = table_cells(_arm("ft-wora", "fine-tune: WoRA", "fine-tune", 31.2, 17_000))
    assert list(cells) == list(TABLE_HEADER)
    assert cells["R@1"] == "31.2 [29.0, 33.4]" and cells["mAP"] == "26.2 [25.2, 27.2]"
    assert cells["trainable"] == "17.0 k" and cells["% of all"] == "0.85%" and cells["% of non-embedding"] == "1.70%"
    assert cells["train time"] == "125 ± 3 s" and cells["pairs seen"] == "48,000" and cells["lr"] == "0.001"


# --------------------------------------------------------------------------- results.md


def test_markdown_has_one_row_per_arm_with_intervals_and_dashes_for_missing_values():
    text = results_markdown(_results())
    header = next(line for line in text.splitlines() if line.startswith("| arm |"))
    assert [c.strip() for c in header.strip("|").split(" | ")] == list(TABLE_HEADER)
    wora = _md_row(text, "fine-tune: WoRA \\<r8>")
    assert wora[TABLE_HEADER.index("R@1")] == "31.2 [29.0, 33.4]"
    assert wora[TABLE_HEADER.index("R@10")] == "61.2 [60.2, 62.2]"
    assert wora[TABLE_HEADER.index("% of all")] == "0.85%" and wora[TABLE_HEADER.index("% of non-embedding")] == "1.70%"
    lora = _md_row(text, "fine-tune: LoRA")
    assert lora[TABLE_HEADER.index("R@1"):] == ["-"] * (len(TABLE_HEADER) - TABLE_HEADER.index("R@1"))
    assert "Command: `tbps demo --seeds 2 --out runs/demo`; 25.0 min wall" in text
    # The gate, the tuning record (the choice in bold), comparisons, claims and the filter tables.
    assert "**gate passed: val R@1 of fine-tune: WoRA \\<r8> minus fine-tune alone (no pretraining) = +18.75 on average over 2 seeds (threshold 5)**" in text
    assert "| 0 | 30.50 | 12.25 | +18.25 |" in text
    assert "| method | lr 0.0001 | lr 0.001 | lr 0.003 | chosen |" in text
    assert "| wora |  | 28.50 | **30.25** | 0.003 |" in text
    assert "| full | **25.00** | - |  | 0.0001 |" in text
    assert "| filtered vs full | pretrain: filtered 40% | pretrain: full pool | R@1 | +2.50 [+1.50, +3.50] | +2.00, +3.00 | **better** |" in text
    assert "| WoRA vs LoRA | fine-tune: WoRA \\<r8> | fine-tune: LoRA | mAP | - | - | - |" in text
    assert "| WoRA matches full fine-tuning | within 1 point | **does not hold** | -4.0 R@1 |" in text
    assert "| keep 0.4 | 4,000 of 10,000 | 0.612 | 0.833 | 0.801 | 0.845 | 0.770 | 0.900 |" in text
    assert "| paper-pretrain rule | 6,100 of 10,000 | - | 0.500 | 0.801 | 0.845 | - | - |" in text
    assert "| exact-duplicate | 200 | 200 | 1.000 | - | - | recall |" in text
    assert "| swapped-attribute | 500 | 300 | 0.600 | 0.550 | 0.620 | AUROC |" in text
    assert text.index("| arm |") < text.index("## The gate") < text.index("## The paper's claims") < text.index("## The filter")


def test_a_failed_gate_and_an_empty_quick_record_render():
    results = _results()
    results["gate"] = {"metric": "val R@1", "pretrained": "ft-wora", "alone": "alone", "threshold": 5.0, "per_seed": [],
                       "mean_difference": None, "passed": False, "note": "the pretrained arm did not beat fine-tuning alone"}
    text = results_markdown(results)
    assert "**gate FAILED: val R@1 of fine-tune: WoRA \\<r8> minus fine-tune alone (no pretraining) = - (threshold 5)**" in text
    assert "the pretrained arm did not beat fine-tuning alone" in text
    quick = results_markdown({"quick": True})
    assert "Quick mode" in quick and "gate: not run" in quick and "| arm |" in quick
    assert "wall time -" in quick and "load average - at the start" in quick


def test_pipes_in_labels_do_not_break_the_markdown_table():
    results = _results()
    results["table"][0]["label"] = "full | pool"
    assert "| full \\| pool | pretrain |" in results_markdown(results)


# --------------------------------------------------------------------------- report.html


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", text, flags=re.S)


def test_html_opens_with_the_table_then_claims_charts_curves_and_links(out_dir):
    text = render_report_html(_results(), out_dir)
    body = text[text.index("<body>"):]
    first_table = body.index('<table class="grid">')
    assert first_table < body.index("claims, as measured") < body.index("AUROC per defect kind") < body.index("Validation curves") < body.index("Inspect pages")
    assert body[:first_table].count("<table") == 0 and "31.2\n[29.0, 33.4]" in body[first_table:body.index("claims, as measured")]  # interval under its mean
    assert "fine-tune: WoRA &lt;r8&gt;" in body and "<r8>" not in body  # labels are escaped
    assert '<td class="good">holds</td>' in body and '<td class="bad">does not hold</td>' in body
    assert 'class="banner good"' in body
    # The AUROC chart: the two selections have the same AUROCs per kind only when their kinds agree.
    assert body.count('aria-label="AUROC per defect kind (') == 2 and "chance 0.5" in body
    # Validation curves of the fine-tune stage, one chart per seed; the run without a log says so.
    assert "fine-tune · seed 0" in body and "fine-tune · seed 1" in body
    assert "not drawn: runs/seed0/ft-lora (no log)" in body
    assert '<a href="report-scores.html">' in body and '<a href="inspect-keep-0.4.html">' in body
    assert "inspect-keep-0.4.html (missing)" in body and "report-scores.html (missing)" not in body
    svgs = _svgs(body)
    assert len(svgs) == 4
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML: every label was escaped
    assert "http://" not in text and "https://" not in text  # self-contained


def test_html_renders_a_failed_gate_and_an_empty_record(tmp_path):
    results = _results()
    results["gate"]["passed"] = False
    assert 'class="banner bad"' in render_report_html(results, tmp_path)
    empty = render_report_html({}, tmp_path)
    assert "gate: not run" in empty and "no runs recorded" in empty and "no inspect pages" in empty
    assert "not recorded" in empty and "<th>claim</th>" not in empty  # no header-only tables


# --------------------------------------------------------------------------- chart primitives


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3.2, 47.9) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    ticks = nice_ticks(7.0, 7.0)
    assert ticks[0] <= 7.0 <= ticks[-1] and len(ticks) > 2


def test_line_chart_draws_each_series_with_a_legend_and_breaks_at_missing_values():
    svg = svg_line_chart({"a <&> b": [(0, 1.0), (10, 2.0), (20, None), (30, 4.0), (40, 5.0)], "c": [(5, 3.0)]},
                         "step", "val R@1", title="t <1>")
    root = ET.fromstring(svg)
    tags = [el.tag for el in root.iter()]
    assert tags.count("polyline") == 2  # two stretches of "a", none for the single point of "c"
    assert tags.count("circle") == 5
    texts = [el.text for el in root.iter() if el.tag == "text"]
    assert "a <&> b" in texts and "c" in texts and "t <1>" in texts and "step" in texts and "val R@1" in texts
    assert "0" in texts and "40" in texts  # x ticks
    assert "no data" in svg_line_chart({"x": [(1, None)]}, "step", "R1")


def test_bar_chart_groups_bars_draws_the_reference_and_marks_missing_values():
    svg = svg_bar_chart([("kind <1>", [0.8, None]), ("kind 2", [0.4, 0.6])], series=("score", "bank_rank"),
                        reference=(0.5, "chance"), value_range=(0.0, 1.0), title="AUROC")
    root = ET.fromstring(svg)
    rects = [el for el in root.iter() if el.tag == "rect"]
    assert len(rects) == 2 + 3  # the legend's two swatches and three bars
    texts = [el.text for el in root.iter() if el.tag == "text"]
    assert {"kind <1>", "kind 2", "score", "bank_rank", "chance", "n/a", "0.800"} <= set(texts)
    assert 'stroke-dasharray="5,3"' in svg
    single = ET.fromstring(svg_bar_chart([("a", 2.0), ("b", None)]))
    assert len([el for el in single.iter() if el.tag == "rect"]) == 1


# --------------------------------------------------------------------------- terminal


def test_demo_tables_print_the_table_the_gate_and_the_claims():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    for part in demo_tables(_results()):
        console.print(part)
    text = console.file.getvalue()
    assert "31.2 [29.0, 33.4]" in text and "26.2 [25.2, 27.2]" in text and "0.85%" in text and "1.70%" in text
    assert "gate passed: val R@1" in text and "does not hold" in text and "AUROC 0.81" in text
    failed = copy.deepcopy(_results())
    failed["gate"]["passed"] = False
    console = Console(file=io.StringIO(), width=200, color_system=None)
    for part in demo_tables(failed) + demo_tables({"quick": True}):
        console.print(part)
    assert "gate FAILED" in console.file.getvalue() and "gate: not run" in console.file.getvalue()


# --------------------------------------------------------------------------- in a browser


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}, check=False)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium); the demo report is not browser-tested")
def test_report_renders_in_headless_chromium(out_dir, tmp_path):
    page_path = write_html(out_dir / "report.html", render_report_html(_results(), out_dir))
    shot = tmp_path / "demo-report.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", "--virtual-time-budget=3000", page_path.resolve().as_uri()], tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 20  # not a blank page
    # The charts are drawn: the palette's blue and orange (the score and bank_rank bars, the curves).
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = np.abs(pixels - np.array(colour)).max(axis=2) < 30
        assert close.sum() > 200, f"no {colour} pixels: charts not drawn"
