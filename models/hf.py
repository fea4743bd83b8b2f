"""The Hugging Face transformers family: ``hf:NAME_OR_DIR``.

Specs this family loads (``--model``):

``hf:/path/to/dir``                a directory written by ``save_pretrained`` (model, tokenizer,
                                   and optionally the image processor's ``preprocessor_config.json``)
``hf:org/name``                    a Hub model id, from the local Hugging Face cache

The architecture comes from the directory's ``config.json`` (``model_type``):

=========  ================================  ===========================================  =========
type       class                             score (ITC)                                  ITM
=========  ================================  ===========================================  =========
clip       ``CLIPModel``                     cosine of the projected pooled features      no
siglip     ``SiglipModel``                   cosine of the pooled features                no
blip       ``BlipForImageTextRetrieval``     cosine of ``vision_proj`` / ``text_proj``    yes
blip-2     ``Blip2ForImageTextRetrieval``    max over the query embeddings of the cosine  yes
=========  ================================  ===========================================  =========

BLIP-2's ITC is the paper's released filter (LAVIS ``blip2_feature_extractor``): each image is
``num_query_tokens`` embeddings and its score against a caption is the largest of their cosines
with the caption's [CLS] feature. Its image embedding is therefore several vectors (``image_vectors``
of :class:`HfModel`), which :func:`tbps.models.protocol.similarity` compares.

Images are resized straight to the model's square input size (pedestrians fill the frame; no
crop) and normalised with the image processor's mean and std. A Hub id runs offline like the
open_clip family: weights missing from the cache fail at once, saying how to get them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from tbps.errors import TbpsError
from tbps.files import atomic_dir
from tbps.models.preprocess import PedestrianTransform

FAMILY_NAME = "hf"
PREFIX = "hf:"
_CLIP_STATS = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_HALF_STATS = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


@dataclass(frozen=True)
class Architecture:
    """One supported transformers architecture.

    Attributes:
        model_type: ``config.model_type``.
        cls: the transformers class that loads it.
        itm: whether it has an image-text matching head (:meth:`HfModel.pair_score`).
        pad_to_context: captions are padded to the full context and given no attention mask
            (SigLIP was trained so); otherwise padded to the batch's longest with a mask.
        stats: (mean, std) when the directory has no image processor config.
    """

    model_type: str
    cls: str
    itm: bool
    pad_to_context: bool
    stats: tuple[list[float], list[float]]


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("clip", "CLIPModel", itm=False, pad_to_context=False, stats=_CLIP_STATS),
    Architecture("siglip", "SiglipModel", itm=False, pad_to_context=True, stats=_HALF_STATS),
    Architecture("blip", "BlipForImageTextRetrieval", itm=True, pad_to_context=False, stats=_CLIP_STATS),
    Architecture("blip-2", "Blip2ForImageTextRetrieval", itm=True, pad_to_context=False, stats=_CLIP_STATS),
)}


class HfTokenizer:
    """Captions -> one int64 tensor (N, L) that carries the attention mask in its values.

    Token ids are stored plus one, so 0 marks padding (as in open_clip's tokens): ``ids = t - 1``
    where ``t > 0``, and the mask is ``t > 0``. One tensor keeps the collation, the batching by
    length and the ``tokens[:, -1] != 0`` test of a full context the same for every family.

    Args:
        tokenizer: the transformers tokenizer (picklable: it runs in DataLoader workers).
        context_length: the text context in tokens.
        pad_to_context: pad every caption to the context (SigLIP) instead of the batch's longest.
    """

    def __init__(self, tokenizer: Any, context_length: int, pad_to_context: bool) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.pad_to_context = pad_to_context

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(captions), padding="max_length" if self.pad_to_context else "longest", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        ids = enc["input_ids"].long()
        mask = enc["attention_mask"].bool() if "attention_mask" in enc and not self.pad_to_context else torch.ones_like(ids, dtype=torch.bool)
        out = torch.zeros((len(ids), self.context_length), dtype=torch.long)
        out[:, : ids.shape[1]] = torch.where(mask, ids + 1, torch.zeros_like(ids))
        return out


def split_tokens(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of an :class:`HfTokenizer` batch, cut after its longest caption."""
    mask = tokens > 0
    length = max(int(mask.sum(dim=1).max()), 1) if len(tokens) else 1
    mask = mask[:, :length]
    ids = torch.where(mask, tokens[:, :length] - 1, torch.full_like(tokens[:, :length], pad_id))
    return ids, mask.long()


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and a pooled output object in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _ContrastiveForward(torch.nn.Module):
    """(normalised image embeddings, normalised text embeddings, logit scale) for tbps's contrastive loss."""

    def __init__(self, loaded: "HfModel") -> None:
        super().__init__()
        self.net = loaded.model  # registered: training and DDP see the model's parameters
        self.loaded = loaded

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, person_ids: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None):
        image = torch.nn.functional.normalize(self.loaded.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(self.loaded.encode_text(tokens), dim=-1)
        if negatives is None:
            return image, text, self.net.logit_scale.exp()
        return image, text, self.net.logit_scale.exp(), None, torch.nn.functional.normalize(self.loaded.encode_text(negatives), dim=-1)


@dataclass
class HfModel:
    """A transformers image-text model with what it takes to feed it (implements :class:`tbps.models.protocol.Encoder`).

    Attributes:
        model: the transformers model (eval mode).
        name: the spec's model id or directory.
        arch: its :class:`Architecture`.
        tokenizer: an :class:`HfTokenizer`.
        preprocess: PIL image -> normalised tensor at the model's input size.
        image_size: (height, width) of the model's input.
        context_length: the text context in tokens.
        identity: what made the weights, for provenance.
    """

    model: torch.nn.Module
    name: str
    arch: Architecture
    tokenizer: HfTokenizer
    preprocess: PedestrianTransform
    image_size: tuple[int, int]
    context_length: int
    identity: dict[str, Any] = field(default_factory=dict)
    family: str = FAMILY_NAME

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        if self.arch.model_type == "clip":
            return int(cfg.projection_dim)
        if self.arch.model_type == "siglip":
            return int(cfg.text_config.hidden_size)
        return int(cfg.image_text_hidden_size)

    @property
    def image_vectors(self) -> int:
        """Embeddings per image: BLIP-2's query tokens, one for every other architecture."""
        return int(self.model.config.num_query_tokens) if self.arch.model_type == "blip-2" else 1

    @property
    def has_pair_score(self) -> bool:
        return self.arch.itm

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        m, kind = self.model, self.arch.model_type
        if kind in ("clip", "siglip"):
            return _features(m.get_image_features(pixel_values=pixels))
        return self._image_features(m.vision_model(pixel_values=pixels).last_hidden_state)

    def _image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """BLIP's and BLIP-2's ITC image features from the vision tower's hidden states."""
        m = self.model
        if self.arch.model_type == "blip":
            return m.vision_proj(image_embeds[:, 0, :])
        # BLIP-2: the Q-Former's query outputs, projected; flattened to (N, Q * D) for the core's tables.
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = m.qformer(query_embeds=m.query_tokens.expand(image_embeds.shape[0], -1, -1), encoder_hidden_states=image_embeds,
                          encoder_attention_mask=atts).last_hidden_state
        query = torch.nn.functional.normalize(m.vision_projection(query.to(m.vision_projection.weight.dtype)), dim=-1)
        return query.flatten(1)

    def encode_image_state(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC image features and the vision tower's hidden states (what the ITM head attends to), from one
        pass of the vision tower: with ``itm_score``, BLIP-2's ViT-g runs once per image, not twice.

        Raises:
            TbpsError: a model without an ITM head (CLIP, SigLIP) has no state to keep.
        """
        if not self.arch.itm:
            raise TbpsError(f"the {self.arch.model_type} model {self.name} has no image-text matching head", field="--model")
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        return self._image_features(image_embeds), image_embeds

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        m, kind = self.model, self.arch.model_type
        ids, mask = split_tokens(tokens, self._pad_id)
        if kind == "clip":
            return _features(m.get_text_features(input_ids=ids, attention_mask=mask))
        if kind == "siglip":
            return _features(m.get_text_features(input_ids=ids))
        if kind == "blip":
            hidden = m.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return m.text_proj(hidden[:, 0, :])
        hidden = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        return m.text_projection(hidden[:, 0, :].to(m.text_projection.weight.dtype))

    def text_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        # Masked padding leaves the embeddings unchanged, so captions may be batched by length.
        return None if self.arch.pad_to_context else (tokens > 0).sum(dim=1)

    def caption_too_long(self, caption: str) -> bool:
        return len(self.tokenizer.tokenizer(caption)["input_ids"]) > self.context_length

    def training_module(self) -> torch.nn.Module:
        if self.arch.model_type not in ("clip", "siglip"):
            raise TbpsError(f"tbps trains dual encoders; the {self.arch.model_type} model {self.name} is for scoring",
                            field="--model", value=self.identity.get("spec"), hint="train a clip or siglip model, or an open_clip one")
        return _ContrastiveForward(self)

    def pair_score(self, pixels: torch.Tensor | None, tokens: torch.Tensor, image_index: torch.Tensor | None = None,
                   image_state: torch.Tensor | None = None) -> torch.Tensor:
        """The ITM head's match probability of caption ``j`` with image ``image_index[j]``: softmax(logits)[:, 1].

        The head's forward as transformers' ``BlipForImageTextRetrieval`` and
        ``Blip2ForImageTextRetrieval`` run it with ``use_itm_head`` / ``use_image_text_matching_head``,
        from the vision tower's hidden states: ``image_state`` (from :meth:`encode_image_state`)
        or a pass over ``pixels``. tbps's token ids never carry BLIP-2's image placeholder tokens.
        """
        if not self.arch.itm:
            raise TbpsError(f"the {self.arch.model_type} model {self.name} has no image-text matching head",
                            field="--model", value=self.identity.get("spec"), hint="use a blip or blip-2 model for itm_score")
        m = self.model
        image_embeds = m.vision_model(pixel_values=pixels).last_hidden_state if image_state is None else image_state
        if image_index is not None:
            image_embeds = image_embeds[image_index.to(image_embeds.device)]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        ids, mask = split_tokens(tokens, self._pad_id)
        if self.arch.model_type == "blip":
            hidden = m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts).last_hidden_state
            logits = m.itm_head(hidden[:, 0, :])
        else:
            query = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
            query_mask = torch.ones(query.shape[:-1], dtype=torch.long, device=query.device)
            hidden = m.qformer(query_embeds=m.embeddings(input_ids=ids, query_embeds=query), query_length=query.shape[1],
                               attention_mask=torch.cat([query_mask, mask], dim=1), encoder_hidden_states=image_embeds,
                               encoder_attention_mask=image_atts).last_hidden_state
            logits = m.itm_head(hidden[:, : query.shape[1], :].to(m.itm_head.weight.dtype)).mean(dim=1)
        return logits.float().softmax(dim=-1)[:, 1]

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a ``save_pretrained`` directory (model and tokenizer) that ``hf:PATH`` loads back.

        Args:
            path: the directory to write (swapped in whole when complete).
            extra: more provenance, written to ``tbps.json`` inside it.

        Returns:
            The directory written.
        """
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.tokenizer.save_pretrained(tmp)
            (Path(tmp) / "tbps.json").write_text(json.dumps({"identity": self.identity, **(extra or {})}, default=str))
        return Path(path)


def _load_config(source: str, spec: str) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise TbpsError(f"not a transformers model directory ({type(exc).__name__}: {str(exc).splitlines()[0]})", path=source) from None
        raise TbpsError(
            f"weights for {spec} are not available offline ({type(exc).__name__})",
            hint="download them once with network access (TBPS_ALLOW_DOWNLOAD=1 tbps ...) into the Hugging Face cache, "
                 "or pass a directory written by save_pretrained as hf:/path/to/dir",
        ) from None


def _offline() -> bool:
    """Read at call time: tbps's entry point sets it (``runtime.offline_by_default``) before any load."""
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def _image_stats(source: str, arch: Architecture) -> tuple[list[float], list[float]]:
    """The image processor's mean and std when the model ships one, else the architecture's defaults."""
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError, KeyError):
        return arch.stats
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    return (list(mean), list(std)) if mean is not None and std is not None else arch.stats


def load(spec: str, seed: int = 0) -> HfModel:
    """Load a transformers image-text model (see the module docstring).

    Args:
        spec: ``hf:DIR`` or ``hf:ORG/NAME``.
        seed: unused (a transformers spec always names weights).

    Returns:
        The model with its tokenizer and preprocessing, in eval mode.

    Raises:
        TbpsError: nothing is named, the architecture is not supported, or the weights are not
            available offline.
    """
    source = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if not source:
        raise TbpsError("hf: names no model", field="--model", value=spec, hint="hf:/path/to/dir or hf:org/name")
    config = _load_config(source, spec)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise TbpsError(f"unsupported transformers architecture {config.model_type!r}", field="--model", value=spec,
                        hint=f"tbps loads {', '.join(ARCHITECTURES)} models")
    try:
        model = getattr(transformers, arch.cls).from_pretrained(source, local_files_only=_offline())
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=_offline())
    except (OSError, ValueError) as exc:
        raise TbpsError(f"cannot load the {arch.model_type} model ({type(exc).__name__}: {str(exc).splitlines()[0]})", path=source) from None
    model.eval()
    size = config.vision_config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    text_cfg = config.qformer_config if arch.model_type == "blip-2" else config.text_config
    context = int(min(getattr(text_cfg, "max_position_embeddings", 77), tok.model_max_length or 10**6))
    mean, std = _image_stats(source, arch)
    identity: dict[str, Any] = {"spec": spec, "weights": source, "architecture": arch.cls}
    return HfModel(model=model, name=source, arch=arch, tokenizer=HfTokenizer(tok, context, arch.pad_to_context),
                   preprocess=PedestrianTransform(size, mean, std), image_size=size, context_length=context, identity=identity)
