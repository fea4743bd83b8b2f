"""DoRA: WoRA with alpha and beta fixed.

``W' = m * (W0 + s*B@A) / ||W0 + s*B@A||`` with PEFT's LoRA scaling ``s = lora_alpha / r`` in
alpha's place, beta = 1, and PEFT's per-output norm (one magnitude per output unit). Unlike
PEFT, the norm is not detached: gradients flow through it (the forward is the same).
"""

from __future__ import annotations

from torch import Tensor, nn

from tbps.models.adapters.base import add_low_rank, add_magnitude
from tbps.models.adapters.wora import WoRA


class DoRA(WoRA):
    """``W' = m * (W0 + s*B@A) / ||W0 + s*B@A||``, ``s = lora_alpha / r``, per output unit."""

    name = "dora"
    options = {"lora_alpha": 16.0}
    positive = ("lora_alpha",)
    parameters = ("lora_A", "lora_B", "magnitude")
    norm = "per-output"
    takes_wora_norm = False

    @classmethod
    def init(cls, layer: nn.Module, w0: Tensor, lora_alpha: float) -> None:
        layer.scaling = lora_alpha / layer.rank
        add_low_rank(layer, w0)
        add_magnitude(layer, w0)

    @classmethod
    def alpha_beta(cls, layer: nn.Module) -> tuple[Tensor | float, Tensor | float]:
        return layer.scaling, 1.0
