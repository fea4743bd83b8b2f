"""Plots in the self-contained HTML pages: ``inspect --html`` (the ``--keep`` cut, a histogram per defect
kind, the ``--truth`` metrics, failed rows), ``RUN/report.html`` of ``tbps train`` and ``tbps eval --html``.

Every file is made in the test. The pages are also opened in a headless Chromium and screenshotted
(skipped, saying why, without Chromium); set ``TBPS_PLOT_SHOTS=DIR`` to keep the screenshots there.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from tbps import columns as C
from tbps.curate.inspect import FAILED_SHOWN, InspectConfig, open_table, render_html, run_inspect, summarize
from tbps.curate.select import SelectConfig
from tbps.curate.select_io import run_select
from tbps.eval.evaluate import recall_curve, render_eval_html
from tbps.models.runs import REPORT_FILE
from tbps.report import html as report_html
from tbps.train.report import best_step, read_log, render_report, write_report

from _eval_world import make_score_table, make_world

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "chromium not installed (Debian: apt-get install chromium); the pages are not browser-tested"
DEFECTS = ["none", C.DEFECT_SWAPPED, C.DEFECT_BLANK, "none", C.DEFECT_WRONG, "none"]


def recorded_run(root: Path, n: int = 12) -> Path:
    """A score table as ``tbps score`` leaves it (scores 0.05 + 0.03k, bank ranks 40(n - k); the last row an undecodable image)."""
    run = make_score_table(root, n=n)
    (run / "params.json").write_text(json.dumps({"data": str(run / "pairs.csv"), "image_root": str((run / "imgs").resolve())}))
    return run


def truth_file(root: Path, n: int = 12) -> Path:
    path = root / "truth.parquet"
    pl.DataFrame({C.PAIR_ID: [f"{k}:0" for k in range(n)], C.DEFECT: [DEFECTS[k % len(DEFECTS)] for k in range(n)]}).write_parquet(path)
    return path


def selected(root: Path, **options) -> Path:
    """``tbps select`` on a fresh score table (captions repeat in this world: no de-duplication)."""
    run = recorded_run(root / "run")
    out = root / "m.parquet"
    run_select(SelectConfig(scores=(run / "scores",), out=out, dedup="none", **options))
    return out


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", page, flags=re.S)


def _svg_of(page: str, label: str) -> str:
    return next(s for s in _svgs(page) if f'aria-label="{label}"' in s)


def _bar_layout(svg: str) -> tuple[float, float]:
    """(left edge, bin width) of a histogram, from its first two kept bars (each at left + i * bw + 0.5)."""
    xs = [float(x) for x in re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="[\d.]+" fill="#4a7bb7">', svg)]
    return xs[0] - 0.5, xs[1] - xs[0]


# --------------------------------------------------------------------------- inspect: the --keep cut


def test_the_keep_cut_is_drawn_at_the_value_select_recorded(tmp_path):
    manifest = selected(tmp_path, keep=0.5)
    cutoff = json.loads(manifest.with_suffix(".json").read_text())["resolved"]["budget"]["score_cutoff"]
    report = summarize(open_table(manifest))
    cut = next(t for t in report.thresholds if t.label.startswith("--keep 0.5"))
    assert (cut.column, cut.value, cut.kind) == (C.SCORE, pytest.approx(cutoff), "min")
    # Rows 0..10 scored, the best 6 kept: the cut is the 6th best score, 0.05 + 0.03 * 5.
    assert cutoff == pytest.approx(0.20) and "score >= 0.2" in cut.label and "(6 rows)" in cut.label
    page = render_html(report)
    svg = _svg_of(page, "histogram of score")
    line = re.search(r'<line class="cut" data-column="score" data-value="([^"]+)" x1="([\d.]+)"', svg)
    assert line and float(line.group(1)) == pytest.approx(cutoff)
    hist = report.histograms[0]
    left, bw = _bar_layout(svg)
    expected = left + (cutoff - hist.edges[0]) / (hist.edges[-1] - hist.edges[0]) * len(hist.counts) * bw
    assert float(line.group(2)) == pytest.approx(expected, abs=0.15)
    # Every kept row lies right of the cut, every dropped one left of it.
    for i, (kept, gone) in enumerate(zip(hist.counts, hist.dropped)):
        assert not kept or hist.edges[i + 1] > cutoff - 1e-6
        assert not gone or hist.edges[i] < cutoff
    assert "--keep 0.5 (6 rows): score &gt;= 0.2" in page


def test_a_keep_by_bank_rank_cuts_the_bank_rank_histogram(tmp_path):
    manifest = selected(tmp_path, keep=0.25, by="bank_rank")
    cutoff = json.loads(manifest.with_suffix(".json").read_text())["resolved"]["budget"]["bank_rank_cutoff"]
    page = render_html(summarize(open_table(manifest)))
    rank_svg, score_svg = _svg_of(page, "histogram of bank_rank"), _svg_of(page, "histogram of score")
    assert f'data-column="bank_rank" data-value="{float(cutoff)!r}"' in rank_svg
    assert 'class="cut"' not in score_svg  # no score cut was made
    assert f"bank_rank &lt;= {cutoff}" in rank_svg


# --------------------------------------------------------------------------- inspect: --truth


def test_truth_metrics_and_a_histogram_per_defect_kind(tmp_path):
    truth = truth_file(tmp_path)
    manifest = selected(tmp_path, keep=0.5, truth=str(truth))
    recorded = json.loads(manifest.with_suffix(".json").read_text())["truth"]
    report = summarize(open_table(manifest))
    page = render_html(report)

    # One histogram per defect kind of the scored rows (k = 11 did not decode: no score).
    kinds = {DEFECTS[k % len(DEFECTS)] for k in range(11)}
    shown = re.findall(r'<div class="defect" data-defect="([^"]+)">', page)
    assert sorted(shown) == sorted(kinds) and shown[0] == "none"
    for kind, hist in zip(report.truth.kinds, report.truth.histograms):
        scored = sum(1 for k in range(11) if DEFECTS[k % len(DEFECTS)] == kind)
        dropped = sum(1 for k in range(5) if DEFECTS[k % len(DEFECTS)] == kind)  # scores of k < 5 fall below the cut
        assert (sum(hist.counts) + sum(hist.dropped), sum(hist.dropped)) == (scored, dropped), kind
        assert hist.edges == report.histograms[0].edges  # the bins of the manifest's score histogram
    # The cut is drawn on each of them too.
    block = page.split("<h3>Score per defect kind</h3>", 1)[1]
    assert block.count('class="cut"') == len(kinds)

    # The tables show exactly what select recorded.
    overall = _cells(page, "truth-overall")
    assert overall == {title: report_html._num(recorded["overall"][key]) for key, title in
                       [("pairs", "pairs"), ("defective", "defective"), ("removed", "removed"), ("precision", "precision"),
                        ("recall", "recall"), ("auroc_score", "AUROC score"), ("auroc_bank_rank", "AUROC bank_rank"),
                        ("removed_defective", "removed defective"), ("removed_clean", "removed clean"), ("unscored", "unscored")]}
    kinds_table = _rows(page, "truth-kinds")
    for kind, values in recorded["kinds"].items():
        row = kinds_table[kind]
        assert row[:3] == [report_html._num(values[k]) for k in ("pairs", "removed", "recall")]
        assert row[4] == report_html._num(values["auroc_score"])
    assert _rows(page, "truth-steps")["budget"][0] == report_html._num(recorded["steps"]["budget"]["removed"])
    assert "Recall and AUROC per defect kind" in page


def test_truth_metrics_without_the_truth_file_say_why_no_histograms(tmp_path):
    truth = truth_file(tmp_path)
    manifest = selected(tmp_path, keep=0.5, truth=str(truth))
    truth.unlink()
    page = render_html(summarize(open_table(manifest)))
    assert "is not found: no per-defect histograms" in page and 'class="defect"' not in page
    assert _cells(page, "truth-overall")["precision"]  # the recorded metrics are still shown


def test_a_manifest_selected_without_truth_has_no_truth_section(tmp_path):
    page = render_html(summarize(open_table(selected(tmp_path, keep=0.5))))
    assert "Against the truth" not in page


def _table(page: str, css: str) -> list[list[str]]:
    block = page.split(f'<div class="{css}">', 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", block)][1:]


def _cells(page: str, css: str) -> dict[str, str]:
    return {row[0]: row[1] for row in _table(page, css)}


def _rows(page: str, css: str) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in _table(page, css)}


# --------------------------------------------------------------------------- inspect: failed rows


def test_failed_rows_are_listed_with_their_error(tmp_path):
    run = recorded_run(tmp_path / "run")
    page = render_html(summarize(open_table(run)))
    failed = _table(page, "wide left failed")
    assert failed == [["11:0", C.STATUS_BAD_IMAGE, "cannot identify image file", report_html.esc(str(run / "imgs" / "11.jpg"))]]
    # In a manifest the failed row is a dropped one: its error comes from the selection's input.
    page = render_html(summarize(open_table(selected(tmp_path / "sel", keep=0.5))))
    assert _table(page, "wide left failed")[0][:3] == ["11:0", C.STATUS_BAD_IMAGE, "cannot identify image file"]


def test_failed_rows_are_capped_and_the_rest_counted(tmp_path):
    run = recorded_run(tmp_path / "run")
    part = run / "scores" / "part-000000.parquet"
    rows = pl.read_parquet(part)
    bad = rows.filter(pl.col(C.STATUS) != C.STATUS_OK)
    many = pl.concat([bad.with_columns(pl.lit(f"bad-{i}").alias(C.PAIR_ID), pl.lit(f"error {i}").alias(C.ERROR)) for i in range(250)])
    pl.concat([rows.filter(pl.col(C.STATUS) == C.STATUS_OK), many]).write_parquet(part)
    report = summarize(open_table(run))
    assert report.failed_rows == 250 and report.failed.height == FAILED_SHOWN
    page = render_html(report)
    assert "Failed rows (250)" in page and "… and 50 more not listed" in page
    assert len(_table(page, "wide left failed")) == FAILED_SHOWN and "error 199" in page and "error 200" not in page


# --------------------------------------------------------------------------- train: RUN/report.html


def fake_run(run: Path, steps: int = 300, val_every: int = 100) -> Path:
    """A run directory as tbps train leaves it: log.jsonl (a torn last line), run.json."""
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"kind": "train", "step": step, "epoch": step / 100, "loss": 2.0 * math.exp(-step / 100) + 0.2,
                      "lr": 1e-4 * min(1.0, step / 10), "img_per_s": 500.0, "wall_s": step * 0.1})
        if step % val_every == 0:
            r1 = {100: 30.0, 200: 40.0, 300: 40.0}.get(step, 10.0)  # 200 and 300 tie on R@1 and mAP: the first is best
            lines.append({"kind": "val", "step": step, "R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 - 5, "mINP": r1 - 10,
                          "queries": 50, "gallery": 25})
    (run / "log.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines) + '{"kind": "tra')
    (run / "run.json").write_text(json.dumps({"status": "complete", "step": steps, "total_steps": steps, "result_checkpoint": "best",
                                              "config": {"model": "tbps-tiny", "adapter": "wora", "rank": 4, "batch_size": 8, "accum": 1, "lr": 1e-4},
                                              "best": {"step": 200, "metrics": {"R1": 40.0, "mAP": 35.0}}}))
    return run


def test_train_report_draws_loss_lr_and_each_validation_metric(tmp_path):
    run = fake_run(tmp_path / "run")
    log = read_log(run)
    assert (len(log.train), len(log.val), log.unreadable) == (300, 3, 1)
    assert best_step({}, log.val) == 200  # the first of the tied validations, as the loop keeps it
    page = render_report(run)
    for label in ("loss", "lr", "img/s", "R@1", "R@5", "R@10", "mAP", "mINP"):
        assert f'<polyline class="series" data-label="{report_html.esc(label)}"' in page, label
    markers = re.findall(r'<line class="marker" data-x="([^"]+)"', page)
    assert markers == ["200.0"] * 5  # the best checkpoint on every validation chart
    loss = re.search(r'data-label="loss" points="([^"]+)"', page).group(1).split()
    assert len(loss) == 300  # every logged step (no thinning below MOST_POINTS)
    assert "1 line(s) of log.jsonl did not parse" in page
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", page) and "http" not in page.lower().replace("http-equiv", "")


def test_train_report_of_a_long_run_is_thinned_and_of_a_run_without_val_says_so(tmp_path):
    run = fake_run(tmp_path / "run", steps=5000, val_every=10**9)
    page = render_report(run)
    loss = re.search(r'data-label="loss" points="([^"]+)"', page).group(1).split()
    assert len(loss) == 1000 and "<circle" not in page.split("Training loss", 1)[1].split("</svg>", 1)[0]
    assert "No validation in log.jsonl" in page


def test_a_report_written_before_the_first_checkpoint_leaves_the_run_clearable(tmp_path):
    """A run killed after its first validation (report.html, no last/) still restarts afresh."""
    from tbps.train.checkpoint import recover

    run = fake_run(tmp_path / "run")
    assert write_report(run) == run / REPORT_FILE and (run / REPORT_FILE).read_text().startswith("<!DOCTYPE html>")
    assert recover(run) == "restarted" and not any(run.iterdir())


@pytest.mark.slow
def test_tbps_train_writes_the_report(tmp_path, cli):
    """A real 3-step run: RUN/report.html is there at the end, with the best step of run.json marked."""
    root = tmp_path / "world"
    data = make_world(root, persons=4, images_per_person=2, captions_per_image=2)
    frame = pl.read_csv(data).with_columns(pl.when(pl.col("person_id") == 3).then(pl.lit("val")).otherwise(pl.lit("train")).alias("split"))
    frame.write_csv(data)
    run = tmp_path / "run"
    res = cli("train", "--data", data, "--val", data, "--out", run, "--model", "tbps-tiny", "--batch-size", "4", "--workers", "0",
              "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--steps", "3", "--val-every", "1", "--log-every", "1",
              "--allow-overlap", "--quiet")
    assert res.exit_code == 0, res.output
    record = json.loads((run / "run.json").read_text())
    page = (run / REPORT_FILE).read_text()
    assert re.findall(r'<line class="marker" data-x="([^"]+)"', page)[0] == f"{float(record['best']['step'])!r}"
    assert page.count('data-label="loss"') == 1 and "complete" in page


# --------------------------------------------------------------------------- eval --html


def test_recall_curve_counts_each_rank():
    ranks, evaluated = np.array([1, 1, 3, 10, 0]), np.array([True, True, True, True, False])
    curve = dict(recall_curve(ranks, evaluated, gallery=12))
    assert list(curve) == list(range(1, 13))
    assert (curve[1], curve[2], curve[3], curve[9], curve[10], curve[12]) == (50.0, 50.0, 75.0, 75.0, 100.0, 100.0)
    assert recall_curve(ranks, np.zeros(5, bool), 12) == []
    big = recall_curve(np.array([1, 5000]), np.array([True, True]), gallery=10_000)
    assert len(big) < 600 and big[-1] == (10_000, 100.0) and big[0] == (1, 50.0)


@pytest.fixture(scope="module")
def eval_page(tmp_path_factory, cli) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval")
    data = make_world(root, persons=5, images_per_person=2, captions_per_image=2)
    res = cli("eval", data, "--model", "tbps-tiny", "--workers", "0", "--device", "cpu", "--out", root / "e.json",
              "--html", root / "e.html", "-q")
    assert res.exit_code == 0, res.output
    return root / "e.html", json.loads((root / "e.json").read_text())


def test_eval_html_draws_the_recall_curve_and_the_rank_histogram(eval_page):
    html_path, rec = eval_page
    page = html_path.read_text()
    m = rec["metrics"]
    assert rec["html"] == str(html_path) and "per_query" not in rec  # the record keeps the aggregates only
    points = re.search(r'data-label="ITC" points="([^"]+)"', page).group(1).split()
    assert len(points) >= m["gallery"]  # every K of this small gallery, as steps
    hist = _svg_of(page, "histogram of first_rank")
    counts = [int(n) for n in re.findall(r"\): (\d+) queries</title>", hist)]
    assert sum(counts) == m["queries"]
    first_bin = re.search(r"<title>\[1, 2\): (\d+) queries</title>", hist)
    assert int(first_bin.group(1)) == round(m["R1"] * m["queries"] / 100)  # rank 1 is R@1
    assert f"{m['R1']:.2f}" in page and f"{m['mAP']:.2f}" in page
    assert "Hardest queries" in page and not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", page)


def test_eval_html_page_without_per_query_ranks_still_shows_the_metrics():
    rec = {"metrics": {"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0, "mINP": 5.0, "queries": 3, "queries_without_match": 0, "gallery": 4},
           "counts": {"rows": 3}, "model": {"name": "m <x>"}, "data": {"path": "d"}}
    page = render_eval_html(rec, None)
    assert "m &lt;x&gt;" in page and "curves are not drawn" in page and "<svg" not in page


# --------------------------------------------------------------------------- in a browser


def _screenshot(page: Path, png: Path, size: tuple[int, int], tmp_path: Path) -> np.ndarray:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
           "--virtual-time-budget=3000", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}, check=False)
    assert png.is_file(), res.stderr[-2000:]
    keep = os.environ.get("TBPS_PLOT_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (size[1], size[0])
    return pixels


def _colour_box(pixels: np.ndarray, hex_colour: str, tolerance: int = 30) -> tuple[int, tuple[int, int, int, int] | None]:
    """How many pixels have this colour, and their bounding box (x0, y0, x1, y1)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    close = np.abs(pixels - rgb).max(axis=2) < tolerance
    ys, xs = np.nonzero(close)
    return int(close.sum()), ((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else None)


def _chart_drawn(pixels: np.ndarray, hex_colour: str, least: int, spread: float = 20.0) -> None:
    """The colour is on screen, and the region it spans is not flat (a thin curve on white spreads less than bars)."""
    n, box = _colour_box(pixels, hex_colour)
    assert n > least, f"no {hex_colour} pixels: the chart is not drawn"
    x0, y0, x1, y1 = box
    region = pixels[y0:y1 + 1, x0:x1 + 1]
    assert region.std() > spread, f"the {hex_colour} chart region is flat"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_inspect_page_renders_the_cut_and_defect_charts(tmp_path):
    manifest = selected(tmp_path, keep=0.5, truth=str(truth_file(tmp_path)))
    html_path = tmp_path / "inspect.html"
    run_inspect(InspectConfig(table=manifest, html=html_path, top=3))
    pixels = _screenshot(html_path, tmp_path / "inspect.png", (1280, 2400), tmp_path)
    _chart_drawn(pixels, "#4a7bb7", 2000)  # kept bars
    _chart_drawn(pixels, "#f0a04b", 2000)  # dropped bars
    _chart_drawn(pixels, "#d62728", 200)  # the --keep cut (and the chance line)
    _chart_drawn(pixels, "#2ca02c", 200)  # the AUROC bank_rank bars


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_train_report_renders_in_chromium(tmp_path):
    run = fake_run(tmp_path / "run")
    pixels = _screenshot(write_report(run), tmp_path / "train-report.png", (1280, 1500), tmp_path)
    _chart_drawn(pixels, "#1f77b4", 300)  # loss and R@1
    _chart_drawn(pixels, "#ff7f0e", 300)  # lr
    _chart_drawn(pixels, "#2ca02c", 200)  # R@5 and the best-checkpoint markers


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_eval_page_renders_in_chromium(eval_page, tmp_path):
    pixels = _screenshot(eval_page[0], tmp_path / "eval.png", (1280, 1100), tmp_path)
    _chart_drawn(pixels, "#1f77b4", 200, spread=8.0)  # the R@K curve: a line on white
    _chart_drawn(pixels, "#4a7bb7", 2000)  # the rank histogram
