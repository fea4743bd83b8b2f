"""tbps score's pipeline: tokenising ahead and writing in the background give the same table, safely.

On a GPU the captions of the next part are tokenised and the last part's tables written in
background threads (``tbps.curate.score.BACKGROUND``); on a CPU the same stages run inline. These
tests force the background path on the CPU: its tables must equal the inline path's bit for bit,
a failure in the writer must reach the caller, and what a failure leaves must resume to the table
of an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tbps import columns as C
from tbps.curate import score as S
from tbps.curate.score import run_score

from test_score import config, make_world, table


@pytest.fixture()
def world(tmp_path: Path) -> Path:
    root = make_world(tmp_path / "world", n_images=16)
    (root / "imgs" / "p002" / "005.jpg").write_bytes(b"not a jpeg")  # a row whose image fails, inside a part
    return root


def parts(out: Path, kind: str) -> dict[str, pl.DataFrame]:
    return {p.name: pl.read_parquet(p) for p in sorted((out / kind).glob("part-*.parquet"))}


def test_background_stages_give_the_inline_tables_bit_for_bit(world, tmp_path, monkeypatch):
    for background in (False, True):
        monkeypatch.setattr(S, "BACKGROUND", background)
        run_score(config(world, tmp_path / f"bg{int(background)}", batch_size=3, chunk_size=5))
    inline, threaded = tmp_path / "bg0", tmp_path / "bg1"
    for kind in ("scores", "embeddings"):
        a, b = parts(inline, kind), parts(threaded, kind)
        assert len(a) > 3 and a.keys() == b.keys()
        for name in a:
            assert a[name].equals(b[name]), f"{kind}/{name} differs"
    statuses = table(inline)[C.STATUS].to_list()
    assert statuses.count(C.STATUS_OK) == len(statuses) - 2  # the broken image's two captions are accounted for


def test_a_writer_failure_reaches_the_caller_and_the_run_resumes_to_the_same_table(world, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BACKGROUND", True)
    run_score(config(world, tmp_path / "whole", batch_size=3, chunk_size=5))
    real = S._write_parquet
    calls = []

    def failing(tbl, path, metadata):
        calls.append(path.name)
        if len(calls) == 4:  # part 1's score file, after its embeddings were written
            raise OSError(28, "No space left on device")
        real(tbl, path, metadata)

    monkeypatch.setattr(S, "_write_parquet", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        run_score(config(world, out, batch_size=3, chunk_size=5))
    # Written in order, embeddings before scores: part 0 whole, part 1's embeddings without its scores.
    layout = S.ScoreDir(out)
    assert sorted((out / "scores").glob("part-*.parquet")) == [layout.score_part(0)]
    assert layout.embedding_part(1).exists() and not layout.score_part(1).exists()
    assert len(list((out / "embeddings").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(S, "_write_parquet", real)
    summary = run_score(config(world, out, batch_size=3, chunk_size=5))
    assert summary.complete and summary.parts_skipped == 1
    assert table(out).equals(table(tmp_path / "whole"))


def test_progress_reaches_the_total_once_with_background_writes(world, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "BACKGROUND", True)
    calls: list[int] = []
    summary = run_score(config(world, tmp_path / "out", batch_size=3, chunk_size=5), progress=lambda d, t: calls.append(d))
    assert calls == sorted(calls) and calls[-1] == summary.rows and calls.count(summary.rows) >= 1
    assert all(d <= summary.rows for d in calls)
