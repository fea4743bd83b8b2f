"""The Hugging Face transformers family on tiny random models saved with ``save_pretrained``.

Each architecture's scores (ITC cosine, BLIP-2's max over query embeddings, the ITM match
probability) must equal a direct transformers forward on the same pixels and captions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from _hf_models import CAPTIONS, CONTEXT, PAD, WORDS, _save, _tokenizer  # noqa: E402

from tbps.errors import TbpsError  # noqa: E402
from tbps.models import load  # noqa: E402
from tbps.models.hf import ARCHITECTURES, HfModel, split_tokens  # noqa: E402
from tbps.models.protocol import pair_similarity, similarity  # noqa: E402

@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace("-", ""))
    return request.param, _save(request.param, path), path


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _reference_itc(kind: str, model, pixels: torch.Tensor, enc) -> torch.Tensor:
    """Cosine of every image with every caption, from the model's own forward."""
    with torch.no_grad():
        if kind == "clip":
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
            return out.logits_per_image / model.logit_scale.exp()
        if kind == "siglip":
            out = model(input_ids=enc["input_ids"], pixel_values=pixels)
            return (out.logits_per_image - model.logit_bias) / model.logit_scale.exp()
        if kind == "blip":
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels, use_itm_head=False).itm_score
        return model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     use_image_text_matching_head=False).logits_per_image


def test_itc_scores_equal_a_direct_transformers_forward(saved):
    kind, model, path = saved
    loaded = load(f"hf:{path}")
    assert isinstance(loaded, HfModel) and loaded.family == "hf" and loaded.image_size == (32, 32)
    pixels = _pixels()
    padding = "max_length" if kind == "siglip" else True
    enc = _tokenizer()(CAPTIONS, padding=padding, max_length=CONTEXT, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = torch.nn.functional.normalize(loaded.encode_image(pixels).view(len(pixels), loaded.image_vectors, -1), dim=-1).flatten(1)
        txt = torch.nn.functional.normalize(loaded.encode_text(loaded.tokenizer(CAPTIONS)), dim=-1)
    ours = similarity(img, txt, loaded.image_vectors)
    ref = _reference_itc(kind, model, pixels, enc)
    assert ours.shape == (3, len(CAPTIONS)) and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # The pair form agrees with the matrix's diagonal.
    n = min(len(pixels), len(CAPTIONS))
    assert torch.allclose(pair_similarity(img[:n], txt[:n], loaded.image_vectors), ours[:n, :n].diagonal(), atol=1e-6)
    assert txt.shape[1] == loaded.embed_dim


def test_itm_scores_equal_a_direct_transformers_forward(saved):
    kind, model, path = saved
    loaded = load(f"hf:{path}")
    assert loaded.has_pair_score is ARCHITECTURES[kind].itm
    pixels, captions = _pixels(3), CAPTIONS[:3]
    if not loaded.has_pair_score:
        with pytest.raises(TbpsError, match="no image-text matching head"):
            loaded.pair_score(pixels, loaded.tokenizer(captions))
        return
    enc = _tokenizer()(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = loaded.pair_score(pixels, loaded.tokenizer(captions))
        if kind == "blip":
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels, use_itm_head=True).itm_score
        else:
            logits = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           use_image_text_matching_head=True).logits_per_image
    ref = logits.softmax(dim=-1)[:, 1]
    assert ours.shape == (3,) and torch.allclose(ours, ref, atol=1e-4)
    assert ((0 <= ours) & (ours <= 1)).all()
    # From the embedding pass's state (the vision tower run once): the same ITC features and probabilities.
    index = torch.tensor([2, 0, 2])
    with torch.no_grad():
        features, state = loaded.encode_image_state(pixels)
        assert torch.allclose(features, loaded.encode_image(pixels), atol=1e-6)
        reused = loaded.pair_score(None, loaded.tokenizer(captions), index, image_state=state)
        direct = loaded.pair_score(pixels[index], loaded.tokenizer(captions))
    assert torch.allclose(reused, direct, atol=1e-5)


def test_tokens_carry_the_mask_and_batch_by_length(saved):
    kind, _, path = saved
    loaded = load(f"hf:{path}")
    tokens = loaded.tokenizer(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), CONTEXT) and tokens.dtype == torch.int64
    ids, mask = split_tokens(tokens, pad_id=PAD)
    enc = _tokenizer()(CAPTIONS, padding=True, return_tensors="pt")
    if kind != "siglip":
        assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
        assert torch.equal(loaded.text_lengths(tokens), enc["attention_mask"].sum(dim=1))
        # Embedding a caption alone or beside a longer one gives the same embedding (the mask hides the padding).
        with torch.no_grad():
            alone = loaded.encode_text(loaded.tokenizer(CAPTIONS[2:3]))
            batched = loaded.encode_text(tokens)[2:3]
        assert torch.allclose(alone, batched, atol=1e-5)
    else:
        assert loaded.text_lengths(tokens) is None and (tokens > 0).all()  # padded to the context, no mask
    long = " ".join(WORDS)
    assert loaded.caption_too_long(long) and not loaded.caption_too_long(CAPTIONS[0])


def test_a_saved_model_loads_back_with_the_same_embeddings(saved, tmp_path):
    kind, _, path = saved
    loaded = load(f"hf:{path}")
    out = loaded.save(tmp_path / "copy", extra={"note": "test"})
    again = load(f"hf:{out}")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(_pixels()), again.encode_image(_pixels()))
    assert json.loads((out / "tbps.json").read_text())["note"] == "test"


def test_training_is_offered_for_dual_encoders_only(saved):
    kind, _, path = saved
    loaded = load(f"hf:{path}")
    if kind in ("clip", "siglip"):
        module = loaded.training_module()
        image, text, scale = module(_pixels(2), loaded.tokenizer(CAPTIONS[:2]))
        assert image.shape == text.shape and torch.allclose(image.norm(dim=-1), torch.ones(2)) and scale.numel() == 1
        assert {id(p) for p in module.parameters()} == {id(p) for p in loaded.model.parameters()}
    else:
        with pytest.raises(TbpsError, match="for scoring"):
            loaded.training_module()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "not a transformers model directory"),
        (lambda d: transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=8).save_pretrained(d), "unsupported transformers architecture 'bert'"),
    ],
)
def test_a_directory_of_no_or_another_architecture_is_one_clear_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(TbpsError, match=message):
        load(f"hf:{tmp_path}")


def _in_subprocess(cache, code: str) -> str:
    """Run ``code`` in a fresh interpreter whose Hugging Face cache is ``cache`` (read once, at import)."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def _hub_snapshot(cache, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> snapshots/<rev>/FILES."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


_EMBED = ("import torch\nfrom tbps.models import load\nfrom tbps.errors import TbpsError\n"
          "for spec in {specs!r}:\n"
          "    try:\n        m = load(spec)\n    except TbpsError as e:\n        print('error', str(e).splitlines()[0]); continue\n"
          "    px = torch.randn(2, 3, *m.image_size, generator=torch.Generator().manual_seed(1))\n"
          "    with torch.no_grad():\n        print(m.family, repr(m.encode_image(px).double().sum().item()), m.preprocess.stats)\n")


@pytest.mark.slow
def test_hub_ids_load_from_the_local_cache_and_a_missing_one_is_one_clear_error(tmp_path, tiny_clip):
    import open_clip
    from safetensors.torch import save_file

    src = tmp_path / "src"
    _save("clip", src)
    cache = tmp_path / "cache"
    _hub_snapshot(cache, "tbps/tiny-clip", {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
    config = {"model_cfg": open_clip.get_model_config("tbps-tiny"), "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, weights)
    _hub_snapshot(cache, "tbps/tiny-openclip", {"open_clip_config.json": json.dumps(config).encode(),
                                                "open_clip_model.safetensors": weights.read_bytes()})
    # One interpreter for every spec: huggingface_hub reads its cache location once, at import.
    specs = ("hf:tbps/tiny-clip", f"hf:{src}", "hf-hub:tbps/tiny-openclip", "hf:nobody/no-such-model", "hf:", "hf-hub:nobody/no-such-model")
    from_hub, from_dir, openclip_hub, *errors = _in_subprocess(cache, _EMBED.format(specs=specs)).splitlines()
    assert from_hub.startswith("hf ") and from_hub == from_dir  # the cached copy and the directory: the same model
    family, total, stats = openclip_hub.split(" ", 2)
    pixels = torch.randn(2, 3, *tiny_clip.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_clip.model.encode_image(pixels).double().sum().item()
    assert family == "open_clip" and float(total) == pytest.approx(expected, abs=1e-4)
    assert stats == "([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])"  # the Hub config's normalisation, not the defaults
    assert ["not available offline" in errors[0], "names no model" in errors[1], "not available offline" in errors[2]] == [True] * 3
