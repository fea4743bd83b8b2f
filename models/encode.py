"""Batched image and caption encoding, shared by score, eval, search and validation.

Images are decoded in DataLoader worker processes (``tbps.data.images.open_image``: a bad file
becomes a status, never an exception) while the main process runs the model. Embeddings come
back as float32 numpy arrays, L2-normalised; rows of images that could not be decoded are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tbps.columns import STATUS_OK
from tbps.errors import UsageError
from tbps.models import LoadedModel

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def place(loaded: LoadedModel, device: torch.device | str | None) -> torch.device:
    """The device to run ``loaded`` on: ``device``, with the model moved there, or the model's own when None."""
    if device is None:
        return next(loaded.model.parameters()).device
    device = torch.device(device)
    loaded.model.to(device)  # a no-op when it is there already
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (fast) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without AVX512-BF16 or AMX, oneDNN emulates bf16 and it is slower than fp32.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--precision`` value, or None for plain fp32.

    Args:
        precision: ``auto`` (bf16 where the device supports it natively), ``fp32`` or ``bf16``.
        device: where the model runs.

    Returns:
        ``torch.bfloat16`` or None.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}", field="--precision", value=precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_supported(device) else None


@dataclass
class ImageBatch:
    """One decoded batch: positions in the input list, pixels, and per-image outcome."""

    index: torch.Tensor  # (n,) positions in the path list
    pixels: torch.Tensor  # (n, 3, H, W) uint8 (see PedestrianTransform) or float; zeros where the image could not be decoded
    ok: torch.Tensor  # (n,) bool
    status: list[str]
    error: list[str | None]
    image_hash: list[str | None]

    def decoded_pixels(self) -> torch.Tensor:
        """The pixels of the images that decoded (the batch itself, not a copy, when all did)."""
        return self.pixels if bool(self.ok.all()) else self.pixels[self.ok]

    def pin_memory(self) -> "ImageBatch":
        """The batch with its pixels in page-locked memory (called by a DataLoader with ``pin_memory``)."""
        self.pixels = self.pixels.pin_memory()
        return self


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str | None], preprocess, image_size: tuple[int, int], max_pixels: int | None):
        self.paths = paths
        # uint8 out of the workers when the preprocessing can split off its normalisation.
        self.preprocess = getattr(preprocess, "to_uint8", preprocess)
        self.blank = torch.zeros(3, *image_size, dtype=torch.uint8 if hasattr(preprocess, "to_uint8") else torch.float32)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from tbps.data.images import open_image

        path = self.paths[i]
        res = open_image(path, max_pixels=self.max_pixels)
        if res.image is None:
            return i, self.blank, False, res.status, res.error, res.image_hash
        return i, self.preprocess(res.image), True, STATUS_OK, None, res.image_hash


def _collate(items) -> ImageBatch:
    idx, pix, ok, status, error, hashes = zip(*items)
    return ImageBatch(
        index=torch.tensor(idx),
        pixels=torch.stack(pix),
        ok=torch.tensor(ok),
        status=list(status),
        error=list(error),
        image_hash=list(hashes),
    )


# On a CPU, decoding workers and the model's threads share the cores: decoding while the model
# runs stalls the model's parallel regions (a thread that lost its core holds up the others).
# There, the workers decode a window of batches while the model waits, then the model runs on the
# window while the workers sit idle. A window is as many batches as a streaming loader keeps in
# flight (prefetch_factor x workers), so memory is the same either way. Measured on 2 cores
# (6,144 images, tbps-tiny, 3 alternating rounds): decoding and embedding at 533/599/532 img/s
# streamed and 587/728/534 in windows, against 736/749/796 for the model alone; in whole
# 10,000-pair score runs the difference was within the machine's noise (loop 403/364/445
# against 406/382/453 pairs/s).
PREFETCH_FACTOR = 4


def iter_image_batches(
    loaded: LoadedModel,
    paths: Sequence[str | None],
    *,
    batch_size: int = 256,
    workers: int = 2,
    max_pixels: int | None = None,
    groups: Sequence[int] | None = None,
    pin_memory: bool = False,
    overlap: bool = True,
) -> Iterator[ImageBatch]:
    """Decode and preprocess images in DataLoader workers, in input order.

    Args:
        loaded: the model whose preprocessing to apply.
        paths: image file paths (None for rows refused earlier; they decode as missing).
        batch_size: images per batch.
        workers: DataLoader worker processes (0 decodes in this process).
        max_pixels: a decompression-bomb limit below Pillow's default, if any.
        groups: sizes of consecutive groups of ``paths`` that batches must not cross (so a
            group's batches, and with them its float results, do not depend on its neighbours).
        pin_memory: page-lock the batches (faster copies to a GPU).
        overlap: decode while the caller works on earlier batches (for a GPU); when False,
            decode a window of batches, hand them over, and decode the next window only when
            they have been consumed (for a model on the same CPU cores as the workers).

    Returns:
        An iterator of :class:`ImageBatch`, in the order of ``paths``.
    """
    ds = _ImageFiles(paths, loaded.preprocess, loaded.image_size, max_pixels)
    sizes = list(groups) if groups is not None else [len(paths)]
    batches, start = [], 0
    for size in sizes:
        batches += [list(range(s, min(s + batch_size, start + size))) for s in range(start, start + size, batch_size)]
        start += size

    if overlap or workers == 0:
        yield from DataLoader(ds, batch_sampler=batches, **_loader_options(workers, pin_memory))
        return
    # One set of workers for all windows: each pass over the loader reads the sampler's window.
    windows = _Window()
    loader = DataLoader(ds, batch_sampler=windows, persistent_workers=True, **_loader_options(workers, pin_memory))
    size = PREFETCH_FACTOR * workers
    for first in range(0, len(batches), size):
        windows.batches = batches[first : first + size]
        yield from list(loader)  # decoded while the caller waits; the workers then sit idle


class _Window:
    """A batch sampler whose batches are set from outside: one window per pass of a persistent loader."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader_options(workers: int, pin_memory: bool) -> dict:
    return {
        "num_workers": workers,
        "collate_fn": _collate,
        "prefetch_factor": PREFETCH_FACTOR if workers > 0 else None,
        "pin_memory": pin_memory,
    }


@torch.no_grad()
def embed_pixels(loaded: LoadedModel, pixels: torch.Tensor, *, device: torch.device, dtype: torch.dtype | None) -> np.ndarray:
    """Image embeddings (float32, L2-normalised) of a preprocessed batch (uint8 is normalised on ``device``)."""
    pixels = pixels.to(device, non_blocking=True)
    if pixels.dtype == torch.uint8:
        pixels = loaded.preprocess.normalise(pixels)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats = loaded.model.encode_image(pixels)
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    return feats.cpu().numpy()


def caption_truncated(loaded: LoadedModel, captions: Sequence[str], tokens: torch.Tensor | None = None) -> np.ndarray:
    """Whether each caption has more tokens than the model's context (start/end tokens included).

    Args:
        loaded: the model.
        captions: the captions.
        tokens: their tokenisation by ``loaded.tokenizer``, when already at hand: only rows whose
            last position is filled (the caption reached the context) are tokenised again.

    Returns:
        A bool array, one flag per caption.
    """
    encode = getattr(loaded.tokenizer, "encode", None)

    def too_long(c: str) -> bool:
        if encode is None:  # Hugging Face tokenizers: tokenise without truncation
            return len(loaded.tokenizer.tokenizer(c)["input_ids"]) > loaded.context_length
        return len(encode(c)) + 2 > loaded.context_length

    if tokens is None or encode is None:
        return np.array([too_long(c) for c in captions], dtype=bool)
    flags = np.zeros(len(captions), dtype=bool)
    for i in torch.nonzero(tokens[:, -1] != 0).flatten().tolist():
        flags[i] = too_long(captions[i])
    return flags


def _trimmable(model: torch.nn.Module) -> bool:
    """Whether the text tower pools the end-of-text token under a causal mask (open_clip CLIP).

    Then no position after the last end-of-text token of a batch can reach the pooled output,
    and the batch can be cut there: the same embeddings for a fraction of the work.
    """
    import open_clip

    mask = getattr(model, "attn_mask", None)
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and mask is not None
        and bool(torch.equal(torch.isinf(mask), torch.triu(torch.ones_like(mask, dtype=torch.bool), 1)))
    )


def _encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on tokens cut after the batch's last end-of-text token."""
    from open_clip.transformer import text_global_pool

    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


# Captions per forward pass by default. With tbps-tiny, 256 keeps a batch's largest activation
# (256 captions x up to 64 tokens x 512 floats: at most 32 MiB, less as a batch is cut after its
# longest caption) within what glibc serves from its heap once tbps.runtime has set it up;
# batches of 512 took fresh pages from the kernel at every batch.
TEXT_BATCH = 256


@torch.no_grad()
def encode_texts(
    loaded: LoadedModel,
    captions: Sequence[str],
    *,
    batch_size: int = TEXT_BATCH,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    return_truncated: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Caption embeddings, float32 and L2-normalised; captions longer than the context are truncated.

    Captions are batched by token length, and for open_clip CLIP models each batch is cut after
    its longest caption (the causal text tower gives the same embeddings; see ``_trimmable``).

    Args:
        loaded: the model.
        captions: the captions.
        batch_size: captions per forward pass.
        device: where to run: the model is moved there; None runs it where it is.
        precision: ``auto``, ``fp32`` or ``bf16`` (autocast).
        return_truncated: also return :func:`caption_truncated`'s flags (from the same tokens).

    Returns:
        An array of shape (len(captions), embed_dim), in the order of ``captions``; with
        ``return_truncated``, a tuple of it and the bool flags.
    """
    device = place(loaded, device)
    dtype = autocast_dtype(precision, device)
    out = np.zeros((len(captions), loaded.embed_dim), dtype=np.float32)
    if not len(captions):
        return (out, np.zeros(0, dtype=bool)) if return_truncated else out
    tokens = loaded.tokenizer(list(captions))
    trim = _trimmable(loaded.model)
    # Similar lengths together, so each cut batch wastes little; the order is restored below.
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if trim else torch.arange(len(captions))
    for start in range(0, len(captions), batch_size):
        idx = order[start : start + batch_size]
        batch = tokens[idx].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = _encode_text_trimmed(loaded.model, batch) if trim else loaded.model.encode_text(batch)
        out[idx.numpy()] = torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
    return (out, caption_truncated(loaded, captions, tokens)) if return_truncated else out


@dataclass
class ImageEncoding:
    """Embeddings of a list of images with each image's outcome."""

    embeddings: np.ndarray  # (n, D) float32; zero rows where status != ok
    status: list[str]
    error: list[str | None]
    image_hash: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == STATUS_OK for s in self.status], dtype=bool)


def encode_images(
    loaded: LoadedModel,
    paths: Sequence[str | None],
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    max_pixels: int | None = None,
) -> ImageEncoding:
    """Embed every image of a list (for galleries: eval, search, validation).

    Args:
        loaded: the model.
        paths: image file paths.
        batch_size: images per forward pass.
        workers: DataLoader worker processes decoding images.
        device: where to run: the model is moved there; None runs it where it is.
        precision: ``auto``, ``fp32`` or ``bf16`` (autocast).
        max_pixels: a decompression-bomb limit below Pillow's default, if any.

    Returns:
        An :class:`ImageEncoding` in the order of ``paths``.
    """
    device = place(loaded, device)
    dtype = autocast_dtype(precision, device)
    n = len(paths)
    emb = np.zeros((n, loaded.embed_dim), dtype=np.float32)
    status: list[str] = [STATUS_OK] * n
    error: list[str | None] = [None] * n
    hashes: list[str | None] = [None] * n
    batches = iter_image_batches(
        loaded, paths, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
        pin_memory=device.type == "cuda", overlap=device.type != "cpu",
    )
    for batch in batches:
        idx = batch.index.numpy()
        ok = batch.ok.numpy()
        if ok.any():
            emb[idx[ok]] = embed_pixels(loaded, batch.decoded_pixels(), device=device, dtype=dtype)
        for j, i in enumerate(idx):
            status[i], error[i], hashes[i] = batch.status[j], batch.error[j], batch.image_hash[j]
    return ImageEncoding(emb, status, error, hashes)
