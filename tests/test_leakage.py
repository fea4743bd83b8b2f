"""Held-out data in training: ``tbps train`` refuses a validation split it trains on, ``tbps eval`` warns.

The world is the session's small synthetic one (``synth_world``): a CUHK-PEDES benchmark of 6
identities split 2:1:3 (train 8 pairs, val 4, test 12) and an APTM pool of other identities. The
synthetic demo's two pipelines (a pool manifest, and the benchmark's train split, both validated
on its val split) share nothing with val and must train; a manifest of every benchmark split
shares val's images and persons and must be refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tbps import columns as C
from tbps.eval.leakage import find_overlap, model_training_data
from tbps.files import file_hash

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--model", "tbps-tiny", "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1",
        "--steps", "1", "--quiet"]
SCORE = ["--model", "tbps-tiny", "--workers", "0", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--bank-size", "20", "-q"]


def _image(path: Path, shade: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 24), (shade, 40, 90)).save(path)
    return str(path)


def _rows(paths, persons, source="reid", hashes=None) -> pl.DataFrame:
    frame = pl.DataFrame({C.IMAGE_PATH: paths, C.PERSON_ID: persons, C.SOURCE: [source] * len(paths)},
                         schema={C.IMAGE_PATH: pl.String, C.PERSON_ID: pl.String, C.SOURCE: pl.String})
    return frame.with_columns(pl.Series(C.IMAGE_HASH, hashes, dtype=pl.String)) if hashes is not None else frame


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("overlap")
    made = {name: _image(root / f"{name}.png", shade) for name, shade in (("a", 10), ("b", 60), ("c", 120), ("d", 200))}
    made["a-copy"] = str(root / "elsewhere" / "a.png")
    Path(made["a-copy"]).parent.mkdir()
    shutil.copyfile(made["a"], made["a-copy"])
    return made


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # (images, images by content, persons, persons note contains)
        ("disjoint", (0, 0, 0, None)),
        ("same-path", (1, 0, 0, None)),
        ("same-bytes", (1, 1, 0, None)),
        ("same-bytes-recorded-hash", (1, 1, 0, None)),
        ("same-person", (0, 0, 1, None)),
        ("same-id-other-dataset", (0, 0, 0, "2 person ids of the held-out rows (source reid) also name training rows of another dataset (source other)")),
        ("no-training-ids", (0, 0, None, "training rows have no person ids")),
        ("some-training-ids-missing", (0, 0, 0, "1 training rows have no person id")),
    ],
)
def test_find_overlap(images, case, expected):
    held = _rows([images["a"], images["b"]], ["1", "2"])
    train = {
        "disjoint": _rows([images["c"], images["d"]], ["3", "4"]),
        "same-path": _rows([images["a"], images["d"]], ["3", "4"]),
        "same-bytes": _rows([images["a-copy"], images["d"]], ["3", "4"]),
        "same-bytes-recorded-hash": _rows(["/gone/x.png", images["d"]], ["3", "4"], hashes=[file_hash(images["a"]), None]),
        "same-person": _rows([images["c"], images["d"]], ["2", "4"]),
        "same-id-other-dataset": _rows([images["c"], images["d"]], ["1", "2"], source="other"),
        "no-training-ids": _rows([images["c"], images["d"]], [None, None]),
        "some-training-ids-missing": _rows([images["c"], images["d"]], [None, "4"]),
    }[case]
    found = find_overlap(train, held)
    note = expected[3]
    assert (found.images, found.images_by_content, found.persons) == expected[:3]
    assert (found.persons_note is None) if note is None else (note in found.persons_note), found.persons_note
    assert found.found == bool(found.images or found.persons)
    assert found.persons_other_sources == (2 if case == "same-id-other-dataset" else 0)
    if found.images:
        assert found.image_examples == [images["a"]]  # the held-out path, whichever way it was found
    if found.persons:
        assert found.person_examples == ["2"] and "1 person (e.g. person_id 2)" in found.describe()


@pytest.fixture(scope="module")
def world(synth_world) -> Path:
    return synth_world(seed=5, pool_size=8)


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory, cli) -> dict[str, Path]:
    """Scored and selected manifests: every benchmark split (leaks val) and the pool (does not)."""
    root = tmp_path_factory.mktemp("leak")
    bench = world / "benchmark" / "reid_raw.json"
    made = {}
    for name, data in (("all", bench), ("pool", world / "pool" / "pool.json")):
        res = cli("score", data, "--bank", bench, "--out", root / f"scores-{name}", *SCORE)
        assert res.exit_code == 0, res.output
        res = cli("select", root / f"scores-{name}", "--dedup", "none", "--out", root / f"{name}.parquet", "-q")
        assert res.exit_code == 0, res.output
        made[name] = root / f"{name}.parquet"
    made["root"] = root
    return made


@pytest.mark.slow
def test_training_on_rows_of_the_validation_split_is_refused_unless_allowed(world, runs, cli):
    bench = world / "benchmark" / "reid_raw.json"
    out = runs["root"] / "leaky"
    res = cli("train", "--manifest", runs["all"], "--val", bench, "--out", out, *FAST)
    text = " ".join(res.output.split())
    assert res.exit_code == 1, res.output
    # 1 val identity x 2 images, every one of them a training row; the example is a val image.
    assert "the training rows share 2 images (e.g." in text and "/val/" in text and "and 1 person (e.g. person_id" in text
    assert "--allow-overlap" in text and "Traceback" not in res.output
    assert not (out / "run.json").exists() and not (out / "last").exists()  # refused before training

    res = cli("train", "--manifest", runs["all"], "--val", bench, "--out", out, *FAST, "--allow-overlap")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["allow_overlap"] is True
    overlap = record["val"]["overlap"]
    assert (overlap["images"], overlap["persons"], overlap["allowed"]) == (2, 1, True)
    assert record["val"]["images_also_in_training"] == 2

    # tbps eval of that run on the split it trained on warns, on stderr, even with --quiet, and records it.
    rec_path = runs["root"] / "eval-leaky.json"
    res = cli("eval", bench, "--model", out, "--split", "val", "--workers", "0", "--device", "cpu", "--out", rec_path, "-q")
    assert res.exit_code == 0, res.output
    assert "warning: the model was trained on 2 images" in " ".join(res.stderr.split()) and "not a held-out result" in res.stderr
    rec = json.loads(rec_path.read_text())
    assert rec["training_overlap"][0]["images"] == 2 and rec["training_overlap"][0]["persons"] == 1
    # ... and so does an evaluation of its exported checkpoint (it names the run it came from).
    exported = runs["root"] / "leaky.pt"
    assert cli("export", out, "--merge", "--out", exported).exit_code == 0
    assert model_training_data(str(exported))[0].label == f"manifest {runs['all']}"
    res = cli("eval", bench, "--model", exported, "--split", "val", "--workers", "0", "--device", "cpu",
              "--out", runs["root"] / "eval-exported.json", "-q")
    assert res.exit_code == 0 and "warning: the model was trained on 2 images" in " ".join(res.stderr.split()), res.output


@pytest.mark.slow
def test_the_synthetic_demo_pipelines_are_not_refused(world, runs, cli):
    bench = world / "benchmark" / "reid_raw.json"
    # The benchmark's train split, validated on its val split (identities are disjoint by construction).
    out = runs["root"] / "bench"
    res = cli("train", "--data", bench, "--val", bench, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    overlap = json.loads((out / "run.json").read_text())["val"]["overlap"]
    assert (overlap["images"], overlap["persons"], overlap["allowed"]) == (0, 0, False)
    res = cli("eval", bench, "--model", out, "--workers", "0", "--device", "cpu", "--out", runs["root"] / "eval-bench.json")
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    # A pool manifest: other identities, and no person ids to compare (MALS-style) -- said, not refused.
    out = runs["root"] / "pool"
    res = cli("train", "--manifest", runs["pool"], "--val", bench, "--out", out, *FAST[:-1])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["val"]["overlap"]["images"] == 0 and record["val"]["overlap"]["persons_checked"] is False
    assert "note: persons could not be checked" in " ".join(res.output.split())
