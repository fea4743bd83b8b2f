"""Pillow rendering of the synthetic pedestrians.

One image = an :class:`~tbps.data.world.Identity` (what the person looks like) and a
:class:`Scene` (how this shot differs: front/back view, offset, scale, background, lighting,
occlusion, noise, JPEG quality). :func:`sample_scene` draws a scene, :func:`render_person`
draws it, and :func:`visible_attributes` says which attributes the shot shows (a backpack
only from the back, glasses only from the front, shoes not behind a low occluder, a handbag
not when it is hidden or out of frame) -- captions mention only those.

Drawing is a few dozen Pillow shape calls on a small canvas plus one numpy pass for noise and
lighting: no per-pixel Python loops.
"""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tbps.data.world import COLOURS, GARMENT_COLOURS, HAIR, SKIN_TONES, UPPER, Identity

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """Everything about one shot of a person except the person.

    Args:
        view: "front" or "back".
        scale: the person's height as a fraction of the image height.
        dx: horizontal offset of the person's centre, as a fraction of the image width.
        dy: where the person stands in the vertical slack (0 = top, 1 = bottom).
        sky: colour of the upper background (wall, sky).
        ground: colour of the ground.
        horizon: where the ground starts, as a fraction of the image height.
        clutter: background objects ``(x0, y0, x1, y1, rgb)`` in image fractions.
        brightness: multiplies every pixel.
        contrast: stretches pixel values around mid-gray.
        gains: per-channel colour cast (r, g, b).
        occluder: None, or ``(kind, a, b, rgb)``: ("pole", x centre, width), ("low", height
            above the feet in person heights, 0), ("side", 0 = left / 1 = right, width).
        bag_side: -1 (handbag on the image's left) or 1 (right), for a front view; a back view
            mirrors it.
        noise_seed: seed of the pixel noise.
        noise: standard deviation of the pixel noise.
        blur: whether the shot is slightly blurred.
        quality: JPEG quality the image is saved with.
    """

    view: str
    scale: float
    dx: float
    dy: float
    sky: RGB
    ground: RGB
    horizon: float
    clutter: tuple[tuple[float, float, float, float, RGB], ...]
    brightness: float
    contrast: float
    gains: tuple[float, float, float]
    occluder: tuple[str, float, float, RGB] | None
    bag_side: int
    noise_seed: int
    noise: float
    blur: bool
    quality: int


def _muted(rng: random.Random, lo: int = 40, hi: int = 200) -> RGB:
    """A random background colour: mostly grayish with a little hue."""
    base = lo + int(rng.random() * (hi - lo + 1))
    r = rng.random
    return tuple(max(0, min(255, base + int(r() * 61) - 30)) for _ in range(3))  # type: ignore[return-value]


def sample_scene(
    rng: random.Random,
    *,
    occlusion: float = 0.25,
    lighting: float = 0.3,
    clutter: int = 3,
    colours: int = len(GARMENT_COLOURS),
    quality: int = 90,
) -> Scene:
    """Draw the variation of one shot.

    Args:
        rng: the shot's own random stream.
        occlusion: probability that something stands in front of the person.
        lighting: half-range of the brightness change (contrast and colour cast scale with it).
        clutter: most background objects.
        colours: palette size; background objects sometimes take a palette colour, so a
            garment colour in the caption can also appear behind the person.
        quality: JPEG quality.

    Returns:
        A :class:`Scene`.
    """
    palette = GARMENT_COLOURS[:colours]
    objects = []
    for _ in range(rng.randint(0, clutter)):
        x0, y0 = rng.uniform(-0.2, 0.9), rng.uniform(0.0, 0.8)
        colour = rng.choice(palette).rgb if rng.random() < 0.3 else _muted(rng)
        objects.append((x0, y0, x0 + rng.uniform(0.15, 0.6), y0 + rng.uniform(0.05, 0.4), colour))
    occluder = None
    if rng.random() < occlusion:
        kind = rng.choice(("pole", "low", "side"))
        colour = _muted(rng, 20, 170)
        if kind == "pole":
            occluder = (kind, rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.14), colour)
        elif kind == "low":
            occluder = (kind, rng.uniform(0.07, 0.2), 0.0, colour)
        else:
            occluder = (kind, float(rng.randint(0, 1)), rng.uniform(0.2, 0.32), colour)
    return Scene(
        view=rng.choice(("front", "back")),
        scale=rng.uniform(0.76, 0.92),
        dx=rng.uniform(-0.06, 0.06),
        dy=rng.uniform(0.15, 0.85),
        sky=_muted(rng, 60, 220),
        ground=_muted(rng, 40, 160),
        horizon=rng.uniform(0.55, 0.85),
        clutter=tuple(objects),
        brightness=1.0 + rng.uniform(-lighting, lighting),
        contrast=1.0 + rng.uniform(-lighting / 2, lighting / 2),
        gains=tuple(1.0 + rng.uniform(-lighting / 4, lighting / 4) for _ in range(3)),  # type: ignore[arg-type]
        occluder=occluder,
        bag_side=rng.choice((-1, 1)),
        noise_seed=rng.getrandbits(32),
        noise=rng.uniform(2.0, 7.0),
        blur=rng.random() < 0.3,
        quality=quality,
    )


def jitter_scene(scene: Scene, rng: random.Random) -> Scene:
    """A near copy of a shot: a pixel or two of offset, slightly different scale, lighting,
    noise and JPEG quality (a re-render and re-encode, as near duplicates in scraped data)."""
    return replace(
        scene,
        scale=min(0.95, max(0.7, scene.scale + rng.uniform(-0.02, 0.02))),
        dx=scene.dx + rng.uniform(-0.03, 0.03),
        dy=min(1.0, max(0.0, scene.dy + rng.uniform(-0.1, 0.1))),
        brightness=scene.brightness * rng.uniform(0.95, 1.05),
        noise_seed=rng.getrandbits(32),
        quality=rng.randint(70, 85),
    )


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

_HALF_TORSO = {"slim": 0.075, "average": 0.088, "stocky": 0.104}


@dataclass(frozen=True)
class _Layout:
    u: float  # person height in pixels
    top: float
    cx: float
    tw: float  # half torso width
    aw: float  # arm width
    hw: float  # half head width
    shoulder: float
    hip: float
    knee: float
    ankle: float
    foot: float
    bag_side: int  # -1 / 1 in image coordinates, after mirroring for a back view

    def at(self, f: float) -> float:
        return self.top + f * self.u

    def shoes(self) -> Box:
        return (self.cx - self.tw - 0.01 * self.u, self.ankle, self.cx + self.tw + 0.01 * self.u, self.foot)

    def handbag(self) -> Box:
        s = self.bag_side
        inner = self.cx + s * (self.tw + 0.2 * self.aw)
        outer = inner + s * 0.075 * self.u
        return (min(inner, outer), self.at(0.40), max(inner, outer), self.at(0.49))


def _layout(identity: Identity, scene: Scene, size: tuple[int, int]) -> _Layout:
    h, w = size
    u = h * scene.scale
    top = (h - u) * scene.dy
    return _Layout(
        u=u,
        top=top,
        cx=w / 2 + scene.dx * w,
        tw=_HALF_TORSO[identity.build] * u,
        aw=0.042 * u,
        hw=0.05 * u,
        shoulder=top + 0.145 * u,
        hip=top + 0.48 * u,
        knee=top + 0.71 * u,
        ankle=top + 0.95 * u,
        foot=top + u,
        bag_side=scene.bag_side if scene.view == "front" else -scene.bag_side,
    )


def _occluder_box(scene: Scene, lay: _Layout, size: tuple[int, int]) -> Box | None:
    if scene.occluder is None:
        return None
    h, w = size
    kind, a, b, _ = scene.occluder
    if kind == "pole":
        return (a * w - b * w / 2, 0.0, a * w + b * w / 2, float(h))
    if kind == "low":
        return (0.0, lay.foot - a * lay.u, float(w), float(h))
    x0 = 0.0 if a < 0.5 else w - b * w
    return (x0, lay.at(0.3), x0 + b * w, float(h))


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _intersect(a: Box, b: Box) -> Box:
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def _shown(part: Box, occluder: Box | None, size: tuple[int, int]) -> float:
    """The fraction of ``part`` inside the frame and not behind the occluder."""
    h, w = size
    inside = _intersect(part, (0.0, 0.0, float(w), float(h)))
    total = _area(part)
    if total <= 0:
        return 0.0
    hidden = _area(_intersect(inside, occluder)) if occluder else 0.0
    return (_area(inside) - hidden) / total


def visible_attributes(identity: Identity, scene: Scene, size: tuple[int, int]) -> dict[str, object]:
    """The attributes a shot shows: what a caption of this image may mention.

    Args:
        identity: the person.
        scene: the shot.
        size: (height, width) of the image.

    Returns:
        The identity's flat attributes (see :meth:`Identity.attributes`) minus what the shot
        hides, plus ``view``.
    """
    attrs = identity.attributes()
    lay = _layout(identity, scene, size)
    occ = _occluder_box(scene, lay, size)
    hidden = set()
    if scene.view == "front":
        hidden |= {"backpack", "backpack_colour"}  # only the straps show from the front
    else:
        hidden |= {"glasses", "glasses_colour"}
    if _shown(lay.shoes(), occ, size) < 0.5:
        hidden.add("shoe_colour")
    if "handbag" in attrs and _shown(lay.handbag(), occ, size) < 0.5:
        hidden |= {"handbag", "handbag_colour"}
    visible = {k: v for k, v in attrs.items() if k not in hidden}
    visible["view"] = scene.view
    return visible


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _shade(identity: Identity, key: str, rgb: RGB, spread: int = 12) -> RGB:
    """The identity's own shade of a palette colour: a small offset fixed per identity and part."""
    r = random.Random(identity.tint * 131 + sum(map(ord, key)))
    return tuple(max(0, min(255, c + r.randint(-spread, spread))) for c in rgb)  # type: ignore[return-value]


@functools.lru_cache(maxsize=65536)
def _colours_of(identity: Identity) -> dict[str, RGB]:
    """The identity's shades of all its colours (cached: an identity is drawn several times)."""
    shades = {
        "skin": _shade(identity, "skin", SKIN_TONES[identity.skin], 6),
        "hair": _shade(identity, "hair", HAIR[identity.hair_colour].rgb),
        "upper": _shade(identity, "upper", COLOURS[identity.upper_colour].rgb),
        "lower": _shade(identity, "lower", COLOURS[identity.lower_colour].rgb),
        "shoes": _shade(identity, "shoes", COLOURS[identity.shoe_colour].rgb),
    }
    for acc in ("backpack", "handbag", "hat", "glasses"):
        colour = getattr(identity, acc)
        if colour is not None:
            shades[acc] = _shade(identity, acc, COLOURS[colour].rgb) if acc != "glasses" else COLOURS[colour].rgb
    return shades


_NOISE_FRAMES = 64


@functools.lru_cache(maxsize=8)
def _noise_bank(size: tuple[int, int]) -> np.ndarray:
    """64 fixed frames of unit Gaussian noise for images of ``size`` (one draw per process,
    not one per image: drawing 9k normals per image would cost more than the drawing)."""
    h, w = size
    return np.random.default_rng(20240607).standard_normal((_NOISE_FRAMES, h, w, 3), dtype=np.float32)


@functools.lru_cache(maxsize=2048)
def _noise_frame(size: tuple[int, int], sigma: int, frame: int) -> np.ndarray:
    """Noise frame ``frame`` at standard deviation ``sigma`` as int16 pixel offsets."""
    return np.rint(_noise_bank(size)[frame] * sigma).astype(np.int16)


_CHANNEL_OFFSET = np.array([0, 256, 512], dtype=np.intp)


def _darker(rgb: RGB, f: float = 0.7) -> RGB:
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


def _lighter(rgb: RGB, f: float = 0.35) -> RGB:
    return tuple(int(c + (255 - c) * f) for c in rgb)  # type: ignore[return-value]


def _draw_background(d: ImageDraw.ImageDraw, scene: Scene, size: tuple[int, int]) -> None:
    h, w = size
    d.rectangle((0, 0, w, h * scene.horizon), fill=scene.sky)
    d.rectangle((0, h * scene.horizon, w, h), fill=scene.ground)
    for x0, y0, x1, y1, colour in scene.clutter:
        d.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=colour)


def _draw_person(d: ImageDraw.ImageDraw, identity: Identity, scene: Scene, lay: _Layout) -> None:
    u, cx, tw, aw, hw = lay.u, lay.cx, lay.tw, lay.aw, lay.hw
    back = scene.view == "back"
    shades = _colours_of(identity)
    skin, hair, upper, lower, shoes = (shades[k] for k in ("skin", "hair", "upper", "lower", "shoes"))
    garment = UPPER[identity.upper]
    hair_end = {"short": 0.0, "medium": 0.2, "long": 0.31}[identity.hair_length]

    # Hair that falls behind the shoulders shows around the head from the front.
    if hair_end and not back:
        d.rectangle((cx - hw - 0.012 * u, lay.at(0.04), cx + hw + 0.012 * u, lay.at(hair_end)), fill=hair)
    if identity.upper == "hoodie" and not back:
        d.ellipse((cx - hw - 0.025 * u, lay.at(0.07), cx + hw + 0.025 * u, lay.at(0.18)), fill=_darker(upper, 0.85))

    # Legs and the lower garment.
    gap = 0.006 * u
    left = (cx - tw + gap, lay.hip, cx - gap, lay.ankle)
    right = (cx + gap, lay.hip, cx + tw - gap, lay.ankle)
    d.rectangle(left, fill=skin)
    d.rectangle(right, fill=skin)
    if identity.lower in ("trousers", "jeans", "shorts"):
        end = lay.knee if identity.lower == "shorts" else lay.ankle
        d.rectangle((left[0], lay.hip, left[2], end), fill=lower)
        d.rectangle((right[0], lay.hip, right[2], end), fill=lower)
        d.rectangle((cx - tw + gap, lay.hip, cx + tw - gap, lay.at(0.54)), fill=lower)
        if identity.lower == "jeans":
            seam = _lighter(lower)
            d.line((left[0] + 1, lay.hip, left[0] + 1, end), fill=seam)
            d.line((right[2] - 1, lay.hip, right[2] - 1, end), fill=seam)
    else:
        end = lay.at(0.75) if identity.lower == "skirt" else lay.at(0.92)
        flare = tw + 0.03 * u
        d.polygon([(cx - tw, lay.hip - 1), (cx + tw, lay.hip - 1), (cx + flare, end), (cx - flare, end)], fill=lower)
    sw = 0.012 * u
    d.rectangle((left[0] - sw, lay.ankle, left[2] + sw * 0.5, lay.foot), fill=shoes)
    d.rectangle((right[0] - sw * 0.5, lay.ankle, right[2] + sw, lay.foot), fill=shoes)

    # Torso, arms and hands.
    if identity.upper == "long coat":
        flare = tw + 0.015 * u
        d.polygon([(cx - tw, lay.shoulder), (cx + tw, lay.shoulder), (cx + flare, lay.at(0.64)), (cx - flare, lay.at(0.64))], fill=upper)
    else:
        d.rectangle((cx - tw, lay.shoulder, cx + tw, lay.at(0.5)), fill=upper)
    sleeve_end = {"long": 0.47, "short": 0.26, "none": lay.shoulder}[garment.length]
    for side in (-1, 1):
        x0 = cx + side * tw
        x1 = x0 + side * aw
        box = (min(x0, x1), lay.shoulder + 1, max(x0, x1), lay.at(0.52))
        d.rectangle(box, fill=skin)
        if garment.length != "none":
            d.rectangle((box[0], box[1], box[2], lay.at(sleeve_end)), fill=upper)
    if not back:
        if identity.upper in ("jacket", "long coat", "hoodie"):
            d.line((cx, lay.shoulder + 2, cx, lay.at(0.5)), fill=_darker(upper))
        elif identity.upper == "shirt":
            d.line((cx, lay.shoulder + 2, cx, lay.at(0.47)), fill=_lighter(upper))
    elif identity.upper == "hoodie":
        d.ellipse((cx - hw * 1.2, lay.shoulder - 0.01 * u, cx + hw * 1.2, lay.shoulder + 0.08 * u), fill=_darker(upper, 0.85))

    # Bags.
    if identity.backpack is not None:
        pack = shades["backpack"]
        if back:
            d.rectangle((cx - tw * 0.8, lay.shoulder + 0.02 * u, cx + tw * 0.8, lay.at(0.42)), fill=pack)
            d.line((cx - tw * 0.8, lay.at(0.3), cx + tw * 0.8, lay.at(0.3)), fill=_darker(pack))
        else:
            for side in (-1, 1):
                x = cx + side * tw * 0.6
                d.line((x, lay.shoulder, x, lay.at(0.33)), fill=pack, width=max(1, round(0.012 * u)))
    if identity.handbag is not None:
        bag = shades["handbag"]
        box = lay.handbag()
        strap_x = cx + lay.bag_side * tw * 0.7
        d.line((strap_x, lay.shoulder, (box[0] + box[2]) / 2, box[1]), fill=_darker(bag))
        d.rectangle(box, fill=bag)

    # Neck, head, hair, hat, glasses.
    d.rectangle((cx - 0.02 * u, lay.at(0.11), cx + 0.02 * u, lay.shoulder + 1), fill=skin)
    head = (cx - hw, lay.at(0.0), cx + hw, lay.at(0.13))
    if back:
        d.ellipse(head, fill=hair)
        if hair_end:
            d.rectangle((cx - hw - 0.006 * u, lay.at(0.06), cx + hw + 0.006 * u, lay.at(hair_end)), fill=hair)
    else:
        d.ellipse(head, fill=hair)
        face_top = 0.035 if identity.hair_length == "short" else 0.045
        d.ellipse((cx - hw * 0.85, lay.at(face_top), cx + hw * 0.85, lay.at(0.13)), fill=skin)
    if identity.hat is not None:
        hat = shades["hat"]
        d.rectangle((cx - hw * 1.1, lay.at(-0.012), cx + hw * 1.1, lay.at(0.035)), fill=hat)
        if not back:
            d.line((cx - hw * 1.35, lay.at(0.035), cx + hw * 1.35, lay.at(0.035)), fill=_darker(hat), width=max(1, round(0.01 * u)))
    if identity.glasses is not None and not back:
        frame = shades["glasses"]
        y = lay.at(0.07)
        d.line((cx - hw * 0.8, y, cx + hw * 0.8, y), fill=frame, width=max(1, round(0.012 * u)))


def render_person(identity: Identity, scene: Scene, size: tuple[int, int]) -> Image.Image:
    """Render one shot of a person.

    Args:
        identity: the person.
        scene: the shot (see :func:`sample_scene`).
        size: (height, width) in pixels; the TBPS aspect is height = 3 x width.

    Returns:
        An RGB :class:`PIL.Image.Image` of ``size``.
    """
    h, w = size
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    _draw_background(d, scene, size)
    lay = _layout(identity, scene, size)
    _draw_person(d, identity, scene, lay)
    occ = _occluder_box(scene, lay, size)
    if occ is not None and scene.occluder is not None:
        d.rectangle(occ, fill=scene.occluder[3])
    if scene.blur:
        img = img.filter(ImageFilter.BoxBlur(0.6))
    # Lighting is a per-channel affine map of pixel values: one lookup table per channel,
    # applied with one numpy gather; then a cached camera-noise frame is added.
    levels = np.arange(256, dtype=np.float32)[None, :]
    gains = np.asarray(scene.gains, dtype=np.float32)[:, None] * scene.brightness
    lut = np.clip(((levels - 128.0) * scene.contrast + 128.0) * gains, 0, 255).astype(np.int16).ravel()
    arr = lut[np.asarray(img, dtype=np.intp) + _CHANNEL_OFFSET]
    arr += _noise_frame(size, max(1, round(scene.noise)), scene.noise_seed % _NOISE_FRAMES)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_blank(colour: RGB, size: tuple[int, int]) -> Image.Image:
    """A failed generation: one uniform colour."""
    h, w = size
    return Image.new("RGB", (w, h), colour)


def render_garbled(seed: int, size: tuple[int, int], blocky: bool) -> Image.Image:
    """A failed generation: pixel noise, or coarse colour blocks with noise on top.

    Args:
        seed: the noise seed.
        size: (height, width).
        blocky: blocks of colour (a broken decoder) instead of pure pixel noise.

    Returns:
        An RGB image whose pixel values are spread over the whole range.
    """
    h, w = size
    rng = np.random.default_rng(seed)
    if blocky:
        cells = rng.integers(0, 256, size=(-(-h // 4), -(-w // 4), 3)).astype(np.int16)
        arr = np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:h, :w]
        arr = arr + rng.integers(-60, 61, size=arr.shape)
    else:
        arr = rng.integers(0, 256, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an image; the same image and quality always give the same bytes.

    Full-resolution chroma (4:4:4) at quality >= 88 keeps thin coloured parts legible at
    32 px width; lower qualities use 4:2:0 like a typical re-encode.
    """
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 88 else 2, optimize=False)
    return buf.getvalue()
