"""Where models run: the device, the precision and the torchrun process group, one definition each."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tbps.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str, option: str = "--precision") -> str:
    """Refuse a precision that is not one of :data:`PRECISIONS` (a usage error naming ``option``)."""
    if precision not in PRECISIONS:
        raise UsageError(f"{option} must be one of {', '.join(PRECISIONS)}", field=option, value=precision)
    return precision


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, option: str = "--device") -> torch.device:
    """Refuse a device that torch cannot parse or that this machine lacks.

    Returns:
        The resolved device.
    """
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UsageError(f"{option} must be auto, cpu, cuda or cuda:N", field=option, value=device) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device is available here", field=option, value=device, hint="use --device cpu or auto")
    return resolved


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively (fast) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without AVX512-BF16 or AMX, oneDNN emulates bf16 and it is slower than fp32.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``--precision`` value, or None for plain fp32.

    Args:
        precision: ``auto`` (bf16 where the device supports it natively), ``fp32`` or ``bf16``.
        device: where the model runs.

    Returns:
        ``torch.bfloat16`` or None.
    """
    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_supported(device) else None


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 outside one).

    Attributes:
        rank: the global rank.
        world: the number of processes.
        device: where this rank runs (under torchrun on GPUs: its local rank's GPU).
        owns_group: the process group was initialised here (``tbps score`` destroys it when done;
            ``tbps train`` leaves it to the process's exit).
    """

    rank: int
    world: int
    device: torch.device
    owns_group: bool


def distributed(device: str = "auto") -> Distributed:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (nccl on GPUs, gloo on CPUs).

    Args:
        device: the ``--device`` option; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        A :class:`Distributed`.
    """
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(0, 1, resolved, False)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), resolved, owns)


def barrier(world: int) -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if world > 1:
        dist.barrier()
