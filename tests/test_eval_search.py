"""``tbps search`` end to end on a tiny synthetic world: FAISS results, the index cache, the page."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from tbps.data.readers import read_dataset
from tbps.errors import TbpsError, UsageError
from tbps.eval.search import SearchConfig, cache_key, gallery_index, gallery_paths, run_search


@pytest.fixture(scope="module")
def world(synth_world):
    return synth_world(seed=1) / "benchmark" / "reid_raw.json"


QUERIES = ["a woman in a red coat with a black backpack", "a man in blue jeans"]


@pytest.mark.slow
def test_search_matches_brute_force_and_uses_the_cache(world, tmp_path, tiny_clip):
    from tbps.data.readers import read_dataset
    from tbps.models.encode import encode_images, encode_texts

    cfg = SearchConfig(queries=QUERIES, gallery=world, model="tbps-tiny", top_k=5, cache_dir=tmp_path / "cache", workers=0, device="cpu")
    first = run_search(cfg)
    assert first.index.built and first.index.index.ntotal == 12 and not first.index.failed
    assert [len(m) for m in first.matches] == [5, 5]

    # Brute force: cosine of every gallery image with each query, best first.
    paths = gallery_paths(read_dataset(world))
    sims = encode_texts(tiny_clip, QUERIES) @ encode_images(tiny_clip, paths, workers=0).embeddings.T
    for q, found in enumerate(first.matches):
        scores = [s for _, s in found]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx(np.sort(sims[q])[::-1][:5].tolist(), abs=1e-5)
        for path, score in found:
            assert score == pytest.approx(sims[q, paths.index(path)], abs=1e-5)

    again = run_search(cfg)
    assert not again.index.built and again.index.key == first.index.key and again.matches == first.matches

    # A damaged cache entry is rebuilt, not a crash.
    (first.index.directory / "index.faiss").write_bytes(b"garbage")
    repaired = run_search(cfg)
    assert repaired.index.built and repaired.matches == first.matches

    # The key follows the gallery: a touched image means a new index.
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = run_search(cfg)
    assert touched.index.built and touched.index.key != first.index.key
    assert sorted(p.name for p in (tmp_path / "cache" / "search").iterdir()) == sorted({first.index.key, touched.index.key})


def test_cache_key_follows_model_and_gallery(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    model = {"name": "tbps-tiny", "weights": "random(seed=0)"}
    extra = {"image_size": [96, 32], "precision": "fp32"}
    key = cache_key([str(a), str(b)], model, extra)
    assert key == cache_key([str(a), str(b)], dict(model), dict(extra))
    assert key != cache_key([str(a), str(b)], {**model, "weights": "random(seed=1)"}, extra)
    assert key != cache_key([str(a), str(b)], model, {**extra, "precision": "bf16"})
    assert key != cache_key([str(a)], model, extra)
    b.write_bytes(b"yy")  # same path, new content (size changes)
    assert key != cache_key([str(a), str(b)], model, extra)


def test_folder_gallery_with_a_bad_image_and_queries_file(tmp_path):
    from _eval_world import COLOURS, person_image

    folder = tmp_path / "photos"
    for k, name in enumerate(["red", "green", "blue"]):
        person_image(folder / f"{k}.jpg", COLOURS[name], COLOURS["grey"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    qfile = tmp_path / "queries.txt"
    qfile.write_text("a person in a green coat\n\n  \nsomeone in grey trousers\n")
    cfg = SearchConfig(queries=[], queries_file=qfile, gallery=folder, model="tbps-tiny", top_k=10, cache_dir=tmp_path / "c", workers=0, device="cpu")
    res = run_search(cfg)
    assert res.queries == ["a person in a green coat", "someone in grey trousers"]
    assert res.index.index.ntotal == 3 and list(res.index.failed) == [str(folder / "broken.jpg")]
    assert all(len(m) == 3 for m in res.matches)  # top-k capped by the gallery size


def test_cli_search_with_html(world, tmp_path, cli):
    page = tmp_path / "hits.html"
    res = cli("search", QUERIES[0], "--gallery", world, "--model", "tbps-tiny", "--top-k", "3", "--html", page,
              "--cache-dir", tmp_path / "cache", "--workers", "0", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert QUERIES[0] in res.stdout and res.stdout.count(".jpg") == 3
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 3 and "https://" not in text and "http://" not in text
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", text)


def test_bad_input(tmp_path, world, cli):
    with pytest.raises(UsageError, match="QUERY"):
        SearchConfig(queries=["  "], gallery=world, model="tbps-tiny")
    with pytest.raises(TbpsError, match="queries file"):
        SearchConfig(queries=[], queries_file=tmp_path / "none.txt", gallery=world, model="tbps-tiny")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"nope")
    with pytest.raises(TbpsError, match="could be decoded"):
        run_search(SearchConfig(queries=["x"], gallery=junk, model="tbps-tiny", cache_dir=tmp_path / "c", workers=0, device="cpu"))
    res = cli("search", "x", "--gallery", world, "--model", "/no/model.pt", "--cache-dir", tmp_path / "c")
    assert res.exit_code == 1 and "model file not found" in res.output
    res = cli("search", "--gallery", world, "--model", "tbps-tiny")
    assert res.exit_code == 2 and "QUERY" in res.output


def test_progress_moves_per_batch_of_gallery_images_and_not_for_a_cached_index(world, tmp_path, tiny_clip):
    paths = gallery_paths(read_dataset(world))
    calls: list[tuple[int, int]] = []
    built = gallery_index(tiny_clip, paths, tmp_path / "cache", batch_size=5, workers=0, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert built.built and calls == [(5, 12), (10, 12), (12, 12)]
    calls.clear()
    cached = gallery_index(tiny_clip, paths, tmp_path / "cache", batch_size=5, workers=0, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert not cached.built and calls == []


def test_several_vectors_per_image_search_by_each_images_best_vector(tmp_path, monkeypatch):
    """BLIP-2-like embeddings (Q vectors per image): the results are the brute-force max over the vectors, cached alike."""
    from types import SimpleNamespace

    import torch

    from tbps import columns as C
    from tbps.eval import search as search_module
    from tbps.models.encode import ImageEncoding
    from tbps.models.protocol import similarity

    rng = np.random.default_rng(0)
    n, q, d = 12, 4, 8
    paths = []
    for k in range(n):
        (tmp_path / f"{k}.jpg").write_bytes(bytes([k]))
        paths.append(str(tmp_path / f"{k}.jpg"))
    image = rng.standard_normal((n, q, d)).astype(np.float32)
    image = (image / np.linalg.norm(image, axis=-1, keepdims=True)).reshape(n, q * d)
    text = rng.standard_normal((3, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # The model's two encoders, as the family would give them: Q vectors per image, one per caption.
    monkeypatch.setattr(search_module, "encode_images",
                        lambda _m, p, **_k: ImageEncoding(image[: len(p)], [C.STATUS_OK] * len(p), [None] * len(p), [None] * len(p)))
    monkeypatch.setattr(search_module, "encode_texts", lambda _m, queries, **_k: text[: len(queries)])
    loaded = SimpleNamespace(name="blip2-like", identity={"spec": "fake"}, image_size=(224, 224), image_vectors=q)
    gindex = gallery_index(loaded, paths, tmp_path / "cache", workers=0, device="cpu")
    assert gindex.built and gindex.image_vectors == q and gindex.index.ntotal == n * q and len(gindex.paths) == n
    brute = similarity(torch.from_numpy(image), torch.from_numpy(text), q).T.numpy()  # (queries, images)
    for top_k in (1, 5, n, n + 3):
        res = search_module.search(loaded, gindex, ["a", "b", "c"], top_k)
        for row, found in enumerate(res.matches):
            want = np.argsort(-brute[row], kind="stable")[: min(top_k, n)]
            assert [paths.index(p) for p, _ in found] == want.tolist()
            assert [s for _, s in found] == pytest.approx(brute[row, want].tolist(), abs=1e-5)
    again = gallery_index(loaded, paths, tmp_path / "cache", workers=0, device="cpu")
    assert not again.built and again.image_vectors == q and again.key == gindex.key
    assert search_module.search(loaded, again, ["a"], 5).matches == search_module.search(loaded, gindex, ["a"], 5).matches
    # One vector per image is another index (and keeps the key its caches always had).
    plain = SimpleNamespace(**{**vars(loaded), "image_vectors": 1})
    monkeypatch.setattr(search_module, "encode_images",
                        lambda _m, p, **_k: ImageEncoding(image[: len(p), :d], [C.STATUS_OK] * len(p), [None] * len(p), [None] * len(p)))
    one = gallery_index(plain, paths, tmp_path / "cache", workers=0, device="cpu")
    assert one.key != gindex.key and one.index.ntotal == n
    assert one.key == cache_key(paths, {"name": "blip2-like", "spec": "fake"}, {"image_size": [224, 224], "precision": "fp32", "index": "IndexFlatIP"})
