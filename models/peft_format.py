"""PEFT's adapter format for tbps's LoRA and DoRA adapters (``tbps export RUN --peft DIR``).

``peft.PeftModel.from_pretrained(base, DIR)`` loads the directory onto the same base model (the
open_clip ``CLIP`` module tbps trained on) and gives the run's embeddings. This module maps; it
imports no PEFT (tbps writes the files itself, so exporting installs nothing):

``adapter_config.json``
    A ``LoraConfig``: ``peft_type`` LORA, ``r``, ``lora_alpha`` (PEFT's scaling is
    ``lora_alpha / r``, as tbps's), ``use_dora``, ``lora_dropout`` 0 (tbps trains without
    dropout), ``bias`` none, ``target_modules`` a regular expression that matches exactly the
    adapted module names (PEFT matches a *list* of names as suffixes, so the text tower's
    ``transformer.resblocks.0.attn`` would also catch ``visual.transformer.resblocks.0.attn``),
    and ``base_model_name_or_path``, the base model's tbps spec (``ViT-B-16:openai``, ``tbps-tiny``).
``adapter_model.safetensors``
    The tensors under PEFT's names:

    ======================================  ====================================================
    tbps                                    PEFT
    ======================================  ====================================================
    ``X.lora_A`` (r, in)                    ``base_model.model.X.lora_A.weight``
    ``X.lora_B`` (out, r)                   ``base_model.model.X.lora_B.weight``
    ``X.magnitude`` (out, 1), DoRA          ``base_model.model.X.lora_magnitude_vector`` (out,)
    ``M.lora_A``, ``M.lora_B`` (q/k/v of    ``base_model.model.M.lora_A.weight``, ``...M.lora_B.weight``
    an ``nn.MultiheadAttention`` M)
    (M's ``out_proj``, not adapted)         ``base_model.model.M.base_layer.out_proj.lora_A.weight``
                                            (PEFT's init, seeded) and ``...lora_B.weight`` (zeros)
    ======================================  ====================================================

PEFT's LoRA for ``nn.MultiheadAttention`` always adapts q/k/v and ``out_proj`` together, so an
attention whose q/k/v tbps adapted gets an ``out_proj`` adapter with ``lora_B = 0``, which adds
nothing (as PEFT initialises one).

What PEFT cannot represent is refused with the reason (:func:`check_method`, :func:`to_peft`):
WoRA (no PEFT method learns WoRA's alpha and beta), ``full`` and ``none`` (no adapters), DoRA
on an ``nn.MultiheadAttention`` (PEFT's attention layer has no DoRA), an adapted ``out_proj`` of
an attention (peft 0.21 adds its delta twice in the forward, huggingface/peft#3774, and an
adapter on ``out_proj`` alone is never called, since ``nn.MultiheadAttention`` does not call
its ``out_proj``), and parameters trained besides the adapters (``--also-train``). The learnable
temperature ``logit_scale``, which every adapter run trains, changes no embedding; PEFT's files
have no place for a bare parameter, so its value goes to the export's own record
(``tbps_export.json``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from tbps.errors import TbpsError
from tbps.models.adapters.layers import AdaptedLinear, AdaptedMultiheadAttention, AdapterLayer

PEFT_METHODS = {"lora": False, "dora": True}  # tbps method -> LoraConfig.use_dora
PREFIX = "base_model.model."  # PEFT's name of the wrapped model inside a saved adapter
TEMPERATURE = "logit_scale"  # trained with every adapter run; not part of PEFT's files
_REFUSED = {
    "wora": "no PEFT method learns WoRA's alpha and beta (W' = m * (beta*W0 + alpha*B@A) / norm)",
    "full": "a full fine-tune has no adapters",
    "none": "the run has no adapters",
}
_INSTEAD = "tbps export RUN --merge writes a plain open_clip checkpoint instead"


def check_method(method: str | None, path: object) -> None:
    """Refuse a method PEFT's LoRA format cannot hold, before any model is loaded.

    Args:
        method: the run's adapter method.
        path: the run, for the message.

    Raises:
        TbpsError: the method is not ``lora`` or ``dora``.
    """
    if method not in PEFT_METHODS:
        why = _REFUSED.get(method or "", "PEFT's LoRA format holds lora and dora adapters only")
        raise TbpsError(f"cannot export {method} adapters in PEFT's format: {why}", path=path, field="adapter", value=method, hint=_INSTEAD)


def _refuse(message: str, path: object, value: object, hint: str) -> TbpsError:
    return TbpsError(f"cannot export in PEFT's format: {message}", path=path, field="targets", value=value, hint=hint)


def peft_targets(model: nn.Module, path: object = None) -> tuple[list[str], list[str]]:
    """The modules PEFT adapts for this model's tbps adapters, checked.

    Args:
        model: a model adapted by tbps (lora or dora).
        path: the run, for messages.

    Returns:
        ``(linear, attention)``: the adapted ``nn.Linear`` names and the ``nn.MultiheadAttention``
        names whose q/k/v tbps adapted.

    Raises:
        TbpsError: an adapted ``out_proj`` of an attention, or DoRA on an attention.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    attention = [n for n, m in layers.items() if isinstance(m, AdaptedMultiheadAttention)]
    for name in attention:
        module = layers[name]
        if isinstance(module.out_proj, AdapterLayer):
            raise _refuse(
                f"the run adapted {name}.out_proj, and PEFT's LoRA for nn.MultiheadAttention adds an out_proj's delta twice "
                "(peft 0.21, huggingface/peft#3774; an out_proj adapted alone is never called)",
                path, f"{name}.out_proj", "train with --targets that leave out_proj out (e.g. attn,c_fc,c_proj), or export --merge",
            )
        if module.method == "dora":
            raise _refuse(
                f"PEFT has no DoRA for nn.MultiheadAttention, and the run put DoRA on {name}",
                path, name, "train DoRA on Linear layers only (e.g. --targets c_fc,c_proj), or export --merge",
            )
    linear = [n for n, m in layers.items() if isinstance(m, AdaptedLinear)]
    return linear, attention


def target_pattern(names: list[str]) -> str:
    """A regular expression PEFT full-matches against module names: exactly these names."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def peft_config(method: str, rank: int, lora_alpha: float, names: list[str], base_spec: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT ``LoraConfig`` for tbps's adapters.

    Args:
        method: ``lora`` or ``dora``.
        rank: r.
        lora_alpha: LoRA's alpha (scaling ``lora_alpha / r``).
        names: the module names PEFT adapts (Linear layers and whole attentions).
        base_spec: the base model's tbps spec.

    Returns:
        The config as JSON values.
    """
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_spec,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": target_pattern(names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": PEFT_METHODS[method],
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_state_dict(tensors: dict[str, Tensor], linear: list[str], attention: list[str], method: str, path: object = None) -> dict[str, Tensor]:
    """tbps's adapter tensors under PEFT's names (see the module docstring).

    Args:
        tensors: ``adapter_state_dict`` of the adapted model.
        linear, attention: what :func:`peft_targets` returned.
        method: ``lora`` or ``dora``.
        path: the run, for messages.

    Returns:
        PEFT's key -> tensor (contiguous, on the CPU).

    Raises:
        TbpsError: the run trained parameters besides the adapters and ``logit_scale``.
    """
    names = ("lora_A", "lora_B", "magnitude") if PEFT_METHODS[method] else ("lora_A", "lora_B")
    out: dict[str, Tensor] = {}
    used = {TEMPERATURE}
    generator = torch.Generator().manual_seed(0)  # the idle out_proj adapters' lora_A: the same bytes each export
    for name in attention:
        # PEFT adapts the attention's out_proj too: give it PEFT's own init, lora_B = 0 (no change).
        lora_a, lora_b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        rank, width = lora_a.shape[0], lora_b.shape[0] // 3
        bound = 1 / math.sqrt(width)  # kaiming_uniform_(a=sqrt(5)) on an (r, width) matrix, as PEFT initialises lora_A
        idle_a = (torch.rand(rank, width, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        out[f"{PREFIX}{name}.base_layer.out_proj.lora_A.weight"] = idle_a.to(lora_a.dtype)
        out[f"{PREFIX}{name}.base_layer.out_proj.lora_B.weight"] = torch.zeros(width, rank, dtype=lora_b.dtype)
    for module in linear + attention:
        target = f"{PREFIX}{module}"
        for param in names:
            key = f"{module}.{param}"
            tensor = tensors[key].detach().cpu()
            if param == "magnitude":
                out[f"{target}.lora_magnitude_vector"] = tensor.reshape(-1).contiguous()  # (out, 1) -> PEFT's (out,)
            else:
                out[f"{target}.{param}.weight"] = tensor.contiguous()
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise TbpsError(
            "cannot export in PEFT's format: the run trained parameters besides the adapters (--also-train), which PEFT's LoRA files cannot carry",
            path=path, field="also_train", value=extra, hint=_INSTEAD,
        )
    return out


def to_peft(model: nn.Module, config: dict[str, Any], base_spec: str, tensors: dict[str, Tensor], path: object = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's adapter config and tensors for a model tbps adapted.

    Args:
        model: the adapted model (adapters applied, weights loaded).
        config: its ``adapter_config`` (method, rank, opts).
        base_spec: the base model's tbps spec (``base_model_name_or_path``).
        tensors: its ``adapter_state_dict``.
        path: the run, for messages.

    Returns:
        ``(adapter_config, tensors)`` in PEFT's format.

    Raises:
        TbpsError: what PEFT cannot represent (see the module docstring).
    """
    method = config.get("method")
    check_method(method, path)
    linear, attention = peft_targets(model, path)
    lora_alpha = float((config.get("opts") or {})["lora_alpha"])
    adapter = peft_config(method, int(config["rank"]), lora_alpha, sorted(linear + attention), base_spec)
    return adapter, peft_state_dict(tensors, linear, attention, method, path)
