"""The open_clip model family: the shipped ``tbps-tiny`` config, open_clip names, config files and checkpoints.

Specs this family loads (``--model``):

``tbps-tiny``                      an open_clip config name alone: random weights (seeded)
``/path/my-vit.json``              an open_clip model config file: random weights (seeded)
``ViT-B-16:openai``                an open_clip name with a pretrained tag (from the local cache)
``ViT-B-16:/ckpt/epoch_5.pt``      an open_clip name with a local checkpoint file
``/path/model.pt``                 a checkpoint written by ``tbps export`` (it names its config)
``hf-hub:org/name``                open_clip's Hugging Face Hub form (config and weights from the local cache)

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
from typing import Any, Callable

import open_clip
import torch
from open_clip.transformer import text_global_pool

from tbps.errors import TbpsError
from tbps.files import atomic_write, file_hash
from tbps.models.itm import HeadConfig, MatchingHead, hardest_negatives, itm_loss
from tbps.models.preprocess import PedestrianTransform
from tbps.models.tokens import fast_tokenizer

FAMILY_NAME = "open_clip"
TINY = "tbps-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent
open_clip.add_model_config(_CONFIG_DIR / f"{TINY}.json")

# A checkpoint written by ``tbps export`` carries this key with the model name and config.
CHECKPOINT_KEY = "tbps_model"
ITM_HEAD_KEY = "itm_head"  # ... and, when it has one, its matching head's config (in the meta) and weights
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


def image_token_features(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled image features, patch tokens) of open_clip's ``VisionTransformer`` in one pass."""
    visual = model.visual
    previous = visual.output_tokens
    visual.output_tokens = True  # a plain switch of open_clip's ViT: return the tokens beside the pooled output
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = previous
    return pooled, tokens


def text_token_features(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled text features, per-token features after ``ln_final``, the caption-token mask).

    The mask is True from the start token through the end-of-text token of each caption; the
    batch is cut after its longest caption, as :func:`encode_text_trimmed` does.
    """
    if not _trimmable(model):
        raise TbpsError("an image-text matching head needs open_clip's causal text tower (argmax pooling)", field="--model")
    ends = tokens.argmax(dim=-1)
    length = int(ends.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = text_global_pool(x, tokens, model.text_pool_type)
    pooled = model.text_projection(pooled) if isinstance(model.text_projection, torch.nn.Linear) else pooled @ model.text_projection
    mask = torch.arange(length, device=tokens.device)[None, :] <= ends[:, None]
    return pooled, x, mask


def head_config_for(model: torch.nn.Module, **shape: int) -> HeadConfig:
    """The matching head's config for an open_clip model: its text and image token widths."""
    shape.setdefault("cosine", True)
    return HeadConfig(text_width=int(model.ln_final.normalized_shape[0]), image_width=int(model.visual.transformer.width), **shape)


class _MatchingForward(torch.nn.Module):
    """The contrastive forward plus the matching head's loss on in-batch hard negatives and perturbations.

    ``forward(pixels, tokens, person_ids, negatives, negative_valid)`` returns (normalised image
    embeddings, normalised text embeddings, logit scale, the ITM loss, the normalised embeddings
    of the perturbed captions or None). The image and text towers run once for both losses.
    """

    def __init__(self, clip: torch.nn.Module, head: MatchingHead) -> None:
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, person_ids: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None):
        clip = self.clip
        image_pooled, image_tokens = image_token_features(clip, pixels)
        text_pooled, text_feats, text_mask = text_token_features(clip, tokens)
        image = torch.nn.functional.normalize(image_pooled, dim=-1)
        text = torch.nn.functional.normalize(text_pooled, dim=-1)
        sims = image @ text.T
        text_for_image, image_for_text = hardest_negatives(sims, person_ids)
        positive = self.head(text_feats, text_mask, image_tokens, sims.diagonal())
        kinds = []
        rows = torch.nonzero(text_for_image >= 0).flatten()
        t = text_for_image[rows]
        kinds.append(self.head(text_feats[t], text_mask[t], image_tokens[rows], sims[rows, t]))
        cols = torch.nonzero(image_for_text >= 0).flatten()
        i = image_for_text[cols]
        kinds.append(self.head(text_feats[cols], text_mask[cols], image_tokens[i], sims[i, cols]))
        negative_text = None
        if negatives is not None and len(negatives):
            neg_pooled, neg_feats, neg_mask = text_token_features(clip, negatives)
            negative_text = torch.nn.functional.normalize(neg_pooled, dim=-1)
            valid = torch.ones(len(negatives), dtype=torch.bool, device=pixels.device) if negative_valid is None else negative_valid
            rows = torch.nonzero(valid).flatten()  # a row's own caption, perturbed, against its image
            cosine = (image[rows] * negative_text[rows]).sum(dim=-1)
            kinds.append(self.head(neg_feats[rows], neg_mask[rows], image_tokens[rows], cosine))
        return image, text, clip.logit_scale.exp(), itm_loss(positive, kinds), negative_text


class _ContrastiveForward(torch.nn.Module):
    """open_clip's ``CLIP.forward`` for training, with each text batch cut after its longest caption.

    The parameters are the wrapped model's own (``clip``); cutting the padding changes no
    embedding when the text tower allows it (:func:`_trimmable`) and halves the text tower's work
    on typical captions (about 20 of 64 tokens).
    """

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, person_ids: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None):
        clip = self.clip
        if not _trimmable(clip):
            out = tuple(clip(image=pixels, text=tokens)[:3])
        else:
            image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
            text = torch.nn.functional.normalize(encode_text_trimmed(clip, tokens), dim=-1)
            out = (image, text, clip.logit_scale.exp())
        if negatives is None:
            return out
        # --hard-negatives (NegCLIP): the perturbed captions' embeddings, for the contrastive loss.
        negative_text = encode_text_trimmed(clip, negatives) if _trimmable(clip) else clip.encode_text(negatives)
        return (*out, None, torch.nn.functional.normalize(negative_text, dim=-1))


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
    itm_head: MatchingHead | None = None  # an image-text matching head trained with ``tbps train --itm-head``

    @property
    def embed_dim(self) -> int:
        m = self.model
        return int(m.text_projection.shape[1]) if hasattr(m, "text_projection") else int(m.visual.output_dim)

    @property
    def has_pair_score(self) -> bool:
        return self.itm_head is not None

    @property
    def image_vectors(self) -> int:
        return 1

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_image_state(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Image features (as :meth:`encode_image`) and what the matching head reads of each image,
        from one pass of the image tower: scoring with ``itm_score`` then runs the tower once per
        image, not once for the cosine and again for the head.

        Returns:
            (features, state): ``state`` rows follow ``pixels``; pass rows of it to :meth:`pair_score`.
        """
        pooled, tokens = image_token_features(self.model, pixels)
        return pooled, (pooled, tokens)

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
        if self.itm_head is not None:
            return _MatchingForward(self.model, self.itm_head)
        return _ContrastiveForward(self.model)

    def attach_itm_head(self, config: HeadConfig | None = None, state: dict[str, torch.Tensor] | None = None) -> MatchingHead:
        """Give the model a matching head: a new one (seeded by the caller's RNG) or one with saved weights.

        Args:
            config: the head's shape (default: :func:`head_config_for` the model).
            state: the head's saved state dict.

        Returns:
            The head (also :attr:`itm_head`), on the model's device.
        """
        head = MatchingHead(config or head_config_for(self.model))
        if state is not None:
            head.load_state_dict(state)
        device = next(self.model.parameters()).device
        self.itm_head = head.to(device).train(self.model.training)
        return self.itm_head

    def pair_score(self, pixels: torch.Tensor | None, tokens: torch.Tensor, image_index: torch.Tensor | None = None,
                   image_state: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The matching head's probability that caption ``j`` describes image ``image_index[j]``.

        Args:
            pixels: (B, 3, H, W) normalised images, each run through the image tower once; None
                with ``image_state``.
            tokens: (M, L) captions from :attr:`tokenizer`.
            image_index: (M,) the image of each caption (default: row ``j`` pairs with image ``j``).
            image_state: the B images' state from :meth:`encode_image_state`, instead of ``pixels``.

        Returns:
            (M,) probabilities, float32.
        """
        if self.itm_head is None:
            raise TbpsError(f"the open_clip model {self.name} has no image-text matching head", field="--model",
                            value=self.identity.get("spec"), hint="train one with tbps train --itm-head, or score with a blip / blip-2 model")
        image_pooled, image_tokens = image_token_features(self.model, pixels) if image_state is None else image_state
        text_pooled, text_feats, text_mask = text_token_features(self.model, tokens)
        index = torch.arange(len(tokens), device=tokens.device) if image_index is None else image_index.to(tokens.device)
        normalize = torch.nn.functional.normalize
        cosine = (normalize(image_pooled, dim=-1)[index] * normalize(text_pooled, dim=-1)).sum(dim=-1)
        return torch.sigmoid(self.itm_head(text_feats, text_mask, image_tokens[index], cosine).float())

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
        if self.itm_head is not None:
            payload[CHECKPOINT_KEY][ITM_HEAD_KEY] = self.itm_head.config.to_dict()
            payload[ITM_HEAD_KEY] = {k: v.detach().cpu() for k, v in self.itm_head.state_dict().items()}
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
    loaded = _wrap(model, name, {"spec": str(path), "weights": str(path), "sha": file_hash(path)})
    if ITM_HEAD_KEY in payload:
        loaded.attach_itm_head(HeadConfig(**meta[ITM_HEAD_KEY]), payload[ITM_HEAD_KEY]).eval()
    return loaded


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


HF_HUB = "hf-hub:"


def _load_hf_hub(spec: str) -> OpenClipModel:
    """``hf-hub:ORG/NAME``: open_clip's Hub form, from the local Hugging Face cache (offline by default).

    The config is registered under a local name (``hf-hub-ORG-NAME``) so an exported checkpoint
    names a config that loads again without the Hub.
    """
    model_id = spec[len(HF_HUB):]
    offline_hint = ("download it once with network access (TBPS_ALLOW_DOWNLOAD=1 tbps ...) into the Hugging Face cache, "
                    "or pass a local file as NAME:/path/to/weights.pt")
    if not model_id:
        raise TbpsError("hf-hub: names no model", field="--model", value=spec, hint="hf-hub:org/name")
    try:
        config = open_clip.get_model_config(spec)
        with _quiet_open_clip():
            model = open_clip.create_model(spec, require_pretrained=True)
    except Exception as exc:  # noqa: BLE001 - offline hub misses surface as many exception types
        raise TbpsError(f"{spec} is not available offline ({type(exc).__name__})", hint=offline_hint) from exc
    name = "hf-hub-" + model_id.replace("/", "-")
    _register_config(name, config, Path(model_id))
    return _wrap(model, name, {"spec": spec, "weights": spec})


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
    if spec.startswith(HF_HUB):
        return _load_hf_hub(spec)
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
