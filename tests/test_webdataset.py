"""Webdataset tar shards as a dataset: detection, reading from the tars, bad members, and the commands on shards.

Every shard is written here with the standard library's ``tarfile``: ``KEY.jpg``, ``KEY.txt``,
``KEY.json`` per sample, and img2dataset's ``.parquet`` per shard where a test needs it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from tbps import columns as C
from tbps.curate.embeddings import ExportEmbeddingsConfig, export_embeddings, score_from_embeddings
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.data.formats.webdataset import expand_braces
from tbps.data.images import open_image
from tbps.data.readers import detect_format, read_dataset, sample_images
from tbps.data.shards import member_size, scan
from tbps.errors import TbpsError
from tbps.eval.leakage import _digest, _sizes
from tbps.files import content_hash
from tbps.report.html import thumbnail_uri
from tbps.train.data import image_file_status

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 30)}


def _jpg(rgb: tuple[int, int, int], seed: int = 0) -> bytes:
    arr = np.zeros((48, 16, 3), np.uint8)
    arr[:] = np.random.default_rng(seed).integers(0, 60, 3)
    arr[10:30, 3:13] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, colour: str, person: int, split: str = "train", seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpg(COLOURS[colour], seed)), (f"{key}.txt", f"a person in a {colour} shirt\n".encode()),
            (f"{key}.json", json.dumps({"key": key, "status": "success", "person_id": person, "split": split}).encode())]


def _pool(root: Path, shards: int = 2, per_shard: int = 4) -> Path:
    """``shards`` tars of ``per_shard`` samples, keys ``SSSSKKKK``, four persons in four colours."""
    pool = root / "pool"
    for s in range(shards):
        members = []
        for k in range(per_shard):
            n = s * per_shard + k
            members += _sample(f"{s:04d}{k:04d}", list(COLOURS)[n % 4], n % 4, seed=n)
        _tar(pool / f"{s:05d}.tar", members)
    return pool


def _statuses(frame: pl.DataFrame) -> dict[str, str]:
    return dict(zip(frame[C.PAIR_ID], frame[C.STATUS]))


# --------------------------------------------------------------------------- detection and reading


def test_brace_patterns_expand_as_webdataset_reads_them():
    assert expand_braces("p/{00000..00002}.tar") == ["p/00000.tar", "p/00001.tar", "p/00002.tar"]
    assert expand_braces("p/{8..10}.tar") == ["p/8.tar", "p/9.tar", "p/10.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("p/{x}.tar") == ["p/{x}.tar"]  # no range, no list: literal braces
    with pytest.raises(TbpsError, match="more than"):
        expand_braces("p/{0..99999999}.tar")


def test_a_tar_a_folder_and_patterns_are_detected_and_read_alike(tmp_path):
    pool = _pool(tmp_path)
    whole = read_dataset(pool)
    for path in (pool, f"{pool}/{{00000..00001}}.tar", f"{pool}/*.tar", f"{pool}/{{00000,00001}}.tar"):
        assert detect_format(path) == "webdataset"
        assert read_dataset(path).equals(whole), path
    assert detect_format(pool / "00000.tar") == "webdataset"
    assert read_dataset(pool / "00000.tar").equals(whole.head(4))
    assert whole.height == 8 and set(whole[C.STATUS]) == {C.STATUS_OK}
    row = whole.row(5, named=True)
    assert row[C.PAIR_ID] == "00010001"  # the key
    assert row[C.IMAGE_PATH] == f"{pool.resolve()}/00001.tar/00010001.jpg"
    assert row[C.CAPTION] == "a person in a green shirt"
    assert (row[C.PERSON_ID], row[C.SPLIT], row[C.SOURCE]) == ("1", "train", "pool")


def test_images_are_read_from_the_tar_with_the_file_hash(tmp_path):
    pool = _pool(tmp_path)
    pairs = read_dataset(pool)
    path = pairs[C.IMAGE_PATH][2]
    res = open_image(path, root=str(pool))
    assert res.ok and res.image.size == (16, 48)
    assert res.image_hash == content_hash(_jpg(COLOURS["blue"], 2))
    assert not list(tmp_path.rglob("*.jpg"))  # nothing extracted
    # Tools that look at files without decoding them see members too.
    assert member_size(path) == len(_jpg(COLOURS["blue"], 2)) and image_file_status(path) == C.STATUS_OK
    assert _digest(path) == res.image_hash and _sizes([path]) == {path: member_size(path)}
    assert image_file_status(f"{pool.resolve()}/00000.tar/gone.jpg") == C.STATUS_MISSING_IMAGE
    sample = sample_images(pairs, pool)
    assert sample.checked == sample.found == 8
    uri, why = thumbnail_uri(path)
    assert why is None and uri.startswith("data:image/jpeg;base64,")


def test_a_member_is_opened_only_inside_the_image_root(tmp_path):
    pool = _pool(tmp_path)
    path = read_dataset(pool)[C.IMAGE_PATH][0]
    assert open_image(path, root=str(tmp_path / "elsewhere")).status == C.STATUS_PATH_OUTSIDE_ROOT
    assert open_image(path.replace("00000000.jpg", "nope.jpg")).status == C.STATUS_MISSING_IMAGE
    # A shard that is a symlink to a tar outside the image root: refused when read, never opened.
    outside = _pool(tmp_path / "out", shards=1)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "00000.tar").symlink_to(outside / "00000.tar")
    frame = read_dataset(linked)
    assert set(frame[C.STATUS]) == {C.STATUS_PATH_OUTSIDE_ROOT}


def test_json_sidecar_fields_and_id_col(tmp_path):
    members = [("a.jpg", _jpg(COLOURS["red"])), ("a.txt", b"a person"), ("a.json", b'{"pid": "p7", "split": "val"}'),
               ("b.jpg", _jpg(COLOURS["red"])), ("b.txt", b"a person"), ("b.json", b'{"pid": [1]}'),
               ("c.jpg", _jpg(COLOURS["red"])), ("c.txt", b"a person"), ("c.json", b"[1, 2]"),
               ("d.jpg", _jpg(COLOURS["red"])), ("d.txt", b"a person")]
    tar = _tar(tmp_path / "s" / "00000.tar", members)
    frame = read_dataset(tar, id_col="pid")
    assert frame.filter(pl.col(C.PAIR_ID) == "a").select(C.PERSON_ID, C.SPLIT).row(0) == ("p7", "val")
    assert _statuses(frame) == {"a": C.STATUS_OK, "b": C.STATUS_BAD_RECORD, "c": C.STATUS_BAD_RECORD, "d": C.STATUS_OK}
    assert "'pid'" in frame.filter(pl.col(C.PAIR_ID) == "b")[C.ERROR][0]
    assert read_dataset(tar)[C.PERSON_ID][0] is None  # the default field is person_id


# --------------------------------------------------------------------------- bad input


def scan_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan(fd)
    finally:
        os.close(fd)


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def test_bad_members_are_statuses_and_every_sample_is_a_row(tmp_path):
    members = [*_sample("good", "red", 1), ("nocap.jpg", _jpg(COLOURS["green"])), ("noimg.txt", b"a person in blue"),
               ("latin.jpg", _jpg(COLOURS["blue"])), ("latin.txt", "a person in a caf\u00e9".encode("latin-1")),
               ("../escape.jpg", _jpg(COLOURS["red"])), ("../escape.txt", b"a person"),
               ("blank.jpg", _jpg(COLOURS["red"])), ("blank.txt", b"  \n")]
    frame = read_dataset(_tar(tmp_path / "s" / "00000.tar", members))
    assert _statuses(frame) == {
        "good": C.STATUS_OK,
        "nocap": C.STATUS_EMPTY_CAPTION,
        "noimg": C.STATUS_MISSING_IMAGE,
        "latin": C.STATUS_BAD_RECORD,
        "../escape": C.STATUS_PATH_OUTSIDE_ROOT,
        "blank": C.STATUS_EMPTY_CAPTION,
    }
    errors = dict(zip(frame[C.PAIR_ID], frame[C.ERROR]))
    assert "nocap.txt" in errors["nocap"] and "not UTF-8" in errors["latin"] and "'..'" in errors["../escape"]
    assert frame.filter(pl.col(C.PAIR_ID) == "noimg")[C.CAPTION][0] == "a person in blue"
    paths = dict(zip(frame[C.PAIR_ID], frame[C.IMAGE_PATH]))
    assert paths["noimg"] is None and paths["../escape"] is None and paths["latin"].endswith("00000.tar/latin.jpg")


def test_a_truncated_tar_keeps_what_is_readable_and_says_where_it_stops(tmp_path):
    tar = _tar(tmp_path / "s" / "00000.tar", [m for k in range(4) for m in _sample(f"k{k}", "red", k, seed=k)])
    offsets = {m.name: m for m in scan_file(tar).members}
    _cut(tar, offsets["k2.jpg"].offset + 100)  # inside the third sample's image
    frame = read_dataset(tar)
    st = _statuses(frame)
    assert st["k0"] == st["k1"] == C.STATUS_OK
    assert st["k2"] == C.STATUS_BAD_IMAGE and "cut off" in frame.filter(pl.col(C.PAIR_ID) == "k2")[C.ERROR][0]
    assert st["00000.tar:shard"] == C.STATUS_BAD_RECORD
    shard_error = frame.filter(pl.col(C.PAIR_ID) == "00000.tar:shard")[C.ERROR][0]
    assert "truncated" in shard_error and "3 samples read" in shard_error
    assert open_image(frame[C.IMAGE_PATH][1]).ok


def test_img2dataset_tables_give_failed_downloads_a_status(tmp_path):
    pool = tmp_path / "pool"
    _tar(pool / "00000.tar", [*_sample("000000000", "red", 1), *_sample("000000002", "blue", 2)])
    pl.DataFrame({
        "key": ["000000000", "000000001", "000000002", "000000003"],
        "status": ["success", "failed_to_download", "success", "success"],
        "error_message": [None, "HTTP Error 404: Not Found", None, None],
        "caption": ["a", "a man in a grey coat", "b", "c"],
        "url": ["http://x/0", "http://x/1", "http://x/2", "http://x/3"],
    }).write_parquet(pool / "00000.parquet")
    (pool / "00000_stats.json").write_text("{}")
    assert detect_format(pool) == "webdataset"
    frame = read_dataset(pool)
    assert _statuses(frame) == {"000000000": C.STATUS_OK, "000000002": C.STATUS_OK, "000000001": C.STATUS_DOWNLOAD_FAILED,
                                "000000003": C.STATUS_MISSING_IMAGE}
    failed = frame.filter(pl.col(C.PAIR_ID) == "000000001").row(0, named=True)
    assert failed[C.ERROR] == "img2dataset failed_to_download: HTTP Error 404: Not Found"
    assert failed[C.CAPTION] == "a man in a grey coat" and failed[C.IMAGE_PATH] is None
    assert "00000.parquet" in frame.filter(pl.col(C.PAIR_ID) == "000000003")[C.ERROR][0]
    # A shard whose every download failed may have a table and no tar: its samples are still rows.
    pl.DataFrame({"key": ["000010000", "000010001"], "status": ["failed_to_download", "success"],
                  "error_message": ["timeout", None]}).write_parquet(pool / "00001.parquet")
    frame = read_dataset(pool)
    assert frame.height == 6
    assert _statuses(frame)["000010000"] == C.STATUS_DOWNLOAD_FAILED and _statuses(frame)["000010001"] == C.STATUS_MISSING_IMAGE


def test_repeated_keys_across_shards_stay_unique_rows(tmp_path):
    pool = tmp_path / "pool"
    _tar(pool / "00000.tar", _sample("k", "red", 1))
    _tar(pool / "00001.tar", _sample("k", "blue", 2))
    frame = read_dataset(pool)
    assert _statuses(frame) == {"k": C.STATUS_OK, "00001.tar/k": C.STATUS_BAD_RECORD}


def test_missing_and_garbage_shards_are_rows_and_nothing_readable_is_one_line(tmp_path, cli):
    pool = _pool(tmp_path, shards=1)
    (pool / "00002.tar").write_bytes(b"this is not a tar file" * 40)
    frame = read_dataset(f"{pool}/{{00000..00002}}.tar")
    st = _statuses(frame)
    assert list(st.values()).count(C.STATUS_OK) == 4
    assert st["00001.tar:shard"] == st["00002.tar:shard"] == C.STATUS_BAD_RECORD
    res = cli("info", pool / "00002.tar")
    assert res.exit_code == 1 and "none of the 1 tar shards holds a readable sample" in res.output
    assert "Traceback" not in res.output


def test_a_pattern_that_matches_nothing_is_one_line(tmp_path, cli):
    _pool(tmp_path, shards=1)
    for pattern in (f"{tmp_path}/pool/{{00005..00009}}.tar", f"{tmp_path}/pool/*-x.tar"):
        res = cli("info", pattern)
        assert res.exit_code == 1, res.output
        assert "no tar shard matches the pattern" in res.output and len(res.output.strip().splitlines()) <= 3
    res = cli("info", f"{tmp_path}/pool/{{00000..00000}}.tar")
    assert res.exit_code == 0 and "webdataset" in res.output


# --------------------------------------------------------------------------- the commands on shards


def _files_and_bank(root: Path) -> Path:
    bank = root / "bank.txt"
    bank.write_text("\n".join(f"a person in a {a} shirt with {b} shoes" for a in COLOURS for b in COLOURS) + "\n")
    return bank


def _score(data: Path | str, bank: Path, out: Path, **kw) -> ScoreConfig:
    base = dict(data=str(data), model="tbps-tiny", bank=str(bank), out=str(out), precision="fp32", workers=0, batch_size=3,
                chunk_size=3, device="cpu")
    return ScoreConfig(**{**base, **kw})


def _table(out: Path) -> pl.DataFrame:
    return read_score_table(out).collect().sort(C.PAIR_ID)


def test_score_resume_and_shards_on_tar_shards(tmp_path):
    pool = _pool(tmp_path, shards=3, per_shard=3)
    bank = _files_and_bank(tmp_path)
    pattern = f"{pool}/{{00000..00002}}.tar"
    one = run_score(_score(pattern, bank, tmp_path / "one"))
    assert one.complete and one.status_counts == {C.STATUS_OK: 9}
    whole = _table(tmp_path / "one")
    assert whole[C.IMAGE_HASH].null_count() == 0 and whole[C.SCORE].is_finite().all()
    # Resume: lost parts are scored again and the table is the uninterrupted one.
    run_score(_score(pattern, bank, tmp_path / "resumed"))
    parts = sorted((tmp_path / "resumed" / "scores").glob("*.parquet"))
    for p in parts[::2]:
        p.unlink()
    again = run_score(_score(pattern, bank, tmp_path / "resumed"))
    assert again.parts_skipped == len(parts) - len(parts[::2]) and again.complete
    assert _table(tmp_path / "resumed").equals(whole)
    # --shard 0/2 and 1/2 together score every row once.
    first = run_score(_score(pattern, bank, tmp_path / "two", shard="0/2"))
    assert not first.complete
    second = run_score(_score(pattern, bank, tmp_path / "two", shard="1/2"))
    assert second.complete and _table(tmp_path / "two").equals(whole)


def test_decoding_workers_read_members_alike(tmp_path):
    pool = _pool(tmp_path, shards=2, per_shard=3)
    bank = _files_and_bank(tmp_path)
    run_score(_score(pool, bank, tmp_path / "inline"))
    run_score(_score(pool, bank, tmp_path / "workers", workers=2))
    cols = [C.PAIR_ID, C.IMAGE_HASH, C.STATUS]
    assert _table(tmp_path / "inline").select(cols).equals(_table(tmp_path / "workers").select(cols))


@pytest.mark.slow
def test_info_score_select_train_eval_on_shards(tmp_path, cli):
    pool = tmp_path / "pool"
    for s in range(2):
        members = []
        for k in range(8):
            n = s * 8 + k
            members += _sample(f"{s:04d}{k:04d}", list(COLOURS)[n % 4], n % 4 + 4 * (s == 1), split="train" if s == 0 else "test", seed=n)
        _tar(pool / f"{s:05d}.tar", members)
    bank = _files_and_bank(tmp_path)
    res = cli("info", f"{pool}/{{00000..00001}}.tar")
    assert res.exit_code == 0 and "webdataset" in res.output and "found 16 of 16" in res.output
    fast = ["--workers", "0", "--precision", "fp32", "--device", "cpu", "--quiet"]
    res = cli("score", pool / "00000.tar", "--model", "tbps-tiny", "--bank", bank, "--out", tmp_path / "scores", *fast)
    assert res.exit_code == 0, res.output
    res = cli("select", tmp_path / "scores", "--out", tmp_path / "m.parquet", "--keep", "1.0", "-q")
    assert res.exit_code == 0, res.output
    manifest = pl.read_parquet(tmp_path / "m.parquet")
    assert manifest.height >= 1 and all(".tar/" in p for p in manifest[C.IMAGE_PATH])
    res = cli("train", "--manifest", tmp_path / "m.parquet", "--out", tmp_path / "run", "--model", "tbps-tiny", "--batch-size", "4",
              "--steps", "2", "--warmup", "1", *fast)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    res = cli("eval", pool / "00001.tar", "--model", tmp_path / "run", "--out", tmp_path / "eval.json", *fast)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["metrics"]["gallery"] == 8 and record["metrics"]["queries"] == 8 and record["counts"]["images_failed"] == {}


def test_scores_from_clip_retrieval_embeddings_hash_shard_members(tmp_path):
    """score --embeddings reads each member's bytes for image_hash, as a score run from the images does."""
    pool = _pool(tmp_path, shards=2, per_shard=3)
    bank = _files_and_bank(tmp_path)
    run_score(_score(pool, bank, tmp_path / "scores"))
    export_embeddings(ExportEmbeddingsConfig(score_dir=tmp_path / "scores", out=tmp_path / "clip"))
    summary = score_from_embeddings(_score(pool, bank, tmp_path / "again", embeddings=str(tmp_path / "clip")))
    assert summary.complete and summary.status_counts == {C.STATUS_OK: 6}
    images, stored = _table(tmp_path / "scores"), _table(tmp_path / "again")
    assert stored[C.IMAGE_HASH].to_list() == images[C.IMAGE_HASH].to_list() and stored[C.IMAGE_HASH].null_count() == 0
    assert stored[C.BANK_RANK].to_list() == images[C.BANK_RANK].to_list()
