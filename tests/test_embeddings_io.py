"""Embeddings in and out in clip-retrieval's layout: tbps export-embeddings and tbps score --embeddings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from tbps import columns as C
from tbps.curate.embeddings import (
    MATCH_PATH_CAPTION,
    MATCH_ROW_ORDER,
    ExportEmbeddingsConfig,
    export_embeddings,
    open_clip_retrieval,
    partition_label,
    score_from_embeddings,
)
from tbps.curate.layout import ScoreDir, list_parts
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.curate.select import SelectConfig
from tbps.curate.select_io import run_select
from tbps.errors import TbpsError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
RGB = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 160, 60), "black": (15, 15, 15), "white": (235, 235, 235), "yellow": (230, 210, 40)}
N_IMAGES = 10  # two captions each: 20 pairs, the pairs of one image missing on disk


def make_world(root: Path) -> Path:
    """A CUHK-PEDES reid_raw.json of small two-colour figures (image 3's file deleted) and a bank file."""
    records = []
    for i in range(N_IMAGES):
        up, low = COLOURS[i % 6], COLOURS[(i * 5 + 1) % 6]
        im = Image.new("RGB", (32, 96), (120, 120, 120))
        im.paste(RGB[up], (8, 20, 24, 50))
        im.paste(RGB[low], (8, 50, 24, 85))
        rel = f"p{i // 2:03d}/{i:03d}.jpg"
        (root / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        if i != 3:
            im.save(root / "imgs" / rel, quality=95)
        caps = [f"a person in a {up} shirt and {low} trousers", f"someone wearing {low} pants with a {up} top"]
        records.append({"split": "train", "captions": caps, "file_path": rel, "processed_tokens": [c.split() for c in caps], "id": i // 2 + 1})
    (root / "reid_raw.json").write_text(json.dumps(records))
    (root / "bank.txt").write_text("\n".join(f"a person in a {a} jacket and {b} shorts carrying a bag" for a in COLOURS for b in COLOURS) + "\n")
    return root


def config(world: Path, out: Path, **kw) -> ScoreConfig:
    base = dict(data=str(world / "reid_raw.json"), model="tbps-tiny", bank=str(world / "bank.txt"), out=str(out),
                precision="fp32", workers=0, batch_size=4, chunk_size=6, device="cpu")
    return ScoreConfig(**{**base, **kw})


def table(out: Path) -> pl.DataFrame:
    return read_score_table(out).collect().sort(C.PAIR_ID)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(world, a normal score run of it, its export in clip-retrieval's layout, the export's summary)."""
    root = tmp_path_factory.mktemp("emb-io")
    world = make_world(root / "world")
    run_score(config(world, root / "scores"))
    summary = export_embeddings(ExportEmbeddingsConfig(score_dir=root / "scores", out=root / "clip"))
    return world, root / "scores", root / "clip", summary


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------- export


def test_export_writes_clip_retrievals_files_row_aligned_float16_normalised(scored):
    _, scores, clip, summary = scored
    assert sorted(str(p.relative_to(clip)) for p in clip.rglob("*") if p.is_file()) == [
        "img_emb/img_emb_0.npy", "metadata/metadata_0.parquet", "tbps-export.json", "text_emb/text_emb_0.npy"]
    img, txt = np.load(clip / "img_emb/img_emb_0.npy"), np.load(clip / "text_emb/text_emb_0.npy")
    meta = pl.read_parquet(clip / "metadata/metadata_0.parquet")
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (18, 128) and meta.height == 18
    assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    assert meta.columns[:2] == [C.IMAGE_PATH, C.CAPTION] and C.PAIR_ID in meta.columns
    # Row i of each file is the same pair: the score run's embeddings of that pair_id.
    parts = pl.concat([pl.read_parquet(p) for p in list_parts(ScoreDir(scores).embeddings)])
    assert parts[C.PAIR_ID].to_list() == meta[C.PAIR_ID].to_list()
    assert np.array_equal(np.stack(parts[C.IMAGE_EMB].to_list()).astype(np.float16), img)
    assert np.array_equal(np.stack(parts[C.TEXT_EMB].to_list()).astype(np.float16), txt)
    captions = dict(zip(*table(scores).select(C.PAIR_ID, C.CAPTION)))
    assert meta[C.CAPTION].to_list() == [captions[p] for p in meta[C.PAIR_ID]]
    # The two pairs of the missing image have no embedding: counted, not written.
    assert (summary.rows, summary.written, summary.partitions, summary.skipped) == (20, 18, 1, {C.STATUS_MISSING_IMAGE: 2})


@pytest.mark.parametrize("n, count, label", [(0, 1, "0"), (3, 9, "3"), (0, 10, "00"), (7, 12, "07"), (11, 12, "11"), (5, 100, "005")])
def test_partition_labels_are_zero_padded_as_clip_retrieval_names_them(n, count, label):
    assert partition_label(n, count) == label


def test_rows_per_file_partitions_concatenate_to_the_single_file(scored, tmp_path):
    _, scores, clip, _ = scored
    summary = export_embeddings(ExportEmbeddingsConfig(score_dir=scores, out=tmp_path / "parts", rows_per_file=5))
    assert summary.partitions == 4
    names = sorted(p.name for p in (tmp_path / "parts/img_emb").iterdir())
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy", "img_emb_3.npy"]
    rows = [np.load(tmp_path / f"parts/img_emb/img_emb_{k}.npy").shape[0] for k in range(4)]
    assert rows == [5, 5, 5, 3]
    joined = np.concatenate([np.load(tmp_path / f"parts/text_emb/text_emb_{k}.npy") for k in range(4)])
    assert np.array_equal(joined, np.load(clip / "text_emb/text_emb_0.npy"))
    meta = pl.concat([pl.read_parquet(tmp_path / f"parts/metadata/metadata_{k}.parquet") for k in range(4)])
    assert meta.equals(pl.read_parquet(clip / "metadata/metadata_0.parquet"))


def test_export_refuses_a_directory_it_did_not_write_and_an_unfinished_run(scored, tmp_path):
    _, scores, _, _ = scored
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(TbpsError, match="not an earlier tbps export"):
        export_embeddings(ExportEmbeddingsConfig(score_dir=scores, out=tmp_path / "mine"))
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(scores, unfinished)
    (unfinished / "score.json").unlink()
    with pytest.raises(TbpsError, match="not complete"):
        export_embeddings(ExportEmbeddingsConfig(score_dir=unfinished, out=tmp_path / "out"))
    with pytest.raises(UsageError, match="--format"):
        ExportEmbeddingsConfig(score_dir=scores, out=tmp_path / "out", format="webdataset")


# ---------------------------------------------------------------------------- score --embeddings


def test_round_trip_gives_the_same_scores_ranks_and_statuses(scored, tmp_path):
    world, scores, clip, _ = scored
    summary = score_from_embeddings(config(world, tmp_path / "again", embeddings=str(clip)))
    before, after = table(scores), table(tmp_path / "again")
    assert after.schema == before.schema
    assert after[C.STATUS].to_list() == before[C.STATUS].to_list()
    assert after[C.IMAGE_HASH].to_list() == before[C.IMAGE_HASH].to_list()
    ok = before[C.STATUS] == C.STATUS_OK
    assert ok.sum() == 18
    # Stored in float16: the cosines agree to fp16 rounding, and with them the bank ranks.
    assert np.allclose(after.filter(ok)[C.SCORE].to_numpy(), before.filter(ok)[C.SCORE].to_numpy(), atol=2e-3)
    assert after.filter(ok)[C.BANK_RANK].to_list() == before.filter(ok)[C.BANK_RANK].to_list()
    assert summary.match == C.PAIR_ID and summary.embeddings_used == 18 and summary.status_counts == {C.STATUS_MISSING_IMAGE: 2, C.STATUS_OK: 18}
    # tbps select reads it like any score run.
    run_select(SelectConfig(scores=(tmp_path / "again",), out=tmp_path / "m.parquet", keep=0.5))
    kept = pl.read_parquet(tmp_path / "m.parquet")
    assert kept.height == 10 and set(kept[C.STATUS]) == {C.STATUS_OK}


def _strip_to_clip_retrieval(store: Path, keep_columns: list[str], drop_row: int | None = None, order: np.ndarray | None = None) -> None:
    """Rewrite an export as another writer would: only ``keep_columns`` of metadata, rows reordered, one dropped."""
    img, txt = np.load(store / "img_emb/img_emb_0.npy"), np.load(store / "text_emb/text_emb_0.npy")
    meta = pl.read_parquet(store / "metadata/metadata_0.parquet")
    order = np.arange(len(img)) if order is None else order
    if drop_row is not None:
        order = order[order != drop_row]
    np.save(store / "img_emb/img_emb_0.npy", img[order])
    np.save(store / "text_emb/text_emb_0.npy", txt[order])
    meta[order].select(keep_columns).write_parquet(store / "metadata/metadata_0.parquet")


def test_metadata_without_pair_ids_matches_on_image_path_and_caption(scored, tmp_path):
    world, scores, clip, _ = scored
    store = copy_store(clip, tmp_path / "cr")
    meta = pl.read_parquet(store / "metadata/metadata_0.parquet")
    dropped = meta[C.PAIR_ID][4]
    # clip-retrieval's paths are as its input folder was given ("world/imgs/p000/000.jpg", relative
    # to where it ran) and its captions are .txt contents, with a newline.
    meta.with_columns(pl.col(C.IMAGE_PATH).map_elements(lambda p: "world/imgs/" + p.split("/imgs/")[1], return_dtype=pl.String),
                      pl.col(C.CAPTION) + "\n").write_parquet(store / "metadata/metadata_0.parquet")
    _strip_to_clip_retrieval(store, [C.IMAGE_PATH, C.CAPTION], drop_row=4,
                             order=np.random.default_rng(0).permutation(18))
    assert open_clip_retrieval(store).match == MATCH_PATH_CAPTION
    summary = score_from_embeddings(config(world, tmp_path / "s", embeddings=str(store)))
    before, after = table(scores), table(tmp_path / "s")
    row = after.filter(pl.col(C.PAIR_ID) == dropped)
    assert row[C.STATUS].item() == C.STATUS_NO_EMBEDDING and row[C.SCORE].item() is None and "matches its image_path+caption" in row[C.ERROR].item()
    both = before.join(after, on=C.PAIR_ID, suffix="_new").filter((pl.col(C.STATUS) == C.STATUS_OK) & (pl.col(C.PAIR_ID) != dropped))
    assert both.height == 17 and (both[C.STATUS + "_new"] == C.STATUS_OK).all()
    assert np.allclose(both[C.SCORE].to_numpy(), both[C.SCORE + "_new"].to_numpy(), atol=2e-3)
    assert both[C.BANK_RANK].to_list() == both[C.BANK_RANK + "_new"].to_list()
    assert after.height == 20 and summary.status_counts == {C.STATUS_MISSING_IMAGE: 2, C.STATUS_NO_EMBEDDING: 1, C.STATUS_OK: 17}


@pytest.mark.slow  # a second score run
def test_metadata_without_keys_matches_by_row_order_and_refuses_other_counts(tmp_path):
    world = make_world(tmp_path / "world")
    (world / "imgs/p001/003.jpg").write_bytes((world / "imgs/p001/002.jpg").read_bytes())  # every image present
    run_score(config(world, tmp_path / "scores"))
    export_embeddings(ExportEmbeddingsConfig(score_dir=tmp_path / "scores", out=tmp_path / "cr"))
    # Put the rows in the dataset's reader order (the export is in image-path order), keys gone.
    reader_order = table(tmp_path / "scores").sort(pl.col(C.PAIR_ID).str.split(":").list.eval(pl.element().cast(pl.Int64)))[C.PAIR_ID].to_list()
    meta = pl.read_parquet(tmp_path / "cr/metadata/metadata_0.parquet")
    order = np.array([meta[C.PAIR_ID].to_list().index(p) for p in reader_order])
    shutil.copytree(tmp_path / "cr", tmp_path / "short")
    meta.with_columns(pl.lit("http://x").alias("url")).write_parquet(tmp_path / "cr/metadata/metadata_0.parquet")
    _strip_to_clip_retrieval(tmp_path / "cr", ["url"], order=order)
    assert open_clip_retrieval(tmp_path / "cr").match == MATCH_ROW_ORDER
    score_from_embeddings(config(world, tmp_path / "s", embeddings=str(tmp_path / "cr")))
    before, after = table(tmp_path / "scores"), table(tmp_path / "s")
    assert np.allclose(after[C.SCORE].to_numpy(), before[C.SCORE].to_numpy(), atol=2e-3)
    assert after[C.BANK_RANK].to_list() == before[C.BANK_RANK].to_list()
    meta.with_columns(pl.lit("http://x").alias("url")).write_parquet(tmp_path / "short/metadata/metadata_0.parquet")
    _strip_to_clip_retrieval(tmp_path / "short", ["url"], drop_row=0)
    with pytest.raises(TbpsError, match="19 embedding rows cannot be matched to 20 dataset rows"):
        score_from_embeddings(config(world, tmp_path / "s2", embeddings=str(tmp_path / "short")))


@pytest.mark.parametrize("broken, message", [
    ("text_emb", r"the embeddings' counts disagree: img_emb 18 rows, text_emb 17, metadata 18 \(partition 0: 18 / 17 / 18\)"),
    ("metadata", r"the embeddings' counts disagree: img_emb 18 rows, text_emb 18, metadata 17"),
])
def test_counts_that_disagree_are_one_line_and_nothing_is_written(scored, tmp_path, cli, broken, message):
    world, _, clip, _ = scored
    store = copy_store(clip, tmp_path / "cr")
    if broken == "text_emb":
        np.save(store / "text_emb/text_emb_0.npy", np.load(store / "text_emb/text_emb_0.npy")[:-1])
    else:
        pl.read_parquet(store / "metadata/metadata_0.parquet").head(17).write_parquet(store / "metadata/metadata_0.parquet")
    result = cli("score", world / "reid_raw.json", "--model", "tbps-tiny", "--bank", world / "bank.txt", "--out", tmp_path / "s",
                 "--embeddings", store, "--device", "cpu", env={"COLUMNS": "400"})
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "s").exists()


def test_a_missing_partition_file_is_named(scored, tmp_path):
    _, _, clip, _ = scored
    store = copy_store(clip, tmp_path / "cr")
    shutil.copy(store / "img_emb/img_emb_0.npy", store / "img_emb/img_emb_1.npy")
    with pytest.raises(TbpsError, match="partition 1 has img_emb but no text_emb file"):
        open_clip_retrieval(store)


def test_a_zero_embedding_gets_a_status_and_a_width_mismatch_is_refused(scored, tmp_path):
    world, scores, clip, _ = scored
    store = copy_store(clip, tmp_path / "cr")
    img = np.load(store / "img_emb/img_emb_0.npy")
    img[0] = 0
    np.save(store / "img_emb/img_emb_0.npy", img)
    score_from_embeddings(config(world, tmp_path / "s", embeddings=str(store)))
    first = pl.read_parquet(store / "metadata/metadata_0.parquet")[C.PAIR_ID][0]
    row = table(tmp_path / "s").filter(pl.col(C.PAIR_ID) == first)
    assert row[C.STATUS].item() == C.STATUS_BAD_EMBEDDING and row[C.SCORE].item() is None
    for sub in ("img_emb", "text_emb"):
        np.save(store / f"{sub}/{sub}_0.npy", np.load(store / f"{sub}/{sub}_0.npy")[:, :64])
    with pytest.raises(TbpsError, match="the embeddings are 64-d and --model tbps-tiny embeds 128-d"):
        score_from_embeddings(config(world, tmp_path / "s2", embeddings=str(store)))


@pytest.mark.slow  # three commands end to end
def test_cli_export_then_score_from_embeddings_then_select(scored, tmp_path, cli):
    world, scores, _, _ = scored
    result = cli("export-embeddings", scores, "--format", "clip-retrieval", "--out", tmp_path / "cr", "--rows-per-file", "10",
                 env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "skipped missing-image" in result.stdout and "18" in result.stdout
    assert sorted(p.name for p in (tmp_path / "cr/metadata").iterdir()) == ["metadata_0.parquet", "metadata_1.parquet"]
    args = ["score", world / "reid_raw.json", "--model", "tbps-tiny", "--bank", world / "bank.txt", "--device", "cpu", "--precision", "fp32",
            "--embeddings", tmp_path / "cr"]
    result = cli(*args, "--out", tmp_path / "s", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "matched on pair_id" in result.stdout
    assert table(tmp_path / "s")[C.SCORE].to_list() == pytest.approx(table(scores)[C.SCORE].to_list(), abs=2e-3, nan_ok=True)
    result = cli("select", tmp_path / "s", "--keep", "0.5", "--out", tmp_path / "m.parquet")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(tmp_path / "m.parquet").height > 0
    # A normal run's directory is not overwritten by a run from embeddings.
    result = cli(*args, "--out", scores)
    assert result.exit_code == 1 and "other parameters" in result.stderr
    result = cli(*args, "--out", tmp_path / "s3", "--shard", "0/2")
    assert result.exit_code == 2 and "--shard" in result.output


def test_run_score_refuses_a_config_with_embeddings(tmp_path):
    # The forward-pass engine never silently ignores --embeddings: the CLI sends such a config to score_from_embeddings.
    with pytest.raises(UsageError, match="score_from_embeddings"):
        run_score(config(tmp_path, tmp_path / "s", embeddings=str(tmp_path)))
    with pytest.raises(UsageError, match="--shard"):
        score_from_embeddings(config(tmp_path, tmp_path / "s", embeddings=str(tmp_path), shard="0/2"))
