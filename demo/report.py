"""The demo's results record rendered: ``results.md``, ``report.html`` and the cells the terminal prints.

Everything here reads one plain dict, the record ``tbps demo`` writes to ``results.json``
(:func:`tbps.demo.run.run_demo`): ``table`` (one row per arm, each metric as ``mean`` with a
bootstrap interval ``[lo, hi]``), ``gate``, ``tuning``, ``comparisons``, ``claims``, ``filter``,
``runs`` (each run's directory, holding its ``log.jsonl``) and ``links`` (the inspect pages).
Any value may be missing or ``None`` (``--quick``, a gate that failed, an arm that was not run):
it is written "-" and the rest is rendered.

:func:`tbps.terminal.demo_tables` prints the same cells (:func:`table_cells`, :func:`gate_line`,
:func:`claim_rows`). This module imports no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from tbps.report.html import PALETTE, Styled, esc, grid_table, page, svg_bar_chart, svg_line_chart

MISSING = "-"
METRICS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"), ("mAP", "mAP"), ("mINP", "mINP"))
TABLE_HEADER = (
    "arm", "stage", "seeds", "lr", *(name for _, name in METRICS),
    "trainable", "% of all", "% of non-embedding", "train time", "pairs seen",
)
GATE_HEADER = ("seed", "pretrained", "alone", "difference")
COMPARISON_HEADER = ("comparison", "a", "b", "metric", "a - b [interval]", "per seed", "verdict")
CLAIMS_HEADER = ("claim", "paper", "verdict", "measured")
FILTER_HEADER = (
    "selection", "kept", "precision", "recall", "AUROC score", "AUROC bank_rank",
    "relevance AUROC score", "relevance AUROC bank_rank",
)
KIND_HEADER = ("defect", "pairs", "removed", "recall", "AUROC score", "AUROC bank_rank", "judged by")
CHANCE = 0.5  # the AUROC of a detector that ranks defects at random


# --------------------------------------------------------------------------- reading the record


def dig(record: Any, *keys: Any) -> Any:
    """``record[k1][k2]...``, or ``None`` where a level is missing, ``None`` or not a container."""
    for key in keys:
        if isinstance(record, dict):
            record = record.get(key)
        elif isinstance(record, (list, tuple)) and isinstance(key, int) and -len(record) <= key < len(record):
            record = record[key]
        else:
            return None
    return record


def number(value: Any) -> float | None:
    """A finite number, or ``None`` for a missing, non-numeric (bools included) or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, spec: str = ".1f") -> str:
    """A number in ``spec`` (``"+.2f"``, ``",.0f"``, ...), or "-" when it is missing."""
    v = number(value)
    return MISSING if v is None else format(v, spec)


def interval_cell(stat: Any, spec: str = ".1f", signed: bool = False) -> str:
    """``mean [lo, hi]`` of a ``{"mean", "lo", "hi"}`` statistic (the mean alone without an interval).

    Args:
        stat: the statistic; a bare number is a mean.
        spec: the number format.
        signed: write a sign on every number (a difference).

    Returns:
        The cell text; "-" when the mean is missing.
    """
    spec = ("+" + spec) if signed else spec
    mean = stat if not isinstance(stat, dict) else stat.get("mean")
    if number(mean) is None:
        return MISSING
    lo, hi = dig(stat, "lo"), dig(stat, "hi")
    if number(lo) is None or number(hi) is None:
        return fmt(mean, spec)
    return f"{fmt(mean, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def count_cell(value: Any) -> str:
    """A parameter count: ``1.23 M``, ``74.5 k`` or ``812``."""
    v = number(value)
    if v is None:
        return MISSING
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f} M"
    return f"{v / 1e3:.1f} k" if abs(v) >= 1e3 else f"{v:.0f}"


def share_cell(part: Any, whole: Any) -> str:
    """``part`` as a percentage of ``whole``, with the digits a small share needs."""
    p, w = number(part), number(whole)
    if p is None or not w:
        return MISSING
    share = 100.0 * p / w
    return f"{share:.1f}%" if share >= 10 else f"{share:.2f}%" if share >= 0.1 else f"{share:.3f}%"


def seconds_cell(stat: Any) -> str:
    """Training wall time ``mean ± std s`` (the mean alone for one seed)."""
    mean, std = (stat, None) if not isinstance(stat, dict) else (stat.get("mean"), stat.get("std"))
    m = number(mean)
    if m is None:
        return MISSING
    spec = ".1f" if m < 10 else ".0f"
    return f"{m:{spec}}" + (f" ± {number(std):{spec}}" if number(std) is not None else "") + " s"


def lr_cell(value: Any) -> str:
    """A learning rate as ``1e-03`` / ``0.0003`` (``g`` format), or "-"."""
    return fmt(value, "g")


def labels(results: dict[str, Any]) -> dict[str, str]:
    """Arm key -> its label in the table (the key itself where the table has no label)."""
    return {row["key"]: row.get("label") or row["key"] for row in results.get("table") or [] if isinstance(row, dict) and row.get("key")}


def verdict_tone(verdict: Any) -> str:
    """``good``, ``bad`` or ``neutral`` for a claim's or a comparison's verdict (its colour)."""
    text = str(verdict or "").lower()
    if text.startswith(("holds", "better", "passed")):
        return "good"
    if text.startswith(("does not", "worse", "failed")):
        return "bad"
    return "neutral"


# --------------------------------------------------------------------------- the tables as cells


def table_cells(row: dict[str, Any]) -> dict[str, str]:
    """The cells of one arm of the results table, by :data:`TABLE_HEADER` name.

    Args:
        row: one entry of ``results["table"]``.

    Returns:
        Header name -> cell text ("-" for a missing value).
    """
    metrics = row.get("metrics") or {}
    pairs = number(row.get("pairs_seen"))
    return {
        "arm": str(row.get("label") or row.get("key") or MISSING),
        "stage": str(row.get("stage") or MISSING),
        "seeds": fmt(row.get("seeds"), ".0f"),
        "lr": lr_cell(row.get("lr")),
        **{name: interval_cell(metrics.get(key)) for key, name in METRICS},
        "trainable": count_cell(row.get("trainable")),
        "% of all": share_cell(row.get("trainable"), row.get("total")),
        "% of non-embedding": share_cell(row.get("trainable_non_embedding", row.get("trainable")), row.get("non_embedding_total")),
        "train time": seconds_cell(row.get("train_seconds")),
        "pairs seen": MISSING if pairs is None else f"{pairs:,.0f}",
    }


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results table's rows, cells in :data:`TABLE_HEADER` order."""
    return [[table_cells(row)[h] for h in TABLE_HEADER] for row in results.get("table") or [] if isinstance(row, dict)]


def _html_table_rows(results: dict[str, Any]) -> list[list[Any]]:
    """The results table's rows for the page: each interval on a second line under its mean (narrower columns)."""
    metric_columns = {TABLE_HEADER.index(name) for _, name in METRICS}
    return [[Styled(c.replace(" [", "\n[", 1), "iv") if i in metric_columns else c for i, c in enumerate(row)] for row in table_rows(results)]


def gate_line(results: dict[str, Any]) -> str:
    """One sentence: whether the gate passed, on which metric, by how much against which threshold."""
    gate = results.get("gate")
    if not isinstance(gate, dict) or not gate:
        return "gate: not run"
    names = labels(results)
    passed = gate.get("passed")
    state = "passed" if passed is True else "FAILED" if passed is False else "not decided"
    pre, alone = gate.get("pretrained"), gate.get("alone")
    seeds = len(gate.get("per_seed") or [])
    return (
        f"gate {state}: {gate.get('metric') or 'val R@1'} of {names.get(pre, pre) or MISSING} minus "
        f"{names.get(alone, alone) or MISSING} = {fmt(gate.get('mean_difference'), '+.2f')}"
        + (f" on average over {seeds} seed{'s' if seeds != 1 else ''}" if seeds else "")
        + f" (threshold {fmt(gate.get('threshold'), 'g')})"
    )


def gate_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per seed: (seed, pretrained, alone, difference) of the gate's metric."""
    return [
        [fmt(s.get("seed"), ".0f"), fmt(s.get("pretrained"), ".2f"), fmt(s.get("alone"), ".2f"), fmt(s.get("difference"), "+.2f")]
        for s in dig(results, "gate", "per_seed") or [] if isinstance(s, dict)
    ]


def _lr_value(values: dict[str, Any], lr: Any) -> Any:
    """The value recorded for a learning rate, its key written either way (``"0.001"``, ``"1e-03"``)."""
    for key, value in (values or {}).items():
        try:
            if float(key) == float(lr):
                return value
        except (TypeError, ValueError):
            continue
    return None


def tuning_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The learning-rate search: one row per method, val R@1 per learning rate, and the choice.

    Returns:
        (header, rows); a chosen learning rate's cell is a ``Styled(..., "strong")`` (bold in
        HTML, ``**x**`` in Markdown).
    """
    tuning = results.get("tuning") or {}
    grid, val, chosen = tuning.get("grid") or {}, tuning.get("val_R1") or {}, tuning.get("chosen") or {}
    methods = list(dict.fromkeys([*grid, *val, *chosen]))
    lrs = sorted({float(lr) for m in methods for lr in (grid.get(m) or []) if number(lr) is not None})
    if not lrs:  # no grid recorded: the learning rates the val table names
        lrs = sorted({float(k) for m in methods for k in (val.get(m) or {}) if _is_float(k)})
    header = ["method", *(f"lr {lr:g}" for lr in lrs), "chosen"]
    rows = []
    for m in methods:
        cells: list[Any] = []
        for lr in lrs:
            in_grid = any(number(x) == lr for x in grid.get(m) or []) or _lr_value(val.get(m), lr) is not None
            text = fmt(_lr_value(val.get(m), lr), ".2f") if in_grid else ""
            pick = number(chosen.get(m))
            cells.append(Styled(text, "strong") if pick is not None and pick == lr else text)
        edge = m in (tuning.get("at_edge") or [])
        rows.append([m, *cells, f"{lr_cell(chosen.get(m))} (at the grid's edge)" if edge else lr_cell(chosen.get(m))])
    return header, rows


def _is_float(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def comparison_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per comparison: name, a, b, metric, the mean difference with its interval, per seed, verdict."""
    names = labels(results)
    rows = []
    for c in results.get("comparisons") or []:
        if not isinstance(c, dict):
            continue
        metric = dict(METRICS).get(c.get("metric"), c.get("metric"))
        per_seed = ", ".join(fmt(v, "+.2f") for v in c.get("per_seed") or []) or MISSING
        rows.append([
            str(c.get("name") or MISSING), names.get(c.get("a"), c.get("a") or MISSING), names.get(c.get("b"), c.get("b") or MISSING),
            str(metric or MISSING), interval_cell(c, ".2f", signed=True), per_seed, str(c.get("verdict") or MISSING),
        ])
    return rows


def claim_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per claim: the claim, what the paper reports, the verdict and what was measured."""
    return [[str(c.get(k) or MISSING) for k in CLAIMS_HEADER] for c in results.get("claims") or [] if isinstance(c, dict)]


def gate_tone(results: dict[str, Any]) -> str:
    """``good`` when the gate passed, ``bad`` when it failed, else ``neutral``."""
    passed = dig(results, "gate", "passed")
    return "good" if passed is True else "bad" if passed is False else "neutral"


def _verdicts(rows: list[list[Any]], column: int) -> list[list[Any]]:
    """The rows with their verdict cell styled by :func:`verdict_tone` (coloured in HTML, bold in Markdown)."""
    return [[*r[:column], Styled(r[column], verdict_tone(r[column])), *r[column + 1:]] for r in rows]


def filter_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per selection: kept of rows, precision and recall of the removed pairs, overall and relevance-only AUROCs."""
    rows = []
    for name, s in (dig(results, "filter", "selections") or {}).items():
        s = s if isinstance(s, dict) else {}
        kept, total = number(s.get("kept")), number(s.get("rows"))
        rows.append([
            str(name),
            f"{fmt(kept, ',.0f')} of {fmt(total, ',.0f')}" if kept is not None or total is not None else MISSING,
            *(fmt(s.get(k), ".3f") for k in ("precision", "recall", "auroc_score", "auroc_bank_rank",
                                                "auroc_relevance_score", "auroc_relevance_bank_rank")),
        ])
    return rows


def duplicate_kinds(results: dict[str, Any]) -> list[str]:
    """The defect kinds judged by recall (de-duplication removes them, not the score)."""
    return list(dig(results, "filter", "duplicate_kinds") or [])


def kind_rows(results: dict[str, Any], selection: str) -> list[list[str]]:
    """Per defect kind of one selection: pairs, removed, recall, the AUROCs and which of them judges it."""
    dups = set(duplicate_kinds(results))
    kinds = dig(results, "filter", "selections", selection, "per_kind") or {}
    return [
        [str(kind), fmt(dig(m, "pairs"), ",.0f"), fmt(dig(m, "removed"), ",.0f"),
         *(fmt(dig(m, k), ".3f") for k in ("recall", "auroc_score", "auroc_bank_rank")),
         "recall" if kind in dups else "AUROC"]
        for kind, m in kinds.items()
    ]


# --------------------------------------------------------------------------- results.md


def _md_cell(cell: Any) -> str:
    if isinstance(cell, Styled):
        text = str(cell.value)
        return f"**{_md_cell(text)}**" if text and cell.css in ("strong", "good", "bad") else _md_cell(text)
    return _md_text(str(cell)).replace("|", "\\|")


def _md_text(text: str) -> str:
    """Text safe in Markdown: ``<`` escaped (GitHub would take ``<r8>`` for a tag and hide it), one line."""
    return text.replace("<", "\\<").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub Markdown table (``|`` in a cell escaped), as lines."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def markdown_table(results: dict[str, Any]) -> str:
    """The results table as GitHub Markdown: one line per arm, each metric ``mean [lo, hi]``."""
    return "\n".join(md_table(TABLE_HEADER, table_rows(results)))


def _headline(results: dict[str, Any]) -> str:
    minutes = number(results.get("seconds"))
    load = results.get("load") or {}
    cpus = number(results.get("cpu_count"))
    return (
        f"Command: `{results.get('command') or 'tbps demo'}`; "
        + (f"{minutes / 60:.1f} min wall" if minutes is not None else "wall time -")
        + (f" on {cpus:.0f} CPU cores" if cpus else "")
        + f", load average {fmt(load.get('start_1min'))} at the start and {fmt(load.get('end_1min'))} at the end."
    )


QUICK_NOTE = "Quick mode: a tiny world and a few steps. Every stage ran; the numbers say nothing about the claims."
INTERVAL_NOTE = "Each metric is the mean over seeds on the test split, with its bootstrap interval in brackets."


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the command, the table, the gate, the tuning, the comparisons, the claims and the filter.

    Args:
        results: the demo's results record (the module docstring).

    Returns:
        The Markdown text, ready for the README.
    """
    quick = bool(results.get("quick"))
    lines = [f"# tbps demo{' --quick' if quick else ''}: results on the test split", "", _headline(results), ""]
    if quick:
        lines += [f"**{QUICK_NOTE}**", ""]
    lines += [INTERVAL_NOTE, "", markdown_table(results), ""]
    lines += [f"- {note}" for note in results.get("design") or []]
    lines += ["", "## The gate", "", f"**{_md_text(gate_line(results))}**", ""]
    if gate_rows(results):
        lines += md_table(GATE_HEADER, gate_rows(results)) + [""]
    if dig(results, "gate", "note"):
        lines += [str(results["gate"]["note"]), ""]
    header, rows = tuning_table(results)
    lines += ["## Learning rates, chosen on val R@1", ""]
    lines += (md_table(header, rows) if rows else ["-"]) + [""]
    if dig(results, "tuning", "note"):
        lines += [str(results["tuning"]["note"]), ""]
    lines += ["## Comparisons (paired over seeds)", ""]
    comparisons, claims = _verdicts(comparison_rows(results), 6), _verdicts(claim_rows(results), 2)
    lines += (md_table(COMPARISON_HEADER, comparisons) if comparisons else ["-"]) + [""]
    lines += ["## The paper's claims, as measured", ""]
    lines += (md_table(CLAIMS_HEADER, claims) if claims else ["-"]) + [""]
    lines += ["## The filter against the defect truth", ""]
    lines += (md_table(FILTER_HEADER, filter_rows(results)) if filter_rows(results) else ["-"]) + [""]
    for name in dig(results, "filter", "selections") or {}:
        if kind_rows(results, name):
            lines += [f"Per defect kind ({name}):", ""] + md_table(KIND_HEADER, kind_rows(results, name)) + [""]
    if duplicate_kinds(results):
        lines += [f"Duplicates ({', '.join(duplicate_kinds(results))}) are removed by de-duplication, not by the score: they are judged by recall.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- report.html


def read_val_curve(log: Path) -> list[tuple[float, float | None]] | None:
    """The ``(step, R1)`` of a run's validation lines in ``log.jsonl``; ``None`` when there is no log.

    A line that is not JSON (a run cut off mid-write) is skipped.
    """
    if not log.is_file():
        return None
    points = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("kind") == "val" and number(entry.get("step")) is not None:
            points.append((float(entry["step"]), number(entry.get("R1"))))
    return points


def _auroc_charts(results: dict[str, Any]) -> str:
    """One bar chart per selection of its AUROCs (score, bank_rank) overall and per defect kind.

    Selections whose AUROCs are all equal (the score does not depend on the selection) share one chart.
    """
    charts: dict[tuple, tuple[list[str], list]] = {}
    for name, s in (dig(results, "filter", "selections") or {}).items():
        s = s if isinstance(s, dict) else {}
        bars = [("all defects", [number(s.get("auroc_score")), number(s.get("auroc_bank_rank"))]),
                ("relevance defects", [number(s.get("auroc_relevance_score")), number(s.get("auroc_relevance_bank_rank"))])]
        bars += [(str(kind), [number(dig(m, "auroc_score")), number(dig(m, "auroc_bank_rank"))]) for kind, m in (s.get("per_kind") or {}).items()]
        key = tuple((label, tuple(v)) for label, v in bars)
        charts.setdefault(key, ([], bars))[0].append(str(name))
    return "".join(
        svg_bar_chart(bars, series=("score", "bank_rank"), title=f"AUROC per defect kind ({', '.join(names)})",
                      value_label="AUROC (defect vs clean)", reference=(CHANCE, "chance 0.5"), value_range=(0.0, 1.0))
        for names, bars in charts.values()
    )


def _curves(results: dict[str, Any], out_dir: Path) -> str:
    """Val R@1 against step: one chart per stage and seed, one line per arm (the same colour in every seed)."""
    table = [r for r in results.get("table") or [] if isinstance(r, dict) and r.get("key")]
    stage_of = {r["key"]: r.get("stage") or "other" for r in table}
    names = labels(results)
    stages: dict[str, dict[Any, dict[str, list]]] = {}
    missing: dict[str, list[str]] = {}
    for run in results.get("runs") or []:
        if not isinstance(run, dict) or not run.get("dir"):
            continue
        stage = stage_of.get(run.get("key"), "other")
        points = read_val_curve(out_dir / str(run["dir"]) / "log.jsonl")
        if points is None or not points:
            missing.setdefault(stage, []).append(f"{run['dir']} ({'no log' if points is None else 'no validation in the log'})")
            continue
        label = names.get(run.get("key"), str(run.get("key")))
        stages.setdefault(stage, {}).setdefault(run.get("seed"), {})[label] = points
    if not stages and not missing:
        return '<p class="note">no runs recorded</p>'
    parts = []
    for stage in dict.fromkeys([*(stage_of[k] for k in stage_of), *stages, *missing]):
        if stage not in stages and stage not in missing:
            continue
        parts.append(f"<h3>{esc(stage)}</h3>")
        by_seed = stages.get(stage, {})
        arms = list(dict.fromkeys(label for seeds in by_seed.values() for label in seeds))
        colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(arms)}
        # One y range for every seed of a stage, so that side-by-side charts compare.
        ys = [y for seeds in by_seed.values() for pts in seeds.values() for _, y in pts if y is not None]
        y_range = (min(ys), max(ys)) if ys else None
        charts = [
            svg_line_chart(series, "step", "val R@1", title=f"{stage} · seed {seed}",
                           width=380, colours=colours, y_range=y_range)  # three seeds side by side on a 1280 px screen
            for seed, series in sorted(by_seed.items(), key=lambda kv: (number(kv[0]) is None, number(kv[0]) or 0))
        ]
        if charts:
            parts.append('<div class="charts">' + "".join(charts) + "</div>")
        if missing.get(stage):
            parts.append('<p class="note">not drawn: ' + esc("; ".join(missing[stage])) + "</p>")
    return "".join(parts)


def _links(results: dict[str, Any], out_dir: Path) -> str:
    links = results.get("links") or {}
    items = []
    if links.get("pool"):
        items.append(("the pool's score table", links["pool"]))
    items += [(f"selection {name}", href) for name, href in (links.get("selections") or {}).items() if href]
    if not items:
        return '<p class="note">no inspect pages</p>'
    lis = "".join(
        f'<li><a href="{esc(href)}">{esc(label)}</a> <span class="note">{esc(href)}'
        f'{"" if (out_dir / str(href)).is_file() else " (missing)"}</span></li>'
        for label, href in items
    )
    return f"<ul>{lis}</ul>"


def _grid(header: Sequence[str], rows: list[list[Any]]) -> str:
    """:func:`grid_table`, or a note when there is nothing to show (no header-only table)."""
    return grid_table(list(header), rows) if rows else '<p class="note">not recorded</p>'


def _banner(text: str, tone: str) -> str:
    return f'<div class="banner {esc(tone)}">{esc(text)}</div>'


def render_report_html(results: dict[str, Any], out_dir: Path) -> str:
    """``report.html``: the results table first, then the claims, the filter's AUROCs, the validation curves and links.

    Args:
        results: the demo's results record (the module docstring).
        out_dir: the demo's output directory: the runs' ``log.jsonl`` files and the inspect
            pages are found relative to it.

    Returns:
        The self-contained HTML document (write it with :func:`tbps.report.html.write_html`).
    """
    out_dir = Path(out_dir)
    quick = bool(results.get("quick"))
    gate = results.get("gate") if isinstance(results.get("gate"), dict) else {}
    header, tuning = tuning_table(results)
    sections = [
        '<h2>Results on the test split</h2><div class="wide">' + _grid(TABLE_HEADER, _html_table_rows(results)) + "</div>",
        f'<p class="note">{esc(INTERVAL_NOTE)}</p>',
        _banner(gate_line(results), gate_tone(results)),
        "<h2>The paper's claims, as measured</h2>"
        + '<div class="left">' + _grid(CLAIMS_HEADER, _verdicts(claim_rows(results), 2)) + "</div>",
        "<h3>Comparisons (paired over seeds)</h3>" + _grid(COMPARISON_HEADER, _verdicts(comparison_rows(results), 6)),
        "<h2>The filter against the defect truth</h2>",
        '<div class="charts">' + _auroc_charts(results) + "</div>",
        '<p class="note">An AUROC of 0.5 is chance. Duplicates'
        + (f" ({esc(', '.join(duplicate_kinds(results)))})" if duplicate_kinds(results) else "")
        + " are removed by de-duplication, not by the score: they are judged by recall.</p>",
        _grid(FILTER_HEADER, filter_rows(results)),
        *(f"<h3>Per defect kind ({esc(name)})</h3>" + grid_table(list(KIND_HEADER), kind_rows(results, name))
          for name in dig(results, "filter", "selections") or {} if kind_rows(results, name)),
        "<h2>Validation curves</h2>" + _curves(results, out_dir),
        "<h3>The gate</h3>" + _banner(gate_line(results), gate_tone(results)) + _grid(GATE_HEADER, gate_rows(results))
        + (f'<p class="note">{esc(gate.get("note"))}</p>' if gate.get("note") else ""),
        "<h3>Learning rates, chosen on val R@1</h3>" + _grid(header, tuning)
        + (f'<p class="note">{esc(dig(results, "tuning", "note"))}</p>' if dig(results, "tuning", "note") else ""),
        "<h2>Inspect pages</h2>" + _links(results, out_dir),
        "<h2>How the comparison was made fair</h2>"
        + ("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in results.get("design")) + "</ul>" if results.get("design") else '<p class="note">not recorded</p>'),
    ]
    subtitle = _headline(results).replace("`", "") + (f" {QUICK_NOTE}" if quick else "")
    return page(f"tbps demo{' --quick' if quick else ''}: results", subtitle, "".join(sections))
