"""The demo's plan: its options, the variants it compares, the budgets of each mode, the training subsets.

Budgets of the full mode: a world of 360 benchmark identities (300 train / 30 val / 30 test, 4
images and 8 captions each) and a 4,000-pair pool (40% defective); batch 32, AdamW at lr 5e-4
with 10% warm-up and cosine decay, fp32, CLIP loss, rank 8, for every run; the scorer 4 epochs
(300 steps); stage A 2 epochs (250 steps on the whole pool, 100 on a 40% subset); stage B 2
epochs (150 steps); two validations per run. The first full run had stage B at 1 epoch and
took 10.7 minutes (load average 2.6 to 3.0 on 2 cores); stage B was raised once, to 2 epochs,
to use the time the issue allows (25 minutes); that run's table had been seen, and nothing else
was changed after it.

The world's difficulty (:data:`CALIBRATED` and the split) was calibrated once, on val, with the
baseline alone; the tries are recorded in bench/RESULTS.md ("demo calibration").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.errors import TbpsError, UsageError

# Stages and the subsets of the pool that stage A trains on.
BASELINE, PRETRAIN, FINETUNE = "baseline", "pretrain", "fine-tune"
SUBSETS = ("full", "filtered", "random")


@dataclass(frozen=True)
class Variant:
    """One row of the results table: which stage made the model, on what, with which adapter.

    Attributes:
        key: a short id, also the run directory's name.
        label: the row's label.
        stage: ``baseline`` (the scorer), ``pretrain`` (stage A) or ``fine-tune`` (stage B).
        data: ``benchmark`` (train split) or the pool subset ``full`` / ``filtered`` / ``random``.
        adapter: ``full``, ``wora``, ``dora`` or ``lora``.
        wora_norm: WoRA's norm convention (``per-input`` or ``per-output``).
        init: for a fine-tune, the pool subset whose stage-A model it starts from.
    """

    key: str
    label: str
    stage: str
    data: str
    adapter: str = "full"
    wora_norm: str = "per-input"
    init: str | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "baseline: no pretraining, full FT (the scorer)", BASELINE, "benchmark"),
    Variant("pretrain-full", "pool 100%, pretrain only", PRETRAIN, "full"),
    Variant("pretrain-random", "random 40%, pretrain only", PRETRAIN, "random"),
    Variant("pretrain-filtered", "filtered 40%, pretrain only", PRETRAIN, "filtered"),
    Variant("full-wora", "pool 100% -> WoRA", FINETUNE, "benchmark", "wora", init="full"),
    Variant("random-wora", "random 40% -> WoRA", FINETUNE, "benchmark", "wora", init="random"),
    Variant("filtered-wora", "filtered 40% -> WoRA (per-input norm)", FINETUNE, "benchmark", "wora", init="filtered"),
    Variant("filtered-wora-out", "filtered 40% -> WoRA (per-output norm)", FINETUNE, "benchmark", "wora", "per-output", init="filtered"),
    Variant("filtered-dora", "filtered 40% -> DoRA", FINETUNE, "benchmark", "dora", init="filtered"),
    Variant("filtered-lora", "filtered 40% -> LoRA", FINETUNE, "benchmark", "lora", init="filtered"),
    Variant("filtered-full", "filtered 40% -> full FT", FINETUNE, "benchmark", "full", init="filtered"),
)
VARIANT = {v.key: v for v in VARIANTS}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and training budgets of one demo mode (full or ``--quick``).

    Attributes:
        world: ``SynthConfig`` options besides ``out``, ``seed`` and ``workers``.
        batch_size: pairs per optimizer step, every run.
        lr: peak AdamW learning rate, every run (one value: no method gets its own tuning).
        warmup: share of a run's steps spent warming up.
        scorer_epochs: epochs of the scorer (= the baseline) over the benchmark train split.
        pretrain_epochs: stage-A epochs over each pool subset (equal epochs).
        finetune_epochs: stage-B epochs over the benchmark train split (equal steps).
        validations: how many times a run validates (evenly spaced, and after its last step).
        bank_size: the reference bank's captions (capped by the train split's distinct captions).
        rank: the adapters' rank.
    """

    world: dict[str, Any]
    batch_size: int
    lr: float
    warmup: float
    scorer_epochs: int
    pretrain_epochs: int
    finetune_epochs: int
    validations: int
    bank_size: int = 10_000
    rank: int = 8


# The world's difficulty knobs, calibrated once on val with the baseline (bench/RESULTS.md, demo calibration).
CALIBRATED = {"colours": 17, "occlusion": 0.25, "lighting": 0.3, "clutter": 3}

FULL_PLAN = DemoPlan(
    world={"identities": 360, "split": "10:1:1", "images_per_id": 4, "pool_identities": 1000, "pool_size": 4000,
           "defect_rate": 0.4, **CALIBRATED},
    batch_size=32,
    lr=5e-4,
    warmup=0.1,
    scorer_epochs=4,
    pretrain_epochs=2,
    finetune_epochs=2,
    validations=2,
)

QUICK_PLAN = DemoPlan(
    world={"identities": 24, "split": "4:1:1", "images_per_id": 2, "pool_identities": 60, "pool_size": 240,
           "defect_rate": 0.4, **CALIBRATED},
    batch_size=16,
    lr=5e-4,
    warmup=0.1,
    scorer_epochs=2,
    pretrain_epochs=1,
    finetune_epochs=1,
    validations=1,
)


def plan_for(quick: bool) -> DemoPlan:
    """The plan of a mode.

    Args:
        quick: the ``--quick`` mode (tiny world, a few steps) instead of the full demo.

    Returns:
        The :class:`DemoPlan`.
    """
    return QUICK_PLAN if quick else FULL_PLAN


@dataclass
class DemoConfig:
    """Options of ``tbps demo``; field names equal the CLI option names.

    Attributes:
        out: the run directory (created; a previous demo there is replaced, anything else refused).
        quick: tiny world and a few steps: every stage runs, the numbers mean nothing.
        seeds: how many training seeds repeat the training stages (mean ± std when > 1).
        seed: the world's seed, the scorer's seed and the first training seed.
        keep: the share of the pool the filter keeps (and the random control draws).
        workers: DataLoader worker processes decoding images (0: in the main process).
        threads: torch intra-op threads while the demo runs (restored after); 0 leaves torch's
            setting. One thread is fastest on a shared 2-core machine.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    out: str = "runs/demo"
    quick: bool = False
    seeds: int = 1
    seed: int = 0
    keep: float = 0.4
    workers: int = 0
    threads: int = 1
    device: str = "auto"

    def __post_init__(self) -> None:
        self.out = str(self.out)
        for name, lo in (("seeds", 1), ("seed", 0), ("workers", 0), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UsageError(f"--{name} must be an integer >= {lo}", field=f"--{name}", value=value)
        if self.seeds > 10:
            raise UsageError("--seeds is at most 10 (each seed repeats every training run)", field="--seeds", value=self.seeds)
        if not isinstance(self.keep, (int, float)) or not 0.0 < self.keep < 1.0:
            raise UsageError("--keep is the share of the pool kept, in (0, 1)", field="--keep", value=self.keep)


# ------------------------------------------------------------------------------------------
# The training subsets and their steps: tables in, tables out.


def full_manifest(scores: pl.DataFrame) -> pl.DataFrame:
    """The whole pool as a manifest: every scored row whose status is ok, sorted by pair id.

    Args:
        scores: a score table (``columns.SCORE_SCHEMA``).

    Returns:
        The ok rows, all columns, sorted by ``pair_id``.
    """
    return scores.filter(pl.col(C.STATUS) == C.STATUS_OK).sort(C.PAIR_ID)


def random_manifest(scores: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    """The random control: ``rows`` ok rows drawn uniformly without replacement.

    Args:
        scores: a score table (``columns.SCORE_SCHEMA``).
        rows: how many rows to draw (the filtered manifest's size).
        seed: the seed of the draw.

    Returns:
        The drawn rows, sorted by ``pair_id`` (the same seed draws the same rows).

    Raises:
        TbpsError: fewer ok rows than asked for.
    """
    pool = full_manifest(scores)
    if rows > pool.height:
        raise TbpsError(f"cannot draw {rows} random rows from {pool.height} ok rows", field="keep", value=rows)
    pick = np.sort(np.random.default_rng(seed).choice(pool.height, size=rows, replace=False))
    return pool[pick]


def steps_for(rows: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` pairs (the last incomplete batch dropped).

    Args:
        rows: training pairs.
        batch_size: pairs per step.
        epochs: passes over the data.

    Returns:
        At least 1.
    """
    return max(1, epochs * (rows // batch_size))


def design_notes(plan: DemoPlan, config: DemoConfig) -> list[str]:
    """One-line statements of how the comparison is made fair (printed under the table)."""
    notes = [
        f"stage A (pretrain, full training from the same random init): equal epochs ({plan.pretrain_epochs}), so a 40% subset takes 40% of the steps",
        f"stage B (fine-tune on the benchmark train split): equal epochs = equal steps ({plan.finetune_epochs} epochs), same lr {plan.lr:g}, batch {plan.batch_size}, rank {plan.rank}",
        f"baseline = the scorer: {plan.scorer_epochs} epochs of full training from random weights on the benchmark train split",
        "every checkpoint chosen on val R@1; test used only for this table",
    ]
    if config.seeds > 1:
        notes.append(f"mean ± sample std over training seeds {config.seed}..{config.seed + config.seeds - 1}; world, scorer and filter fixed by --seed {config.seed}")
    return notes
