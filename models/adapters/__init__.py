"""WoRA, DoRA and LoRA adapters for any ``nn.Linear`` / ``nn.MultiheadAttention``, in tbps's own code.

PEFT cannot put DoRA-style adapters on open_clip's attention (``nn.MultiheadAttention`` keeps q/k/v
in one ``in_proj_weight`` parameter), so tbps wraps those layers itself. :func:`apply_adapters`
replaces each targeted layer by a wrapper that keeps the frozen pretrained weight ``W0`` under its
original name (``weight``, ``in_proj_weight``) and adds the adapter parameters beside it, named in
PEFT's vocabulary and the paper's symbols:

============  ==========  =============================================================
name          shape       meaning
============  ==========  =============================================================
lora_A        (r, in)     A, Kaiming-uniform (a = sqrt 5) as in LoRA/PEFT
lora_B        (out, r)    B, zeros: at initialisation the adapted layer equals the base
magnitude     (1, in) or  m, initialised to ||W0|| of the weights loaded *at wrap time*
              (out, 1)
wora_alpha    ()          alpha, learnable scalar (wora only), default 8
wora_beta     ()          beta, learnable scalar (wora only), default 1
============  ==========  =============================================================

Methods (``method=``), one class each, registered in :mod:`.methods` (``REGISTRY``):

``wora`` (default, :mod:`.wora`)
    ``W' = m * (beta*W0 + alpha*B@A) / ||beta*W0 + alpha*B@A||``, alpha, beta, m, A, B learnable.
``dora`` (:mod:`.dora`)
    The same with alpha = ``lora_alpha / r`` and beta = 1 fixed, per-output norm.
``lora`` (:mod:`.lora`)
    ``W' = W0 + (lora_alpha / r) * B@A``, no magnitude.
``full``
    No adapter modules; every parameter of the model is trainable.
``none``
    No adapter modules; every parameter is frozen (evaluation).

Norm conventions for wora (``wora_norm=``): ``per-input`` (default, the paper's released code)
or ``per-output`` (DoRA/PEFT); see :mod:`.base`. Targets, what trains and the checkpoint files:
see :mod:`.core`.

Layout: :mod:`.base` (the :class:`~.base.Variant` interface and shared maths), one module per
method, :mod:`.methods` (the registry), :mod:`.config` (:class:`AdapterConfig`), :mod:`.layers`
(the wrappers) and :mod:`.core` (apply, merge, save, load). A new method is a module with a
``Variant`` subclass and one line in ``REGISTRY``.

This face imports the torch-free registry only and the rest on first use of a name (as the
root package does), so the CLI reads ``METHODS`` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from tbps.models.adapters.methods import ADAPTER_METHODS, METHODS, REGISTRY, adapter_help

# Public name -> the submodule defining it, imported when the name is first used.
_LAZY = {
    **dict.fromkeys(("NORMS", "Variant"), "base"),
    **dict.fromkeys(("ADAPTER_PARAMETERS", "VARIANTS", "AdapterConfig"), "config"),
    **dict.fromkeys(("AdaptedLinear", "AdaptedMultiheadAttention", "AdapterLayer"), "layers"),
    **dict.fromkeys(
        (
            "BASE_MODEL_KEY",
            "CONFIG_FILE",
            "FORMAT",
            "WEIGHTS_FILE",
            "adaptable_modules",
            "adapter_config",
            "adapter_state_dict",
            "apply_adapters",
            "base_model_of",
            "load_adapters",
            "mark_base_model",
            "merge_adapters",
            "read_adapter_config",
            "save_adapters",
        ),
        "core",
    ),
}

__all__ = ["ADAPTER_METHODS", "METHODS", "REGISTRY", "adapter_help", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
