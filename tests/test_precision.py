"""bf16 autocast against fp32: the tolerance every speed option of ``tbps score`` is held to.

The issue's rule (#18): a change that alters scores is kept only if its scores stay within bf16
noise of fp32 ones: Spearman >= 0.999 over the pairs. Here on the CPU, with tbps-tiny (random
weights) on 240 pairs of random images and distinct captions, through the forward paths
``run_score`` uses (``embed_image_batch``, ``encode_tokens``). bench/gpu.py checks the same rule
for ViT-B-16 on 4,000 pairs on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps import models
from tbps.models.encode import embed_image_batch, encode_tokens, tokenize_captions

SPEARMAN_MIN = 0.999
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "brown", "pink", "purple", "orange", "navy"]
GARMENTS = ["shirt", "jacket", "coat", "sweater", "dress", "t-shirt"]
LOWER = ["trousers", "jeans", "shorts", "skirt", "leggings"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (the values here are continuous: no ties)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pairs(n: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    # Smooth random images (a coarse grid upsampled), so the towers see structure, not only noise.
    coarse = torch.rand(n, 3, image_size[0] // 8, image_size[1] // 8, generator=g)
    pixels = (torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear") * 255).to(torch.uint8)
    captions = sorted({f"a person in a {rng.choice(COLOURS)} {rng.choice(GARMENTS)} and {rng.choice(COLOURS)} {rng.choice(LOWER)} "
                       f"carrying a {rng.choice(COLOURS)} bag" for _ in range(4 * n)})[:n]
    assert len(captions) == n
    return pixels, captions


def scores(loaded, pixels: torch.Tensor, captions: list[str], dtype: torch.dtype | None) -> np.ndarray:
    cpu = torch.device("cpu")
    img = torch.cat([embed_image_batch(loaded, pixels[i : i + 64], device=cpu, dtype=dtype) for i in range(0, len(pixels), 64)])
    txt = encode_tokens(loaded, tokenize_captions(loaded, captions).tokens, device=cpu, dtype=dtype)
    return (img * txt).sum(1).numpy()


@pytest.fixture(scope="module")
def case():
    loaded = models.load("tbps-tiny")
    pixels, captions = pairs(240, loaded.image_size)
    return loaded, pixels, captions, scores(loaded, pixels, captions, None)


@pytest.mark.slow  # bf16 is emulated on most CPUs: several seconds for 240 pairs
def test_bf16_autocast_scores_rank_like_fp32_scores(case):
    loaded, pixels, captions, fp32 = case
    bf16 = scores(loaded, pixels, captions, torch.bfloat16)
    assert np.abs(fp32 - bf16).max() > 0, "bf16 autocast changed nothing: the check would test nothing"
    assert spearman(fp32, bf16) >= SPEARMAN_MIN


def test_the_spearman_check_fails_on_scores_that_are_not_within_bf16_noise(case):
    # The rule must be able to fail: noise ten times bf16's largest move (0.0023 here) takes the ranks past the bound.
    fp32 = case[3]
    noisy = fp32 + np.random.default_rng(1).normal(0, 10 * 0.0023, size=fp32.shape).astype(np.float32)
    assert spearman(fp32, noisy) < SPEARMAN_MIN
