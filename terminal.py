"""Terminal rendering: the rich tables and text ``cli.py`` prints to stdout, one function per summary.

The core returns data (a summary dataclass, an eval record, a pair table); the functions here
turn it into rich renderables and print nothing: only the CLI prints. A function returns one
renderable, or a list of them in print order.

This module sits between ``tbps.demo`` and ``tbps.cli``, and ``tbps --help`` imports it, so it
imports no module that loads torch at run time: the summaries of the commands that need torch
(score, train, search) are named in annotations only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import polars as pl
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from tbps import columns as C
from tbps.curate.inspect import ORIGINAL, ORIGINAL_COLUMNS, ORIGINAL_FATE, QUANTILES, DropReport, Histogram, TableReport, Threshold, format_value
from tbps.curate.select import STEPS_BY_NAME
from tbps.curate.select_io import SelectRun, drop_reasons
from tbps.data.readers import DatasetSummary
from tbps.data.synth import SynthSummary
from tbps.demo.report import CLAIMS_HEADER, QUICK_NOTE, claim_rows, gate_line, gate_tone, table_cells, verdict_tone

if TYPE_CHECKING:  # annotations only: these modules load torch, which `tbps --help` must not
    from tbps.curate.embeddings import EmbeddingScoreSummary, ExportSummary
    from tbps.curate.score import ScoreSummary
    from tbps.eval.search import SearchResult
    from tbps.train.loop import TrainResult


# --------------------------------------------------------------------------- tbps info, synth


def _image_sample_text(sample) -> str:
    """``found 200 of 200 sampled``, or what is missing and where such files are."""
    if not sample.checked:
        return "-"
    text = f"found {sample.found:,} of {sample.checked:,} sampled"
    if sample.missing_example:
        text += f"; missing e.g. {sample.missing_example}"
        if sample.found_elsewhere:
            text += f" (a file of that name is in {sample.found_elsewhere}: check --image-root)"
    return text


def dataset_summary(summary: DatasetSummary) -> list[Table]:
    """The tables ``tbps info`` prints: the overview, the status and split counts, the first rows.

    Args:
        summary: what :func:`tbps.data.readers.describe` found.

    Returns:
        Rich tables, in print order.
    """
    overview = Table(title=f"{summary.path}", show_header=False)
    words = summary.caption_words
    for key, value in (
        ("format", summary.format),
        ("image root", summary.image_root or "-"),
        ("rows", f"{summary.rows:,}"),
        ("persons", f"{summary.persons:,}" if summary.persons else f"person ids: {summary.persons_note}"),
        ("images", f"{summary.images:,}"),
        ("image files", _image_sample_text(summary.image_sample)),
        ("caption words", f"min {words['min']:.0f} | mean {words['mean']:.1f} | median {words['median']:.0f} | max {words['max']:.0f}"),
    ):
        overview.add_row(key, str(value))
    counts = Table("status", "rows", title="statuses")
    for key, value in summary.statuses.items():
        counts.add_row(key, f"{value:,}")
    splits = Table("split", "rows", title="splits")
    for key, value in summary.splits.items():
        splits.add_row("(none)" if key is None else key, f"{value:,}")
    sources = Table("source", "rows", title="sources (one per file)")
    for key, value in summary.sources.items():
        sources.add_row("(none)" if key is None else key, f"{value:,}")
    head = Table(*summary.head.columns, title=f"first {summary.head.height} rows")
    for row in summary.head.iter_rows():
        head.add_row(*("" if v is None else str(v) for v in row))
    return [overview, counts, splits, *([sources] if len(summary.sources) > 1 else []), head]


def synth_summary(summary: SynthSummary) -> Table:
    """The table ``tbps synth`` prints: identities, images and captions per split, pool defects, time.

    Args:
        summary: what :func:`tbps.data.synth.synthesize` wrote.

    Returns:
        A rich table of (section, item, count) rows.
    """
    table = Table("section", "item", "count", title=f"tbps synth -> {summary.out}")
    for row in summary.rows():
        table.add_row(*row)
    return table


# --------------------------------------------------------------------------- tbps score


def score_summary(summary: ScoreSummary) -> Table:
    """The table ``tbps score`` prints: rows, parts scored and resumed, bank size, throughput, statuses.

    Args:
        summary: what :func:`tbps.curate.score.run_score` did.

    Returns:
        A rich table of (key, value) rows.
    """
    s = summary
    table = Table(title=f"tbps score -> {s.out}", show_header=False)
    rows = f"{s.rows:,}" + (f" (split {','.join(s.splits)}; {s.rows_other_splits:,} rows of other splits not scored)" if s.splits else "")
    for key, value in [("rows", rows), ("parts", f"{s.parts_total} ({s.parts_done_here} scored here, {s.parts_skipped} resumed)"),
                       ("bank captions", f"{s.bank_size:,}"), ("throughput", f"{s.pairs_per_second:,.1f} pairs/s"),
                       ("complete", str(s.complete))] + [(f"status {k}", f"{v:,}") for k, v in s.status_counts.items()]:
        table.add_row(key, value)
    return table


def embedding_score_summary(summary: EmbeddingScoreSummary) -> Table:
    """The table ``tbps score --embeddings`` prints: :func:`score_summary`'s rows and how the stored embeddings matched."""
    s = summary
    table = score_summary(s)
    table.add_row("embeddings", f"{s.embeddings} ({s.embedding_rows:,} rows, matched on {s.match}; {s.embeddings_used:,} used)")
    if s.duplicate_keys:
        table.add_row("repeated keys", f"{s.duplicate_keys:,} metadata rows (the first one's embeddings used)")
    return table


def export_summary(summary: ExportSummary) -> Table:
    """The table ``tbps export-embeddings`` prints: rows written and skipped (by status), partitions, width."""
    s = summary
    table = Table(title=f"tbps export-embeddings -> {s.out}", show_header=False)
    for key, value in [("score rows", f"{s.rows:,}"), ("embeddings written", f"{s.written:,} ({s.dim}-d float16, L2-normalised)"),
                       ("partitions", f"{s.partitions}")] + [(f"skipped {k}", f"{v:,} (no embedding)") for k, v in s.skipped.items()]:
        table.add_row(key, value)
    return table


# --------------------------------------------------------------------------- tbps select


def _fixed(value: object) -> str:
    """A cell of the selection's tables: ``-`` for none, floats to 4 decimals, ints with separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def select_summary(run: SelectRun, *, explain: bool = False, explain_rows: int = 50) -> list[RenderableType]:
    """What ``tbps select`` prints: rows per step, score quantiles, truth metrics, warnings, the outputs.

    Args:
        run: the finished run (:func:`tbps.curate.select_io.run_select`).
        explain: also list the reasons (counts per reason, then the first dropped rows).
        explain_rows: how many dropped rows ``explain`` prints.

    Returns:
        Rich tables and text lines (with rich markup), in print order.
    """
    sel, config = run.selection, run.config
    steps = Table(title=f"tbps select: {sel.rows_in:,} rows in, {sel.rows_kept:,} kept", title_justify="left")
    for col, justify in (("step", "left"), ("rows in", "right"), ("dropped", "right"), ("rows out", "right"), ("rule", "left")):
        steps.add_column(col, justify=justify)
    for s in sel.steps:
        steps.add_row(s.step, f"{s.rows_in:,}", f"{s.dropped:,}", f"{s.rows_out:,}", STEPS_BY_NAME[s.step].describe(sel.resolved, config))
    out: list[RenderableType] = [steps]
    for column in (C.SCORE, *([C.ITM_SCORE] if config.uses_itm else [])):  # itm_score too when it ordered or cut the rows
        quant = Table(title=f"{column} quantiles", title_justify="left")
        qs = sel.quantiles(column=column)
        keys = [k for k in qs["kept"] if k.startswith("q")]
        quant.add_column("rows")
        quant.add_column("n", justify="right")
        for k in keys:
            quant.add_column({"q0": "min", "q1": "max", "q0.5": "median"}.get(k, f"p{float(k[1:]) * 100:g}"), justify="right")
        for side in ("kept", "dropped"):
            quant.add_row(side, f"{qs[side]['n']:,}", *[f"{qs[side][k]:.3f}" if qs[side][k] is not None else "-" for k in keys])
        out.append(quant)
    if sel.truth:
        out.append(_truth_table(sel.truth))
    if explain:
        out.extend(_explain(run, explain_rows))
    for note in sel.notes:
        out.append(f"note: {note}")
    for w in sel.warnings:
        out.append(f"[yellow]warning:[/] {w}")
    out.append(f"manifest {run.paths.manifest} ({sel.rows_kept:,} rows)")
    out.append(f"dropped  {run.paths.dropped} ({sel.rows_in - sel.rows_kept:,} rows, with reasons)")
    out.append(f"sidecar  {run.paths.sidecar}")
    return out


def _truth_table(truth: dict) -> Table:
    """Recall, resolved share and AUROCs per defect kind; the removal's precision in the caption."""
    t = Table(title=f"against the truth ({truth['matched']:,} pairs matched)", title_justify="left")
    for col, justify in (("defect", "left"), ("pairs", "right"), ("removed", "right"), ("recall", "right"), ("resolved", "right"), ("AUROC score", "right"), ("AUROC bank_rank", "right")):
        t.add_column(col, justify=justify)
    o = truth["overall"]
    t.add_row(
        "all defects", f"{o['defective']:,}", f"{o['removed_defective']:,}", _fixed(o["recall"]), "", _fixed(o["auroc_score"]), _fixed(o["auroc_bank_rank"])
    )
    for kind, k in truth["kinds"].items():
        t.add_row(
            f"  {kind}", f"{k['pairs']:,}", f"{k['removed']:,}", _fixed(k["recall"]), _fixed(k["resolved"]) if "resolved" in k else "",
            _fixed(k["auroc_score"]), _fixed(k["auroc_bank_rank"]),
        )
    t.caption = (
        f"precision of the removal {_fixed(o['precision'])} ({o['removed_defective']:,} of {o['removed']:,} removed pairs are defective; "
        f"{o['removed_clean']:,} clean pairs removed); resolved: the duplicate or its original is gone"
    )
    return t


def _explain(run: SelectRun, limit: int) -> list[Table]:
    """``--explain``: rows per (step, reason), then the first ``limit`` dropped rows."""
    sel = run.selection
    counts = Table(title="why rows were dropped", title_justify="left")
    for col, justify in (("step", "left"), ("reason", "left"), ("rows", "right")):
        counts.add_column(col, justify=justify)
    for step, reason, n in drop_reasons(sel).iter_rows():
        counts.add_row(step, reason, f"{n:,}")
    rows = Table(title=f"dropped rows (the first {limit}; all {sel.rows_in - sel.rows_kept:,} in {run.paths.dropped})", title_justify="left")
    shown = (C.PAIR_ID, C.STEP, C.REASON, C.SCORE, C.BANK_RANK, *([C.ITM_SCORE] if C.ITM_SCORE in sel.outcome.columns else []))
    for col in shown:
        rows.add_column(col)
    dropped = sel.outcome.filter(pl.col(C.STEP).is_not_null()).head(limit).select(shown)
    for pid, step, reason, *values in dropped.iter_rows():
        rows.add_row(str(pid), step, reason, *(_fixed(v) for v in values))
    return [counts, rows]


# --------------------------------------------------------------------------- tbps inspect


def _short(text: Any, n: int) -> str:
    """``text`` cut to ``n`` characters, the last one an ellipsis when cut."""
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _rows_table(frame: pl.DataFrame, title: str) -> Table:
    """Score, bank rank, source, caption and image file name of each row."""
    table = Table("score", "bank_rank", "source", "caption", "image", title=title)
    for row in frame.iter_rows(named=True):
        table.add_row(
            format_value(row[C.SCORE]), format_value(row[C.BANK_RANK]), format_value(row.get(C.SOURCE)),
            _short(row[C.CAPTION], 60), _short(Path(str(row[C.IMAGE_PATH])).name, 30),
        )
    return table


_BLOCKS = " ▏▎▍▌▋▊▉█"


def terminal_histogram(hist: Histogram, thresholds: Sequence[Threshold] = (), width: int = 32) -> str:
    """A histogram drawn with unicode block characters, one line per bin.

    Args:
        hist: the histogram.
        thresholds: each on this column is drawn as a ``◀ threshold`` mark on the bin that holds it.
        width: characters of the longest bar.

    Returns:
        The text, with a title line.
    """
    dropped = hist.dropped or [0] * len(hist.counts)
    totals = [k + d for k, d in zip(hist.counts, dropped)]
    top = max(totals) if totals else 0
    legend = " - █ kept, ░ dropped (+N)" if hist.dropped is not None else ""
    lines = [f"{hist.column} (ok rows){' - log2 bins' if hist.log else ''}{legend}"]
    marks = [th.value for th in thresholds if th.column == hist.column]
    for lo, hi, n, d in zip(hist.edges[:-1], hist.edges[1:], hist.counts, dropped):
        eighths = round(8 * width * n / top) if top else 0
        bar = "█" * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")
        # Dropped rows continue the bar in a light shade, whole characters only.
        bar += "░" * (round(width * (n + d) / top) - len(bar)) if d and top else ""
        label = f"[{format_value(float(lo))}, {format_value(float(hi))})"
        note = "  ◀ threshold" if any(lo <= m < hi for m in marks) else ""
        count = f"{n:,}" + (f" +{d:,}" if d else "")
        lines.append(f"{label:>22} {bar:<{width}} {count}{note}")
    return "\n".join(lines)


def inspect_report(report: TableReport | DropReport) -> list[RenderableType]:
    """What ``tbps inspect`` prints: counts, quantiles, histograms, extreme pairs, sources, drops.

    Args:
        report: the summary of :func:`tbps.curate.inspect.summarize`, or of
            :func:`tbps.curate.inspect.inspect_dropped` for a drop table.

    Returns:
        Rich tables and texts, in print order.
    """
    if isinstance(report, DropReport):
        return drop_report(report)
    parts: list[RenderableType] = []
    overview = Table(title=f"{report.kind}: {report.path}", show_header=False)
    overview.add_row("rows", f"{report.rows:,}")
    for status, n in report.status_counts.items():
        overview.add_row(f"status {status}", f"{n:,}")
    for th in report.thresholds:
        overview.add_row("selection", th.label)
    parts.append(overview)

    quant = Table("quantile", *report.quantiles, title="ok rows")
    for q in QUANTILES:
        quant.add_row(f"{q:g}", *(format_value(report.quantiles[c].get(q)) for c in report.quantiles))
    parts.append(quant)

    for hist in report.histograms:
        parts.append(Text(terminal_histogram(hist, report.thresholds), no_wrap=True, overflow="ignore"))

    for title, frame in (("highest scores", report.top), ("lowest scores", report.bottom)):
        parts.append(_rows_table(frame, f"{title} ({frame.height})"))

    src = Table(*report.sources.columns, title="per source")
    for row in report.sources.iter_rows():
        src.add_row(*(format_value(v) for v in row))
    parts.append(src)

    if report.dropped is not None:
        drops = Table("reason", "rows", "example caption", title="dropped by the selection")
        for reason, (count, sample) in report.dropped.items():
            example = sample.get_column(C.CAPTION)[0] if sample.height else ""
            drops.add_row(reason, f"{count:,}", _short(example, 70))
        parts.append(drops)
    return parts


def drop_report(report: DropReport) -> list[RenderableType]:
    """What ``tbps inspect X.dropped.parquet`` prints: rows per step and reason, then each group's rows.

    A duplicate's row shows its original beside it: the original's id, caption and what became of it.

    Args:
        report: the summary of :func:`tbps.curate.inspect.inspect_dropped`.

    Returns:
        Rich tables, in print order.
    """
    overview = Table(title=f"drop table: {report.path}", show_header=False)
    for key, value in (("dropped rows", f"{report.rows:,}"), ("shown", f"{report.shown_rows:,} ({report.filters or 'no filter'})"),
                       ("manifest", report.manifest or "-"), ("rows joined", report.provenance)):
        overview.add_row(key, value)
    steps = Table("step", "reason", "rows", title="dropped by step and reason")
    for row in report.by_step.iter_rows(named=True):
        steps.add_row(str(row[C.STEP]), str(row[C.REASON]), f"{row['rows']:,}")
    parts: list[RenderableType] = [overview, steps]
    for name, (count, sample) in report.groups.items():
        title = f"{name}: {count:,} rows (showing {sample.height}, highest scores first)"
        if ORIGINAL in sample.columns:
            table = Table("pair_id", "score", "caption", "original", "original caption", "original is", title=title)
            for row in sample.iter_rows(named=True):
                table.add_row(str(row[C.PAIR_ID]), format_value(row.get(C.SCORE)), _short(row.get(C.CAPTION), 40), str(row[ORIGINAL]),
                              _short(row.get(ORIGINAL_COLUMNS[C.CAPTION]), 40), str(row[ORIGINAL_FATE]))
        else:
            table = Table("pair_id", "score", "bank_rank", "caption", "image", title=title)
            for row in sample.iter_rows(named=True):
                image = Path(str(row[C.IMAGE_PATH])).name if row.get(C.IMAGE_PATH) else "-"
                table.add_row(str(row[C.PAIR_ID]), format_value(row.get(C.SCORE)), format_value(row.get(C.BANK_RANK)),
                              _short(row.get(C.CAPTION), 60), _short(image, 30))
        parts.append(table)
    return parts


# --------------------------------------------------------------------------- tbps train


def train_summary(result: TrainResult) -> Table:
    """The table ``tbps train`` prints: steps, pairs, time, trainable parameters, loss, the result checkpoint.

    Args:
        result: what :func:`tbps.train.loop.train` did.

    Returns:
        A rich table of (key, value) rows.
    """
    r = result
    best = f"step {r.best_step}: R@1 {r.best_metrics['R1']:.2f}, mAP {r.best_metrics['mAP']:.2f}" if r.best_step else "no --val: last step"
    table = Table(title=f"tbps train -> {r.run}", show_header=False)
    for key, value in [("steps", f"{r.steps:,}"), ("pairs seen", f"{r.pairs_seen:,}"), ("training time", f"{r.train_seconds:,.1f} s"),
                       ("trainable parameters", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)"),
                       ("final loss", f"{r.final_loss:.4f}"), ("result", f"{r.result_checkpoint} ({best})")] + [
                       (f"skipped {k}", f"{v:,}") for k, v in r.skipped.items()]:
        table.add_row(key, value)
    return table


# --------------------------------------------------------------------------- tbps eval, search


def metrics_table(records: list[dict[str, Any]], keys: Sequence[str], names: list[str] | None = None) -> Table:
    """Eval records side by side: one column per run, the best value of each metric in bold.

    Args:
        records: eval records (as :func:`tbps.eval.evaluate.run_eval` returns them or
            :func:`tbps.eval.evaluate.load_records` reads them).
        keys: the metrics shown, one row each, in order (``tbps.eval.metrics.METRIC_KEYS``).
        names: a column label per record (default: the model spec).

    Returns:
        A rich table; its caption warns when the runs evaluated different data. A record with
        ``reranked`` (``tbps eval --rerank K``) has two columns: ITC, then ITC + ITM re-ranked.
    """
    names = names or [str(r.get("model", {}).get("spec", "?")) for r in records]
    # A re-ranked record is two columns: its ITC metrics, then the same run re-ranked by ITM.
    expanded = []
    for name, r in zip(names, records):
        if isinstance(r.get("reranked"), dict) and isinstance(r["reranked"].get("metrics"), dict):
            expanded += [(f"{name} (ITC)", r), (f"{name} (ITM re-rank, top {r['reranked'].get('k', '?')})", {**r, "metrics": r["reranked"]["metrics"]})]
        else:
            expanded.append((name, r))
    names, records = [n for n, _ in expanded], [r for _, r in expanded]
    same = len({r.get("data_hash") for r in records}) == 1
    table = Table(
        title="text-to-image retrieval (%)",
        caption=None if same else "the runs evaluated DIFFERENT data (see data hash): not comparable",
    )
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")

    def data_label(r: dict) -> str:
        data = r.get("data", {})
        return f"{Path(str(data.get('path', '?'))).name}:{data.get('split') or 'all'}"

    table.add_row("model", *(str(r.get("model", {}).get("spec", "?")) for r in records))
    table.add_row("data", *(data_label(r) for r in records))
    table.add_row("data hash", *(str(r.get("data_hash", ""))[:12] for r in records), end_section=True)
    for key in keys:
        values = [r["metrics"][key] for r in records]
        best = max(values)
        # Bold marks the best run of each metric when there is more than one run.
        table.add_row(key, *(f"[bold]{v:.2f}[/]" if len(records) > 1 and v == best else f"{v:.2f}" for v in values))
    table.add_row("queries", *(f"{r['metrics']['queries']:,}" for r in records), end_section=False)
    table.add_row("  without match", *(f"{r['metrics'].get('queries_without_match', 0):,}" for r in records))
    table.add_row("gallery images", *(f"{r['metrics']['gallery']:,}" for r in records))
    return table


def search_results(result: SearchResult) -> list[Text]:
    """Per query: a title line, then ``rank  score  path`` lines (never wrapped: paths stay whole).

    Args:
        result: the matches of :func:`tbps.eval.search.run_search`.

    Returns:
        One rich text per query.
    """
    parts = []
    for query, found in zip(result.queries, result.matches):
        lines = [f"“{query}”"] + [f"{rank:>4}  {score:+.4f}  {path}" for rank, (path, score) in enumerate(found, 1)]
        parts.append(Text("\n".join(lines), no_wrap=True, overflow="ignore"))
    return parts


# --------------------------------------------------------------------------- tbps demo


def demo_tables(results: dict[str, Any]) -> list[RenderableType]:
    """What ``tbps demo`` prints: the results table (R@1 and mAP with their intervals), the gate and the claims.

    Args:
        results: the demo's results record (``results.json``; see :mod:`tbps.demo.report`).
            A missing value prints as "-".

    Returns:
        Rich renderables, in print order.
    """
    tones = {"good": "green", "bad": "red", "neutral": "yellow"}
    title = "tbps demo" + (" --quick" if results.get("quick") else "") + " - test split, mean [bootstrap interval]"
    table = Table(title=title, caption=QUICK_NOTE if results.get("quick") else None)
    table.add_column("arm", ratio=1, min_width=16)
    for name in ("R@1", "mAP", "trainable: % of all", "% of non-embedding", "seeds"):
        table.add_column(name, justify="right", no_wrap=True)
    rows = [r for r in results.get("table") or [] if isinstance(r, dict)]
    for i, row in enumerate(rows):
        cells = table_cells(row)
        last_of_stage = i + 1 < len(rows) and rows[i + 1].get("stage") != row.get("stage")
        table.add_row(cells["arm"], cells["R@1"], cells["mAP"], cells["% of all"], cells["% of non-embedding"], cells["seeds"],
                      end_section=last_of_stage)
    claims = Table(*CLAIMS_HEADER, title="the paper's claims, as measured here")
    for claim, paper, verdict, measured in claim_rows(results):
        claims.add_row(claim, paper, Text(verdict, style=tones[verdict_tone(verdict)]), measured)
    return [table, Text(gate_line(results), style=tones[gate_tone(results)]), claims]
