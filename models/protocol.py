"""What curate, eval and train call on a model: the :class:`Encoder` protocol.

A model family (``models/openclip.py`` for open_clip) loads weights into an object that has these
attributes and methods; nothing outside the family's module touches the library's own objects
(no ``model.encode_image`` of open_clip outside ``models/openclip.py``). ``model`` is the
``nn.Module`` that training adapts and moves between devices.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image


class ImageTransform(Protocol):
    """PIL image -> the model's input, in two halves so decoding workers send uint8."""

    mean: torch.Tensor
    std: torch.Tensor
    stats: tuple[list[float], list[float]]  # (mean, std) per channel, as the model's config gives them

    def __call__(self, im: Image.Image) -> torch.Tensor:
        """One image, resized and normalised: float32 (3, H, W)."""

    def to_uint8(self, im: Image.Image) -> torch.Tensor:
        """The part that needs the PIL image: uint8 (3, H, W) at the model's size."""

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (or a batch of them) to float32 model input, on their device."""


@runtime_checkable
class Encoder(Protocol):
    """A loaded image-text model, as tbps uses it.

    Attributes:
        model: the ``nn.Module`` holding every weight (adapters attach here; ``.to(device)``).
        name: the model's config name within its family.
        family: the family's registry name (``open_clip``, ...).
        tokenizer: captions -> token ids (picklable: it runs in DataLoader workers).
        preprocess: the image transform at the model's input size.
        image_size: (height, width) of the model's input.
        context_length: the text context in tokens.
        identity: what made the weights (spec, source, content hash), for provenance.
    """

    model: torch.nn.Module
    name: str
    family: str
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: ImageTransform
    image_size: tuple[int, int]
    context_length: int
    identity: dict[str, Any]

    @property
    def embed_dim(self) -> int:
        """The width of the image and text embeddings."""

    @property
    def has_pair_score(self) -> bool:
        """Whether :meth:`pair_score` is available (a cross-encoder / ITM head)."""

    @property
    def image_vectors(self) -> int:
        """Embeddings per image (BLIP-2: its query tokens; 1 otherwise): see :func:`similarity`."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (not normalised) of a normalised pixel batch (N, 3, H, W)."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Caption features (not normalised) of a token batch from :attr:`tokenizer`."""

    def text_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Each row's token count when batches may be grouped by length without changing the
        embeddings (the text tower ignores padding); None when input order must be kept."""

    def caption_too_long(self, caption: str) -> bool:
        """Whether the caption has more tokens than the context (it is truncated)."""

    def training_module(self) -> torch.nn.Module:
        """A module over :attr:`model`'s own parameters whose ``forward(pixels, tokens)`` returns
        (L2-normalised image embeddings, L2-normalised text embeddings, logit scale) for the
        contrastive loss. Training wraps it (DistributedDataParallel under torchrun) and calls it."""

    def pair_score(self, pixels: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """The match probability (ITM) of caption ``j`` with image ``image_index[j]`` (default: image ``j``),
        for families that have a matching head; raises ``TbpsError`` otherwise. (M,) float32 in [0, 1]."""

    def save(self, path: Any, extra: dict[str, Any] | None = None) -> Any:
        """Write the weights as a checkpoint that ``tbps.models.load`` reads back."""



def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor, image_vectors: int = 1) -> torch.Tensor:
    """Every image against every caption: (n_images, n_captions) cosines of normalised embeddings.

    Args:
        image_emb: (n, image_vectors * D) image embeddings, each D-block L2-normalised.
        text_emb: (m, D) L2-normalised caption embeddings.
        image_vectors: embeddings per image (BLIP-2's query tokens): an image's score is the
            largest of its vectors' cosines, as BLIP-2's ITC computes it; 1 for a plain dot product.
    """
    if image_vectors == 1:
        return image_emb @ text_emb.T
    per_vector = image_emb.view(image_emb.shape[0], image_vectors, -1) @ text_emb.T  # (n, Q, m)
    return per_vector.amax(dim=1)


def pair_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor, image_vectors: int = 1) -> torch.Tensor:
    """Row ``i`` of the images against row ``i`` of the captions: (n,), as :func:`similarity`."""
    if image_vectors == 1:
        return (image_emb * text_emb).sum(dim=-1)
    per_vector = (image_emb.view(image_emb.shape[0], image_vectors, -1) * text_emb[:, None, :]).sum(dim=-1)
    return per_vector.amax(dim=1)
