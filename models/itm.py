"""An image-text matching (ITM) head on top of a dual encoder, and the hard negatives it trains on.

The head is BLIP's idea at a small size: the caption's token features attend to the image's patch
tokens (cross-attention, pre-norm, a few blocks), the attended caption tokens are mean-pooled
over the caption's own tokens, and one linear layer gives a match logit. A cosine sees each side
alone; the head sees which colour goes with which garment, which is what a swapped or wrong
attribute changes.

Training (``tbps train --itm-head``) pairs every caption with its own image (positives) and with
negatives of two kinds:

* in-batch hard negatives chosen by similarity (:func:`hardest_negatives`): for each image the
  most similar caption of *another person*, for each caption the most similar image of another
  person (captions of the same person are not negatives in TBPS);
* caption perturbations (``--hard-negatives``, :mod:`tbps.data.perturb`): the image against its
  own caption with its attributes rewritten.

:func:`itm_loss` is the binary cross-entropy over all of them, each kind weighted equally.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

COSINE_SCALE = 10.0
COSINE_OFFSET = 0.3
# The head is new where the towers are trained: its parameters learn at this multiple of --lr.
HEAD_LR_SCALE = 10.0


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape (stored beside its weights, so a checkpoint rebuilds it).

    Attributes:
        text_width: width of the text tower's token features.
        image_width: width of the image tower's patch tokens.
        width: the head's own width.
        layers: cross-attention blocks.
        heads: attention heads per block.
        cosine: the logit is ``a * cosine + b`` plus the cross-attention's own term, so a new
            head starts as the dual encoder's cosine (``a``, ``b`` learned) and learns what the
            cosine misses; new heads have it.
    """

    text_width: int
    image_width: int
    width: int = 128
    layers: int = 2
    heads: int = 4
    cosine: bool = False  # the logit adds a learned affine map of the pair's cosine (heads saved before it have none)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _CrossBlock(nn.Module):
    """Caption tokens attend to image tokens, then an MLP; pre-norm residual blocks."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(image)
        text = text + self.attn(self.ln_q(text), kv, kv, need_weights=False)[0]
        return text + self.mlp(self.ln_mlp(text))


class MatchingHead(nn.Module):
    """(caption token features, their mask, image tokens) -> one match logit per row.

    Args:
        config: the head's shape.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.text_in = nn.Linear(config.text_width, config.width)
        self.image_in = nn.Linear(config.image_width, config.width)
        self.blocks = nn.ModuleList(_CrossBlock(config.width, config.heads) for _ in range(config.layers))
        self.ln_out = nn.LayerNorm(config.width)
        self.logit = nn.Linear(config.width, 1)
        if config.cosine:
            # Starts at 10 * (cosine - 0.3): a match above a cosine of 0.3, the cross-attention term at zero.
            self.cosine_scale = nn.Parameter(torch.tensor(COSINE_SCALE))
            self.cosine_bias = nn.Parameter(torch.tensor(-COSINE_SCALE * COSINE_OFFSET))
            nn.init.zeros_(self.logit.weight)
            nn.init.zeros_(self.logit.bias)

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
                cosine: torch.Tensor | None = None) -> torch.Tensor:
        """Match logits.

        Args:
            text_tokens: (N, L, text_width) caption token features.
            text_mask: (N, L) bool, True on the caption's own tokens (not padding).
            image_tokens: (N, P, image_width) image patch tokens of row ``i``'s image.
            cosine: (N,) the dual encoder's cosine of each pair; required by a head with ``cosine``.

        Returns:
            (N,) logits: above 0 means "this caption describes this image".
        """
        x = self.text_in(text_tokens)
        y = self.image_in(image_tokens)
        for block in self.blocks:
            x = block(x, y)
        weights = text_mask.to(x.dtype).unsqueeze(-1)
        pooled = (self.ln_out(x) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        logit = self.logit(pooled).squeeze(-1)
        if self.config.cosine:
            if cosine is None:
                raise ValueError("this matching head adds the pair's cosine to its logit: pass cosine")
            logit = logit + self.cosine_scale * cosine.to(logit.dtype) + self.cosine_bias
        return logit


def count_head_parameters(head: MatchingHead) -> int:
    """The head's parameter count (recorded with a run: its size)."""
    return sum(p.numel() for p in head.parameters())


def hardest_negatives(sims: torch.Tensor, person_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image the most similar caption that is not its own, and for each caption the most similar image.

    Args:
        sims: (N, N) image-caption similarities of a batch (row ``i`` is image ``i``, column ``j``
            caption ``j``; the pairs ``(i, i)`` are the positives).
        person_ids: (N,) identity codes: a caption of the same person is never a negative (TBPS
            has several captions and images per person). None: only the diagonal is excluded.

    Returns:
        (caption index per image, image index per caption), each (N,) int64. A row whose every
        other entry belongs to the same person gets -1 (no negative there).
    """
    n = sims.shape[0]
    same = torch.eye(n, dtype=torch.bool, device=sims.device)
    if person_ids is not None:
        same = same | (person_ids[:, None] == person_ids[None, :])
    masked = sims.detach().float().masked_fill(same, float("-inf"))
    text_for_image = masked.argmax(dim=1)
    image_for_text = masked.argmax(dim=0)
    none = torch.isinf(masked).all(dim=1)
    text_for_image[none] = -1
    image_for_text[torch.isinf(masked).all(dim=0)] = -1
    return text_for_image, image_for_text


def itm_loss(positive: torch.Tensor, negatives: list[torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy of the positives (label 1) and each kind of negative (label 0), weighted equally.

    Args:
        positive: (N,) logits of the matching pairs.
        negatives: one tensor of logits per kind of negative (any length; empty ones are skipped).

    Returns:
        The mean of the positives' loss and the negatives' (each kind averaged first).
    """
    bce = nn.functional.binary_cross_entropy_with_logits
    pos = bce(positive, torch.ones_like(positive))
    kinds = [bce(neg, torch.zeros_like(neg)) for neg in negatives if neg.numel()]
    if not kinds:
        return pos
    return 0.5 * pos + 0.5 * torch.stack(kinds).mean()
