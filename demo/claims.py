"""The comparisons the demo makes and the paper's claims, judged from paired differences.

Every comparison is one arm minus another on the test split, query by query, seed by seed
(:func:`tbps.demo.stats.paired_difference`: a 95% bootstrap interval over test identities of the
seeds' mean difference). Its verdict is "better" or "worse" only when the interval excludes 0,
"within noise" otherwise. A claim of *competitive* accuracy holds when the interval's lower bound
is above ``-MARGIN`` R@1 points, does not hold when its upper bound is below ``-MARGIN``, and is
inconclusive otherwise. When the gate fails (pretraining on the clean pool does not beat
fine-tuning alone on val), no curation claim can be tested in this world and each says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from tbps.demo.plan import GATE_POINTS, MARGIN

NOT_JUDGED = "not judged (--quick)"
NOT_TESTABLE = "not testable in this world (the gate failed)"
RELEVANCE_AUROC = 0.7  # the filter "finds" the relevance defects when its AUROC reaches this

# (name, a, b, metric): a minus b.
COMPARISONS: tuple[tuple[str, str, str, str], ...] = (
    ("pretraining on the oracle pool vs fine-tuning alone", "oracle", "alone", "R1"),
    ("pretraining on the full pool vs fine-tuning alone", "full", "alone", "R1"),
    ("filtered vs full pool (equal epochs)", "filtered", "full", "R1"),
    ("filtered vs full pool (equal epochs), mAP", "filtered", "full", "mAP"),
    ("filtered vs full pool (equal steps)", "filtered", "full-steps", "R1"),
    ("filtered vs random (same size)", "filtered", "random", "R1"),
    ("filtered vs oracle (same size)", "filtered", "oracle", "R1"),
    ("paper-pretrain rule vs full pool", "rule", "full", "R1"),
    ("paper-finetune filter vs the whole train split", "filtered-ftfilter", "filtered", "R1"),
    ("WoRA vs full fine-tuning", "filtered-wora", "filtered", "R1"),
    ("WoRA vs DoRA (lora_alpha = 8r)", "filtered-wora", "filtered-dora", "R1"),
    ("WoRA vs LoRA (lora_alpha = 8r)", "filtered-wora", "filtered-lora", "R1"),
    ("WoRA vs WoRA with alpha, beta frozen", "filtered-wora", "filtered-wora-fixed", "R1"),
    ("WoRA + norms, embeddings vs WoRA", "filtered-wora-plus", "filtered-wora", "R1"),
)


@dataclass
class Claim:
    """One of the paper's claims, as this run measured it (``verdict`` holds / does not hold / ...)."""

    claim: str
    paper: str
    verdict: str
    measured: str
    needs_gate: bool = True  # a claim about curation can only be judged where pretraining helps at all


def judge_gate(val_r1: dict[str, list[float]], pretrained: str = "oracle", alone: str = "alone", seeds: list[int] | None = None) -> dict[str, Any]:
    """The gate: val R@1 of ``pretrained`` minus ``alone``, per seed and on average, against :data:`GATE_POINTS`.

    Args:
        val_r1: arm key -> the best val R@1 of each seed's run (seed order).
        pretrained: the arm pretrained on the clean pool then fine-tuned.
        alone: the arm fine-tuned from scratch.
        seeds: the training seeds of those runs, in the same order (default 0, 1, ...).

    Returns:
        ``{"metric", "pretrained", "alone", "threshold", "per_seed", "mean_difference", "passed", "note"}``.
    """
    a, b = val_r1.get(pretrained, []), val_r1.get(alone, [])
    labels = seeds if seeds is not None else list(range(len(a)))
    per_seed = [{"seed": s, "pretrained": x, "alone": y, "difference": x - y} for s, x, y in zip(labels, a, b)]
    mean = sum(p["difference"] for p in per_seed) / len(per_seed) if per_seed else None
    passed = mean is not None and mean >= GATE_POINTS
    note = (f"pretraining on the clean pool gains {mean:+.2f} val R@1 over fine-tuning alone "
            f"({'>=' if passed else '<'} {GATE_POINTS:g})") if mean is not None else "not measured"
    return {"metric": "val R@1", "pretrained": pretrained, "alone": alone, "threshold": GATE_POINTS,
            "per_seed": per_seed, "mean_difference": mean, "passed": passed, "note": note}


def compare(paired: Callable[[str, str, str], dict[str, Any] | None], verdict: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """Every comparison of :data:`COMPARISONS` whose two arms were measured.

    Args:
        paired: ``paired(a, b, metric)`` -> ``{"mean", "lo", "hi", "std", "per_seed"}`` or None.
        verdict: an interval -> ``better`` / ``worse`` / ``within noise``.

    Returns:
        ``{"name", "a", "b", "metric", "per_seed", "mean", "lo", "hi", "verdict"}`` per comparison.
    """
    found = []
    for name, a, b, metric in COMPARISONS:
        d = paired(a, b, metric)
        if d is not None:
            found.append({"name": name, "a": a, "b": b, "metric": metric, **d, "verdict": verdict(d)})
    return found


def _pts(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _competitive(d: dict[str, Any]) -> str:
    if d["lo"] > -MARGIN:
        return "holds"
    if d["hi"] < -MARGIN:
        return "does not hold"
    return "inconclusive (the interval spans the margin)"


def _saving(cost: dict[str, float], subset: str, whole: str) -> float:
    """Percent of ``whole``'s cost that ``subset`` saves (nan when either is missing)."""
    return 100.0 * (1 - cost.get(subset, float("nan")) / cost.get(whole, float("nan")))


def judge_claims(
    comparisons: list[dict[str, Any]],
    times: dict[str, float],
    shares: dict[str, float],
    filter_truth: dict[str, Any] | None,
    gate: dict[str, Any],
    *,
    steps: dict[str, float] | None = None,
    judged: bool = True,
) -> list[dict[str, Any]]:
    """The paper's claims as it states them, plus the two controls, judged on this run.

    Args:
        comparisons: from :func:`compare`.
        times: arm key -> mean training seconds (wall time; reported beside the step count).
        steps: arm key -> optimizer steps, which the time saving is counted in (default: ``times``).
        shares: arm key -> trainable share of the non-embedding parameters (percent).
        filter_truth: the score filter's truth metrics (``relevance``, ``kinds``), or None.
        gate: from :func:`judge_gate`.
        judged: False in ``--quick`` mode: every verdict is :data:`NOT_JUDGED`.

    Returns:
        One ``{"claim", "paper", "verdict", "measured"}`` per claim.
    """
    by = {(c["a"], c["b"], c["metric"]): c for c in comparisons}
    steps = times if steps is None else steps
    claims: list[Claim] = []

    rel = (filter_truth or {}).get("relevance", {})
    vs_random = by.get(("filtered", "random", "R1"))
    vs_oracle = by.get(("filtered", "oracle", "R1"))
    if rel or vs_random:
        auroc = rel.get("auroc_bank_rank")
        finds = auroc is not None and auroc >= RELEVANCE_AUROC
        beats = vs_random is not None and vs_random["verdict"] == "better"
        verdict = "holds" if finds and beats else "does not hold" if not finds and not beats else "mixed"
        measured = f"AUROC of bank_rank over the relevance defects {auroc if auroc is None else round(auroc, 3)} (holds at >= {RELEVANCE_AUROC})"
        if vs_random:
            measured += f"; after fine-tuning, filtered - random R@1 {_pts(vs_random)} ({vs_random['verdict']})"
        if vs_oracle:
            measured += f"; filtered - oracle {_pts(vs_oracle)} ({vs_oracle['verdict']})"
        claims.append(Claim("the filter removes the coarse (mismatched) pairs", "noisy pairs are filtered out, and training on the rest helps", verdict, measured))

    eq = by.get(("filtered", "full", "R1"))
    if eq:
        # The saving is counted in optimizer steps: the same model and batch cost the same per step, and
        # wall time measured with other runs beside it on a shared machine is noisier (reported too).
        saving = _saving(steps, "A-filtered", "A-full")
        wall = _saving(times, "A-filtered", "A-full")
        verdict = _competitive(eq)
        if verdict == "holds" and not saving > 0:
            verdict = "does not hold (no time saved)"
        at_steps = by.get(("filtered", "full-steps", "R1"))
        measured = f"filtered - full pool R@1 {_pts(eq)} at equal epochs, stage-A training {saving:.1f}% fewer steps ({wall:.1f}% less wall time)"
        if at_steps:
            measured += f"; at equal steps {_pts(at_steps)} ({at_steps['verdict']})"
        claims.append(Claim("filtered data: competitive accuracy with less training time", "competitive with the full data, 19.82% less training time", verdict, measured))

    wora = by.get(("filtered-wora", "filtered", "R1"))
    if wora:
        share = shares.get("filtered-wora")
        measured = f"WoRA - full FT R@1 {_pts(wora)}, training {share:.2f}% of the non-embedding parameters" if share is not None else f"WoRA - full FT R@1 {_pts(wora)}"
        claims.append(Claim("WoRA light fine-tuning is competitive with full fine-tuning", "competitive at a small share of the parameters", _competitive(wora), measured))

    rivals = [by.get(("filtered-wora", other, "R1")) for other in ("filtered-dora", "filtered-lora")]
    if all(rivals):
        verdicts = {r["verdict"] for r in rivals}
        verdict = "holds" if verdicts == {"better"} else "does not hold" if "worse" in verdicts else "within noise"
        measured = "; ".join(f"WoRA - {r['b'].split('-', 1)[1]} {_pts(r)} ({r['verdict']})" for r in rivals)
        fixed = by.get(("filtered-wora", "filtered-wora-fixed", "R1"))
        if fixed:
            measured += f"; learnable alpha, beta vs frozen {_pts(fixed)} ({fixed['verdict']})"
        claims.append(Claim("WoRA beats DoRA and LoRA at the same rank and scale", "WoRA is the best of the three", verdict, measured,
                            needs_gate=False))

    ft = by.get(("filtered-ftfilter", "filtered", "R1"))
    if ft:
        verdict = {"better": "holds", "worse": "does not hold"}.get(ft["verdict"], "within noise")
        claims.append(Claim("the fine-tuning filter (top 1,800 of 10,001) helps", "fine-tuning on the filtered split", verdict, f"filtered split - whole split R@1 {_pts(ft)}"))

    out = []
    for c in claims:
        if not judged:
            c.verdict = NOT_JUDGED
        elif not gate.get("passed") and c.needs_gate:
            c.verdict = NOT_TESTABLE
        out.append({k: v for k, v in asdict(c).items() if k != "needs_gate"})
    return out
