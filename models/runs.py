"""Reading what ``tbps train`` and ``tbps export`` wrote: a run directory is a loadable model.

Run directory (written by :mod:`tbps.train.checkpoint`)::

    RUN/run.json        the record: resolved TrainConfig, base model spec and identity, adapter
                        config, data path + content hash, parameters, timings, best step and its
                        val metrics, versions, git commit. Its presence marks a run directory.
    RUN/log.jsonl       one JSON line per log interval (``kind: train``) and per validation (``kind: val``)
    RUN/last/           the latest state, for ``--resume``:
        adapter_config.json, adapter_model.safetensors   the trained tensors (save_adapters)
        trainer.pt      optimizer, scheduler, step, micro-batch, RNG states, the config
    RUN/best/           the weights of the best validation step (only with ``--val``)

Loading a run rebuilds its base model (any family, through the registry),
applies the adapters and loads the trained tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_dir, content_hash, file_hash, sweep_temps, write_json
from tbps.models.adapters import CONFIG_FILE, WEIGHTS_FILE, load_adapters, merge_adapters
from tbps.models.protocol import Encoder
from tbps.models.registry import load as load_model

RUN_MARKER = "run.json"
LOG_FILE = "log.jsonl"
LAST = "last"
BEST = "best"
TRAINER_FILE = "trainer.pt"

CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what a loadable checkpoint directory holds


def load_base(spec: str, seed: int = 0) -> Encoder:
    """A base model for training or for a run's weights, unadapted.

    A run directory as the base (a run trained on another run) loads with its adapters (or full
    fine-tuning) folded in: the weights that run ended with.
    """
    loaded = load_model(spec, seed)
    merge_adapters(loaded.model)
    return loaded


def choose_checkpoint(run: Path, record: dict[str, Any], checkpoint: str | None) -> Path:
    """The checkpoint directory a run loads or exports: ``best``/``last``, default the run's result.

    Raises:
        UsageError: ``checkpoint`` is neither ``best`` nor ``last``.
        TbpsError: the run has not saved that checkpoint.
    """
    if checkpoint not in (None, BEST, LAST):
        raise UsageError(f"the checkpoint is {BEST} or {LAST}", field="--checkpoint", value=checkpoint)
    which = checkpoint or record.get("result_checkpoint") or LAST
    if checkpoint is None and not (run / which).is_dir():
        which = LAST  # a run stopped before its first validation: its last state is all there is
    directory = run / which
    if not all((directory / name).is_file() for name in CHECKPOINT_FILES):
        raise TbpsError("the run has no such checkpoint", path=directory, hint="the run may not have saved one yet")
    return directory


def weights_hash(directory: Path) -> str:
    """The content hash of a checkpoint directory: over the hashes of its adapter config and weights files."""
    return content_hash("".join(file_hash(directory / name) for name in CHECKPOINT_FILES).encode())


def load_weights(loaded: Encoder, directory: Path) -> Encoder:
    """Apply and load the saved adapters (or full weights) onto a freshly loaded base model.

    Args:
        loaded: the base model, unadapted.
        directory: a checkpoint directory (``RUN/best`` or ``RUN/last``).

    Returns:
        ``loaded``, its model adapted and loaded.
    """
    # load_adapters initialises lora_A before loading: keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        load_adapters(loaded.model, directory)
    return loaded


def check_base(run: Path, record: dict[str, Any], base: Encoder) -> None:
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


def read_record(run: Path) -> dict[str, Any]:
    """A run's ``run.json``, with its ``config``.

    Raises:
        TbpsError: not a run directory, or the record is unreadable.
    """
    if not (run / RUN_MARKER).exists():
        raise TbpsError("not a tbps run directory", path=run, hint=f"a run directory holds {RUN_MARKER}")
    try:
        record = json.loads((run / RUN_MARKER).read_text())
        record["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TbpsError(f"unreadable run record ({exc})", path=run / RUN_MARKER) from exc
    return record


def load(spec: str, seed: int = 0) -> Encoder:
    """The registry's entry point: a run directory's model at the run's result checkpoint (``seed`` is the run's)."""
    return load_run(spec)


def load_run(path: str | Path, checkpoint: str | None = None) -> Encoder:
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
    run = Path(path)
    record = read_record(run)
    config = record["config"]
    directory = choose_checkpoint(run, record, checkpoint)
    which = directory.name
    loaded = load_base(config["model"], int(config["seed"]))
    check_base(run, record, loaded)
    load_weights(loaded, directory)
    loaded.model.eval()
    steps = record.get("checkpoints", {}).get(which, {})
    loaded.identity = {
        "spec": str(run),
        "run": run.resolve().name,
        "checkpoint": which,
        "step": steps.get("step"),
        "sha": weights_hash(directory),
        "adapter": config.get("adapter"),
        "base": loaded.identity,
    }
    return loaded


def export_adapters(run: str | Path, out: str | Path, checkpoint: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a run's adapters without merging them: a minimal run directory that loads like the run.

    ``OUT/run.json`` (the run's record, naming the base model) and ``OUT/<checkpoint>/`` with the
    adapter config and weights only (no optimizer state, no log): megabytes for an adapter run
    of a large model, and ``--model OUT`` loads it onto its base model.

    Args:
        run: the run directory.
        out: the directory to write (replaced whole when it exists).
        checkpoint: ``best`` or ``last``; default: the run's result.

    Returns:
        The written directory and the identity of the exported weights.
    """
    run, out = Path(run), Path(out)
    record = read_record(run)
    source = choose_checkpoint(run, record, checkpoint)
    which = source.name
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and "exported_from" not in _record_or_empty(out))):
        raise TbpsError("--out exists and is not a previous adapter export", path=out, hint="choose a new or empty directory")
    sweep_temps(out.parent)  # an export killed between its two renames is put back
    identity = {"run": run.resolve().name, "checkpoint": which, "step": record.get("checkpoints", {}).get(which, {}).get("step"),
                "sha": weights_hash(source)}
    with atomic_dir(out) as tmp:
        (tmp / which).mkdir()
        for name in CHECKPOINT_FILES:
            shutil.copyfile(source / name, tmp / which / name)
        write_json(tmp / RUN_MARKER, {**record, "result_checkpoint": which, "exported_from": {"path": str(run.resolve()), **identity}})
    return Path(out), identity


def _record_or_empty(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Fold a run's adapters into plain weights and write its family's checkpoint.

    Args:
        run: the run directory.
        out: the checkpoint file to write (``tbps.models.load`` reads it back).
        checkpoint: ``best`` or ``last``; default: the run's result.

    Returns:
        The written path and the identity of the exported weights.
    """
    loaded = load_run(run, checkpoint)
    merge_adapters(loaded.model)
    path = loaded.save(out, extra={"exported_from": loaded.identity})
    return path, loaded.identity
