"""Applying, merging, saving and loading adapters on any ``nn.Module``.

:func:`apply_adapters` replaces each targeted ``nn.Linear`` / ``nn.MultiheadAttention`` by a
wrapper (:mod:`.layers`) that keeps the frozen ``W0`` and adds the method's parameters.

What is trained: for the adapter methods only the adapter parameters. The targeted layers'
weights and biases stay frozen, and so does everything outside the targeted layers
(embeddings, LayerNorms, ``logit_scale``, projections) unless the option ``extra_trainable``
names it: a list of glob patterns over parameter names, e.g. ``["logit_scale"]``. Parameters
made trainable that way are part of :func:`adapter_state_dict` and of saved adapters.

Targets (``targets=``): ``None`` means every ``nn.Linear`` and every ``nn.MultiheadAttention``
(whose ``in_proj_weight``, i.e. q/k/v, is adapted; its ``out_proj`` is an ``nn.Linear`` and is a
target of its own). Otherwise a list of glob patterns (``fnmatch``, case-sensitive, not regular
expressions). A bare name without dots or wildcards matches the last part of a module name:
``"c_fc"`` matches every ``*.c_fc``. Any other pattern must match the whole dotted name (``*``
also matches dots): ``"visual.*"`` is every layer of the image tower, ``"transformer.*"`` every
layer of open_clip's text tower (not ``visual.transformer.*``). For open_clip's CLIP the default
reaches ``attn`` (q/k/v), ``attn.out_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` of both towers.

Checkpoints: :func:`save_adapters` writes ``adapter_model.safetensors`` (the trained tensors
only, never ``W0``) and ``adapter_config.json``, which names the base model the adapters belong
to (``base_model``: what :func:`mark_base_model` recorded on the model, e.g. ``{"spec":
"ViT-B-16:openai", "seed": 0, "identity": ...}``; ``tbps.models.runs.load_base`` records it for
every training run); :func:`load_adapters` applies the same adapters to a fresh base model and
loads them. :func:`merge_adapters` folds everything back into plain
``nn.Linear`` / ``nn.MultiheadAttention`` modules whose state dict is a plain open_clip one.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from tbps.errors import TbpsError, UsageError
from tbps.files import write_bytes, write_json
from tbps.models.adapters.config import ADAPTER_PARAMETERS, OPTIONS, VARIANTS, AdapterConfig
from tbps.models.adapters.layers import AdaptedLinear, AdaptedMultiheadAttention, AdapterLayer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "tbps-adapters/1"
BASE_MODEL_KEY = "base_model"  # adapter_config.json: the base model the adapters were trained on
_MARK = "tbps_adapters"  # attribute on the root module holding adapter_config()
_BASE = "tbps_base_model"  # attribute on the root module: the base model it was loaded as (mark_base_model)


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
        method: a registered adapter method (``wora``, ``dora``, ``lora``: see :mod:`.methods`),
            ``full`` (train everything) or ``none`` (freeze everything).
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
        unknown = sorted(set(opts) - set(OPTIONS))
        raise UsageError("unknown adapter option", field=unknown[0] if unknown else "opts", value=opts, hint=f"known options: {', '.join(OPTIONS)}") from None
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
    adapter = cfg.variant is not None
    return {
        "format": FORMAT,
        "method": cfg.method,
        "rank": cfg.rank if adapter else None,
        "targets": cfg.targets,
        "wora_norm": cfg.wora_norm if adapter and cfg.variant.takes_wora_norm else None,
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


def mark_base_model(model: nn.Module, base: dict[str, Any]) -> nn.Module:
    """Record which base model a module was loaded as; :func:`save_adapters` writes it into ``adapter_config.json``.

    The record stays on the module through :func:`apply_adapters` and :func:`merge_adapters`.

    Args:
        model: the loaded base model (or a DDP wrapper of one).
        base: JSON values naming it, e.g. ``{"spec": "ViT-B-16:openai", "seed": 0, "identity": {...}}``.

    Returns:
        The same model.
    """
    setattr(_unwrap(model), _BASE, json.loads(json.dumps(base, default=str)))
    return model


def base_model_of(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`mark_base_model` recorded on the model, or None."""
    base = getattr(_unwrap(model), _BASE, None)
    return json.loads(json.dumps(base)) if base is not None else None


def save_adapters(model: nn.Module, directory: str | Path, base_model: dict[str, Any] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (each atomically).

    Args:
        model: an adapted model (or a DDP wrapper of one).
        directory: created if missing.
        base_model: the base model to name in the config (``base_model``); default: what
            :func:`mark_base_model` recorded on the model (None when nothing was).

    Returns:
        The directory.
    """
    directory = Path(directory)
    config = {**adapter_config(model), BASE_MODEL_KEY: base_model if base_model is not None else base_model_of(model)}
    tensors = {n: t.detach().cpu().contiguous() for n, t in adapter_state_dict(model).items()}
    write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "tbps": FORMAT}))
    write_json(directory / CONFIG_FILE, config)
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
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TbpsError("adapter weights not found", path=weights_path)
    method = config.get("method")
    kwargs: dict[str, Any] = dict(config.get("opts") or {})
    if method in VARIANTS:
        kwargs.update(rank=config.get("rank"), targets=config.get("targets"))
        if VARIANTS[method].takes_wora_norm:
            kwargs["wora_norm"] = config.get("wora_norm")
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


