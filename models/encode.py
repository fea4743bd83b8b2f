"""Batched image and caption encoding, shared by score, eval, search and validation.

Images are decoded in DataLoader worker processes (``tbps.data.images.open_image``: a bad file
becomes a status, never an exception) while the main process runs the model. Embeddings come
back as float32 numpy arrays, L2-normalised; rows of images that could not be decoded are zero.

The encoders take ``on_batch(n)``, called with the size of each batch once it is embedded, so a
command's progress bar moves per batch (the core renders nothing). An error raised inside a
DataLoader worker reaches the caller as one :class:`tbps.errors.TbpsError` line
(:func:`worker_errors`), not as the worker's traceback.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tbps.columns import STATUS_OK
from tbps.data.images import open_image
from tbps.errors import TbpsError
from tbps.models.device import autocast_dtype
from tbps.models.protocol import Encoder


_WORKER_PREFIX = "Caught "  # torch re-raises a worker's exception as "Caught X in DataLoader worker process N. Original Traceback ..."


@contextlib.contextmanager
def worker_errors(what: str) -> Iterator[None]:
    """Turn an exception raised inside a DataLoader worker into one :class:`TbpsError` line.

    torch re-raises a worker's exception in the main process with the worker's whole traceback
    as its message; the last line of that traceback (the exception itself) is what a user needs.
    A worker that died (killed for memory, a crash in a decoder) is said the same way.

    Args:
        what: what the workers were doing, for the message (``decoding training images``).
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only what came from a worker is rewritten; the rest is re-raised as is
        text = str(exc)
        from_worker = text.startswith(_WORKER_PREFIX) and "DataLoader worker" in text.split("\n", 1)[0]
        died = isinstance(exc, RuntimeError) and text.startswith("DataLoader worker")
        if not (from_worker or died):
            raise
        last = _last_line(text) if from_worker else text
        if isinstance(exc, TbpsError):  # a tbps error already says what is wrong, and where
            raise TbpsError(last.removeprefix(f"{TbpsError.__module__}.{TbpsError.__name__}: ")) from None
        raise TbpsError(f"{what}: {last}", hint="run again with --workers 0 to see the failing file") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def place(loaded: Encoder, device: torch.device | str | None) -> torch.device:
    """The device to run ``loaded`` on: ``device``, with the model moved there, or the model's own when None."""
    if device is None:
        return next(loaded.model.parameters()).device
    device = torch.device(device)
    loaded.model.to(device)  # a no-op when it is there already
    head = getattr(loaded, "itm_head", None)  # a matching head beside the model (open_clip runs trained with --itm-head)
    if head is not None:
        head.to(device)
    return device


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
    loaded: Encoder,
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
        with worker_errors("decoding images"):
            yield from DataLoader(ds, batch_sampler=batches, **_loader_options(workers, pin_memory))
        return
    # One set of workers for all windows: each pass over the loader reads the sampler's window.
    windows = _Window()
    loader = DataLoader(ds, batch_sampler=windows, persistent_workers=True, **_loader_options(workers, pin_memory))
    size = PREFETCH_FACTOR * workers
    for first in range(0, len(batches), size):
        windows.batches = batches[first : first + size]
        with worker_errors("decoding images"):
            window = list(loader)  # decoded while the caller waits; the workers then sit idle
        yield from window


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


def _model_input(loaded: Encoder, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``, uint8 pixels normalised there (a pinned CPU batch is copied without blocking)."""
    pixels = pixels.to(device, non_blocking=True)
    return loaded.preprocess.normalise(pixels) if pixels.dtype == torch.uint8 else pixels


@torch.no_grad()
def embed_image_batch(loaded: Encoder, pixels: torch.Tensor, *, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Image embeddings of a preprocessed batch, left on ``device`` (no synchronisation with it).

    Args:
        loaded: the model.
        pixels: (n, 3, H, W) uint8 (normalised on ``device``) or normalised floats; a pinned CPU
            batch is copied without blocking.
        device: where the model runs.
        dtype: the autocast dtype, or None for fp32.

    Returns:
        (n, D) float32, L2-normalised, on ``device``.
    """
    pixels = _model_input(loaded, pixels, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats = loaded.encode_image(pixels)
    return normalise_image_embeddings(feats.float(), loaded.image_vectors)


@torch.no_grad()
def embed_image_batch_with_state(loaded: Encoder, pixels: torch.Tensor, *, device: torch.device,
                                 dtype: torch.dtype | None) -> tuple[torch.Tensor, object | None]:
    """:func:`embed_image_batch` and, where the model can give it from the same pass
    (``encode_image_state``), the images' state for :func:`pair_scores`; else None."""
    if not (loaded.has_pair_score and hasattr(loaded, "encode_image_state")):  # no head, or a head that reads the pixels itself
        return embed_image_batch(loaded, pixels, device=device, dtype=dtype), None
    pixels = _model_input(loaded, pixels, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        feats, state = loaded.encode_image_state(pixels)
    return normalise_image_embeddings(feats.float(), loaded.image_vectors), state


def _state_rows(state, rows: torch.Tensor):
    """Rows of a family's image state: a tensor, or a tuple of tensors (open_clip: pooled and patch tokens)."""
    return tuple(t[rows] for t in state) if isinstance(state, tuple) else state[rows]


def embed_pixels(loaded: Encoder, pixels: torch.Tensor, *, device: torch.device, dtype: torch.dtype | None) -> np.ndarray:
    """Image embeddings (float32, L2-normalised, numpy) of a preprocessed batch (uint8 is normalised on ``device``)."""
    return embed_image_batch(loaded, pixels, device=device, dtype=dtype).cpu().numpy()


def normalise_image_embeddings(feats: torch.Tensor, image_vectors: int = 1) -> torch.Tensor:
    """L2-normalise image embeddings: each of an image's ``image_vectors`` D-blocks on its own (BLIP-2)."""
    if image_vectors == 1:
        return torch.nn.functional.normalize(feats, dim=-1)
    n = feats.shape[0]
    return torch.nn.functional.normalize(feats.view(n, image_vectors, -1), dim=-1).view(n, -1)


@torch.no_grad()
def pair_scores(loaded: Encoder, pixels: torch.Tensor | None, captions: Sequence[str], image_index: np.ndarray, *, device: torch.device,
                dtype: torch.dtype | None, batch_size: int = 256, image_state: object | None = None) -> np.ndarray:
    """The ITM head's match probability of each caption with its image, in batches of captions.

    Args:
        loaded: a model with a matching head (``loaded.has_pair_score``).
        pixels: (B, 3, H, W) decoded images (uint8 or normalised); None with ``image_state``.
        captions: the M captions.
        image_index: (M,) the row of ``pixels`` (or of ``image_state``) each caption pairs with.
        device, dtype: where and in which autocast precision to run.
        batch_size: captions per forward pass.
        image_state: the B images' state from :func:`embed_image_batch_with_state`: the image
            tower is not run again.

    Returns:
        (M,) float32 probabilities.
    """
    out = np.zeros(len(captions), dtype=np.float32)
    if not len(captions):
        return out
    if image_state is None:
        pixels = _model_input(loaded, pixels, device)
    index = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        rows = index[start:stop].to(device)
        used, local = torch.unique(rows, return_inverse=True)  # each image of the batch through the image tower once
        tokens = loaded.tokenizer(list(captions[start:stop])).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if image_state is None:
                probs = loaded.pair_score(pixels[used], tokens, local)
            else:
                probs = loaded.pair_score(None, tokens, local, image_state=_state_rows(image_state, used))
        out[start:stop] = probs.float().cpu().numpy()
    return out


def caption_truncated(loaded: Encoder, captions: Sequence[str], tokens: torch.Tensor | None = None) -> np.ndarray:
    """Whether each caption has more tokens than the model's context (start/end tokens included).

    Args:
        loaded: the model.
        captions: the captions.
        tokens: their tokenisation by ``loaded.tokenizer``, when already at hand: only rows whose
            last position is filled (the caption reached the context) are checked again.

    Returns:
        A bool array, one flag per caption.
    """
    if tokens is None:
        return np.array([loaded.caption_too_long(c) for c in captions], dtype=bool)
    flags = np.zeros(len(captions), dtype=bool)
    for i in torch.nonzero(tokens[:, -1] != 0).flatten().tolist():
        flags[i] = loaded.caption_too_long(captions[i])
    return flags


# Captions per forward pass by default. With tbps-tiny, 256 keeps a batch's largest activation
# (256 captions x up to 64 tokens x 512 floats: at most 32 MiB, less as a batch is cut after its
# longest caption) within what glibc serves from its heap once tbps.runtime has set it up;
# batches of 512 took fresh pages from the kernel at every batch.
TEXT_BATCH = 256


@torch.no_grad()
def encode_texts(
    loaded: Encoder,
    captions: Sequence[str],
    *,
    batch_size: int = TEXT_BATCH,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    return_truncated: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Caption embeddings, float32 and L2-normalised; captions longer than the context are truncated.

    Captions are batched by token length when the model allows it (``Encoder.text_lengths``),
    so a family can cut each batch after its longest caption.

    Args:
        loaded: the model.
        captions: the captions.
        batch_size: captions per forward pass.
        device: where to run: the model is moved there; None runs it where it is.
        precision: ``auto``, ``fp32`` or ``bf16`` (autocast).
        return_truncated: also return :func:`caption_truncated`'s flags (from the same tokens).
        on_batch: called with the number of captions of each batch once it is embedded (progress).

    Returns:
        An array of shape (len(captions), embed_dim), in the order of ``captions``; with
        ``return_truncated``, a tuple of it and the bool flags.
    """
    device = place(loaded, device)
    tokenized = tokenize_captions(loaded, captions, truncated=return_truncated)
    out = encode_tokens(loaded, tokenized.tokens, batch_size=batch_size, device=device, dtype=autocast_dtype(precision, device),
                        on_batch=on_batch).cpu().numpy()
    return (out, tokenized.truncated) if return_truncated else out


@dataclass
class Tokenized:
    """Captions as token ids, with each caption's truncation flag (when asked for)."""

    tokens: torch.Tensor  # (n, context) int64, on the CPU
    truncated: np.ndarray | None  # (n,) bool: the caption is longer than the context


def tokenize_captions(loaded: Encoder, captions: Sequence[str], *, truncated: bool = True) -> Tokenized:
    """Tokenise captions (CPU work only: it can run ahead, in another thread, while the model runs).

    Args:
        loaded: the model whose tokenizer to use.
        captions: the captions.
        truncated: also compute :func:`caption_truncated`'s flags (from the same tokens).

    Returns:
        A :class:`Tokenized`.
    """
    if not len(captions):
        return Tokenized(torch.zeros((0, 0), dtype=torch.long), np.zeros(0, dtype=bool) if truncated else None)
    tokens = loaded.tokenizer(list(captions))
    return Tokenized(tokens, caption_truncated(loaded, captions, tokens) if truncated else None)


@torch.no_grad()
def encode_tokens(
    loaded: Encoder,
    tokens: torch.Tensor,
    *,
    batch_size: int = TEXT_BATCH,
    device: torch.device,
    dtype: torch.dtype | None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Caption embeddings of tokenised captions, left on ``device`` (no synchronisation with it).

    Captions are batched by token length when the model allows it (``Encoder.text_lengths``),
    so a family can cut each batch after its longest caption; the order is restored.

    Args:
        loaded: the model (already on ``device``).
        tokens: (n, context) token ids (:func:`tokenize_captions`).
        batch_size: captions per forward pass.
        device: where the model runs.
        dtype: the autocast dtype, or None for fp32.
        on_batch: called with the number of captions of each batch once it is queued (progress).

    Returns:
        (n, embed_dim) float32, L2-normalised, on ``device``, in the order of ``tokens``.
    """
    out = torch.zeros((len(tokens), loaded.embed_dim), dtype=torch.float32, device=device)
    if not len(tokens):
        return out
    lengths = loaded.text_lengths(tokens)
    # Similar lengths together, so each batch cut after its longest caption wastes little; the order is restored below.
    order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(len(tokens))
    for start in range(0, len(tokens), batch_size):
        idx = order[start : start + batch_size]
        batch = tokens[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = loaded.encode_text(batch)
        out[idx.to(device, non_blocking=True)] = torch.nn.functional.normalize(feats.float(), dim=-1)
        if on_batch:
            on_batch(len(idx))
    return out


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
    loaded: Encoder,
    paths: Sequence[str | None],
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    max_pixels: int | None = None,
    on_batch: Callable[[int], None] | None = None,
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
        on_batch: called with the number of images of each batch once it is embedded (progress).

    Returns:
        An :class:`ImageEncoding` in the order of ``paths``.
    """
    device = place(loaded, device)
    dtype = autocast_dtype(precision, device)
    n = len(paths)
    emb = np.zeros((n, loaded.embed_dim * loaded.image_vectors), dtype=np.float32)  # BLIP-2: its query vectors side by side
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
        if on_batch:
            on_batch(len(idx))
    return ImageEncoding(emb, status, error, hashes)
