"""``AdapterConfig``: what :func:`~.core.apply_adapters` does, checked on creation against the registered methods."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tbps.errors import UsageError
from tbps.models.adapters.base import NORMS, Variant
from tbps.models.adapters.methods import ADAPTER_METHODS, METHODS, variants

VARIANTS: dict[str, type[Variant]] = variants()  # the registered methods' classes, by name
# Every parameter name an adapter method creates (saved by save_adapters, never W0).
ADAPTER_PARAMETERS = tuple(dict.fromkeys(p for cls in VARIANTS.values() for p in cls.parameters))
# Which methods each option applies to (an option given for another method is a usage error).
OPTIONS: dict[str, tuple[str, ...]] = {
    **{
        option: tuple(name for name, cls in VARIANTS.items() if option in cls.options)
        for option in sorted({option for cls in VARIANTS.values() for option in cls.options})
    },
    "extra_trainable": ADAPTER_METHODS,
}


@dataclass
class AdapterConfig:
    """What :func:`~.core.apply_adapters` does, checked on creation.

    Attributes:
        method: a registered adapter method (``wora``, ``dora``, ``lora``), ``full`` or ``none``.
        rank: r, the rank of ``lora_B @ lora_A`` (adapter methods; >= 1).
        targets: module name patterns (see :func:`~.core.apply_adapters`), or None for every
            Linear/MultiheadAttention.
        wora_norm: ``per-input`` (paper code) or ``per-output`` (DoRA); used by ``wora`` only.
        lora_alpha: LoRA's alpha, ``scaling = lora_alpha / rank`` (lora, dora; default 16).
        wora_alpha: initial alpha of wora (default 8).
        wora_beta: initial beta of wora (default 1; must be > 0).
        extra_trainable: parameter name patterns (matched as targets are) that stay trainable besides the
            adapters, e.g. ``["logit_scale"]`` (adapter methods; default none).

    Options that do not apply to ``method`` must be None (None always means "the default", which
    the method's class declares).
    """

    method: str = "wora"
    rank: int = 8
    targets: list[str] | None = None
    wora_norm: str = "per-input"
    lora_alpha: float | None = None
    wora_alpha: float | None = None
    wora_beta: float | None = None
    extra_trainable: list[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError("unknown adapter method", field="method", value=self.method, hint=f"use one of {', '.join(METHODS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError("rank must be an integer >= 1", field="rank", value=self.rank)
        if self.wora_norm not in NORMS:
            raise UsageError("unknown norm convention", field="wora_norm", value=self.wora_norm, hint=f"use one of {', '.join(NORMS)}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.targets is not None:
            self.targets = list(self.targets)
            if self.method not in ADAPTER_METHODS:
                raise UsageError(f"targets do not apply to method {self.method!r}", field="targets", value=self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise UsageError("targets must be non-empty name patterns", field="targets", value=self.targets)
        if isinstance(self.extra_trainable, str):
            self.extra_trainable = [self.extra_trainable]
        for name, methods in OPTIONS.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise UsageError(
                    f"{name} applies to method {' / '.join(methods)} only, not {self.method!r}",
                    field=name,
                    value=getattr(self, name),
                )
        variant = self.variant
        if variant is not None:
            for name, default in variant.options.items():
                value = getattr(self, name)
                setattr(self, name, _number(name, default if value is None else value, positive=name in variant.positive))
            self.extra_trainable = list(self.extra_trainable or [])
            if not all(isinstance(p, str) and p for p in self.extra_trainable):
                raise UsageError("extra_trainable must be parameter-name patterns", field="extra_trainable", value=self.extra_trainable)

    @property
    def variant(self) -> type[Variant] | None:
        """The method's class (see :mod:`.methods`), or None for ``full`` and ``none``."""
        return VARIANTS.get(self.method)

    @property
    def norm(self) -> str | None:
        """The norm convention in effect: wora's ``wora_norm``, ``per-output`` for dora, else None."""
        return self.variant.norm_of(self.wora_norm) if self.variant is not None else None

    @property
    def scaling(self) -> float | None:
        """LoRA's ``lora_alpha / rank`` (lora, dora), else None."""
        return self.lora_alpha / self.rank if self.lora_alpha is not None else None

    @property
    def opts(self) -> dict[str, Any]:
        """The method options in effect (resolved defaults), as passed back to apply_adapters."""
        return {k: v for k, v in asdict(self).items() if k in OPTIONS and v is not None}

    def variant_options(self) -> dict[str, float]:
        """The resolved values of the options the method's class declares (its ``init`` arguments)."""
        return {name: getattr(self, name) for name in self.variant.options} if self.variant is not None else {}


def _number(name: str, value: Any, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError("must be a number", field=name, value=value) from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise UsageError("must be a finite number" + (" > 0" if positive else ""), field=name, value=value)
    return number
