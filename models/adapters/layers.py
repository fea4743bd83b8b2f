"""The wrappers that carry an adapter: :class:`AdaptedLinear` and :class:`AdaptedMultiheadAttention`.

Each keeps the frozen pretrained weight ``W0`` under its original name (``weight``,
``in_proj_weight``) and the adapter parameters of its method (:mod:`.methods`) beside it; the
method's class does the maths. An adapted ``nn.Linear`` uses the method's ``forward``, which
never forms W' at token level. ``nn.MultiheadAttention`` needs its weights as tensors: there W'
(the method's ``merge``) is formed once per forward and handed to
``F.multi_head_attention_forward`` with the module's own settings (``batch_first``, masks,
``need_weights``, dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.models.adapters.base import Variant
from tbps.models.adapters.config import AdapterConfig


class AdapterLayer(nn.Module):
    """A module carrying the adapter of one frozen (out, in) weight W0 (``lora_A``, ``lora_B``, ...).

    Subclasses own W0 under its original name and call :meth:`adapted_weight` or
    :meth:`adapted_linear` with it. ``variant`` is the method's class; ``scaling`` is LoRA's
    ``lora_alpha / r`` (lora, dora; for dora it plays alpha's part with beta = 1), else None.
    """

    variant: type[Variant]
    method: str
    rank: int
    norm: str | None
    scaling: float | None

    def _init_adapter(self, w0: Tensor, cfg: AdapterConfig) -> None:
        self.variant = cfg.variant
        self.method, self.rank, self.norm, self.scaling = cfg.method, cfg.rank, cfg.norm, None
        self.variant.init(self, w0, **cfg.variant_options())

    def adapted_weight(self, w0: Tensor) -> Tensor:
        """The effective weight W' (differentiable in the adapter parameters).

        Args:
            w0: the frozen base weight, (out, in).

        Returns:
            W', (out, in), in W0's dtype.
        """
        return self.variant.merge(self, w0)

    def adapted_linear(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, W', bias)`` computed without forming W' at token level.

        Args:
            x: input, (..., in).
            w0: the frozen base weight, (out, in).
            bias: the frozen bias, (out,) or None.

        Returns:
            The layer's output, (..., out).
        """
        return self.variant.forward(self, x, w0, bias)

    def extra_repr(self) -> str:
        norm = f", norm={self.norm}" if self.norm else ""
        return f"method={self.method}, rank={self.rank}{norm}"


def _take(shell: nn.Module, name: str) -> nn.Parameter | None:
    """Move parameter ``name`` out of ``shell`` (leaving None) so only the wrapper holds it."""
    param = shell._parameters[name]
    shell._parameters[name] = None
    return param


class AdaptedLinear(AdapterLayer):
    """An ``nn.Linear`` with an adapter; ``weight`` (W0) and ``bias`` keep their names, frozen.

    Args:
        base: the layer to adapt; its parameters move into the wrapper.
        cfg: the adapter configuration.
    """

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = _take(base, "weight")
        self.bias = _take(base, "bias")
        object.__setattr__(self, "_shell", base)  # the emptied original, refilled by merge()
        self._init_adapter(self.weight, cfg)
        self.train(base.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapted_linear(x, self.weight, self.bias)

    def merged_weight(self) -> Tensor:
        """W' as a plain tensor (no graph)."""
        with torch.no_grad():
            return self.adapted_weight(self.weight).detach()

    def merge(self) -> nn.Linear:
        """The original ``nn.Linear`` (same class) holding W' and the bias."""
        shell: nn.Linear = self._shell
        shell.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        shell.bias = self.bias
        shell.train(self.training)
        return shell


class AdaptedMultiheadAttention(AdapterLayer):
    """An ``nn.MultiheadAttention`` whose q/k/v ``in_proj_weight`` and/or ``out_proj`` are adapted.

    The forward takes ``nn.MultiheadAttention.forward``'s arguments and computes the same thing
    through ``F.multi_head_attention_forward`` with the effective weights (never the fused
    inference fast path, whose results agree to float rounding).

    Args:
        base: the attention to adapt; its parameters and ``out_proj`` move into the wrapper.
        cfg: the adapter configuration of ``in_proj_weight``, or None to leave q/k/v unadapted.
        out_proj_cfg: the adapter configuration of ``out_proj``, or None to leave it unadapted.
    """

    _SETTINGS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim", "add_zero_attn")

    def __init__(self, base: nn.MultiheadAttention, cfg: AdapterConfig | None, out_proj_cfg: AdapterConfig | None) -> None:
        super().__init__()
        for name in self._SETTINGS:
            setattr(self, name, getattr(base, name))
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"):
            # Registered parameters move here; nn.MultiheadAttention keeps absent ones as None.
            setattr(self, name, _take(base, name) if name in base._parameters else getattr(base, name, None))
        out_proj = base._modules.pop("out_proj")
        base.out_proj = None
        self.out_proj = AdaptedLinear(out_proj, out_proj_cfg) if out_proj_cfg is not None else out_proj
        object.__setattr__(self, "_shell", base)
        self.adapts_in_proj = cfg is not None
        if cfg is not None:
            self._init_adapter(self.in_proj_weight, cfg)
        self.train(base.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            # Transpose as nn.MultiheadAttention does, keeping "query is key is value": that
            # identity selects the single packed q/k/v projection, as in the base module.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        in_proj_weight = self.adapted_weight(self.in_proj_weight) if self.adapts_in_proj else self.in_proj_weight
        out_weight = self.out_proj.adapted_weight(self.out_proj.weight) if isinstance(self.out_proj, AdapterLayer) else self.out_proj.weight
        separate = {}
        if not self._qkv_same_embed_dim:
            separate = {
                "use_separate_proj_weight": True,
                "q_proj_weight": self.q_proj_weight,
                "k_proj_weight": self.k_proj_weight,
                "v_proj_weight": self.v_proj_weight,
            }
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **separate,
        )
        return (out.transpose(1, 0), weights) if self.batch_first and is_batched else (out, weights)

    def merge(self) -> nn.MultiheadAttention:
        """The original ``nn.MultiheadAttention`` holding the effective weights."""
        shell: nn.MultiheadAttention = self._shell
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"):
            if name in self._parameters:
                setattr(shell, name, self._parameters[name])
        if self.adapts_in_proj:
            with torch.no_grad():
                shell.in_proj_weight = nn.Parameter(self.adapted_weight(self.in_proj_weight).detach(), requires_grad=False)
        shell.out_proj = self.out_proj.merge() if isinstance(self.out_proj, AdaptedLinear) else self.out_proj
        shell.train(self.training)
        return shell

    def extra_repr(self) -> str:
        return super().extra_repr() if self.adapts_in_proj else "in_proj not adapted"
