"""The model-family registry: which module loads a ``--model`` spec.

Kept free of torch and of the families' libraries, so the CLI can build ``--help`` from it
(``tbps --help`` starts without importing torch). A family's module is imported the first time
one of its specs is loaded. Adding a family is one module (``models/NAME.py`` with
``load(spec, seed) -> Encoder``) and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the family's name, as its encoders report it (``Encoder.family``).
        forms: the ``--model`` spec forms it loads, for ``--help`` and the README.
        claims: whether a spec is this family's (tried in registry order; the last claims all).
        module: the module whose ``load(spec, seed)`` returns an ``Encoder``.
    """

    name: str
    forms: str
    claims: Callable[[str], bool]
    module: str


FAMILIES: tuple[Family, ...] = (
    Family("hf", "hf:DIR (a transformers save_pretrained directory) or hf:ORG/NAME (from the local Hugging Face cache): "
                 "clip, siglip, blip, blip-2", lambda spec: spec.startswith("hf:"), "tbps.models.hf"),
    Family("run", "a run directory written by `tbps train`", lambda spec: Path(spec).is_dir(), "tbps.models.runs"),
    Family(
        "open_clip",
        "tbps-tiny, NAME (random weights), NAME:TAG (cached pretrained), NAME:/file.pt, hf-hub:ORG/NAME (cached), "
        "a model config .json, a checkpoint written by `tbps export`",
        lambda spec: True,  # the catch-all: its errors name the forms it takes
        "tbps.models.openclip",
    ),
)


def family_of(spec: str) -> Family:
    """The first family that claims ``spec``."""
    return next(f for f in FAMILIES if f.claims(spec))


def load(spec: str, seed: int = 0) -> Any:
    """Load a model from a spec string with the family that claims it.

    Args:
        spec: what ``--model`` was given.
        seed: the seed for random initialisation (specs without weights).

    Returns:
        An :class:`tbps.models.protocol.Encoder`, in eval mode.

    Raises:
        TbpsError: the spec names nothing loadable, or the weights are not available offline.
    """
    family = family_of(spec)
    return importlib.import_module(family.module).load(spec, seed)


def model_help() -> str:
    """The ``--model`` help: every family's spec forms."""
    return "; ".join(f"{f.name}: {f.forms}" for f in FAMILIES) + "."
