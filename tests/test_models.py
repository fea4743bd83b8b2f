"""Model specs: an open_clip config file gives a seeded random model; bad files get clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from tbps import models
from tbps.models import openclip
from tbps.models.preprocess import PedestrianTransform
from tbps.errors import TbpsError


def _config_file(tmp_path, name="my-vit", image_size=(64, 32)):
    config = open_clip.get_model_config(openclip.TINY)
    config["vision_cfg"]["image_size"] = list(image_size)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_a_config_file_gives_a_seeded_model_at_its_image_size(tmp_path):
    path = _config_file(tmp_path)
    first, again, other = models.load(str(path), seed=3), models.load(str(path), seed=3), models.load(str(path), seed=4)
    assert first.name == "my-vit"
    assert first.image_size == (64, 32)
    assert first.identity["spec"] == str(path) and first.identity["weights"] == "random(seed=3)"
    assert len(first.identity["config_sha"]) == 32
    w = [m.model.visual.conv1.weight for m in (first, again, other)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    with torch.no_grad():
        out = first.model.encode_image(torch.zeros(2, 3, 64, 32))
    assert out.shape == (2, first.embed_dim)


def test_a_checkpoint_of_a_config_file_model_loads_in_a_new_process(tmp_path):
    path = _config_file(tmp_path, name="exported-vit")
    checkpoint = models.load(str(path), seed=5).save(tmp_path / "model.pt")
    probe = (
        "import sys, torch\n"
        "from tbps import models\n"
        "m = models.load(sys.argv[1])\n"
        "print(m.name, m.image_size, float(m.model.visual.conv1.weight.sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(checkpoint)], capture_output=True, text=True, check=True).stdout.split()
    original = models.load(str(path), seed=5)
    assert out[0] == "exported-vit" and out[1:3] == ["(64,", "32)"]
    assert float(out[3]) == pytest.approx(float(original.model.visual.conv1.weight.detach().sum()), abs=1e-4)


def test_a_config_file_may_not_redefine_a_known_model(tmp_path):
    path = _config_file(tmp_path, name="ViT-B-16")  # tbps-tiny's config under a built-in name
    with pytest.raises(TbpsError, match="a different model config named 'ViT-B-16' is already known"):
        models.load(str(path))
    assert open_clip.get_model_config("ViT-B-16")["vision_cfg"]["image_size"] == 224  # untouched


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "model config file not found"),
        ("{not json", "cannot read model config"),
        ('{"embed_dim": 64}', "missing vision_cfg, text_cfg"),
        ("[1, 2]", "missing embed_dim, vision_cfg, text_cfg"),
    ],
)
def test_bad_config_files_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TbpsError, match=message):
        models.load(str(path))


@pytest.mark.parametrize(
    ("mode", "size"),
    [("RGB", (32, 96)), ("RGB", (50, 130)), ("RGB", (17, 40)), ("L", (32, 96)), ("RGBA", (64, 64)), ("P", (33, 97))],
)
def test_preprocess_equals_torchvision_bit_for_bit(mode, size):
    from PIL import Image
    from torchvision import transforms as T

    rng = np.random.default_rng(sum(size))
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    loaded = models.load(openclip.TINY)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    reference = T.Compose([T.Resize(loaded.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.ToTensor(), T.Normalize(mean, std)])
    ours = PedestrianTransform(loaded.image_size, mean, std)(im)
    assert ours.shape == (3, *loaded.image_size) and ours.dtype == torch.float32
    assert torch.equal(ours, reference(im.convert("RGB")))


def test_the_word_cached_tokenizer_equals_open_clips():
    from tbps.models.tokens import WordCachedTokenizer

    loaded = models.load(openclip.TINY)
    assert isinstance(loaded.tokenizer, WordCachedTokenizer)
    reference = open_clip.get_tokenizer(openclip.TINY)
    captions = [
        "A woman in a red coat carrying a black backpack.",
        "a woman in a RED coat, carrying a black backpack!!",  # repeated words come from the cache
        "Ein Mann mit grüner Jacke und Schuhen — 3 Taschen; naïve café",
        "&amp; &lt;b&gt; it's he'll we'd   multiple\tspaces\nand lines",
        "行人穿着蓝色的衬衫 and 🎒 emoji",
        "",
        "   ",
        " ".join(["word"] * 200),  # past the context: cut, the end token kept
        " ".join(f"w{i}" for i in range(100)),
    ]
    assert torch.equal(loaded.tokenizer(captions), reference(captions))
    assert torch.equal(loaded.tokenizer(captions[0]), reference(captions[0]))
    assert torch.equal(loaded.tokenizer(captions, context_length=12), reference(captions, context_length=12))
    assert loaded.tokenizer.encode(captions[2]) == reference.encode(captions[2])
    assert loaded.tokenizer.context_length == reference.context_length


def test_the_tokenizer_cleans_plain_ascii_captions_as_open_clip_does():
    import random
    import string

    tok = models.load(openclip.TINY).tokenizer
    assert tok._lower
    rng = random.Random(0)
    plain = string.printable.replace("&", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    texts = ["".join(rng.choice(plain) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["  A  Woman\tIN a <b>red</b> coat\n", "it's 'quoted' \"twice\" `back` \\ ~^|{}", "-- ... ;; ::", "x" * 300]
    # And ones that must take open_clip's own path: entities, control and non-ASCII characters.
    texts += ["&amp;", "a &lt;b&gt;", "tab\x0bvt", "esc\x1b[31mred", "caf\u00e9", "\u201cquoted\u201d", "line\r\nbreak", "del\x7f"]
    from tbps.models.tokens import _PLAIN

    assert sum(bool(_PLAIN.fullmatch(t)) for t in texts) == len(texts) - 8  # the shortcut is taken, except for the last 8
    for text in texts:
        assert tok.clean(text) == tok.inner.clean_fn(text), repr(text)
    reference = open_clip.get_tokenizer(openclip.TINY)
    assert torch.equal(tok(texts), reference(texts))


def test_the_tokenizer_pickles_without_its_word_cache():
    import pickle

    loaded = models.load(openclip.TINY)
    before = loaded.tokenizer(["a man in a red coat"])
    copy = pickle.loads(pickle.dumps(loaded.tokenizer))
    assert copy._words == {} and loaded.tokenizer._words
    assert torch.equal(copy(["a man in a red coat"]), before)


def test_uint8_batches_embed_as_images_normalised_one_by_one():
    from PIL import Image

    from tbps.models.encode import embed_pixels

    loaded = models.load(openclip.TINY)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 32, 3), dtype=np.uint8)) for _ in range(3)]
    uint8 = torch.stack([loaded.preprocess.to_uint8(im) for im in images])
    floats = torch.stack([loaded.preprocess(im) for im in images])
    assert uint8.dtype == torch.uint8
    cpu = torch.device("cpu")
    assert np.array_equal(embed_pixels(loaded, uint8, device=cpu, dtype=None), embed_pixels(loaded, floats, device=cpu, dtype=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalising_on_cuda_equals_normalising_on_the_cpu():
    loaded = models.load(openclip.TINY)
    uint8 = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 3, 96, 32), dtype=np.uint8))
    assert torch.equal(loaded.preprocess.normalise(uint8.cuda()).cpu(), loaded.preprocess.normalise(uint8))


README = Path(__file__).resolve().parents[1] / "README.md"
README_MARK = "<!-- tests/test_models.py runs this block (test_the_readme_loads_an_export_in_plain_open_clip) -->"


def test_the_readme_loads_an_export_in_plain_open_clip(tmp_path):
    """The README's plain-open_clip code, run on an exported checkpoint: tbps's embeddings and pixels."""
    from PIL import Image

    from tbps.models.encode import encode_images, encode_texts

    text = README.read_text()
    block = text[text.index(README_MARK):].split("```python\n", 1)[1].split("```", 1)[0]
    loaded = models.load(openclip.TINY, seed=5)
    checkpoint = loaded.save(tmp_path / "wora.pt")  # what `tbps export --merge` writes (export_run saves the same way)
    rng = np.random.default_rng(0)
    photo = tmp_path / "person.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 90, 3), dtype=np.uint8)).save(photo, quality=95)  # not 3:1: a crop would differ
    for name, value in (("runs/wora.pt", checkpoint), ("person.jpg", photo)):
        assert f'"{name}"' in block
        block = block.replace(f'"{name}"', repr(str(value)))
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code

    ours = namespace["preprocess"](Image.open(photo).convert("RGB"))
    assert torch.equal(ours, loaded.preprocess(Image.open(photo)))  # squash = tbps's resize, bit for bit
    default = open_clip.image_transform(loaded.image_size, is_train=False, mean=loaded.preprocess.stats[0], std=loaded.preprocess.stats[1])
    assert not torch.equal(default(Image.open(photo).convert("RGB")), ours)  # open_clip's default crops: other pixels
    images = encode_images(loaded, [str(photo)], batch_size=1).embeddings
    texts = encode_texts(loaded, ["a woman in a red coat carrying a black backpack"])
    normalise = torch.nn.functional.normalize
    assert np.abs(normalise(namespace["image_features"], dim=-1).numpy() - images).max() <= 1e-5
    assert np.abs(normalise(namespace["text_features"], dim=-1).numpy() - texts).max() <= 1e-5
