"""Model loading: the shipped ``tbps-tiny`` config, open_clip names, checkpoints and runs.

A model *spec* is one string, as typed after ``--model``:

``tbps-tiny``                      an open_clip config name alone: random weights (seeded)
``/path/my-vit.json``              an open_clip model config file: random weights (seeded)
``ViT-B-16:openai``                an open_clip name with a pretrained tag (from the local cache)
``ViT-B-16:/ckpt/epoch_5.pt``      an open_clip name with a local checkpoint file
``/path/model.pt``                 a checkpoint written by ``tbps export`` (it names its config)
``/path/run``                      a run directory written by ``tbps train``

tbps never downloads at run time unless ``TBPS_ALLOW_DOWNLOAD=1`` is set: a pretrained tag
whose weights are not in the local cache fails at once with a message saying how to get them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Decided before open_clip (and with it huggingface_hub) is imported: offline unless asked.
if os.environ.get("TBPS_ALLOW_DOWNLOAD") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tbps.errors import TbpsError  # noqa: E402
from tbps.models.tokens import fast_tokenizer  # noqa: E402

TINY = "tbps-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent
open_clip.add_model_config(_CONFIG_DIR / f"{TINY}.json")

# A checkpoint written by ``tbps export`` carries this key with the model name and config.
CHECKPOINT_KEY = "tbps_model"
RUN_MARKER = "run.json"


@dataclass
class LoadedModel:
    """An open_clip model with what it takes to feed it.

    Attributes:
        model: the open_clip ``CLIP`` module (eval mode).
        name: the open_clip config name.
        tokenizer: open_clip's tokenizer for the model.
        preprocess: PIL image -> normalised tensor at the model's input size.
        image_size: (height, width) of the model's input.
        context_length: the text context in tokens.
        identity: what made the weights (spec, source, content hash), for provenance.
    """

    model: torch.nn.Module
    name: str
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable[[Image.Image], torch.Tensor]
    image_size: tuple[int, int]
    context_length: int
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else int(
            self.model.visual.output_dim
        )


class PedestrianTransform:
    """PIL image -> normalised float tensor (3, height, width): resized straight to the model's size, no crop.

    Pedestrians fill the frame, so the image is resized (bicubic, Pillow's antialiasing) to the
    model's (height, width) without cropping. The output equals torchvision's
    ``Compose([Resize(size, BICUBIC), ToTensor(), Normalize(mean, std)])`` bit for bit; it skips
    the resize when the image already has the size, and does the conversion in a few tensor
    operations, because in ``tbps score`` this runs once per image in the decoding workers.

    Args:
        image_size: (height, width) of the model's input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(self, image_size: tuple[int, int], mean, std):
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        """One image, resized and normalised: a float32 tensor (3, height, width)."""
        return self.normalise(self.to_uint8(im))

    def to_uint8(self, im: Image.Image) -> torch.Tensor:
        """The part that needs the PIL image: converted to RGB and resized.

        Args:
            im: a PIL image of any mode and size.

        Returns:
            A uint8 tensor (3, height, width).
        """
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (self.width, self.height):
            im = im.resize((self.width, self.height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to the model's input, where they are: the same values as image by image.

        Decoding workers send uint8 (a quarter of the bytes) and the batch is normalised in one
        vectorised pass on the model's device. The divisor is a tensor, not a Python number:
        CUDA turns division by a number into a multiplication by its reciprocal, one bit off.

        Args:
            pixels: uint8 (3, H, W) or a batch (N, 3, H, W), on any device.

        Returns:
            float32 pixels of the same shape, on the same device.
        """
        device = pixels.device
        scale = torch.full((), 255.0, device=device)
        return pixels.float().div_(scale).sub_(self.mean.to(device)).div_(self.std.to(device))

    def __repr__(self) -> str:
        return f"PedestrianTransform(size=({self.height}, {self.width}), bicubic, normalise)"


def file_hash(path: str | Path, algo: str = "blake2b", digest_size: int = 16) -> str:
    """A hex content hash of a file, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=digest_size) if algo == "blake2b" else hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's root-logger warning that random weights were used: tbps means it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _wrap(model: torch.nn.Module, name: str, identity: dict[str, Any]) -> LoadedModel:
    model.eval()
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    tokenizer = fast_tokenizer(open_clip.get_tokenizer(name))
    context = int(getattr(tokenizer, "context_length", getattr(model, "context_length", 77)))
    return LoadedModel(
        model=model,
        name=name,
        tokenizer=tokenizer,
        preprocess=PedestrianTransform(size, pp["mean"], pp["std"]),
        image_size=size,
        context_length=context,
        identity=identity,
    )


def create(name: str = TINY, seed: int = 0) -> LoadedModel:
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


def save_checkpoint(loaded: LoadedModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a plain open_clip state dict that names its own config, for ``load``.

    Args:
        loaded: the model to save (adapters must already be merged).
        path: the file to write (written to a temporary file, then renamed).
        extra: more provenance to store beside the config.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        CHECKPOINT_KEY: {
            "name": loaded.name,
            "config": open_clip.get_model_config(loaded.name),
            "identity": loaded.identity,
            **(extra or {}),
        },
        "state_dict": {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


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


_CONFIG_TMP: Path | None = None


def _load_exported(path: Path) -> LoadedModel:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload[CHECKPOINT_KEY]
    name = meta["name"]
    _register_config(name, meta["config"], path)  # the checkpoint carries its config
    with _quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(payload["state_dict"])
    return _wrap(model, name, {"spec": str(path), "weights": str(path), "sha": file_hash(path)})


def _create_from_config(path: Path, seed: int) -> LoadedModel:
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


def load(spec: str, seed: int = 0) -> LoadedModel:
    """Load a model from a spec string (see the module docstring).

    Args:
        spec: ``NAME``, ``NAME:TAG``, ``NAME:/path/file.pt``, a config ``.json``, an exported checkpoint or a
            run directory.
        seed: the seed for random initialisation (``NAME`` alone).

    Returns:
        The model with its tokenizer and preprocessing, in eval mode.

    Raises:
        TbpsError: the spec names nothing loadable, or the weights are not available offline.
    """
    path = Path(spec)
    if path.suffix == ".json":
        return _create_from_config(path, seed)
    if path.is_dir():
        if not (path / RUN_MARKER).exists():
            raise TbpsError("not a tbps run directory", path=path, hint=f"a run directory holds {RUN_MARKER}")
        from tbps.train.checkpoint import load_run_model  # a run is the training package's format

        return load_run_model(path)
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise TbpsError(f"cannot read checkpoint: {exc}", path=path) from exc
        if not (isinstance(payload, dict) and CHECKPOINT_KEY in payload):
            raise TbpsError(
                "checkpoint does not name its model config",
                path=path,
                hint=f"pass it as NAME:{path} with the open_clip config name it was trained with",
            )
        return _load_exported(path)
    name, sep, pretrained = spec.partition(":")
    if not sep:
        if os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise TbpsError("model file not found", path=spec)
        return create(name, seed=seed)
    if name not in open_clip.list_models():
        raise TbpsError("unknown open_clip model name", field="--model", value=name)
    is_file = Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"} or os.sep in pretrained
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


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
