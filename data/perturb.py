"""Caption perturbations: hard negatives made by rewriting a caption's attributes.

A dual encoder's cosine behaves much like a bag of words: "a red coat and black trousers" and
"a black coat and red trousers" embed alike (Yuksekgonul et al., ICLR 2023). NegCLIP's remedy is
to train against such rewrites as negatives. The rules here work on the words of real TBPS
captions (CUHK-PEDES, ICFG-PEDES, RSTPReid, MALS), not on the synthetic world's internals:

``swap-colours``   two colour-and-garment phrases exchange their colours
                   ("a red coat and black trousers" -> "a black coat and red trousers")
``swap-garments``  two garments exchange places ("a red coat and black trousers" ->
                   "a red trousers and black coat": each colour now on the other item)
``replace-colour`` one colour word becomes another colour ("a red coat" -> "a green coat")

A rule that finds nothing to change gives None (a caption without two coloured garments cannot
have its colours swapped); :func:`perturb` tries the rules in a seeded order and returns the
first that applies, or None when none does. Every output differs from its input. The choices
are seeded by the caption's text and the seed, so a caption's negative is the same in every run
and on every rank.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

COLOURS = (
    "black", "white", "gray", "grey", "red", "blue", "green", "yellow", "brown", "pink", "purple", "orange",
    "beige", "khaki", "navy", "maroon", "violet", "tan", "cream", "silver", "golden", "gold",
)
# Colours a replacement draws from (no near-synonyms of each other: "gray" for "grey" is no negative).
_REPLACEMENTS = ("black", "white", "gray", "red", "blue", "green", "yellow", "brown", "pink", "purple", "orange")
_SAME = {"grey": "gray", "gold": "golden", "navy": "blue", "maroon": "red", "violet": "purple", "tan": "brown", "khaki": "brown",
         "beige": "cream"}
GARMENTS = (
    "coat", "jacket", "shirt", "t-shirt", "tshirt", "top", "blouse", "sweater", "hoodie", "vest", "dress", "skirt", "shorts",
    "pants", "trousers", "jeans", "leggings", "shoes", "sneakers", "boots", "sandals", "socks", "hat", "cap", "scarf",
    "backpack", "bag", "handbag", "purse", "belt", "gloves", "tie", "suit", "uniform", "overcoat", "cardigan", "jumper",
)

_WORD = re.compile(r"[A-Za-z][A-Za-z\-]*")
_COLOUR_SET = frozenset(COLOURS)
_GARMENT_SET = frozenset(GARMENTS)
# A colour, then up to two modifier words, then a garment: "black leather jacket", "red and white shoes" is two colours.
_MAX_GAP = 2


@dataclass(frozen=True)
class _Word:
    start: int
    end: int
    text: str

    @property
    def lower(self) -> str:
        return self.text.lower()


def _words(caption: str) -> list[_Word]:
    return [_Word(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(caption)]


def _match_case(new: str, old: str) -> str:
    """``new`` in the case of ``old`` (``Red`` -> ``Blue``, ``RED`` -> ``BLUE``)."""
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _replace(caption: str, edits: Sequence[tuple[_Word, str]]) -> str:
    """The caption with each word's span replaced by its new text (case kept)."""
    out, last = [], 0
    for word, new in sorted(edits, key=lambda e: e[0].start):
        out += [caption[last:word.start], _match_case(new, word.text)]
        last = word.end
    return "".join(out) + caption[last:]


def _phrases(words: list[_Word]) -> list[tuple[_Word, _Word]]:
    """(colour, garment) pairs: a colour word followed within :data:`_MAX_GAP` words by a garment."""
    found = []
    for i, w in enumerate(words):
        if w.lower not in _COLOUR_SET:
            continue
        for j in range(i + 1, min(i + 2 + _MAX_GAP, len(words))):
            if words[j].lower in _GARMENT_SET:
                found.append((w, words[j]))
                break
            if words[j].lower in _COLOUR_SET:  # "red and white shoes": the first colour's garment is the second's
                continue
    return found


def _differs(a: str, b: str) -> bool:
    return _SAME.get(a.lower(), a.lower()) != _SAME.get(b.lower(), b.lower())


def swap_colours(caption: str, rng: random.Random) -> str | None:
    """Two coloured garments exchange their colours (None: fewer than two with different colours)."""
    phrases = [p for p in _phrases(_words(caption))]
    pairs = [(a, b) for i, a in enumerate(phrases) for b in phrases[i + 1:] if _differs(a[0].text, b[0].text) and a[1].lower != b[1].lower]
    if not pairs:
        return None
    (c1, _), (c2, _) = rng.choice(pairs)
    return _replace(caption, [(c1, c2.lower), (c2, c1.lower)])


def swap_garments(caption: str, rng: random.Random) -> str | None:
    """Two garments of coloured phrases exchange places (None: fewer than two different ones)."""
    phrases = _phrases(_words(caption))
    pairs = [(a, b) for i, a in enumerate(phrases) for b in phrases[i + 1:] if a[1].lower != b[1].lower and _differs(a[0].text, b[0].text)]
    if not pairs:
        return None
    (_, g1), (_, g2) = rng.choice(pairs)
    return _replace(caption, [(g1, g2.lower), (g2, g1.lower)])


def replace_colour(caption: str, rng: random.Random) -> str | None:
    """One colour word becomes a different colour (None: the caption names no colour)."""
    colours = [w for w in _words(caption) if w.lower in _COLOUR_SET]
    if not colours:
        return None
    word = rng.choice(colours)
    new = rng.choice([c for c in _REPLACEMENTS if _differs(c, word.text)])
    return _replace(caption, [(word, new)])


RULES: dict[str, Callable[[str, random.Random], str | None]] = {
    "swap-colours": swap_colours,
    "swap-garments": swap_garments,
    "replace-colour": replace_colour,
}


def _rng(caption: str, seed: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\0{caption}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def perturb(caption: str, seed: int = 0, rules: Sequence[str] = tuple(RULES)) -> tuple[str, str] | None:
    """A hard negative of ``caption``: (the rewritten caption, the rule that made it), or None.

    Args:
        caption: any caption text.
        seed: with the caption's text, seeds the rule order and the choices.
        rules: names of :data:`RULES` to try.

    Returns:
        The first rule (in a seeded order) that changes the caption, with its output; None when
        no rule applies (no colour word, for example).

    Raises:
        ValueError: an unknown rule name.
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown perturbation rules {unknown}; known: {', '.join(RULES)}")
    rng = _rng(caption, seed)
    order = list(rules)
    rng.shuffle(order)
    for name in order:
        out = RULES[name](caption, rng)
        if out is not None and out != caption:
            return out, name
    return None


def hard_negatives(captions: Sequence[str], seed: int = 0, rules: Sequence[str] = tuple(RULES)) -> list[str | None]:
    """:func:`perturb` of each caption (its text only; None where no rule applies)."""
    out = []
    for caption in captions:
        res = perturb(caption, seed, rules)
        out.append(res[0] if res else None)
    return out
