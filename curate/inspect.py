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
* a drop table ``X.dropped.parquet`` itself (:func:`inspect_dropped`): the dropped rows by step
  and reason, joined back to their scores, captions and images through the manifest's
  provenance (the sidecar ``X.json`` and the score tables it names), each ``duplicate-of:<id>``
  row paired with its original and what became of it (kept, or dropped later and why).
  ``--reason`` (a reason, or ``duplicate-of`` for every duplicate) and ``--step`` filter it; on
  a manifest they filter its dropped rows.

Images (HTML only) are resolved through the readers' resolver (:class:`tbps.data.paths.ImageResolver`)
inside an image root and opened with :func:`tbps.data.images.open_image` checking that root when
the file is opened: the root is ``--image-root``, else the one the score run recorded (its
``params.json``: the reader's ``image_root``, or the format's default next to the dataset) for
every score run the table comes from. A path outside the root (``/etc/hostname``, another photo,
``/dev/zero``) is never opened; its card says why. A table whose score run is not found shows no
pictures until ``--image-root`` is given.

The summary: row and status counts, quantiles of ``score`` and ``bank_rank`` over the ``ok``
rows, histograms, the top-k and bottom-k pairs by score, a per-source breakdown and, for a
manifest, the dropped rows by reason, and the failed rows (status not ok) with their error (the
first :data:`FAILED_SHOWN`, the rest counted). :func:`render_html` turns it into a self-contained
page (built from the primitives of :mod:`tbps.report.html`): the histograms carry every cut the
sidecar records (``--min-score``, the bank-rank rule, and the cut ``--keep`` / ``--budget``
amounted to), and a manifest selected with ``--truth`` shows the sidecar's truth metrics and a
score histogram per defect kind (the truth file read again from the path select recorded).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.curate.layout import PARAMS_FILE, ScoreDir, score_run_of
from tbps.curate.select import REASON_DUPLICATE, SPLIT_STEP
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError, UsageError
from tbps.report.html import contact_sheet, esc, grid_table, page, pair_sheet, svg_bar_chart, svg_histogram, write_html

# Columns a table must have to be inspected (score tables and manifests both have them).
REQUIRED = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.SCORE, C.BANK_RANK, C.STATUS)
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
BINS = 20  # bins of the score histogram, as the CLI's --bins
SHOWN = [C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SOURCE, C.SCORE, C.BANK_RANK, C.STATUS]
DROP_COLUMNS = (C.PAIR_ID, C.STEP, C.REASON)  # what makes a Parquet file a drop table
DROPPED_SUFFIX = ".dropped.parquet"
# Report columns (in memory, never written) of a duplicate's original.
ORIGINAL = "original"  # the original's pair id
ORIGINAL_FATE = "original_fate"  # "kept", "dropped later: <reason> (<step>)", or "not found" (in neither table)
ORIGINAL_COLUMNS = {C.IMAGE_PATH: "original_image_path", C.CAPTION: "original_caption", C.SCORE: "original_score"}
FAILED_SHOWN = 200  # failed rows listed on the HTML page; the others are counted
FAILED_COLUMNS = (C.PAIR_ID, C.STATUS, C.ERROR, C.IMAGE_PATH, C.CAPTION)


@dataclass
class InspectConfig:
    """Parameters of ``tbps inspect``; field names equal the CLI option names.

    Attributes:
        table: a score run directory, its ``scores/`` directory, a Parquet file, a manifest or
            a drop table.
        html: write the HTML report to this file; ``None`` for the terminal only.
        top: pairs shown at each end (top-k and bottom-k by score) and per drop reason.
        bins: histogram bins.
        image_root: the directory the table's images must lie in (HTML pictures); ``None``:
            the root the score run recorded.
        reason: show only dropped rows with this reason (``duplicate-of`` for every duplicate).
        step: show only dropped rows of this selection step.
    """

    table: Path
    html: Path | None = None
    top: int = 10
    bins: int = BINS
    image_root: Path | None = None
    reason: str | None = None
    step: str | None = None

    def __post_init__(self) -> None:
        self.table = Path(self.table)
        if self.html is not None:
            self.html = Path(self.html)
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
            if not self.image_root.is_dir():
                raise TbpsError("the image root is not a directory", path=self.image_root, field="--image-root")
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
class TruthView:
    """What ``tbps select --truth`` measured (the manifest's sidecar ``truth``) and the scores of each defect kind.

    Attributes:
        metrics: the sidecar's ``truth`` as recorded (:func:`tbps.curate.truth.truth_metrics`).
        path: the truth file the selection read (the sidecar's ``config.truth``).
        histograms: the score histogram of each defect kind (``none``: the clean pairs), kept and
            dropped rows stacked, in the bins of the manifest's score histogram; empty when the
            truth file is gone.
        note: why there are no histograms, or ``None``.
    """

    metrics: dict[str, Any]
    path: str | None
    histograms: list[Histogram] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # the defect kind of each histogram
    note: str | None = None


class ImageRoots:
    """Where a table's images may be opened from: ``--image-root``, or the roots its score runs recorded.

    Found on first use (:meth:`get`), so the terminal report never reads a dataset to learn its root.

    Args:
        explicit: ``--image-root``, or ``None``.
        runs: the score run directories the table's rows come from.
    """

    def __init__(self, explicit: Path | None, runs: list[ScoreDir]) -> None:
        self.explicit, self.runs = explicit, runs
        self._found: tuple[list[str], str] | None = None

    def get(self) -> tuple[list[str], str]:
        """(the roots, where they came from); no roots when none is known."""
        if self._found is None:
            if self.explicit is not None:
                self._found = [os.path.realpath(self.explicit)], "--image-root"
            else:
                roots = list(dict.fromkeys(r for r in (run.image_root() for run in self.runs) if r is not None))
                self._found = roots, (f"recorded by the score run ({PARAMS_FILE})" if roots else "none known (pass --image-root to show pictures)")
        return self._found


@dataclass
class TableSource:
    """A table as found on disk: lazy rows, and for a manifest its sidecar and dropped rows."""

    path: Path
    rows: pl.LazyFrame
    kind: str  # "score table", "manifest" or "drop table"
    sidecar: dict[str, Any] | None = None
    dropped: pl.LazyFrame | None = None
    inputs: pl.LazyFrame | None = None  # the selection's input score rows (images, captions)
    roots: ImageRoots = field(default_factory=lambda: ImageRoots(None, []))
    kept: pl.LazyFrame | None = None  # for a drop table: its manifest's rows (what became of an original)


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
        failed_rows: rows whose status is not ``ok`` (for a manifest: its dropped ones too);
            ``failed``: the first :data:`FAILED_SHOWN` of them with their status and error.
        truth: for a manifest selected with ``--truth``, what was measured (:class:`TruthView`).
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
    roots: ImageRoots = field(default_factory=lambda: ImageRoots(None, []), repr=False)
    failed_rows: int = 0
    failed: pl.DataFrame | None = None
    truth: TruthView | None = None

    @property
    def ok_rows(self) -> int:
        return self.status_counts.get(C.STATUS_OK, 0)


@dataclass
class DropReport:
    """What ``tbps inspect X.dropped.parquet`` shows (see :func:`inspect_dropped`).

    Attributes:
        path: the drop table; ``manifest``: its manifest (``None`` when not found).
        rows: dropped rows in the table; ``shown_rows``: rows left by ``--reason`` / ``--step``.
        filters: the filters given, as text (empty when none).
        by_step: ``step``, ``reason`` (``duplicate-of:<pair_id>`` grouped as one) and ``rows``, most first.
        groups: ``{"step: reason": (count, sample rows)}`` (``reason`` alone where the step has its
            name) after the filters; the samples are the
            highest-scored rows with image path, caption and person id from the score tables, and
            for duplicates the original's id, image path, caption, score and fate.
        joined: whether the provenance led to the score tables (else no captions or pictures).
        provenance: where the rows were joined from, in words.
    """

    path: str
    manifest: str | None
    rows: int
    shown_rows: int
    filters: str
    by_step: pl.DataFrame
    groups: dict[str, tuple[int, pl.DataFrame]]
    joined: bool
    provenance: str
    roots: ImageRoots = field(default_factory=lambda: ImageRoots(None, []), repr=False)


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


_JOINED = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SCORE, C.BANK_RANK, C.ERROR)  # looked up for dropped rows


def _input_items(sidecar: dict[str, Any] | None) -> list[dict[str, Any]]:
    items = (sidecar or {}).get("inputs")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _input_rows(sidecar: dict[str, Any] | None) -> pl.LazyFrame | None:
    """The score rows the selection read (the sidecar's ``inputs``), for images and captions of dropped rows."""
    frames = []
    for item in _input_items(sidecar):
        files = [Path(f["path"]) for f in item.get("files", []) if isinstance(f, dict) and isinstance(f.get("path"), str)]
        files = [f for f in files if f.is_file()]
        if files:
            scan = pl.scan_parquet(files)
            try:
                names = scan.collect_schema().names()
            except Exception:  # noqa: BLE001 - an input replaced by something unreadable: shown without it
                continue
            frames.append(scan.select([c for c in _JOINED if c in names]))
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def _input_runs(sidecar: dict[str, Any] | None) -> list[ScoreDir]:
    """The score runs of the selection's inputs (where their image roots are recorded)."""
    runs = [score_run_of(item["path"]) for item in _input_items(sidecar) if isinstance(item.get("path"), str)]
    return [r for r in runs if r is not None]


def _is_drop_table(schema: pl.Schema) -> bool:
    return all(c in schema for c in DROP_COLUMNS) and C.IMAGE_PATH not in schema


def open_table(path: str | Path, image_root: Path | None = None) -> TableSource:
    """Find and open (lazily) the table at ``path``, with a manifest's sidecar and dropped rows.

    Args:
        path: a score run directory, its ``scores/`` directory, a Parquet file, a manifest or
            a drop table (``X.dropped.parquet``).
        image_root: the directory the table's images must lie in; ``None``: the root its score
            runs recorded.

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
    if path.is_file() and _is_drop_table(schema):
        return _open_drop_table(path, scan, image_root)
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
    runs = _input_runs(sidecar) if sidecar is not None else [r for r in [score_run_of(path.resolve())] if r is not None]
    kept = scan.select(C.PAIR_ID) if dropped is not None else None
    return TableSource(path=path, rows=scan, kind=kind, sidecar=sidecar, dropped=dropped, inputs=inputs,
                       roots=ImageRoots(image_root, runs), kept=kept)


def _open_drop_table(path: Path, scan: pl.LazyFrame, image_root: Path | None) -> TableSource:
    """A drop table with what its manifest's provenance leads to: the sidecar, the input score rows, the kept rows."""
    stem = path.name[: -len(DROPPED_SUFFIX)] if path.name.endswith(DROPPED_SUFFIX) else path.stem
    manifest = path.with_name(stem + ".parquet")
    sidecar = _sidecar_for(manifest)
    kept = None
    if manifest.is_file():
        try:
            kept = pl.scan_parquet(manifest)
            kept = kept.select(C.PAIR_ID) if C.PAIR_ID in kept.collect_schema() else None
        except Exception:  # noqa: BLE001 - an unreadable manifest: fates are not known, the drops still show
            kept = None
    return TableSource(
        path=path, rows=scan, kind="drop table", sidecar=sidecar, dropped=scan, inputs=_input_rows(sidecar),
        roots=ImageRoots(image_root, _input_runs(sidecar)), kept=kept,
    )


def thresholds_from_sidecar(sidecar: dict[str, Any] | None) -> list[Threshold]:
    """The selection cuts a ``tbps select`` sidecar records, as thresholds to draw.

    Reads ``resolved.min_score`` (keep ``score >= value``) and ``resolved.bank_rank``
    (``{"max_bank_rank": k, "option": "--rule paper-pretrain"}``: keep ``bank_rank <= k``),
    falling back on ``config.min_score`` / ``config.max_bank_rank``; and the cut ``--keep F`` /
    ``--budget N`` amounted to, ``resolved.budget`` (``{"by": "score", "score_cutoff": v, ...}``:
    the last kept row's value of the ``--by`` column, kept ``>= v``, or ``<= v`` for ``bank_rank``).

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
    budget = resolved.get("budget")
    if isinstance(budget, dict) and isinstance(budget.get("by"), str):
        by = budget["by"]
        cutoff = budget.get(f"{by}_cutoff")
        if _is_number(cutoff):
            kind, sign = ("max", "<=") if by == C.BANK_RANK else ("min", ">=")
            size = f"--keep {budget['keep']:g}" if _is_number(budget.get("keep")) else f"--budget {budget.get('budget')}"
            kept = f" ({budget['rows_kept']:,} rows)" if isinstance(budget.get("rows_kept"), int) else ""
            found.append(Threshold(by, float(cutoff), kind, f"{size}{kept}: {by} {sign} {format_value(float(cutoff))}"))
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


def summarize(source: TableSource, *, top: int = 10, bins: int = BINS, reason: str | None = None, step: str | None = None) -> TableReport:
    """Summarise a score table or manifest (Polars aggregations over the lazy rows).

    Args:
        source: the table as opened by :func:`open_table`.
        top: rows at each end by score, and sample rows per drop reason.
        bins: bins of the score histogram (the bank-rank histogram uses powers of two).
        reason, step: show only the manifest's dropped rows with this reason / of this step.

    Returns:
        A :class:`TableReport`.

    Raises:
        TbpsError: the table has no rows, or a filter matches no dropped row.
        UsageError: a filter on a table without dropped rows, or a drop table (see :func:`inspect_dropped`).
    """
    if source.kind == "drop table":
        raise UsageError("a drop table is summarised by inspect_dropped, not summarize", value=str(source.path))
    if (reason is not None or step is not None) and source.dropped is None:
        raise UsageError("--reason and --step filter dropped rows: give a manifest (with its X.dropped.parquet) or a drop table",
                         value=str(source.path))
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
    dropped = None
    if source.dropped is not None:
        drops = _filtered(source.dropped, reason, step, source.path)
        dropped = _drop_groups(drops, source, top, by_step=False)
    failed_rows, failed = _failed_rows(source)
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
        roots=source.roots,
        failed_rows=failed_rows,
        failed=failed,
        truth=_truth_view(source, histograms[0]),
    )


def _failed_rows(source: TableSource) -> tuple[int, pl.DataFrame]:
    """Rows whose status is not ``ok`` (the table's and, for a manifest, the dropped ones): their count and the first :data:`FAILED_SHOWN`.

    A dropped row gets its image path and error from the selection's input score rows (:func:`_joined`).
    """
    not_ok = pl.col(C.STATUS).is_not_null() & (pl.col(C.STATUS) != C.STATUS_OK)
    schema = source.rows.collect_schema()
    frames = [source.rows.filter(not_ok).select([c for c in FAILED_COLUMNS if c in schema])]
    if source.dropped is not None and C.STATUS in source.dropped.collect_schema():
        frames.append(source.dropped.filter(not_ok).select(C.PAIR_ID, C.STATUS))
    total, shown = 0, []
    for frame in frames:
        n = int(frame.select(pl.len()).collect().item())
        total += n
        if n and len(shown) < FAILED_SHOWN:
            sample = _joined(frame.head(FAILED_SHOWN).collect(), source)
            shown.append(sample.with_columns([pl.lit(None, dtype=pl.String).alias(c) for c in FAILED_COLUMNS if c not in sample.columns]))
    if not shown:
        return total, pl.DataFrame(schema={c: pl.String for c in FAILED_COLUMNS})
    rows = pl.concat([f.select(FAILED_COLUMNS).cast(pl.String) for f in shown]).head(FAILED_SHOWN)
    return total, rows


def _truth_file(recorded: Any, manifest: Path) -> Path | None:
    """The truth file a selection read: as recorded (relative to where select ran), else beside the manifest."""
    if not isinstance(recorded, str) or not recorded:
        return None
    path = Path(recorded)
    for candidate in (path, manifest.parent / path, manifest.parent / path.name):
        if candidate.is_file():
            return candidate
    return None


def _truth_view(source: TableSource, score_hist: Histogram) -> TruthView | None:
    """The sidecar's truth metrics, and a score histogram per defect kind in ``score_hist``'s bins (``None``: no ``--truth``)."""
    side = source.sidecar if isinstance(source.sidecar, dict) else {}
    metrics = side.get("truth")
    if not isinstance(metrics, dict):
        return None
    config = side.get("config") if isinstance(side.get("config"), dict) else {}
    recorded = config.get("truth")
    path = _truth_file(recorded, source.path)
    if path is None:
        return TruthView(metrics, recorded, note=f"the truth file the selection read ({recorded or 'not recorded'}) is not found: no per-defect histograms")
    try:
        truth = pl.scan_parquet(path)
        missing = [c for c in (C.PAIR_ID, C.DEFECT) if c not in truth.collect_schema()]
    except Exception as exc:  # noqa: BLE001 - polars raises several types for unreadable files
        return TruthView(metrics, recorded, note=f"the truth file {path} is not readable ({exc}): no per-defect histograms")
    if missing:
        return TruthView(metrics, recorded, note=f"the truth file {path} has no {', '.join(missing)} column: no per-defect histograms")
    scored = pl.col(C.SCORE).is_not_null() & pl.col(C.SCORE).cast(pl.Float64).is_finite()
    frames = [source.rows.filter((pl.col(C.STATUS) == C.STATUS_OK) & scored).select(C.PAIR_ID, C.SCORE, pl.lit(False).alias("gone"))]
    if source.dropped is not None and C.SCORE in source.dropped.collect_schema():
        # Rows of other splits were never candidates: select's truth metrics leave them out too.
        in_scope = pl.col(C.STEP).is_null() | (pl.col(C.STEP) != SPLIT_STEP)
        frames.append(source.dropped.filter(scored & in_scope).select(C.PAIR_ID, C.SCORE, pl.lit(True).alias("gone")))
    edges, bins = score_hist.edges, len(score_hist.counts)
    idx = ((pl.col(C.SCORE).cast(pl.Float64) - edges[0]) / ((edges[-1] - edges[0]) or 1.0) * bins).floor().cast(pl.Int64).clip(0, bins - 1)
    rows = pl.concat([f.with_columns(pl.col(C.SCORE).cast(pl.Float64)) for f in frames]).join(
        truth.select(pl.col(C.PAIR_ID).cast(pl.String), C.DEFECT), on=C.PAIR_ID, how="inner"
    )
    counts = rows.group_by(C.DEFECT, "gone", idx.alias("bin")).len().collect()
    present = set(counts.get_column(C.DEFECT).drop_nulls().to_list())
    kinds = [k for k in (C.DEFECT_NONE, *C.DEFECT_KINDS) if k in present] + sorted(present - {C.DEFECT_NONE, *C.DEFECT_KINDS})
    histograms = []
    for kind in kinds:
        kept, gone = [0] * bins, [0] * bins
        for _, was_dropped, b, n in counts.filter(pl.col(C.DEFECT) == kind).iter_rows():
            (gone if was_dropped else kept)[int(b)] += int(n)
        histograms.append(Histogram(C.SCORE, list(edges), kept, False, gone if source.dropped is not None else None))
    return TruthView(metrics, recorded, histograms, kinds)


_DUPLICATE_GROUP = f"{REASON_DUPLICATE}<pair_id>"
_GROUP = "group"


def _reason_group() -> pl.Expr:
    # duplicate-of:<pair_id> names each original: one group for all of them.
    return pl.col(C.REASON).str.replace(r"^duplicate-of:.*", _DUPLICATE_GROUP).alias(_GROUP)


def _filtered(drops: pl.LazyFrame, reason: str | None, step: str | None, path: Path) -> pl.LazyFrame:
    """The dropped rows with ``reason`` (``duplicate-of`` for every duplicate) and of ``step``; a filter matching nothing is an error."""
    for value, column, option in ((reason, C.REASON, "--reason"), (step, C.STEP, "--step")):
        if value is None:
            continue
        if column == C.REASON and value.rstrip(":") in (REASON_DUPLICATE.rstrip(":"), _DUPLICATE_GROUP):
            cond = pl.col(C.REASON).str.starts_with(REASON_DUPLICATE)
        else:
            cond = pl.col(column) == value
        if drops.filter(cond).select(pl.len()).collect().item() == 0:
            present = drops.select(_reason_group() if column == C.REASON else pl.col(column)).unique().collect().to_series().drop_nulls()
            raise TbpsError(
                f"no dropped row has {column} {value!r}", path=path, field=option, value=value,
                hint=f"the {column}s here: {', '.join(sorted(map(str, present))) or '(none)'}",
            )
        drops = drops.filter(cond)
    return drops


def _drop_groups(drops: pl.LazyFrame, source: TableSource, top: int, *, by_step: bool) -> dict[str, tuple[int, pl.DataFrame]]:
    """Dropped rows per reason (or per step and reason): the count and the ``top`` highest-scored rows.

    Each sample row gets its image path and caption from the selection's input score rows, and a
    duplicate its original (see :func:`_with_originals`).
    """
    drops = drops.with_columns(_reason_group())
    keys = [C.STEP, _GROUP] if by_step else [_GROUP]
    counts = drops.group_by(keys).len().sort(["len", *keys], descending=[True] + [False] * len(keys)).collect()
    dschema = drops.collect_schema()
    groups = {}
    for row in counts.iter_rows(named=True):
        sample = drops.filter(pl.all_horizontal([pl.col(k) == row[k] for k in keys]))
        if C.SCORE in dschema:
            # Borderline cases first: the best-scored rows the selection still dropped.
            sample = sample.sort([C.SCORE, C.PAIR_ID], descending=[True, False], nulls_last=True)
        sample = _joined(sample.head(top).collect(), source)
        if row[_GROUP] == _DUPLICATE_GROUP:
            sample = _with_originals(sample, source)
        name = f"{row[C.STEP]}: {row[_GROUP]}" if by_step and row[C.STEP] != row[_GROUP] else str(row[_GROUP])
        groups[name] = (int(row["len"]), sample)
    return groups


def _joined(sample: pl.DataFrame, source: TableSource) -> pl.DataFrame:
    """Dropped rows with the columns the drop table lacks (image path, caption, ...) from the input score rows."""
    if source.inputs is not None:
        missing = [c for c in _JOINED if c not in sample.columns and c in source.inputs.collect_schema()]
        if missing:
            found = (
                source.inputs.select(C.PAIR_ID, *missing).filter(pl.col(C.PAIR_ID).is_in(sample.get_column(C.PAIR_ID).to_list()))
                .unique(C.PAIR_ID, keep="first", maintain_order=True).collect()
            )
            sample = sample.join(found, on=C.PAIR_ID, how="left", maintain_order="left")
    for col in (C.IMAGE_PATH, C.CAPTION):
        if col not in sample.columns:
            sample = sample.with_columns(pl.lit(None, dtype=pl.String).alias(col))
    return sample


def _with_originals(sample: pl.DataFrame, source: TableSource) -> pl.DataFrame:
    """Duplicate rows with their original: its id, image path, caption, score, and what became of it."""
    original = sample.get_column(C.REASON).str.strip_prefix(REASON_DUPLICATE)
    ids = original.to_list()
    info: dict[str, dict[str, Any]] = {}
    if source.inputs is not None:
        have = source.inputs.collect_schema()
        cols = [c for c in ORIGINAL_COLUMNS if c in have]
        for r in source.inputs.select(C.PAIR_ID, *cols).filter(pl.col(C.PAIR_ID).is_in(ids)).collect().iter_rows(named=True):
            info.setdefault(r[C.PAIR_ID], r)
    kept = set()
    if source.kept is not None:
        kept = set(source.kept.filter(pl.col(C.PAIR_ID).is_in(ids)).select(C.PAIR_ID).collect().to_series().to_list())
    later = {}
    if source.dropped is not None:
        for r in source.dropped.filter(pl.col(C.PAIR_ID).is_in(ids)).select(C.PAIR_ID, C.STEP, C.REASON).collect().iter_rows(named=True):
            later.setdefault(r[C.PAIR_ID], f"dropped later: {r[C.REASON]} ({r[C.STEP]})")
    # Every input row is kept or dropped: an original the drop table lacks is kept (checked against the manifest when it is here).
    fate = [later.get(i) or ("kept" if source.kept is None or i in kept else "not found") for i in ids]
    extra = [pl.Series(ORIGINAL, ids, dtype=pl.String), pl.Series(ORIGINAL_FATE, fate, dtype=pl.String)]
    for col, name in ORIGINAL_COLUMNS.items():
        dtype = pl.Float64 if col == C.SCORE else pl.String
        extra.append(pl.Series(name, [info.get(i, {}).get(col) for i in ids], dtype=dtype))
    return sample.with_columns(extra)


def inspect_dropped(source: TableSource, *, top: int = 10, reason: str | None = None, step: str | None = None) -> DropReport:
    """Summarise a drop table: rows per step and reason, and the highest-scored rows of each, joined back.

    Args:
        source: a drop table as opened by :func:`open_table` (``kind == "drop table"``).
        top: sample rows per step and reason.
        reason: only rows with this reason (``duplicate-of`` for every duplicate).
        step: only rows of this selection step.

    Returns:
        A :class:`DropReport`.

    Raises:
        TbpsError: the table has no rows, or a filter matches none.
    """
    drops = source.rows
    rows = drops.select(pl.len()).collect().item()
    if rows == 0:
        raise TbpsError("the drop table is empty: the selection dropped no row", path=source.path)
    by_step = (
        drops.with_columns(_reason_group()).group_by(C.STEP, _GROUP).len()
        .sort(["len", C.STEP, _GROUP], descending=[True, False, False]).rename({_GROUP: C.REASON, "len": "rows"}).collect()
    )
    shown = _filtered(drops, reason, step, source.path)
    groups = _drop_groups(shown, source, top, by_step=True)
    filters = " ".join(f"{o} {v}" for o, v in (("--step", step), ("--reason", reason)) if v is not None)
    manifest = source.path.with_name(source.path.name[: -len(DROPPED_SUFFIX)] + ".parquet") if source.path.name.endswith(DROPPED_SUFFIX) else None
    if source.inputs is not None:
        provenance = f"joined with the {len(_input_items(source.sidecar))} score table(s) its manifest's sidecar names"
    elif source.sidecar is not None:
        provenance = "the score tables its manifest's sidecar names are gone: rows shown without captions or pictures"
    else:
        provenance = "no manifest sidecar (X.json) beside it: rows shown without captions or pictures"
    return DropReport(
        path=str(source.path), manifest=str(manifest) if manifest is not None and manifest.is_file() else None, rows=int(rows),
        shown_rows=sum(n for n, _ in groups.values()), filters=filters, by_step=by_step, groups=groups,
        joined=source.inputs is not None, provenance=provenance, roots=source.roots,
    )


# --------------------------------------------------------------------------- page


def render_html(report: TableReport) -> str:
    """The ``tbps inspect --html`` page of a :class:`TableReport`.

    Args:
        report: the summary to show.

    Returns:
        The HTML document as text.
    """
    roots, roots_from = report.roots.get()
    resolvers = [ImageResolver(r) for r in roots]  # one per page: each caches the directories it has listed
    sections = []
    overview = [("rows", report.rows)] + [(f"status {k}", v) for k, v in report.status_counts.items()]
    overview += [("selection", th.label) for th in report.thresholds]
    overview.append(("image root", f"{', '.join(roots) or '-'} ({roots_from})"))
    sections.append("<h2>Overview</h2>" + grid_table(["", "value"], overview))
    cols = list(report.quantiles)
    sections.append(
        "<h3>Quantiles (ok rows)</h3>"
        + grid_table(["quantile", *cols], [[f"{q:g}", *(report.quantiles[c].get(q) for c in cols)] for q in QUANTILES])
    )
    charts = "".join(svg_histogram(h, report.thresholds) for h in report.histograms)
    sections.append(f'<h2>Histograms</h2><div class="charts">{charts}</div>')
    if report.truth is not None:
        sections.append(_truth_section(report.truth, report.thresholds))
    sections.append(
        f"<h2>Lowest scored pairs ({report.bottom.height})</h2>"
        "<p>The pairs the model finds least consistent: candidates for removal.</p>"
        + contact_sheet(report.bottom.to_dicts(), roots=resolvers)
    )
    sections.append(f"<h2>Highest scored pairs ({report.top.height})</h2>" + contact_sheet(report.top.to_dicts(), roots=resolvers))
    src = report.sources
    sections.append("<h2>Per source</h2>" + grid_table(src.columns, src.iter_rows()))
    if report.dropped is not None:
        total = sum(n for n, _ in report.dropped.values())
        drops = [f"<h2>Dropped by the selection ({total:,} rows)</h2>"]
        drops.append(grid_table(["reason", "rows"], [(r, n) for r, (n, _) in report.dropped.items()]))
        drops.extend(_group_section(reason, n, sample, resolvers) for reason, (n, sample) in report.dropped.items())
        sections.append("".join(drops))
    if report.failed_rows:
        sections.append(_failed_section(report.failed_rows, report.failed))
    subtitle = f"{report.kind} · {report.rows:,} rows · {report.ok_rows:,} ok"
    return page(f"tbps inspect: {Path(report.path).name}", f"{report.path} · {subtitle}", "".join(sections))


# The truth metrics as tables: (key in the sidecar, column title).
_OVERALL = (("pairs", "pairs"), ("defective", "defective"), ("removed", "removed"), ("removed_defective", "removed defective"),
            ("removed_clean", "removed clean"), ("precision", "precision"), ("recall", "recall"), ("unscored", "unscored"),
            ("auroc_score", "AUROC score"), ("auroc_bank_rank", "AUROC bank_rank"))
_PER_KIND = (("pairs", "pairs"), ("removed", "removed"), ("recall", "recall"), ("resolved", "resolved"),
             ("auroc_score", "AUROC score"), ("auroc_bank_rank", "AUROC bank_rank"), ("unscored", "unscored"))
_PER_STEP = (("removed", "removed"), ("defective", "defective"), ("precision", "precision"))


def _truth_section(truth: TruthView, thresholds: list[Threshold]) -> str:
    """Precision, recall and AUROCs that select measured against the truth, and a score histogram per defect kind."""
    m = truth.metrics
    parts = ["<h2>Against the truth (tbps select --truth)</h2>",
             f'<p class="note">As the selection recorded it in the manifest\'s sidecar; truth file: {esc(truth.path or "-")}. '
             f"{esc(_count(m.get('matched')))} input rows matched, {esc(_count(m.get('unmatched_rows')))} without a truth entry, "
             f"{esc(_count(m.get('truth_rows_missing')))} truth rows not in the input.</p>"]
    overall = m.get("overall") if isinstance(m.get("overall"), dict) else {}
    parts.append('<div class="truth-overall">' + grid_table(["overall", "value"], [(title, overall.get(key)) for key, title in _OVERALL]) + "</div>")
    kinds = {k: v for k, v in m.get("kinds", {}).items() if isinstance(v, dict)} if isinstance(m.get("kinds"), dict) else {}
    relevance = m.get("relevance") if isinstance(m.get("relevance"), dict) else None
    rows = [[kind, *(v.get(key) for key, _ in _PER_KIND)] for kind, v in kinds.items()]
    if relevance is not None:
        rows.append(["all but duplicates", relevance.get("defective"), relevance.get("removed"), relevance.get("recall"), None,
                     relevance.get("auroc_score"), relevance.get("auroc_bank_rank"), None])
    parts.append("<h3>Per defect kind</h3>" + '<div class="truth-kinds">' + grid_table(["defect", *(t for _, t in _PER_KIND)], rows) + "</div>")
    if kinds:
        bars = [(kind, [v.get("recall"), v.get("auroc_score"), v.get("auroc_bank_rank")]) for kind, v in kinds.items()]
        parts.append(svg_bar_chart(bars, series=("recall", "AUROC score", "AUROC bank_rank"), title="Recall and AUROC per defect kind",
                                   value_label="share (recall) / AUROC", reference=(0.5, "AUROC chance"), value_range=(0.0, 1.0),
                                   width=620, value_format="{:.2f}"))
    steps = {k: v for k, v in m.get("steps", {}).items() if isinstance(v, dict)} if isinstance(m.get("steps"), dict) else {}
    if steps:
        parts.append("<h3>Per selection step</h3>" + '<div class="truth-steps">'
                     + grid_table(["step", *(t for _, t in _PER_STEP)], [[name, *(v.get(key) for key, _ in _PER_STEP)] for name, v in steps.items()])
                     + "</div>")
    parts.append("<h3>Score per defect kind</h3>")
    if truth.note:
        parts.append(f'<p class="note">{esc(truth.note)}</p>')
    charts = []
    for kind, hist in zip(truth.kinds, truth.histograms):
        n, gone = sum(hist.counts) + sum(hist.dropped or []), sum(hist.dropped or [])
        name = "none (clean)" if kind == C.DEFECT_NONE else kind
        title = f"{name}: {n:,} pairs" + (f", {gone:,} dropped" if hist.dropped is not None else "")
        charts.append(f'<div class="defect" data-defect="{esc(kind)}">'
                      + svg_histogram(hist, thresholds, width=440, height=190, title=title, unit="pairs") + "</div>")
    if charts:
        parts.append('<p class="note">The bins of the score histogram above; kept rows below, dropped rows stacked on them.</p>'
                     f'<div class="charts">{"".join(charts)}</div>')
    return "".join(parts)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _failed_section(total: int, failed: pl.DataFrame | None) -> str:
    """The rows that failed (status not ok) with their error: the first :data:`FAILED_SHOWN`, the rest counted."""
    shown = failed if failed is not None else pl.DataFrame()
    rest = total - shown.height
    more = f'<p class="note">… and {rest:,} more not listed (the first {shown.height:,} are).</p>' if rest > 0 else ""
    rows = [[r.get(C.PAIR_ID), r.get(C.STATUS), r.get(C.ERROR) or "-", r.get(C.IMAGE_PATH) or "-"] for r in shown.iter_rows(named=True)]
    return (f"<h2>Failed rows ({total:,})</h2><p>Rows whose status is not ok: never scored, never kept.</p>"
            + '<div class="wide left failed">' + grid_table(["pair_id", "status", "error", "image_path"], rows) + "</div>" + more)


def _group_section(name: str, n: int, sample: pl.DataFrame, roots: list[ImageResolver]) -> str:
    """One group of dropped rows: a contact sheet, or for duplicates each row beside its original."""
    head = f"<h3>{esc(name)}: {n:,} rows (showing {sample.height}, highest scores first)</h3>"
    if ORIGINAL not in sample.columns:
        return head + contact_sheet(sample.to_dicts(), fields=(C.SCORE, C.BANK_RANK, C.REASON), roots=roots)
    pairs = []
    for row in sample.to_dicts():
        original = {C.PAIR_ID: row[ORIGINAL], C.REASON: row[ORIGINAL_FATE], **{col: row[name] for col, name in ORIGINAL_COLUMNS.items()}}
        pairs.append((row, original))
    return head + pair_sheet(pairs, fields=(C.SCORE, C.REASON), labels=("dropped", "original"), roots=roots)


def render_dropped_html(report: DropReport) -> str:
    """The ``tbps inspect X.dropped.parquet --html`` page of a :class:`DropReport`.

    Args:
        report: the summary to show.

    Returns:
        The HTML document as text.
    """
    roots, roots_from = report.roots.get()
    overview = [("dropped rows", report.rows), ("shown", f"{report.shown_rows:,} ({report.filters or 'no filter'})"),
                ("manifest", report.manifest or "-"), ("rows joined", report.provenance),
                ("image root", f"{', '.join(roots) or '-'} ({roots_from})")]
    sections = ["<h2>Overview</h2>" + grid_table(["", "value"], overview)]
    sections.append("<h2>Dropped rows by step and reason</h2>" + grid_table(report.by_step.columns, report.by_step.iter_rows()))
    resolvers = [ImageResolver(r) for r in roots]
    sections.extend(_group_section(name, n, sample, resolvers) for name, (n, sample) in report.groups.items())
    subtitle = f"drop table · {report.rows:,} rows" + (f" · {report.filters}" if report.filters else "")
    return page(f"tbps inspect: {Path(report.path).name}", f"{report.path} · {subtitle}", "".join(sections))


def run_inspect(config: InspectConfig) -> TableReport | DropReport:
    """Open, summarise and (with ``config.html``) write the HTML report of a table.

    Args:
        config: the resolved :class:`InspectConfig`.

    Returns:
        The :class:`TableReport`, or for a drop table the :class:`DropReport` (the CLI prints
        either with :func:`tbps.terminal.inspect_report`).

    Raises:
        TbpsError: not a score table, manifest or drop table, an empty one, or a filter matching nothing.
    """
    source = open_table(config.table, image_root=config.image_root)
    if source.kind == "drop table":
        report: TableReport | DropReport = inspect_dropped(source, top=config.top, reason=config.reason, step=config.step)
        text = render_dropped_html(report) if config.html is not None else None
    else:
        report = summarize(source, top=config.top, bins=config.bins, reason=config.reason, step=config.step)
        text = render_html(report) if config.html is not None else None
    if text is not None:
        write_html(config.html, text)
    return report
