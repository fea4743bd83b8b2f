"""WoRA (Sun et al., "From Data Deluge to Data Curation", WWW 2025), the default method.

``W' = m * (beta*W0 + alpha*B@A) / ||beta*W0 + alpha*B@A||`` with alpha (``wora_alpha``), beta
(``wora_beta``), m (``magnitude``), A (``lora_A``) and B (``lora_B``) learnable. There is no
``alpha / r`` scaling: alpha itself scales ``B@A``, as in the paper's released code
(``LinearWithWoRAMerged``). The released code initialises A with ``randn / sqrt(r)``; tbps uses
LoRA's Kaiming-uniform. The normalisation cancels a common scale of alpha and beta, so W'
depends on alpha/beta only: their gradient is orthogonal to (alpha, beta), and while B = 0 (the
first step) it is 0. The norm is the config's ``wora_norm`` (``per-input`` by default, the
paper's code; ``per-output``, DoRA's).

The layer output never forms W' at token level: it computes the (weight-sized) scale
``c = m/||V||``, then ``y = (x*beta*c) W0^T + b + alpha*(x (A*c)^T) B^T`` (per-input) or the
output-scaled analogue (per-output), so no gradient of the full weight is ever computed, and
at initialisation ``y`` is the base layer's output bit for bit. Weight algebra runs with
autocast off (in the parameters' dtype); the token-level matmuls follow the caller's autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.models.adapters.base import Variant, add_low_rank, add_magnitude, no_autocast, times, weight_norm


class WoRA(Variant):
    """``W' = m * (beta*W0 + alpha*B@A) / ||beta*W0 + alpha*B@A||``, alpha and beta learnable."""

    name = "wora"
    # The paper's released code uses alpha = 8, beta = 1 (and rank 8).
    options = {"wora_alpha": 8.0, "wora_beta": 1.0}
    positive = ("wora_beta",)
    parameters = ("lora_A", "lora_B", "magnitude", "wora_alpha", "wora_beta")
    takes_wora_norm = True

    @classmethod
    def init(cls, layer: nn.Module, w0: Tensor, wora_alpha: float, wora_beta: float) -> None:
        add_low_rank(layer, w0)
        add_magnitude(layer, w0)
        layer.wora_alpha = nn.Parameter(torch.tensor(wora_alpha, device=w0.device, dtype=w0.dtype))
        layer.wora_beta = nn.Parameter(torch.tensor(wora_beta, device=w0.device, dtype=w0.dtype))

    @classmethod
    def alpha_beta(cls, layer: nn.Module) -> tuple[Tensor | float, Tensor | float]:
        """alpha, the factor of ``B@A``, and beta, the factor of W0."""
        return layer.wora_alpha, layer.wora_beta

    @classmethod
    def direction_scale(cls, layer: nn.Module, w0: Tensor) -> tuple[Tensor, Tensor]:
        """V = beta*W0 + alpha*B@A and c = m / ||V||, in the parameters' dtype."""
        alpha, beta = cls.alpha_beta(layer)
        with no_autocast(w0.device):
            v = times(w0, beta) + alpha * (layer.lora_B @ layer.lora_A)
            c = layer.magnitude / weight_norm(v, layer.norm).clamp_min(torch.finfo(v.dtype).tiny)
        return v, c

    @classmethod
    def merge(cls, layer: nn.Module, w0: Tensor) -> Tensor:
        v, c = cls.direction_scale(layer, w0)
        return v * c

    @classmethod
    def forward(cls, layer: nn.Module, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        alpha, beta = cls.alpha_beta(layer)
        _, c = cls.direction_scale(layer, w0)
        scale = times(c, beta)  # the factor W0's columns (per-input) or rows (per-output) get
        if layer.norm == "per-input":
            # W' = (beta*W0 + alpha*B@A) diag(c) = W0 diag(beta*c) + alpha*B@(A diag(c)): scale the
            # input features for the W0 term, fold c into the small A for the low-rank term.
            y = F.linear(x * scale.squeeze(0).to(x.dtype), w0, bias)
            return y + F.linear(F.linear(x, layer.lora_A * c) * alpha, layer.lora_B)
        # W' = diag(c) (beta*W0 + alpha*B@A), written around the base output y0 = x W0^T + b as PEFT's
        # DoRA does: y = y0 + (beta*c - 1)(y0 - b) + alpha (x A^T)(diag(c) B)^T. At initialisation
        # beta*c = 1 and B = 0 exactly, so y is y0 bit for bit.
        y0 = F.linear(x, w0, bias)
        z = y0 if bias is None else y0 - bias
        return y0 + z * (scale.squeeze(1) - 1).to(x.dtype) + F.linear(F.linear(x, layer.lora_A) * alpha, layer.lora_B * c)
