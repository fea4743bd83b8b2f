"""What an adapter method is (:class:`Variant`) and the maths the methods share.

A method is a class in the style of PEFT's ``tuners/lora/variants.py``: never instantiated, its
class methods take the adapter layer they act on (an ``AdapterLayer``, which owns the frozen
weight ``W0``) and the method's declarations are class attributes. :mod:`.methods` registers
the classes by name.

Norm conventions (:data:`NORMS`) of the weight norm ``||V||`` that ``magnitude`` rescales:

``per-input``
    The norm over dim 0 of the (out, in) weight: one norm and one magnitude per *input*
    feature; ``magnitude`` has shape (1, in) and rescales columns (the paper's released code).
``per-output``
    The norm over dim 1: one magnitude per *output* unit; shape (out, 1) (the DoRA/PEFT convention).
"""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

NORMS = ("per-input", "per-output")


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for weight algebra (kept in the parameters' dtype); a no-op when it is off."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def times(t: Tensor, s: Tensor | float) -> Tensor:
    """t * s, skipping the multiply for a fixed factor of 1 (dora's beta)."""
    return t if isinstance(s, float) and s == 1.0 else t * s


def weight_norm(v: Tensor, norm: str) -> Tensor:
    """||v|| per input column (dim 0, shape (1, in)) or per output row (dim 1, shape (out, 1))."""
    return torch.linalg.vector_norm(v, dim=0 if norm == "per-input" else 1, keepdim=True)


def add_low_rank(layer: nn.Module, w0: Tensor) -> None:
    """Create ``lora_A`` (r, in), Kaiming-uniform as LoRA/PEFT, and ``lora_B`` (out, r), zeros, on ``layer``."""
    out_features, in_features = w0.shape
    kw = {"device": w0.device, "dtype": w0.dtype}
    layer.lora_A = nn.Parameter(torch.empty(layer.rank, in_features, **kw))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # as LoRA/PEFT initialise A
    layer.lora_B = nn.Parameter(torch.zeros(out_features, layer.rank, **kw))


def add_magnitude(layer: nn.Module, w0: Tensor) -> None:
    """Create ``magnitude`` m = ||W0|| (in ``layer.norm``'s convention) on ``layer``."""
    # m from the weights loaded now (not from a random init, as the paper's code does).
    with torch.no_grad():
        layer.magnitude = nn.Parameter(weight_norm(w0.detach(), layer.norm).clone())


class Variant:
    """One adapter method: the parameters it adds to a layer, its W' and the layer's output.

    The layer passed in carries ``method``, ``rank``, ``norm`` (the convention in effect, or
    None) and ``scaling`` (None) before :meth:`init` runs; a method with LoRA's scaling sets
    ``scaling = lora_alpha / rank`` there.

    Attributes:
        name: the method's name (``--adapter``, ``AdapterConfig.method``, ``adapter_config.json``).
        options: the ``AdapterConfig`` options that apply to the method, with their defaults;
            giving another one is a usage error.
        positive: those of ``options`` that must be > 0.
        parameters: the names of the parameters :meth:`init` creates on a layer.
        norm: the norm convention of ``magnitude`` (see :data:`NORMS`), or None when there is none.
        takes_wora_norm: the convention is the config's ``wora_norm`` instead of ``norm``.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, float]] = {}
    positive: ClassVar[tuple[str, ...]] = ()
    parameters: ClassVar[tuple[str, ...]] = ()
    norm: ClassVar[str | None] = None
    takes_wora_norm: ClassVar[bool] = False

    @classmethod
    def norm_of(cls, wora_norm: str) -> str | None:
        """The norm convention in effect when the config's ``wora_norm`` is the given one."""
        return wora_norm if cls.takes_wora_norm else cls.norm

    @classmethod
    def init(cls, layer: nn.Module, w0: Tensor, **options: float) -> None:
        """Create the method's parameters on ``layer`` from W0.

        Args:
            layer: the adapter layer.
            w0: the frozen base weight, (out, in); new parameters take its device and dtype.
            **options: the resolved values of :attr:`options`.
        """
        raise NotImplementedError

    @classmethod
    def merge(cls, layer: nn.Module, w0: Tensor) -> Tensor:
        """The effective weight W' (differentiable in the adapter parameters).

        Args:
            layer: the adapter layer.
            w0: the frozen base weight, (out, in).

        Returns:
            W', (out, in), in W0's dtype.
        """
        raise NotImplementedError

    @classmethod
    def forward(cls, layer: nn.Module, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, W', bias)`` computed without forming W' at token level.

        Args:
            layer: the adapter layer.
            x: input, (..., in).
            w0: the frozen base weight, (out, in).
            bias: the frozen bias, (out,) or None.

        Returns:
            The layer's output, (..., out).
        """
        raise NotImplementedError
