"""``tbps train``: fine-tune a CLIP model with WoRA (or DoRA, LoRA, full) on a manifest or dataset.

The core of :func:`train` reads top to bottom: check every input (data, validation set, resume
checkpoint, model and adapters) before any training, then AdamW with linear warm-up and cosine
decay, gradient accumulation, clipping, autocast, a log line per interval, validation every
``val_every`` steps (R@1 then mAP picks ``best/``; never the test split), and ``last/`` every
``save_every`` steps. Before any of it, the training rows are compared with the validation split
(:func:`tbps.eval.leakage.find_overlap`): shared images or persons refuse the run unless
``allow_overlap`` says to go on (the run's record keeps the overlap and the option either way).
Under ``torchrun`` it runs DDP (gloo on CPU, nccl on GPU): ``batch_size``
is the global micro-batch, split evenly over the ranks, the contrastive loss sees the gathered
global batch, and only rank 0 writes the run directory. See :mod:`tbps.train.checkpoint` for
the run directory and :mod:`tbps.train.data` for the deterministic batch order that makes
``--resume`` reproduce an uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from tbps import columns as C
from tbps.data.options import ReaderOptions
from tbps.errors import TbpsError, UsageError
from tbps.eval.leakage import Overlap, find_overlap
from tbps.eval.metrics import retrieval_metrics_from_embeddings
from tbps.files import file_hash, write_json
from tbps.models.adapters import METHODS, NORMS, adapter_config
from tbps.models.device import autocast_dtype, check_device, check_precision, distributed
from tbps.models.encode import encode_images, encode_texts, worker_errors
from tbps.models.itm import HEAD_LR_SCALE, count_head_parameters
from tbps.models.protocol import Encoder, count_parameters
from tbps.models.runs import RUN_MARKER, check_base, load_base, load_weights
from tbps.provenance import record
from tbps.train import checkpoint as ckpt
from tbps.train import data as D
from tbps.train.loss import LOSSES, contrastive_loss
from tbps.train.report import write_report

DEFAULT_EPOCHS = 5
# Options that may change between a run and its --resume: they do not shape the result.
RESUME_FREE = {"out", "resume", "workers", "log_every", "allow_overlap"}
_UNDECODABLE_EXAMPLES = 5  # undecodable training files named in the run's record


@dataclass(kw_only=True)
class TrainConfig(ReaderOptions):
    """Options of ``tbps train``; field names equal the CLI option names.

    Attributes:
        out: the run directory to write (or to resume).
        model: the base model spec (``tbps.models.load``).
        manifest: a manifest Parquet (``tbps select``); exclusive with ``data``.
        data: a dataset any reader supports; exclusive with ``manifest``.
        format, image_root, image_col, caption_col, id_col: the reader options of ``data`` and
            ``val`` (``tbps.data.options.ReaderOptions``); ``image_root`` is also where
            relative manifest paths resolve.
        train_split: the split of ``data`` to train on, when the file has splits.
        val: the validation dataset (reader formats); None trains without validation.
        val_split: the split of ``val`` to validate on, when the file has splits.
        adapter: ``wora``, ``dora``, ``lora`` or ``full``.
        rank: adapter rank.
        wora_norm: ``per-input`` (paper code) or ``per-output`` (DoRA convention).
        targets: module name patterns to adapt; None: every Linear and MultiheadAttention.
        lora_alpha: LoRA's and DoRA's alpha (``scaling = lora_alpha / rank``); None: the default 16.
        fixed_scale: WoRA with alpha and beta frozen at their initial values (isolates "learnable alpha, beta").
        also_train: parameter name patterns that train besides the adapters and ``logit_scale``
            (e.g. layer norms and embeddings, as the paper's released code trains them).
        loss: ``clip`` (InfoNCE) or ``sdm`` (identity-aware, IRRA).
        epochs: passes over the data (exclusive with ``steps``; default 5 when neither is given).
        steps: optimizer steps (exclusive with ``epochs``).
        batch_size: pairs per micro-batch, over all ranks together.
        accum: micro-batches per optimizer step (gradient accumulation).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay of matrices (never of biases, gains, scalars).
        warmup: the linear warm-up before the cosine decay to zero: a share of the run's steps when
            below 1 (default 5%), else a number of steps (at most the run's steps).
        clip_grad: max gradient norm; 0 disables clipping.
        precision: ``auto`` (bf16 autocast where native), ``fp32`` or ``bf16``.
        seed: seeds random base weights, adapter init, data order and augmentation.
        val_every: validate every N optimizer steps (and after the last).
        save_every: write ``last/`` every N steps (and after the last).
        log_every: one log line every N steps.
        workers: DataLoader worker processes decoding images.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun: the local rank's GPU).
        resume: continue the run in ``out`` from its ``last/`` checkpoint.
        max_missing: largest share of rows with a missing image file that is skipped; above
            it the run refuses before training.
        allow_test: validate on a split named ``test`` (refused otherwise: choosing checkpoints on
            the test split leaks it into the result); the run's record keeps the option.
        allow_overlap: train although the training rows share images (path or content) or
            persons with the validation split (refused otherwise, before training); the run's
            record keeps the overlap and the option.
        itm_head: train an image-text matching head beside the model (open_clip models;
            :mod:`tbps.models.itm`): caption tokens attend to image tokens, trained on in-batch
            hard negatives chosen by similarity; its loss is added to the contrastive one. The
            run then scores pairs with ``itm_score``.
        hard_negatives: each caption perturbed (:mod:`tbps.data.perturb`: colours swapped or
            replaced, garments swapped) is one more negative of its image: in the contrastive
            loss (NegCLIP; ``--loss clip``) and, with ``itm_head``, in the matching loss.
    """

    out: str
    model: str
    manifest: str | None = None
    data: str | None = None
    train_split: str | None = "train"
    val: str | None = None
    val_split: str | None = "val"
    adapter: str = "wora"
    rank: int = 8
    wora_norm: str = "per-input"
    targets: list[str] | None = None
    lora_alpha: float | None = None
    fixed_scale: bool = False
    also_train: list[str] | None = None
    loss: str = "clip"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64
    accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    clip_grad: float = 1.0
    precision: str = "auto"
    seed: int = 0
    val_every: int = 500
    save_every: int = 500
    log_every: int = 10
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    max_missing: float = 0.05
    allow_test: bool = False
    allow_overlap: bool = False
    itm_head: bool = False
    hard_negatives: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.manifest is None) == (self.data is None):
            raise UsageError("give exactly one of --manifest and --data", field="--manifest", value=(self.manifest, self.data))
        if self.adapter not in METHODS:
            raise UsageError(f"--adapter must be one of {', '.join(METHODS)}", field="--adapter", value=self.adapter)
        if self.adapter == "none":
            raise UsageError("--adapter none trains nothing; use it to evaluate a frozen model", field="--adapter", value="none")
        if self.wora_norm not in NORMS:
            raise UsageError(f"--wora-norm must be one of {', '.join(NORMS)}", field="--wora-norm", value=self.wora_norm)
        if self.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}", field="--loss", value=self.loss)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.targets is not None:
            # "--targets c_fc,c_proj" and repeated --targets both work.
            self.targets = [t.strip() for item in self.targets for t in item.split(",") if t.strip()] or None
        if self.targets is not None and self.adapter == "full":
            raise UsageError("--targets applies to the adapter methods, not --adapter full", field="--targets", value=self.targets)
        if isinstance(self.also_train, str):
            self.also_train = [self.also_train]
        if self.also_train is not None:
            self.also_train = [t.strip() for item in self.also_train for t in item.split(",") if t.strip()] or None
        if self.also_train is not None and self.adapter == "full":
            raise UsageError("--also-train applies to the adapter methods (full trains everything)", field="--also-train", value=self.also_train)
        if self.lora_alpha is not None and self.adapter not in ("lora", "dora"):
            raise UsageError("--lora-alpha applies to --adapter lora or dora", field="--lora-alpha", value=self.lora_alpha)
        if self.fixed_scale and self.adapter != "wora":
            raise UsageError("--fixed-scale applies to --adapter wora", field="--fixed-scale", value=self.adapter)
        if self.hard_negatives and self.loss != "clip":
            raise UsageError("--hard-negatives are added to the clip loss (NegCLIP); --loss sdm has no place for them",
                             field="--hard-negatives", value=self.loss)
        if self.epochs is not None and self.steps is not None:
            raise UsageError("give --epochs or --steps, not both", field="--steps", value=(self.epochs, self.steps))
        if self.epochs is None and self.steps is None:
            self.epochs = DEFAULT_EPOCHS
        for name in ("rank", "epochs", "steps", "batch_size", "accum", "val_every", "save_every", "log_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1", field=f"--{name.replace('_', '-')}", value=value)
        if self.warmup >= 1 and float(self.warmup) != int(self.warmup):
            raise UsageError("--warmup is a share of the steps (below 1) or a whole number of steps", field="--warmup", value=self.warmup)
        for name in ("warmup", "workers"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be 0 or more", field=f"--{name}", value=getattr(self, name))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError("--lr must be a positive number", field="--lr", value=self.lr)
        for name in ("weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more", field=f"--{name.replace('_', '-')}", value=value)
        check_precision(self.precision)
        if self.val_split == "test" and not self.allow_test:
            raise UsageError("--val-split test would choose the checkpoint on the test split", field="--val-split", value="test",
                             hint="validate on val; --allow-test does it anyway and the run's record says so")
        if not 0.0 <= self.max_missing <= 1.0:
            raise UsageError("--max-missing is a fraction between 0 and 1", field="--max-missing", value=self.max_missing)


@dataclass
class TrainResult:
    """What a ``tbps train`` process did (the same on every rank; only rank 0 wrote it)."""

    run: Path
    steps: int
    pairs_seen: int
    train_seconds: float
    final_loss: float
    trainable: int
    total: int
    result_checkpoint: str
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    rank: int = 0


@dataclass
class ValSet:
    """Validation queries (every caption) and gallery (the distinct images), with the rows they came from."""

    captions: list[str]
    query_pids: list[str]
    gallery_paths: list[str]
    gallery_pids: list[str]
    report: D.PairReport
    pairs: pl.DataFrame


def warmup_steps(warmup: float, total: int) -> int:
    """The warm-up in steps: a share of ``total`` when ``warmup`` is below 1, else that many steps, at most ``total``."""
    return round(warmup * total) if warmup < 1 else min(int(warmup), total)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier of an optimizer step: linear warm-up, then cosine decay to zero.

    Args:
        step: the 0-based optimizer step.
        warmup: warm-up steps (the multiplier reaches 1 at ``step == warmup``).
        total: the run's optimizer steps (the multiplier reaches 0 there).

    Returns:
        A factor in [0, 1].
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def load_training_pairs(config: TrainConfig) -> tuple[pl.DataFrame, D.PairReport, dict[str, Any]]:
    """Read the manifest (or dataset split) and keep the rows training can use.

    Args:
        config: the options (``manifest`` or ``data`` with reader options, ``max_missing``).

    Returns:
        The usable pairs, the report of skipped rows, and the source (kind, path, content hash).

    Raises:
        TbpsError: a missing or malformed source, too many missing images, fewer pairs than a batch.
    """
    roots = None
    if config.manifest is not None:
        roots = D.manifest_image_roots(config.manifest, config.image_root)
        frame, source = D.read_manifest(config.manifest, config.image_root, roots), config.manifest
    else:
        frame, source = D.read_split(config.data, config.train_split, config.reader_options(), "--data"), config.data
    frame, report = D.usable_pairs(frame, source, config.max_missing)
    report.image_roots = roots
    if frame.height < config.batch_size:
        raise TbpsError(
            f"only {frame.height} usable pairs, fewer than one batch (--batch-size {config.batch_size})",
            path=source,
            hint="lower --batch-size",
        )
    sha = file_hash(source) if Path(source).is_file() else None
    return frame, report, {"kind": "manifest" if config.manifest else "dataset", "path": str(source), "sha": sha}


def load_val_set(config: TrainConfig) -> ValSet:
    """Read the validation split: every caption a query, every distinct image one gallery item.

    Args:
        config: the options (``val``, ``val_split`` and reader options).

    Returns:
        The :class:`ValSet`.

    Raises:
        TbpsError: an unreadable dataset, an unknown split, or pairs without a person id.
    """
    frame = D.read_split(config.val, config.val_split, config.reader_options(), "--val")
    frame, report = D.usable_pairs(frame, config.val, None)
    if frame.get_column(C.PERSON_ID).null_count():
        raise TbpsError("validation needs a person id on every pair", path=config.val, field=C.PERSON_ID)
    gallery = frame.unique(C.IMAGE_PATH, keep="first", maintain_order=True)
    return ValSet(
        frame.get_column(C.CAPTION).to_list(),
        frame.get_column(C.PERSON_ID).to_list(),
        gallery.get_column(C.IMAGE_PATH).to_list(),
        gallery.get_column(C.PERSON_ID).to_list(),
        report,
        frame,
    )


def check_overlap(pairs: pl.DataFrame, val: ValSet, config: TrainConfig) -> tuple[Overlap, list[str]]:
    """Refuse training rows that share images or persons with the validation split, unless ``allow_overlap``.

    Args:
        pairs: the usable training rows.
        val: the validation set.
        config: the options (``val``, ``val_split``, ``allow_overlap``).

    Returns:
        The :class:`tbps.eval.leakage.Overlap` and the lines to log (a warning when the overlap
        is allowed, a note when persons could not be compared).

    Raises:
        TbpsError: images or persons are shared and ``allow_overlap`` is off.
    """
    overlap = find_overlap(pairs, val.pairs)
    has_splits = val.pairs.get_column(C.SPLIT).drop_nulls().len() > 0 if C.SPLIT in val.pairs.columns else False
    where = f"the validation data (--val {config.val}" + (f", split {config.val_split})" if has_splits and config.val_split else ")")
    lines = []
    if overlap.found:
        message = f"the training rows share {overlap.describe()} with {where}; a checkpoint chosen there is not chosen on held-out data"
        if not config.allow_overlap:
            raise TbpsError(
                message,
                field="--val",
                hint="train on other persons' rows (tbps score --split train, tbps select --split train, --train-split) or validate "
                "on another split; --allow-overlap trains anyway and run.json records it",
            )
        lines.append(f"warning: {message} (--allow-overlap: training anyway)")
    if overlap.persons is None:
        lines.append(f"note: persons could not be checked against {where}: {overlap.persons_note}")
    elif overlap.persons_note:
        lines.append(f"note: checking persons against {where}: {overlap.persons_note}")
    return overlap, lines


def validate(loaded, val: ValSet, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Text-to-image retrieval metrics on the validation set (the model runs in eval mode).

    Args:
        loaded: the model being trained (its ``model`` is switched to eval and back).
        val: the validation set.
        config: the options (batch size, workers, precision).
        device: where the model is.

    Returns:
        ``retrieval_metrics_from_embeddings``'s dict: R1, R5, R10, mAP, mINP (percent), counts.
    """
    was_training = loaded.model.training
    loaded.model.eval()
    images = encode_images(loaded, val.gallery_paths, batch_size=config.batch_size, workers=config.workers, device=device, precision=config.precision)
    texts = encode_texts(loaded, val.captions, batch_size=config.batch_size, device=device, precision=config.precision)
    loaded.model.train(was_training)
    ok = images.ok
    gallery_pids = [p for p, good in zip(val.gallery_pids, ok) if good]
    return retrieval_metrics_from_embeddings(texts, images.embeddings[ok], val.query_pids, gallery_pids)


def _plain(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON values (paths as strings): what the trainer state stores and resume compares."""
    return json.loads(json.dumps(asdict(config), default=str))


def freeze_scale(model: torch.nn.Module) -> int:
    """Freeze WoRA's alpha and beta (``--fixed-scale``): W' = m * (beta*W0 + alpha*B*A) / norm with alpha, beta fixed.

    Returns:
        How many scalars were frozen.
    """
    frozen = 0
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("wora_alpha", "wora_beta"):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _optimizer(model: torch.nn.Module, config: TrainConfig, head: torch.nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (as open_clip).

    A matching head (``head``, new where the towers are trained) learns at ``HEAD_LR_SCALE``
    times ``--lr``.

    The fused implementation where torch has one (CPU and CUDA): one kernel per parameter group
    instead of several passes, which matters for the 6.3M-entry token embedding of a full
    fine-tune (tbps-tiny on 2 CPU cores: 445 -> 329 ms per step of 32 pairs).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_head = {id(p) for p in head.parameters()} if head is not None else set()
    groups = []
    for fast, lr in ((False, config.lr), (True, config.lr * HEAD_LR_SCALE)):
        mine = [(n, p) for n, p in params if (id(p) in in_head) == fast]
        groups += [
            {"params": [p for _, p in mine if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for _, p in mine if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    groups = [g for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") for _, p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


@dataclass
class Setup:
    """Everything :func:`train` needs, built and checked by :func:`prepare` before any step."""

    run: Path
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None
    loaded: Encoder  # adapted
    ddp: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    total_steps: int
    per_epoch: int  # micro-batches per epoch
    val: ValSet | None
    state: dict[str, Any]  # the resumed trainer state ({} for a fresh run)
    record: dict[str, Any]  # what run.json says besides the config and progress
    report: D.PairReport
    notes: list[str] = field(default_factory=list)  # lines for the log before training (rank 0)


def prepare(config: TrainConfig) -> Setup:
    """Check every input and build model, optimizer, schedule and data (no training step).

    Args:
        config: the resolved options.

    Returns:
        The :class:`Setup`; the process group is joined when run under torchrun.

    Raises:
        TbpsError: bad data, manifest, validation set, adapter targets or resume checkpoint.
        UsageError: options that do not fit together.
    """
    run = Path(config.out)
    check_device(config.device)
    if config.batch_size % int(os.environ.get("WORLD_SIZE", "1")):
        raise UsageError("--batch-size must be divisible by the number of torchrun processes", field="--batch-size", value=config.batch_size)
    # After a kill at any instant: temps swept, an interrupted checkpoint put back, an unstarted run cleared.
    place = distributed(config.device)
    rank, world, device = place.rank, place.world, place.device
    found = [ckpt.recover(run) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(found)  # every rank acts on rank 0's finding (it alone changes the directory)
    found = found[0]
    if found == "busy":
        raise TbpsError("another tbps train is writing this run directory", path=run, hint="wait for it, or choose another --out")
    if not config.resume and found in ("foreign", "resumable"):
        raise TbpsError("the run directory is not empty", path=run, hint="pass --resume to continue the run there, or choose another --out")
    resume = config.resume and found != "restarted"  # a run killed before its first checkpoint starts afresh
    pairs, report, source = load_training_pairs(config)
    val = load_val_set(config) if config.val else None
    overlap, notes = check_overlap(pairs, val, config) if val else (None, [])
    saved = ckpt.read_resume_state(run, _plain(config), RESUME_FREE) if resume else None
    if saved:
        base = load_base(config.model, seed=config.seed)
        check_base(run, json.loads((run / RUN_MARKER).read_text()), base)
        loaded = load_weights(base, saved[0])
    else:
        loaded = ckpt.build_model(config.model, config.seed, config.adapter, config.rank, config.targets, config.wora_norm,
                                  lora_alpha=config.lora_alpha, also_train=config.also_train)
    if config.fixed_scale:
        freeze_scale(loaded.model)
    if config.itm_head and getattr(loaded, "itm_head", None) is None:
        if not hasattr(loaded, "attach_itm_head"):
            raise TbpsError(f"--itm-head trains a matching head on open_clip models; {config.model} is a {loaded.family} model",
                            field="--itm-head", hint="score with a blip or blip-2 model (hf:...) for an ITM head of its own")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            loaded.attach_itm_head()
    state = saved[1] if saved else {}
    model = loaded.model.to(device).train()
    # Building DDP is a collective: no rank writes RUN before every rank has passed the checks above.
    forward = loaded.training_module().to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else forward
    dataset = D.TrainPairs(
        pairs.get_column(C.IMAGE_PATH).to_list(),
        pairs.get_column(C.CAPTION).to_list(),
        D.person_codes(pairs.get_column(C.PERSON_ID).to_list()),
        D.PedestrianAugment(loaded.image_size, *loaded.preprocess.stats, pad=D.default_pad(loaded.image_size)),
        config.seed,
    )
    per_epoch = len(dataset) // config.batch_size
    total_steps = config.steps or max(1, config.epochs * per_epoch // config.accum)
    optimizer = _optimizer(forward, config, head=getattr(loaded, "itm_head", None))  # with --itm-head, the head learns faster
    warm = warmup_steps(config.warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, total_steps))
    if saved:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
    else:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
    start = int(state.get("step", 0)) * config.accum
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=D.GlobalBatches(len(dataset), config.batch_size, config.seed, start, total_steps * config.accum, rank, world),
        num_workers=config.workers,
        collate_fn=D.Collate(loaded.tokenizer, hard_negatives=config.hard_negatives, seed=config.seed),
        pin_memory=device.type == "cuda",
    )
    trainable, total = count_parameters(model)
    head = getattr(loaded, "itm_head", None)
    dtype = autocast_dtype(config.precision, device)
    record = {
        "base_model": {"spec": config.model, "seed": config.seed, "identity": loaded.identity},
        "adapter": adapter_config(model),
        "data": {**source, **asdict(report)},
        "val": {**asdict(val.report), "images_also_in_training": overlap.images,
                "overlap": {**overlap.as_record(), "allowed": config.allow_overlap}} if val else None,
        "parameters": {"trainable": trainable, "total": total, "trainable_share": trainable / total,
                       **({"itm_head": count_head_parameters(head), "itm_head_config": head.config.to_dict()} if head is not None else {})},
        "world_size": world,
        "device": str(device),
        "autocast": str(dtype) if dtype else "fp32",
        "total_steps": total_steps,
        "warmup_steps": warm,
        "result_checkpoint": ckpt.BEST if val else ckpt.LAST,
        "result_note": "the best validation step (R@1, then mAP)" if val else "no --val: the last checkpoint is the result",
    }
    return Setup(run, rank, world, device, dtype, loaded, ddp, optimizer, scheduler, loader, total_steps, per_epoch, val, state, record, report, notes)


def train(
    config: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune a model and write the run directory (see the module docstring).

    Args:
        config: the resolved options.
        progress: called as ``progress(step, total_steps)`` after each optimizer step (rank 0).
        log: called with each log line, e.g. ``step 120 | loss 2.31 | lr 3e-4 | 850 img/s`` (rank 0).

    Returns:
        The :class:`TrainResult`.

    Raises:
        TbpsError: bad input (data, manifest, validation set, adapter targets, resume
            checkpoint, training rows that overlap the validation split), before the first
            training step; during training only a run of training images that do not decode
            (one line; ``run.json`` then says ``failed``).
        UsageError: options that do not fit together (e.g. a batch not divisible by the ranks).
    """
    s = prepare(config)
    if log and s.rank == 0:
        for line in s.notes:
            log(line)
    warm, total = s.record["warmup_steps"], s.total_steps
    if log and s.rank == 0 and warm > total // 2:
        log(f"warning: the warm-up covers {warm} of the run's {total} steps (--warmup {config.warmup:g}): the learning rate "
            "peaks late and decays at once; give --warmup as a share, e.g. 0.05")
    run, model, main = s.run, s.loaded.model, s.rank == 0
    step = int(s.state.get("step", 0))
    best = s.state.get("best")  # {"step", "metrics"} of the best validation so far
    counters = {k: s.state.get(k, 0) for k in ("train_seconds", "pairs_seen", "replaced", "saved_step")}
    undecodable: list[str] = list(s.state.get("undecodable", []))  # a few training files that did not decode
    pairs_per_step = config.batch_size * config.accum

    def write_record(status: str) -> None:
        training = {"train_seconds": counters["train_seconds"], "pairs_seen": counters["pairs_seen"], "images_replaced": counters["replaced"],
                    "undecodable_examples": undecodable}
        write_json(run / RUN_MARKER, record(
            config, **s.record, status=status, step=step, epoch=step * config.accum / s.per_epoch, training=training, best=best,
            checkpoints={ckpt.LAST: {"step": counters["saved_step"] or None}, ckpt.BEST: best},
        ))

    if main:
        run.mkdir(parents=True, exist_ok=True)
        if s.state:
            ckpt.truncate_log(run, step)  # lines past the checkpoint are rewritten by this run
        else:
            write_record("running")
    if progress and main:
        progress(step, s.total_steps)
    batches = iter(s.loader)

    def next_batch() -> D.Batch:
        """The next micro-batch; an undecodable file is named once, a run of them ends the run in one line."""
        try:
            with worker_errors("decoding training images"):
                batch = next(batches)
        except TbpsError:
            if main:
                write_record("failed")
            raise
        for path in batch.undecodable:
            if path not in undecodable and len(undecodable) < _UNDECODABLE_EXAMPLES:
                undecodable.append(path)
                if log and main:
                    log(f"warning: training image {path} does not decode; it is replaced by the next pair "
                        "(counted in run.json training.images_replaced)")
        return batch

    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
    step_loss = float("nan")
    while step < s.total_steps:
        # One optimizer step: `accum` micro-batches, each a contrastive loss over the global batch.
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(config.accum):
            batch = next_batch()
            # DDP all-reduces gradients on the last micro-batch of a step only.
            sync = contextlib.nullcontext() if s.world == 1 or micro == config.accum - 1 else s.ddp.no_sync()
            with sync:
                extra = {}
                if config.itm_head or config.hard_negatives:
                    extra = {"person_ids": batch.person_ids.to(s.device)}
                    if batch.negatives is not None:
                        extra.update(negatives=batch.negatives.to(s.device), negative_valid=batch.negative_valid.to(s.device))
                with torch.autocast(s.device.type, dtype=s.dtype or torch.float32, enabled=s.dtype is not None):
                    out = s.ddp(batch.pixels.to(s.device, non_blocking=True), batch.tokens.to(s.device), **extra)
                image_emb, text_emb, scale = out[:3]
                matching, negative_text = out[3:5] if len(out) > 3 else (None, None)
                loss = contrastive_loss(config.loss, image_emb, text_emb, scale, batch.person_ids.to(s.device),
                                        negatives=negative_text, negative_valid=extra.get("negative_valid") if negative_text is not None else None)
                if matching is not None:
                    loss = loss + matching
                loss = loss / config.accum
                loss.backward()
            step_loss += loss.item()
            counters["replaced"] += batch.replaced
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in s.ddp.parameters() if p.requires_grad], config.clip_grad)
        lr = s.scheduler.get_last_lr()[0]
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        counters["train_seconds"] += seconds
        counters["pairs_seen"] += pairs_per_step
        window = {"loss": window["loss"] + step_loss, "steps": window["steps"] + 1, "seconds": window["seconds"] + seconds}

        if step % config.log_every == 0 or step == s.total_steps:
            line = {"kind": "train", "step": step, "epoch": round(step * config.accum / s.per_epoch, 4), "loss": window["loss"] / window["steps"],
                    "lr": lr, "img_per_s": window["steps"] * pairs_per_step / window["seconds"], "wall_s": counters["train_seconds"]}
            window = {"loss": 0.0, "steps": 0, "seconds": 0.0}
            if main:
                ckpt.append_log(run, line)
                if log:
                    log(f"step {step} | epoch {line['epoch']:.2f} | loss {line['loss']:.4f} | lr {lr:.2e} | {line['img_per_s']:.0f} img/s")

        if s.val and (step % config.val_every == 0 or step == s.total_steps):
            if main:
                metrics = validate(s.loaded, s.val, config, s.device)
                ckpt.append_log(run, {"kind": "val", "step": step, **metrics})
                if log:
                    log(f"val step {step} | R@1 {metrics['R1']:.2f} | mAP {metrics['mAP']:.2f} | {metrics['queries']} queries, {metrics['gallery']} images")
                # The best checkpoint is chosen on the validation split: R@1 first, mAP breaks ties.
                if best is None or (metrics["R1"], metrics["mAP"]) > (best["metrics"]["R1"], best["metrics"]["mAP"]):
                    best = {"step": step, "metrics": {k: metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}}
                    ckpt.write_checkpoint(run, ckpt.BEST, model, head=getattr(s.loaded, "itm_head", None))
                write_report(run)  # RUN/report.html: the curves so far
            if s.world > 1:
                dist.barrier()  # the other ranks wait while rank 0 validates

        if step % config.save_every == 0 or step == s.total_steps:
            counters["saved_step"] = step
            if main:
                trainer = {"step": step, "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                           "rng": ckpt.rng_state(), "micro_batch": step * config.accum, "config": _plain(config), "best": best,
                           "undecodable": undecodable, **counters}
                ckpt.write_checkpoint(run, ckpt.LAST, model, trainer, head=getattr(s.loaded, "itm_head", None))
                write_record("running" if step < s.total_steps else "complete")
                write_report(run)
        if progress and main:
            progress(step, s.total_steps)
    if main:
        write_record("complete")  # also when a resume found nothing left to train
    if s.world > 1:
        dist.barrier()
    return TrainResult(
        run=run, steps=step, pairs_seen=counters["pairs_seen"], train_seconds=counters["train_seconds"], final_loss=step_loss,
        trainable=s.record["parameters"]["trainable"], total=s.record["parameters"]["total"], result_checkpoint=s.record["result_checkpoint"],
        best_step=best["step"] if best else None, best_metrics=best["metrics"] if best else {}, skipped=s.report.skipped, rank=s.rank,
    )
