"""Caption perturbations (hard negatives) on real-looking TBPS captions, and on captions they cannot change."""

from __future__ import annotations

import random

import pytest

from tbps.data.perturb import RULES, hard_negatives, perturb, replace_colour, swap_colours, swap_garments

CUHK = "The man is wearing a black jacket, blue jeans and white shoes. He carries a red backpack."
ICFG = "A young woman with long black hair, wearing a white T-shirt, a pink skirt and brown sandals."
RSTP = "The woman wears a gray coat and black trousers, and she is carrying a pink bag on her left shoulder."
MALS = "a female with long hair in a gray upper garment with a white shoulder bag walking down the street"
NO_COLOUR = ["A person walking down the street.", "", "a man with a bag and a hat", "   "]


def _rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


@pytest.mark.parametrize(
    ("rule", "caption", "expected"),
    [
        (swap_colours, "a red coat and black trousers", "a black coat and red trousers"),
        (swap_garments, "a red coat and black trousers", "a red trousers and black coat"),
        (swap_colours, "A Red coat, BLACK pants", "A Black coat, RED pants"),  # the case of each word is kept
        (swap_garments, "a long red dress and a short black jacket", "a long red jacket and a short black dress"),
    ],
)
def test_rules_by_hand(rule, caption, expected):
    assert rule(caption, _rng()) == expected


@pytest.mark.parametrize(
    ("rule", "caption"),
    [
        (swap_colours, "a red coat"),  # one coloured garment: nothing to swap with
        (swap_colours, "a red coat and red trousers"),  # the same colour: a swap changes nothing
        (swap_colours, "a grey coat and gray trousers"),  # spellings of one colour
        (swap_garments, "black hair and a red coat"),  # hair is no garment
        (replace_colour, "a man with a bag"),
    ],
)
def test_rules_that_find_nothing_to_change_give_none(rule, caption):
    assert rule(caption, _rng()) is None


def test_replace_colour_changes_one_colour_word_to_another_colour():
    out = replace_colour("a red coat", _rng(3))
    assert out != "a red coat" and out.endswith(" coat") and out.split()[1] not in ("red",)


@pytest.mark.parametrize("caption", [CUHK, ICFG, RSTP, MALS])
def test_real_captions_get_a_different_caption_from_a_known_rule(caption):
    out, rule = perturb(caption)
    assert out != caption and rule in RULES
    # Only words change: the caption keeps its length in words and its punctuation.
    assert len(out.split()) == len(caption.split()) and [c for c in out if not c.isalpha()] == [c for c in caption if not c.isalpha()]


@pytest.mark.parametrize("caption", NO_COLOUR)
def test_captions_without_a_colour_cannot_be_perturbed(caption):
    assert perturb(caption) is None


def test_perturbations_are_seeded_by_the_caption_and_the_seed():
    assert perturb(CUHK, seed=1) == perturb(CUHK, seed=1)
    outputs = {perturb(CUHK, seed=s) for s in range(20)}
    assert len(outputs) > 1  # other seeds choose other rewrites
    assert hard_negatives([CUHK, NO_COLOUR[0], RSTP], seed=1) == [perturb(CUHK, 1)[0], None, perturb(RSTP, 1)[0]]


def test_every_output_differs_from_its_input_over_many_captions():
    rng = random.Random(0)
    words = ["red", "black", "coat", "jeans", "shoes", "a", "and", "with", "man", "bag", "white", "hair", "long", "grey", "gray"]
    for _ in range(500):
        caption = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        res = perturb(caption, seed=rng.randint(0, 9))
        assert res is None or res[0] != caption


def test_rules_can_be_chosen_and_an_unknown_one_is_refused():
    out, rule = perturb("a red coat and black trousers", rules=["replace-colour"])
    assert rule == "replace-colour"
    with pytest.raises(ValueError, match="unknown perturbation rules"):
        perturb(CUHK, rules=["shuffle"])
