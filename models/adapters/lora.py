"""LoRA: ``W' = W0 + s*B@A`` with ``s = lora_alpha / r`` (``scaling``), no magnitude."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tbps.models.adapters.base import Variant, add_low_rank, no_autocast


class LoRA(Variant):
    """``W' = W0 + s*B@A``, ``s = lora_alpha / r``."""

    name = "lora"
    options = {"lora_alpha": 16.0}
    positive = ("lora_alpha",)
    parameters = ("lora_A", "lora_B")

    @classmethod
    def init(cls, layer: nn.Module, w0: Tensor, lora_alpha: float) -> None:
        layer.scaling = lora_alpha / layer.rank
        add_low_rank(layer, w0)

    @classmethod
    def merge(cls, layer: nn.Module, w0: Tensor) -> Tensor:
        with no_autocast(w0.device):
            return w0 + layer.scaling * (layer.lora_B @ layer.lora_A)

    @classmethod
    def forward(cls, layer: nn.Module, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w0, bias) + F.linear(F.linear(x, layer.lora_A) * layer.scaling, layer.lora_B)
