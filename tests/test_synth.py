"""The synthetic pedestrian world (``tbps synth``): formats, determinism, splits, captions,
images, and a defect sidecar that matches what was injected.

Captions are checked with a small keyword parser written here, independent of the caption
grammar: it reads what a caption claims ("a navy jacket", "her shoes are white") and the
claims are compared with the identity the image shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tbps.columns import (
    DEFECT_BLANK,
    DEFECT_EXACT_DUP,
    DEFECT_GARBLED,
    DEFECT_KINDS,
    DEFECT_NEAR_DUP,
    DEFECT_NONE,
    DEFECT_OTHER_ID,
    DEFECT_SWAPPED,
    DEFECT_WRONG,
    TRUTH_SCHEMA,
)
from tbps.data import synth
from tbps.data.render import Scene, render_person, sample_scene, visible_attributes
from tbps.data.synth import SynthConfig, plan_world, synthesize
from tbps.data.world import (
    ACCESSORIES,
    BENCH_WORDS,
    COLOURS,
    GARMENT_COLOURS,
    HAIR_COLOURS,
    LOWER_GARMENTS,
    POOL_WORDS,
    UPPER_GARMENTS,
    Identity,
    aptm_label,
    describe,
    item_rng,
    sample_identity,
    tokens,
)
from tbps.errors import TbpsError, UsageError

TINY = dict(identities=12, images_per_id=2, pool_identities=30, pool_size=140, defect_rate=0.5)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny world shared by the read-only tests: (config, summary)."""
    config = SynthConfig(out=tmp_path_factory.mktemp("world") / "w", seed=3, workers=2, **TINY)
    return config, synthesize(config)


# ---------------------------------------------------------------------------------------------
# An independent reader of caption claims
# ---------------------------------------------------------------------------------------------


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_COLOUR_OF = {w: c.name for c in GARMENT_COLOURS for w in c.words}
_HAIR_OF = {w: c.name for c in HAIR_COLOURS for w in c.words}
_UPPER_OF = {w: g.name for g in UPPER_GARMENTS for w in g.words + g.woman_words}
_UPPER_OF.update({"top": None, "upper garment": None})  # colour only
_LOWER_OF = {w: g.name for g in LOWER_GARMENTS for w in g.words}
_ACC_OF = {
    "backpack": "backpack", "rucksack": "backpack", "school bag": "backpack",
    "handbag": "handbag", "shoulder bag": "handbag", "bag": "handbag",
    "hat": "hat", "cap": "hat", "baseball cap": "hat",
}
_C = _alt(_COLOUR_OF)
_GARMENT = re.compile(rf"\b(?:({_C}) )?({_alt(list(_UPPER_OF) + list(_LOWER_OF) + list(_ACC_OF))})\b")
_SHOES = re.compile(rf"\b(?:({_C}) (?:shoes|sneakers|trainers)|shoes are ({_C}))\b")
_GLASSES = re.compile(rf"\b(?:({_C})-framed glasses|pair of ({_C}) (?:glasses|eyeglasses|spectacles)|({_C}) (?:glasses|eyeglasses|spectacles)|glasses|eyeglasses|spectacles)\b")
_HAIR_LEN = {"short": "short", "shoulder-length": "medium", "medium-length": "medium", "long": "long"}
_HAIR = re.compile(rf"\b(?:({_alt(_HAIR_LEN)}) )?(?:({_alt(_HAIR_OF)}) )?hair\b|hair is ({_alt(_HAIR_LEN)}) and ({_alt(_HAIR_OF)})\b")
_MAN = re.compile(r"\b(man|guy|male|gentleman|he|his)\b")
_WOMAN = re.compile(r"\b(woman|lady|girl|female|she|her|blouse)\b")


def claims(caption: str) -> list[tuple[str, object]]:
    """What a caption claims, as (attribute, value) pairs; accessories as ("backpack", True)."""
    text = caption.lower()
    out: list[tuple[str, object]] = []
    if _MAN.search(text):
        out.append(("gender", "man"))
    if _WOMAN.search(text):
        out.append(("gender", "woman"))
    for m in _HAIR.finditer(text):
        length, colour = (m.group(1), m.group(2)) if m.group(3) is None else (m.group(3), m.group(4))
        if length:
            out.append(("hair_length", _HAIR_LEN[length]))
        if colour:
            out.append(("hair_colour", _HAIR_OF[colour]))
    for m in _SHOES.finditer(text):
        out.append(("shoe_colour", _COLOUR_OF[m.group(1) or m.group(2)]))
    for m in _GLASSES.finditer(text):
        out.append(("glasses", True))
        colour = m.group(1) or m.group(2) or m.group(3)
        if colour:
            out.append(("glasses_colour", _COLOUR_OF[colour]))
    for m in _GARMENT.finditer(text):
        colour, noun = m.group(1), m.group(2)
        if noun in _ACC_OF:
            acc = _ACC_OF[noun]
            out.append((acc, True))
            if colour:
                out.append((f"{acc}_colour", _COLOUR_OF[colour]))
        else:
            part = "upper" if noun in _UPPER_OF else "lower"
            kind = (_UPPER_OF if part == "upper" else _LOWER_OF)[noun]
            if kind is not None:
                out.append((part, kind))
            if colour:
                out.append((f"{part}_colour", _COLOUR_OF[colour]))
    return out


def wrong_claims(caption: str, identity: Identity) -> list[tuple[str, object]]:
    """The claims of ``caption`` that ``identity`` does not have."""
    attrs = identity.attributes()
    return [(k, v) for k, v in claims(caption) if attrs.get(k) != v]


# ---------------------------------------------------------------------------------------------
# Formats and layout
# ---------------------------------------------------------------------------------------------


def test_benchmark_is_cuhk_pedes_format_split_by_identity(world):
    config, summary = world
    records = json.loads(summary.benchmark.read_text())
    assert len(records) == config.identities * config.images_per_id
    for rec in records:
        assert list(rec) == ["split", "captions", "file_path", "processed_tokens", "id"]
        assert isinstance(rec["id"], int) and len(rec["captions"]) == 2
        assert rec["captions"][0] != rec["captions"][1]
        assert rec["processed_tokens"] == [tokens(c) for c in rec["captions"]]
        assert rec["file_path"].startswith(f"{rec['split']}/")
        assert (summary.out / "benchmark" / "imgs" / rec["file_path"]).is_file()
    ids = {split: {r["id"] for r in records if r["split"] == split} for split in ("train", "val", "test")}
    assert sorted(set().union(*ids.values())) == list(range(1, config.identities + 1))
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert [len(ids[s]) for s in ("train", "val", "test")] == list(config.split_counts()) == [8, 2, 2]
    assert {k: v["identities"] for k, v in summary.splits.items()} == {"train": 8, "val": 2, "test": 2}


def test_pool_is_aptm_format_without_ground_truth(world):
    config, summary = world
    records = json.loads(summary.pool.read_text())
    assert len(records) == config.pool_size
    for rec in records:
        assert list(rec) == ["image", "caption", "image_id", "label"]
        assert isinstance(rec["caption"], str) and isinstance(rec["image_id"], str)
        assert len(rec["label"]) == 27 and set(rec["label"]) <= {-1, 0, 1}
        assert (summary.out / "pool" / "images" / rec["image"]).is_file()
    assert len({r["image_id"] for r in records}) == len({r["image"] for r in records}) == len(records)
    text = summary.pool.read_text()
    assert not any(kind in text for kind in DEFECT_KINDS)
    world_json = json.loads(summary.world.read_text())
    assert world_json["config"]["seed"] == 3 and world_json["world"]["pool"]["defects"] == summary.defects


def test_readers_contract_pair_ids_and_counts(world):
    config, summary = world
    truth = pq.read_table(summary.truth)
    assert truth.schema.equals(TRUTH_SCHEMA)
    rows = truth.to_pylist()
    assert [r["pair_id"] for r in rows] == [f"{i}:0" for i in range(config.pool_size)]
    counts = {kind: sum(r["defect"] == kind for r in rows) for kind in (DEFECT_NONE, *DEFECT_KINDS)}
    assert counts == config.defect_counts() == summary.defects
    assert sum(v for k, v in counts.items() if k != DEFECT_NONE) == round(config.pool_size * config.defect_rate)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(world, tmp_path):
    config, summary = world
    again = synthesize(SynthConfig(out=tmp_path / "again", seed=3, workers=1, **TINY))
    first, second = _files(summary.out), _files(again.out)
    assert len(first) == config.identities * config.images_per_id + config.pool_size + 3
    assert first == second
    w1, w2 = (json.loads(p.read_text())["world"] for p in (summary.world, again.world))
    assert w1 == w2
    other = _files(synthesize(SynthConfig(out=tmp_path / "other", seed=4, workers=1, **TINY)).out)
    assert other.keys() == first.keys()
    for name in ("benchmark/reid_raw.json", "pool/pool.json", "benchmark/imgs/train/0001/0001_00.jpg"):
        assert other[name] != first[name]


def test_rerun_replaces_a_world_but_refuses_other_directories(tmp_path):
    config = SynthConfig(out=tmp_path / "w", workers=1, identities=6, images_per_id=1, pool_identities=4, pool_size=10)
    synthesize(config)
    (tmp_path / "w" / "pool" / "images" / "stale.jpg").write_bytes(b"x")
    synthesize(config)
    assert not (tmp_path / "w" / "pool" / "images" / "stale.jpg").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TbpsError, match="not empty"):
        synthesize(SynthConfig(out=tmp_path / "other", workers=1, identities=6, pool_size=0))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Captions and images
# ---------------------------------------------------------------------------------------------


def test_caption_word_counts_and_claims_match_the_benchmark_identity(world):
    config, summary = world
    plan = plan_world(config)
    for rec in json.loads(summary.benchmark.read_text()):
        identity = plan.bench_ids[rec["id"] - 1]
        for caption in rec["captions"]:
            assert BENCH_WORDS[0] <= len(caption.split()) <= BENCH_WORDS[1], caption
            assert claims(caption), caption
            assert wrong_claims(caption, identity) == [], caption


def test_images_have_the_configured_size_and_aspect(world, tmp_path):
    config, summary = world
    for path in list((summary.out / "benchmark" / "imgs").rglob("*.jpg"))[:5] + list((summary.out / "pool" / "images").rglob("*.jpg"))[:5]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 96)
    wide = SynthConfig(out=tmp_path / "w", workers=1, identities=3, split="1:1:1", images_per_id=1, pool_size=2, pool_identities=2, image_size="60x20")
    synthesize(wide)
    for path in (tmp_path / "w").rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.size == (20, 60)


def test_visibility_backpack_from_the_back_glasses_from_the_front_shoes_behind_occluder():
    ident = Identity("woman", "average", 1, "long", "black", "jacket", "red", "jeans", "blue", "white", "green", "pink", None, "black", 7)
    base = sample_scene(item_rng(0, "t", 0), occlusion=0.0)
    front = visible_attributes(ident, Scene(**{**base.__dict__, "view": "front", "dx": 0.0}), (96, 32))
    back = visible_attributes(ident, Scene(**{**base.__dict__, "view": "back", "dx": 0.0}), (96, 32))
    assert "backpack" not in front and front["glasses_colour"] == "black" and front["handbag_colour"] == "pink"
    assert back["backpack_colour"] == "green" and "glasses" not in back and back["view"] == "back"
    low = Scene(**{**base.__dict__, "occluder": ("low", 0.15, 0.0, (50, 50, 50))})
    assert "shoe_colour" in visible_attributes(ident, base, (96, 32))
    assert "shoe_colour" not in visible_attributes(ident, low, (96, 32))
    img = np.asarray(render_person(ident, low, (96, 32)))
    assert img.shape == (96, 32, 3) and img.std() > 10


def test_describe_mentions_what_is_required_and_only_what_is_visible():
    for n in range(60):
        ident = sample_identity(item_rng(5, "identity", n))
        visible = visible_attributes(ident, sample_scene(item_rng(5, "scene", n)), (96, 32))
        for style, (lo, hi) in (("cuhk", BENCH_WORDS), ("coarse", POOL_WORDS)):
            need = ("upper_colour", "shoe_colour") if "shoe_colour" in visible else ("upper_colour",)
            cap = describe(visible, item_rng(5, style, n), style, require=need)
            assert lo <= len(cap.text.split()) <= hi, cap.text
            assert set(need) <= cap.mentioned.keys()
            assert all(visible[k] == v for k, v in cap.mentioned.items())
            assert wrong_claims(cap.text, ident) == [], cap.text


def test_aptm_label_reads_the_caption_claims():
    label = aptm_label({"gender": "woman", "upper": "t-shirt", "upper_colour": "navy", "lower": "skirt", "backpack": True})
    assert len(label) == 27 and label[1] == -1
    assert label[0] == 0 and label[4] == 0 and label[6] == 0 and label[3] == -1
    assert label[7] == 1 and label[8] == 1 and label[9] == 0
    assert label[10:18] == [1, 1, 1, 1, 1, 0, 1, 1]  # navy counts as blue
    assert label[18:] == [-1] * 9
    assert aptm_label({}) == [-1] * 27


# ---------------------------------------------------------------------------------------------
# The defect sidecar matches what was injected
# ---------------------------------------------------------------------------------------------


def test_truth_sidecar_matches_the_injected_defects(world):
    config, summary = world
    plan = plan_world(config)
    records = json.loads(summary.pool.read_text())
    truth = pq.read_table(summary.truth).to_pylist()
    images = summary.out / "pool" / "images"
    seen = set()
    for i, (rec, row) in enumerate(zip(records, truth)):
        kind, detail, dup = row["defect"], row["detail"], row["duplicate_of"]
        seen.add(kind)
        identity = plan.pool_ids[plan.pool_pid[i]]
        caption = rec["caption"]
        assert POOL_WORDS[0] <= len(caption.split()) <= POOL_WORDS[1], caption
        pixels = np.asarray(Image.open(images / rec["image"]), dtype=np.float32)
        # Mean difference between horizontal neighbours: small for drawn scenes, large for noise.
        grain = np.abs(np.diff(pixels, axis=1)).mean()
        assert (dup is not None) == (kind in (DEFECT_EXACT_DUP, DEFECT_NEAR_DUP))
        if kind in (DEFECT_NONE, DEFECT_BLANK, DEFECT_GARBLED, DEFECT_EXACT_DUP, DEFECT_NEAR_DUP):
            # The caption itself is true to the person (the image may be broken or a copy).
            assert wrong_claims(caption, identity) == [], (kind, caption)
        if kind == DEFECT_NONE:
            assert detail is None and pixels.std() > 12 and grain < 30
        elif kind == DEFECT_BLANK:
            assert pixels.std(axis=(0, 1)).max() < 1.0, detail
        elif kind == DEFECT_GARBLED:
            assert pixels.std() > 45 and grain > 40, detail
        elif kind == DEFECT_EXACT_DUP:
            j = int(dup.split(":")[0])
            assert truth[j]["defect"] == DEFECT_NONE
            assert (images / rec["image"]).read_bytes() == (images / records[j]["image"]).read_bytes()
            assert caption == records[j]["caption"] and rec["image"] != records[j]["image"]
        elif kind == DEFECT_NEAR_DUP:
            j = int(dup.split(":")[0])
            other = np.asarray(Image.open(images / records[j]["image"]), dtype=np.float32)
            assert caption != records[j]["caption"] and plan.pool_pid[j] == plan.pool_pid[i]
            assert (images / rec["image"]).read_bytes() != (images / records[j]["image"]).read_bytes()
            # A near copy is closer to its original than to an unrelated pool image.
            unrelated = np.asarray(Image.open(images / records[(j + 1) % len(records)]["image"]), dtype=np.float32)
            assert np.abs(pixels - other).mean() < np.abs(unrelated - other).mean()
        elif kind == DEFECT_SWAPPED:
            m = re.fullmatch(r"(\w+) colour: (.+) <-> (\w+) colour: (.+)", detail)
            a, va, b, vb = m.groups()
            attrs = identity.attributes()
            assert attrs[f"{a}_colour"] == va and attrs[f"{b}_colour"] == vb and va != vb
            said = dict(claims(caption))
            assert said.get(f"{a}_colour") == vb and said.get(f"{b}_colour") == va, (detail, caption)
        elif kind == DEFECT_WRONG:
            m = re.fullmatch(r"(.+): (.+)->(.+)", detail)
            key, old, new = m.group(1).replace(" ", "_"), m.group(2), m.group(3)
            assert identity.attributes()[key] == old and old != new
            assert (key, new) in claims(caption), (detail, caption)
            assert (key, new) in wrong_claims(caption, identity)
        elif kind == DEFECT_OTHER_ID:
            m = re.fullmatch(r"caption of pool identity (\d+) \(shown: pool identity (\d+)\)", detail)
            other, shown = int(m.group(1)), int(m.group(2))
            assert shown == plan.pool_pid[i] and other != shown
            assert wrong_claims(caption, plan.pool_ids[other]) == [], caption
            assert wrong_claims(caption, identity), (detail, caption)
    assert seen == {DEFECT_NONE, *DEFECT_KINDS}


def test_pool_and_benchmark_identities_are_distinct(world):
    config, _ = world
    plan = plan_world(config)
    keys = [i.key() for i in plan.bench_ids + plan.pool_ids]
    assert len(keys) == len(set(keys)) == config.identities + config.pool_identities
    assert sorted(set(plan.pool_pid)) == list(range(config.pool_identities))


# ---------------------------------------------------------------------------------------------
# Configuration and CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", "96x33"),
        ("image_size", "big"),
        ("image_size", "12x4"),
        ("identities", -1),
        ("images_per_id", 0),
        ("pool_size", -5),
        ("defect_rate", 1.5),
        ("defect_rate", -0.1),
        ("defect_mix", "bogus-kind=1"),
        ("defect_mix", "blank-image=-1"),
        ("defect_mix", "blank-image"),
        ("split", "1:1"),
        ("split", "0:1:1"),
        ("colours", 1),
        ("occlusion", 2.0),
        ("workers", 0),
        ("identities", 2),  # 4:1:1 of 2 identities leaves no val/test identity
    ],
)
def test_bad_values_are_usage_errors_naming_the_field(field, value, tmp_path):
    with pytest.raises(UsageError) as info:
        SynthConfig(out=tmp_path, **{field: value})
    assert info.value.field == field


def test_config_parses_and_counts(tmp_path):
    config = SynthConfig(out=tmp_path, identities=10, split="3/1/1", pool_size=100, defect_rate=0.3, defect_mix="blank-image=1,exact-duplicate=2", image_size="48x16")
    assert config.image_size == (48, 16) and config.split_counts() == (6, 2, 2)
    assert config.defect_counts() == {DEFECT_NONE: 70, DEFECT_SWAPPED: 0, DEFECT_WRONG: 0, DEFECT_OTHER_ID: 0, DEFECT_BLANK: 10, DEFECT_GARBLED: 0, DEFECT_EXACT_DUP: 20, DEFECT_NEAR_DUP: 0}
    with pytest.raises(UsageError, match="no original"):
        SynthConfig(out=tmp_path, pool_size=10, defect_rate=1.0, defect_mix="exact-duplicate=1")
    assert synth.PALETTE_SIZE == len(GARMENT_COLOURS)
    assert {c.name for c in GARMENT_COLOURS} == set(COLOURS) and len(ACCESSORIES) == 4


def test_cli_synth_writes_a_world_and_bad_options_exit_2(tmp_path, cli):
    args = ["synth", "--out", tmp_path / "w", "--seed", "1", "--identities", "6", "--images-per-id", "1",
            "--pool-identities", "5", "--pool-size", "20", "--workers", "1", "--quiet"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "near-duplicate" in result.output and "train" in result.output
    assert (tmp_path / "w" / "pool" / "truth.parquet").is_file()
    bad = cli("synth", "--out", tmp_path / "x", "--image-size", "96x40")
    assert bad.exit_code == 2, bad.output
    assert "--image-size" in bad.output
    assert not (tmp_path / "x").exists()


def test_a_world_killed_while_rendering_leaves_the_old_one_and_the_next_run_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "w"
    synthesize(SynthConfig(out=out, seed=3, workers=1, **TINY))
    before = _files(out)
    cmd = [sys.executable, "-m", "tbps", "synth", "--out", str(out), "--seed", "4", "--identities", "60", "--pool-size", "3000",
           "--pool-identities", "100", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tbps-tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the rendering
    assert proc.poll() is None, "the kill must land while the new world renders"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _files(out) == before  # the old world, whole
    again = synthesize(SynthConfig(out=out, seed=3, workers=1, **TINY))
    assert _files(again.out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["w"]
