"""The image-text matching head: token features, hard negatives, the loss, scoring, saving."""

from __future__ import annotations

import copy

import pytest
import torch

from tbps.errors import TbpsError
from tbps.models import load
from tbps.models.encode import embed_image_batch, embed_image_batch_with_state, pair_scores
from tbps.models.itm import COSINE_OFFSET, COSINE_SCALE, HEAD_LR_SCALE, HeadConfig, MatchingHead, count_head_parameters, hardest_negatives, itm_loss
from tbps.models.openclip import image_token_features, text_token_features
from tbps.train.loop import TrainConfig, _optimizer

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


def test_a_new_head_starts_as_the_cosine_and_learns_faster(model):
    pixels, tokens = _pixels(model, 3), model.tokenizer(CAPTIONS[:3])
    torch.manual_seed(0)
    head = model.attach_itm_head().eval()
    assert head.config.cosine
    with torch.no_grad():
        probs = model.pair_score(pixels, tokens)
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    cosine = (image * text).sum(dim=-1)
    assert torch.allclose(probs, torch.sigmoid(COSINE_SCALE * (cosine - COSINE_OFFSET)), atol=1e-5)
    with pytest.raises(ValueError, match="pass cosine"):
        head(torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 4, 128))
    # A head saved before the cosine term (no "cosine" in its config) rebuilds without it.
    old = MatchingHead(HeadConfig(**{k: v for k, v in head.config.to_dict().items() if k != "cosine"}))
    assert not hasattr(old, "cosine_scale") and old(torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 4, 128)).shape == (1,)
    optimizer = _optimizer(torch.nn.ModuleDict({"clip": model.model, "head": head}), TrainConfig(out="unused", model="tbps-tiny", data="unused", lr=1e-4), head=head)
    in_head = {id(p) for p in head.parameters()}
    for group in optimizer.param_groups:
        fast = {id(p) in in_head for p in group["params"]}
        assert len(fast) == 1 and group["lr"] == pytest.approx(1e-4 * (HEAD_LR_SCALE if fast.pop() else 1))


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


def test_scoring_with_the_image_state_runs_the_image_tower_once(model):
    """itm_score reuses the embedding pass's image tokens: the same probabilities, one image-tower pass."""
    torch.manual_seed(0)
    model.attach_itm_head().eval()
    torch.nn.init.normal_(model.itm_head.logit.weight, std=0.3)
    pixels, device = _pixels(model, 3), torch.device("cpu")
    captions, index = CAPTIONS[:3] + CAPTIONS[:1], [0, 1, 2, 2]
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        emb, state = embed_image_batch_with_state(model, pixels, device=device, dtype=None)
        reused = pair_scores(model, None, captions, index, device=device, dtype=None, image_state=state)
        assert len(calls) == 1
        again = pair_scores(model, pixels, captions, index, device=device, dtype=None)
        assert len(calls) == 2
    finally:
        hook.remove()
    assert torch.allclose(emb, embed_image_batch(model, pixels, device=device, dtype=None), atol=1e-6)
    assert reused == pytest.approx(again, abs=1e-6) and len({round(float(p), 4) for p in reused}) > 1
