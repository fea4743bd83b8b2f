"""``tbps train --itm-head --hard-negatives``: the losses, the batch's negatives, the saved head, scoring with the run."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from tbps import columns as C
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.errors import UsageError
from tbps.models import load
from tbps.models.runs import HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE
from tbps.train.data import Collate
from tbps.train.loop import TrainConfig, train
from tbps.train.loss import clip_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_negative_columns_join_the_image_side_only_and_invalid_ones_count_for_nothing():
    torch.manual_seed(0)
    img, txt, neg = (torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(10.0)
    plain = clip_loss(img, txt, scale)
    none_valid = clip_loss(img, txt, scale, neg, torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(plain, none_valid)
    logits = scale * img @ txt.T
    by_hand = (torch.nn.functional.cross_entropy(torch.cat([logits, scale * img @ neg.T], dim=1), torch.arange(4))
               + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(clip_loss(img, txt, scale, neg, torch.ones(4, dtype=torch.bool)), by_hand)
    assert clip_loss(img, txt, scale, neg) > plain  # more negatives: a harder task


def test_a_batch_carries_each_captions_perturbation_and_which_rows_have_one(tiny_clip):
    collate = Collate(tiny_clip.tokenizer, hard_negatives=True, seed=0)
    items = [(torch.zeros(3, 4, 4), c, i, 0, []) for i, c in enumerate(["a man in a red coat and black trousers", "a person walking"])]
    batch = collate(items)
    assert batch.negative_valid.tolist() == [True, False]
    assert batch.negatives.shape == batch.tokens.shape
    assert not torch.equal(batch.negatives[0], batch.tokens[0]) and torch.equal(batch.negatives[1], batch.tokens[1])
    assert Collate(tiny_clip.tokenizer)(items).negatives is None


def test_hard_negatives_need_the_clip_loss(tmp_path):
    with pytest.raises(UsageError, match="clip loss"):
        TrainConfig(out=str(tmp_path / "r"), model="tbps-tiny", data="x", loss="sdm", hard_negatives=True)


@pytest.fixture(scope="module")
def head_run(synth_world, tmp_path_factory):
    world = synth_world(0, pool_size=24)
    out = tmp_path_factory.mktemp("itm") / "run"
    cfg = TrainConfig(out=str(out), model="tbps-tiny", data=str(world / "pool" / "pool.json"), train_split=None, adapter="lora", steps=3,
                      batch_size=8, workers=0, precision="fp32", device="cpu", warmup=1, log_every=1, itm_head=True, hard_negatives=True,
                      lr=1e-3)
    return world, out, train(cfg)


def test_a_run_with_a_head_saves_it_and_loads_with_it(head_run):
    world, out, result = head_run
    assert result.steps == 3
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"]["itm_head"] > 0 and record["config"]["itm_head"] and record["config"]["hard_negatives"]
    for name in ("last",):
        assert (out / name / HEAD_CONFIG_FILE).is_file() and (out / name / HEAD_WEIGHTS_FILE).is_file()
    loaded = load(str(out))
    assert loaded.has_pair_score
    fresh = load("tbps-tiny", seed=0)
    torch.manual_seed(0)
    untrained = fresh.attach_itm_head()
    trained = dict(loaded.itm_head.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in untrained.named_parameters())  # the head trained


def test_scoring_with_the_run_writes_its_itm_score(head_run, tmp_path):
    world, out, _ = head_run
    cfg = ScoreConfig(data=str(world / "pool" / "pool.json"), model=str(out), bank=str(world / "benchmark" / "reid_raw.json"),
                      bank_split="all", out=str(tmp_path / "s"), precision="fp32", workers=0, batch_size=8, device="cpu")
    run_score(cfg)
    table = read_score_table(tmp_path / "s").collect()
    ok = table.filter(pl.col(C.STATUS) == C.STATUS_OK)
    assert ok[C.ITM_SCORE].null_count() == 0 and ok[C.ITM_SCORE].is_between(0.0, 1.0).all()


@pytest.mark.slow
def test_a_resumed_run_with_a_head_ends_where_an_uninterrupted_one_does(synth_world, tmp_path):
    world = synth_world(0, pool_size=24)
    base = dict(model="tbps-tiny", data=str(world / "pool" / "pool.json"), train_split=None, adapter="lora", batch_size=8, workers=0,
                precision="fp32", device="cpu", warmup=1, log_every=1, itm_head=True, hard_negatives=True, lr=1e-3, save_every=2)
    train(TrainConfig(out=str(tmp_path / "straight"), steps=4, **base))

    def crash_at_3(step: int, total: int) -> None:
        if step == 3:
            raise KeyboardInterrupt  # stopped after step 3: RUN/last holds step 2 (its head too)

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), steps=4, **base), progress=crash_at_3)
    train(TrainConfig(out=str(tmp_path / "resumed"), steps=4, resume=True, **base))
    a, b = load(str(tmp_path / "straight")), load(str(tmp_path / "resumed"))
    for (n, p), (_, q) in zip(a.itm_head.named_parameters(), b.itm_head.named_parameters()):
        assert torch.equal(p, q), n
