"""tbps score: correctness against open_clip, bank ranks, bad input, resume, refusal, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tbps import columns as C
from tbps.curate.inspect import InspectConfig, run_inspect
from tbps.curate.score import TIE_EPS, ScoreConfig, bank_rank, plan_parts, read_score_table, run_score
from tbps.curate.select import SelectConfig
from tbps.curate.select_io import run_select
from tbps.errors import TbpsError, UsageError
from tbps.files import TEMP_SUFFIX

COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
RGB = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 160, 60), "black": (15, 15, 15), "white": (235, 235, 235), "yellow": (230, 210, 40)}


def make_world(root: Path, n_images: int = 12, captions_per_image: int = 2) -> Path:
    """A CUHK-PEDES reid_raw.json with small two-colour figures, and a bank text file."""
    imgs = root / "imgs"
    records = []
    for i in range(n_images):
        up, low = COLOURS[i % 6], COLOURS[(i * 5 + 1) % 6]
        im = Image.new("RGB", (32, 96), (120, 120, 120))
        im.paste(RGB[up], (8, 20, 24, 50))
        im.paste(RGB[low], (8, 50, 24, 85))
        rel = f"p{i // 2:03d}/{i:03d}.jpg"
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(imgs / rel, quality=95)
        caps = [f"a person in a {up} shirt and {low} trousers", f"someone wearing {low} pants with a {up} top"][:captions_per_image]
        records.append({"split": "train", "captions": caps, "file_path": rel, "processed_tokens": [c.split() for c in caps], "id": i // 2 + 1})
    (root / "reid_raw.json").write_text(json.dumps(records))
    bank = [f"a person in a {a} jacket and {b} shorts carrying a bag" for a in COLOURS for b in COLOURS]
    (root / "bank.txt").write_text("\n".join(bank) + "\n")
    return root


@pytest.fixture()
def world(tmp_path: Path) -> Path:
    return make_world(tmp_path / "world")


def config(world: Path, out: Path, **kw) -> ScoreConfig:
    base = dict(data=str(world / "reid_raw.json"), model="tbps-tiny", bank=str(world / "bank.txt"), out=str(out),
                precision="fp32", workers=0, batch_size=5, chunk_size=7, device="cpu")
    return ScoreConfig(**{**base, **kw})


def table(out: Path) -> pl.DataFrame:
    return read_score_table(out).collect().sort(C.PAIR_ID)


def test_bank_rank_equals_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    own = (img @ bank[:50].T).diagonal().clone()  # own caption equal to a bank caption: a tie, not "higher"
    own[::3] = torch.rand(17, generator=g)
    got = bank_rank(img, own, bank, chunk=7)
    img64, bank64, own64 = img.double(), bank.double(), own.double()
    brute = [sum(1 for k in range(300) if float(img64[i] @ bank64[k]) > float(own64[i]) + TIE_EPS) for i in range(50)]
    assert got.tolist() == brute


@pytest.mark.parametrize(
    "paths, size, expected",
    [
        (["a", "a", "b", "b", "c"], 1, [(0, 2), (2, 4), (4, 5)]),
        (["a", "a", "a", "b"], 2, [(0, 3), (3, 4)]),
        (["a", "b", None, None, None], 2, [(0, 2), (2, 4), (4, 5)]),
        ([], 3, []),
    ],
)
def test_plan_parts_covers_rows_without_splitting_images(paths, size, expected):
    assert plan_parts(paths, size) == expected


def test_scores_equal_a_direct_open_clip_forward(world, tmp_path):
    from tbps import models

    s = run_score(config(world, tmp_path / "out"))
    assert s.complete and s.rows == 24 and s.status_counts == {"ok": 24}
    got = table(tmp_path / "out")
    loaded = models.load("tbps-tiny", seed=0)
    records = json.loads((world / "reid_raw.json").read_text())
    bank = (world / "bank.txt").read_text().split("\n")[:-1]
    with torch.no_grad():
        bk = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(bank)), dim=-1)
        for row in got.iter_rows(named=True):
            rec, cap = (int(x) for x in row[C.PAIR_ID].split(":"))
            pixels = loaded.preprocess(Image.open(world / "imgs" / records[rec]["file_path"])).unsqueeze(0)
            im = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1)
            tx = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer([records[rec]["captions"][cap]])), dim=-1)
            own = float(im @ tx.T)
            assert abs(row[C.SCORE] - own) <= 1e-4
            assert row[C.BANK_RANK] == int(((im @ bk.T) > own + TIE_EPS).sum())
            assert row[C.BANK_PERCENTILE] == pytest.approx(100 * row[C.BANK_RANK] / len(bank))
    # Embeddings written next to the table: float16, normalised, one row per ok pair.
    emb = pl.read_parquet(tmp_path / "out" / "embeddings" / "*.parquet")
    assert emb.height == 24 and set(emb[C.PAIR_ID]) == set(got[C.PAIR_ID])
    vec = np.asarray(emb[C.IMAGE_EMB].to_list(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1, atol=2e-3)
    meta = json.loads((tmp_path / "out" / "score.json").read_text())
    assert meta["rows"] == 24 and meta["params"]["bank_size"] == len(bank)


def test_every_bad_input_row_gets_a_status(world, tmp_path):
    imgs = world / "imgs"
    (imgs / "zero.jpg").write_bytes(b"")
    (imgs / "text.jpg").write_text("not an image")
    good = (imgs / "p000" / "000.jpg").read_bytes()
    (imgs / "trunc.jpg").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (32, 96), (0, 200, 0, 0)).save(imgs / "cmyk.jpg")
    Image.new("RGBA", (32, 96), (0, 200, 0, 100)).save(imgs / "rgba.png")
    Image.new("P", (32, 96), 3).save(imgs / "pal.png")
    Image.fromarray(np.full((96, 32), 40000, dtype=np.uint16)).save(imgs / "i16.png")
    Image.new("RGB", (400, 400)).save(imgs / "bomb.png")
    long_caption = " ".join(["a person with a red coat and blue trousers"] * 20)
    rows = [
        ("missing.jpg", "a person"), ("zero.jpg", "a person"), ("text.jpg", "a person"), ("trunc.jpg", "a person"),
        ("cmyk.jpg", "a person"), ("rgba.png", "a person"), ("pal.png", "a person"), ("i16.png", "a person"),
        ("bomb.png", "a person"), ("p000/000.jpg", "   "), ("p000/000.jpg", long_caption), ("../outside.jpg", "a person"),
    ]
    records = [{"split": "train", "captions": [c], "file_path": p, "processed_tokens": [c.split()], "id": 1} for p, c in rows]
    (world / "bad.json").write_text(json.dumps(records))
    s = run_score(config(world, tmp_path / "out", data=str(world / "bad.json"), format="cuhk-pedes", image_root=str(imgs), max_pixels=100_000))
    got = table(tmp_path / "out")
    assert got.height == len(rows) == s.rows
    status = dict(zip(got[C.PAIR_ID], got[C.STATUS]))
    expect = {
        "0:0": C.STATUS_MISSING_IMAGE, "1:0": C.STATUS_EMPTY_FILE, "2:0": C.STATUS_BAD_IMAGE, "3:0": C.STATUS_BAD_IMAGE,
        "4:0": "ok", "5:0": "ok", "6:0": "ok", "7:0": "ok", "8:0": C.STATUS_DECOMPRESSION_BOMB,
        "9:0": C.STATUS_EMPTY_CAPTION, "10:0": "ok", "11:0": C.STATUS_PATH_OUTSIDE_ROOT,
    }
    assert status == expect
    bad = got.filter(pl.col(C.STATUS) != "ok")
    assert bad[C.SCORE].null_count() == bad.height and bad[C.ERROR].null_count() == 0
    assert got.filter(pl.col(C.PAIR_ID) == "10:0")[C.TRUNCATED].item() is True
    assert got.filter(pl.col(C.PAIR_ID) == "4:0")[C.TRUNCATED].item() is False


def test_windowed_decoding_yields_the_streamed_batches(tmp_path):
    from tbps import models
    from tbps.models.encode import PREFETCH_FACTOR, iter_image_batches

    world = make_world(tmp_path / "w", n_images=40)
    (world / "empty.jpg").write_bytes(b"")
    paths = [str(p) for p in sorted((world / "imgs").rglob("*.jpg"))] + [str(world / "empty.jpg"), str(world / "nope.jpg"), None]
    loaded = models.load("tbps-tiny")
    kw = dict(batch_size=2, workers=2, groups=[5, 20, len(paths) - 25])
    streamed = list(iter_image_batches(loaded, paths, overlap=True, **kw))
    windowed = list(iter_image_batches(loaded, paths, overlap=False, **kw))
    assert len(streamed) > 2 * PREFETCH_FACTOR * kw["workers"]  # more than two windows
    assert len(windowed) == len(streamed)
    for a, b in zip(streamed, windowed):
        assert torch.equal(a.index, b.index) and torch.equal(a.pixels, b.pixels) and torch.equal(a.ok, b.ok)
        assert (a.status, a.error, a.image_hash) == (b.status, b.error, b.image_hash)
    assert torch.cat([b.index for b in windowed]).tolist() == list(range(len(paths)))


def test_decoding_workers_give_the_table_of_in_process_decoding(world, tmp_path):
    run_score(config(world, tmp_path / "inline", workers=0, batch_size=2, chunk_size=5))
    run_score(config(world, tmp_path / "workers", workers=2, batch_size=2, chunk_size=5))  # CPU: windows of batches
    assert table(tmp_path / "inline").equals(table(tmp_path / "workers"))


def test_the_bank_is_embedded_once_per_output_directory(world, tmp_path):
    from tbps import models
    from tbps.curate.layout import BANK_EMBEDDINGS_FILE
    from tbps.models.encode import encode_texts

    out = tmp_path / "out"
    run_score(config(world, out))
    stored = np.load(out / BANK_EMBEDDINGS_FILE)
    bank = pl.read_parquet(out / "bank.parquet")[C.CAPTION].to_list()
    assert stored.dtype == np.float32 and stored.shape == (len(bank), 128)
    np.testing.assert_array_equal(stored, encode_texts(models.load("tbps-tiny"), bank))
    # A resumed run reads the stored embeddings: a damaged file is reported, not silently re-embedded.
    for part in (out / "scores").glob("part-*.parquet"):
        part.unlink()
        break
    np.save(out / BANK_EMBEDDINGS_FILE, stored[:3])
    with pytest.raises(TbpsError, match="stored bank embeddings"):
        run_score(config(world, out))
    (out / BANK_EMBEDDINGS_FILE).write_bytes(b"not a numpy file")
    with pytest.raises(TbpsError, match="cannot be read"):
        run_score(config(world, out))


def test_duplicate_pair_ids_are_refused_before_work(world, tmp_path):
    pairs = pl.DataFrame({C.PAIR_ID: ["x", "y", "x"], "image": ["p000/000.jpg"] * 3, "caption": ["a", "b", "c"]})
    pairs.write_parquet(world / "imgs" / "dup.parquet")
    with pytest.raises(TbpsError, match="every pair needs its own id"):
        run_score(config(world, tmp_path / "out", data=str(world / "imgs" / "dup.parquet"), image_col="image", caption_col="caption"))
    assert not (tmp_path / "out").exists()


def test_changed_parameters_are_refused(world, tmp_path):
    run_score(config(world, tmp_path / "out"))
    with pytest.raises(TbpsError, match="bank_size"):
        run_score(config(world, tmp_path / "out", bank_size=5))
    with pytest.raises(UsageError):
        config(world, tmp_path / "out", shard="3/2")


def test_resume_after_lost_parts_gives_the_same_table(world, tmp_path):
    run_score(config(world, tmp_path / "a"))
    run_score(config(world, tmp_path / "b"))
    parts = sorted((tmp_path / "b" / "scores").glob("*.parquet"))
    assert len(parts) >= 3
    for p in parts[1::2]:
        p.unlink()
    s = run_score(config(world, tmp_path / "b"))
    assert s.parts_skipped == len(parts) - len(parts[1::2]) and s.complete
    assert table(tmp_path / "a").equals(table(tmp_path / "b"))


def test_shards_together_equal_one_run(world, tmp_path):
    run_score(config(world, tmp_path / "one"))
    first = run_score(config(world, tmp_path / "two", shard="0/2"))
    assert not first.complete
    second = run_score(config(world, tmp_path / "two", shard="1/2"))
    assert second.complete and (tmp_path / "two" / "score.json").exists()
    assert table(tmp_path / "one").equals(table(tmp_path / "two"))


def test_cli_scores_and_reports(world, tmp_path, cli):
    res = cli("score", world / "reid_raw.json", "--model", "tbps-tiny", "--bank", world / "bank.txt",
              "--out", tmp_path / "out", "--workers", "0", "--precision", "fp32", "--quiet")
    assert res.exit_code == 0, res.output
    assert "complete" in res.output and table(tmp_path / "out").height == 24
    res = cli("score", world / "nope.json", "--model", "tbps-tiny", "--bank", world / "bank.txt", "--out", tmp_path / "x", "--quiet")
    assert res.exit_code == 1
    res = cli("score", world / "reid_raw.json", "--model", "tbps-tiny", "--bank", world / "bank.txt", "--out", tmp_path / "y",
              "--precision", "fp8")
    assert res.exit_code == 2


def _score_cmd(world: Path, out: Path, chunk: int) -> list[str]:
    return ["score", str(world / "reid_raw.json"), "--model", "tbps-tiny", "--bank", str(world / "bank.txt"), "--out", str(out),
            "--workers", "0", "--precision", "fp32", "--batch-size", "2", "--chunk-size", str(chunk), "--device", "cpu", "--quiet"]


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path):
    world = make_world(tmp_path / "w", n_images=40)
    run_score(config(world, tmp_path / "ref", chunk_size=4, batch_size=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tbps", *_score_cmd(world, tmp_path / "out", 4)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out" / "scores").glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "out" / "scores").glob("part-*.parquet")))
    assert 3 <= written < 20, "the kill must land mid-run"
    s = run_score(config(world, tmp_path / "out", chunk_size=4, batch_size=2))
    assert s.parts_skipped == written and s.complete
    assert table(tmp_path / "ref").equals(table(tmp_path / "out"))
    assert not list((tmp_path / "out").rglob(f"*{TEMP_SUFFIX}"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(world, tmp_path):
    run_score(config(world, tmp_path / "one", chunk_size=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m", "tbps",
           *_score_cmd(world, tmp_path / "two", 4)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "two" / "score.json").exists()
    assert table(tmp_path / "one").equals(table(tmp_path / "two"))


def test_truncation_flags_from_tokens_match_a_full_retokenisation():
    from tbps import models
    from tbps.models.encode import caption_truncated, encode_texts

    loaded = models.load("tbps-tiny")
    # Around the boundary: captions of 60..65 BPE tokens against a 64-token context (62 + start/end fit).
    captions = ["a " * k + "person" for k in range(58, 66)] + ["short"]
    _, flags = encode_texts(loaded, captions, return_truncated=True)
    exact = [len(loaded.tokenizer.encode(c)) + 2 > loaded.context_length for c in captions]
    assert flags.tolist() == exact == caption_truncated(loaded, captions).tolist()
    assert True in exact and False in exact


def test_a_damaged_or_foreign_part_is_scored_again_on_resume(world, tmp_path):
    import shutil

    run_score(config(world, tmp_path / "ref"))
    run_score(config(world, tmp_path / "out"))
    other = tmp_path / "other"
    run_score(config(world, other, seed=7))  # another bank sample and model weights
    parts = sorted((tmp_path / "out" / "scores").glob("part-*.parquet"))
    assert len(parts) >= 3
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # truncated by a full disk
    shutil.copyfile(other / "scores" / parts[1].name, parts[1])  # another run's part
    said: list[str] = []
    s = run_score(config(world, tmp_path / "out"), log=said.append)
    assert s.complete and s.parts_done_here == 2
    assert any("part 0 is not whole (unreadable" in m for m in said) and any("part 1 is not whole (written by another model" in m for m in said)
    assert table(tmp_path / "ref").equals(table(tmp_path / "out"))


def test_a_wrong_image_root_is_refused_before_any_work_and_says_where_the_images_are(world, tmp_path):
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    with pytest.raises(TbpsError, match="none of .* sampled image files exists") as info:
        run_score(config(world, tmp_path / "out", image_root=str(wrong)))
    assert str(world) in str(info.value) and not (tmp_path / "out").exists()


def test_many_rows_that_are_not_ok_are_warned_about(world, tmp_path):
    images = sorted(p for p in world.rglob("*.jpg"))
    for p in images[: len(images) // 3]:
        p.write_bytes(b"not an image")
    said: list[str] = []
    s = run_score(config(world, tmp_path / "out"), log=said.append)
    assert s.complete and any(m.startswith("warning:") and "are not ok (bad-image" in m for m in said), said


def test_score_files_respect_the_umask(world, tmp_path):
    run_score(config(world, tmp_path / "out"))
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert (path.stat().st_mode & 0o777) == 0o666 & ~mask, path


def test_the_bank_defaults_to_the_train_split_and_a_small_bank_is_warned_about(tmp_path):
    world = make_world(tmp_path / "w", n_images=8)
    records = json.loads((world / "reid_raw.json").read_text())
    for i, rec in enumerate(records):
        rec["split"] = "test" if i % 2 else "train"
    (world / "reid_raw.json").write_text(json.dumps(records))
    said: list[str] = []
    s = run_score(config(world, tmp_path / "out", bank=str(world / "reid_raw.json")), log=said.append)
    bank = pl.read_parquet(tmp_path / "out" / "bank.parquet")[C.CAPTION].to_list()
    test_captions = {c for i, r in enumerate(records) if i % 2 for c in r["captions"]}
    assert bank and not set(bank) & test_captions and s.bank_size == len(bank)
    assert any(m.startswith("warning: the bank holds") for m in said)
    with pytest.raises(TbpsError, match="the bank has no 'dev' split"):
        run_score(config(world, tmp_path / "other", bank=str(world / "reid_raw.json"), bank_split="dev"))


def _with_splits(world: Path) -> dict[str, str]:
    """Give the world's persons the splits train, val, test in turn; returns {pair_id: split}."""
    records = json.loads((world / "reid_raw.json").read_text())
    for rec in records:
        rec["split"] = ("train", "val", "test")[(rec["id"] - 1) % 3]
    (world / "reid_raw.json").write_text(json.dumps(records))
    return {f"{i}:{j}": rec["split"] for i, rec in enumerate(records) for j in range(len(rec["captions"]))}


def test_the_split_is_carried_and_split_scores_only_the_named_splits(world, tmp_path):
    truth = _with_splits(world)
    run_score(config(world, tmp_path / "all", chunk_size=100))
    everything = table(tmp_path / "all")
    assert everything.columns == [f.name for f in C.SCORE_SCHEMA] and dict(everything.select(C.PAIR_ID, C.SPLIT).iter_rows()) == truth

    said: list[str] = []
    s = run_score(config(world, tmp_path / "some", split="val,train", chunk_size=100), log=said.append)
    some = table(tmp_path / "some")
    kept = {k for k, v in truth.items() if v != "test"}
    assert set(some[C.PAIR_ID]) == kept and s.rows == len(kept) and s.rows_other_splits == len(truth) - len(kept)
    assert s.splits == ["train", "val"] and any(m.startswith(f"scoring split train,val: {len(kept)} of 24 rows (not scored: test 8)") for m in said)
    params = json.loads((tmp_path / "some" / "params.json").read_text())
    assert params["split"] == ["train", "val"] and params["rows"] == len(kept) and params["image_root"] == os.path.realpath(world / "imgs")
    # The same pairs score the same (the captions are batched with fewer neighbours: last bits only).
    same = everything.filter(pl.col(C.PAIR_ID).is_in(kept))
    assert np.allclose(same[C.SCORE].to_numpy(), some[C.SCORE].to_numpy(), atol=1e-5)
    # The manifest of a selection keeps each row's split (and person id).
    run_select(SelectConfig(scores=(tmp_path / "all",), out=tmp_path / "m.parquet", dedup="none"))
    manifest = pl.read_parquet(tmp_path / "m.parquet")
    assert dict(manifest.select(C.PAIR_ID, C.SPLIT).iter_rows()) == truth and manifest[C.PERSON_ID].null_count() == 0

    with pytest.raises(TbpsError, match="split: None -> \\['train', 'val'\\]"):
        run_score(config(world, tmp_path / "all", split="train,val", chunk_size=100))  # a resume with another --split
    with pytest.raises(TbpsError, match="split 'dev' not found.*splits in the file: test, train, val"):
        run_score(config(world, tmp_path / "dev", split="dev"))
    pl.DataFrame({"image": ["p000/000.jpg"], "caption": ["a person"]}).write_csv(world / "imgs" / "nosplit.csv")
    with pytest.raises(TbpsError, match="the data has no splits"):
        run_score(config(world, tmp_path / "csv", data=str(world / "imgs" / "nosplit.csv"), split="train"))
    with pytest.raises(UsageError, match="--split names one or more splits"):
        config(world, tmp_path / "x", split=" , ")


def test_an_old_score_directory_without_split_is_refused_on_resume_and_stays_readable(world, tmp_path):
    out = tmp_path / "old"
    run_score(config(world, out))
    # What an earlier tbps wrote: parts without the split column, params.json without split or image_root.
    for part in (out / "scores").glob("part-*.parquet"):
        old = pq.read_table(part)
        pq.write_table(old.drop_columns([C.SPLIT]).replace_schema_metadata(old.schema.metadata), part)
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k not in ("split", "image_root")}))

    with pytest.raises(TbpsError, match="score run of an earlier tbps, whose table has no split column") as info:
        run_score(config(world, out))
    assert "new --out" in str(info.value) and "\n" not in str(info.value)
    frame = table(out)
    assert frame.columns == [f.name for f in C.SCORE_SCHEMA] and frame[C.SPLIT].null_count() == frame.height == 24
    selected = run_select(SelectConfig(scores=(out,), out=tmp_path / "m.parquet", dedup="none"))
    assert selected.selection.rows_kept == 24 and pl.read_parquet(tmp_path / "m.parquet")[C.SPLIT].null_count() == 24
    assert run_inspect(InspectConfig(table=out)).rows == 24


def test_progress_moves_per_batch_with_the_total_known(world, tmp_path):
    calls: list[tuple[int, int]] = []
    s = run_score(config(world, tmp_path / "out", batch_size=5, chunk_size=7), progress=lambda d, t: calls.append((d, t)))
    expected, written = 0, [0]
    for part in sorted((tmp_path / "out" / "scores").glob("part-*.parquet")):
        rows = pl.read_parquet(part).filter(pl.col(C.STATUS) == C.STATUS_OK)
        images, captions = rows[C.IMAGE_PATH].n_unique(), rows[C.CAPTION].n_unique()
        expected += -(-images // 5) + -(-captions // 256) + 1  # image batches, caption batches, the part written
        written.append(written[-1] + pl.read_parquet(part).height)
    assert len(calls) == expected > s.parts_total
    assert {t for _, t in calls} == {24} and calls[-1] == (24, 24)
    done = [d for d, _ in calls]
    assert done == sorted(done) and set(written[1:]) <= set(done)
