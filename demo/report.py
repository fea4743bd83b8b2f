"""The demo's results as text: the table, the filter's truth metrics and the claims, as cells and Markdown.

The terminal prints the same cells (:func:`tbps.terminal.demo_tables`).
The HTML reports of a run are ``tbps inspect --html`` pages (:func:`tbps.curate.inspect.run_inspect`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbps.demo.claims import METRICS, Claim
from tbps.demo.plan import DemoConfig


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


@dataclass
class DemoResult:
    """What :func:`tbps.demo.run.run_demo` measured and wrote.

    Attributes:
        out: the run directory.
        quick: whether this was the ``--quick`` mode.
        rows: the aggregated table (see :func:`tbps.demo.claims.aggregate`).
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
