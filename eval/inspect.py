"""``tbps inspect``: what a score table or a manifest holds, in the terminal or as one HTML page.

Inputs (read lazily with ``pl.scan_parquet``; a table of millions of rows is summarised by
Polars aggregations, and only the few rows shown are collected):

* a score run directory ``DIR`` (``DIR/scores/part-*.parquet``), ``DIR/scores``, or one
  Parquet file with the score columns;
* a manifest ``X.parquet`` written by ``tbps select`` (the score columns of the kept rows).
  Its JSON sidecar ``X.json`` (when present) gives the selection threshold, drawn on the
  histograms, and names the table of dropped rows (a ``reason`` column), shown grouped by
  reason. A manifest without its sidecar is inspected like a plain score table.

The summary: row and status counts, quantiles of ``score`` and ``bank_rank`` over the ``ok``
rows, histograms, the top-k and bottom-k pairs by score, a per-source breakdown and, for a
manifest, the dropped rows by reason. :func:`tbps.eval.report.render_html` turns it into a
self-contained page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from tbps import columns as C
from tbps.errors import TbpsError, UsageError

# Columns a table must have to be inspected (score tables and manifests both have them).
REQUIRED = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.SCORE, C.BANK_RANK, C.STATUS)
REASON = "reason"  # the reason column of the dropped-rows table written by ``tbps select``
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
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
    bins: int = 30

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
    """Counts per bin; ``edges`` has one more entry than ``counts``. ``log`` bins are powers of two."""

    column: str
    edges: list[float]
    counts: list[int]
    log: bool = False


@dataclass
class TableSource:
    """A table as found on disk: lazy rows, and for a manifest its sidecar and dropped rows."""

    path: Path
    rows: pl.LazyFrame
    kind: str  # "score table" or "manifest"
    sidecar: dict[str, Any] | None = None
    dropped: pl.LazyFrame | None = None


@dataclass
class TableReport:
    """Everything ``tbps inspect`` shows (no I/O; see :func:`summarize`).

    Attributes:
        path, kind: what was inspected.
        rows: row count; ``status_counts``: rows per status.
        quantiles: ``{column: {q: value}}`` over the ok rows.
        histograms: score and bank-rank histograms of the ok rows.
        threshold: the selection threshold from the manifest's sidecar, or ``None``.
        top, bottom: the highest / lowest scored ok rows.
        sources: per-source rows, ok rows, score and bank-rank statistics.
        dropped: for a manifest, ``{reason: (count, sample rows)}``; ``None`` otherwise.
        sidecar: the manifest's sidecar as read.
    """

    path: str
    kind: str
    rows: int
    status_counts: dict[str, int]
    quantiles: dict[str, dict[float, float | None]]
    histograms: list[Histogram]
    threshold: Threshold | None
    top: pl.DataFrame
    bottom: pl.DataFrame
    sources: pl.DataFrame
    dropped: dict[str, tuple[int, pl.DataFrame]] | None = None
    sidecar: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok_rows(self) -> int:
        return self.status_counts.get(C.STATUS_OK, 0)

    def renderables(self) -> list:
        """Rich renderables for the terminal: counts, quantiles, histograms, extremes, sources."""
        from rich.table import Table
        from rich.text import Text

        parts: list = []
        overview = Table(title=f"{self.kind}: {self.path}", show_header=False)
        overview.add_row("rows", f"{self.rows:,}")
        for status, n in self.status_counts.items():
            overview.add_row(f"status {status}", f"{n:,}")
        if self.threshold is not None:
            overview.add_row("selection", self.threshold.label)
        parts.append(overview)

        quant = Table("quantile", *self.quantiles, title="ok rows")
        for q in QUANTILES:
            quant.add_row(f"{q:g}", *(_fmt(self.quantiles[c].get(q)) for c in self.quantiles))
        parts.append(quant)

        for hist in self.histograms:
            parts.append(Text(terminal_histogram(hist, self.threshold), no_wrap=True))

        for title, frame in (("highest scores", self.top), ("lowest scores", self.bottom)):
            parts.append(_rows_table(frame, f"{title} ({frame.height})"))

        src = Table(*self.sources.columns, title="per source")
        for row in self.sources.iter_rows():
            src.add_row(*(_fmt(v) for v in row))
        parts.append(src)

        if self.dropped is not None:
            drops = Table("reason", "rows", "example caption", title="dropped by the selection")
            for reason, (count, sample) in self.dropped.items():
                example = sample.get_column(C.CAPTION)[0] if sample.height else ""
                drops.add_row(reason, f"{count:,}", _short(example, 70))
            parts.append(drops)
        return parts


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _short(text: Any, n: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _rows_table(frame: pl.DataFrame, title: str):
    from rich.table import Table

    table = Table("score", "bank_rank", "source", "caption", "image", title=title)
    for row in frame.iter_rows(named=True):
        table.add_row(
            _fmt(row[C.SCORE]), _fmt(row[C.BANK_RANK]), _fmt(row.get(C.SOURCE)),
            _short(row[C.CAPTION], 60), _short(Path(str(row[C.IMAGE_PATH])).name, 30),
        )
    return table


_BLOCKS = " ▏▎▍▌▋▊▉█"


def terminal_histogram(hist: Histogram, threshold: Threshold | None = None, width: int = 40) -> str:
    """A histogram drawn with unicode block characters, one line per bin.

    Args:
        hist: the histogram.
        threshold: drawn as a ``◀ threshold`` mark on the bin that holds it, when it is this column's.
        width: characters of the longest bar.

    Returns:
        The text, with a title line.
    """
    top = max(hist.counts) if hist.counts else 0
    lines = [f"{hist.column} (ok rows){' - log2 bins' if hist.log else ''}"]
    mark = threshold.value if threshold is not None and threshold.column == hist.column else None
    for lo, hi, n in zip(hist.edges[:-1], hist.edges[1:], hist.counts):
        eighths = round(8 * width * n / top) if top else 0
        bar = "█" * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")
        label = f"[{_fmt(float(lo))}, {_fmt(float(hi))})"
        note = "  ◀ threshold" if mark is not None and lo <= mark < hi else ""
        lines.append(f"{label:>22} {bar:<{width}} {n:,}{note}")
    return "\n".join(lines)


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
    """The dropped-rows table of a manifest: named by its sidecar, else ``X.dropped.parquet``."""
    named = None
    if sidecar:
        for key in ("dropped", "dropped_path", "drops"):
            value = sidecar.get(key)
            if isinstance(value, dict):
                value = value.get("path")
            if isinstance(value, str):
                named = Path(value) if Path(value).is_absolute() else path.parent / value
                break
    for candidate in (named, path.with_name(path.stem + ".dropped.parquet"), path.with_name(path.stem + "-dropped.parquet")):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def open_table(path: str | Path) -> TableSource:
    """Find and open (lazily) the table at ``path``, with a manifest's sidecar and dropped rows.

    Args:
        path: a score run directory, its ``scores/`` directory, a Parquet file or a manifest.

    Returns:
        A :class:`TableSource`.

    Raises:
        TbpsError: nothing readable there, not a score table (the expected columns are named), or no rows.
    """
    path = Path(path)
    if not path.exists():
        raise TbpsError("no such file or directory", path=path)
    sidecar = dropped = None
    if path.is_dir():
        parts_dir = path / "scores" if (path / "scores").is_dir() else path
        files = sorted(parts_dir.glob("*.parquet"))
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
        if REASON not in dschema or C.CAPTION not in dschema:
            dropped = None  # not the drop table layout: inspect the manifest without it
    kind = "manifest" if (sidecar is not None or dropped is not None) else "score table"
    return TableSource(path=path, rows=scan, kind=kind, sidecar=sidecar, dropped=dropped)


def threshold_from_sidecar(sidecar: dict[str, Any] | None) -> Threshold | None:
    """The selection threshold of a manifest's sidecar, if it states one.

    Understands ``{"threshold": {"column": "bank_rank", "max": 48}}`` (or ``"min"``, or
    ``"value"`` with ``"kind"``), ``{"max_bank_rank": 48}`` and ``{"min_score": 0.3}``, at the
    top level or under ``"rule"`` / ``"config"``.

    Args:
        sidecar: the parsed sidecar, or ``None``.

    Returns:
        A :class:`Threshold`, or ``None`` when the sidecar gives none.
    """
    if not sidecar:
        return None
    scopes = [sidecar] + [sidecar[k] for k in ("rule", "config", "selection") if isinstance(sidecar.get(k), dict)]
    for scope in scopes:
        th = scope.get("threshold")
        if isinstance(th, dict) and th.get("column") in (C.SCORE, C.BANK_RANK):
            for kind in ("max", "min"):
                if isinstance(th.get(kind), (int, float)):
                    return Threshold(th["column"], float(th[kind]), kind, _rule_label(scope, th["column"], kind, th[kind]))
            if isinstance(th.get("value"), (int, float)) and th.get("kind") in ("max", "min"):
                return Threshold(th["column"], float(th["value"]), th["kind"], _rule_label(scope, th["column"], th["kind"], th["value"]))
        for key, column, kind in (("max_bank_rank", C.BANK_RANK, "max"), ("min_score", C.SCORE, "min")):
            if isinstance(scope.get(key), (int, float)) and not isinstance(scope.get(key), bool):
                return Threshold(column, float(scope[key]), kind, _rule_label(scope, column, kind, scope[key]))
    return None


def _rule_label(scope: dict, column: str, kind: str, value: Any) -> str:
    name = scope.get("rule") if isinstance(scope.get("rule"), str) else scope.get("name")
    text = f"keep {column} {'<=' if kind == 'max' else '>='} {_fmt(float(value))}"
    return f"{name}: {text}" if isinstance(name, str) else text


# --------------------------------------------------------------------------- summary


def _histogram(ok: pl.LazyFrame, column: str, bins: int, log: bool) -> Histogram:
    values = ok.select(pl.col(column).drop_nulls().cast(pl.Float64))
    lo, hi = values.select(pl.col(column).min().alias("lo"), pl.col(column).max().alias("hi")).collect().row(0)
    if lo is None:
        return Histogram(column, [0.0, 1.0], [0], log)
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
    counted = values.select(idx.alias("bin")).group_by("bin").len().collect()
    counts = [0] * (len(edges) - 1)
    for b, n in counted.iter_rows():
        counts[int(b)] = int(n)
    return Histogram(column, edges, counts, log)


def _bin_index(s: pl.Series, edges: list[float]) -> pl.Series:
    import numpy as np

    idx = np.searchsorted(np.asarray(edges), s.to_numpy(), side="right") - 1
    return pl.Series(np.clip(idx, 0, len(edges) - 2).astype("int64"))


def summarize(source: TableSource, *, top: int = 10, bins: int = 30) -> TableReport:
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
    histograms = [_histogram(ok, C.SCORE, bins, log=False), _histogram(ok, C.BANK_RANK, bins, log=True)]
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
    dropped = None
    if source.dropped is not None:
        dropped = {}
        counts = source.dropped.group_by(REASON).len().sort("len", descending=True).collect()
        dschema = source.dropped.collect_schema()
        dshown = [c for c in SHOWN if c in dschema] + [REASON]
        for reason, n in counts.iter_rows():
            # A few examples per reason, lowest score first, for the contact sheet.
            sample = source.dropped.filter(pl.col(REASON) == reason)
            if C.SCORE in dschema:
                sample = sample.sort(C.SCORE, nulls_last=True)
            dropped[str(reason)] = (int(n), sample.head(top).select(dshown).collect())
    return TableReport(
        path=str(source.path),
        kind=source.kind,
        rows=rows,
        status_counts={str(k): int(v) for k, v in status_counts.items()},
        quantiles=quantiles,
        histograms=histograms,
        threshold=threshold_from_sidecar(source.sidecar),
        top=top_rows,
        bottom=bottom_rows,
        sources=sources,
        dropped=dropped,
        sidecar=source.sidecar,
    )


def run_inspect(config: InspectConfig) -> TableReport:
    """Open, summarise and (with ``config.html``) write the HTML report of a table.

    Args:
        config: the resolved :class:`InspectConfig`.

    Returns:
        The :class:`TableReport` (the CLI prints its renderables).

    Raises:
        TbpsError: not a score table or manifest, or an empty one.
    """
    report = summarize(open_table(config.table), top=config.top, bins=config.bins)
    if config.html is not None:
        from tbps.eval.report import render_html, write_html

        write_html(config.html, render_html(report))
    return report
