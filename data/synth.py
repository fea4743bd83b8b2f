"""``tbps synth``: write the synthetic pedestrian world.

Layout of ``OUT`` (fixed; the readers and the demo depend on it)::

    OUT/world.json                    config, counts, attribute vocabulary, provenance
    OUT/benchmark/reid_raw.json       CUHK-PEDES format: split, captions, file_path,
                                      processed_tokens, id (person ids start at 1)
    OUT/benchmark/imgs/<split>/<pid>/<pid>_<k>.jpg
    OUT/pool/pool.json                APTM/MALS training format: image, caption, image_id,
                                      label (27 APTM attribute labels read off the caption)
    OUT/pool/images/g<shard>/<index>.jpg
    OUT/pool/truth.parquet            defect ground truth, ``columns.TRUTH_SCHEMA``

Pair ids (shared with the readers): pool record ``i`` is ``"i:0"``; caption ``j`` of benchmark
record ``i`` is ``"i:j"``. The ground truth never enters ``pool.json``.

Every item (benchmark image, pool pair) is built from its own random streams keyed by
``(seed, stream, index)``, so the output is byte-identical for a seed whatever the number of
worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from tbps.columns import (
    DEFECT,
    DEFECT_BLANK,
    DEFECT_EXACT_DUP,
    DEFECT_GARBLED,
    DEFECT_KINDS,
    DEFECT_NEAR_DUP,
    DEFECT_NONE,
    DEFECT_OTHER_ID,
    DEFECT_SWAPPED,
    DEFECT_WRONG,
    DETAIL,
    DUPLICATE_OF,
    PAIR_ID,
    TRUTH_SCHEMA,
)
from tbps.data.render import (
    encode_jpeg,
    jitter_scene,
    render_blank,
    render_garbled,
    render_person,
    sample_scene,
    visible_attributes,
)
from tbps.data.world import (
    ATTRIBUTES,
    GARMENT_COLOURS,
    GLASSES_COLOURS,
    HAIR_COLOURS,
    HAIR_LENGTHS,
    LOWER,
    NEAR_COLOURS,
    UPPER,
    aptm_label,
    attribute_label,
    describe,
    item_rng,
    item_seed,
    sample_identity,
    tokens,
    vocabulary,
)
from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_dir, sweep_temps, write_json, write_text
from tbps.provenance import record

SPLITS = ("train", "val", "test")
DUPLICATE_KINDS = (DEFECT_EXACT_DUP, DEFECT_NEAR_DUP)
# The default share of each defect kind among the defective pool pairs.
DEFAULT_DEFECT_MIX = {
    DEFECT_SWAPPED: 0.2,
    DEFECT_WRONG: 0.25,
    DEFECT_OTHER_ID: 0.15,
    DEFECT_BLANK: 0.05,
    DEFECT_GARBLED: 0.05,
    DEFECT_EXACT_DUP: 0.15,
    DEFECT_NEAR_DUP: 0.15,
}
PALETTE_SIZE = len(GARMENT_COLOURS)


def _apportion(total: int, weights: Iterable[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder)."""
    weights = list(weights)
    s = sum(weights)
    if s <= 0:
        return [0] * len(weights)
    exact = [total * w / s for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _parse_split(value: object) -> tuple[float, float, float]:
    if isinstance(value, str):
        parts = value.replace("/", ":").split(":")
    else:
        parts = list(value)  # type: ignore[call-overload]
    try:
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError("--split must be three numbers TRAIN:VAL:TEST, e.g. 4:1:1", field="split", value=value) from None
    if len(ratios) != 3 or any(r < 0 or not math.isfinite(r) for r in ratios) or ratios[0] <= 0:
        raise UsageError(
            "--split must be three non-negative numbers TRAIN:VAL:TEST with TRAIN > 0, e.g. 4:1:1",
            field="split",
            value=value,
        )
    return ratios  # type: ignore[return-value]


def _parse_mix(value: object) -> dict[str, float]:
    if isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            kind, sep, weight = part.partition("=")
            if not sep:
                raise UsageError("--defect-mix must be KIND=WEIGHT,...", field="defect_mix", value=value)
            items.append((kind.strip(), weight.strip()))
    else:
        items = list(dict(value).items())  # type: ignore[call-overload]
    mix = {}
    for kind, weight in items:
        if kind not in DEFECT_KINDS:
            raise UsageError(f"--defect-mix: unknown defect kind; expected one of {', '.join(DEFECT_KINDS)}", field="defect_mix", value=kind)
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise UsageError(f"--defect-mix: the weight of {kind} is not a number", field="defect_mix", value=weight) from None
        if w < 0 or not math.isfinite(w):
            raise UsageError(f"--defect-mix: the weight of {kind} must be >= 0", field="defect_mix", value=weight)
        mix[kind] = w
    return {k: mix.get(k, 0.0) for k in DEFECT_KINDS}


def _parse_size(value: object) -> tuple[int, int]:
    try:
        if isinstance(value, str):
            h, w = (int(p) for p in value.lower().split("x"))
        else:
            h, w = (int(p) for p in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UsageError("--image-size must be HEIGHTxWIDTH, e.g. 96x32", field="image_size", value=value) from None
    if w < 8 or w > 512 or h != 3 * w:
        raise UsageError(
            "--image-size must be HEIGHTxWIDTH with height = 3 x width and 8 <= width <= 512, e.g. 96x32",
            field="image_size",
            value=value,
        )
    return h, w


@dataclass
class SynthConfig:
    """Everything ``tbps synth`` needs; field names are the CLI option names.

    Args:
        out: directory the world is written to (created; a previous world there is replaced,
            any other non-empty directory is refused).
        seed: the world seed: same seed, same bytes.
        identities: benchmark identities (person ids 1..identities).
        split: train:val:test ratio of benchmark identities, e.g. "4:1:1"; val/test
            identities never appear in train.
        images_per_id: benchmark images per identity (two captions each).
        pool_identities: identities of the synthetic pool, disjoint from the benchmark's.
        pool_size: image-caption pairs in the pool.
        defect_rate: share of pool pairs that are defective, in [0, 1].
        defect_mix: relative share of each defect kind, "kind=weight,..." or a dict; kinds
            left out get 0.
        image_size: "HEIGHTxWIDTH" or (height, width); height must be 3 x width.
        colours: garment palette size (2..17); fewer colours = fewer near colours = easier.
        occlusion: probability that an object stands in front of the person.
        lighting: half-range of the per-image brightness change (0..0.9).
        clutter: most background objects per image.
        workers: rendering processes (1 = in this process).
    """

    out: Path
    seed: int = 0
    identities: int = 600
    split: str | tuple[float, float, float] = "4:1:1"
    images_per_id: int = 4
    pool_identities: int = 5000
    pool_size: int = 20000
    defect_rate: float = 0.4
    defect_mix: str | Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_DEFECT_MIX))
    image_size: str | tuple[int, int] = "96x32"
    colours: int = PALETTE_SIZE
    occlusion: float = 0.25
    lighting: float = 0.3
    clutter: int = 3
    workers: int = 2

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name, lo in (("seed", 0), ("identities", 1), ("images_per_id", 1), ("pool_size", 0), ("pool_identities", 1), ("clutter", 0), ("workers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {lo}", field=name, value=value)
        if not 2 <= self.colours <= PALETTE_SIZE:
            raise UsageError(f"--colours must be between 2 and {PALETTE_SIZE}", field="colours", value=self.colours)
        for name, hi in (("defect_rate", 1.0), ("occlusion", 1.0), ("lighting", 0.9)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= hi:
                raise UsageError(f"--{name.replace('_', '-')} must be a number in [0, {hi}]", field=name, value=value)
        self.split = _parse_split(self.split)
        self.defect_mix = _parse_mix(self.defect_mix)
        self.image_size = _parse_size(self.image_size)
        counts = self.split_counts()
        for name, ratio, n in zip(SPLITS, self.split, counts):
            if ratio > 0 and n == 0:
                raise UsageError(
                    f"--identities {self.identities} leaves no {name} identity with --split "
                    f"{':'.join(f'{r:g}' for r in self.split)}; use more identities",
                    field="identities",
                    value=self.identities,
                )
        defects = self.defect_counts()
        if self.defect_rate > 0 and self.pool_size > 0 and sum(self.defect_mix.values()) == 0:
            raise UsageError("--defect-mix gives every kind weight 0 but --defect-rate is > 0", field="defect_mix", value=self.defect_mix)
        originals = self.pool_size - sum(defects[k] for k in DUPLICATE_KINDS)
        if originals == 0 and any(defects[k] for k in DUPLICATE_KINDS):
            raise UsageError(
                "--defect-rate 1 with only duplicate kinds in --defect-mix leaves no original pair to duplicate",
                field="defect_mix",
                value=self.defect_mix,
            )
        if defects[DEFECT_OTHER_ID] and self.pool_identities < 2:
            raise UsageError(
                "other-identity defects in --defect-mix need --pool-identities >= 2",
                field="pool_identities",
                value=self.pool_identities,
            )

    @property
    def height(self) -> int:
        return self.image_size[0]  # type: ignore[index]

    @property
    def width(self) -> int:
        return self.image_size[1]  # type: ignore[index]

    def split_counts(self) -> tuple[int, int, int]:
        """Benchmark identities per split (train, val, test)."""
        return tuple(_apportion(self.identities, self.split))  # type: ignore[return-value,arg-type]

    def defect_counts(self) -> dict[str, int]:
        """Pool pairs per defect kind (``DEFECT_NONE`` included); they sum to ``pool_size``."""
        defective = round(self.pool_size * self.defect_rate)
        mix = self.defect_mix
        counts = dict(zip(DEFECT_KINDS, _apportion(defective, [mix[k] for k in DEFECT_KINDS])))  # type: ignore[index]
        return {DEFECT_NONE: self.pool_size - sum(counts.values()), **counts}


@dataclass
class SynthSummary:
    """What :func:`synthesize` wrote.

    Args:
        out: the world directory.
        benchmark: path of ``reid_raw.json``.
        pool: path of ``pool.json``.
        truth: path of ``truth.parquet``.
        world: path of ``world.json``.
        splits: per split: identities, images and captions.
        pool_pairs: pairs in the pool.
        pool_identities: identities in the pool.
        defects: pool pairs per defect kind, ``none`` included.
        seconds: wall time of the run.
        cpu_seconds: CPU time of the run, this process and its workers together.
    """

    out: Path
    benchmark: Path
    pool: Path
    truth: Path
    world: Path
    splits: dict[str, dict[str, int]]
    pool_pairs: int
    pool_identities: int
    defects: dict[str, int]
    seconds: float
    cpu_seconds: float

    def rows(self) -> list[tuple[str, str, str]]:
        """(section, item, count) rows for a summary table."""
        rows = []
        for split, counts in self.splits.items():
            rows.append(("benchmark", split, f"{counts['identities']} ids, {counts['images']} images, {counts['captions']} captions"))
        rows.append(("pool", "pairs", f"{self.pool_pairs} ({self.pool_identities} ids)"))
        for kind, n in self.defects.items():
            rows.append(("pool", kind, str(n)))
        rows.append(("time", "seconds", f"{self.seconds:.1f} wall, {self.cpu_seconds:.1f} CPU"))
        return rows


# ---------------------------------------------------------------------------------------------
# The plan every worker shares
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldPlan:
    """What the main process decides before any image is drawn (cheap, serial).

    Everything else about an item (its scene, captions, defect details) follows from the plan
    and the item's own random streams. Tools and tests use it to look up the truth behind a
    record: benchmark record of person ``pid`` shows ``bench_ids[pid - 1]``; pool pair ``i``
    shows ``pool_ids[pool_pid[i]]`` and carries defect ``pool_kind[i]``.
    """

    seed: int
    size: tuple[int, int]
    colours: int
    occlusion: float
    lighting: float
    clutter: int
    bench_root: str
    pool_root: str
    bench_ids: list  # Identity per person id - 1
    bench_split: list[str]
    images_per_id: int
    pid_width: int
    pool_ids: list  # Identity per pool identity index
    pool_pid: list[int]  # pool identity of each pool pair
    pool_kind: list[str]  # defect kind of each pool pair
    pool_original: dict[int, int]  # duplicate pair -> its original pair


def _bench_path(plan: WorldPlan, b: int) -> tuple[int, str]:
    pid = b // plan.images_per_id + 1
    k = b % plan.images_per_id
    p = f"{pid:0{plan.pid_width}d}"
    return pid, f"{plan.bench_split[pid - 1]}/{p}/{p}_{k:02d}.jpg"


def _pool_path(i: int) -> tuple[str, str]:
    shard = f"g{i // 1000:03d}"
    return f"{shard}/{i:06d}.jpg", f"{shard}_{i:06d}"


def plan_world(config: SynthConfig) -> WorldPlan:
    """The identities, splits and pool defect assignment of the world ``config`` describes.

    Args:
        config: the world's configuration.

    Returns:
        A :class:`WorldPlan`; the same config always gives the same plan.
    """
    seed = config.seed
    # Identities: benchmark first, then pool; every categorical attribute set is unique
    # across both, so a caption that fits one identity exactly fits no other.
    seen: set[tuple] = set()
    identities = []
    total = config.identities + config.pool_identities
    for n in range(total):
        rng = item_rng(seed, "identity", n)
        for _attempt in range(200):
            ident = sample_identity(rng, config.colours)
            if ident.key() not in seen:
                break
        else:
            raise TbpsError(
                f"could not draw {total} distinct identities from {config.colours} colours",
                field="identities",
                value=total,
                hint="Use fewer --identities / --pool-identities or more --colours",
            )
        seen.add(ident.key())
        identities.append(ident)
    bench_ids, pool_ids = identities[: config.identities], identities[config.identities :]
    bench_split = [name for name, n in zip(SPLITS, config.split_counts()) for _ in range(n)]

    # Pool: which identity each pair shows and which defect it carries.
    rng = random.Random(item_seed(seed, "pool-plan", 0))
    n = config.pool_size
    kinds = [kind for kind, count in config.defect_counts().items() for _ in range(count)]
    rng.shuffle(kinds)
    pids = [i % config.pool_identities for i in range(n)]
    rng.shuffle(pids)
    # A swap needs two different garment colours; give swapped pairs an identity that has them.
    swappable = [p for p, ident in enumerate(pool_ids) if ident.upper_colour != ident.lower_colour]
    for i, kind in enumerate(kinds):
        if kind == DEFECT_SWAPPED and pool_ids[pids[i]].upper_colour == pool_ids[pids[i]].lower_colour:
            if not swappable:
                raise TbpsError(
                    "no pool identity wears two different garment colours, so no attribute can be swapped",
                    field="defect_mix",
                    value=DEFECT_SWAPPED,
                    hint="Use more --pool-identities or --colours",
                )
            pids[i] = rng.choice(swappable)
    # Duplicates copy a clean pair when there is one, else any pair that is not a duplicate.
    dups = [i for i, kind in enumerate(kinds) if kind in DUPLICATE_KINDS]
    clean = [i for i, kind in enumerate(kinds) if kind == DEFECT_NONE]
    candidates = clean or [i for i, kind in enumerate(kinds) if kind not in DUPLICATE_KINDS]
    if len(candidates) >= len(dups):
        chosen = rng.sample(candidates, len(dups))
    else:
        chosen = rng.choices(candidates, k=len(dups))
    originals = dict(zip(dups, chosen))
    for dup, orig in originals.items():
        pids[dup] = pids[orig]
    return WorldPlan(
        seed=seed,
        size=config.image_size,  # type: ignore[arg-type]
        colours=config.colours,
        occlusion=config.occlusion,
        lighting=config.lighting,
        clutter=config.clutter,
        bench_root=str(config.out / "benchmark" / "imgs"),
        pool_root=str(config.out / "pool" / "images"),
        bench_ids=bench_ids,
        bench_split=bench_split,
        images_per_id=config.images_per_id,
        pid_width=max(4, len(str(config.identities))),
        pool_ids=pool_ids,
        pool_pid=pids,
        pool_kind=kinds,
        pool_original=originals,
    )


# ---------------------------------------------------------------------------------------------
# Building items (runs in the workers)
# ---------------------------------------------------------------------------------------------

_PLAN: WorldPlan | None = None

# Attributes a wrong-attribute defect may change, with how often.
_WRONG_WEIGHTS = {
    "upper_colour": 3.0, "lower_colour": 3.0, "upper": 1.5, "lower": 1.5, "shoe_colour": 1.0,
    "hair_colour": 1.0, "hair_length": 0.7, "gender": 0.7, "backpack_colour": 0.8,
    "handbag_colour": 0.8, "hat_colour": 0.8, "glasses_colour": 0.5,
}
# Colour pairs a swapped-attribute defect may exchange, with how often.
_SWAP_WEIGHTS = {
    ("upper_colour", "lower_colour"): 4.0,
    ("upper_colour", "shoe_colour"): 1.0,
    ("lower_colour", "shoe_colour"): 1.0,
    ("upper_colour", "backpack_colour"): 0.5,
    ("upper_colour", "handbag_colour"): 0.5,
    ("lower_colour", "hat_colour"): 0.5,
}


def _init_worker(plan: WorldPlan | None) -> None:
    global _PLAN
    _PLAN = plan


def _scene(plan: WorldPlan, stream: str, index: int):
    return sample_scene(
        item_rng(plan.seed, stream, index),
        occlusion=plan.occlusion,
        lighting=plan.lighting,
        clutter=plan.clutter,
        colours=plan.colours,
    )


def _write(root: str, rel: str, data: bytes) -> None:
    with open(os.path.join(root, rel), "wb") as fh:
        fh.write(data)


def _bench_item(plan: WorldPlan, b: int) -> tuple[int, str, list[str]]:
    """Render benchmark image ``b`` and write its two captions."""
    pid, rel = _bench_path(plan, b)
    ident = plan.bench_ids[pid - 1]
    scene = _scene(plan, "bench-scene", b)
    _write(plan.bench_root, rel, encode_jpeg(render_person(ident, scene, plan.size), scene.quality))
    visible = visible_attributes(ident, scene, plan.size)
    rng = item_rng(plan.seed, "bench-caption", b)
    first = describe(visible, rng, "cuhk").text
    second = first
    # Two different captions of the same image, as two CUHK-PEDES annotators would write.
    for _ in range(20):
        second = describe(visible, rng, "cuhk").text
        if second != first:
            break
    return pid, rel, [first, second]


def _pool_caption(plan: WorldPlan, i: int, attrs: Mapping[str, object], require=()):
    """The caption of pool pair ``i`` for ``attrs``: cheap generated text, many coarse."""
    rng = item_rng(plan.seed, "pool-caption", i)
    style = "coarse" if rng.random() < 0.6 else "cuhk"
    return describe(attrs, rng, style, require=tuple(require), words=(8, 30))


def _clean_pair(plan: WorldPlan, i: int):
    """Identity, scene, visible attributes and true caption of pool pair ``i``."""
    ident = plan.pool_ids[plan.pool_pid[i]]
    scene = _scene(plan, "pool-scene", i)
    visible = visible_attributes(ident, scene, plan.size)
    return ident, scene, visible, _pool_caption(plan, i, visible)


def _wrong(plan: WorldPlan, i: int, visible: dict, rng):
    keys = [k for k in _WRONG_WEIGHTS if k in visible]
    key = rng.choices(keys, weights=[_WRONG_WEIGHTS[k] for k in keys], k=1)[0]
    old = visible[key]
    palette = [c.name for c in GARMENT_COLOURS[: plan.colours]]
    if key == "gender":
        options = ["woman" if old == "man" else "man"]
    elif key == "hair_colour":
        options = [c.name for c in HAIR_COLOURS]
    elif key == "hair_length":
        options = list(HAIR_LENGTHS)
    elif key == "upper":
        options = list(UPPER)
    elif key == "lower":
        options = list(LOWER)
    elif key == "glasses_colour":
        options = [c for c in GLASSES_COLOURS if c in palette] + palette
    else:
        near = [c for c in NEAR_COLOURS.get(str(old), ()) if c in palette]
        options = near if near and rng.random() < 0.5 else palette
    options = [o for o in dict.fromkeys(options) if o != old]
    new = rng.choice(options)
    attrs = dict(visible)
    attrs[key] = new
    caption = _pool_caption(plan, i, attrs, require=(key,))
    return caption, f"{attribute_label(key)}: {old}->{new}"


def _swapped(plan: WorldPlan, i: int, visible: dict, rng):
    pairs = [p for p in _SWAP_WEIGHTS if p[0] in visible and p[1] in visible and visible[p[0]] != visible[p[1]]]
    a, b = rng.choices(pairs, weights=[_SWAP_WEIGHTS[p] for p in pairs], k=1)[0]
    attrs = dict(visible)
    attrs[a], attrs[b] = visible[b], visible[a]
    caption = _pool_caption(plan, i, attrs, require=(a, b))
    return caption, f"{attribute_label(a)}: {visible[a]} <-> {attribute_label(b)}: {visible[b]}"


def contradicts(mentioned: Mapping[str, object], visible: Mapping[str, object]) -> list[str]:
    """The attributes a caption states that the image does not show as stated.

    Args:
        mentioned: what the caption states (:attr:`Caption.mentioned`).
        visible: the image's visible attributes.

    Returns:
        The keys whose stated value differs from (or is absent in) the visible attributes.
    """
    return [k for k, v in mentioned.items() if visible.get(k) != v]


def _other_identity(plan: WorldPlan, i: int, scene, visible: dict, rng):
    own = plan.pool_pid[i]
    caption = None
    other = own
    # Retry until the caption states something this image contradicts: a caption of another
    # person that happens to fit the image is not a defect a filter could find.
    for _ in range(30):
        other = rng.randrange(len(plan.pool_ids) - 1)
        other += other >= own
        attrs = visible_attributes(plan.pool_ids[other], scene, plan.size)
        caption = _pool_caption(plan, i, attrs)
        if contradicts(caption.mentioned, visible):
            break
        caption = None
    if caption is None:
        # Rare: force a differing visible attribute into the caption, taking the first identity
        # (from a random start) that differs from this one somewhere this shot shows.
        n = len(plan.pool_ids)
        first = rng.randrange(n)
        for step in range(n):
            other = (first + step) % n
            attrs = visible_attributes(plan.pool_ids[other], scene, plan.size)
            diff = [k for k in ATTRIBUTES if k in attrs and attrs[k] != visible.get(k)]
            if other != own and diff:
                caption = _pool_caption(plan, i, attrs, require=diff[:2])
                break
        else:
            raise TbpsError(
                "no other pool identity differs from this one in what the image shows",
                record=f"{i}:0",
                field="defect_mix",
                value=DEFECT_OTHER_ID,
                hint="Use more --pool-identities or fewer other-identity defects",
            )
    return caption, f"caption of pool identity {other} (shown: pool identity {own})"


def _pool_item(plan: WorldPlan, i: int) -> tuple:
    """Build pool pair ``i``: render (or mark for copying) its image, write its caption."""
    rel, image_id = _pool_path(i)
    kind = plan.pool_kind[i]
    rng = item_rng(plan.seed, "pool-defect", i)
    detail = duplicate_of = None
    data: bytes | None = None
    if kind in DUPLICATE_KINDS:
        j = plan.pool_original[i]
        ident, scene, visible, caption = _clean_pair(plan, j)
        duplicate_of = f"{j}:0"
        if kind == DEFECT_EXACT_DUP:
            detail = f"same bytes and caption as {_pool_path(j)[1]}"
        else:
            scene = jitter_scene(scene, rng)
            visible = visible_attributes(ident, scene, plan.size)
            # Paraphrase: the same attributes captioned from another random stream.
            for k in range(20):
                paraphrase = _pool_caption(plan, _paraphrase_stream(plan, i, k), visible)
                if paraphrase.text != caption.text:
                    break
            caption = paraphrase
            data = encode_jpeg(render_person(ident, scene, plan.size), scene.quality)
            detail = f"re-rendered from {_pool_path(j)[1]} (offset/scale/lighting jitter, JPEG q{scene.quality}), caption paraphrased"
    else:
        ident, scene, visible, caption = _clean_pair(plan, i)
        if kind == DEFECT_BLANK:
            colour = rng.choice(((0, 0, 0), (255, 255, 255), (128, 128, 128), tuple(rng.randrange(256) for _ in range(3))))
            data = encode_jpeg(render_blank(colour, plan.size), scene.quality)
            detail = f"uniform colour {colour}"
        elif kind == DEFECT_GARBLED:
            blocky = rng.random() < 0.5
            data = encode_jpeg(render_garbled(rng.getrandbits(32), plan.size, blocky), scene.quality)
            detail = "block noise" if blocky else "pixel noise"
        else:
            data = encode_jpeg(render_person(ident, scene, plan.size), scene.quality)
            if kind == DEFECT_SWAPPED:
                caption, detail = _swapped(plan, i, visible, rng)
            elif kind == DEFECT_WRONG:
                caption, detail = _wrong(plan, i, visible, rng)
            elif kind == DEFECT_OTHER_ID:
                caption, detail = _other_identity(plan, i, scene, visible, rng)
    if data is not None:
        _write(plan.pool_root, rel, data)
    return rel, image_id, caption.text, aptm_label(caption.mentioned), kind, detail, duplicate_of


def _paraphrase_stream(plan: WorldPlan, i: int, k: int) -> int:
    """A caption-stream index for paraphrase ``k`` of pair ``i`` that no pair uses itself."""
    return len(plan.pool_kind) + i * 20 + k


def _run_chunk(task: tuple[str, int, int]) -> tuple[str, int, list, float]:
    """Build items ``start..stop`` of a section; also returns the CPU seconds it took."""
    section, start, stop = task
    plan = _PLAN
    assert plan is not None, "worker not initialised"
    build = _bench_item if section == "bench" else _pool_item
    cpu = time.process_time()
    items = [build(plan, n) for n in range(start, stop)]
    return section, start, items, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    """Check that ``out`` may receive a world: new, empty, or a previous world (replaced whole once the new one is complete)."""
    if out.exists() and not out.is_dir():
        raise TbpsError("the output path exists and is not a directory", path=out, field="out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "world.json").is_file():
            raise TbpsError(
                "the output directory is not empty and holds no tbps world (world.json)",
                path=out,
                field="out",
                hint="Choose an empty or new directory",
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(out.parent)  # a half-rendered world of a killed run


def _mp_context():
    """The start method for rendering workers.

    forkserver: workers start clean even when this process runs threads (torch, faiss). It
    re-imports the main script in each worker, which fails when there is no script file
    (``python - < script``); then fork is the only start method that works.
    """
    methods = multiprocessing.get_all_start_methods()
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    unimportable = spec_name is None and main_file is not None and not os.path.isfile(main_file)
    if "forkserver" in methods and not unimportable:
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _tasks(config: SynthConfig, chunk: int) -> list[tuple[str, int, int]]:
    n_bench = config.identities * config.images_per_id
    tasks = [("bench", s, min(s + chunk, n_bench)) for s in range(0, n_bench, chunk)]
    tasks += [("pool", s, min(s + chunk, config.pool_size)) for s in range(0, config.pool_size, chunk)]
    return tasks


def synthesize(config: SynthConfig, progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write the synthetic world described by ``config``.

    Args:
        config: the world's sizes, seed and difficulty knobs.
        progress: called as ``progress(done, total)`` with the number of images built so far.

    Returns:
        A :class:`SynthSummary` with the paths written and the counts per split and defect kind.

    Raises:
        TbpsError: the output directory holds something other than a previous world.
    """
    _prepare_out(config.out)
    # Rendered beside the target and swapped in when complete: a kill leaves the old world (or none), never half of one.
    with atomic_dir(config.out) as tmp:
        summary = _synthesize(dataclasses.replace(config, out=tmp), config, progress)
    return dataclasses.replace(
        summary, out=config.out, benchmark=config.out / summary.benchmark.relative_to(tmp), pool=config.out / summary.pool.relative_to(tmp),
        truth=config.out / summary.truth.relative_to(tmp), world=config.out / summary.world.relative_to(tmp),
    )


def _synthesize(config: SynthConfig, recorded: SynthConfig, progress: Callable[[int, int], None] | None) -> SynthSummary:
    """Render the world into ``config.out`` (a fresh directory); ``recorded`` is the config the record names."""
    started, main_cpu = time.perf_counter(), time.process_time()
    out = config.out
    plan = plan_world(config)
    bench_dir, pool_dir = out / "benchmark", out / "pool"
    for pid in range(1, config.identities + 1):
        rel = _bench_path(plan, (pid - 1) * config.images_per_id)[1]
        (Path(plan.bench_root) / rel).parent.mkdir(parents=True, exist_ok=True)
    for shard in range(0, config.pool_size, 1000):
        (Path(plan.pool_root) / _pool_path(shard)[0]).parent.mkdir(parents=True, exist_ok=True)
    pool_dir.mkdir(parents=True, exist_ok=True)

    # Build every item in chunks (small inter-process traffic); results are put back in order.
    total = config.identities * config.images_per_id + config.pool_size
    chunk = max(16, min(256, total // (config.workers * 8) or 16))
    tasks = _tasks(config, chunk)
    results: dict[tuple[str, int], list] = {}
    done = 0
    if config.workers == 1:
        _init_worker(plan)
        outputs: Iterable = map(_run_chunk, tasks)
        executor = None
    else:
        executor = ProcessPoolExecutor(config.workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(plan,))
        outputs = (future.result() for future in as_completed([executor.submit(_run_chunk, t) for t in tasks]))
    worker_cpu = 0.0
    try:
        for section, start, items, cpu in outputs:
            results[(section, start)] = items
            worker_cpu += cpu
            done += len(items)
            if progress is not None:
                progress(done, total)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a synth worker process died; run with workers=1 to see the error in this process"
        ) from exc
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        _init_worker(None)
    bench_items = [item for (section, start) in sorted(results) if section == "bench" for item in results[(section, start)]]
    pool_items = [item for (section, start) in sorted(results) if section == "pool" for item in results[(section, start)]]

    # Exact duplicates: the original's bytes under the duplicate's own name.
    for i, j in sorted(plan.pool_original.items()):
        if plan.pool_kind[i] == DEFECT_EXACT_DUP:
            shutil.copyfile(Path(plan.pool_root) / _pool_path(j)[0], Path(plan.pool_root) / _pool_path(i)[0])

    bench_records = [
        {"split": plan.bench_split[pid - 1], "captions": caps, "file_path": rel, "processed_tokens": [tokens(c) for c in caps], "id": pid}
        for pid, rel, caps in bench_items
    ]
    write_text(bench_dir / "reid_raw.json", json.dumps(bench_records))
    pool_records = [
        {"image": rel, "caption": caption, "image_id": image_id, "label": label}
        for rel, image_id, caption, label, *_ in pool_items
    ]
    write_text(pool_dir / "pool.json", json.dumps(pool_records))
    truth = pa.table(
        {
            PAIR_ID: [f"{i}:0" for i in range(len(pool_items))],
            DEFECT: [item[4] for item in pool_items],
            DETAIL: [item[5] for item in pool_items],
            DUPLICATE_OF: [item[6] for item in pool_items],
        },
        schema=TRUTH_SCHEMA,
    )
    pq.write_table(truth, pool_dir / "truth.parquet")

    splits = {}
    for name, n in zip(SPLITS, config.split_counts()):
        images = sum(1 for r in bench_records if r["split"] == name)
        splits[name] = {"identities": n, "images": images, "captions": 2 * images}
    defects = config.defect_counts()
    seconds = time.perf_counter() - started
    # In-process chunks are already in this process's CPU time.
    cpu_seconds = time.process_time() - main_cpu + (worker_cpu if config.workers > 1 else 0.0)
    summary = SynthSummary(
        out=out,
        benchmark=bench_dir / "reid_raw.json",
        pool=pool_dir / "pool.json",
        truth=pool_dir / "truth.parquet",
        world=out / "world.json",
        splits=splits,
        pool_pairs=len(pool_records),
        pool_identities=config.pool_identities,
        defects=defects,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )
    world = {
        "splits": splits,
        "pool": {"pairs": len(pool_records), "identities": config.pool_identities, "defects": defects},
        "vocabulary": vocabulary(config.colours),
        "layout": {
            "benchmark": "benchmark/reid_raw.json (CUHK-PEDES), images under benchmark/imgs/",
            "pool": "pool/pool.json (APTM/MALS), images under pool/images/",
            "truth": "pool/truth.parquet (pair_id, defect, detail, duplicate_of)",
            "pair_id": "pool record i -> 'i:0'; benchmark record i caption j -> 'i:j'",
        },
    }
    write_json(summary.world, record(recorded, world=world, seconds=round(seconds, 3), cpu_seconds=round(cpu_seconds, 3)))
    return summary
