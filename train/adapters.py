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

Methods (``method=``):

``wora`` (default)
    ``W' = m * (beta*W0 + alpha*B@A) / ||beta*W0 + alpha*B@A||`` with alpha, beta, m, A, B learnable
    (Sun et al., "From Data Deluge to Data Curation", WWW 2025). There is no ``alpha / r``
    scaling: alpha itself scales ``B@A``, as in the paper's released code (``LinearWithWoRAMerged``).
    The released code initialises A with ``randn / sqrt(r)``; tbps uses LoRA's Kaiming-uniform.
    The normalisation cancels a common scale of alpha and beta, so W' depends on alpha/beta
    only: their gradient is orthogonal to (alpha, beta), and while B = 0 (the first step) it is 0.
``dora``
    The same with alpha, beta fixed: ``W' = m * (W0 + s*B@A) / ||W0 + s*B@A||`` with PEFT's LoRA
    scaling ``s = lora_alpha / r`` and PEFT's per-output norm (one magnitude per output unit).
    Unlike PEFT, the norm is not detached: gradients flow through it (the forward is the same).
``lora``
    ``W' = W0 + s*B@A``, ``s = lora_alpha / r`` (``scaling``), no magnitude.
``full``
    No adapter modules; every parameter of the model is trainable.
``none``
    No adapter modules; every parameter is frozen (evaluation).

Norm conventions for wora (``wora_norm=``):

``per-input`` (default)
    The paper's released code: the norm over dim 0 of the (out, in) weight, i.e. one norm and
    one magnitude per *input* feature; ``magnitude`` has shape (1, in) and rescales columns.
``per-output``
    The DoRA/PEFT convention: the norm over dim 1, one magnitude per *output* unit; shape (out, 1).

What is trained: for the adapter methods only the adapter parameters above. The targeted
layers' weights and biases stay frozen, and so does everything outside the targeted layers
(embeddings, LayerNorms, ``logit_scale``, projections) unless the option ``extra_trainable``
names it: a list of glob patterns over parameter names, e.g. ``["logit_scale"]``. Parameters
made trainable that way are part of :func:`adapter_state_dict` and of saved adapters.

Targets (``targets=``): ``None`` means every ``nn.Linear`` and every ``nn.MultiheadAttention``
(whose ``in_proj_weight``, i.e. q/k/v, is adapted; its ``out_proj`` is an ``nn.Linear`` and is a
target of its own). Otherwise a list of glob patterns (``fnmatch``, case-sensitive, not regular
expressions). A bare name without dots or wildcards matches the last part of a module name:
``"c_fc"`` matches every ``*.c_fc``. Any other pattern must match the whole dotted name (``*``
also matches dots): ``"visual.*"`` is every layer of the image tower, ``"transformer.*"`` every
layer of open_clip's text tower (not ``visual.transformer.*``). For
open_clip's CLIP the default reaches ``attn`` (q/k/v), ``attn.out_proj``, ``mlp.c_fc`` and
``mlp.c_proj`` of both towers.

Forward computation: an adapted ``nn.Linear`` never forms ``W'`` at token level: it computes the
(weight-sized) norm ``c = m/||V||``, then ``y = (x*beta*c) W0^T + b + alpha*(x (A*c)^T) B^T``
(per-input) or the output-scaled analogue (per-output), so no gradient of the full weight is
ever computed, and at initialisation ``y`` is the base layer's output bit for bit. ``nn.MultiheadAttention`` needs its weights as tensors: there ``W'`` is formed once per
forward and handed to ``F.multi_head_attention_forward`` with the module's own settings
(``batch_first``, masks, ``need_weights``, dropout). Weight algebra runs with autocast off (in the
parameters' dtype); the token-level matmuls follow the caller's autocast.

Checkpoints: :func:`save_adapters` writes ``adapter_model.safetensors`` (the trained tensors
only, never ``W0``) and ``adapter_config.json``; :func:`load_adapters` applies the same adapters
to a fresh base model and loads them. :func:`merge_adapters` folds everything back into plain
``nn.Linear`` / ``nn.MultiheadAttention`` modules whose state dict is a plain open_clip one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbps.errors import TbpsError, UsageError

METHODS = ("wora", "dora", "lora", "full", "none")
ADAPTER_METHODS = ("wora", "dora", "lora")
NORMS = ("per-input", "per-output")
ADAPTER_PARAMETERS = ("lora_A", "lora_B", "magnitude", "wora_alpha", "wora_beta")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "tbps-adapters/1"

# Defaults of the method options; the paper's released code uses alpha = 8, beta = 1, rank 8.
DEFAULT_LORA_ALPHA = 16.0
DEFAULT_WORA_ALPHA = 8.0
DEFAULT_WORA_BETA = 1.0

# Which methods each option applies to (an option given for another method is a usage error).
_APPLIES = {
    "lora_alpha": ("lora", "dora"),
    "wora_alpha": ("wora",),
    "wora_beta": ("wora",),
    "extra_trainable": ADAPTER_METHODS,
}
_MARK = "tbps_adapters"  # attribute on the root module holding adapter_config()


@dataclass
class AdapterConfig:
    """What :func:`apply_adapters` does, checked on creation.

    Attributes:
        method: ``wora``, ``dora``, ``lora``, ``full`` or ``none``.
        rank: r, the rank of ``lora_B @ lora_A`` (adapter methods; >= 1).
        targets: module name patterns (see the module docstring), or None for every
            Linear/MultiheadAttention.
        wora_norm: ``per-input`` (paper code) or ``per-output`` (DoRA); used by ``wora`` only.
        lora_alpha: LoRA's alpha, ``scaling = lora_alpha / rank`` (lora, dora; default 16).
        wora_alpha: initial alpha of wora (default 8).
        wora_beta: initial beta of wora (default 1; must be > 0).
        extra_trainable: parameter name patterns (matched as targets are) that stay trainable besides the
            adapters, e.g. ``["logit_scale"]`` (adapter methods; default none).

    Options that do not apply to ``method`` must be None (None always means "the default").
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
        for name, methods in _APPLIES.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise UsageError(
                    f"{name} applies to method {' / '.join(methods)} only, not {self.method!r}",
                    field=name,
                    value=getattr(self, name),
                )
        if self.method in ("lora", "dora"):
            self.lora_alpha = _number("lora_alpha", DEFAULT_LORA_ALPHA if self.lora_alpha is None else self.lora_alpha, positive=True)
        if self.method == "wora":
            self.wora_alpha = _number("wora_alpha", DEFAULT_WORA_ALPHA if self.wora_alpha is None else self.wora_alpha)
            self.wora_beta = _number("wora_beta", DEFAULT_WORA_BETA if self.wora_beta is None else self.wora_beta, positive=True)
        if self.method in ADAPTER_METHODS:
            self.extra_trainable = list(self.extra_trainable or [])
            if not all(isinstance(p, str) and p for p in self.extra_trainable):
                raise UsageError("extra_trainable must be parameter-name patterns", field="extra_trainable", value=self.extra_trainable)

    @property
    def norm(self) -> str | None:
        """The norm convention in effect: wora's ``wora_norm``, ``per-output`` for dora, else None."""
        return self.wora_norm if self.method == "wora" else "per-output" if self.method == "dora" else None

    @property
    def scaling(self) -> float | None:
        """LoRA's ``lora_alpha / rank`` (lora, dora), else None."""
        return self.lora_alpha / self.rank if self.lora_alpha is not None else None

    @property
    def opts(self) -> dict[str, Any]:
        """The method options in effect (resolved defaults), as passed back to apply_adapters."""
        return {k: v for k, v in asdict(self).items() if k in _APPLIES and v is not None}


def _number(name: str, value: Any, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError("must be a number", field=name, value=value) from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise UsageError("must be a finite number" + (" > 0" if positive else ""), field=name, value=value)
    return number


# --------------------------------------------------------------------------------------------
# The adapter layers
# --------------------------------------------------------------------------------------------


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for weight algebra (kept in the parameters' dtype); a no-op when it is off."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _times(t: Tensor, s: Tensor | float) -> Tensor:
    """t * s, skipping the multiply for a fixed factor of 1 (dora's beta)."""
    return t if isinstance(s, float) and s == 1.0 else t * s


def _weight_norm(v: Tensor, norm: str) -> Tensor:
    """||v|| per input column (dim 0, shape (1, in)) or per output row (dim 1, shape (out, 1))."""
    return torch.linalg.vector_norm(v, dim=0 if norm == "per-input" else 1, keepdim=True)


class AdapterLayer(nn.Module):
    """A module carrying the adapter of one frozen (out, in) weight W0 (``lora_A``, ``lora_B``, ...).

    Subclasses own W0 under its original name and call :meth:`adapted_weight` or
    :meth:`adapted_linear` with it. ``scaling`` is LoRA's ``lora_alpha / r``; for dora it plays
    alpha's part with beta = 1.
    """

    method: str
    rank: int
    norm: str | None
    scaling: float | None

    def _init_adapter(self, w0: Tensor, cfg: AdapterConfig) -> None:
        out_features, in_features = w0.shape
        self.method, self.rank, self.norm, self.scaling = cfg.method, cfg.rank, cfg.norm, cfg.scaling
        kw = {"device": w0.device, "dtype": w0.dtype}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA/PEFT initialise A
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.rank, **kw))
        if cfg.method in ("wora", "dora"):
            # m from the weights loaded now (not from a random init, as the paper's code does).
            with torch.no_grad():
                self.magnitude = nn.Parameter(_weight_norm(w0.detach(), cfg.norm).clone())
        if cfg.method == "wora":
            self.wora_alpha = nn.Parameter(torch.tensor(cfg.wora_alpha, **kw))
            self.wora_beta = nn.Parameter(torch.tensor(cfg.wora_beta, **kw))

    def _alpha_beta(self) -> tuple[Tensor | float, Tensor | float]:
        if self.method == "wora":
            return self.wora_alpha, self.wora_beta
        return self.scaling, 1.0

    def _direction_scale(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """V = beta*W0 + alpha*B@A and c = m / ||V|| (wora, dora), in the parameters' dtype."""
        alpha, beta = self._alpha_beta()
        with _no_autocast(w0.device):
            v = _times(w0, beta) + alpha * (self.lora_B @ self.lora_A)
            c = self.magnitude / _weight_norm(v, self.norm).clamp_min(torch.finfo(v.dtype).tiny)
        return v, c

    def adapted_weight(self, w0: Tensor) -> Tensor:
        """The effective weight W' (differentiable in the adapter parameters).

        Args:
            w0: the frozen base weight, (out, in).

        Returns:
            W', (out, in), in W0's dtype.
        """
        if self.method == "lora":
            with _no_autocast(w0.device):
                return w0 + self.scaling * (self.lora_B @ self.lora_A)
        v, c = self._direction_scale(w0)
        return v * c

    def adapted_linear(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, W', bias)`` computed without forming W' at token level.

        Args:
            x: input, (..., in).
            w0: the frozen base weight, (out, in).
            bias: the frozen bias, (out,) or None.

        Returns:
            The layer's output, (..., out).
        """
        if self.method == "lora":
            return F.linear(x, w0, bias) + F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)
        alpha, beta = self._alpha_beta()
        _, c = self._direction_scale(w0)
        scale = _times(c, beta)  # the factor W0's columns (per-input) or rows (per-output) get
        if self.norm == "per-input":
            # W' = (beta*W0 + alpha*B@A) diag(c) = W0 diag(beta*c) + alpha*B@(A diag(c)): scale the
            # input features for the W0 term, fold c into the small A for the low-rank term.
            y = F.linear(x * scale.squeeze(0).to(x.dtype), w0, bias)
            return y + F.linear(F.linear(x, self.lora_A * c) * alpha, self.lora_B)
        # W' = diag(c) (beta*W0 + alpha*B@A), written around the base output y0 = x W0^T + b as PEFT's
        # DoRA does: y = y0 + (beta*c - 1)(y0 - b) + alpha (x A^T)(diag(c) B)^T. At initialisation
        # beta*c = 1 and B = 0 exactly, so y is y0 bit for bit.
        y0 = F.linear(x, w0, bias)
        z = y0 if bias is None else y0 - bias
        return y0 + z * (scale.squeeze(1) - 1).to(x.dtype) + F.linear(F.linear(x, self.lora_A) * alpha, self.lora_B * c)

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


# --------------------------------------------------------------------------------------------
# Applying, merging, saving
# --------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, else the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _collapse(names: list[str]) -> str:
    """Names with block indices shown as ``*`` (each form once): a readable list, valid patterns."""
    forms = dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names)
    return ", ".join(forms) if forms else "(none)"


def _matches(name: str, pattern: str) -> bool:
    """A bare component ("c_fc") matches it as the last name part; anything else is a whole-name glob.

    A dotted pattern never matches as a suffix: "transformer.*" (open_clip's text tower) must not
    also match "visual.transformer.*".
    """
    if not any(ch in pattern for ch in ".*?["):
        return name == pattern or name.endswith("." + pattern)
    return fnmatchcase(name, pattern)


def adaptable_modules(model: nn.Module) -> list[str]:
    """Names of the modules :func:`apply_adapters` can target (every Linear and MultiheadAttention).

    Args:
        model: any module.

    Returns:
        Dotted module names in model order.
    """
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.MultiheadAttention))]


def _select(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """The module names the config targets, checked against the layers' shapes."""
    available = adaptable_modules(model)
    if isinstance(model, (nn.Linear, nn.MultiheadAttention)):
        raise UsageError("the model is itself a single layer: adapters replace layers inside a module", hint="wrap it, e.g. nn.Sequential(layer)")
    if cfg.targets is None:
        chosen = set(available)
    else:
        chosen = set()
        for pattern in cfg.targets:
            hits = [n for n in available if _matches(n, pattern)]
            if not hits:
                raise TbpsError(
                    "target pattern matches no Linear or MultiheadAttention module",
                    field="targets",
                    value=pattern,
                    hint=f"a bare name matches the last part of a module name ('c_fc'), other patterns are globs over whole names ('visual.*.attn'); available: {_collapse(available)}",
                )
            chosen.update(hits)
    selected = [n for n in available if n in chosen]
    if not selected:
        raise TbpsError("the model has no Linear or MultiheadAttention layer to adapt", field="targets", value=cfg.targets)
    for name in selected:
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise UsageError(
                    "cannot adapt q/k/v of a MultiheadAttention with kdim/vdim != embed_dim",
                    field="targets",
                    value=name,
                    hint="leave this attention out of targets (its out_proj can still be targeted)",
                )
            shape = tuple(module.in_proj_weight.shape)
        else:
            shape = tuple(module.weight.shape)
        if cfg.rank > min(shape):
            raise UsageError(
                f"rank {cfg.rank} is larger than layer {name} allows (weight {shape[0]}x{shape[1]}: rank <= {min(shape)})",
                field="rank",
                value=cfg.rank,
                hint=f"use a rank <= {min(shape)} or leave {name} out of targets",
            )
    return selected


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def apply_adapters(
    model: nn.Module,
    method: str = "wora",
    rank: int = 8,
    targets: list[str] | str | None = None,
    wora_norm: str = "per-input",
    **opts: Any,
) -> nn.Module:
    """Adapt a model in place: wrap the targeted layers and set which parameters train.

    Call it after the pretrained weights are loaded: ``magnitude`` starts at their norms. The
    random init of ``lora_A`` draws from torch's global generator (seed it for reproducibility).
    New adapter parameters live on the device and dtype of the weight they adapt.

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / ``nn.MultiheadAttention`` layers
            (e.g. open_clip's CLIP); not itself a single layer.
        method: ``wora``, ``dora``, ``lora``, ``full`` or ``none`` (see the module docstring).
        rank: r of the adapters (lora, dora, wora), at most min(out, in) of every targeted layer.
        targets: module name patterns (a bare name matches the last name part, any other
            pattern is a glob over whole names), or None for
            every Linear and MultiheadAttention. Adapter methods only.
        wora_norm: ``per-input`` (paper code, default) or ``per-output`` (DoRA); wora only.
        **opts: ``lora_alpha`` (lora, dora), ``wora_alpha``, ``wora_beta`` (wora),
            ``extra_trainable`` (adapter methods): see :class:`AdapterConfig`.

    Returns:
        The same model object, adapted; :func:`adapter_config` describes what was done.

    Raises:
        UsageError: an unknown method, option or norm; a rank < 1 or larger than a layer allows;
            a model that already has adapters.
        TbpsError: a target or ``extra_trainable`` pattern that matches nothing (the message
            lists what is available).
    """
    try:
        cfg = AdapterConfig(method=method, rank=rank, targets=targets, wora_norm=wora_norm, **opts)
    except TypeError:
        unknown = sorted(set(opts) - set(_APPLIES))
        raise UsageError("unknown adapter option", field=unknown[0] if unknown else "opts", value=opts, hint=f"known options: {', '.join(_APPLIES)}") from None
    if hasattr(model, _MARK) or _adapter_layers(model):
        raise UsageError("the model already has adapters", hint="merge_adapters(model) first, or start from a fresh base model")
    if cfg.method in ("full", "none"):
        for p in model.parameters():
            p.requires_grad_(cfg.method == "full")
        setattr(model, _MARK, _config_dict(cfg, []))
        return model
    selected = _select(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = set(selected)
    # Attention first: its out_proj lives inside the wrapper, so it is adapted there.
    for name in selected + [n.rpartition(".")[0] for n in selected if n.endswith(".out_proj")]:
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, AdapterLayer):
            out_cfg = cfg if f"{name}.out_proj" in chosen else None
            _set_child(model, name, AdaptedMultiheadAttention(module, cfg if name in chosen else None, out_cfg))
    for name in selected:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            _set_child(model, name, AdaptedLinear(module, cfg))
    params = dict(model.named_parameters())
    for pattern in cfg.extra_trainable:
        hits = [n for n in params if _matches(n, pattern)]
        if not hits:
            raise TbpsError(
                "extra_trainable pattern matches no parameter",
                field="extra_trainable",
                value=pattern,
                hint=f"parameters: {_collapse(list(params))}",
            )
        for n in hits:
            params[n].requires_grad_(True)
    setattr(model, _MARK, _config_dict(cfg, selected))
    return model


def _config_dict(cfg: AdapterConfig, modules: list[str]) -> dict[str, Any]:
    adapter = cfg.method in ADAPTER_METHODS
    return {
        "format": FORMAT,
        "method": cfg.method,
        "rank": cfg.rank if adapter else None,
        "targets": cfg.targets,
        "wora_norm": cfg.wora_norm if cfg.method == "wora" else None,
        "norm": cfg.norm,
        "opts": cfg.opts,
        "modules": list(modules),
    }


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """How a model was adapted.

    Args:
        model: a model returned by :func:`apply_adapters` (or a DDP wrapper of one).

    Returns:
        ``{"format", "method", "rank", "targets", "wora_norm", "norm", "opts", "modules"}``:
        ``norm`` is the convention in effect (dora: per-output), ``opts`` the method options
        with defaults resolved, ``modules`` the adapted module names (an attention's name stands
        for its q/k/v ``in_proj_weight``). Passing method, rank, targets, wora_norm and opts back
        to :func:`apply_adapters` reproduces the adapters.

    Raises:
        TbpsError: the model has no adapters applied.
    """
    model = _unwrap(model)
    if not hasattr(model, _MARK):
        raise TbpsError("the model has no adapters applied", hint="call apply_adapters(model, ...) first")
    return json.loads(json.dumps(getattr(model, _MARK)))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trained tensors: adapter parameters and every other parameter left trainable.

    For the adapter methods that is ``lora_A``, ``lora_B``, ``magnitude``, ``wora_alpha``,
    ``wora_beta`` (never W0) plus ``extra_trainable`` ones; for ``full`` every parameter; for
    ``none`` nothing.

    Args:
        model: a model returned by :func:`apply_adapters` (or a DDP wrapper of one).

    Returns:
        Parameter name -> detached tensor (shared with the model, not copied).
    """
    model = _unwrap(model)
    adapter_config(model)  # raises when there are no adapters
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad or n.rpartition(".")[2] in ADAPTER_PARAMETERS
    }


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into plain weights, in place.

    Every :class:`AdaptedLinear` / :class:`AdaptedMultiheadAttention` becomes the original
    ``nn.Linear`` / ``nn.MultiheadAttention`` object again, holding W'; the state dict then has
    exactly the base model's keys (a plain open_clip state dict for CLIP). Merged weights are
    frozen (``requires_grad=False``); other parameters keep their flags. For ``full`` and
    ``none`` nothing is folded. The adapter record is removed.

    Args:
        model: an adapted model.

    Returns:
        The same model object, without adapter modules.
    """
    model = _unwrap(model)
    # Outermost first: an attention's merge also merges its adapted out_proj.
    for name, layer in _adapter_layers(model):
        if name.endswith(".out_proj") and isinstance(model.get_submodule(name.rpartition(".")[0]), AdaptedMultiheadAttention):
            continue
        _set_child(model, name, layer.merge())
    if hasattr(model, _MARK):
        delattr(model, _MARK)
    return model


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (each atomically).

    Args:
        model: an adapted model (or a DDP wrapper of one).
        directory: created if missing.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    from tbps.provenance import write_json_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model)
    tensors = {n: t.detach().cpu().contiguous() for n, t in adapter_state_dict(model).items()}
    tmp = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "tbps": FORMAT})
    os.replace(tmp, directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter directory, checked.

    Args:
        directory: a directory written by :func:`save_adapters`.

    Returns:
        The config dict (see :func:`adapter_config`).

    Raises:
        TbpsError: the file is missing, unreadable or not a tbps adapter config.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise TbpsError("adapter config not found", path=path, hint=f"save_adapters writes {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TbpsError(f"cannot read adapter config: {exc}", path=path) from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TbpsError("not a tbps adapter config", path=path, field="format", value=config.get("format") if isinstance(config, dict) else config)
    return config


def load_adapters(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply saved adapters to a fresh base model and load their weights.

    Args:
        base_model: the unadapted model the adapters were trained on (same architecture and
            base weights: W0 is not stored with the adapters).
        directory: a directory written by :func:`save_adapters`.

    Returns:
        ``base_model``, adapted, with the saved tensors loaded.

    Raises:
        TbpsError: missing files, adapted modules that differ from the saved ones, or tensors
            whose names or shapes do not match (the base model is then left adapted but not
            loaded: discard it).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TbpsError("adapter weights not found", path=weights_path)
    method = config.get("method")
    kwargs: dict[str, Any] = dict(config.get("opts") or {})
    if method in ADAPTER_METHODS:
        kwargs.update(rank=config.get("rank"), targets=config.get("targets"))
        if method == "wora":
            kwargs["wora_norm"] = config.get("wora_norm")
    if method in ADAPTER_METHODS:
        planned = _select(base_model, AdapterConfig(method=method, **kwargs))
        if planned != config.get("modules"):
            raise TbpsError(
                "the base model's layers differ from those the adapters were trained on",
                path=directory / CONFIG_FILE,
                field="modules",
                value=sorted(set(config.get("modules") or []) ^ set(planned)),
            )
    model = apply_adapters(base_model, method=method, **kwargs)
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TbpsError(f"cannot read adapter weights: {exc}", path=weights_path) from exc
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TbpsError("adapter tensors do not match the model", path=weights_path, value={"missing": missing, "unexpected": unexpected})
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TbpsError("adapter tensor has the wrong shape", path=weights_path, record=name, value=tuple(tensor.shape), hint=f"expected {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model


__all__ = [
    "ADAPTER_METHODS",
    "METHODS",
    "NORMS",
    "AdaptedLinear",
    "AdaptedMultiheadAttention",
    "AdapterConfig",
    "AdapterLayer",
    "adaptable_modules",
    "adapter_config",
    "adapter_state_dict",
    "apply_adapters",
    "load_adapters",
    "merge_adapters",
    "read_adapter_config",
    "save_adapters",
]
