"""The run directory of ``tbps train``: what it holds, how to resume it, load it and export it.

Layout::

    RUN/run.json        the record: resolved TrainConfig, base model spec and identity, adapter
                        config, data path + content hash, trainable/total parameters, training
                        wall time, pairs seen, best step and its val metrics, versions, git commit.
                        Its presence marks a run directory for ``tbps.models.load``.
    RUN/log.jsonl       one JSON line per log interval (``kind: train``) and per validation
                        (``kind: val``)
    RUN/last/           the latest state, for ``--resume``:
        adapter_config.json, adapter_model.safetensors   the trained tensors (save_adapters)
        trainer.pt      optimizer, scheduler, step, micro-batch, RNG states, the config
    RUN/best/           the weights of the best validation step (only with ``--val``)

The weights are always written by :func:`tbps.train.adapters.save_adapters`: for the adapter
methods that is the adapter tensors (plus the learnable ``logit_scale``), never the frozen base
weights; for ``full`` it is every parameter, i.e. the full state dict. A checkpoint directory is
written beside its final name and renamed into place, so a killed run leaves the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbps.errors import TbpsError, UsageError
from tbps.models import RUN_MARKER, LoadedModel, file_hash

LOG_FILE = "log.jsonl"
LAST = "last"
BEST = "best"
TRAINER_FILE = "trainer.pt"


def build_model(model: str, seed: int, adapter: str, rank: int, targets: list[str] | None, wora_norm: str) -> LoadedModel:
    """The base model with fresh adapters, as a training run starts.

    The learnable temperature ``logit_scale`` trains with the adapters (``extra_trainable``).

    Args:
        model: the base model spec (see ``tbps.models.load``).
        seed: seeds random base weights (bare config names) and the adapters' ``lora_A``.
        adapter: ``wora``, ``dora``, ``lora``, ``full`` or ``none``.
        rank: the adapter rank.
        targets: module name patterns, or None for every Linear / MultiheadAttention.
        wora_norm: ``per-input`` or ``per-output``.

    Returns:
        The loaded model, adapted in place.
    """
    from tbps.models import load
    from tbps.train.adapters import ADAPTER_METHODS, apply_adapters

    loaded = load(model, seed=seed)
    opts: dict[str, Any] = {"targets": targets} if adapter in ADAPTER_METHODS else {}
    if adapter in ADAPTER_METHODS:
        opts["extra_trainable"] = ["logit_scale"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        apply_adapters(loaded.model, method=adapter, rank=rank, wora_norm=wora_norm, **opts)
    return loaded


def _weights_hash(directory: Path) -> str:
    """blake2b-128 of the adapter config and weights files of a checkpoint directory."""
    from tbps.train.adapters import CONFIG_FILE, WEIGHTS_FILE

    h = hashlib.blake2b(digest_size=16)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(file_hash(directory / name).encode())
    return h.hexdigest()


def write_checkpoint(run: Path, name: str, model: torch.nn.Module, trainer: dict[str, Any] | None = None) -> Path:
    """Write ``RUN/name/`` (weights, and ``trainer.pt`` when given) atomically.

    Args:
        run: the run directory.
        name: ``last`` or ``best``.
        model: the adapted model (or its DDP wrapper).
        trainer: the resume state, for ``last``.

    Returns:
        The checkpoint directory.
    """
    from tbps.train.adapters import save_adapters

    final, tmp, old = run / name, run / f".{name}.tmp", run / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapters(model, tmp)
    if trainer is not None:
        torch.save(trainer, tmp / TRAINER_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


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
    from tbps.train.adapters import CONFIG_FILE, WEIGHTS_FILE

    last = run / LAST
    if not (run / RUN_MARKER).is_file():
        raise TbpsError("cannot resume: not a run directory", path=run, hint=f"a run holds {RUN_MARKER}; drop --resume to start one")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE):
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


def load_weights(loaded: LoadedModel, directory: Path) -> LoadedModel:
    """Apply and load the saved adapters (or full weights) onto a freshly loaded base model.

    Args:
        loaded: the base model, unadapted.
        directory: a checkpoint directory (``RUN/best`` or ``RUN/last``).

    Returns:
        ``loaded``, its model adapted and loaded.
    """
    from tbps.train.adapters import load_adapters

    # load_adapters initialises lora_A before loading: keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        load_adapters(loaded.model, directory)
    return loaded


def check_base(run: Path, record: dict[str, Any], base: LoadedModel) -> None:
    """Refuse a base model whose identity (spec, weights, content hash) differs from the run's.

    Args:
        run: the run directory, for the message.
        record: its ``run.json``.
        base: the base model as it loads now.

    Raises:
        TbpsError: the identities differ (adapters on other base weights are meaningless).
    """
    expected = (record.get("base_model") or {}).get("identity")
    if expected and expected != base.identity:
        raise TbpsError(
            "the base model now loads other weights than the run was trained on",
            path=run,
            field="model",
            value=base.identity,
            hint=f"the run was trained on {expected}",
        )


def load_run_model(path: str | Path, checkpoint: str | None = None) -> LoadedModel:
    """Rebuild a run's model: the base model from ``run.json`` with the run's trained weights.

    Args:
        path: the run directory.
        checkpoint: ``best`` or ``last``; default: the run's result (``best`` with validation,
            else ``last``).

    Returns:
        The model in eval mode; ``identity`` names the run, the checkpoint, its step, the content
        hash of its weights and the base model's identity.

    Raises:
        TbpsError: run.json is unreadable, the checkpoint is missing, or the base model now
            loads with other weights than the run was trained on.
    """
    from tbps.models import load

    run = Path(path)
    try:
        record = json.loads((run / RUN_MARKER).read_text())
        config = record["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TbpsError(f"unreadable run record ({exc})", path=run / RUN_MARKER) from exc
    if checkpoint not in (None, BEST, LAST):
        raise UsageError(f"the checkpoint is {BEST} or {LAST}", field="--checkpoint", value=checkpoint)
    which = checkpoint or record.get("result_checkpoint") or LAST
    if checkpoint is None and not (run / which).is_dir():
        which = LAST  # a run stopped before its first validation: its last state is all there is
    directory = run / which
    if not directory.is_dir():
        raise TbpsError("the run has no such checkpoint", path=directory, hint="the run may not have saved one yet")
    loaded = load(config["model"], seed=int(config["seed"]))
    check_base(run, record, loaded)
    load_weights(loaded, directory)
    loaded.model.eval()
    steps = record.get("checkpoints", {}).get(which, {})
    loaded.identity = {
        "spec": str(run),
        "run": run.resolve().name,
        "checkpoint": which,
        "step": steps.get("step"),
        "sha": _weights_hash(directory),
        "adapter": config.get("adapter"),
        "base": loaded.identity,
    }
    return loaded


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Fold a run's adapters into plain weights and write an open_clip checkpoint.

    Args:
        run: the run directory.
        out: the checkpoint file to write (``tbps.models.load`` reads it back).
        checkpoint: ``best`` or ``last``; default: the run's result.

    Returns:
        The written path and the identity of the exported weights.
    """
    from tbps.models import save_checkpoint
    from tbps.train.adapters import merge_adapters

    loaded = load_run_model(run, checkpoint)
    merge_adapters(loaded.model)
    path = save_checkpoint(loaded, out, extra={"exported_from": loaded.identity})
    return path, loaded.identity


def append_log(run: Path, line: dict[str, Any]) -> None:
    """Append one JSON line to ``RUN/log.jsonl``."""
    with open(run / LOG_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def truncate_log(run: Path, step: int) -> None:
    """Drop log lines after ``step`` (a resumed run rewrites them)."""
    path = run / LOG_FILE
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))

