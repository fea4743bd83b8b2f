"""open_image: every bad-file kind gets a status (never an exception); colour modes become RGB."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps.columns import (
    STATUS_BAD_IMAGE,
    STATUS_DECOMPRESSION_BOMB,
    STATUS_EMPTY_FILE,
    STATUS_MISSING_IMAGE,
    STATUS_OK,
    STATUS_PATH_OUTSIDE_ROOT,
)
from tbps.data import images
from tbps.data.images import open_image
from tbps.data.paths import ImageResolver
from tbps.files import content_hash as hash_bytes


def _noise(mode: str = "RGB", size=(32, 96), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


# Each case writes one file into tmp_path and names the status open_image must report.
def _valid_jpeg(d):
    return _save(_noise(), d / "ok.jpg", "JPEG", quality=90)


def _valid_png(d):
    return _save(_noise(), d / "ok.png", "PNG")


def _missing(d):
    return d / "nope.jpg"


def _zero_byte(d):
    (d / "zero.jpg").write_bytes(b"")
    return d / "zero.jpg"


def _truncated_jpeg(d):
    buf = io.BytesIO()
    _noise(size=(64, 192)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    return d / "cut.jpg"


def _text_file(d):
    (d / "notes.jpg").write_text("this is not an image\n", encoding="utf-8")
    return d / "notes.jpg"


def _directory(d):
    (d / "folder.jpg").mkdir()
    return d / "folder.jpg"


def _cmyk_jpeg(d):
    return _save(Image.new("CMYK", (16, 48), (0, 255, 255, 0)), d / "cmyk.jpg", "JPEG")


def _rgba_png(d):
    return _save(_noise("RGBA"), d / "rgba.png", "PNG")


def _la_png(d):
    return _save(Image.new("LA", (16, 48), (90, 128)), d / "la.png", "PNG")


def _palette_png(d):
    return _save(_noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), d / "p.png", "PNG")


def _grey16_png(d):
    arr = (np.arange(16 * 48, dtype=np.uint32).reshape(48, 16) * 85).astype(np.uint16)
    return _save(Image.fromarray(arr), d / "grey16.png", "PNG")


def _grey_png(d):
    return _save(_noise("L"), d / "grey.png", "PNG")


def _bilevel_png(d):
    return _save(_noise("L").convert("1"), d / "one.png", "PNG")


@pytest.mark.parametrize(
    "make, status",
    [
        (_valid_jpeg, STATUS_OK),
        (_valid_png, STATUS_OK),
        (_missing, STATUS_MISSING_IMAGE),
        (_zero_byte, STATUS_EMPTY_FILE),
        (_truncated_jpeg, STATUS_BAD_IMAGE),
        (_text_file, STATUS_BAD_IMAGE),
        (_directory, STATUS_BAD_IMAGE),
        (_cmyk_jpeg, STATUS_OK),
        (_rgba_png, STATUS_OK),
        (_la_png, STATUS_OK),
        (_palette_png, STATUS_OK),
        (_grey16_png, STATUS_OK),
        (_grey_png, STATUS_OK),
        (_bilevel_png, STATUS_OK),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else v,
)
def test_open_image_status_table(tmp_path, make, status):
    path = make(tmp_path)
    res = open_image(str(path))
    assert res.status == status, res.error
    if status == STATUS_OK:
        assert res.error is None
        assert res.image is not None and res.image.mode == "RGB"
        assert res.image.size == Image.open(path).size
        assert res.image_hash == hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    else:
        assert res.image is None
        assert res.error and str(path) in res.error
    if status in (STATUS_MISSING_IMAGE,) or path.is_dir():
        assert res.image_hash is None
    elif status != STATUS_OK:
        assert res.image_hash == hash_bytes(path.read_bytes())


def test_truncated_jpeg_is_caught_by_the_full_decode(tmp_path):
    path = _truncated_jpeg(tmp_path)
    Image.open(path)  # the header alone opens fine: only a full decode sees the truncation
    res = open_image(str(path))
    assert res.status == STATUS_BAD_IMAGE and "truncated" in res.error


def test_rgba_transparency_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 12), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    res = open_image(str(_save(im, tmp_path / "t.png", "PNG")))
    assert res.image.getpixel((0, 0)) == (255, 255, 255)
    assert res.image.getpixel((1, 0)) == (127, 127, 127)
    assert res.image.getpixel((2, 0)) == (255, 0, 0)


def test_palette_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (4, 12), 1)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    _save(im, tmp_path / "pt.png", "PNG", transparency=0)
    assert Image.open(tmp_path / "pt.png").mode == "P"
    res = open_image(str(tmp_path / "pt.png"))
    assert res.image.getpixel((0, 0)) == (255, 255, 255)  # the transparent index
    assert res.image.getpixel((1, 0)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535, 257]], dtype=np.uint16).repeat(3, axis=0)
    _save(Image.fromarray(arr), tmp_path / "g16.png", "PNG")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    res = open_image(str(tmp_path / "g16.png"))
    assert [res.image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]


def test_cmyk_becomes_rgb_colours(tmp_path):
    res = open_image(str(_cmyk_jpeg(tmp_path)))
    r, g, b = res.image.getpixel((8, 24))
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 K=0 is red


def test_decompression_bomb_above_the_given_limit(tmp_path):
    path = _save(Image.new("L", (100, 100), 7), tmp_path / "big.png", "PNG")
    before = Image.MAX_IMAGE_PIXELS
    bomb = open_image(str(path), max_pixels=9_999)
    assert bomb.status == STATUS_DECOMPRESSION_BOMB and "10000 pixels" in bomb.error
    assert bomb.image is None and bomb.image_hash == hash_bytes(path.read_bytes())
    assert open_image(str(path), max_pixels=10_000).status == STATUS_OK  # the limit itself is allowed
    assert Image.MAX_IMAGE_PIXELS == before  # the global is never changed


def test_decompression_bomb_uses_pillows_limit_by_default(tmp_path, monkeypatch):
    path = _save(Image.new("L", (100, 100), 7), tmp_path / "big.png", "PNG")
    filters_before = list(warnings.filters)
    # Between Pillow's limit and twice it Pillow only warns; open_image refuses all the same.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)
    assert open_image(str(path)).status == STATUS_DECOMPRESSION_BOMB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # above twice: Pillow raises
    assert open_image(str(path)).status == STATUS_DECOMPRESSION_BOMB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert open_image(str(path)).status == STATUS_OK
    assert list(warnings.filters) == filters_before  # warnings-as-errors stayed inside the call


def test_identical_bytes_share_a_hash_and_different_bytes_do_not(tmp_path):
    a = _save(_noise(seed=1), tmp_path / "a.png", "PNG")
    b = tmp_path / "sub" / "b.png"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    c = _save(_noise(seed=2), tmp_path / "c.png", "PNG")
    ha, hb, hc = (open_image(str(p)).image_hash for p in (a, b, c))
    assert ha == hb != hc and len(ha) == 32


def test_none_path_and_bad_limit(tmp_path):
    assert open_image(None).status == STATUS_MISSING_IMAGE
    with pytest.raises(ValueError, match="max_pixels"):
        open_image(str(tmp_path / "x.png"), max_pixels=0)


def test_a_fifo_a_device_a_huge_file_and_a_nul_byte_are_statuses_not_hangs(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    res = open_image(str(fifo))
    assert res.image is None and res.status == "bad-image" and "not a regular file" in res.error
    res = open_image("/dev/zero")
    assert res.image is None and res.status == "bad-image" and "not a regular file" in res.error
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(images.MAX_IMAGE_BYTES + 1)  # sparse: no disk, nothing read
    res = open_image(str(big))
    assert res.image is None and res.status == "bad-image" and "above the" in res.error
    res = open_image(str(tmp_path / "a\x00b.jpg"))
    assert res.image is None and res.status == "bad-image"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 100, 255, 17], [0, 100, 255, 17]),  # 16-bit storage of 8-bit values: kept, not divided by 257 into black
        ([0, 4095, 2048, 16], [0, 255, 128, 1]),  # 12-bit values: divided by 4095 / 255
        ([0, 65535, 32896, 257], [0, 255, 128, 1]),  # the full 16-bit range: divided by 257
    ],
)
def test_sixteen_bit_grey_is_scaled_by_the_range_it_uses(tmp_path, values, expected):
    arr = np.array([values], dtype=np.uint16).repeat(3, axis=0)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png", "PNG")
    assert Image.open(path).mode.startswith("I")  # Pillow reads it as a wide greyscale image
    res = open_image(str(path))
    assert res.status == STATUS_OK and [res.image.getpixel((x, 0))[0] for x in range(4)] == expected


def test_a_float_image_in_zero_to_one_is_not_black(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32).repeat(2, axis=0)
    path = _save(Image.fromarray(arr, mode="F"), tmp_path / "f.tiff", "TIFF")
    assert [open_image(str(path)).image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_a_symlink_or_a_symlinked_directory_met_when_opening_is_refused_and_not_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    secret = _save(_noise(seed=5), outside / "secret.png", "PNG")
    _save(_noise(), root / "d" / "a.png", "PNG")
    resolver = ImageResolver(root)
    checked, status, _ = resolver.resolve("d/a.png")  # the dataset is read: the file is inside the root
    assert status == STATUS_OK and open_image(checked).ok
    (root / "d" / "a.png").unlink()  # ... and swapped for a link out of the root before it is opened
    (root / "d" / "a.png").symlink_to(secret)
    res = open_image(checked)
    assert res.status == STATUS_PATH_OUTSIDE_ROOT and "symlink" in res.error and res.image_hash is None
    # A directory on the path swapped for a link: the file is opened, found to be elsewhere, and never read.
    (root / "d").rename(root / "d-old")
    (root / "d").symlink_to(outside, target_is_directory=True)
    (outside / "a.png").write_bytes(secret.read_bytes())
    res = open_image(checked)
    assert res.status == STATUS_PATH_OUTSIDE_ROOT and str(outside) in res.error and res.image_hash is None
    # With a root, a symlink-free path outside it is refused too; inside, it opens.
    assert open_image(str(secret), root=str(root)).status == STATUS_PATH_OUTSIDE_ROOT
    assert open_image(str(_save(_noise(), root / "b.png", "PNG")), root=str(root)).ok


def test_a_pseudo_file_that_reports_no_size_is_not_read_as_an_image():
    res = open_image(f"/proc/{os.getpid()}/environ")  # a regular file of size 0 that yields the environment
    assert res.image is None and res.status == STATUS_BAD_IMAGE and "pseudo-file" in res.error
    assert open_image("/proc/self/environ").status == STATUS_PATH_OUTSIDE_ROOT  # /proc/self is a symlink
