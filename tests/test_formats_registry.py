"""The dataset-format registry: every entry is in ``--help`` and the README, and reads a small file."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Callable

import polars as pl
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tbps.cli import app
from tbps.columns import SOURCE, STATUS, STATUS_OK
from tbps.data.formats import FORMATS
from tbps.data.formats.base import COLUMN_OPTIONS, DIRECTORY, FILE, FILE_OR_DIRECTORY
from tbps.data.readers import detect_format, read_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # no wrapping inside a name


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 24), (200, 30, 30)).save(path)


def _json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _webdataset(tmp: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 24), (200, 30, 30)).save(buf, format="JPEG")
    (tmp / "shards").mkdir()
    with tarfile.open(tmp / "shards" / "00000.tar", "w") as tf:
        for name, data in (("k0.jpg", buf.getvalue()), ("k0.txt", b"a man")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return tmp / "shards"


def _cuhk(tmp: Path) -> Path:
    _img(tmp / "imgs" / "cam_a" / "1.jpg")
    return _json(tmp / "reid_raw.json", [{"split": "train", "captions": ["a man"], "file_path": "cam_a/1.jpg",
                                          "processed_tokens": [["a", "man"]], "id": 1}])


def _icfg(tmp: Path) -> Path:
    _img(tmp / "imgs" / "test" / "1.jpg")
    return _json(tmp / "ICFG-PEDES.json", [{"split": "test", "captions": ["a man"], "file_path": "test/1.jpg", "id": 1}])


def _rstpreid(tmp: Path) -> Path:
    _img(tmp / "imgs" / "1.jpg")
    return _json(tmp / "data_captions.json", [{"id": 1, "img_path": "1.jpg", "captions": ["a man"], "split": "train"}])


def _aptm(tmp: Path) -> Path:
    _img(tmp / "images" / "1.jpg")
    return _json(tmp / "pool.json", [{"image": "1.jpg", "caption": "a man", "image_id": "p1", "label": [1]}])


def _csv(tmp: Path) -> Path:
    _img(tmp / "1.jpg")
    (tmp / "t.csv").write_text("image,caption\n1.jpg,a man\n", encoding="utf-8")
    return tmp / "t.csv"


def _jsonl(tmp: Path) -> Path:
    _img(tmp / "1.jpg")
    (tmp / "t.jsonl").write_text('{"image_path": "1.jpg", "caption": "a man"}\n', encoding="utf-8")
    return tmp / "t.jsonl"


def _parquet(tmp: Path) -> Path:
    _img(tmp / "1.jpg")
    pl.DataFrame({"image": ["1.jpg"], "text": ["a man"]}).write_parquet(tmp / "t.parquet")
    return tmp / "t.parquet"


def _image_folder(tmp: Path) -> Path:
    _img(tmp / "photos" / "1.jpg")
    (tmp / "photos" / "1.txt").write_text("a man\n", encoding="utf-8")
    return tmp / "photos"


def _captions_txt(tmp: Path) -> Path:
    (tmp / "bank.txt").write_text("a man\na woman\n", encoding="utf-8")
    return tmp / "bank.txt"


# One small file per registered format: a new format needs its row here (checked below).
SAMPLES: dict[str, Callable[[Path], Path]] = {
    "webdataset": _webdataset,
    "cuhk-pedes": _cuhk,
    "icfg-pedes": _icfg,
    "rstpreid": _rstpreid,
    "aptm": _aptm,
    "csv": _csv,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "image-folder": _image_folder,
    "captions-txt": _captions_txt,
}


def test_every_format_has_a_sample():
    assert list(SAMPLES) == list(FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_is_detected_and_read(tmp_path, name):
    path = SAMPLES[name](tmp_path)
    assert detect_format(path) == name
    detected, named = read_dataset(path), read_dataset(path, format=name)
    assert detected.equals(named)
    assert detected.height >= 1 and set(detected.get_column(STATUS)) == {STATUS_OK}
    source = name if name in ("cuhk-pedes", "icfg-pedes", "rstpreid", "aptm") else path.stem
    assert set(detected.get_column(SOURCE)) == {source}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_describes_itself(name):
    fmt = FORMATS[name]
    assert fmt.name == name
    assert fmt.description.strip() and "\n" not in fmt.description
    assert fmt.files.strip()
    assert fmt.path_kind in (FILE, DIRECTORY, FILE_OR_DIRECTORY)
    assert fmt.columns <= set(COLUMN_OPTIONS)


def test_info_help_lists_every_format():
    result = CliRunner().invoke(app, ["info", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    description = text.split("Formats:")[1]
    option = text.split("--format")[1]
    for name in FORMATS:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", description), name
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", option), name


def test_every_format_option_help_lists_every_format():
    commands = typer.main.get_command(app).commands
    # export-embeddings' --format is the layout it writes (clip-retrieval), not a dataset format.
    with_format = {name: p for name, cmd in commands.items() for p in cmd.params if "--format" in getattr(p, "opts", ()) and name != "export-embeddings"}
    assert {"info", "score", "eval", "search", "train"} <= set(with_format)
    for command, param in with_format.items():
        for name in FORMATS:
            assert name in param.help, (command, name)


def _readme_format_table() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Real datasets", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_readme_table_lists_every_format():
    rows = _readme_format_table()
    first_cells = {cell.strip() for row in rows[2:] for cell in row.strip("|").split("|")[:1]}
    assert first_cells == {f"`{name}`" for name in FORMATS}
