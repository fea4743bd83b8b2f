"""A tiny test world for the eval / inspect / search tests: rendered images and pair tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

from tbps import columns as C

COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 60, 200),
    "yellow": (230, 210, 40),
    "purple": (120, 40, 150),
    "grey": (120, 120, 120),
}


def person_image(path: Path, top: tuple[int, int, int], bottom: tuple[int, int, int], size=(32, 96)) -> Path:
    """A pedestrian-shaped picture: a head, a coat in ``top`` and trousers in ``bottom``."""
    w, h = size
    im = Image.new("RGB", size, (235, 235, 225))
    d = ImageDraw.Draw(im)
    d.ellipse([w * 0.3, 2, w * 0.7, h * 0.15], fill=(225, 190, 160))
    d.rectangle([w * 0.2, h * 0.16, w * 0.8, h * 0.55], fill=top)
    d.rectangle([w * 0.25, h * 0.56, w * 0.75, h * 0.95], fill=bottom)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90)
    return path


def make_world(root: Path, persons: int = 4, images_per_person: int = 2, captions_per_image: int = 2) -> Path:
    """Images under ``root/imgs`` and ``root/pairs.csv`` with a train and a test split.

    The first person's rows are the train split; the rest are test. Returns the CSV path.
    """
    names = list(COLOURS)
    rows = []
    for p in range(persons):
        top, bottom = names[p % len(names)], names[(p + 2) % len(names)]
        for i in range(images_per_person):
            rel = f"imgs/p{p}/{i}.jpg"
            person_image(root / rel, COLOURS[top], COLOURS[bottom])
            for c in range(captions_per_image):
                caption = f"a person in a {top} coat and {bottom} trousers" + (" walking" if c else "")
                rows.append({"image_path": rel, "caption": caption, "person_id": str(p), "split": "train" if p == 0 else "test"})
    path = root / "pairs.csv"
    pl.DataFrame(rows).write_csv(path)
    return path


def make_score_table(root: Path, n: int = 12) -> Path:
    """A score table directory ``root/scores/part-000000.parquet`` with real images (SCORE_SCHEMA)."""
    names = list(COLOURS)
    rows = []
    for k in range(n):
        top, bottom = names[k % len(names)], names[(k + 3) % len(names)]
        img = person_image(root / "imgs" / f"{k}.jpg", COLOURS[top], COLOURS[bottom])
        bad = k == n - 1  # the last row is a scoring failure: an undecodable file, null score, a status
        if bad:
            img.write_bytes(b"not an image")
        rows.append(
            {
                C.PAIR_ID: f"{k}:0",
                C.IMAGE_PATH: str(img),
                C.CAPTION: f"a person in a {top} coat and {bottom} trousers",
                C.PERSON_ID: str(k // 2),
                C.SOURCE: "alpha" if k % 3 else "beta",
                C.IMAGE_HASH: None if bad else f"{k:032x}",
                C.SCORE: None if bad else 0.05 + 0.03 * k,
                C.BANK_RANK: None if bad else 40 * (n - k),
                C.BANK_PERCENTILE: None if bad else 0.4 * (n - k),
                C.TRUNCATED: False,
                C.STATUS: C.STATUS_BAD_IMAGE if bad else C.STATUS_OK,
                C.ERROR: "cannot identify image file" if bad else None,
            }
        )
    table = pl.DataFrame(rows, schema=C.polars_schema(C.SCORE_SCHEMA))
    out = root / "scores"
    out.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out / "part-000000.parquet")
    return root
