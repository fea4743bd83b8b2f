"""``tbps score`` with a matching head: the ``itm_score`` column, resume, torchrun, and BLIP-2's several image vectors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from tbps import columns as C
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.data.images import open_image
from tbps.errors import TbpsError
from tbps.models import load

# One torch thread, as each torchrun process has (OMP_NUM_THREADS=1): the same floats in both runs.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def head_model(tmp_path_factory):
    """tbps-tiny with a seeded random matching head, exported (the export keeps the head)."""
    loaded = load("tbps-tiny", seed=0)
    torch.manual_seed(0)
    loaded.attach_itm_head().eval()
    return str(loaded.save(tmp_path_factory.mktemp("head") / "with-head.pt"))


def _config(world, out, model, **kw) -> ScoreConfig:
    base = dict(data=str(world / "pool" / "pool.json"), model=model, bank=str(world / "benchmark" / "reid_raw.json"), out=str(out),
                bank_split="all", precision="fp32", workers=0, batch_size=4, chunk_size=5, device="cpu")
    return ScoreConfig(**{**base, **kw})


def _table(out) -> pl.DataFrame:
    return read_score_table(out).collect().sort(C.PAIR_ID)


def test_a_model_with_a_head_writes_itm_score_equal_to_a_direct_pair_score(synth_world, head_model, tmp_path):
    world = synth_world(0, pool_size=12)
    run_score(_config(world, tmp_path / "s", head_model))
    table = _table(tmp_path / "s")
    assert C.ITM_SCORE in table.columns and table.height == 12
    ok = table.filter(pl.col(C.STATUS) == C.STATUS_OK)
    assert ok[C.ITM_SCORE].null_count() == 0 and ok[C.ITM_SCORE].is_between(0.0, 1.0).all()
    assert table.filter(pl.col(C.STATUS) != C.STATUS_OK)[C.ITM_SCORE].null_count() == table.height - ok.height
    loaded = load(head_model)
    rows = ok.head(4)
    pixels = torch.stack([loaded.preprocess(open_image(p).image) for p in rows[C.IMAGE_PATH].to_list()])
    with torch.no_grad():
        direct = loaded.pair_score(pixels, loaded.tokenizer(rows[C.CAPTION].to_list())).numpy()
    assert np.allclose(rows[C.ITM_SCORE].to_numpy(), direct, atol=1e-5)
    # The cosine and the bank rank do not change with the head.
    plain = tmp_path / "plain"
    run_score(_config(world, plain, head_model, itm=False))
    without = _table(plain)
    assert C.ITM_SCORE not in without.columns
    assert without.select(C.PAIR_ID, C.SCORE, C.BANK_RANK).equals(table.select(C.PAIR_ID, C.SCORE, C.BANK_RANK))


def test_a_model_without_a_head_writes_no_itm_score(synth_world, tmp_path):
    world = synth_world(0, pool_size=12)
    run_score(_config(world, tmp_path / "s", "tbps-tiny"))
    assert C.ITM_SCORE not in _table(tmp_path / "s").columns


def test_itm_scores_resume_to_the_same_table(synth_world, head_model, tmp_path):
    world = synth_world(0, pool_size=12)
    run_score(_config(world, tmp_path / "ref", head_model))
    run_score(_config(world, tmp_path / "out", head_model))
    parts = sorted((tmp_path / "out" / "scores").glob("part-*.parquet"))
    assert len(parts) >= 2
    parts[1].unlink()
    summary = run_score(_config(world, tmp_path / "out", head_model))
    assert summary.parts_done_here == 1 and summary.complete
    assert _table(tmp_path / "ref").equals(_table(tmp_path / "out"))
    # Another choice of --itm on the same directory is another run: refused.
    with pytest.raises(TbpsError, match="other parameters|different parameters|parameters"):
        run_score(_config(world, tmp_path / "out", head_model, itm=False))


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_itm_scores(synth_world, head_model, tmp_path):
    world = synth_world(0, pool_size=12)
    run_score(_config(world, tmp_path / "one", head_model))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531", "-m", "tbps", "score",
           str(world / "pool" / "pool.json"), "--model", head_model, "--bank", str(world / "benchmark" / "reid_raw.json"),
           "--bank-split", "all", "--out", str(tmp_path / "two"), "--workers", "0", "--precision", "fp32", "--batch-size", "4",
           "--chunk-size", "5", "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _table(tmp_path / "one").equals(_table(tmp_path / "two"))


def test_blip2_scores_are_the_max_over_its_query_vectors_and_its_itm_is_written(synth_world, tmp_path):
    pytest.importorskip("transformers")
    from _hf_models import _save

    from tbps.models.protocol import similarity

    world = synth_world(0, pool_size=12)
    _save("blip-2", tmp_path / "blip2")
    spec = f"hf:{tmp_path / 'blip2'}"
    run_score(_config(world, tmp_path / "s", spec))
    table = _table(tmp_path / "s").filter(pl.col(C.STATUS) == C.STATUS_OK)
    loaded = load(spec)
    rows = table.head(3)
    pixels = torch.stack([loaded.preprocess(open_image(p).image) for p in rows[C.IMAGE_PATH].to_list()])
    tokens = loaded.tokenizer(rows[C.CAPTION].to_list())
    with torch.no_grad():
        img = torch.nn.functional.normalize(loaded.encode_image(pixels).view(3, loaded.image_vectors, -1), dim=-1).flatten(1)
        txt = torch.nn.functional.normalize(loaded.encode_text(tokens), dim=-1)
        itm = loaded.pair_score(pixels, tokens).numpy()
    assert loaded.image_vectors == 4
    assert np.allclose(rows[C.SCORE].to_numpy(), similarity(img, txt, 4).diagonal().numpy(), atol=1e-5)
    assert np.allclose(rows[C.ITM_SCORE].to_numpy(), itm, atol=1e-5)
    emb = pl.read_parquet(tmp_path / "s" / "embeddings")
    assert len(emb[C.IMAGE_EMB][0]) == 4 * loaded.embed_dim and len(emb[C.TEXT_EMB][0]) == loaded.embed_dim


def test_a_run_where_every_row_fails_is_an_error_with_the_table_written(synth_world, tmp_path):
    world = synth_world(0, pool_size=12)
    broken = tmp_path / "pool"
    shutil.copytree(world / "pool", broken)
    for image in broken.rglob("*.jpg"):
        image.write_bytes(b"not an image")  # every file there, none decodable
    with pytest.raises(TbpsError, match="no row scored ok"):
        run_score(_config(world, tmp_path / "s", "tbps-tiny", data=str(broken / "pool.json")))
    table = _table(tmp_path / "s")
    assert table.height == 12 and set(table[C.STATUS]) == {C.STATUS_BAD_IMAGE}  # every row accounted for, with its status
