"""Self-contained HTML pages: the primitives ``tbps inspect --html``, ``tbps search --html`` and the demo share.

One file, no external URL: styles are inline, charts are inline SVG, and every picture is a
base64 JPEG thumbnail in a ``data:`` URI, so a page works offline and can be emailed. Images
that cannot be opened (missing, corrupt, a decompression bomb) show a grey placeholder with the
reason instead of a broken picture. All user text (captions, paths, sources) goes through
:func:`esc`.

When a page has loaded, a small inline script counts the pictures that decoded and writes
``data-images-loaded="N/M"`` on ``<body>`` (what the headless-browser test reads).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from tbps import columns as C
from tbps.data.images import open_image
from tbps.data.paths import ImageResolver, resolve_in_roots
from tbps.files import write_text


class Bins(Protocol):
    """What :func:`svg_histogram` reads of a histogram (``tbps.curate.inspect.Histogram`` is one)."""

    column: str
    edges: Sequence[float]  # one more than counts
    counts: Sequence[int]
    log: bool  # power-of-two bins, drawn at equal width
    dropped: Sequence[int] | None  # rows dropped by a selection, stacked above the kept ones


class Cut(Protocol):
    """What :func:`svg_histogram` reads of a threshold (``tbps.curate.inspect.Threshold`` is one)."""

    column: str
    value: float
    label: str


@dataclass
class Counts:
    """A histogram a page bins itself (it satisfies :class:`Bins`), e.g. :func:`power_of_two_bins`."""

    column: str
    edges: list[float]
    counts: list[int]
    log: bool = False
    dropped: list[int] | None = None


def power_of_two_bins(values: Sequence[int] | Any, column: str, first: int = 1, last: int | None = None) -> Counts:
    """Whole numbers >= ``first`` counted in bins ``[1, 2), [2, 4), [4, 8), ...`` (ranks: 1 and the small ones stand apart).

    Args:
        values: the numbers (a list or a numpy array); those below ``first`` are left out.
        column: the histogram's name.
        first: the lowest value counted (1 for 1-based ranks).
        last: the largest value possible (the bins reach past it); by default the largest given.

    Returns:
        A :class:`Counts` with ``log=True``.
    """
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    arr = arr[arr >= first]
    top = max(int(arr.max()) if arr.size else first, last or first, first)
    edges = [float(first)]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2 if edges[-1] > 0 else 1.0)
    idx = np.searchsorted(np.asarray(edges), arr, side="right") - 1
    counts = np.bincount(idx, minlength=len(edges) - 1)[: len(edges) - 1]
    return Counts(column, edges, [int(c) for c in counts], log=True)


THUMB_SIZE = (64, 128)  # (width, height): pedestrian crops are about 1:2 to 1:3

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.meta{color:#666;margin-bottom:16px}
table.grid{border-collapse:collapse;margin:6px 0}
table.grid th,table.grid td{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.grid th:first-child,table.grid td:first-child{text-align:left}
table.grid th{background:#f0f0f0}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.sheet{display:flex;flex-wrap:wrap;gap:10px}
.card{width:150px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px;font-size:12px}
.card img,.card .noimg{display:block;width:64px;height:128px;margin:0 auto 4px;object-fit:contain;background:#eee}
.card .noimg{display:flex;align-items:center;justify-content:center;text-align:center;color:#888;font-size:10px}
.card .num{font-weight:600}
.card .cap{color:#333;max-height:6.2em;overflow:hidden}
.card .id{color:#999;font-size:10px;word-break:break-all}
.card .label{color:#666;font-size:10px;text-transform:uppercase;text-align:center;margin-bottom:2px}
.pair{display:flex;gap:2px;padding:3px;border:1px dashed #bbb;border-radius:4px}
td.good{color:#1a7f37;font-weight:600} td.bad{color:#cf222e;font-weight:600} td.neutral{color:#9a6700}
td.strong{font-weight:700;background:#eef4ff}
.banner{padding:8px 12px;border-radius:4px;margin:10px 0;border:1px solid #ddd;background:#fff}
.banner.good{border-color:#1a7f37;background:#eefbf0} .banner.bad{border-color:#cf222e;background:#fff0f0}
.note{color:#666;font-size:12px;margin:4px 0}
.wide{overflow-x:auto} .wide table.grid{font-size:13px} .wide table.grid td,.wide table.grid th{padding:3px 6px}
.wide table.grid td{white-space:nowrap} .wide table.grid th{vertical-align:bottom}
.left table.grid td,.left table.grid th{text-align:left}
.wide table.grid td.iv{white-space:pre;line-height:1.25}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value (``None`` as an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def thumbnail_uri(
    path: str | None, size: tuple[int, int] = THUMB_SIZE, roots: Sequence[ImageResolver] | None = None
) -> tuple[str | None, str | None]:
    """A base64 JPEG ``data:`` URI of an image, shrunk to fit ``size``.

    Args:
        path: the image file.
        size: (width, height) bound of the thumbnail.
        roots: a resolver per image root the file must lie in: the path is resolved as the
            readers resolve it (:func:`tbps.data.paths.resolve_in_roots`) and checked again when
            it is opened; an empty list accepts nothing. ``None``: the path is opened as given
            (it came from a reader, already resolved).

    Returns:
        (uri, None) when the image decoded, else (None, the reason).
    """
    root = None
    if roots is not None:
        path, root, status, error = resolve_in_roots(path, roots)
        if path is None:
            return None, f"{status}: {error}"
    res = open_image(path, root=root)
    if not res.ok:
        return None, f"{res.status}: {res.error}"
    im = res.image.copy()
    im.thumbnail(size)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def card(
    row: dict[str, Any], fields: Iterable[tuple[str, Any]], roots: Sequence[ImageResolver] | None = None, label: str | None = None
) -> str:
    """One contact-sheet card: thumbnail, the given numbers, the caption and the pair id.

    ``roots``: a resolver per image root the picture must lie in (see :func:`thumbnail_uri`); ``label``: a
    word above the picture (``dropped`` / ``original`` in a pair).
    """
    uri, why = thumbnail_uri(row.get(C.IMAGE_PATH), roots=roots)
    pic = (
        f'<img src="{uri}" alt="{esc(Path(str(row.get(C.IMAGE_PATH))).name)}">'
        if uri
        else f'<div class="noimg" title="{esc(why)}">image unavailable<br>{esc((why or "").split(":")[0])}</div>'
    )
    nums = " · ".join((f"{esc(k)} " if k else "") + f'<span class="num">{esc(_num(v))}</span>' for k, v in fields)
    ident = row.get(C.PAIR_ID) or Path(str(row.get(C.IMAGE_PATH))).name
    top = f'<div class="label">{esc(label)}</div>' if label else ""
    return (
        f'<div class="card">{top}{pic}<div>{nums}</div>'
        f'<div class="cap" title="{esc(row.get(C.CAPTION))}">{esc(row.get(C.CAPTION))}</div>'
        f'<div class="id">{esc(ident)}</div></div>'
    )


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value.is_integer():
            return f"{int(value):,}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


_FIELD_LABELS = {C.SCORE: "score", C.BANK_RANK: "rank", C.REASON: ""}


def contact_sheet(
    rows: list[dict[str, Any]], fields: tuple[str, ...] = (C.SCORE, C.BANK_RANK), roots: Sequence[ImageResolver] | None = None
) -> str:
    """A wrap of cards, one per row, each showing ``fields`` (score, rank) above the caption.

    ``roots``: a resolver per image root the pictures must lie in (see :func:`thumbnail_uri`).
    """
    if not rows:
        return "<p>(none)</p>"
    cards = [card(r, [(_FIELD_LABELS.get(f, f), r.get(f)) for f in fields if f in r], roots=roots) for r in rows]
    return '<div class="sheet">' + "".join(cards) + "</div>"


def pair_sheet(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    fields: tuple[str, ...] = (C.SCORE, C.REASON),
    labels: tuple[str, str] = ("dropped", "original"),
    roots: Sequence[ImageResolver] | None = None,
) -> str:
    """Cards two by two: each row beside the row it is compared with (a duplicate and its original).

    Args:
        pairs: (row, other row) dicts with the card columns.
        fields: the numbers / words shown on each card.
        labels: the word above each of the two cards.
        roots: a resolver per image root the pictures must lie in (see :func:`thumbnail_uri`).

    Returns:
        The HTML of the sheet.
    """
    if not pairs:
        return "<p>(none)</p>"
    cells = []
    for pair in pairs:
        cards = [card(r, [(_FIELD_LABELS.get(f, f), r.get(f)) for f in fields if f in r], roots=roots, label=label) for r, label in zip(pair, labels)]
        cells.append('<div class="pair">' + "".join(cards) + "</div>")
    return '<div class="sheet">' + "".join(cells) + "</div>"


class Styled(NamedTuple):
    """A table cell with a CSS class: ``good``, ``bad``, ``neutral`` (a verdict), ``strong`` (a choice) or
    ``iv`` (its line breaks kept: a mean above its interval)."""

    value: Any
    css: str


def grid_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain HTML table of escaped cells; a :class:`Styled` cell carries its class."""

    def td(cell: Any) -> str:
        if isinstance(cell, Styled):
            return f'<td class="{esc(cell.css)}">{esc(_num(cell.value))}</td>'
        return f"<td>{esc(_num(cell))}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(td(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'


def svg_histogram(
    hist: Bins,
    thresholds: Iterable[Cut] = (),
    width: int = 520,
    height: int = 220,
    title: str | None = None,
    x_label: str | None = None,
    unit: str = "rows",
) -> str:
    """An inline SVG bar chart of a histogram, each threshold on its column as a red dashed line.

    Args:
        hist: the histogram (edges, counts, ``log`` for power-of-two bins drawn at equal width,
            ``dropped`` stacked above the kept counts when not ``None``).
        thresholds: the cuts to draw; those on another column are skipped. Each line carries
            ``class="cut"``, ``data-column`` and ``data-value`` (what a test or a script reads).
        width, height: the chart size in pixels.
        title: the chart's title; by default the column, its binning and "ok rows".
        x_label: the x axis' title; by default the column.
        unit: what a bar counts, in its tooltip and the y axis' title (without ``dropped``).

    Returns:
        The ``<svg>`` element as text.
    """
    mine = [t for t in thresholds if t.column == hist.column]
    n = len(hist.counts)
    dropped = hist.dropped or [0] * n
    most = max((k + d for k, d in zip(hist.counts, dropped)), default=0) or 1
    # Counts are whole: never a tick at half a row.
    yt = [t for t in nice_ticks(0.0, float(most), count=min(4, most)) if float(t).is_integer()]
    peak = yt[-1]
    left = max(48, 22 + _CHAR_W * max(len(_count_tick(t)) for t in yt))
    right, top, bottom = 20, 28 + 13 * len(mine), 40  # room for the last tick's label
    pw, ph = width - left - right, height - top - bottom
    bw = pw / max(n, 1)
    heading = title if title is not None else f"{hist.column}{' (log2 bins)' if hist.log else ''} · ok rows"
    legend = ""
    if hist.dropped is not None:
        # The legend takes the top right corner: the title is shortened to the room left of it.
        legend = (
            f'<rect x="{width - 122}" y="6" width="10" height="10" fill="#4a7bb7"/><text x="{width - 108}" y="15" font-size="11">kept</text>'
            f'<rect x="{width - 72}" y="6" width="10" height="10" fill="#f0a04b"/><text x="{width - 58}" y="15" font-size="11">dropped</text>'
        )
    title_room = (width - 130 if legend else width - 4) - 8
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="histogram of {esc(hist.column)}" style="background:#fff">',
        f'<text x="8" y="15" font-size="13" font-weight="600">{esc(_fit(heading, title_room, 7.9))}<title>{esc(heading)}</title></text>{legend}',
    ]
    for t in yt:
        y = top + ph - ph * t / peak
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end">{esc(_count_tick(t))}</text>')
    parts += [
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>',
        f'<text x="11" y="{top + ph / 2:.1f}" font-size="11" text-anchor="middle" fill="#555" '
        f'transform="rotate(-90 11 {top + ph / 2:.1f})">{esc(unit)}</text>',
    ]
    for i, (count, gone) in enumerate(zip(hist.counts, dropped)):
        h, hd = ph * count / peak, ph * gone / peak
        lo, hi = hist.edges[i], hist.edges[i + 1]
        x, w = left + i * bw + 0.5, max(bw - 1, 0.5)
        what = "kept" if hist.dropped is not None else unit
        # Kept rows at the bottom of the bar, dropped rows stacked above them.
        parts.append(
            f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="#4a7bb7">'
            f"<title>[{_num(lo)}, {_num(hi)}): {count:,} {esc(what)}</title></rect>"
        )
        if gone:
            parts.append(
                f'<rect x="{x:.1f}" y="{top + ph - h - hd:.1f}" width="{w:.1f}" height="{hd:.1f}" fill="#f0a04b">'
                f"<title>[{_num(lo)}, {_num(hi)}): {gone:,} dropped</title></rect>"
            )
    if hist.log:
        # Power-of-two bins: a label at a bin's left edge, at most every ~44 px so they never run into each other.
        every = max(1, math.ceil(n / max(1, pw // 44)))
        ticks = [(left + i * bw, hist.edges[i]) for i in range(0, n + 1, every)]
    else:
        lo, hi = hist.edges[0], hist.edges[-1]
        nice = nice_ticks(lo, hi, count=max(2, min(6, int(pw // 60))))
        ticks = [(_x_of(hist, t, left, bw), t) for t in nice if lo - 1e-9 <= t <= hi + 1e-9]
    step = None if hist.log else _step(nice)
    for x, value in ticks:
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="10" text-anchor="middle">{esc(_tick(value, step))}</text>')
    for k, threshold in enumerate(mine):
        x = _x_of(hist, threshold.value, left, bw)
        outside = not hist.edges[0] <= threshold.value <= hist.edges[-1]
        parts.append(
            f'<line class="cut" data-column="{esc(threshold.column)}" data-value="{threshold.value!r}" x1="{x:.1f}" y1="{top - 2}" '
            f'x2="{x:.1f}" y2="{top + ph}" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>'
        )
        label = threshold.label + (" (outside the range shown)" if outside else "")
        # The label runs to the side of the line with more room.
        anchor = "start" if left + pw - x >= x - 4 else "end"
        room = (left + pw - x) if anchor == "start" else (x - 4)
        parts.append(
            f'<text x="{x + (3 if anchor == "start" else -3):.1f}" y="{30 + 13 * k}" font-size="11" fill="#d62728" '
            f'text-anchor="{anchor}">{esc(_fit(label, room))}<title>{esc(label)}</title></text>'
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#555">{esc(x_label or hist.column)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _fit(text: str, room: float, char_w: float = 6.4) -> str:
    """``text`` cut with an ellipsis to about ``room`` pixels (the full text stays in the element's tooltip)."""
    most = max(4, int(room / char_w))
    return text if len(text) <= most else text[: most - 1] + "…"


def _count_tick(value: float) -> str:
    """A count on an axis: 950, 9,500, 95k, 9.5M."""
    v = abs(value)
    if v < 10_000:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:.3g}"
    if v < 1_000_000:
        return f"{value / 1000:.3g}k"
    return f"{value / 1_000_000:.3g}M"


def _tick(value: float, step: float | None = None) -> str:
    """A tick label; with ``step`` (the distance between ticks) as many decimals as the ticks need to differ."""
    if step is not None and step >= 1e-3 and abs(value) < 1e15:
        power = math.floor(math.log10(step) + 1e-9)
        decimals = max(0, -power + (1 if round(step / 10**power, 6) == 2.5 else 0))
        return f"{value:,.{decimals}f}" if abs(value) >= 1000 else f"{value:.{decimals}f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _step(ticks: Sequence[float]) -> float | None:
    return ticks[1] - ticks[0] if len(ticks) > 1 else None


def _x_of(hist: Bins, value: float, left: float, bw: float) -> float:
    """The x position of a value: linear within its bin (log2 within a power-of-two bin)."""
    edges = hist.edges
    # Keep/drop rules on ranks are "<= value": the line sits at the right edge of value's unit.
    v = value + 1 if hist.log and threshold_is_integer(value) else value
    if v <= edges[0]:
        return left
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        if v <= hi:
            if hist.log and lo > 0:
                frac = (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            else:
                frac = (v - lo) / (hi - lo) if hi > lo else 0.0
            return left + (i + frac) * bw
    return left + len(edges[:-1]) * bw


def threshold_is_integer(value: float) -> bool:
    """Whether a threshold is a whole number (a rank cut)."""
    return float(value).is_integer()


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_CHAR_W = 6.4  # mean width in pixels of a character at font-size 11, to lay out labels and legends


def _finite(value: Any) -> float | None:
    """A plotted number, or None for a missing, non-numeric or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten) covering ``[lo, hi]``.

    Args:
        lo: the low end of the data.
        hi: the high end (an empty range is widened by one unit on each side).
        count: the number of intervals wanted.

    Returns:
        Increasing ticks, the first <= ``lo`` and the last >= ``hi``.
    """
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while not ticks or ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _legend(items: Sequence[tuple[str, str]], x0: float, y0: float, width: float) -> tuple[str, float]:
    """Legend swatches wrapped into rows within ``width``; returns (svg, height used)."""
    parts, x, y = [], x0, y0
    for label, colour in items:
        w = 18 + _CHAR_W * len(label) + 14
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + 16
        parts.append(
            f'<rect x="{x:.1f}" y="{y + 4:.1f}" width="12" height="4" fill="{esc(colour)}"/>'
            f'<text x="{x + 16:.1f}" y="{y + 10:.1f}" font-size="11">{esc(label)}</text>'
        )
        x += w
    return "".join(parts), (y - y0 + 16) if items else 0.0


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis covering ``[lo, hi]`` (both > 0): powers of ten, with 2 and 5 between them over a short range.

    Args:
        lo: the smallest value shown (> 0).
        hi: the largest value shown.

    Returns:
        Increasing ticks, the first <= ``lo`` and the last >= ``hi``.
    """
    lo, hi = max(lo, 1e-300), max(hi, lo)
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    b = max(b, a + 1)
    steps = (1, 2, 5) if b - a <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(a, b + 1) for m in steps]
    inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    below = [t for t in ticks if t < lo * (1 - 1e-9)]
    above = [t for t in ticks if t > hi * (1 + 1e-9)]
    return ([below[-1]] if below else []) + inside + ([above[0]] if above else [])


def thin(points: Sequence[tuple[float, float | None]], most: int = 1000) -> list[tuple[float, float | None]]:
    """At most about ``most`` points of a series: the means of consecutive buckets (a long run's loss, step by step).

    Args:
        points: ``(x, y)`` in x order; a ``None`` y is left out of its bucket's mean.
        most: the number of points kept.

    Returns:
        The points as given when there are at most ``most``, else one mean point per bucket.
    """
    if len(points) <= most:
        return list(points)
    out: list[tuple[float, float | None]] = []
    size = len(points) / most
    for b in range(most):
        chunk = points[int(b * size): int((b + 1) * size)]
        ys = [y for _, y in chunk if y is not None]
        if chunk:
            out.append((sum(x for x, _ in chunk) / len(chunk), sum(ys) / len(ys) if ys else None))
    return out


def svg_line_chart(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    x_label: str,
    y_label: str,
    title: str = "",
    width: int = 420,
    height: int = 250,
    colours: Mapping[str, str] | None = None,
    y_range: tuple[float, float] | None = None,
    log_x: bool = False,
    markers: Sequence[tuple[float, str]] = (),
    dots: bool | None = None,
    step: bool = False,
    show_legend: bool = True,
) -> str:
    """An inline SVG line chart of several series, with axis ticks and a legend below the plot.

    Args:
        series: label -> points ``(x, y)``, drawn in x order; a ``None`` (or non-finite) y
            breaks the line. Each point is a dot with its value as a tooltip (see ``dots``).
        x_label: the x axis' title.
        y_label: the y axis' title.
        title: the chart's title, above the plot.
        width, height: the size in pixels of the chart without its legend (the legend adds
            rows below as it needs).
        colours: label -> CSS colour; the others take :data:`PALETTE` in order.
        y_range: the y axis' range; by default round ticks around the data.
        log_x: a log-scale x axis (points with x <= 0 are left out).
        markers: ``(x, label)`` of dashed vertical lines with their label at the top
            (``class="marker"``, ``data-x``), e.g. the best checkpoint's step.
        dots: a dot per point; by default when no series has more than 200 points.
        step: draw each series as a step function (a cumulative curve such as R@K).
        show_legend: the legend below the plot (a chart of one series may go without).

    Returns:
        The ``<svg>`` element as text.
    """
    clean = {
        label: sorted(((float(x), _finite(y)) for x, y in points if _finite(x) is not None and (not log_x or x > 0)), key=lambda p: p[0])
        for label, points in series.items()
    }
    xs = [x for pts in clean.values() for x, _ in pts] + [float(x) for x, _ in markers if not log_x or x > 0]
    ys = [y for pts in clean.values() for _, y in pts if y is not None]
    if dots is None:
        dots = max((len(p) for p in clean.values()), default=0) <= 200
    yt = (nice_ticks(*y_range) if y_range else nice_ticks(min(ys), max(ys))) if ys else [0.0, 1.0]
    # The left margin fits the longest y tick label.
    ystep = _step(yt)
    left, right, top, bottom = max(52, 26 + _CHAR_W * max(len(_tick(y, ystep)) for y in yt)), 14, 26 if title else 10, 40
    top += 14 if markers else 0
    pw, ph = width - left - right, height - top - bottom
    palette = dict(colours or {})
    free = iter(PALETTE * (1 + len(clean) // len(PALETTE)))
    for label in clean:
        if label not in palette:
            palette[label] = next(free)
    legend, legend_h = _legend([(label, palette[label]) for label in clean], left, height, pw) if show_legend else ("", 0.0)
    total_h = height + legend_h + (6 if legend_h else 0)
    parts = [
        f'<svg width="{width}" height="{total_h:.0f}" viewBox="0 0 {width} {total_h:.0f}" role="img" '
        f'aria-label="{esc(title or y_label)}" style="background:#fff">',
        f'<text x="8" y="16" font-size="13" font-weight="600">{esc(title)}</text>' if title else "",
    ]
    if not ys:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" font-size="12" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(parts)
    xt = log_ticks(min(xs), max(xs)) if log_x else nice_ticks(min(xs), max(xs))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    fx = math.log10 if log_x else (lambda v: v)

    def px(x: float) -> float:
        return left + pw * (fx(x) - fx(x0)) / ((fx(x1) - fx(x0)) or 1.0)

    def py(y: float) -> float:
        return top + ph - ph * (y - y0) / ((y1 - y0) or 1.0)

    for y in yt:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 5}" y="{py(y) + 3.5:.1f}" font-size="10" text-anchor="end">{esc(_tick(y, ystep))}</text>')
    xstep = None if log_x else _step(xt)
    # At most one x tick label every ~40 px (a log axis over many decades, a long linear one).
    every = max(1, math.ceil(len(xt) / max(1, pw // 40)))
    for i, x in enumerate(xt):
        parts.append(f'<line x1="{px(x):.1f}" y1="{top + ph}" x2="{px(x):.1f}" y2="{top + ph + 4}" stroke="#888"/>')
        if i % every == 0:
            parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 15}" font-size="10" text-anchor="middle">{esc(_tick(x, xstep))}</text>')
    parts += [
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>',
        f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" font-size="11" text-anchor="middle" fill="#555">{esc(x_label)}</text>',
        f'<text x="12" y="{top + ph / 2:.1f}" font-size="11" text-anchor="middle" fill="#555" '
        f'transform="rotate(-90 12 {top + ph / 2:.1f})">{esc(y_label)}</text>',
    ]
    for x, label in markers:
        if log_x and x <= 0:
            continue
        anchor = "start" if px(x) < left + pw * 0.6 else "end"
        parts.append(
            f'<line class="marker" data-x="{float(x)!r}" x1="{px(x):.1f}" y1="{top - 4}" x2="{px(x):.1f}" y2="{top + ph}" '
            f'stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="4,3"/>'
            f'<text x="{px(x) + (3 if anchor == "start" else -3):.1f}" y="{top - 6}" font-size="10" fill="#1a7f37" '
            f'text-anchor="{anchor}">{esc(label)}</text>'
        )
    for label, points in clean.items():
        colour = esc(palette[label])
        run: list[str] = []
        # A missing value ends a stretch of line: the next one starts a new polyline.
        for x, y in [*points, (math.nan, None)]:
            if y is None:
                if len(run) > 1:
                    parts.append(f'<polyline class="series" data-label="{esc(label)}" points="{" ".join(run)}" fill="none" '
                                 f'stroke="{colour}" stroke-width="1.8"/>')
                elif len(run) == 1 and not dots:
                    head = run[0].split(",")
                    parts.append(f'<circle cx="{head[0]}" cy="{head[1]}" r="2.6" fill="{colour}"/>')
                run = []
                continue
            if step and run:
                run.append(f"{px(x):.1f},{run[-1].split(',')[1]}")  # across at the old value, then up
            run.append(f"{px(x):.1f},{py(y):.1f}")
            if dots:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{colour}">'
                    f"<title>{esc(label)}: {esc(x_label)} {esc(_tick(x))}, {esc(y_label)} {esc(_tick(y))}</title></circle>"
                )
    parts.append(legend)
    parts.append("</svg>")
    return "".join(parts)


def svg_bar_chart(
    bars: Sequence[tuple[str, float | None | Sequence[float | None]]],
    series: Sequence[str] = (),
    title: str = "",
    value_label: str = "",
    reference: tuple[float, str] | None = None,
    value_range: tuple[float, float] | None = None,
    width: int = 560,
    colours: Sequence[str] = PALETTE,
    value_format: str = "{:.3f}",
) -> str:
    """An inline SVG horizontal bar chart, optionally grouped, with an optional reference line.

    Args:
        bars: (category label, value) rows, top to bottom; with ``series``, the value is one
            number per series (a group of bars). A missing value is written "n/a", no bar.
        series: the names of the bars in a group (the legend); empty for one bar per row.
        title: the chart's title.
        value_label: the value axis' title.
        reference: (value, label) of a dashed vertical line, e.g. ``(0.5, "chance")``.
        value_range: the value axis' range; by default from 0 (or the lowest value) to round
            ticks above the highest.
        width: the chart's width in pixels (the height follows the rows).
        colours: the colours of the series, in order.
        value_format: how a value is written at the end of its bar.

    Returns:
        The ``<svg>`` element as text.
    """
    groups = [(label, list(value) if series else [value]) for label, value in bars]
    n = max(len(series), 1)
    bar_h, gap = 12, 10
    label_w = min(max((len(label) for label, _ in groups), default=4) * _CHAR_W + 12, 220)
    left, right = label_w + 8, 56
    pw = width - left - right
    legend, legend_h = _legend([(s, colours[i % len(colours)]) for i, s in enumerate(series)], left, 24 if title else 6, pw)
    top = (24 if title else 6) + legend_h + (14 if reference else 4)
    ph = len(groups) * (n * bar_h + gap)
    height = top + ph + 38
    values = [v for _, vs in groups for v in map(_finite, vs) if v is not None]
    if reference:
        values.append(reference[0])
    if value_range:
        v0, v1 = value_range
        ticks = nice_ticks(v0, v1)
    else:
        ticks = nice_ticks(min(0.0, *values) if values else 0.0, max(values, default=1.0))
        v0, v1 = ticks[0], ticks[-1]

    def px(v: float) -> float:
        return left + pw * (min(max(v, v0), v1) - v0) / ((v1 - v0) or 1.0)

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title or value_label)}" style="background:#fff">',
        f'<text x="8" y="16" font-size="13" font-weight="600">{esc(title)}</text>' if title else "",
        legend,
    ]
    for t in ticks:
        if v0 - 1e-12 <= t <= v1 + 1e-12:
            parts.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
            parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{esc(_tick(t))}</text>')
    for g, (label, vs) in enumerate(groups):
        y = top + g * (n * bar_h + gap) + gap / 2
        parts.append(
            f'<text x="{left - 6:.1f}" y="{y + n * bar_h / 2 + 4:.1f}" font-size="11" text-anchor="end">{esc(label)}</text>'
        )
        for i in range(n):
            v = _finite(vs[i]) if i < len(vs) else None
            yb = y + i * bar_h
            name = f"{label} · {series[i]}" if series else label
            if v is None:
                parts.append(f'<text x="{left + 3:.1f}" y="{yb + bar_h - 2:.1f}" font-size="10" fill="#888">n/a</text>')
                continue
            x_base, x_end = px(max(v0, min(0.0, v1))), px(v)
            parts.append(
                f'<rect x="{min(x_base, x_end):.1f}" y="{yb + 1:.1f}" width="{max(abs(x_end - x_base), 0.5):.1f}" '
                f'height="{bar_h - 2}" fill="{esc(colours[i % len(colours)])}"><title>{esc(name)}: {esc(value_format.format(v))}</title></rect>'
                f'<text x="{max(x_base, x_end) + 3:.1f}" y="{yb + bar_h - 2:.1f}" font-size="10">{esc(value_format.format(v))}</text>'
            )
    parts += [
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>',
        f'<text x="{left + pw / 2:.1f}" y="{top + ph + 30}" font-size="11" text-anchor="middle" fill="#555">{esc(value_label)}</text>',
    ]
    if reference:
        x = px(reference[0])
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + ph}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>'
            f'<text x="{x:.1f}" y="{top - 6}" font-size="10" fill="#d62728" text-anchor="middle">{esc(reference[1])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def page(title: str, subtitle: str, body: str) -> str:
    """A complete HTML document: inline style, inline script, no external resource."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f'<body><h1>{esc(title)}</h1><div class="meta">{esc(subtitle)}</div>{body}'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(path: str | Path, text: str) -> Path:
    """Write a page atomically (``tbps.files.write_text``); its directory is created when missing.

    Args:
        path: the ``.html`` file.
        text: the document, e.g. from :func:`page`.

    Returns:
        The path written.
    """
    return write_text(path, text)
