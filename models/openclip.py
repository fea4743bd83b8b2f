"""The open_clip model family: the shipped ``tbps-tiny`` config, open_clip names, config files and checkpoints.

Specs this family loads (``--model``):

``tbps-tiny``                      an open_clip config name alone: random weights (seeded)
``/path/my-vit.json``              an open_clip model config file: random weights (seeded)
``ViT-B-16:openai``                an open_clip name with a pretrained tag (from the local cache)
``ViT-B-16:/ckpt/epoch_5.pt``      an open_clip name with a local checkpoint file
``/path/model.pt``                 a checkpoint written by ``tbps export`` (it names its config)

A pretrained tag whose weights are not in the local cache fails at once with a message saying
how to get them (the ``tbps`` program runs offline unless ``TBPS_ALLOW_DOWNLOAD=1``).
Everything open_clip-specific lives here: the config registry, the tokenizer cache
(:mod:`tbps.models.tokens`), the text trimming and the normalisation statistics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from open_clip.transformer import text_global_pool

from tbps.errors import TbpsError
from tbps.files import atomic_write, file_hash
from tbps.models.preprocess import PedestrianTransform
from tbps.models.tokens import fast_tokenizer

FAMILY_NAME = "open_clip"
TINY = "tbps-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent
open_clip.add_model_config(_CONFIG_DIR / f"{TINY}.json")

# A checkpoint written by ``tbps export`` carries this key with the model name and config.
CHECKPOINT_KEY = "tbps_model"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _trimmable(model: torch.nn.Module) -> bool:
    """Whether the text tower pools the end-of-text token under a causal mask (open_clip CLIP).

    Then no position after the last end-of-text token of a batch can reach the pooled output,
    and the batch can be cut there: the same embeddings for a fraction of the work.
    """
    mask = getattr(model, "attn_mask", None)
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and mask is not None
        and bool(torch.equal(torch.isinf(mask), torch.triu(torch.ones_like(mask, dtype=torch.bool), 1)))
    )


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on tokens cut after the batch's last end-of-text token."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type)
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


class _ContrastiveForward(torch.nn.Module):
    """open_clip's ``CLIP.forward`` for training, with each text batch cut after its longest caption.

    The parameters are the wrapped model's own (``clip``); cutting the padding changes no
    embedding when the text tower allows it (:func:`_trimmable`) and halves the text tower's work
    on typical captions (about 20 of 64 tokens).
    """

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        clip = self.clip
        if not _trimmable(clip):
            return tuple(clip(image=pixels, text=tokens)[:3])
        image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(encode_text_trimmed(clip, tokens), dim=-1)
        return image, text, clip.logit_scale.exp()


@dataclass
class OpenClipModel:
    """An open_clip model with what it takes to feed it (implements :class:`tbps.models.protocol.Encoder`).

    Attributes:
        model: the open_clip ``CLIP`` module (eval mode).
        name: the open_clip config name.
        tokenizer: open_clip's tokenizer for the model (word-cached when it is the plain CLIP one).
        preprocess: PIL image -> normalised tensor at the model's input size.
        image_size: (height, width) of the model's input.
        context_length: the text context in tokens.
        identity: what made the weights (spec, source, content hash), for provenance.
    """

    model: torch.nn.Module
    name: str
    tokenizer: Callable[..., torch.Tensor]
    preprocess: PedestrianTransform
    image_size: tuple[int, int]
    context_length: int
    identity: dict[str, Any] = field(default_factory=dict)
    family: str = FAMILY_NAME

    @property
    def embed_dim(self) -> int:
        m = self.model
        return int(m.text_projection.shape[1]) if hasattr(m, "text_projection") else int(m.visual.output_dim)

    @property
    def has_pair_score(self) -> bool:
        return False

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # Cut after the batch's longest caption when the causal text tower allows it (same embeddings).
        return encode_text_trimmed(self.model, tokens) if _trimmable(self.model) else self.model.encode_text(tokens)

    def text_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return tokens.argmax(dim=-1) if _trimmable(self.model) else None

    def caption_too_long(self, caption: str) -> bool:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # Hugging Face tokenizers: tokenise without truncation
            return len(self.tokenizer.tokenizer(caption)["input_ids"]) > self.context_length
        return len(encode(caption)) + 2 > self.context_length  # + start and end tokens

    def training_module(self) -> torch.nn.Module:
        return _ContrastiveForward(self.model)

    def pair_score(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise TbpsError(f"the open_clip model {self.name} has no image-text matching head", field="--model", value=self.identity.get("spec"))

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a plain open_clip state dict that names its own config, for ``tbps.models.load``.

        Args:
            path: the file to write (atomically).
            extra: more provenance to store beside the config.

        Returns:
            The path written.
        """
        payload = {
            CHECKPOINT_KEY: {"name": self.name, "config": open_clip.get_model_config(self.name), "identity": self.identity, **(extra or {})},
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }
        with atomic_write(path) as fh:
            torch.save(payload, fh)
        return Path(path)


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger warning that random weights were used: tbps means it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _wrap(model: torch.nn.Module, name: str, identity: dict[str, Any]) -> OpenClipModel:
    model.eval()
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    tokenizer = fast_tokenizer(open_clip.get_tokenizer(name))
    context = int(getattr(tokenizer, "context_length", getattr(model, "context_length", 77)))
    return OpenClipModel(
        model=model, name=name, tokenizer=tokenizer, preprocess=PedestrianTransform(size, pp["mean"], pp["std"]),
        image_size=size, context_length=context, identity=identity,
    )


def create(name: str = TINY, seed: int = 0) -> OpenClipModel:
    """A model from an open_clip config name with seeded random weights.

    Args:
        name: an open_clip config name (``tbps-tiny`` is shipped with tbps).
        seed: the seed of the random initialisation.

    Returns:
        The model, in eval mode.
    """
    if name not in open_clip.list_models():
        raise TbpsError(
            "unknown model config",
            field="--model",
            value=name,
            hint=f"use {TINY}, an open_clip name such as ViT-B-16 (see open_clip.list_models()), a checkpoint or a run directory",
        )
    with torch.random.fork_rng(), _quiet_open_clip():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return _wrap(model, name, {"spec": name, "weights": f"random(seed={seed})"})


_CONFIG_TMP: Path | None = None


def _register_config(name: str, config: dict[str, Any], source: Path) -> None:
    """Make ``name`` an open_clip model config, unless it already is with this content.

    open_clip keeps one registry per process, keyed by name: a second, different config under a
    known name (a built-in, or another file with the same stem) would silently replace it, so
    that is refused.
    """
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) != config:
            raise TbpsError(
                f"a different model config named {name!r} is already known (an open_clip built-in or another file)",
                path=source,
                hint="rename the config file: its name is the model's name",
            )
        return
    global _CONFIG_TMP
    if _CONFIG_TMP is None:
        _CONFIG_TMP = Path(tempfile.mkdtemp(prefix="tbps-configs-"))
    copy = _CONFIG_TMP / f"{name}.json"  # open_clip names a config after its file
    copy.write_text(json.dumps(config))
    open_clip.add_model_config(copy)


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The payload of a checkpoint file written by ``tbps export``, or None for any other file.

    Raises:
        TbpsError: the file cannot be read as a torch checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TbpsError(f"cannot read checkpoint: {exc}", path=path) from exc
    return payload if isinstance(payload, dict) and CHECKPOINT_KEY in payload else None


def _load_exported(path: Path) -> OpenClipModel:
    payload = read_checkpoint(path)
    if payload is None:
        raise TbpsError(
            "checkpoint does not name its model config",
            path=path,
            hint=f"pass it as NAME:{path} with the open_clip config name it was trained with",
        )
    meta = payload[CHECKPOINT_KEY]
    name = meta["name"]
    _register_config(name, meta["config"], path)  # the checkpoint carries its config
    with _quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(payload["state_dict"])
    return _wrap(model, name, {"spec": str(path), "weights": str(path), "sha": file_hash(path)})


def _create_from_config(path: Path, seed: int) -> OpenClipModel:
    """A model with random weights from an open_clip config file, named after the file's stem."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise TbpsError("model config file not found", path=path) from None
    except (OSError, ValueError) as exc:
        raise TbpsError(f"cannot read model config: {exc}", path=path) from exc
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or key not in config]
    if missing:
        raise TbpsError(
            f"not an open_clip model config: missing {', '.join(missing)}",
            path=path,
            hint="copy one from open_clip.get_model_config('ViT-B-16') and edit it",
        )
    _register_config(path.stem, config, path)
    loaded = create(path.stem, seed=seed)
    loaded.identity.update(spec=str(path), config_sha=file_hash(path))
    return loaded


def _load_pretrained(spec: str, name: str, pretrained: str) -> OpenClipModel:
    if name not in open_clip.list_models():
        raise TbpsError("unknown open_clip model name", field="--model", value=name)
    is_file = Path(pretrained).suffix in WEIGHT_SUFFIXES or os.sep in pretrained
    if is_file and not Path(pretrained).is_file():
        raise TbpsError("checkpoint file not found", path=pretrained)
    if not is_file and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise TbpsError(f"open_clip has no pretrained tag {pretrained!r} for {name}", hint=f"known tags: {tags}")
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:  # noqa: BLE001 - offline hub misses surface as many exception types
        raise TbpsError(
            f"weights for {spec} are not available offline ({type(exc).__name__})",
            hint=(
                "download them once with network access (TBPS_ALLOW_DOWNLOAD=1 tbps ...) into the "
                "Hugging Face / open_clip cache, or pass a local file as NAME:/path/to/weights.pt"
            ),
        ) from exc
    identity = {"spec": spec, "weights": pretrained}
    if is_file:
        identity["sha"] = file_hash(pretrained)
    return _wrap(model, name, identity)


def load(spec: str, seed: int = 0) -> OpenClipModel:
    """Load an open_clip model from a spec string (see the module docstring).

    Args:
        spec: ``NAME``, ``NAME:TAG``, ``NAME:/path/file.pt``, a config ``.json`` or an exported checkpoint.
        seed: the seed for random initialisation (``NAME`` and config files).

    Returns:
        The model with its tokenizer and preprocessing, in eval mode.

    Raises:
        TbpsError: the spec names nothing loadable, or the weights are not available offline.
    """
    path = Path(spec)
    if path.suffix == ".json":
        return _create_from_config(path, seed)
    if path.is_file():
        return _load_exported(path)
    name, sep, pretrained = spec.partition(":")
    if sep:
        return _load_pretrained(spec, name, pretrained)
    if os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        raise TbpsError("model file not found", path=spec)
    return create(name, seed=seed)
