"""The image-text matching head: token features, hard negatives, the loss, scoring, saving."""

from __future__ import annotations

import copy

import pytest
import torch

from tbps.errors import TbpsError
from tbps.models import load
from tbps.models.itm import HeadConfig, MatchingHead, count_head_parameters, hardest_negatives, itm_loss
from tbps.models.openclip import image_token_features, text_token_features

CAPTIONS = ["a man in a red coat and black trousers", "a woman with a blue bag", "white shoes", "a person"]


@pytest.fixture(scope="module")
def _base():
    return load("tbps-tiny", seed=0)


@pytest.fixture()
def model(_base):
    return copy.deepcopy(_base)  # each test attaches its own head


def _pixels(loaded, n=4):
    return torch.randn(n, 3, *loaded.image_size, generator=torch.Generator().manual_seed(0))


def test_token_features_pool_to_the_plain_embeddings(model):
    pixels, tokens = _pixels(model), model.tokenizer(CAPTIONS)
    with torch.no_grad():
        pooled, patches = image_token_features(model.model, pixels)
        assert torch.allclose(pooled, model.encode_image(pixels), atol=1e-6)
        assert patches.shape[0] == 4 and patches.shape[2] == model.model.visual.transformer.width
        text, feats, mask = text_token_features(model.model, tokens)
        assert torch.allclose(text, model.encode_text(tokens), atol=1e-5)
    lengths = tokens.argmax(dim=-1) + 1  # start token through end-of-text
    assert torch.equal(mask.sum(dim=1), lengths) and feats.shape[:2] == mask.shape
    assert model.model.visual.output_tokens is False  # the switch is put back


def test_hardest_negatives_skip_the_same_person():
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.9, 0.6], [0.2, 0.95, 0.9]])
    t, i = hardest_negatives(sims)
    assert t.tolist() == [1, 0, 1] and i.tolist() == [1, 2, 1]
    # Images 0 and 1 are one person: their captions are not each other's negatives.
    t, i = hardest_negatives(sims, torch.tensor([7, 7, 3]))
    assert t.tolist() == [2, 2, 1] and i.tolist() == [2, 2, 1]
    t, i = hardest_negatives(sims[:2, :2], torch.tensor([5, 5]))
    assert t.tolist() == [-1, -1] and i.tolist() == [-1, -1]  # no other person in the batch: no negative


def test_itm_loss_by_hand():
    pos, neg1, neg2 = torch.tensor([2.0, 0.0]), torch.tensor([-1.0]), torch.tensor([0.5, -0.5])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * bce(pos, torch.ones(2)) + 0.5 * (bce(neg1, torch.zeros(1)) + bce(neg2, torch.zeros(2))) / 2
    assert torch.allclose(itm_loss(pos, [neg1, neg2, torch.empty(0)]), expected)
    assert torch.allclose(itm_loss(pos, []), bce(pos, torch.ones(2)))


def test_the_head_depends_on_which_image_and_which_words():
    torch.manual_seed(0)
    head = MatchingHead(HeadConfig(text_width=8, image_width=6, width=16, layers=1, heads=2))
    text, image = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    logits = head(text, mask, image)
    assert logits.shape == (2,)
    # Padding is pooled out: changing a padded token's features changes nothing.
    changed = text.clone()
    changed[1, 4] += 10
    assert torch.allclose(head(changed, mask, image), logits)
    assert not torch.allclose(head(text, mask, image.flip(0)), logits)  # another image, another score
    assert count_head_parameters(head) == sum(p.numel() for p in head.parameters()) > 0


def test_pair_scores_index_images_and_need_a_head(model):
    pixels, tokens = _pixels(model, 3), model.tokenizer(CAPTIONS[:3])
    with pytest.raises(TbpsError, match="no image-text matching head"):
        model.pair_score(pixels, tokens)
    assert not model.has_pair_score
    torch.manual_seed(0)
    model.attach_itm_head().eval()
    assert model.has_pair_score
    with torch.no_grad():
        aligned = model.pair_score(pixels, tokens)
        index = torch.tensor([2, 2, 0])
        indexed = model.pair_score(pixels, tokens, index)
        expanded = model.pair_score(pixels[index], tokens)
    assert aligned.shape == (3,) and ((aligned > 0) & (aligned < 1)).all()
    assert torch.allclose(indexed, expanded, atol=1e-6)


def test_the_training_forward_trains_the_head_and_the_towers(model):
    torch.manual_seed(0)
    model.attach_itm_head()
    module = model.training_module()
    pixels, tokens = _pixels(model), model.tokenizer(CAPTIONS)
    negatives = model.tokenizer(["a man in a black coat and red trousers"])  # row 0's caption, perturbed
    image, text, scale, loss, neg_text = module(pixels, tokens, torch.tensor([0, 1, 2, 3]), negatives, torch.tensor([True]))
    assert image.shape == text.shape == (4, model.embed_dim) and neg_text.shape == (1, model.embed_dim)
    with torch.no_grad():
        assert torch.allclose(image, torch.nn.functional.normalize(model.encode_image(pixels), dim=-1), atol=1e-5)
    loss.backward()
    assert model.itm_head.logit.weight.grad.abs().sum() > 0
    assert model.model.visual.conv1.weight.grad.abs().sum() > 0  # the head's loss reaches the image tower
    assert {id(p) for p in module.parameters()} == {id(p) for p in model.model.parameters()} | {id(p) for p in model.itm_head.parameters()}


def test_an_exported_model_keeps_its_head(model, tmp_path):
    torch.manual_seed(0)
    model.attach_itm_head().eval()
    path = model.save(tmp_path / "m.pt")
    again = load(str(path))
    assert again.has_pair_score and again.itm_head.config == model.itm_head.config
    pixels, tokens = _pixels(model, 2), model.tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(again.pair_score(pixels, tokens), model.pair_score(pixels, tokens))
