"""Writing a run directory of ``tbps train`` and resuming it (its layout: :mod:`tbps.models.runs`).

The weights are always written by :func:`tbps.models.adapters.save_adapters`: for the adapter
methods that is the adapter tensors (plus the learnable ``logit_scale``), never the frozen base
weights; for ``full`` it is every parameter, i.e. the full state dict. A checkpoint directory is
written beside its final name and renamed into place (:func:`tbps.files.atomic_dir`), so a killed
run leaves the previous one.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbps.errors import TbpsError
from tbps.files import atomic_dir, is_temp, sweep_temps, write_text
from tbps.models.adapters import ADAPTER_METHODS, apply_adapters, save_adapters
from tbps.models.protocol import Encoder
from tbps.models.itm import MatchingHead
from tbps.models.runs import (
    BEST, CHECKPOINT_FILES, CSV_LOG_FILE, LAST, LOG_FILE, REPORT_FILE, RUN_MARKER, TENSORBOARD_DIR, TRAINER_FILE, load_base, save_head,
)


def build_model(
    model: str,
    seed: int,
    adapter: str,
    rank: int,
    targets: list[str] | None,
    wora_norm: str,
    *,
    lora_alpha: float | None = None,
    also_train: list[str] | None = None,
) -> Encoder:
    """The base model with fresh adapters, as a training run starts.

    The learnable temperature ``logit_scale`` trains with the adapters (``extra_trainable``),
    and so do the parameters matching ``also_train``.

    Args:
        model: the base model spec (see ``tbps.models.load``).
        seed: seeds random base weights (bare config names) and the adapters' ``lora_A``.
        adapter: ``wora``, ``dora``, ``lora``, ``full`` or ``none``.
        rank: the adapter rank.
        targets: module name patterns, or None for every Linear / MultiheadAttention.
        wora_norm: ``per-input`` or ``per-output``.
        lora_alpha: LoRA's / DoRA's alpha, or None for the default.
        also_train: more parameter name patterns to train (adapter methods).

    Returns:
        The loaded model, adapted in place.
    """
    loaded = load_base(model, seed=seed)
    opts: dict[str, Any] = {"targets": targets} if adapter in ADAPTER_METHODS else {}
    if adapter in ADAPTER_METHODS:
        opts["extra_trainable"] = ["logit_scale", *(also_train or [])]
    if lora_alpha is not None:
        opts["lora_alpha"] = lora_alpha
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        apply_adapters(loaded.model, method=adapter, rank=rank, wora_norm=wora_norm, **opts)
    return loaded


def write_checkpoint(run: Path, name: str, model: torch.nn.Module, trainer: dict[str, Any] | None = None,
                     head: MatchingHead | None = None) -> Path:
    """Write ``RUN/name/`` (weights, and ``trainer.pt`` when given) atomically.

    Args:
        run: the run directory.
        name: ``last`` or ``best``.
        model: the adapted model (or its DDP wrapper).
        trainer: the resume state, for ``last``.
        head: the matching head trained beside the model (``--itm-head``), saved with it.

    Returns:
        The checkpoint directory.
    """
    with atomic_dir(run / name) as tmp:
        save_adapters(model, tmp)
        if head is not None:
            save_head(head, tmp)
        if trainer is not None:
            torch.save(trainer, tmp / TRAINER_FILE)
    return run / name


def rng_state() -> dict[str, Any]:
    """The states of torch's, numpy's and Python's global generators (and CUDA's), JSON-free."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume_state(run: Path, config: dict[str, Any], free: set[str]) -> tuple[Path, dict[str, Any]]:
    """Check ``RUN/last`` before any training and read its trainer state.

    Args:
        run: the run directory.
        config: the resolved config of this invocation (``dataclasses.asdict``).
        free: config fields that may differ from the saved run (``workers``, ``resume`` ...).

    Returns:
        The checkpoint directory and its trainer state.

    Raises:
        TbpsError: no run or no last checkpoint, missing or unreadable files, or a config that
            differs from the saved one in a field that shapes the result.
    """
    last = run / LAST
    if not (run / RUN_MARKER).is_file():
        raise TbpsError("cannot resume: not a run directory", path=run, hint=f"a run holds {RUN_MARKER}; drop --resume to start one")
    for name in (*CHECKPOINT_FILES, TRAINER_FILE):
        if not (last / name).is_file():
            raise TbpsError("cannot resume: the last checkpoint is incomplete", path=last / name, hint="the file is missing")
    try:
        state = torch.load(last / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TbpsError(f"cannot resume: unreadable trainer state ({exc})", path=last / TRAINER_FILE) from exc
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    differ = {k: (saved.get(k), v) for k, v in config.items() if k not in free and saved.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise TbpsError(
            f"cannot resume: the options differ from the run's ({shown})",
            path=run,
            hint="resume with the run's options, or start a new run with another --out",
        )
    return last, state


def append_log(run: Path, line: dict[str, Any]) -> None:
    """Append one JSON line to ``RUN/log.jsonl``."""
    with open(run / LOG_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def _log_line(text: str) -> dict[str, Any] | None:
    try:
        line = json.loads(text)
    except ValueError:  # a line torn by a kill mid-write
        return None
    return line if isinstance(line, dict) else None


def truncate_log(run: Path, step: int) -> None:
    """Drop log lines after ``step`` (a resumed run rewrites them) and any line a kill tore."""
    path = run / LOG_FILE
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if (line := _log_line(ln)) is not None and line.get("step", 0) <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def last_is_complete(run: Path) -> bool:
    """Whether ``RUN/last`` holds every file a resume needs."""
    return all((run / LAST / name).is_file() for name in (*CHECKPOINT_FILES, TRAINER_FILE))


# A run killed before its first last/ holds only these (its record, log lines, perhaps a best/ of its first validation).
_UNSTARTED = {RUN_MARKER, LOG_FILE, BEST, CSV_LOG_FILE, TENSORBOARD_DIR, REPORT_FILE}


def _writer_alive(run: Path) -> bool:
    """Whether the run's record names a process of this machine, other than this one, that still runs."""
    try:
        record = json.loads((run / RUN_MARKER).read_text())
        pid, host = int(record["pid"]), record["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if record.get("status") != "running" or host != platform.node() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(run: Path) -> str:
    """Bring a run directory back to a state a run can start or resume from, after a kill at any instant.

    Temporaries of dead processes are swept (a checkpoint killed between its two renames is put
    back). A tbps run killed before its first ``last/`` holds nothing to resume (its record, log
    lines, perhaps the ``best/`` of a first validation, which the restarted run writes again):
    those are removed, so the run starts afresh. Anything else is left alone (a run with a
    damaged ``last/`` is refused by name, never wiped), and so is a run whose record names a
    process of this machine that still runs.

    Returns:
        ``empty`` (nothing there), ``resumable`` (a complete ``last/``), ``restarted`` (an
        unstarted run was cleared), ``busy`` (a live process writes the run) or ``foreign``
        (files tbps did not write, or a damaged ``last/``: left alone).
    """
    if not run.is_dir():
        return "empty"
    had_temps = any(is_temp(p.name) for p in run.iterdir())
    sweep_temps(run)
    names = {p.name for p in run.iterdir()}
    if not names:
        # Only a dead run's temps were there: killed before its first run.json, an unstarted run.
        return "restarted" if had_temps else "empty"
    if last_is_complete(run):
        return "resumable"
    if _writer_alive(run):
        return "busy"
    if RUN_MARKER in names and names <= _UNSTARTED:
        for name in names:
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return "restarted"
    return "foreign"

