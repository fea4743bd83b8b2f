"""``tbps inspect``: what a score table or a manifest holds, in the terminal or as one HTML page.

Inputs (read lazily with ``pl.scan_parquet``; a table of millions of rows is summarised by
Polars aggregations, and only the few rows shown are collected):

* a score run directory ``DIR`` (``DIR/scores/part-*.parquet``), ``DIR/scores``, or one
  Parquet file with the score columns;
* a manifest ``X.parquet`` written by ``tbps select`` (the score columns of the kept rows).
  Its JSON sidecar ``X.json`` (when present) gives the selection's cuts (``resolved.min_score``
  and ``resolved.bank_rank.max_bank_rank``), drawn as thresholds on the histograms, and names
  the drop table ``X.dropped.parquet`` (``columns.DROP_SCHEMA``: pair id, score, bank rank,
  ``step`` and ``reason``), shown grouped by reason. The drop table holds no image or
  caption: they are looked up, for the few rows shown, in the score tables the sidecar lists
  as inputs (a row whose input has moved is shown without its picture). A manifest without its
  sidecar is inspected like a plain score table.

The summary: row and status counts, quantiles of ``score`` and ``bank_rank`` over the ``ok``
rows, histograms, the top-k and bottom-k pairs by score, a per-source breakdown and, for a
manifest, the dropped rows by reason. :func:`render_html` turns it into a self-contained page
(built from the primitives of :mod:`tbps.report.html`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.curate.layout import ScoreDir
from tbps.errors import TbpsError, UsageError
from tbps.report.html import contact_sheet, esc, grid_table, page, svg_histogram, write_html

# Columns a table must have to be inspected (score tables and manifests both have them).
REQUIRED = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.SCORE, C.BANK_RANK, C.STATUS)
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
BINS = 20  # bins of the score histogram, as the CLI's --bins
SHOWN = [C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SOURCE, C.SCORE, C.BANK_RANK, C.STATUS]


@dataclass
class InspectConfig:
    """Parameters of ``tbps inspect``; field names equal the CLI option names.

    Attributes:
        table: a score run directory, its ``scores/`` directory, a Parquet file, or a manifest.
        html: write the HTML report to this file; ``None`` for the terminal only.
        top: pairs shown at each end (top-k and bottom-k by score) and per drop reason.
        bins: histogram bins.
    """

    table: Path
    html: Path | None = None
    top: int = 10
    bins: int = BINS

    def __post_init__(self) -> None:
        self.table = Path(self.table)
        if self.html is not None:
            self.html = Path(self.html)
        if not 1 <= self.top <= 1000:
            raise UsageError("--top must be between 1 and 1000", field="top", value=self.top)
        if not 2 <= self.bins <= 200:
            raise UsageError("--bins must be between 2 and 200", field="bins", value=self.bins)


@dataclass
class Threshold:
    """A selection threshold to draw: ``column`` kept when ``<= value`` (``max``) or ``>= value`` (``min``)."""

    column: str
    value: float
    kind: str  # "max" or "min"
    label: str


@dataclass
class Histogram:
    """Counts per bin; ``edges`` has one more entry than ``counts``. ``log`` bins are powers of two.

    For a manifest, ``dropped`` counts the rows the selection dropped (with a value) in the
    same bins, so the kept and dropped distributions meet at the threshold.
    """

    column: str
    edges: list[float]
    counts: list[int]
    log: bool = False
    dropped: list[int] | None = None


@dataclass
class TableSource:
    """A table as found on disk: lazy rows, and for a manifest its sidecar and dropped rows."""

    path: Path
    rows: pl.LazyFrame
    kind: str  # "score table" or "manifest"
    sidecar: dict[str, Any] | None = None
    dropped: pl.LazyFrame | None = None
    inputs: pl.LazyFrame | None = None  # the selection's input score rows (images, captions)


@dataclass
class TableReport:
    """Everything ``tbps inspect`` shows (no I/O; see :func:`summarize`).

    Attributes:
        path, kind: what was inspected.
        rows: row count; ``status_counts``: rows per status.
        quantiles: ``{column: {q: value}}`` over the ok rows.
        histograms: score and bank-rank histograms of the ok rows.
        thresholds: the selection cuts from the manifest's sidecar (none for a score table).
        top, bottom: the highest / lowest scored ok rows.
        sources: per-source rows, ok rows, score and bank-rank statistics.
        dropped: for a manifest, ``{reason: (count, sample rows)}`` (``duplicate-of:<id>``
            reasons grouped as one); the samples are the highest-scored dropped rows, the
            borderline cases; ``None`` for a score table.
        sidecar: the manifest's sidecar as read.
    """

    path: str
    kind: str
    rows: int
    status_counts: dict[str, int]
    quantiles: dict[str, dict[float, float | None]]
    histograms: list[Histogram]
    thresholds: list[Threshold]
    top: pl.DataFrame
    bottom: pl.DataFrame
    sources: pl.DataFrame
    dropped: dict[str, tuple[int, pl.DataFrame]] | None = None
    sidecar: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok_rows(self) -> int:
        return self.status_counts.get(C.STATUS_OK, 0)


def format_value(value: Any) -> str:
    """A number as inspect shows it: ``-`` for none or NaN, 4 significant digits, whole numbers from 10 with separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --------------------------------------------------------------------------- reading


def _sidecar_for(path: Path) -> dict[str, Any] | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TbpsError(f"the manifest's sidecar is not readable JSON: {exc}", path=side) from None
    return data if isinstance(data, dict) else None


def _dropped_path(path: Path, sidecar: dict[str, Any] | None) -> Path | None:
    """The drop table of a manifest: as the sidecar names it (``outputs.dropped.path``), else ``X.dropped.parquet``."""
    named = None
    outputs = (sidecar or {}).get("outputs")
    dropped = outputs.get("dropped") if isinstance(outputs, dict) else None
    if isinstance(dropped, dict) and isinstance(dropped.get("path"), str):
        named = Path(dropped["path"])
        if not named.is_absolute():
            named = path.parent / named
    for candidate in (named, path.with_name(path.stem + ".dropped.parquet")):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _input_rows(sidecar: dict[str, Any] | None) -> pl.LazyFrame | None:
    """The score rows the selection read (the sidecar's ``inputs``), for images and captions of dropped rows."""
    frames = []
    for item in (sidecar or {}).get("inputs") or []:
        files = [Path(f["path"]) for f in item.get("files", []) if isinstance(f, dict) and "path" in f] if isinstance(item, dict) else []
        files = [f for f in files if f.is_file()]
        if files:
            frames.append(pl.scan_parquet(files).select(C.PAIR_ID, C.IMAGE_PATH, C.CAPTION))
    return pl.concat(frames, how="vertical_relaxed") if frames else None


def open_table(path: str | Path) -> TableSource:
    """Find and open (lazily) the table at ``path``, with a manifest's sidecar and dropped rows.

    Args:
        path: a score run directory, its ``scores/`` directory, a Parquet file or a manifest.

    Returns:
        A :class:`TableSource`.

    Raises:
        TbpsError: nothing readable there, or not a score table (the expected columns are named).
    """
    path = Path(path)
    if not path.exists():
        raise TbpsError("no such file or directory", path=path)
    sidecar = dropped = None
    run = ScoreDir(path)
    if path.is_dir():
        parts_dir = run.scores if run.scores.is_dir() else path
        files = sorted(f for f in parts_dir.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise TbpsError(
                "no Parquet files here", path=parts_dir, hint="give a score run directory (DIR/scores/part-*.parquet), a Parquet file or a manifest"
            )
        scan = pl.scan_parquet(files)
    else:
        if path.suffix.lower() not in (".parquet", ".pq"):
            raise TbpsError("not a Parquet file", path=path, hint="inspect reads score tables and manifests (.parquet)")
        scan = pl.scan_parquet(path)
        sidecar = _sidecar_for(path)
        dp = _dropped_path(path, sidecar)
        dropped = pl.scan_parquet(dp) if dp is not None else None
    try:
        schema = scan.collect_schema()
    except Exception as exc:  # noqa: BLE001 - polars raises several types for unreadable files
        raise TbpsError(f"cannot read as Parquet: {exc}", path=path) from None
    missing = [c for c in REQUIRED if c not in schema]
    if missing:
        raise TbpsError(
            "not a score table or manifest: columns missing",
            path=path,
            field=", ".join(missing),
            value=sorted(schema.names()),
            hint=f"expected the score columns {', '.join(REQUIRED)} (written by tbps score / tbps select)",
        )
    if dropped is not None:
        dschema = dropped.collect_schema()
        if C.REASON not in dschema or C.PAIR_ID not in dschema:
            dropped = None  # not the drop table layout: inspect the manifest without it
    kind = "manifest" if (sidecar is not None or dropped is not None) else "score table"
    if path.is_dir() and run.scores.is_dir() and not run.is_complete():
        kind += f" (run incomplete: no {run.record.name} yet)"  # a run still scoring can be inspected
    inputs = _input_rows(sidecar) if dropped is not None else None
    return TableSource(path=path, rows=scan, kind=kind, sidecar=sidecar, dropped=dropped, inputs=inputs)


def thresholds_from_sidecar(sidecar: dict[str, Any] | None) -> list[Threshold]:
    """The selection cuts a ``tbps select`` sidecar records, as thresholds to draw.

    Reads ``resolved.min_score`` (keep ``score >= value``) and ``resolved.bank_rank``
    (``{"max_bank_rank": k, "option": "--rule paper-pretrain"}``: keep ``bank_rank <= k``);
    falls back on ``config.min_score`` / ``config.max_bank_rank``.

    Args:
        sidecar: the parsed sidecar, or ``None``.

    Returns:
        The thresholds (empty when the sidecar records no cut).
    """
    if not isinstance(sidecar, dict):
        return []
    resolved = sidecar.get("resolved") if isinstance(sidecar.get("resolved"), dict) else {}
    config = sidecar.get("config") if isinstance(sidecar.get("config"), dict) else {}
    found = []
    min_score = resolved.get("min_score", config.get("min_score"))
    if _is_number(min_score):
        found.append(Threshold(C.SCORE, float(min_score), "min", f"--min-score: keep score >= {format_value(float(min_score))}"))
    bank = resolved.get("bank_rank")
    cut, option = (bank.get("max_bank_rank"), bank.get("option")) if isinstance(bank, dict) else (config.get("max_bank_rank"), "--max-bank-rank")
    if _is_number(cut):
        found.append(Threshold(C.BANK_RANK, float(cut), "max", f"{option or 'bank-rank'}: keep bank_rank <= {format_value(float(cut))}"))
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- summary


def _histogram(ok: pl.LazyFrame, column: str, bins: int, log: bool, dropped: pl.LazyFrame | None = None) -> Histogram:
    """Bin the column's non-null values (and, for a manifest, the dropped rows' in the same bins)."""
    frames = [ok] + ([dropped] if dropped is not None else [])
    values = [f.select(pl.col(column).drop_nulls().cast(pl.Float64)) for f in frames]
    ranges = [v.select(pl.col(column).min().alias("lo"), pl.col(column).max().alias("hi")).collect().row(0) for v in values]
    los = [r[0] for r in ranges if r[0] is not None]
    his = [r[1] for r in ranges if r[1] is not None]
    if not los:
        return Histogram(column, [0.0, 1.0], [0], log, [0] if dropped is not None else None)
    lo, hi = min(los), max(his)
    if log:
        # Ranks: bins [0,1), [1,2), [2,4), [4,8), ... so rank 0 and the paper's small thresholds stand out.
        top = max(int(hi) + 1, 1)
        edges = [0.0, 1.0] + [float(2**k) for k in range(1, max(1, math.ceil(math.log2(top))) + 1)]
        if edges[-1] <= hi:
            edges.append(edges[-1] * 2)
    else:
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    # Bin index per value (the last edge is inclusive), counted by Polars without collecting the rows.
    idx = (
        pl.col(column).map_batches(lambda s: _bin_index(s, edges), return_dtype=pl.Int64)
        if log
        else ((pl.col(column) - edges[0]) / (edges[-1] - edges[0]) * bins).floor().cast(pl.Int64).clip(0, bins - 1)
    )
    counts = []
    for v in values:
        per_bin = [0] * (len(edges) - 1)
        for b, n in v.select(idx.alias("bin")).group_by("bin").len().collect().iter_rows():
            per_bin[int(b)] = int(n)
        counts.append(per_bin)
    return Histogram(column, edges, counts[0], log, counts[1] if dropped is not None else None)


def _bin_index(s: pl.Series, edges: list[float]) -> pl.Series:
    idx = np.searchsorted(np.asarray(edges), s.to_numpy(), side="right") - 1
    return pl.Series(np.clip(idx, 0, len(edges) - 2).astype("int64"))


def summarize(source: TableSource, *, top: int = 10, bins: int = BINS) -> TableReport:
    """Summarise a score table or manifest (Polars aggregations over the lazy rows).

    Args:
        source: the table as opened by :func:`open_table`.
        top: rows at each end by score, and sample rows per drop reason.
        bins: bins of the score histogram (the bank-rank histogram uses powers of two).

    Returns:
        A :class:`TableReport`.

    Raises:
        TbpsError: the table has no rows.
    """
    lf = source.rows
    schema = lf.collect_schema()
    status_counts = dict(lf.group_by(C.STATUS).len().sort("len", descending=True).collect().iter_rows())
    rows = sum(status_counts.values())
    if rows == 0:
        raise TbpsError(
            "the table is empty: no rows to inspect", path=source.path, hint=f"expected score rows with {', '.join(REQUIRED)}"
        )
    ok = lf.filter((pl.col(C.STATUS) == C.STATUS_OK) & pl.col(C.SCORE).is_not_null())
    quantiles: dict[str, dict[float, float | None]] = {}
    for column in (C.SCORE, C.BANK_RANK):
        exprs = [pl.col(column).cast(pl.Float64).quantile(q, "linear").alias(str(q)) for q in QUANTILES]
        values = ok.select(exprs).collect().row(0)
        quantiles[column] = dict(zip(QUANTILES, values))
    drops = source.dropped
    histograms = [
        _histogram(ok, col, bins, log=log, dropped=drops if drops is not None and col in drops.collect_schema() else None)
        for col, log in ((C.SCORE, False), (C.BANK_RANK, True))
    ]
    shown = [c for c in SHOWN if c in schema]
    top_rows = ok.sort([C.SCORE, C.PAIR_ID], descending=[True, False]).head(top).select(shown).collect()
    bottom_rows = ok.sort([C.SCORE, C.PAIR_ID], descending=[False, False]).head(top).select(shown).collect()
    source_col = pl.col(C.SOURCE) if C.SOURCE in schema else pl.lit("(all)")
    is_ok = pl.col(C.STATUS) == C.STATUS_OK
    sources = (
        lf.with_columns(source_col.fill_null("(none)").alias(C.SOURCE))
        .group_by(C.SOURCE)
        .agg(
            pl.len().alias("rows"),
            is_ok.sum().alias("ok"),
            pl.col(C.SCORE).filter(is_ok).mean().alias("mean score"),
            pl.col(C.SCORE).filter(is_ok).median().alias("median score"),
            pl.col(C.BANK_RANK).filter(is_ok).median().alias("median bank_rank"),
        )
        .sort("rows", descending=True)
        .collect()
    )
    dropped = _dropped_groups(source, top) if source.dropped is not None else None
    return TableReport(
        path=str(source.path),
        kind=source.kind,
        rows=rows,
        status_counts={str(k): int(v) for k, v in status_counts.items()},
        quantiles=quantiles,
        histograms=histograms,
        thresholds=thresholds_from_sidecar(source.sidecar),
        top=top_rows,
        bottom=bottom_rows,
        sources=sources,
        dropped=dropped,
        sidecar=source.sidecar,
    )


def _dropped_groups(source: TableSource, top: int) -> dict[str, tuple[int, pl.DataFrame]]:
    """Dropped rows per reason: the count and the ``top`` highest-scored rows, with image and caption."""
    # duplicate-of:<pair_id> names each original: one group for all of them.
    reason = pl.col(C.REASON).str.replace(r"^duplicate-of:.*", "duplicate-of:<pair_id>").alias("group")
    drops = source.dropped.with_columns(reason)
    counts = drops.group_by("group").len().sort(["len", "group"], descending=[True, False]).collect()
    dschema = drops.collect_schema()
    groups = {}
    for group, n in counts.iter_rows():
        sample = drops.filter(pl.col("group") == group)
        if C.SCORE in dschema:
            # Borderline cases first: the best-scored rows the selection still dropped.
            sample = sample.sort([C.SCORE, C.PAIR_ID], descending=[True, False], nulls_last=True)
        sample = sample.head(top).collect()
        if source.inputs is not None and C.IMAGE_PATH not in sample.columns:
            found = source.inputs.filter(pl.col(C.PAIR_ID).is_in(sample.get_column(C.PAIR_ID).to_list())).unique(C.PAIR_ID).collect()
            sample = sample.join(found, on=C.PAIR_ID, how="left", maintain_order="left")
        for col in (C.IMAGE_PATH, C.CAPTION):
            if col not in sample.columns:
                sample = sample.with_columns(pl.lit(None, dtype=pl.String).alias(col))
        groups[str(group)] = (int(n), sample)
    return groups


# --------------------------------------------------------------------------- page


def render_html(report: TableReport) -> str:
    """The ``tbps inspect --html`` page of a :class:`TableReport`.

    Args:
        report: the summary to show.

    Returns:
        The HTML document as text.
    """
    sections = []
    overview = [("rows", report.rows)] + [(f"status {k}", v) for k, v in report.status_counts.items()]
    overview += [("selection", th.label) for th in report.thresholds]
    sections.append("<h2>Overview</h2>" + grid_table(["", "value"], overview))
    cols = list(report.quantiles)
    sections.append(
        "<h3>Quantiles (ok rows)</h3>"
        + grid_table(["quantile", *cols], [[f"{q:g}", *(report.quantiles[c].get(q) for c in cols)] for q in QUANTILES])
    )
    charts = "".join(svg_histogram(h, report.thresholds) for h in report.histograms)
    sections.append(f'<h2>Histograms</h2><div class="charts">{charts}</div>')
    sections.append(
        f"<h2>Lowest scored pairs ({report.bottom.height})</h2>"
        "<p>The pairs the model finds least consistent: candidates for removal.</p>"
        + contact_sheet(report.bottom.to_dicts())
    )
    sections.append(f"<h2>Highest scored pairs ({report.top.height})</h2>" + contact_sheet(report.top.to_dicts()))
    src = report.sources
    sections.append("<h2>Per source</h2>" + grid_table(src.columns, src.iter_rows()))
    if report.dropped is not None:
        total = sum(n for n, _ in report.dropped.values())
        drops = [f"<h2>Dropped by the selection ({total:,} rows)</h2>"]
        drops.append(grid_table(["reason", "rows"], [(r, n) for r, (n, _) in report.dropped.items()]))
        for reason, (n, sample) in report.dropped.items():
            drops.append(
                f"<h3>{esc(reason)}: {n:,} rows (showing {sample.height}, highest scores first)</h3>"
                + contact_sheet(sample.to_dicts(), fields=(C.SCORE, C.BANK_RANK, C.REASON))
            )
        sections.append("".join(drops))
    subtitle = f"{report.kind} · {report.rows:,} rows · {report.ok_rows:,} ok"
    return page(f"tbps inspect: {Path(report.path).name}", f"{report.path} · {subtitle}", "".join(sections))


def run_inspect(config: InspectConfig) -> TableReport:
    """Open, summarise and (with ``config.html``) write the HTML report of a table.

    Args:
        config: the resolved :class:`InspectConfig`.

    Returns:
        The :class:`TableReport` (the CLI prints it with :func:`tbps.terminal.inspect_report`).

    Raises:
        TbpsError: not a score table or manifest, or an empty one.
    """
    report = summarize(open_table(config.table), top=config.top, bins=config.bins)
    if config.html is not None:
        write_html(config.html, render_html(report))
    return report
