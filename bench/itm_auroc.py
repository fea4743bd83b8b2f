"""Benchmark the filter's per-defect AUROC with three scorers side by side (issue 14, item 5).

Goal: AUROC >= 0.80 on attribute swaps and >= 0.85 on wrong attributes, at no more than 2x the
cosine scorer's scoring time per pair on CPU.

The scorers start from the same model, the full pool's stage-A model of a ``tbps demo`` run
(trained on the noisy pool only), and are fine-tuned the same way on the benchmark's train split
(full fine-tuning, the demo's tuned rate and epochs, the checkpoint chosen on val R@1), which is
how the demo builds its filter:

``cosine``            plain contrastive fine-tuning; the pair's score is the cosine (the demo's filter)
``cosine+hardneg``    ``--hard-negatives``: each caption perturbed is one more negative (NegCLIP)
``itm``               ``--itm-head --hard-negatives``: a matching head trained beside the model;
                      the pair's score is ``itm_score``

Each scores the same sample of the demo's pool (truth known per pair) with the same bank, and
the AUROC of each defect kind against the clean pairs is computed from its score (``score`` or
``itm_score``; low means defective) and, for every scorer, from the cosine's ``bank_rank``.
Scoring time per pair is the score run's own pairs/s; the ITM scorer's cost is its run (cosine
and ITM) against the cosine scorer's run.

    .venv/bin/python bench/itm_auroc.py --demo runs/demo-v3 [--pairs 4000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps.curate.score import ScoreConfig, read_score_table, run_score  # noqa: E402
from tbps.curate.truth import auroc  # noqa: E402
from tbps.train.loop import TrainConfig, train  # noqa: E402

SCORERS = {"cosine": {}, "cosine+hardneg": {"hard_negatives": True}, "itm": {"hard_negatives": True, "itm_head": True}}
RELEVANCE_KINDS = (C.DEFECT_SWAPPED, C.DEFECT_WRONG, C.DEFECT_OTHER_ID, C.DEFECT_BLANK, C.DEFECT_GARBLED)
GOALS = {C.DEFECT_SWAPPED: 0.80, C.DEFECT_WRONG: 0.85}


def _pool_sample(demo: Path, pairs: int, out: Path) -> tuple[Path, Path]:
    """A fixed random sample of the demo's scored pool (absolute image paths), and its images' root."""
    table = read_score_table(demo / "scores").collect().filter(pl.col(C.STATUS) == C.STATUS_OK)
    pick = np.sort(np.random.default_rng(0).choice(table.height, size=min(pairs, table.height), replace=False))
    sample = table[pick].select(C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SOURCE)
    path = out / "pool-sample.parquet"
    sample.write_parquet(path)
    return path, demo / "world" / "pool"


def _aurocs(scores: pl.DataFrame, truth: pl.DataFrame, column: str) -> dict[str, float | None]:
    joined = scores.join(truth.select(C.PAIR_ID, C.DEFECT), on=C.PAIR_ID).filter(pl.col(C.STATUS) == C.STATUS_OK)
    value = joined.get_column(column).cast(pl.Float64).to_numpy()
    if column != C.BANK_RANK:
        value = -value  # a low score marks a defect
    defect = joined.get_column(C.DEFECT).to_numpy()
    clean = value[defect == C.DEFECT_NONE]
    kinds = sorted(set(defect) - {C.DEFECT_NONE})
    out = {kind: auroc(value[defect == kind], clean) for kind in kinds}
    relevance = np.isin(defect, RELEVANCE_KINDS)
    out["relevance (all but duplicates)"] = auroc(value[relevance], clean)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="runs/demo-v3", help="a full `tbps demo` run directory (its world, pool scores and stage-A model)")
    ap.add_argument("--pairs", type=int, default=4000, help="pool pairs scored by each scorer")
    ap.add_argument("--out", default="runs/bench-itm")
    ap.add_argument("--quick", action="store_true", help="a few steps and pairs: checks that the benchmark runs (numbers mean nothing)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((demo / "results.json").read_text())
    lr = results["tuning"]["chosen"]["full"]
    epochs = 1 if args.quick else results["plan"]["finetune_epochs"]
    pairs = 200 if args.quick else args.pairs
    init = demo / "models" / "seed0" / "A-full.pt"
    bench = demo / "world" / "benchmark" / "reid_raw.json"
    sample, root = _pool_sample(demo, pairs, out)
    truth = pl.read_parquet(demo / "world" / "pool" / "truth.parquet")

    rows, timing = {}, {}
    for name, flags in SCORERS.items():
        run = out / "runs" / name
        t0 = time.perf_counter()
        res = train(TrainConfig(out=str(run), model=str(init), data=str(bench), val=str(bench), adapter="full", epochs=epochs,
                                batch_size=32, lr=lr, warmup=0.1, precision="fp32", seed=0, val_every=10**9 if args.quick else 74,
                                save_every=10**9, log_every=50, workers=0, device="cpu", **flags))
        train_s = time.perf_counter() - t0
        scored = out / "scores" / name
        summary = run_score(ScoreConfig(data=str(sample), image_root=str(root), model=str(run), bank=str(demo / "bank.txt"), out=str(scored),
                                        bank_size=500 if args.quick else 10_000, seed=0, batch_size=128, workers=0, precision="fp32", device="cpu"))
        table = read_score_table(scored).collect()
        column = C.ITM_SCORE if C.ITM_SCORE in table.columns else C.SCORE
        rows[name] = {"score": _aurocs(table, truth, column), "bank_rank": _aurocs(table, truth, C.BANK_RANK), "column": column,
                      "val_R1": res.best_metrics.get("R1")}
        timing[name] = {"train_s": train_s, "steps": res.steps, "pairs_per_s": summary.pairs_per_second}
        print(f"{name}: val R@1 {rows[name]['val_R1']}, {summary.pairs_per_second:.1f} pairs/s, AUROC ({column}) {rows[name]['score']}", flush=True)

    kinds = list(next(iter(rows.values()))["score"])
    lines = [
        "AUROC of each defect kind against the clean pairs, on a fixed sample of the demo's pool "
        f"({pairs:,} ok pairs; `{demo}`), three scorers fine-tuned alike from the demo's stage-A model "
        f"(full FT, lr {lr:g}, {epochs} epochs of the benchmark's train split, checkpoint chosen on val R@1).",
        "",
        f"Command: `.venv/bin/python bench/itm_auroc.py --demo {demo} --pairs {args.pairs}" + (" --quick" if args.quick else "") + "`",
        "",
        "| defect kind | " + " | ".join(f"{n} ({rows[n]['column']})" for n in rows) + " | " + " | ".join(f"{n} (bank_rank)" for n in rows) + " |",
        "| --- |" + " ---: |" * (2 * len(rows)),
    ]
    for kind in kinds:
        cells = [rows[n]["score"][kind] for n in rows] + [rows[n]["bank_rank"][kind] for n in rows]
        lines.append(f"| {kind} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    lines += ["", "| scorer | val R@1 | training s (steps) | scoring pairs/s | time per pair vs cosine |", "| --- | ---: | ---: | ---: | ---: |"]
    base = timing["cosine"]["pairs_per_s"]
    for n, t in timing.items():
        lines.append(f"| {n} | {rows[n]['val_R1'] or 0:.2f} | {t['train_s']:.0f} ({t['steps']}) | {t['pairs_per_s']:.1f} | "
                     f"{base / t['pairs_per_s']:.2f}x |")
    itm = rows["itm"]["score"]
    verdicts = [f"{k}: {itm.get(k) if itm.get(k) is None else round(itm[k], 3)} (goal {g:.2f}: {'met' if (itm.get(k) or 0) >= g else 'not met'})"
                for k, g in GOALS.items()]
    lines += ["", "ITM scorer against the goals: " + "; ".join(verdicts) + f"; its scoring time per pair is "
              f"{base / timing['itm']['pairs_per_s']:.2f}x the cosine scorer's (goal <= 2x)."]
    if args.quick:
        lines.insert(0, "**--quick: a check that the benchmark runs; the numbers mean nothing.**\n")
    markdown = "\n".join(lines)
    print(markdown)
    (out / "results.json").write_text(json.dumps({"rows": rows, "timing": timing, "pairs": pairs}, indent=2))
    if not args.quick:
        write_section("itm-auroc", "## Filter AUROC by scorer (issue 14)\n\n" + markdown)


if __name__ == "__main__":
    main()
