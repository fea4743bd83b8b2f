"""Statistics over training seeds and the paper's claims, judged as measured.

The claims (the paper's, each reported as measured; a claim that fails is reported with its
numbers, not hidden): the filter finds the defects (AUROC of ``bank_rank``); filtered 40% vs
the full pool (R@1, mAP after fine-tuning, and stage-A training time; the paper: better, with
19.82% less time); filtered 40% vs random 40%; WoRA vs full fine-tuning (R@1 gap and the share of
trainable parameters); WoRA vs DoRA vs LoRA at the same rank.

With ``--seeds N`` each claim is judged on the mean of its per-seed paired differences, and a
difference smaller than the std of those differences is reported as within seed noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tbps import columns as C
from tbps.demo.plan import VARIANTS

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
NOT_JUDGED = "not judged (--quick)"
WEAK_AUROC = 0.6  # a defect kind detected with a lower AUROC of bank_rank is "not found"
DUPLICATE_KINDS = (C.DEFECT_EXACT_DUP, C.DEFECT_NEAR_DUP)
PAPER_TIME_SAVING = 19.82  # % less training time the paper reports for its filtered pretraining data


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
