"""``tbps inspect``: terminal summary, the self-contained HTML report and bad input.

The HTML page is opened in a real headless Chromium (Debian's ``chromium`` package, installed
by CI); without it that test is skipped and says why.
"""

from __future__ import annotations

import json
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
from tbps.curate.inspect import (
    ORIGINAL,
    ORIGINAL_COLUMNS,
    ORIGINAL_FATE,
    DropReport,
    InspectConfig,
    open_table,
    render_html,
    run_inspect,
    summarize,
    thresholds_from_sidecar,
)
from tbps.curate.score import ScoreConfig, run_score
from tbps.curate.select import SelectConfig
from tbps.curate.select_io import run_select
from tbps.errors import TbpsError, UsageError
from tbps.report import html as report_html
from tbps.terminal import terminal_histogram

from _eval_world import COLOURS, make_score_table, person_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def recorded_run(root: Path) -> Path:
    """A score run directory as ``tbps score`` leaves it for inspect: the table and the image root in params.json."""
    (root / "params.json").write_text(json.dumps({"data": str(root / "pairs.csv"), "image_root": str((root / "imgs").resolve())}))
    return root


@pytest.fixture
def table(tmp_path) -> Path:
    return recorded_run(make_score_table(tmp_path / "run"))


def make_manifest(root: Path) -> Path:
    """``tbps select`` on the score table: keep bank_rank <= 300 (a manifest, its sidecar and drop table)."""
    out = root / "manifest.parquet"
    run_select(SelectConfig(scores=(root / "scores",), out=out, max_bank_rank=300, min_score=0.06))
    return out


def test_summary_of_a_score_table(table):
    for path in (table, table / "scores", table / "scores" / "part-000000.parquet"):
        report = summarize(open_table(path), top=3)
        assert report.kind.startswith("score table") and report.rows == 12
        assert report.status_counts == {C.STATUS_OK: 11, C.STATUS_BAD_IMAGE: 1}
    assert report.quantiles[C.SCORE][0.0] == pytest.approx(0.05) and report.quantiles[C.SCORE][1.0] == pytest.approx(0.35)
    assert report.quantiles[C.BANK_RANK][0.5] == pytest.approx(280)  # median of 80, 120, ..., 480
    assert report.top.get_column(C.SCORE).to_list() == pytest.approx([0.35, 0.32, 0.29])
    assert report.bottom.get_column(C.SCORE).to_list() == pytest.approx([0.05, 0.08, 0.11])
    score_hist, rank_hist = report.histograms
    assert sum(score_hist.counts) == 11 and sum(rank_hist.counts) == 11  # ok rows only
    assert rank_hist.edges[:4] == [0, 1, 2, 4] and rank_hist.edges[-1] > 480
    sources = dict(report.sources.select(C.SOURCE, "rows").iter_rows())
    assert sources == {"alpha": 8, "beta": 4} and report.dropped is None and report.thresholds == []


def test_terminal_histogram_draws_bars_and_threshold(table):
    report = summarize(open_table(table))
    source = open_table(make_manifest(table))
    text = terminal_histogram(report.histograms[1], thresholds_from_sidecar(source.sidecar))
    lines = text.splitlines()
    assert lines[0].startswith(C.BANK_RANK) and len(lines) == len(report.histograms[1].counts) + 1
    assert "█" in text and sum("◀ threshold" in line for line in lines) == 1
    assert "◀ threshold" in next(line for line in lines if "[256, 512)" in line)


def test_manifest_thresholds_and_drops(table):
    report = summarize(open_table(make_manifest(table)), top=5)
    # Scores 0.05 + 0.03k, bank ranks 40(12 - k); k = 11 is a bad image. Kept: k = 5..10.
    assert report.kind == "manifest" and report.rows == 6
    assert [(t.column, t.value, t.kind) for t in report.thresholds] == [(C.SCORE, 0.06, "min"), (C.BANK_RANK, 300.0, "max")]
    score_hist = report.histograms[0]
    assert sum(score_hist.counts) == 6 and sum(score_hist.dropped) == 5  # the status drop has no score
    assert score_hist.edges[0] == pytest.approx(0.05)  # the bins span kept and dropped rows
    counts = {k: n for k, (n, _) in report.dropped.items()}
    assert sum(counts.values()) == 6 and counts["bank-rank"] == 4 and counts["min-score"] == 1
    sample = report.dropped["bank-rank"][1]
    # Borderline first: the best-scored dropped rows, with image and caption looked up in the input.
    assert sample.get_column(C.SCORE).to_list() == pytest.approx([0.17, 0.14, 0.11, 0.08])
    assert sample.get_column(C.IMAGE_PATH).null_count() == 0 and sample.get_column(C.CAPTION).null_count() == 0


def test_manifest_without_its_inputs_still_inspects(table, tmp_path):
    manifest = make_manifest(table)
    shutil.rmtree(table / "scores")  # the selection's input is gone: drops are shown without pictures
    report = summarize(open_table(manifest))
    assert report.dropped["bank-rank"][1].get_column(C.IMAGE_PATH).null_count() == 4
    assert "image unavailable" in render_html(report)


@pytest.mark.parametrize(
    "sidecar, expected",
    [
        ({"resolved": {"bank_rank": {"option": "--rule paper-pretrain", "max_bank_rank": 48}}}, [("bank_rank", 48.0, "max")]),
        ({"resolved": {"min_score": 0.25, "bank_rank": {"max_bank_rank": 1799}}}, [("score", 0.25, "min"), ("bank_rank", 1799.0, "max")]),
        ({"config": {"max_bank_rank": 7, "min_score": None}}, [("bank_rank", 7.0, "max")]),
        ({"resolved": {"order": {}}}, []),
        (None, []),
    ],
)
def test_thresholds_from_sidecar(sidecar, expected):
    assert [(t.column, t.value, t.kind) for t in thresholds_from_sidecar(sidecar)] == expected


def test_html_is_self_contained(table):
    manifest = make_manifest(table)
    page = render_html(summarize(open_table(manifest), top=4))
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", page)  # every resource is inline
    assert "http://" not in page and "https://" not in page
    # Kept rows: 4 lowest + 4 highest; drops: 4 bank-rank, 1 min-score, 1 status (an undecodable file).
    assert page.count("data:image/jpeg;base64,") == 4 + 4 + 4 + 1
    assert page.count("image unavailable") == 1
    assert page.count("<svg") == 2 and page.count('stroke="#d62728"') == 2  # both cuts drawn
    assert "keep bank_rank &lt;= 300" in page  # user-visible text is escaped


def test_cli_inspect(table, tmp_path, cli):
    out = tmp_path / "report.html"
    res = cli("inspect", table, "--html", out, "--top", "3")
    assert res.exit_code == 0, res.output
    assert "status bad-image" in res.stdout and "highest scores (3)" in res.stdout and "█" in res.stdout
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_bad_input(tmp_path, cli):
    other = tmp_path / "other.parquet"
    pl.DataFrame({"a": [1], "caption": ["x"]}).write_parquet(other)
    with pytest.raises(TbpsError, match="not a score table") as err:
        open_table(other)
    assert "pair_id" in str(err.value) and "bank_rank" in str(err.value)
    empty = tmp_path / "empty.parquet"
    pl.DataFrame(schema=C.polars_schema(C.SCORE_SCHEMA)).write_parquet(empty)
    with pytest.raises(TbpsError, match="empty"):
        summarize(open_table(empty))
    text = tmp_path / "t.parquet"
    text.write_text("not parquet")
    with pytest.raises(TbpsError, match="cannot read as Parquet"):
        open_table(text)
    with pytest.raises(TbpsError, match="no such file"):
        open_table(tmp_path / "nope")
    with pytest.raises(TbpsError, match="no Parquet files"):
        open_table(_empty_dir(tmp_path))
    res = cli("inspect", other)
    assert res.exit_code == 1 and "not a score table" in res.output


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "emptydir"
    d.mkdir()
    return d


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium); the HTML report is not browser-tested")
def test_html_report_renders_in_headless_chromium(table, tmp_path):
    html_path = tmp_path / "report.html"
    run_inspect(InspectConfig(table=make_manifest(table), html=html_path, top=4))
    images = 4 + 4 + 4 + 1  # bottom, top, bank-rank drops, min-score drop (the status drop has no picture)
    url = html_path.resolve().as_uri()

    # After the load event the page's own script counts the pictures that decoded.
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp_path)
    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert found, f"no load marker in the DOM: {dom.stderr[-2000:]}"
    loaded, total = map(int, found.groups())
    assert total == images and loaded == total

    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,1600", "--virtual-time-budget=5000", url], tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20  # not a blank page
    # The thumbnails are on screen: the test images' green and yellow coats (colours the page
    # itself never uses) show up as pixels.
    for name in ("green", "yellow"):
        close = np.abs(pixels - np.array(COLOURS[name])).max(axis=2) < 40
        assert close.sum() > 50, f"no {name} pixels: thumbnails not drawn"


@pytest.mark.slow
def test_score_select_inspect_on_the_synthetic_world(tmp_path, synth_world, cli):
    """End to end: synth world -> tbps score (tiny model) -> tbps select -> tbps inspect --html."""
    world = synth_world(seed=2, pool_size=12)
    scores = tmp_path / "scores"
    run_score(ScoreConfig(data=world / "pool" / "pool.json", model="tbps-tiny", bank=world / "benchmark" / "reid_raw.json",
                          out=scores, bank_size=16, workers=0, device="cpu", precision="fp32"))
    res = cli("select", scores, "--max-bank-rank", "8", "--out", tmp_path / "m.parquet", "-q")
    assert res.exit_code == 0, res.output
    page = tmp_path / "m.html"
    res = cli("inspect", tmp_path / "m.parquet", "--html", page, "--top", "3")
    assert res.exit_code == 0, res.output
    assert "manifest" in res.stdout and "dropped by the selection" in res.stdout
    report = summarize(open_table(tmp_path / "m.parquet"))
    dropped = sum(n for n, _ in report.dropped.values())
    assert report.rows + dropped == 12  # every pool pair is kept or dropped with a reason
    assert report.thresholds[0].label == "--max-bank-rank: keep bank_rank <= 8"
    text = page.read_text()
    assert "data:image/jpeg;base64," in text and "keep bank_rank &lt;= 8" in text


# --------------------------------------------------------------------------- image roots


def _hostile_run(root: Path, outside: Path) -> Path:
    """A score run whose table names files outside its image root, one good image, and a link out of the root."""
    secret = person_image(outside / "secret.jpg", COLOURS["purple"], COLOURS["purple"])
    good = person_image(root / "imgs" / "good.jpg", COLOURS["red"], COLOURS["blue"])
    (root / "imgs" / "link.jpg").symlink_to(secret)
    (root / "imgs" / "linkdir").symlink_to(outside, target_is_directory=True)
    named = [str(good), "/etc/hostname", "/proc/self/environ", "/dev/zero", str(secret), str(root / "imgs" / "link.jpg"),
             str(root / "imgs" / "linkdir" / "secret.jpg"), str(root / "imgs" / ".." / ".." / "outside" / "secret.jpg")]
    rows = [{C.PAIR_ID: f"{k}:0", C.IMAGE_PATH: p, C.CAPTION: f"caption {k}", C.PERSON_ID: str(k), C.SOURCE: "x",
             C.IMAGE_HASH: f"{k:032x}", C.SCORE: 0.9 - 0.1 * k, C.BANK_RANK: k, C.BANK_PERCENTILE: float(k), C.TRUNCATED: False,
             C.STATUS: C.STATUS_OK, C.ERROR: None} for k, p in enumerate(named)]
    (root / "scores").mkdir(parents=True)
    pl.DataFrame(rows, schema=C.polars_schema(C.SCORE_SCHEMA)).write_parquet(root / "scores" / "part-000000.parquet")
    return recorded_run(root)


def test_html_opens_no_file_outside_the_image_root(tmp_path, monkeypatch):
    run = _hostile_run(tmp_path / "run", tmp_path / "outside")
    opened = []
    real = report_html.open_image
    monkeypatch.setattr(report_html, "open_image", lambda path, *a, **kw: opened.append(path) or real(path, *a, **kw))
    report = summarize(open_table(run), top=8)
    assert report.rows == 8 and report.top.height == 8  # the terminal summary keeps every row
    page = render_html(report)
    assert page.count("data:image/jpeg;base64,") == 2  # the good image, in the top and the bottom list
    assert page.count("image unavailable") == 2 * 7 and page.count("path-outside-root") >= 2 * 7
    root = str((run / "imgs").resolve())
    assert opened and all(p.startswith(root + "/") for p in opened), opened  # nothing outside was even opened
    assert f"{root} (recorded by the score run" in page


def test_a_table_without_a_known_root_shows_pictures_only_with_image_root(tmp_path, cli):
    bare = make_score_table(tmp_path / "bare")  # a score table without its run's params.json
    page = render_html(summarize(open_table(bare), top=3))
    assert page.count("data:image/jpeg;base64,") == 0 and page.count("no image root") >= 6
    page = render_html(summarize(open_table(bare, image_root=bare / "imgs"), top=3))
    assert page.count("data:image/jpeg;base64,") == 6 and "(--image-root)" in page
    out = tmp_path / "r.html"
    res = cli("inspect", bare, "--html", out, "--top", "3", "--image-root", bare / "imgs")
    assert res.exit_code == 0, res.output
    assert out.read_text().count("data:image/jpeg;base64,") == 6
    res = cli("inspect", bare, "--image-root", tmp_path / "nope")
    assert res.exit_code == 1 and "the image root is not a directory" in res.output


# --------------------------------------------------------------------------- drop tables


@pytest.fixture
def selection(table, tmp_path) -> Path:
    """Rows k and k + 6 share a caption (k + 6 scores higher); one row per person; the drop table of that."""
    out = tmp_path / "sel.parquet"
    run_select(SelectConfig(scores=(table / "scores",), out=out, dedup="caption", max_per_person=1))
    return tmp_path / "sel.dropped.parquet"


def test_a_drop_table_is_joined_back_and_duplicates_meet_their_originals(selection, table):
    report = run_inspect(InspectConfig(table=selection, top=10))
    assert isinstance(report, DropReport) and report.joined and report.manifest.endswith("sel.parquet")
    # status: the bad image (11); caption duplicates: 0..4 of 6..10; per person (k // 2): 6 (7 is better), 8 (9), 5 (no twin, person 2 has 4 and 5).
    steps = {(r[C.STEP], r[C.REASON]): r["rows"] for r in report.by_step.iter_rows(named=True)}
    assert steps == {("status", "status"): 1, ("exact-caption", "duplicate-of:<pair_id>"): 5, ("per-person", "per-person"): 2}
    assert report.rows == 8 == report.shown_rows
    dups = report.groups["exact-caption: duplicate-of:<pair_id>"][1]
    assert dups.get_column(C.CAPTION).to_list() == dups.get_column(ORIGINAL_COLUMNS[C.CAPTION]).to_list()  # each beside its twin
    pairs = dict(zip(dups.get_column(C.PAIR_ID), dups.get_column(ORIGINAL)))
    assert pairs == {f"{k}:0": f"{k + 6}:0" for k in range(5)}
    fates = dict(zip(dups.get_column(ORIGINAL), dups.get_column(ORIGINAL_FATE)))
    assert fates["7:0"] == "kept" and fates["6:0"] == "dropped later: per-person (per-person)"
    assert dups.get_column(C.IMAGE_PATH).null_count() == 0 and dups.get_column(ORIGINAL_COLUMNS[C.IMAGE_PATH]).null_count() == 0


def test_drop_table_filters_and_its_html(selection, tmp_path, cli):
    only = run_inspect(InspectConfig(table=selection, reason="duplicate-of"))
    assert list(only.groups) == ["exact-caption: duplicate-of:<pair_id>"] and only.shown_rows == 5 and only.rows == 8
    assert list(run_inspect(InspectConfig(table=selection, step="per-person")).groups) == ["per-person"]
    with pytest.raises(TbpsError, match="no dropped row has reason 'budget'") as err:
        run_inspect(InspectConfig(table=selection, reason="budget"))
    assert "duplicate-of:<pair_id>" in str(err.value) and "per-person" in str(err.value)
    page = tmp_path / "d.html"
    res = cli("inspect", selection, "--reason", "duplicate-of", "--html", page, "--top", "3", env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "drop table" in res.stdout and "original is" in res.stdout and "dropped later: per-person" in res.stdout
    text = page.read_text()
    assert text.count('class="pair"') == 3 and text.count("data:image/jpeg;base64,") == 6  # 3 rows beside 3 originals
    res = cli("inspect", selection, "--step", "nope")
    assert res.exit_code == 1 and "no dropped row has step 'nope'" in res.output


def test_manifest_drops_filter_and_a_drop_table_without_provenance(selection, table, tmp_path):
    manifest = selection.with_name("sel.parquet")
    report = summarize(open_table(manifest), reason="duplicate-of")
    assert list(report.dropped) == ["duplicate-of:<pair_id>"] and ORIGINAL in report.dropped["duplicate-of:<pair_id>"][1].columns
    with pytest.raises(UsageError, match="--reason and --step filter dropped rows"):
        summarize(open_table(table), reason="status")
    alone = tmp_path / "alone" / "x.dropped.parquet"  # moved away from its manifest and sidecar
    alone.parent.mkdir()
    shutil.copy(selection, alone)
    report = run_inspect(InspectConfig(table=alone))
    assert not report.joined and report.rows == 8 and "no manifest sidecar" in report.provenance
    dups = report.groups["exact-caption: duplicate-of:<pair_id>"][1]
    assert dups.get_column(C.CAPTION).null_count() == 5
    fates = dict(zip(dups.get_column(ORIGINAL), dups.get_column(ORIGINAL_FATE)))  # known from the drop table alone
    assert fates["6:0"] == "dropped later: per-person (per-person)" and fates["7:0"] == "kept"
