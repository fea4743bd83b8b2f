"""Reading what ``tbps train`` and ``tbps export`` wrote: a run directory is a loadable model.

Run directory (written by :mod:`tbps.train.checkpoint`)::

    RUN/run.json        the record: resolved TrainConfig, base model spec and identity, adapter
                        config, data path + content hash, parameters, timings, best step and its
                        val metrics, versions, git commit. Its presence marks a run directory.
    RUN/log.jsonl       one JSON line per log interval (``kind: train``) and per validation (``kind: val``)
    RUN/log.csv         with ``--log-to csv``: the same lines as a table (:mod:`tbps.train.sinks`)
    RUN/tensorboard/    with ``--log-to tensorboard``: the same numbers as TensorBoard scalars
    RUN/last/           the latest state, for ``--resume``:
        adapter_config.json, adapter_model.safetensors   the trained tensors (save_adapters)
        trainer.pt      optimizer, scheduler, step, micro-batch, RNG states, the config
    RUN/best/           the weights of the best validation step (only with ``--val``)

Loading a run rebuilds its base model (any family, through the registry),
applies the adapters and loads the trained tensors.

Exports (``tbps export``): :func:`export_run` folds the adapters into the family's plain
checkpoint, :func:`export_adapters` writes the adapters alone in tbps's format, and
:func:`export_peft` writes them in PEFT's format (:mod:`tbps.models.peft_format`)::

    DIR/adapter_config.json        a PEFT LoraConfig (base_model_name_or_path: the base model spec)
    DIR/adapter_model.safetensors  the tensors under PEFT's names
    DIR/tbps_export.json           the run, checkpoint, step and weights hash; the base model
                                   (spec, seed, identity); the trained logit_scale
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from tbps.errors import TbpsError, UsageError
from tbps.files import atomic_dir, content_hash, file_hash, sweep_temps, write_bytes, write_json
from tbps.models import peft_format
from tbps.models.itm import HeadConfig, MatchingHead
from tbps.models.adapters import CONFIG_FILE, WEIGHTS_FILE, adapter_config, adapter_state_dict, load_adapters, mark_base_model, merge_adapters
from tbps.models.protocol import Encoder
from tbps.models.registry import load as load_model

RUN_MARKER = "run.json"
LOG_FILE = "log.jsonl"
CSV_LOG_FILE = "log.csv"  # --log-to csv
TENSORBOARD_DIR = "tensorboard"  # --log-to tensorboard
REPORT_FILE = "report.html"  # the run's curves (tbps.train.report)
LAST = "last"
BEST = "best"
TRAINER_FILE = "trainer.pt"
PEFT_EXPORT_FILE = "tbps_export.json"  # beside PEFT's two files: what tbps exported, from where
PEFT_EXPORT_FORMAT = "tbps-peft-export/1"

CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what a loadable checkpoint directory holds
# ... and, from a run trained with --itm-head, its matching head (config and weights).
HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE = "itm_head.json", "itm_head.safetensors"


def save_head(head: MatchingHead, directory: Path) -> None:
    """Write a matching head beside a checkpoint's adapters (each file atomically)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    write_bytes(directory / HEAD_WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_json(directory / HEAD_CONFIG_FILE, head.config.to_dict())


def _load_head(loaded: Encoder, directory: Path) -> None:
    """Attach the checkpoint's matching head, when it has one."""
    if not (directory / HEAD_CONFIG_FILE).is_file():
        return
    try:
        config = HeadConfig(**json.loads((directory / HEAD_CONFIG_FILE).read_text()))
        state = load_safetensors(str(directory / HEAD_WEIGHTS_FILE))
    except (OSError, ValueError, TypeError) as exc:
        raise TbpsError(f"cannot read the run's matching head ({exc})", path=directory / HEAD_WEIGHTS_FILE) from exc
    loaded.attach_itm_head(config, state)


def load_base(spec: str, seed: int = 0) -> Encoder:
    """A base model for training or for a run's weights, unadapted.

    A run directory as the base (a run trained on another run) loads with its adapters (or full
    fine-tuning) folded in: the weights that run ended with. The model records which base it is
    (spec, seed, identity): every adapter config saved from it names that base.
    """
    loaded = load_model(spec, seed)
    merge_adapters(loaded.model)
    mark_base_model(loaded.model, {"spec": spec, "seed": seed, "identity": loaded.identity})
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
    _load_head(loaded, directory)
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


def _record_or_empty(directory: Path, name: str = RUN_MARKER) -> dict[str, Any]:
    try:
        record = json.loads((directory / name).read_text())
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


def export_peft(run: str | Path, out: str | Path, checkpoint: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a run's LoRA or DoRA adapters in PEFT's format: ``peft.PeftModel.from_pretrained(base, OUT)`` loads them.

    ``base`` is the run's base model as tbps loads it (``tbps.models.load(spec, seed).model``,
    e.g. ``open_clip.create_model("ViT-B-16", pretrained="openai")``); the embeddings equal the
    run's. See :mod:`tbps.models.peft_format` for the mapping and what is refused.

    Args:
        run: the run directory.
        out: the directory to write (replaced whole when it is a previous PEFT export).
        checkpoint: ``best`` or ``last``; default: the run's result.

    Returns:
        The written directory and the identity of the exported weights.

    Raises:
        TbpsError: a method or layer PEFT cannot represent (WoRA, full, DoRA on attention, ...),
            or an ``out`` that is not empty and not a previous PEFT export.
    """
    run, out = Path(run), Path(out)
    record = read_record(run)
    peft_format.check_method((record.get("adapter") or {}).get("method") or record["config"].get("adapter"), run)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _record_or_empty(out, PEFT_EXPORT_FILE).get("format") != PEFT_EXPORT_FORMAT)):
        raise TbpsError("--peft exists and is not a previous PEFT export", path=out, hint="choose a new or empty directory")
    loaded = load_run(run, checkpoint)
    tensors = adapter_state_dict(loaded.model)
    config, peft_tensors = peft_format.to_peft(loaded.model, adapter_config(loaded.model), record["config"]["model"], tensors, run)
    identity = {k: loaded.identity[k] for k in ("run", "checkpoint", "step", "sha")}
    base = record.get("base_model") or {"spec": record["config"]["model"], "seed": record["config"].get("seed")}
    scale = tensors.get(peft_format.TEMPERATURE)
    sweep_temps(out.parent)  # an export killed between its two renames is put back
    with atomic_dir(out) as tmp:
        write_json(tmp / CONFIG_FILE, config)
        write_bytes(tmp / WEIGHTS_FILE, safetensors_bytes(peft_tensors, metadata={"format": "pt"}))
        write_json(tmp / PEFT_EXPORT_FILE, {
            "format": PEFT_EXPORT_FORMAT,
            "exported_from": {"path": str(run.resolve()), **identity},
            "base_model": base,
            "method": "dora" if config["use_dora"] else "lora",
            "logit_scale": float(scale.reshape(-1)[0]) if scale is not None else None,
            "note": "logit_scale (the trained temperature) changes no embedding; PEFT's files cannot hold it",
        })
    return out, identity
