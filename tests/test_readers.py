"""Dataset readers, safe image paths and ``tbps info``, on small files in each real format."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from tbps.columns import (
    CAPTION,
    ERROR,
    IMAGE_PATH,
    PAIR_ID,
    PAIR_SCHEMA,
    PERSON_ID,
    SOURCE,
    SPLIT,
    STATUS,
    STATUS_BAD_RECORD,
    STATUS_EMPTY_CAPTION,
    STATUS_OK,
    STATUS_PATH_OUTSIDE_ROOT,
    polars_schema,
)
from tbps.data.paths import ImageResolver, resolve_image
from tbps.data.readers import FORMATS, detect_format, read_captions, read_dataset
from tbps.errors import TbpsError, UsageError

# ----------------------------------------------------------------------------- helpers

# Every file opened while `watch_opens()` is active (audit hooks cannot be removed, so the
# hook stays installed and records only while a list is set).
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watch_opens():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _img(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 24), colour).save(path)
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def _real(p: Path) -> str:
    return os.path.realpath(p)


def _assert_schema(frame: pl.DataFrame) -> None:
    assert frame.schema == polars_schema(PAIR_SCHEMA)
    assert frame.get_column(PAIR_ID).n_unique() == frame.height


UNICODE = "Une femme portant un manteau rouge — 穿着红色外套的女人 👜"


# ----------------------------------------------------------------------------- each format


def _cuhk(tmp: Path, name="reid_raw.json") -> Path:
    _img(tmp / "imgs" / "cam_a" / "001_45.jpg")
    _img(tmp / "imgs" / "train_query" / "p1_s1.jpg")
    return _json(
        tmp / name,
        [
            {"split": "train", "captions": ["A man in a red coat.", UNICODE], "file_path": "cam_a/001_45.jpg",
             "processed_tokens": [["a", "man"], ["une"]], "id": 12},
            {"split": "test", "captions": ["A woman with a bag."], "file_path": "train_query\\p1_s1.jpg",
             "processed_tokens": [["a"]], "id": 7},
        ],
    )


def test_cuhk_pedes_one_row_per_caption(tmp_path):
    path = _cuhk(tmp_path)
    frame = read_dataset(path)
    _assert_schema(frame)
    assert frame.get_column(PAIR_ID).to_list() == ["0:0", "0:1", "1:0"]
    assert frame.get_column(CAPTION).to_list() == ["A man in a red coat.", UNICODE, "A woman with a bag."]
    assert frame.get_column(PERSON_ID).to_list() == ["12", "12", "7"]
    assert frame.get_column(SPLIT).to_list() == ["train", "train", "test"]
    assert set(frame.get_column(SOURCE)) == {"cuhk-pedes"}
    assert set(frame.get_column(STATUS)) == {STATUS_OK}
    # default root is imgs/ next to the json; the backslash path is normalised
    assert frame.get_column(IMAGE_PATH).to_list() == [
        _real(tmp_path / "imgs/cam_a/001_45.jpg"), _real(tmp_path / "imgs/cam_a/001_45.jpg"),
        _real(tmp_path / "imgs/train_query/p1_s1.jpg"),
    ]


def test_icfg_pedes_same_fields_told_apart_by_name_and_paths(tmp_path):
    _img(tmp_path / "imgs" / "test" / "0006" / "0006_002_01.jpg")
    rec = {"id": 6, "file_path": "test/0006/0006_002_01.jpg", "captions": ["The man wears a grey jacket."],
           "processed_tokens": [["the"]], "split": "test"}
    by_name = _json(tmp_path / "ICFG-PEDES.json", [rec])
    by_paths = _json(tmp_path / "annotations.json", [rec])
    for path in (by_name, by_paths):
        frame = read_dataset(path)
        assert detect_format(path) == "icfg-pedes"
        assert frame.row(0, named=True) | {ERROR: None} == {
            PAIR_ID: "0:0", IMAGE_PATH: _real(tmp_path / "imgs/test/0006/0006_002_01.jpg"),
            CAPTION: "The man wears a grey jacket.", PERSON_ID: "6", SPLIT: "test", SOURCE: "icfg-pedes",
            STATUS: STATUS_OK, ERROR: None,
        }


def test_rstpreid_img_path(tmp_path):
    _img(tmp_path / "imgs" / "0000_c14_0031.jpg")
    path = _json(tmp_path / "data_captions.json", [
        {"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["He carries a black backpack.", UNICODE], "split": "val"},
    ])
    frame = read_dataset(path)
    _assert_schema(frame)
    assert frame.select(PAIR_ID, PERSON_ID, SPLIT, SOURCE).rows() == [
        ("0:0", "0", "val", "rstpreid"), ("0:1", "0", "val", "rstpreid")]
    assert frame.get_column(IMAGE_PATH).to_list() == [_real(tmp_path / "imgs/0000_c14_0031.jpg")] * 2


def test_aptm_training_and_test_files(tmp_path):
    _img(tmp_path / "gene_crop" / "c_g_a_0" / "0.jpg")
    train = _json(tmp_path / "g_c_g_a_0_attrs.json", [
        {"image": "gene_crop/c_g_a_0/0.jpg", "caption": "a young boy wearing a black hoodie",
         "image_id": "c_g_a_0_0", "label": [1, 0, -1]},
        {"image": "gene_crop/c_g_a_0/1.jpg", "caption": UNICODE, "image_id": "c_g_a_0_1", "label": [0, 1, 1]},
    ])
    frame = read_dataset(train)
    _assert_schema(frame)
    # MALS's image_id names an image, not a person: no person ids unless --id-col names the field
    assert frame.select(PAIR_ID, PERSON_ID, SPLIT, SOURCE, STATUS).rows() == [
        ("0:0", None, None, "aptm", STATUS_OK), ("1:0", None, None, "aptm", STATUS_OK)]
    assert read_dataset(train, id_col="image_id").get_column(PERSON_ID).to_list() == ["c_g_a_0_0", "c_g_a_0_1"]
    # root defaults to the json's folder; a missing image is not the reader's business
    assert frame.get_column(IMAGE_PATH).to_list() == [
        _real(tmp_path / "gene_crop/c_g_a_0/0.jpg"), _real(tmp_path / "gene_crop/c_g_a_0/1.jpg")]
    test = _json(tmp_path / "cuhk_test.json", [
        {"image": "gene_crop/c_g_a_0/0.jpg", "caption": ["first", "second"], "image_id": 3},
    ])
    frame = read_dataset(test, id_col="image_id")  # APTM's CUHK test files number persons in image_id
    assert frame.select(PAIR_ID, CAPTION, PERSON_ID).rows() == [("0:0", "first", "3"), ("0:1", "second", "3")]
    # with an images/ folder beside the json (as tbps synth writes its pool), that is the root
    _img(tmp_path / "pool" / "images" / "g000" / "000000.jpg")
    pool = _json(tmp_path / "pool" / "pool.json", [{"image": "g000/000000.jpg", "caption": "c", "image_id": "g000_000000"}])
    assert read_dataset(pool).get_column(IMAGE_PATH).to_list() == [_real(tmp_path / "pool/images/g000/000000.jpg")]


def test_csv_with_guessed_columns_keeps_ids_as_written(tmp_path):
    _img(tmp_path / "images" / "p1" / "a.jpg")
    path = tmp_path / "pairs.csv"
    path.write_text(f"image_path,caption,person_id,split\nimages/p1/a.jpg,\"{UNICODE}\",007,train\n"
                    "images\\p1\\a.jpg,second caption,007,\n", encoding="utf-8")
    frame = read_dataset(path)
    _assert_schema(frame)
    assert frame.select(PAIR_ID, CAPTION, PERSON_ID, SPLIT, SOURCE).rows() == [
        ("0:0", UNICODE, "007", "train", "pairs"), ("1:0", "second caption", "007", None, "pairs")]
    assert frame.get_column(IMAGE_PATH).to_list() == [_real(tmp_path / "images/p1/a.jpg")] * 2


def test_jsonl_with_named_columns(tmp_path):
    _img(tmp_path / "x" / "1.png")
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"img": "x/1.png", "desc": UNICODE, "pid": 12},
        {"img": "x/1.png", "desc": "plain", "pid": 13},
    ]) + "\n", encoding="utf-8")
    frame = read_dataset(path, image_col="img", caption_col="desc", id_col="pid")
    _assert_schema(frame)
    assert frame.select(PAIR_ID, CAPTION, PERSON_ID, SOURCE).rows() == [
        ("0:0", UNICODE, "12", "pool"), ("1:0", "plain", "13", "pool")]


def test_parquet_uses_its_own_pair_ids(tmp_path):
    _img(tmp_path / "imgs" / "a.jpg")
    pl.DataFrame({"pair_id": ["p-1", "p-2"], "image": ["imgs/a.jpg", "imgs/a.jpg"], "text": ["one", "two"],
                  "person_id": [1.0, 2.0]}).write_parquet(tmp_path / "t.parquet")
    frame = read_dataset(tmp_path / "t.parquet")
    assert frame.select(PAIR_ID, CAPTION, PERSON_ID, SOURCE).rows() == [("p-1", "one", "1", "t"), ("p-2", "two", "2", "t")]


def test_image_folder_with_sub_folders(tmp_path):
    root = tmp_path / "people"
    _img(root / "alice" / "front.jpg")
    (root / "alice" / "front.txt").write_text(f"a woman in red\n{UNICODE}\n", encoding="utf-8")
    _img(root / "bob" / "day 2" / "back.PNG")
    (root / "bob" / "day 2" / "back.txt").write_text("a man with a backpack", encoding="utf-8")
    _img(root / "bob" / "no_caption.jpg")
    (root / "bob" / "orphan.txt").write_text("caption without image\n", encoding="utf-8")
    frame = read_dataset(root, id_col="folder")
    _assert_schema(frame)
    rows = {r[PAIR_ID]: r for r in frame.iter_rows(named=True)}
    assert sorted(rows) == ["alice/front.jpg:0", "alice/front.jpg:1", "bob/day 2/back.PNG:0",
                            "bob/no_caption.jpg:0", "bob/orphan.txt:0"]
    assert rows["alice/front.jpg:1"][CAPTION] == UNICODE
    assert rows["alice/front.jpg:0"][PERSON_ID] == "alice"
    assert rows["bob/day 2/back.PNG:0"][PERSON_ID] == "day 2"  # the image's parent folder
    assert rows["bob/day 2/back.PNG:0"][IMAGE_PATH] == _real(root / "bob/day 2/back.PNG")
    assert rows["bob/no_caption.jpg:0"][STATUS] == STATUS_EMPTY_CAPTION
    assert "no_caption.txt" in rows["bob/no_caption.jpg:0"][ERROR]
    assert rows["bob/orphan.txt:0"][STATUS] == STATUS_BAD_RECORD
    assert set(frame.get_column(SOURCE)) == {"people"}
    assert read_dataset(root).get_column(PERSON_ID).null_count() == frame.height  # no ids unless asked


def test_captions_txt_and_read_captions(tmp_path):
    path = tmp_path / "bank.txt"
    path.write_text(f"first caption\n\n   \n{UNICODE}\n", encoding="utf-8")
    frame = read_dataset(path)
    _assert_schema(frame)
    assert frame.get_column(STATUS).to_list() == [STATUS_OK, STATUS_EMPTY_CAPTION, STATUS_EMPTY_CAPTION, STATUS_OK]
    assert frame.get_column(IMAGE_PATH).null_count() == 4
    assert read_captions(path) == ["first caption", UNICODE]
    assert read_captions(_cuhk(tmp_path / "c")) == ["A man in a red coat.", UNICODE, "A woman with a bag."]
    only_captions = tmp_path / "bank.csv"
    only_captions.write_text("caption\none\ntwo\n", encoding="utf-8")
    assert read_captions(only_captions) == ["one", "two"]  # a bank needs no image column


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("reid_raw.json", [{"split": "train", "captions": ["c"], "file_path": "a.jpg", "processed_tokens": [], "id": 1}], "cuhk-pedes"),
        ("CUHK-PEDES.json", [{"split": "train", "captions": ["c"], "file_path": "a.jpg", "id": 1}], "cuhk-pedes"),
        ("caption_all.json", [{"captions": ["c"], "file_path": "cam_a/a.jpg", "id": 1}], "cuhk-pedes"),
        ("ICFG-PEDES.json", [{"split": "train", "captions": ["c"], "file_path": "x/a.jpg", "id": 1}], "icfg-pedes"),
        ("data_captions.json", [{"id": 1, "img_path": "a.jpg", "captions": ["c"], "split": "train"}], "rstpreid"),
        ("pool.json", [{"image": "a.jpg", "caption": "c", "image_id": "x", "label": [1]}], "aptm"),
        ("t.csv", "image,caption\na.jpg,c\n", "csv"),
        ("t.jsonl", '{"image": "a.jpg", "caption": "c"}\n', "jsonl"),
        ("t.ndjson", '{"image": "a.jpg", "caption": "c"}\n', "jsonl"),
        ("bank.txt", "c\n", "captions-txt"),
    ],
)
def test_detect_format(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        _json(path, content)
    assert detect_format(path) == expected
    assert len(read_dataset(path)) >= 1


def test_detect_folders(tmp_path):
    _img(tmp_path / "imgs" / "a.jpg")
    assert detect_format(tmp_path / "imgs") == "image-folder"
    (tmp_path / "parts").mkdir()
    pl.DataFrame({"image": ["a.jpg"], "caption": ["c"]}).write_parquet(tmp_path / "parts" / "part-0.parquet")
    assert detect_format(tmp_path / "parts") == "parquet"
    assert read_dataset(tmp_path / "parts").get_column(CAPTION).to_list() == ["c"]


def test_format_override(tmp_path):
    rec = {"image": "a.jpg", "caption": "c", "image_id": 1}
    odd = tmp_path / "pool.dat"
    odd.write_text(json.dumps([rec]), encoding="utf-8")
    with pytest.raises(TbpsError, match="suffix '.dat'"):
        read_dataset(odd)
    assert read_dataset(odd, format="aptm").get_column(SOURCE).to_list() == ["aptm"]
    icfg = _json(tmp_path / "ICFG-PEDES.json", [{"captions": ["c"], "file_path": "a.jpg", "id": 1}])
    assert read_dataset(icfg, format="cuhk-pedes").get_column(SOURCE).to_list() == ["cuhk-pedes"]
    table = tmp_path / "table.txt"
    table.write_text("image,caption\na.jpg,c\n", encoding="utf-8")
    assert read_dataset(table).height == 2  # detected as captions-txt: one caption per line
    assert read_dataset(table, format="csv").get_column(CAPTION).to_list() == ["c"]
    with pytest.raises(TbpsError, match=r"rstpreid expects.*'img_path'.*found keys \['captions', 'file_path', 'id'\]"):
        read_dataset(icfg, format="rstpreid")
    with pytest.raises(UsageError, match="--format must be one of"):
        read_dataset(icfg, format="coco")
    with pytest.raises(UsageError, match="--caption-col only apply to csv/jsonl/parquet"):
        read_dataset(icfg, caption_col="text")
    assert set(FORMATS) >= {"cuhk-pedes", "icfg-pedes", "rstpreid", "aptm", "csv", "jsonl", "parquet", "image-folder", "captions-txt"}


# ----------------------------------------------------------------------------- traversal


@pytest.fixture
def world(tmp_path):
    """An image root with inside files and links, and a secret outside it."""
    root = tmp_path / "root"
    _img(root / "a" / "b.jpg")
    outside = tmp_path / "outside"
    _img(outside / "secret.jpg")
    (outside / "secret.txt").write_text("do not read me", encoding="utf-8")
    (root / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "link_in.jpg").symlink_to(root / "a" / "b.jpg")
    (root / "dir_in").symlink_to(root / "a", target_is_directory=True)
    return root, outside


@pytest.mark.parametrize(
    "relative, reason",
    [
        ("../outside/secret.jpg", "'..'"),
        ("a/../../outside/secret.jpg", "'..'"),
        ("..\\outside\\secret.jpg", "'..'"),
        ("{outside}/secret.jpg", "absolute path"),
        ("C:\\Windows\\secret.jpg", "absolute path"),
        ("//server/share/secret.jpg", "absolute path"),
        ("link_out.jpg", "symlink"),
        ("dir_out/secret.jpg", "symlink"),
        ("dir_out/../root/../outside/secret.jpg", "symlink"),
        ("dir_in/../../outside/secret.jpg", "'..'"),
    ],
)
def test_escapes_are_refused_without_opening_anything(world, relative, reason):
    root, outside = world
    with watch_opens() as opened:
        path, status, error = resolve_image(root, relative.format(outside=outside))
    assert (path, status) == (None, STATUS_PATH_OUTSIDE_ROOT)
    assert reason in error and str(os.path.realpath(root)) in error
    assert opened == []


@pytest.mark.parametrize(
    "relative, expected",
    [
        ("a/b.jpg", "a/b.jpg"),
        ("a\\b.jpg", "a/b.jpg"),
        ("./a/./b.jpg", "a/b.jpg"),
        ("a/../a/b.jpg", "a/b.jpg"),
        ("{root}/a/b.jpg", "a/b.jpg"),
        ("link_in.jpg", "a/b.jpg"),
        ("dir_in/b.jpg", "a/b.jpg"),
        ("a/missing.jpg", "a/missing.jpg"),  # missing files are the decoder's business
        ("ünïcode dir/名前.jpg", "ünïcode dir/名前.jpg"),
    ],
)
def test_paths_inside_the_root_resolve(world, relative, expected):
    root, _ = world
    path, status, error = resolve_image(root, relative.format(root=root))
    assert (path, status, error) == (os.path.join(os.path.realpath(root), expected), STATUS_OK, None)


def test_resolver_cache_gives_the_same_answers(world):
    root, outside = world
    cached = ImageResolver(root)
    for rel in ["a/b.jpg", "dir_out/secret.jpg", "a/b.jpg", "dir_in/b.jpg", "link_out.jpg", "dir_out/secret.jpg"]:
        assert cached.resolve(rel) == resolve_image(root, rel)


def test_reader_refuses_escapes_per_row_and_never_reads_them(world):
    root, outside = world
    records = [{"captions": [f"caption {i}"], "file_path": p, "id": i} for i, p in enumerate(
        ["a/b.jpg", "../outside/secret.jpg", str(outside / "secret.jpg"), "link_out.jpg", "dir_out/secret.jpg"])]
    path = _json(root.parent / "reid_raw.json", records)
    with watch_opens() as opened:
        frame = read_dataset(path, image_root=root)
    assert frame.get_column(STATUS).to_list() == [STATUS_OK] + [STATUS_PATH_OUTSIDE_ROOT] * 4
    assert frame.get_column(CAPTION).to_list() == [f"caption {i}" for i in range(5)]  # captions kept
    assert frame.get_column(IMAGE_PATH).to_list()[1:] == [None] * 4
    assert not [p for p in opened if "outside" in p or p.endswith(".jpg")]


def test_manifest_paths_resolve_through_the_same_resolver(world):
    from tbps.train.data import read_manifest, usable_pairs

    root, outside = world
    rels = ["a/b.jpg", "../outside/secret.jpg", "link_out.jpg", "dir_out/secret.jpg", "a\\b.jpg", _real(root / "a/b.jpg")]
    manifest = root.parent / "manifest.parquet"
    pl.DataFrame({PAIR_ID: [f"{k}:0" for k in range(len(rels))], IMAGE_PATH: rels, CAPTION: ["c"] * len(rels),
                  PERSON_ID: ["1"] * len(rels)}).write_parquet(manifest)
    with watch_opens() as opened:
        frame = read_manifest(manifest, image_root=str(root))
    inside = _real(root / "a/b.jpg")
    assert frame.get_column(IMAGE_PATH).to_list() == [inside, None, None, None, inside, inside]  # absolute: kept
    assert frame.get_column(STATUS).to_list() == [STATUS_OK] + [STATUS_PATH_OUTSIDE_ROOT] * 3 + [STATUS_OK] * 2
    assert "'..'" in frame.get_column(ERROR)[1] and "symlink" in frame.get_column(ERROR)[2]
    assert not [p for p in opened if "outside" in os.path.realpath(p)]
    kept, report = usable_pairs(frame, str(manifest), max_missing=0.0)
    assert kept.height == 3 and report.skipped == {STATUS_PATH_OUTSIDE_ROOT: 3}


def test_image_folder_refuses_links_out_and_reads_no_caption_there(world):
    root, outside = world
    (root / "a" / "b.txt").write_text("inside caption", encoding="utf-8")
    (root / "a" / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "a" / "leak.txt").symlink_to(outside / "secret.txt")
    with watch_opens() as opened:
        frame = read_dataset(root)
    by_id = {r[PAIR_ID]: r for r in frame.iter_rows(named=True)}
    assert by_id["a/b.jpg:0"][CAPTION] == "inside caption"
    assert by_id["a/leak.jpg:0"][STATUS] == STATUS_PATH_OUTSIDE_ROOT
    assert by_id["dir_out:0"][STATUS] == STATUS_PATH_OUTSIDE_ROOT  # the linked folder is not walked
    assert "link_out.jpg:0" in by_id and by_id["link_out.jpg:0"][STATUS] == STATUS_PATH_OUTSIDE_ROOT
    assert "dir_in/b.jpg:0" not in by_id  # a link to a folder already walked: its pairs once only
    assert not [p for p in opened if "outside" in os.path.realpath(p)]
    # a linked folder that stays inside the image root is walked
    _img(root / "extra" / "e.jpg")
    (root / "extra" / "e.txt").write_text("extra caption", encoding="utf-8")
    (root / "a" / "more").symlink_to(root / "extra", target_is_directory=True)
    linked = read_dataset(root / "a", image_root=root).filter(pl.col(PAIR_ID) == "more/e.jpg:0")
    assert linked.select(IMAGE_PATH, CAPTION, STATUS).rows() == [(_real(root / "extra/e.jpg"), "extra caption", STATUS_OK)]


# ----------------------------------------------------------------------------- several JSON files


def _mals(tmp: Path) -> Path:
    """A MALS-like release: several APTM json files in one folder, images beside them."""
    folder = tmp / "gene_attrs"
    for name, n in (("g_c_g_a_0_attrs", 2), ("g_4x_attrs", 3)):
        for k in range(n):
            _img(folder / "images" / name / f"{k}.jpg")
        _json(folder / f"{name}.json", [{"image": f"{name}/{k}.jpg", "caption": f"caption {k} of {name}", "image_id": f"{name}_{k}",
                                         "label": [1]} for k in range(n)])
    return folder


def test_a_folder_or_pattern_of_json_files_is_one_dataset(tmp_path):
    folder = _mals(tmp_path)
    frame = read_dataset(folder)
    _assert_schema(frame)
    # sorted file order, ids prefixed by the file's stem, one source per file
    assert frame.select(PAIR_ID, SOURCE).rows() == [
        ("g_4x_attrs:0:0", "g_4x_attrs"), ("g_4x_attrs:1:0", "g_4x_attrs"), ("g_4x_attrs:2:0", "g_4x_attrs"),
        ("g_c_g_a_0_attrs:0:0", "g_c_g_a_0_attrs"), ("g_c_g_a_0_attrs:1:0", "g_c_g_a_0_attrs")]
    assert set(frame.get_column(STATUS)) == {STATUS_OK} and frame.get_column(PERSON_ID).null_count() == 5
    assert frame.get_column(IMAGE_PATH)[0] == _real(folder / "images/g_4x_attrs/0.jpg")  # images/ inside the folder
    # a quoted pattern reads the same files the same way; a second read gives the same ids
    assert read_dataset(str(folder / "*.json")).equals(frame) and read_dataset(folder).equals(frame)
    assert detect_format(folder) == detect_format(folder / "*.json") == "aptm"
    # one file alone keeps its ids and the format name as source (score directories stay resumable)
    single = read_dataset(folder / "g_4x_attrs.json", image_root=folder / "images")
    assert single.select(PAIR_ID, SOURCE).rows()[0] == ("0:0", "aptm")


def test_several_files_whose_stems_repeat_are_named_by_their_path(tmp_path):
    for part in ("a", "b"):
        _json(tmp_path / part / "train.json", [{"split": "train", "captions": ["x"], "file_path": "1.jpg", "id": 1}])
    frame = read_dataset(str(tmp_path / "*" / "train.json"), image_root=tmp_path)
    assert frame.select(PAIR_ID, SOURCE).rows() == [("a/train:0:0", "a/train"), ("b/train:0:0", "b/train")]


def test_several_json_files_refuse_a_file_of_another_format(tmp_path):
    _json(tmp_path / "d" / "a.json", [{"image": "1.jpg", "caption": "x", "image_id": "1"}])
    bad = _json(tmp_path / "d" / "b.json", [{"split": "train", "captions": ["x"], "file_path": "1.jpg", "id": 1}])
    with pytest.raises(TbpsError, match="none of the first records has the fields aptm expects") as info:
        read_dataset(tmp_path / "d")
    assert str(bad) in str(info.value)
    with pytest.raises(TbpsError, match="no file matches the pattern"):
        read_dataset(str(tmp_path / "d" / "*.jsonx"))
    # an image folder with a stray .json stays an image folder
    _img(tmp_path / "photos" / "1.jpg")
    (tmp_path / "photos" / "1.txt").write_text("a man\n", encoding="utf-8")
    _json(tmp_path / "photos" / "meta.json", {"about": "these photos"})
    assert detect_format(tmp_path / "photos") == "image-folder"


def test_info_says_mals_has_no_person_ids_and_lists_the_files(tmp_path, cli):
    result = cli("info", _mals(tmp_path), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "person ids: none in this format" in out and "image_id names an image" in out
    assert "sources (one per file)" in out and "g_4x_attrs │ 3" in out and "g_c_g_a_0_attrs │ 2" in out
    with_ids = cli("info", _mals(tmp_path / "again"), "--id-col", "image_id", env={"COLUMNS": "300"})
    assert with_ids.exit_code == 0 and "person ids: none" not in with_ids.stdout
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.jpg,x\n", encoding="utf-8")
    assert "name one with --id-col" in " ".join(cli("info", table, env={"COLUMNS": "300"}).stdout.split())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("reid_raw.json", "[{\"captions\": [", r"invalid JSON at line 1 column \d+"),
        ("reid_raw.json", "", "the file is empty"),
        ("reid_raw.json", '{"images": [], "dataset": "coco"}', r"expected a JSON list.*\['dataset', 'images'\]"),
        ("reid_raw.json", '"just a string"', "expected a JSON list of records at the top level, found a str"),
        ("reid_raw.json", "[]", "no records"),
        ("mystery.json", '[{"url": "http://x", "alt": "y"}]',
         r"none of the JSON formats: cuhk-pedes expects .*'file_path'.*rstpreid expects .*'img_path'.*aptm expects .*'image_id'.*found keys \['alt', 'url'\]"),
        ("t.csv", "a,b\n1,2\n", r"no image path column: expected one of \['image_path', 'image', 'file_path', 'img_path'\].*found columns \['a', 'b'\]"),
        ("t.csv", "image,text_en\na.jpg,c\n", r"no caption column: expected one of \['caption', 'text'\].*found columns \['image', 'text_en'\]"),
        ("t.csv", "image,image_path,caption\na,b,c\n", r"several possible image path columns \['image_path', 'image'\]"),
        ("t.csv", "", "the file is empty"),
        ("t.csv", "image,caption\n", "no rows"),
        ("t.jsonl", '{"image": "a.jpg", "caption": "c"}\n{"image": \n', "invalid JSON on line 2"),
        ("t.xml", "<a/>", "cannot tell the dataset format from the suffix '.xml'"),
        ("blank.txt", "\n  \n", "no captions"),
    ],
)
def test_malformed_files_name_what_was_expected_and_found(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TbpsError, match=message) as info:
        read_dataset(path)
    assert str(path) in str(info.value)


def test_missing_named_columns_and_paths(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("img,txt\na.jpg,c\n", encoding="utf-8")
    with pytest.raises(TbpsError, match=r"no caption column 'caption_en' \(from --caption-col\); found columns \['img', 'txt'\]"):
        read_dataset(path, image_col="img", caption_col="caption_en")
    with pytest.raises(TbpsError, match="no such file"):
        read_dataset(tmp_path / "absent.json")
    with pytest.raises(TbpsError, match="image root is not a directory"):
        read_dataset(path, image_root=tmp_path / "nowhere", image_col="img", caption_col="txt")


def test_bad_records_keep_every_row(tmp_path):
    records = [
        {"split": "train", "captions": ["good one", "good two"], "file_path": "a.jpg", "id": 1},
        {"split": "train", "file_path": "b.jpg", "id": 2},  # no captions
        {"split": "train", "captions": ["orphan caption"], "id": 3},  # no file_path
        {"split": "train", "captions": 5, "file_path": "c.jpg", "id": 4},  # captions not a list
        {"split": "train", "captions": ["fine", None, 3], "file_path": "d.jpg", "id": 5},  # non-string captions
        ["not", "an", "object"],
        {"split": "train", "captions": [], "file_path": "e.jpg", "id": 7},
        {"split": "train", "captions": ["", "   \t"], "file_path": "f.jpg", "id": 8},
        {"split": "train", "captions": ["path is a number"], "file_path": 42, "id": 9},
    ]
    frame = read_dataset(_json(tmp_path / "reid_raw.json", records))
    _assert_schema(frame)
    expected = [
        ("0:0", STATUS_OK, None), ("0:1", STATUS_OK, None),
        ("1:0", STATUS_BAD_RECORD, "missing field 'captions'"),
        ("2:0", STATUS_BAD_RECORD, "missing field 'file_path'"),
        ("3:0", STATUS_BAD_RECORD, "'captions'"),
        ("4:0", STATUS_OK, None), ("4:1", STATUS_BAD_RECORD, "'captions'[1] is a NoneType"),
        ("4:2", STATUS_BAD_RECORD, "'captions'[2] is a int"),
        ("5:0", STATUS_BAD_RECORD, "not an object"),
        ("6:0", STATUS_EMPTY_CAPTION, "empty list"),
        ("7:0", STATUS_EMPTY_CAPTION, "blank"), ("7:1", STATUS_EMPTY_CAPTION, "blank"),
        ("8:0", STATUS_BAD_RECORD, "'file_path' is a int"),
    ]
    got = frame.select(PAIR_ID, STATUS, ERROR).rows()
    assert [(p, s) for p, s, _ in got] == [(p, s) for p, s, _ in expected]
    for (_, _, error), (_, _, fragment) in zip(got, expected):
        assert (error is None) if fragment is None else (fragment in error), (error, fragment)
    # rows in = rows out: every caption, and every record without one, is a row
    assert frame.height == sum(max(1, len(r["captions"])) if isinstance(r, dict) and isinstance(r.get("captions"), list) else 1 for r in records)
    assert frame.filter(pl.col(PAIR_ID) == "2:0").get_column(CAPTION).to_list() == ["orphan caption"]


def test_table_rows_with_missing_cells(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image,caption\na.jpg,one\n,two\nb.jpg,\nc.jpg,\"  \"\n", encoding="utf-8")
    frame = read_dataset(path)
    # An empty CSV caption is an empty caption, like a blank one (it used to be bad-record).
    assert frame.select(PAIR_ID, STATUS).rows() == [
        ("0:0", STATUS_OK), ("1:0", STATUS_BAD_RECORD), ("2:0", STATUS_EMPTY_CAPTION), ("3:0", STATUS_EMPTY_CAPTION)]
    assert "empty image path" in frame.get_column(ERROR)[1]
    # A null cell (typed formats have them) is a missing value, named by its column.
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"image": "a.jpg", "caption": null}\n{"image": null, "caption": "two"}\n', encoding="utf-8")
    errors = read_dataset(jsonl).select(STATUS, ERROR).rows()
    assert [s for s, _ in errors] == [STATUS_BAD_RECORD] * 2
    assert "missing value in column 'caption'" in errors[0][1] and "missing value in column 'image'" in errors[1][1]


def _empty_caption_samples(tmp: Path) -> dict[str, Path]:
    """One file per format whose only caption is empty ("") and, where a format has room, one blank ("  ")."""
    _img(tmp / "imgs" / "a.jpg")
    _img(tmp / "images" / "a.jpg")
    (tmp / "t.csv").write_text("image,caption\nimgs/a.jpg,\nimgs/a.jpg,\"  \"\n", encoding="utf-8")
    (tmp / "t.jsonl").write_text('{"image": "imgs/a.jpg", "caption": ""}\n{"image": "imgs/a.jpg", "caption": "  "}\n', encoding="utf-8")
    pl.DataFrame({"image": ["imgs/a.jpg"] * 2, "caption": ["", "  "]}).write_parquet(tmp / "t.parquet")
    (tmp / "photos").mkdir()
    _img(tmp / "photos" / "a.jpg")
    (tmp / "photos" / "a.txt").write_text("\n  \n", encoding="utf-8")
    return {
        "cuhk-pedes": _json(tmp / "reid_raw.json", [{"split": "train", "captions": ["", "  "], "file_path": "a.jpg", "id": 1}]),
        "aptm": _json(tmp / "pool.json", [{"image": "a.jpg", "caption": "", "image_id": "x"}, {"image": "a.jpg", "caption": "  ", "image_id": "y"}]),
        "csv": tmp / "t.csv",
        "jsonl": tmp / "t.jsonl",
        "parquet": tmp / "t.parquet",
        "image-folder": tmp / "photos",
    }


@pytest.mark.parametrize("name", ["cuhk-pedes", "aptm", "csv", "jsonl", "parquet", "image-folder"])
def test_an_empty_caption_is_empty_caption_in_every_format(tmp_path, name):
    path = _empty_caption_samples(tmp_path)[name]
    frame = read_dataset(path)
    assert frame.height == 2 and set(frame.get_column(STATUS)) == {STATUS_EMPTY_CAPTION}, frame.select(STATUS, ERROR).rows()


# ----------------------------------------------------------------------------- tbps info


def test_info_cli_prints_the_summary(tmp_path, cli):
    path = _cuhk(tmp_path)
    result = cli("info", path, "--head", "2")
    assert result.exit_code == 0, result.output
    for text in ("cuhk-pedes", "rows", "3", "persons", "train", "test", "ok", "0:0", "0:1"):
        assert text in result.stdout
    assert "1:0" not in result.stdout.split("first 2 rows")[1]


def test_info_cli_bad_input_is_one_line_and_exit_1(tmp_path, cli):
    bad = tmp_path / "reid_raw.json"
    bad.write_text("{not json", encoding="utf-8")
    result = cli("info", bad)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "invalid JSON" in lines[0] and str(bad) in lines[0]
    usage = cli("info", bad, "--format", "coco")
    assert usage.exit_code == 2 and "--format" in usage.stderr


@pytest.mark.parametrize("bad", ["imgs/a\x00b.jpg", "imgs/a\nb.jpg", "imgs/\ud800.jpg"])
def test_an_unrepresentable_image_path_is_a_row_status_at_read_time(tmp_path, bad):
    from tbps.data.paths import ImageResolver

    path, status, error = ImageResolver(tmp_path).resolve(bad)
    assert path is None and status == "bad-record" and "control character or invalid unicode" in error
