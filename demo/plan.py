"""The demo's plan: its options, the arms it compares, the training methods, the budgets of each mode.

The experiment (full mode, per training seed):

* **World.** A benchmark in the CUHK-PEDES format with a *low-data* fine-tuning split (150 train
  identities, 1,200 pairs), 50 val identities and 100 test identities (400 gallery images, 800
  queries), and a synthetic pool 10x the fine-tuning split (12,000 pairs of 2,000 other
  identities, 40% defective) in the MALS format.
* **Stage A** (pretraining from the same random init, full training, one fixed recipe): the whole
  pool; the score-filtered pool at the pool's clean share; a random subset of the same size; the
  oracle (the truth's clean pairs) at the same size; the paper's ``paper-pretrain`` rule; and the
  whole pool for the filtered arm's number of steps (equal steps). Equal epochs otherwise, so a
  subset takes fewer steps (the time saving the paper reports).
* **Stage B** (fine-tuning on the benchmark's train split, equal epochs): from scratch ("alone"),
  from every stage-A model with full fine-tuning, from the filtered model with the paper's
  fine-tuning filter (``paper-finetune`` against a bank of the train split's captions), and from
  the filtered model with WoRA, WoRA with alpha and beta frozen, DoRA and LoRA at WoRA's
  effective scale (``lora_alpha = 8 r``), and WoRA that also trains norms and embeddings.
* **Scorer.** The filter scores the pool with the full pool's stage-B model of the first seed: the
  strongest model built from the data at hand (pool and train split), standing in for the
  pretrained BLIP-2 the paper scores with. Its filter is fixed for every seed. The fine-tuning
  filter scores the benchmark's train split with the full pool's stage-A model instead, which has
  never seen that split (the paper's BLIP-2 was zero-shot on it too). A second scorer
  (an ITM head or a hard-negative-trained model) is a second filter arm: one more pool subset
  name here (``POOL_SUBSETS``), its stage-A and stage-B ``Arm`` entries, and a second selection
  in ``tbps.demo.run.score_job``.
* **Tuning.** Each training method's learning rate is chosen once, on val, from a small grid
  (``tbps demo --tune``: stage-B runs from the full pool's stage-A model, "alone" from scratch),
  grown by one step past an edge while the best rate lies at that edge (:func:`grid_extension`);
  ``--tune`` writes ``OUT/tuning.json``, which becomes the recorded choice when copied to
  ``demo/tuning.json`` (a later ``tbps demo`` reads it); the record is copied into ``results.json``.
* **Gate.** Before any curation claim is judged, pretraining on the oracle pool then fine-tuning
  must beat fine-tuning alone by :data:`GATE_POINTS` val R@1 (mean over seeds).
* **Statistics.** Every metric with a 95% bootstrap interval over test identities (and seeds);
  every claim from paired per-seed differences, a verdict only where the interval excludes 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.errors import TbpsError, UsageError

ALONE, PRETRAIN, FINETUNE = "alone", "pretrain", "fine-tune"
GATE_POINTS = 5.0  # val R@1 points the oracle-pretrained model must gain over fine-tuning alone
MARGIN = 2.0  # R@1 points: "competitive" means the paired interval's lower bound is above -MARGIN
TUNING_FILE = Path(__file__).resolve().parent / "tuning.json"

# Patterns of the "WoRA + norms and embeddings" method (the paper's released code trains them too).
NORMS_AND_EMBEDDINGS = ["*ln_*", "token_embedding.weight", "positional_embedding", "class_embedding"]


@dataclass(frozen=True)
class Method:
    """A training method of stage B: its ``tbps train`` options and the learning-rate grid it is tuned on."""

    name: str
    label: str
    adapter: str
    grid: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)

    def train_options(self, rank: int) -> dict[str, Any]:
        """The ``TrainConfig`` fields of this method (``lora_alpha`` as a multiple of the rank)."""
        opts = {"adapter": self.adapter, **{k: v for k, v in self.options.items() if k != "lora_alpha_per_rank"}}
        if "lora_alpha_per_rank" in self.options:
            opts["lora_alpha"] = float(self.options["lora_alpha_per_rank"] * rank)
        return opts


FULL_GRID = (1e-4, 3e-4, 1e-3)
ADAPTER_GRID = (1e-3, 3e-3, 1e-2)
MAX_EXTENSIONS = 3  # rates a method's grid may grow by when its best rate lies at an edge (grid_extension)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("alone", "full FT from scratch", "full", FULL_GRID),
    Method("full", "full FT", "full", FULL_GRID),
    Method("wora", "WoRA", "wora", ADAPTER_GRID),
    Method("wora-fixed", "WoRA, alpha and beta frozen", "wora", ADAPTER_GRID, {"fixed_scale": True}),
    Method("dora", "DoRA, lora_alpha = 8r", "dora", ADAPTER_GRID, {"lora_alpha_per_rank": 8}),
    Method("lora", "LoRA, lora_alpha = 8r", "lora", ADAPTER_GRID, {"lora_alpha_per_rank": 8}),
    Method("wora-plus", "WoRA + norms and embeddings", "wora", ADAPTER_GRID, {"also_train": NORMS_AND_EMBEDDINGS}),
)}


@dataclass(frozen=True)
class Arm:
    """One trained model of the table.

    Attributes:
        key: a short id, also the run directory's name.
        label: the row's label.
        stage: ``pretrain`` (stage A), ``alone`` or ``fine-tune`` (stage B).
        data: stage A: the pool subset (``full``, ``filtered``, ``random``, ``oracle``, ``rule``);
            stage B: ``benchmark`` or ``benchmark-filtered`` (the paper's fine-tuning filter).
        method: stage B: a key of :data:`METHODS`; stage A trains with the fixed pretraining recipe.
        init: stage B: the stage-A arm it starts from (None: random weights).
        steps_of: stage A: train for as many steps as this arm takes (equal steps), not for epochs.
    """

    key: str
    label: str
    stage: str
    data: str
    method: str = "full"
    init: str | None = None
    steps_of: str | None = None


POOL_SUBSETS = ("full", "filtered", "random", "oracle", "rule")
ARMS: tuple[Arm, ...] = (
    Arm("A-full", "pool 100%", PRETRAIN, "full"),
    Arm("A-full-steps", "pool 100%, the filtered arm's steps", PRETRAIN, "full", steps_of="A-filtered"),
    Arm("A-filtered", "filtered (score) at the clean share", PRETRAIN, "filtered"),
    Arm("A-random", "random, same size", PRETRAIN, "random"),
    Arm("A-oracle", "oracle (truth-clean), same size", PRETRAIN, "oracle"),
    Arm("A-rule", "paper-pretrain rule", PRETRAIN, "rule"),
    Arm("alone", "fine-tune alone (no pretraining)", ALONE, "benchmark", "alone"),
    Arm("full", "pool 100% -> full FT", FINETUNE, "benchmark", init="A-full"),
    Arm("full-steps", "pool 100% (equal steps) -> full FT", FINETUNE, "benchmark", init="A-full-steps"),
    Arm("filtered", "filtered -> full FT", FINETUNE, "benchmark", init="A-filtered"),
    Arm("random", "random -> full FT", FINETUNE, "benchmark", init="A-random"),
    Arm("oracle", "oracle -> full FT", FINETUNE, "benchmark", init="A-oracle"),
    Arm("rule", "paper-pretrain rule -> full FT", FINETUNE, "benchmark", init="A-rule"),
    Arm("filtered-ftfilter", "filtered -> full FT on the paper-finetune subset", FINETUNE, "benchmark-filtered", init="A-filtered"),
    Arm("filtered-wora", "filtered -> WoRA", FINETUNE, "benchmark", "wora", init="A-filtered"),
    Arm("filtered-wora-fixed", "filtered -> WoRA (alpha, beta frozen)", FINETUNE, "benchmark", "wora-fixed", init="A-filtered"),
    Arm("filtered-dora", "filtered -> DoRA (lora_alpha = 8r)", FINETUNE, "benchmark", "dora", init="A-filtered"),
    Arm("filtered-lora", "filtered -> LoRA (lora_alpha = 8r)", FINETUNE, "benchmark", "lora", init="A-filtered"),
    Arm("filtered-wora-plus", "filtered -> WoRA + norms, embeddings", FINETUNE, "benchmark", "wora-plus", init="A-filtered"),
)
ARM = {a.key: a for a in ARMS}
SCORER_ARM = "full"  # the first seed's model of this arm scores the pool (see the module docstring)
TRAIN_SCORER_ARM = "A-full"  # ... and this one the benchmark's train split, which it has never seen


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo mode (full or ``--quick``).

    Attributes:
        world: ``SynthConfig`` options besides ``out``, ``seed`` and ``workers``.
        batch_size: pairs per optimizer step, every run.
        pretrain_lr: stage A's peak learning rate (one recipe for every pool subset; not tuned).
        warmup: share of a run's steps spent warming up.
        pretrain_epochs: stage-A epochs over each pool subset (equal epochs).
        finetune_epochs: stage-B epochs over the benchmark's train split (equal steps).
        validations: how many times a run validates (evenly spaced, and after its last step).
        rank: the adapters' rank.
        bank_size: the reference bank's captions (capped by the train split's distinct captions).
    """

    world: dict[str, Any]
    batch_size: int
    pretrain_lr: float
    warmup: float
    pretrain_epochs: int
    finetune_epochs: int
    validations: int
    rank: int = 8
    bank_size: int = 10_000


# The rendering knobs calibrated for the first demo (bench/RESULTS.md, demo calibration).
CALIBRATED = {"colours": 17, "occlusion": 0.25, "lighting": 0.3, "clutter": 3}

FULL_PLAN = DemoPlan(
    world={"identities": 300, "split": "3:1:2", "images_per_id": 4, "pool_identities": 2000, "pool_size": 12000,
           "defect_rate": 0.4, **CALIBRATED},
    batch_size=32,
    pretrain_lr=5e-4,
    warmup=0.1,
    pretrain_epochs=2,
    finetune_epochs=6,
    validations=3,
)

QUICK_PLAN = DemoPlan(
    world={"identities": 24, "split": "2:1:1", "images_per_id": 2, "pool_identities": 60, "pool_size": 200,
           "defect_rate": 0.4, **CALIBRATED},
    batch_size=16,
    pretrain_lr=5e-4,
    warmup=0.1,
    pretrain_epochs=1,
    finetune_epochs=1,
    validations=1,
)


def plan_for(quick: bool) -> DemoPlan:
    """The plan of a mode (``--quick``: a tiny world and a few steps; every stage runs, the numbers mean nothing)."""
    return QUICK_PLAN if quick else FULL_PLAN


@dataclass
class DemoConfig:
    """Options of ``tbps demo``; field names equal the CLI option names.

    Attributes:
        out: the run directory (created; a previous demo there is replaced, anything else refused).
        quick: tiny world and a few steps: every stage runs, the numbers mean nothing.
        seeds: how many training seeds repeat the training stages.
        seed: the world's seed, the scorer's seed and the first training seed.
        tune: choose every method's learning rate on val first (the grid of :data:`METHODS`),
            instead of reading the recorded choice (``demo/tuning.json``).
        jobs: training runs at a time (processes, one torch thread each).
        workers: DataLoader worker processes decoding images per run (0: in the run's process).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    out: str = "runs/demo"
    quick: bool = False
    seeds: int = 1
    seed: int = 0
    tune: bool = False
    jobs: int = 2
    workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.out = str(self.out)
        for name, lo in (("seeds", 1), ("seed", 0), ("jobs", 1), ("workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UsageError(f"--{name} must be an integer >= {lo}", field=f"--{name}", value=value)
        if self.seeds > 10:
            raise UsageError("--seeds is at most 10 (each seed repeats every training run)", field="--seeds", value=self.seeds)


def read_tuning(path: Path = TUNING_FILE) -> dict[str, Any]:
    """The recorded learning-rate choice (``tbps demo --tune`` wrote it).

    Raises:
        TbpsError: the file is missing, unreadable, or lacks a method.
    """
    try:
        record = json.loads(Path(path).read_text())
        chosen = {m: float(record["chosen"][m]) for m in METHODS}
    except FileNotFoundError:
        raise TbpsError("no recorded learning-rate choice", path=path, hint="run tbps demo --tune once") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TbpsError(f"unreadable tuning record ({exc})", path=path, hint="run tbps demo --tune again") from exc
    return {**record, "chosen": chosen}


def quick_tuning() -> dict[str, Any]:
    """``--quick`` without ``--tune``: each grid's middle rate (the quick numbers mean nothing, and no tuning ran)."""
    return {"grid": {m.name: list(m.grid) for m in METHODS.values()}, "val_R1": {}, "chosen": {m.name: m.grid[len(m.grid) // 2] for m in METHODS.values()},
            "note": "--quick: no tuning ran; each method trains at its grid's middle rate"}


def choose_lr(val_r1: dict[str, dict[float, float]]) -> dict[str, float]:
    """Each method's learning rate with the best val R@1 (the smaller rate on a tie)."""
    return {m: min(scores, key=lambda lr: (-scores[lr], lr)) for m, scores in val_r1.items()}


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the grids' ladder 1, 3, 10, 30, ... x 10^k (a factor of about 3).

    Raises:
        ValueError: ``lr`` is not on the ladder (not 1 or 3 times a power of ten).
    """
    exponent = int(np.floor(np.log10(lr) + 1e-9))
    mantissa = round(lr / 10.0**exponent, 6)
    if mantissa not in (1.0, 3.0):
        raise ValueError(f"{lr:g} is not on the 1-3-10 ladder")
    step = {(1.0, True): (3.0, 0), (3.0, True): (1.0, 1), (1.0, False): (3.0, -1), (3.0, False): (1.0, 0)}
    m, e = step[(mantissa, up)]
    return float(f"{m:g}e{exponent + e}")


def grid_extension(scores: dict[float, float], tried_beyond: int) -> float | None:
    """The next rate to try when the best of ``scores`` lies at an edge of the rates tried.

    A choice at the edge of a grid says only that the best rate may lie beyond it, so the grid
    grows by one ladder step on that side (:func:`next_rate`) until the choice is interior, at most
    :data:`MAX_EXTENSIONS` times per method. Every method is tuned by this same rule.

    Args:
        scores: learning rate -> val R@1 of one method, every rate tried so far.
        tried_beyond: how many rates this method has already had added.

    Returns:
        The rate to add, or None when the choice is interior or the extensions are spent.
    """
    if len(scores) < 2 or tried_beyond >= MAX_EXTENSIONS:
        return None
    best = choose_lr({"m": scores})["m"]
    if best == min(scores):
        return next_rate(best, up=False)
    if best == max(scores):
        return next_rate(best, up=True)
    return None


# ------------------------------------------------------------------------------------------
# The training subsets: tables in, tables out.


def ok_rows(scores: pl.DataFrame) -> pl.DataFrame:
    """Every scored row whose status is ok, sorted by pair id (the whole pool as a manifest)."""
    return scores.filter(pl.col(C.STATUS) == C.STATUS_OK).sort(C.PAIR_ID)


def random_rows(scores: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    """The random control: ``rows`` ok rows drawn uniformly without replacement, sorted by pair id.

    Raises:
        TbpsError: fewer ok rows than asked for.
    """
    pool = ok_rows(scores)
    if rows > pool.height:
        raise TbpsError(f"cannot draw {rows} random rows from {pool.height} ok rows", field="rows", value=rows)
    pick = np.sort(np.random.default_rng(seed).choice(pool.height, size=rows, replace=False))
    return pool[pick]


def oracle_rows(scores: pl.DataFrame, truth: pl.DataFrame, rows: int, seed: int) -> pl.DataFrame:
    """The oracle: ``rows`` ok rows the truth calls clean (all of them when fewer), sorted by pair id.

    Args:
        scores: a score table.
        truth: the world's truth sidecar (``pair_id``, ``defect``).
        rows: the size to match (the filtered arm's).
        seed: the seed of the draw when there are more clean rows than ``rows``.
    """
    clean = truth.filter(pl.col(C.DEFECT) == C.DEFECT_NONE).select(C.PAIR_ID)
    pool = ok_rows(scores).join(clean, on=C.PAIR_ID, how="semi").sort(C.PAIR_ID)
    if pool.height <= rows:
        return pool
    pick = np.sort(np.random.default_rng(seed).choice(pool.height, size=rows, replace=False))
    return pool[pick]


def steps_for(rows: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` pairs (the last incomplete batch dropped); at least 1."""
    return max(1, epochs * (rows // batch_size))


def design_notes(plan: DemoPlan, config: DemoConfig, tuning: dict[str, Any]) -> list[str]:
    """One-line statements of how the comparison is made fair (printed with the table)."""
    chosen = ", ".join(f"{m} {lr:g}" for m, lr in tuning["chosen"].items())
    notes = [
        f"stage A: full training from the same random init, lr {plan.pretrain_lr:g} for every subset (not tuned), "
        f"{plan.pretrain_epochs} epochs each (equal epochs); 'pool 100%, equal steps' trains as many steps as the filtered subset",
        f"stage B: {plan.finetune_epochs} epochs of the benchmark train split (equal steps), batch {plan.batch_size}, rank {plan.rank}; "
        f"each method's lr chosen once on val from its grid ({chosen})",
        f"scorer: the first seed's '{ARM[SCORER_ARM].label}' model for the pool, its '{ARM[TRAIN_SCORER_ARM].label}' model for the "
        "benchmark's train split (the paper-finetune filter; it never saw that split); the filters are fixed for every seed",
        f"gate: oracle -> FT must beat fine-tuning alone by {GATE_POINTS:g} val R@1 (mean over seeds) before curation claims are judged",
        "every checkpoint chosen on val R@1; the test split is used only for the table; "
        "intervals: 95% percentile bootstrap over test identities (and the seeds' mean)",
    ]
    if config.seeds > 1:
        notes.append(f"training seeds {config.seed}..{config.seed + config.seeds - 1}; world, scorer and filter fixed by --seed {config.seed}")
    return notes
