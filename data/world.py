"""The synthetic pedestrian world: identities, their attributes and the caption grammar.

An :class:`Identity` is a set of attributes a caption can describe (gender and build, hair,
upper and lower garment, shoes, accessories). :func:`sample_identity` draws one from skewed
distributions so that many identities share most attributes, as in real pedestrian data.
:func:`describe` writes a caption about the *visible* attributes of one image, with partial
mentions, synonyms and word-order variation; it also returns what the caption claims, which
is how the defect injector and the tests check a caption against the truth.

Everything random takes a :class:`random.Random` made by :func:`item_rng` from
``(seed, stream, index)``, so any item can be rebuilt alone and in any process.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Mapping

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Colour:
    """A named colour of the palette.

    Args:
        name: the canonical name (used in ``detail`` strings and the attribute vocabulary).
        rgb: the base sRGB value the renderer starts from.
        words: what captions may call it (synonyms).
        weight: how common it is.
        basic: the APTM/MALS basic colour it counts as in attribute labels, or None.
    """

    name: str
    rgb: tuple[int, int, int]
    words: tuple[str, ...]
    weight: float
    basic: str | None


# Ordered from the most to the least distinct: ``colours=k`` keeps the first k, so small k
# gives an easy world of basic colours and the full palette adds near colours (navy next to
# blue, maroon next to red, charcoal next to gray ...).
GARMENT_COLOURS: tuple[Colour, ...] = (
    Colour("black", (28, 28, 30), ("black",), 5.0, "black"),
    Colour("white", (232, 232, 226), ("white",), 3.0, "white"),
    Colour("blue", (45, 85, 185), ("blue",), 3.0, "blue"),
    Colour("red", (190, 35, 40), ("red",), 2.0, "red"),
    Colour("gray", (128, 128, 130), ("gray", "grey"), 3.0, "gray"),
    Colour("green", (55, 135, 65), ("green",), 1.5, "green"),
    Colour("yellow", (225, 200, 55), ("yellow",), 1.0, "yellow"),
    Colour("brown", (105, 70, 45), ("brown",), 1.5, "brown"),
    Colour("pink", (232, 150, 175), ("pink",), 1.2, "pink"),
    Colour("purple", (115, 55, 145), ("purple", "violet"), 1.0, "purple"),
    Colour("orange", (230, 120, 35), ("orange",), 0.8, None),
    Colour("navy", (30, 40, 85), ("navy", "dark blue", "navy blue"), 2.0, "blue"),
    Colour("light blue", (125, 170, 225), ("light blue", "sky blue", "pale blue"), 1.2, "blue"),
    Colour("maroon", (115, 30, 40), ("maroon", "dark red", "burgundy"), 1.0, "red"),
    Colour("charcoal", (70, 70, 74), ("dark gray", "dark grey", "charcoal"), 1.5, "gray"),
    Colour("khaki", (185, 165, 120), ("khaki", "beige", "tan"), 1.2, None),
    Colour("olive", (95, 105, 50), ("olive", "olive green", "dark green"), 0.8, "green"),
)
COLOURS = {c.name: c for c in GARMENT_COLOURS}

# Near colours: a wrong-attribute defect picks one of these half of the time (a hard negative).
NEAR_COLOURS: dict[str, tuple[str, ...]] = {
    "black": ("charcoal", "navy"),
    "white": ("gray", "khaki", "light blue"),
    "blue": ("navy", "light blue", "purple"),
    "red": ("maroon", "pink", "orange"),
    "gray": ("charcoal", "white"),
    "green": ("olive",),
    "yellow": ("orange", "khaki"),
    "brown": ("khaki", "maroon", "orange"),
    "pink": ("red", "purple"),
    "purple": ("pink", "navy", "blue"),
    "orange": ("red", "yellow", "brown"),
    "navy": ("blue", "black"),
    "light blue": ("blue", "white"),
    "maroon": ("red", "brown"),
    "charcoal": ("black", "gray"),
    "khaki": ("brown", "white"),
    "olive": ("green", "brown"),
}

HAIR_COLOURS: tuple[Colour, ...] = (
    Colour("black", (24, 22, 22), ("black", "dark"), 5.0, None),
    Colour("brown", (80, 52, 32), ("brown", "dark brown"), 3.0, None),
    Colour("blond", (212, 182, 110), ("blond", "blonde", "fair"), 1.5, None),
    Colour("gray", (165, 165, 165), ("gray", "grey", "silver"), 0.7, None),
    Colour("red", (150, 65, 30), ("red", "ginger", "auburn"), 0.5, None),
)
HAIR = {c.name: c for c in HAIR_COLOURS}

SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (241, 204, 170),
    (224, 180, 140),
    (198, 150, 110),
    (150, 105, 70),
    (105, 72, 50),
)

GENDERS = ("man", "woman")
BUILDS = ("slim", "average", "stocky")
HAIR_LENGTHS = ("short", "medium", "long")


@dataclass(frozen=True)
class Garment:
    """A garment type.

    Args:
        name: canonical name.
        words: caption synonyms; ``woman_words`` are added when the wearer is a woman.
        length: "short" / "long" (sleeves for upper garments, legs for lower ones), "none".
        weights: how common it is for (men, women).
        plural: a lower garment named in the plural ("trousers"), no article.
        skirt: a skirt rather than trousers (for APTM's "dress or skirt" label).
    """

    name: str
    words: tuple[str, ...]
    length: str
    weights: tuple[float, float]
    woman_words: tuple[str, ...] = ()
    plural: bool = False
    skirt: bool = False


UPPER_GARMENTS: tuple[Garment, ...] = (
    Garment("t-shirt", ("t-shirt", "tee", "t shirt", "short-sleeved shirt"), "short", (3.0, 3.0)),
    Garment("shirt", ("shirt", "long-sleeved shirt", "button-up shirt"), "long", (2.0, 2.0), ("blouse",)),
    Garment("jacket", ("jacket", "coat"), "long", (3.0, 2.0)),
    Garment("long coat", ("long coat", "overcoat", "knee-length coat"), "long", (0.7, 1.0)),
    Garment("sweater", ("sweater", "jumper", "pullover"), "long", (1.5, 1.5)),
    Garment("hoodie", ("hoodie", "hooded sweatshirt", "hooded top"), "long", (1.2, 0.8)),
    Garment("tank top", ("tank top", "sleeveless top", "vest top"), "none", (0.4, 0.8)),
)
LOWER_GARMENTS: tuple[Garment, ...] = (
    Garment("trousers", ("trousers", "pants", "slacks"), "long", (4.0, 2.0), plural=True),
    Garment("jeans", ("jeans", "denim pants", "denim trousers"), "long", (2.5, 2.0), plural=True),
    Garment("shorts", ("shorts", "short pants"), "short", (1.0, 1.0), plural=True),
    Garment("skirt", ("skirt", "short skirt", "knee-length skirt"), "short", (0.0, 1.5), skirt=True),
    Garment("long skirt", ("long skirt", "maxi skirt", "ankle-length skirt"), "long", (0.0, 0.8), skirt=True),
)
UPPER = {g.name: g for g in UPPER_GARMENTS}
LOWER = {g.name: g for g in LOWER_GARMENTS}

ACCESSORIES = ("backpack", "handbag", "hat", "glasses")
# Probability that an identity has the accessory, for (men, women).
ACCESSORY_RATES = {"backpack": (0.3, 0.25), "handbag": (0.08, 0.35), "hat": (0.15, 0.12), "glasses": (0.2, 0.2)}
GLASSES_COLOURS = ("black", "brown", "gray", "red", "blue")

# Attribute keys of a visible-attribute mapping, in caption-agnostic order. Accessory presence
# and accessory colour are separate keys: a caption can say "a backpack" without its colour.
ATTRIBUTES = (
    "gender",
    "build",
    "hair_length",
    "hair_colour",
    "upper",
    "upper_colour",
    "lower",
    "lower_colour",
    "shoe_colour",
    "backpack",
    "backpack_colour",
    "handbag",
    "handbag_colour",
    "hat",
    "hat_colour",
    "glasses",
    "glasses_colour",
)
# Colour attributes drawn from the garment palette (hair has its own palette).
PALETTE_ATTRIBUTES = (
    "upper_colour",
    "lower_colour",
    "shoe_colour",
    "backpack_colour",
    "handbag_colour",
    "hat_colour",
    "glasses_colour",
)


def attribute_label(key: str) -> str:
    """How an attribute key reads in a ``detail`` string: ``upper_colour`` -> ``upper colour``."""
    return key.replace("_", " ")


def vocabulary(colours: int = len(GARMENT_COLOURS)) -> dict[str, list[str]]:
    """The attribute vocabulary of a world using the first ``colours`` palette entries.

    Args:
        colours: how many garment colours are in use.

    Returns:
        A dict from attribute kind to its canonical values (written to ``world.json``).
    """
    return {
        "gender": list(GENDERS),
        "build": list(BUILDS),
        "hair_length": list(HAIR_LENGTHS),
        "hair_colour": [c.name for c in HAIR_COLOURS],
        "upper": [g.name for g in UPPER_GARMENTS],
        "lower": [g.name for g in LOWER_GARMENTS],
        "colour": [c.name for c in GARMENT_COLOURS[:colours]],
        "accessory": list(ACCESSORIES),
        "glasses_colour": [c for c in GLASSES_COLOURS if c in {g.name for g in GARMENT_COLOURS[:colours]}],
    }


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


def item_seed(seed: int, stream: str, index: int) -> int:
    """A 64-bit seed for item ``index`` of ``stream`` in the world of ``seed``.

    Args:
        seed: the world seed.
        stream: what is being drawn ("identity", "bench-scene", "pool-caption", ...).
        index: the item's index within the stream.

    Returns:
        An int that does not depend on the order items are drawn in or the process drawing them.
    """
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def item_rng(seed: int, stream: str, index: int) -> random.Random:
    """A :class:`random.Random` for one item; see :func:`item_seed`."""
    return random.Random(item_seed(seed, stream, index))


def _weighted(rng: random.Random, items, weights):
    """One of ``items`` drawn with ``weights`` (``random.choices`` consumes one draw)."""
    return rng.choices(items, weights=weights, k=1)[0]


# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """One person of the world: what they look like in every image.

    Args:
        gender: "man" or "woman".
        build: "slim", "average" or "stocky" (the silhouette's width).
        skin: index into :data:`SKIN_TONES`.
        hair_length: "short", "medium" (shoulder-length) or "long".
        hair_colour: a :data:`HAIR_COLOURS` name.
        upper: an :data:`UPPER_GARMENTS` name.
        upper_colour: a :data:`GARMENT_COLOURS` name.
        lower: a :data:`LOWER_GARMENTS` name.
        lower_colour: a :data:`GARMENT_COLOURS` name.
        shoe_colour: a :data:`GARMENT_COLOURS` name.
        backpack: the backpack's colour, or None.
        handbag: the handbag's colour, or None.
        hat: the hat's colour, or None.
        glasses: the glasses' frame colour, or None.
        tint: per-identity seed of the small shade offsets the renderer adds to each colour,
            so two identities in "blue" are not pixel-identical.
    """

    gender: str
    build: str
    skin: int
    hair_length: str
    hair_colour: str
    upper: str
    upper_colour: str
    lower: str
    lower_colour: str
    shoe_colour: str
    backpack: str | None
    handbag: str | None
    hat: str | None
    glasses: str | None
    tint: int

    def key(self) -> tuple:
        """The categorical attributes (everything a caption can say): equal keys look alike."""
        return (
            self.gender, self.build, self.hair_length, self.hair_colour, self.upper, self.upper_colour,
            self.lower, self.lower_colour, self.shoe_colour, self.backpack, self.handbag, self.hat, self.glasses,
        )

    def attributes(self) -> dict[str, object]:
        """All attributes as a flat mapping over :data:`ATTRIBUTES` (absent accessories omitted)."""
        attrs: dict[str, object] = {
            "gender": self.gender,
            "build": self.build,
            "hair_length": self.hair_length,
            "hair_colour": self.hair_colour,
            "upper": self.upper,
            "upper_colour": self.upper_colour,
            "lower": self.lower,
            "lower_colour": self.lower_colour,
            "shoe_colour": self.shoe_colour,
        }
        for acc in ACCESSORIES:
            colour = getattr(self, acc)
            if colour is not None:
                attrs[acc] = True
                attrs[f"{acc}_colour"] = colour
        return attrs


def sample_identity(rng: random.Random, colours: int = len(GARMENT_COLOURS)) -> Identity:
    """Draw one identity from the world's skewed attribute distributions.

    Args:
        rng: the identity's own random stream (see :func:`item_rng`).
        colours: how many palette colours are in use (the first ``colours`` of the palette).

    Returns:
        An :class:`Identity`.
    """
    palette = GARMENT_COLOURS[:colours]
    names = [c.name for c in palette]
    cweights = [c.weight for c in palette]
    gender = rng.choice(GENDERS)
    g = GENDERS.index(gender)
    hair_length = _weighted(rng, HAIR_LENGTHS, (6, 2, 1) if g == 0 else (1.5, 2, 3))
    upper = _weighted(rng, [u.name for u in UPPER_GARMENTS], [u.weights[g] for u in UPPER_GARMENTS])
    lower = _weighted(rng, [lo.name for lo in LOWER_GARMENTS], [lo.weights[g] for lo in LOWER_GARMENTS])
    # Jeans are mostly blue-ish or dark; other garments use the whole palette.
    lweights = [w * (3.0 if lower == "jeans" and c.basic in ("blue", "black") else 1.0) for c, w in zip(palette, cweights)]
    accessories = {}
    glasses_names = [c for c in GLASSES_COLOURS if c in names] or names[:1]
    for acc in ACCESSORIES:
        has = rng.random() < ACCESSORY_RATES[acc][g]
        if acc == "glasses":
            accessories[acc] = rng.choice(glasses_names) if has else None
        else:
            accessories[acc] = _weighted(rng, names, cweights) if has else None
    return Identity(
        gender=gender,
        build=_weighted(rng, BUILDS, (1, 2, 1)),
        skin=rng.randrange(len(SKIN_TONES)),
        hair_length=hair_length,
        hair_colour=_weighted(rng, [h.name for h in HAIR_COLOURS], [h.weight for h in HAIR_COLOURS]),
        upper=upper,
        upper_colour=_weighted(rng, names, cweights),
        lower=lower,
        lower_colour=_weighted(rng, names, lweights),
        shoe_colour=_weighted(rng, names, [w * (3.0 if n in ("black", "white") else 1.0) for n, w in zip(names, cweights)]),
        backpack=accessories["backpack"],
        handbag=accessories["handbag"],
        hat=accessories["hat"],
        glasses=accessories["glasses"],
        tint=rng.getrandbits(32),
    )


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

# Caption word-count ranges: benchmark captions are CUHK-PEDES-like, pool captions are
# cheap generated ones (MALS-like) and may be shorter.
BENCH_WORDS = (15, 30)
POOL_WORDS = (8, 30)

# Probability that a visible attribute is mentioned, per style.
_MENTION = {
    "cuhk": {
        "gender": 0.92, "build": 0.3, "hair_length": 0.7, "hair_colour": 0.75, "upper": 0.9,
        "upper_colour": 0.95, "lower": 0.92, "lower_colour": 0.88, "shoe_colour": 0.6,
        "backpack": 0.85, "handbag": 0.85, "hat": 0.85, "glasses": 0.8, "colour_of_accessory": 0.75,
        "view": 0.3,
    },
    "coarse": {
        "gender": 0.95, "build": 0.05, "hair_length": 0.2, "hair_colour": 0.2, "upper": 0.8,
        "upper_colour": 0.85, "lower": 0.6, "lower_colour": 0.6, "shoe_colour": 0.1,
        "backpack": 0.5, "handbag": 0.5, "hat": 0.4, "glasses": 0.3, "colour_of_accessory": 0.4,
        "view": 0.0,
    },
}

_GENDER_WORDS = {"man": ("man", "guy", "male", "gentleman", "young man"), "woman": ("woman", "lady", "girl", "female", "young woman")}
_PRONOUNS = {"man": ("he", "his"), "woman": ("she", "her"), None: ("the person", "the person's")}
_BUILD_WORDS = {"slim": ("slim", "thin", "skinny"), "average": ("medium-build",), "stocky": ("heavy-set", "stocky", "chubby")}
_HAIR_LENGTH_WORDS = {"short": ("short",), "medium": ("shoulder-length", "medium-length"), "long": ("long",)}
_ACC_WORDS = {
    "backpack": ("backpack", "rucksack", "school bag"),
    "handbag": ("handbag", "shoulder bag", "bag"),
    "hat": ("hat", "cap", "baseball cap"),
    "glasses": ("glasses", "eyeglasses", "spectacles"),
}
_SHOE_WORDS = ("shoes", "sneakers", "trainers")
_ACTIVITIES = (
    "walking down the street",
    "standing in front of a building",
    "posing for a picture",
    "crossing the road",
    "standing on a sidewalk",
    "walking in the city",
    "waiting at a bus stop",
)
_FILLERS = (
    "{P} is walking on the street.",
    "{P} appears to be walking somewhere.",
    "The picture is a little blurry.",
    "{P} seems to be in a hurry.",
    "The photo was taken outdoors.",
)


@dataclass(frozen=True)
class Caption:
    """A caption and what it claims.

    Args:
        text: the caption.
        mentioned: attribute key -> value the caption states (a subset of :data:`ATTRIBUTES`).
    """

    text: str
    mentioned: dict[str, object]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Composer:
    """Builds one caption; a class only to share the attribute mapping and the choices made."""

    def __init__(self, attrs: Mapping[str, object], rng: random.Random, style: str, forced: set[str], damp: float):
        self.attrs = attrs
        self.rng = rng
        self.style = style
        self.mentioned: dict[str, object] = {}
        probs = _MENTION[style]
        # Decide every mention up front: a forced key is always mentioned; the others with
        # the style's probability, damped on retries that came out too long.
        self.say: set[str] = set()
        for key in ATTRIBUTES + ("view",):
            if key not in attrs:
                continue
            if key.endswith("_colour") and key[: -len("_colour")] in ACCESSORIES:
                p = probs["colour_of_accessory"]
            else:
                p = probs[key]
            if key in forced or rng.random() < p * damp:
                self.say.add(key)
        # An accessory colour is only said together with the accessory.
        for acc in ACCESSORIES:
            if f"{acc}_colour" in self.say:
                self.say.add(acc)
        # A lower-garment colour needs the garment noun ("black trousers").
        if "lower_colour" in self.say:
            self.say.add("lower")
        gender = attrs.get("gender") if "gender" in self.say else None
        self.gender = gender
        self.pron, self.pos = _PRONOUNS[gender]

    def word(self, options) -> str:
        return self.rng.choice(options)

    def note(self, key: str) -> None:
        self.mentioned[key] = self.attrs[key]

    # Noun phrases; each records what it mentions.
    def colour_word(self, key: str) -> str:
        self.note(key)
        if key == "hair_colour":
            return self.word(HAIR[self.attrs[key]].words)
        return self.word(COLOURS[self.attrs[key]].words)

    def subject(self) -> str:
        if self.gender is None:
            return self.word(("a person", "a pedestrian", "this person", "the pedestrian"))
        self.note("gender")
        words = list(_GENDER_WORDS[self.gender])
        noun = self.word(words)
        if "build" in self.say:
            self.note("build")
            noun = f"{self.word(_BUILD_WORDS[self.attrs['build']])} {noun}"
        det = self.word(("a", "a", "the", "this"))
        return f"{_article(noun) if det == 'a' else det} {noun}"

    def hair(self) -> tuple[str | None, str | None]:
        """The words for hair length and hair colour (None where not mentioned)."""
        length = colour = None
        if "hair_length" in self.say:
            self.note("hair_length")
            length = self.word(_HAIR_LENGTH_WORDS[self.attrs["hair_length"]])
        if "hair_colour" in self.say:
            colour = self.colour_word("hair_colour")
        return length, colour

    @staticmethod
    def hair_np(length: str | None, colour: str | None) -> str | None:
        parts = [w for w in (length, colour) if w]
        return f"{' '.join(parts)} hair" if parts else None

    def upper(self) -> str | None:
        has_type, has_colour = "upper" in self.say, "upper_colour" in self.say
        if not (has_type or has_colour):
            return None
        garment = UPPER[self.attrs["upper"]]
        if has_type:
            self.note("upper")
            words = garment.words + (garment.woman_words if self.attrs.get("gender") == "woman" else ())
            noun = self.word(words)
        else:
            noun = self.word(("top", "upper garment"))
        phrase = f"{self.colour_word('upper_colour')} {noun}" if has_colour else noun
        return _with_article(phrase)

    def lower(self) -> str | None:
        if "lower" not in self.say:
            return None
        garment = LOWER[self.attrs["lower"]]
        self.note("lower")
        noun = self.word(garment.words)
        phrase = f"{self.colour_word('lower_colour')} {noun}" if "lower_colour" in self.say else noun
        return phrase if garment.plural else _with_article(phrase)

    def shoes(self) -> str | None:
        if "shoe_colour" not in self.say:
            return None
        return f"{self.colour_word('shoe_colour')} {self.word(_SHOE_WORDS)}"

    def accessory(self, acc: str) -> str | None:
        if acc not in self.say:
            return None
        self.note(acc)
        noun = self.word(_ACC_WORDS[acc])
        colour = self.colour_word(f"{acc}_colour") if f"{acc}_colour" in self.say else None
        if acc == "glasses":
            if colour is None:
                return self.word(("glasses", "a pair of glasses", "eyeglasses"))
            return self.word((f"{colour}-framed glasses", f"a pair of {colour} {noun}", f"{colour} {noun}"))
        return _with_article(f"{colour} {noun}" if colour else noun)

    # Sentences.
    def _list(self, items: list[str]) -> str:
        if len(items) == 1:
            return items[0]
        if len(items) == 2:
            return f"{items[0]} and {items[1]}"
        return ", ".join(items[:-1]) + self.word((" and ", ", and ")) + items[-1]

    def cuhk(self) -> str:
        rng = self.rng
        pron = self.pron
        clothes = [p for p in (self.upper(), self.lower()) if p]
        if len(clothes) == 2 and rng.random() < 0.3:
            clothes.reverse()  # word-order variation: lower garment first
        shoes = self.shoes()
        shoes_inline = shoes is not None and rng.random() < 0.5
        if shoes_inline:
            clothes.append(shoes)
        hair_length, hair_colour = self.hair()
        hair = self.hair_np(hair_length, hair_colour)
        subject = self.subject()
        sentences = []
        hair_inline = hair is not None and rng.random() < 0.45
        if clothes:
            verb = self.word(("is wearing", "wears", "is dressed in", "has on"))
            head = f"{subject} with {hair}" if hair_inline else subject
            sentences.append(f"{head} {verb} {self._list(clothes)}.")
        elif hair is not None:
            hair_inline = True
            sentences.append(f"{subject} has {hair}.")
        else:
            sentences.append(f"{subject} {self.word(('is walking', 'is standing', 'can be seen'))} on the street.")
        rest = []
        if hair is not None and not hair_inline:
            if hair_length and hair_colour and rng.random() < 0.4:
                rest.append(f"{self.pos} hair is {hair_length} and {hair_colour}.")
            else:
                rest.append(f"{pron} has {hair}.")
        if shoes is not None and not shoes_inline:
            colour = shoes.split()[:-1]
            rest.append(self.word((f"{pron} has {shoes} on.", f"{self.pos} shoes are {' '.join(colour)}.", f"{pron} is wearing {shoes}.")))
        carried = [p for p in (self.accessory("backpack"), self.accessory("handbag")) if p]
        worn = [p for p in (self.accessory("hat"), self.accessory("glasses")) if p]
        if carried:
            verb = self.word(("is carrying", "carries", "has"))
            rest.append(f"{pron} {verb} {self._list(carried)}.")
        if worn:
            verb = self.word(("is wearing", "wears", "also wears"))
            rest.append(f"{pron} {verb} {self._list(worn)}.")
        if "view" in self.say:
            if self.attrs["view"] == "back":
                rest.append(self.word((f"{pron} is walking away from the camera.", f"{pron} is seen from behind.")))
            else:
                rest.append(self.word((f"{pron} is facing the camera.", f"{pron} is walking towards the camera.")))
        rng.shuffle(rest)
        return " ".join(_cap(s) for s in sentences + rest)

    def coarse(self) -> str:
        rng = self.rng
        subject = self.subject()
        if subject.startswith(("this ", "the ")):
            subject = "a " + subject.split(" ", 1)[1]
        parts = [subject]
        hair = self.hair_np(*self.hair())
        if hair is not None:
            parts.append(f"with {hair}")
        clothes = [p for p in (self.upper(), self.lower()) if p]
        shoes = self.shoes()
        if shoes:
            clothes.append(shoes)
        if clothes:
            parts.append(f"{self.word(('in', 'wearing'))} {' and '.join(clothes)}")
        acc = [p for p in (self.accessory(a) for a in ACCESSORIES) if p]
        activity = self.word(_ACTIVITIES)
        if acc and rng.random() < 0.5:
            parts.append(f"{activity} with {' and '.join(acc)}")
        else:
            if acc:
                parts.append(f"with {' and '.join(acc)}")
            parts.append(activity)
        return " ".join(parts)


def describe(
    attrs: Mapping[str, object],
    rng: random.Random,
    style: str = "cuhk",
    require: tuple[str, ...] | frozenset[str] = (),
    words: tuple[int, int] | None = None,
) -> Caption:
    """Caption the visible attributes of one image.

    Args:
        attrs: the visible attributes (keys of :data:`ATTRIBUTES`, plus ``view``: "front"/"back").
        rng: the caption's random stream.
        style: "cuhk" (CUHK-PEDES-like sentences) or "coarse" (one MALS-like generated line).
        require: attribute keys the caption must mention (the defect injector forces the
            attributes it changed).
        words: the word-count range; default :data:`BENCH_WORDS` for "cuhk" and
            :data:`POOL_WORDS` for "coarse".

    Returns:
        A :class:`Caption` whose word count is within ``words``.
    """
    if style not in _MENTION:
        raise ValueError(f"unknown caption style {style!r}")
    lo, hi = words or (BENCH_WORDS if style == "cuhk" else POOL_WORDS)
    missing = [k for k in require if k not in attrs]
    if missing:
        raise ValueError(f"cannot require attributes that are not visible: {missing}")
    forced = set(require)
    damp = 1.0
    best: Caption | None = None
    for _ in range(12):
        comp = _Composer(attrs, rng, style, forced, damp)
        text = comp.cuhk() if style == "cuhk" else comp.coarse()
        n = len(text.split())
        caption = Caption(text, dict(comp.mentioned))
        if lo <= n <= hi:
            return caption
        best = caption
        if n < lo:
            # Too short: mention one more visible attribute next time.
            left = sorted(k for k in attrs if k not in forced and k in ATTRIBUTES)
            if left:
                forced.add(rng.choice(left))
            else:
                break
        else:
            # Too long: mention fewer optional attributes next time.
            damp *= 0.7
    # Still outside the range: pad a short caption with attribute-free sentences, or cut a
    # long one at a sentence end (never dropping a forced mention, which sits early).
    assert best is not None
    text, mentioned = best.text, best.mentioned
    pron = _cap(_PRONOUNS[mentioned.get("gender")][0])  # type: ignore[index]
    k = 0
    while len(text.split()) < lo:
        filler = _FILLERS[k % len(_FILLERS)].format(P=pron)
        text = f"{text}. {filler}" if style == "coarse" and k == 0 else f"{text} {filler}"
        k += 1
    if len(text.split()) > hi:
        text = " ".join(text.split()[:hi])
    return Caption(text, mentioned)


_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokens(caption: str) -> list[str]:
    """CUHK-PEDES ``processed_tokens`` of a caption: lower-case words without punctuation."""
    return _TOKEN.findall(caption.lower())


# APTM/MALS attribute labels: 27 binary attributes in APTM's order; each value is 0 (the
# first prompt of the pair holds), 1 (the second holds) or -1 (unknown).
_APTM_UPPER_COLOURS = ("black", "white", "red", "purple", "yellow", "blue", "green", "gray")
_APTM_LOWER_COLOURS = ("black", "white", "purple", "yellow", "blue", "green", "pink", "gray", "brown")
APTM_LABEL_SIZE = 10 + len(_APTM_UPPER_COLOURS) + len(_APTM_LOWER_COLOURS)


def aptm_label(mentioned: Mapping[str, object]) -> list[int]:
    """The 27-value APTM/MALS attribute label of a caption, from what the caption states.

    Like MALS, the label annotates the image-text pair from its text: attributes the caption
    does not state are -1, so the label never carries ground truth the caption does not.

    Args:
        mentioned: :attr:`Caption.mentioned`.

    Returns:
        27 ints in APTM's order: gender (woman 0 / man 1), age (always -1), hair (short 0 /
        long 1), hat, backpack, handbag, bag (with 0 / without 1), sleeves (long 0 / short 1),
        lower length (long 0 / short 1), lower kind (skirt 0 / trousers 1), then "wears colour
        c" (0) or not (1) for 8 upper and 9 lower basic colours.
    """
    label = [-1] * APTM_LABEL_SIZE
    if "gender" in mentioned:
        label[0] = 0 if mentioned["gender"] == "woman" else 1
    if "hair_length" in mentioned:
        label[2] = 0 if mentioned["hair_length"] == "short" else 1
    for i, acc in ((3, "hat"), (4, "backpack"), (5, "handbag")):
        if acc in mentioned:
            label[i] = 0
    if "backpack" in mentioned or "handbag" in mentioned:
        label[6] = 0
    if "upper" in mentioned:
        length = UPPER[str(mentioned["upper"])].length
        label[7] = 0 if length == "long" else 1
    if "lower" in mentioned:
        garment = LOWER[str(mentioned["lower"])]
        label[8] = 0 if garment.length == "long" else 1
        label[9] = 0 if garment.skirt else 1
    if "upper_colour" in mentioned:
        basic = COLOURS[str(mentioned["upper_colour"])].basic
        for j, c in enumerate(_APTM_UPPER_COLOURS):
            label[10 + j] = 0 if c == basic else 1
    if "lower_colour" in mentioned:
        basic = COLOURS[str(mentioned["lower_colour"])].basic
        for j, c in enumerate(_APTM_LOWER_COLOURS):
            label[18 + j] = 0 if c == basic else 1
    return label
