"""``tbps demo``: the whole Filtering-WoRA paradigm on the synthetic world, its claims measured.

One command, one run directory. The stages, in order:

1. **World**: ``tbps synth`` writes a CUHK-PEDES-format benchmark (train/val/test split by
   identity) and an APTM/MALS-format pool with injected defects; the defect truth goes to a
   sidecar the filter never sees.
2. **Scorer**: tbps-tiny trained from random weights with full fine-tuning on the benchmark's
   train split, its checkpoint chosen on val. It plays the paper's pretrained BLIP-2 scorer, and
   it is also the *baseline* the world was calibrated on (below).
3. **Filter**: ``tbps score`` scores the pool against a reference bank sampled from the same
   train split's captions; ``tbps select`` keeps ``--keep 0.4`` of the pool (exact image and
   caption de-duplication, then the best 40% by score) and, for comparison, applies the paper's
   ``paper-pretrain`` rule (scaled to the bank's size). Both are measured against the defect
   truth: precision and recall of the removed pairs, and the AUROC of ``score`` and ``bank_rank``
   as defect detectors, overall and per defect kind.
4. **Training**, two stages, every run from the same seed:

   * **stage A, "pretrain"**: tbps-tiny from the same random initial weights, full training, on
     (a) the whole pool, (b) the filtered 40% and (c) a random 40% of the pool (as many rows as
     (b), drawn with the training seed) as the control. **Equal epochs**: a 40% subset takes
     40% of the steps, which is where the paper's training-time saving comes from; each run's
     wall time of training is measured, never derived.
   * **stage B, "fine-tune"** on the benchmark's train split, starting from a stage-A model
     (exported with its weights folded in). From the filtered-pretrained model: WoRA with the
     paper code's per-input norm, WoRA with the per-output (DoRA) norm, DoRA, LoRA (all rank 8)
     and full fine-tuning. From the full-pool and random-pretrained models: WoRA (per-input).
     **Equal epochs = equal steps** here: every run sees the same data with the same batch size,
     optimizer (AdamW), learning rate, warm-up and cosine schedule; only the adapter differs.

   Every run validates on the benchmark's val split a few times and keeps its best step by
   val R@1 (``tbps train``'s ``best/``); the test split is never used to choose anything.
5. **Evaluation**: every model (the baseline, the three stage-A models as they are, every
   stage-B model) on the held-out test split (``tbps eval``'s protocol): R@1, R@5, R@10, mAP,
   mINP, with trainable parameters, training wall time and pairs seen of the run that made it.
   The table is printed, and written to ``results.md`` and ``results.json`` with the claims
   below and the filter's truth metrics; ``report.html`` is ``tbps inspect --html`` of the
   filtered manifest (score and bank-rank histograms with the cut, the pairs dropped by reason)
   and ``report-scores.html`` that of the pool's whole score table.

Seeds. ``--seed`` fixes the world, the scorer and therefore the filter (they are the data being
compared). ``--seeds N`` repeats both training stages with training seeds ``seed .. seed+N-1``
(initial weights, adapter initialisation, data order, augmentation and the random control's
sample); the table then gives mean ± sample std over the seeds, and each claim is judged on the
mean of its per-seed paired differences (a difference smaller than the std of those differences
is reported as within seed noise). The baseline (the scorer) is trained once.

Budgets of the full mode: a world of 360 benchmark identities (300 train / 30 val / 30 test, 4
images and 8 captions each) and a 4,000-pair pool (40% defective); batch 32, AdamW at lr 5e-4
with 10% warm-up and cosine decay, fp32, CLIP loss, rank 8, for every run; the scorer 4 epochs
(300 steps); stage A 2 epochs (250 steps on the whole pool, 100 on a 40% subset); stage B 2
epochs (150 steps); two validations per run. The first full run had stage B at 1 epoch and
took 10.7 minutes (load average 2.6 to 3.0 on 2 cores); stage B was raised once, to 2 epochs,
to use the time the issue allows (25 minutes); that run's table had been seen, and nothing else
was changed after it.

The claims (the paper's, each reported as measured; a claim that fails is reported with its
numbers, not hidden): the filter finds the defects (AUROC of ``bank_rank``); filtered 40% vs
the full pool (R@1, mAP after fine-tuning, and stage-A training time; the paper: better, with
19.82% less time); filtered 40% vs random 40%; WoRA vs full fine-tuning (R@1 gap and the share of
trainable parameters); WoRA vs DoRA vs LoRA at the same rank.

Calibration of the world's difficulty, done once, on val, with the baseline alone (the scorer
stage: full training of tbps-tiny from random weights on the benchmark train split; batch 32,
lr 5e-4 with 20 warm-up steps, CLIP loss, 1 torch thread), aiming at a baseline val R@1 between 30% and 85%. The test
split was not looked at, and nothing was changed after any claim was seen. Each try below is
one run; "knobs" are ``SynthConfig``'s colours / occlusion / lighting / clutter, default
17 / 0.25 / 0.3 / 3; 4 images per identity throughout:

    try  identities (split)   train / val ids  knobs                   epochs  best val R@1
    A    300 (4:1:1)          200 / 50         default                 6       22.50
    B    300 (4:1:1)          200 / 50         17 / 0.1 / 0.15 / 1     6       25.25
    C    300 (4:1:1)          200 / 50         8 colours, rest default 6       24.25
    D    300 (4:1:1)          200 / 50         6 / 0.1 / 0.15 / 1      6       26.50
    E    400 (6:1:1)          300 / 50         default                 4       27.75
    F    400 (6:1:1)          300 / 50         6 / 0.1 / 0.15 / 1      4       25.75
    G    as E, SDM loss instead of CLIP        default                 4       13.75
    H    500 (8:1:1)          400 / 50         default                 3       26.25
    J    360 (10:1:1)         300 / 30         default                 4       44.58  <- chosen

The image knobs moved the baseline by about as much as the run-to-run noise of a 400-query val
set (about 2 points); what held it below 30% was the size of the gallery it ranks (50
identities) for a model this small trained from scratch. J keeps the default images and
training set of E and ranks a gallery of 30 identities (120 images, 240 caption queries) on
val and on test alike. The full demo's scorer is this baseline (4 epochs); its val R@1 in a
given run is in ``results.json`` (``measured.baseline[0].val_R1``).

``--quick`` runs every stage on a tiny world with a few steps (the CI end-to-end check); its
numbers say nothing about the claims, and the output says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.errors import TbpsError, UsageError

MARKER = ".tbps-demo"  # marks a directory this command made (and may therefore replace)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
SCORES_REPORT_HTML = "report-scores.html"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
NOT_JUDGED = "not judged (--quick)"
WEAK_AUROC = 0.6  # a defect kind detected with a lower AUROC of bank_rank is "not found"
DUPLICATE_KINDS = (C.DEFECT_EXACT_DUP, C.DEFECT_NEAR_DUP)
PAPER_TIME_SAVING = 19.82  # % less training time the paper reports for its filtered pretraining data

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


# The world's difficulty knobs, calibrated once on val with the baseline (module docstring).
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
# Pure pieces: tables in, tables out.


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


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def aggregate(measured: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table row per variant: mean (and std over seeds) of every measured number.

    Args:
        measured: variant key -> one measurement per seed (``R1``.. ``mINP``, ``trainable``,
            ``total``, ``train_seconds``, ``pairs_seen``, ``steps``, ``val_R1``).

    Returns:
        Rows in :data:`VARIANTS` order: ``key``, ``label``, ``stage``, ``adapter``, ``seeds``,
        and ``{name: {"mean", "std"}}`` per number.
    """
    rows = []
    for v in VARIANTS:
        runs = measured.get(v.key)
        if not runs:
            continue
        row: dict[str, Any] = {"key": v.key, "label": v.label, "stage": v.stage, "adapter": v.adapter, "seeds": len(runs)}
        for name in (*METRICS, "trainable", "total", "train_seconds", "pairs_seen", "steps", "val_R1"):
            mean, std = mean_std([r[name] for r in runs])
            row[name] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def paired(measured: dict[str, list[dict[str, Any]]], a: str, b: str, metric: str) -> dict[str, Any]:
    """``a`` minus ``b`` on one metric, seed by seed (runs of the same seed are paired).

    Args:
        measured: as for :func:`aggregate`; seed ``i`` of ``a`` pairs with seed ``i`` of ``b``.
        a: a variant key.
        b: another variant key.
        metric: the number compared.

    Returns:
        ``{"a", "b", "diff", "diff_std", "n", "noise"}``: the means, the mean difference, the
        std of the per-seed differences (None for one seed) and whether the difference is
        within seed noise (``|diff| <= diff_std``; False for one seed, where it is unknown).
    """
    xs = [r[metric] for r in measured[a]]
    ys = [r[metric] for r in measured[b]]
    n = min(len(xs), len(ys))
    diff, diff_std = mean_std([x - y for x, y in zip(xs[:n], ys[:n])])
    return {
        "a": mean_std(xs[:n])[0],
        "b": mean_std(ys[:n])[0],
        "diff": diff,
        "diff_std": diff_std,
        "n": n,
        "noise": diff_std is not None and abs(diff) <= diff_std,
    }


@dataclass
class Claim:
    """One of the paper's claims, as this run measured it.

    Attributes:
        name: what is claimed.
        paper: what the paper reports.
        verdict: ``holds``, ``does not hold`` (either may add "(within seed noise)"), ``mixed``,
            ``not measured``, or :data:`NOT_JUDGED`.
        measured: the numbers, in a sentence.
        numbers: the same numbers, for the JSON record.
    """

    name: str
    paper: str
    verdict: str
    measured: str
    numbers: dict[str, Any] = field(default_factory=dict)


def _pm(d: dict[str, Any], unit: str = "") -> str:
    """``+1.25 pts`` or ``+1.25 ± 0.40 pts (within seed noise)`` for a paired difference."""
    text = f"{d['diff']:+.2f}"
    if d["diff_std"] is not None:
        text += f" ± {d['diff_std']:.2f}"
    text += unit
    if d["noise"]:
        text += " (within seed noise)"
    return text


def _verdict(checks: list[tuple[bool, bool]]) -> str:
    """``holds`` / ``does not hold`` / ``mixed`` from (passed, within seed noise) checks.

    A unanimous verdict that rests on a difference within seed noise says so.
    """
    passed = [ok for ok, _ in checks]
    verdict = "holds" if all(passed) else ("does not hold" if not any(passed) else "mixed")
    if verdict != "mixed" and any(noisy for _, noisy in checks):
        verdict += " (within seed noise)"
    return verdict


def judge_claims(measured: dict[str, list[dict[str, Any]]], filter_truth: dict[str, Any] | None, *, judged: bool = True) -> list[Claim]:
    """The paper's claims, judged on this run's measurements (see the module docstring).

    A "better" claim holds when the mean paired difference is positive on every metric it
    names; a verdict that rests on a difference within seed noise says so ("holds (within
    seed noise)"). The
    filter claim holds when the AUROC of ``bank_rank`` is above 0.5 overall and at least
    :data:`WEAK_AUROC` for every defect kind a score can see (duplicates excepted: they are
    de-duplication's job, and their removal recall is reported); it is mixed when some kind
    falls below that.

    Args:
        measured: variant key -> per-seed measurements (as for :func:`aggregate`).
        filter_truth: the keep selection's truth metrics (``tbps.curate.truth.truth_metrics``),
            with the paper rule's under ``"paper_rule"`` when measured.
        judged: False for ``--quick``: the numbers are reported, every verdict is
            :data:`NOT_JUDGED` (a few steps on a tiny world decide nothing).

    Returns:
        The claims, in the issue's order.
    """
    if not judged:
        return [replace(c, verdict=NOT_JUDGED) for c in judge_claims(measured, filter_truth)]
    claims = []
    if filter_truth:
        o = filter_truth["overall"]
        au = o.get("auroc_bank_rank")
        kinds = filter_truth.get("kinds", {})
        # A duplicate looks as relevant as its original: no score finds it, de-duplication does.
        weak = [k for k, m in kinds.items() if k not in DUPLICATE_KINDS and m.get("auroc_bank_rank") is not None and m["auroc_bank_rank"] < WEAK_AUROC]
        dups = {k: kinds[k]["recall"] for k in DUPLICATE_KINDS if k in kinds}
        text = (
            f"AUROC of bank_rank {au:.3f} (of score {o['auroc_score']:.3f}); the --keep selection removed "
            f"{o['removed_defective']:,} of {o['defective']:,} defective pairs (recall {o['recall']:.3f}, precision {o['precision']:.3f})"
            if au is not None else "no AUROC: no defective or no clean scored pair"
        )
        rule = filter_truth.get("paper_rule")
        if rule:
            r = rule["overall"]
            text += f"; the paper-pretrain rule: recall {r['recall']:.3f}, precision {r['precision']:.3f}, {r['pairs'] - r['removed']:,} pairs kept"
        if weak:
            text += f"; defect kinds it does not find (AUROC of bank_rank < {WEAK_AUROC}): " + ", ".join(f"{k} {kinds[k]['auroc_bank_rank']:.3f}" for k in weak)
        if dups:
            text += "; duplicates removed (recall): " + ", ".join(f"{k} {v:.3f}" for k, v in dups.items() if v is not None)
        verdict = "not measured" if au is None else ("does not hold" if au <= 0.5 else ("mixed" if weak else "holds"))
        claims.append(Claim("the filter finds the defects", "the filter removes noisy, mismatched pairs", verdict, text,
                            {"auroc_bank_rank": au, "auroc_score": o.get("auroc_score"), "weak_kinds": weak, "duplicate_recall": dups}))

    def have(*keys: str) -> bool:
        return all(measured.get(k) for k in keys)

    if have("filtered-wora", "full-wora", "pretrain-filtered", "pretrain-full"):
        r1, ap = paired(measured, "filtered-wora", "full-wora", "R1"), paired(measured, "filtered-wora", "full-wora", "mAP")
        pre = paired(measured, "pretrain-filtered", "pretrain-full", "R1")
        t_f = mean_std([r["train_seconds"] for r in measured["pretrain-filtered"]])[0]
        t_a = mean_std([r["train_seconds"] for r in measured["pretrain-full"]])[0]
        saving = 100.0 * (1.0 - t_f / t_a) if t_a > 0 else float("nan")
        claims.append(Claim(
            "filtered 40% vs the full pool", f"better, with {PAPER_TIME_SAVING}% less training time",
            _verdict([(r1["diff"] > 0, r1["noise"]), (ap["diff"] > 0, ap["noise"]), (saving > 0, False)]),
            f"after WoRA fine-tuning R@1 {r1['a']:.2f} vs {r1['b']:.2f} ({_pm(r1, ' pts')}), mAP {ap['a']:.2f} vs {ap['b']:.2f} "
            f"({_pm(ap, ' pts')}); pretrained only R@1 {_pm(pre, ' pts')}; stage-A training time {t_f:.0f} s vs {t_a:.0f} s "
            f"({saving:.1f}% less)",
            {"R1": r1, "mAP": ap, "pretrain_R1": pre, "pretrain_seconds": {"filtered": t_f, "full": t_a}, "time_saving_pct": saving},
        ))
    if have("filtered-wora", "random-wora", "pretrain-filtered", "pretrain-random"):
        r1, ap = paired(measured, "filtered-wora", "random-wora", "R1"), paired(measured, "filtered-wora", "random-wora", "mAP")
        pre = paired(measured, "pretrain-filtered", "pretrain-random", "R1")
        claims.append(Claim(
            "filtered 40% vs a random 40%", "the filter's choice beats chance at the same size",
            _verdict([(r1["diff"] > 0, r1["noise"]), (ap["diff"] > 0, ap["noise"])]),
            f"after WoRA fine-tuning R@1 {r1['a']:.2f} vs {r1['b']:.2f} ({_pm(r1, ' pts')}), mAP {ap['a']:.2f} vs {ap['b']:.2f} "
            f"({_pm(ap, ' pts')}); pretrained only R@1 {_pm(pre, ' pts')}",
            {"R1": r1, "mAP": ap, "pretrain_R1": pre},
        ))
    if have("filtered-wora", "filtered-full"):
        r1 = paired(measured, "filtered-wora", "filtered-full", "R1")
        share = 100.0 * measured["filtered-wora"][0]["trainable"] / measured["filtered-full"][0]["trainable"]
        claims.append(Claim(
            "WoRA vs full fine-tuning", "WoRA matches or beats full fine-tuning while training a small share of the parameters",
            _verdict([(r1["diff"] >= 0, r1["noise"])]),
            f"R@1 {r1['a']:.2f} vs {r1['b']:.2f} (gap {_pm(r1, ' pts')}), training {share:.2f}% of the parameters",
            {"R1": r1, "trainable_share_pct": share},
        ))
    if have("filtered-wora", "filtered-dora", "filtered-lora"):
        means = {k: mean_std([r["R1"] for r in measured[f"filtered-{k}"]])[0] for k in ("wora", "dora", "lora")}
        vs_d, vs_l = paired(measured, "filtered-wora", "filtered-dora", "R1"), paired(measured, "filtered-wora", "filtered-lora", "R1")
        claims.append(Claim(
            "WoRA vs DoRA vs LoRA at the same rank", "WoRA is the best of the three",
            _verdict([(vs_d["diff"] > 0, vs_d["noise"]), (vs_l["diff"] > 0, vs_l["noise"])]),
            f"R@1 WoRA {means['wora']:.2f}, DoRA {means['dora']:.2f}, LoRA {means['lora']:.2f} "
            f"(WoRA - DoRA {_pm(vs_d, ' pts')}, WoRA - LoRA {_pm(vs_l, ' pts')})",
            {"R1": means, "vs_dora": vs_d, "vs_lora": vs_l},
        ))
    return claims


def _cell(stat: dict[str, Any], fmt: str = "{:.2f}") -> str:
    text = fmt.format(stat["mean"])
    if stat["std"] is not None:
        text += " ± " + fmt.format(stat["std"])
    return text


TABLE_HEADER = ("variant", "R@1", "R@5", "R@10", "mAP", "mINP", "trainable", "train time", "pairs seen", "seeds")


def table_cells(row: dict[str, Any]) -> list[str]:
    """The printed cells of one aggregated row, in :data:`TABLE_HEADER` order."""
    share = 100.0 * row["trainable"]["mean"] / row["total"]["mean"]
    return [
        row["label"],
        *(_cell(row[m]) for m in METRICS),
        f"{row['trainable']['mean'] / 1e6:.2f} M ({share:.1f}%)" if share >= 10 else f"{row['trainable']['mean'] / 1e3:.0f} k ({share:.2f}%)",
        _cell(row["train_seconds"], "{:.0f}") + " s",
        f"{row['pairs_seen']['mean']:,.0f}",
        str(row["seeds"]),
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table as GitHub Markdown, one line per variant."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def filter_rows(selections: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows (selection, kept, precision, recall, AUROC score, AUROC bank_rank) of the filter table."""
    rows = []
    for name, truth in selections.items():
        o = truth["overall"]

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.3f}"

        rows.append([name, f"{o['pairs'] - o['removed']:,} of {o['pairs']:,}", f(o["precision"]), f(o["recall"]), f(o["auroc_score"]), f(o["auroc_bank_rank"])])
    return rows


def kind_rows(truth: dict[str, Any]) -> list[list[str]]:
    """Rows (defect kind, pairs, removed, recall, AUROC score, AUROC bank_rank) per defect kind."""
    rows = []
    for kind, m in truth["kinds"].items():
        rows.append([kind, f"{m['pairs']:,}", f"{m['removed']:,}", *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("recall", "auroc_score", "auroc_bank_rank"))])
    return rows


# ------------------------------------------------------------------------------------------
# The run.


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        out: the run directory.
        quick: whether this was the ``--quick`` mode.
        rows: the aggregated table (see :func:`aggregate`).
        claims: the judged claims.
        selections: truth metrics of each selection (``keep 0.4``, ``paper-pretrain``).
        design: one-line statements of how the comparison was made fair.
        seconds: wall time of the whole demo.
        load: load averages (1 min) at the start and at the end.
        files: what was written (results, reports).
    """

    out: Path
    quick: bool
    rows: list[dict[str, Any]]
    claims: list[Claim]
    selections: dict[str, dict[str, Any]]
    design: list[str]
    seconds: float
    load: dict[str, float]
    files: dict[str, str]

    def renderables(self) -> list:
        """Rich renderables: the results table, the filter's truth metrics and the claims."""
        from rich.table import Table

        parts: list = []
        title = "tbps demo" + (" --quick (tiny world, few steps: the numbers mean nothing)" if self.quick else "") + " - test split"
        table = Table(title=title, caption="; ".join(self.design))
        table.add_column(TABLE_HEADER[0], ratio=1, min_width=16)
        for name in TABLE_HEADER[1:]:
            table.add_column(name, justify="right", no_wrap=True)
        for row in self.rows:
            table.add_row(*table_cells(row), end_section=row["key"] in ("baseline", "pretrain-filtered"))
        parts.append(table)
        filt = Table("selection", "kept", "precision", "recall", "AUROC score", "AUROC bank_rank", title="the filter against the defect truth")
        for row in filter_rows(self.selections):
            filt.add_row(*row)
        parts.append(filt)
        keep = next(iter(self.selections.values()), None)
        if keep:
            kinds = Table("defect", "pairs", "removed", "recall", "AUROC score", "AUROC bank_rank", title=f"per defect kind ({next(iter(self.selections))})")
            for row in kind_rows(keep):
                kinds.add_row(*row)
            parts.append(kinds)
        claims = Table("claim", "paper", "verdict", "measured", title="the paper's claims, as measured here")
        for c in self.claims:
            colour = "green" if c.verdict.startswith("holds") else ("red" if c.verdict.startswith("does not") else "yellow")
            claims.add_row(c.name, c.paper, f"[{colour}]{c.verdict}[/]", c.measured)
        parts.append(claims)
        return parts


def prepare_out(path: str | Path) -> Path:
    """Create the run directory, replacing a previous demo there and refusing anything else.

    Args:
        path: the ``--out`` directory.

    Returns:
        The directory, empty but for the demo marker.

    Raises:
        TbpsError: the path is a file, or a non-empty directory that no demo made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TbpsError("--out is a file, not a directory", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TbpsError("the output directory is not empty and holds no previous tbps demo", path=out,
                            hint="choose a new or empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tbps demo; a later tbps demo --out here replaces this directory\n")
    return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (0: left alone), then restored."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Demo:
    """The stages of one demo run; holds the paths and options they share."""

    def __init__(self, config: DemoConfig, plan: DemoPlan, out: Path, log: Callable[[str], None]) -> None:
        self.config, self.plan, self.out, self.say = config, plan, out, log
        self.world = out / "world"
        self.bench = self.world / "benchmark" / "reid_raw.json"
        self.pool = self.world / "pool" / "pool.json"
        self.truth = self.world / "pool" / "truth.parquet"
        self.manifests = out / "manifests"
        self.timings: dict[str, float] = {}
        self.train_rows = 0  # usable pairs of the benchmark's train split (read_benchmark)
        self.test_rows: pl.DataFrame | None = None  # the test split's rows (read_benchmark)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def make_world(self) -> dict[str, Any]:
        from tbps.data.synth import SynthConfig, synthesize

        cfg = SynthConfig(out=self.world, seed=self.config.seed, workers=2, **self.plan.world)
        summary = synthesize(cfg)
        self.say(f"world: {summary.splits}, pool {summary.pool_pairs:,} pairs, defects {summary.defects}")
        return {"splits": summary.splits, "pool_pairs": summary.pool_pairs, "defects": summary.defects}

    def read_benchmark(self) -> Path:
        """Count the train split, keep the test split's rows, write the bank; returns the bank's path.

        The bank is the train split's captions, one per line: the scorer's reference bank.
        """
        from tbps.data.readers import read_dataset
        from tbps.eval.evaluate import select_split

        pairs = read_dataset(self.bench)
        train = pairs.filter((pl.col(C.SPLIT) == "train") & (pl.col(C.STATUS) == C.STATUS_OK))
        self.train_rows = train.height
        self.test_rows = select_split(pairs, "test")[0]
        captions = train.get_column(C.CAPTION).to_list()
        path = self.out / "bank.txt"
        # One caption a line: a caption's own line breaks would split it.
        path.write_text("".join(" ".join(c.split()) + "\n" for c in captions))
        return path

    def train(self, key: str, seed: int, *, model: str, adapter: str = "full", wora_norm: str = "per-input",
              manifest: Path | None = None, epochs: int) -> tuple[Path, Any]:
        """One ``tbps train`` run, validated on the benchmark's val split; returns (run dir, result)."""
        from tbps.train.loop import TrainConfig, train

        rows = pl.scan_parquet(manifest).select(pl.len()).collect().item() if manifest else self.train_rows
        steps = steps_for(rows, self.plan.batch_size, epochs)
        run = self.out / "runs" / (key if key == "baseline" else f"seed{seed}") / key
        cfg = TrainConfig(
            out=str(run), model=model, manifest=str(manifest) if manifest else None, data=None if manifest else str(self.bench),
            val=str(self.bench), adapter=adapter, wora_norm=wora_norm, rank=self.plan.rank, epochs=epochs,
            batch_size=self.plan.batch_size, lr=self.plan.lr, warmup=max(1, round(self.plan.warmup * steps)), precision="fp32",
            seed=seed, val_every=-(-steps // self.plan.validations), save_every=steps, log_every=max(1, steps // 4),
            workers=self.config.workers, device=self.config.device,
        )
        self.say(f"{key} seed {seed}: training {adapter}{' ' + wora_norm if adapter == 'wora' else ''}, {epochs} epoch(s) of {rows:,} pairs = {steps} steps")
        result = train(cfg, log=lambda m: self.say(f"{key} seed {seed}: {m}"))
        return run, result

    def evaluate(self, key: str, seed: int, model: str) -> dict[str, Any]:
        """Test-split metrics of a model (``tbps eval``'s protocol), also written as JSON."""
        from tbps.eval.evaluate import evaluate
        from tbps.models import load
        from tbps.provenance import write_json_atomic

        loaded = load(model)
        result = evaluate(loaded, self.test_rows, batch_size=128, workers=self.config.workers, device=self.config.device, precision="fp32")
        write_json_atomic(self.out / "eval" / f"{key}-seed{seed}.json", {"model": loaded.identity, **result})
        m = result["metrics"]
        self.say(f"{key} seed {seed}: test R@1 {m['R1']:.2f} | mAP {m['mAP']:.2f}")
        return m

    def export(self, run: Path, key: str, seed: int) -> Path:
        from tbps.train.checkpoint import export_run

        path, _ = export_run(run, self.out / "models" / f"seed{seed}" / f"{key}.pt")
        return path


def _measurement(metrics: dict[str, Any], result: Any) -> dict[str, Any]:
    return {
        **{m: float(metrics[m]) for m in METRICS},
        "trainable": result.trainable,
        "total": result.total,
        "train_seconds": result.train_seconds,
        "pairs_seen": result.pairs_seen,
        "steps": result.steps,
        "val_R1": float(result.best_metrics.get("R1", float("nan"))),
        "best_step": result.best_step,
    }


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


def run_demo(config: DemoConfig, progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole paradigm on the synthetic world and measure the paper's claims.

    Args:
        config: the options.
        progress: called as ``progress(done, total)`` in stages (world, scorer, scoring,
            selection, each training run with its evaluation, the report).
        log: receives one-line progress messages (stderr in the CLI).

    Returns:
        The :class:`DemoResult`; ``results.md``, ``results.json`` and the HTML reports are in
        ``config.out``.

    Raises:
        TbpsError: the output directory holds something other than a previous demo.
    """
    say = log or (lambda _msg: None)
    plan = plan_for(config.quick)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    out = prepare_out(config.out)  # before the heavy imports: a refused --out fails at once

    from tbps.curate.score import ScoreConfig, read_score_table, run_score
    from tbps.curate.select import SelectConfig
    from tbps.curate.select_io import run_select
    from tbps.eval.inspect import InspectConfig, run_inspect
    from tbps.provenance import record, write_json_atomic

    demo = _Demo(config, plan, out, say)
    seeds = list(range(config.seed, config.seed + config.seeds))
    finetunes = [v for v in VARIANTS if v.stage == FINETUNE]
    total = 4 + 1 + len(seeds) * (len(SUBSETS) + len(finetunes)) + 1
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    measured: dict[str, list[dict[str, Any]]] = {}
    with _threads(config.threads):
        if progress:
            progress(0, total)
        with demo.timed("world"):
            world = demo.make_world()
        bank = demo.read_benchmark()
        step()

        with demo.timed("scorer"):
            scorer, scorer_result = demo.train("baseline", config.seed, model="tbps-tiny", epochs=plan.scorer_epochs)
            say(f"scorer (= baseline) val R@1 {scorer_result.best_metrics.get('R1', float('nan')):.2f} at step {scorer_result.best_step}")
        step()

        with demo.timed("score"):
            scores_dir = out / "scores"
            run_score(ScoreConfig(data=str(demo.pool), model=str(scorer), bank=str(bank), out=str(scores_dir), bank_size=plan.bank_size,
                                  seed=config.seed, batch_size=128, workers=config.workers, precision="fp32", device=config.device), log=say)
        step()

        with demo.timed("select"):
            keep_name = f"keep {config.keep:g}"
            keep = run_select(SelectConfig(scores=(str(scores_dir),), out=str(demo.manifests / "filtered.parquet"), keep=config.keep,
                                           truth=str(demo.truth)), log=say)
            rule = run_select(SelectConfig(scores=(str(scores_dir),), out=str(demo.manifests / "paper-pretrain.parquet"), rule="paper-pretrain",
                                           truth=str(demo.truth)), log=say)
            selections = {keep_name: keep.selection.truth, "paper-pretrain rule": rule.selection.truth}
            table = read_score_table(scores_dir).collect()
            full_manifest(table).write_parquet(demo.manifests / "full.parquet")
            kept = keep.selection.rows_kept
            run_inspect(InspectConfig(table=keep.paths.manifest, html=out / REPORT_HTML, top=12))
            run_inspect(InspectConfig(table=scores_dir, html=out / SCORES_REPORT_HTML, top=12))
            say(f"filter: kept {kept:,} of {keep.selection.rows_in:,}; AUROC of bank_rank {keep.selection.truth['overall']['auroc_bank_rank']}")
        step()

        with demo.timed("evaluate"):
            measured["baseline"] = [_measurement(demo.evaluate("baseline", config.seed, str(scorer)), scorer_result)]
        step()

        for seed in seeds:
            random_path = demo.manifests / f"random-seed{seed}.parquet"
            random_manifest(table, kept, seed).write_parquet(random_path)
            paths = {"full": demo.manifests / "full.parquet", "filtered": keep.paths.manifest, "random": random_path}
            inits: dict[str, Path] = {}
            for subset in SUBSETS:
                key = f"pretrain-{subset}"
                with demo.timed("pretrain"):
                    run, result = demo.train(key, seed, model="tbps-tiny", manifest=paths[subset], epochs=plan.pretrain_epochs)
                    inits[subset] = demo.export(run, key, seed)
                with demo.timed("evaluate"):
                    measured.setdefault(key, []).append(_measurement(demo.evaluate(key, seed, str(run)), result))
                step()
            for v in finetunes:
                with demo.timed("finetune"):
                    run, result = demo.train(v.key, seed, model=str(inits[v.init]), adapter=v.adapter, wora_norm=v.wora_norm,
                                             epochs=plan.finetune_epochs)
                with demo.timed("evaluate"):
                    measured.setdefault(v.key, []).append(_measurement(demo.evaluate(v.key, seed, str(run)), result))
                step()

        rows = aggregate(measured)
        keep_truth = dict(keep.selection.truth)
        keep_truth["paper_rule"] = rule.selection.truth
        claims = judge_claims(measured, keep_truth, judged=not config.quick)
        design = design_notes(plan, config)
        seconds = time.perf_counter() - started
        load = {"start_1min": load_start, "end_1min": os.getloadavg()[0]}
        files = {"markdown": str(out / RESULTS_MD), "json": str(out / RESULTS_JSON), "report": str(out / REPORT_HTML),
                 "scores_report": str(out / SCORES_REPORT_HTML)}
        result = DemoResult(out, config.quick, rows, claims, selections, design, seconds, load, files)
        (out / RESULTS_MD).write_text(results_markdown(result, config))
        write_json_atomic(out / RESULTS_JSON, record(
            config, plan=asdict(plan), world=world, design=design, table=rows, measured=measured,
            claims=[asdict(c) for c in claims], selections=selections, timings=demo.timings, seconds=seconds, load=load,
            cpu_count=os.cpu_count(), torch_threads=config.threads or "torch default",
        ))
        step()
    return result


def results_markdown(result: DemoResult, config: DemoConfig) -> str:
    """``results.md``: the command, the table, the filter, the claims and how the run was made fair."""
    cmd = "tbps demo" + (" --quick" if config.quick else "") + (f" --seeds {config.seeds}" if config.seeds > 1 else "") + \
        (f" --seed {config.seed}" if config.seed else "") + f" --out {config.out}"
    lines = [
        f"# tbps demo{' --quick' if result.quick else ''}: results on the test split",
        "",
        f"Command: `{cmd}`; {result.seconds / 60:.1f} min wall on {os.cpu_count()} CPU cores, load average "
        f"{result.load['start_1min']:.1f} at the start and {result.load['end_1min']:.1f} at the end.",
        "",
    ]
    if result.quick:
        lines += ["**Quick mode: a tiny world and a few steps. Every stage ran; the numbers say nothing about the claims.**", ""]
    lines += [markdown_table(result.rows), ""]
    lines += [f"- {note}" for note in result.design] + [""]
    lines += ["## The filter against the defect truth", "", "| selection | kept | precision | recall | AUROC score | AUROC bank_rank |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in filter_rows(result.selections)]
    first = next(iter(result.selections), None)
    if first:
        lines += ["", f"Per defect kind ({first}):", "", "| defect | pairs | removed | recall | AUROC score | AUROC bank_rank |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in kind_rows(result.selections[first])]
    lines += ["", "## The paper's claims, as measured", "", "| claim | paper | verdict | measured |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.paper} | **{c.verdict}** | {c.measured} |" for c in result.claims]
    return "\n".join(lines) + "\n"
