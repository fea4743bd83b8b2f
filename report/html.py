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
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from tbps import columns as C
from tbps.data.images import open_image
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


def thumbnail_uri(path: str | None, size: tuple[int, int] = THUMB_SIZE) -> tuple[str | None, str | None]:
    """A base64 JPEG ``data:`` URI of an image, shrunk to fit ``size``.

    Args:
        path: the image file.
        size: (width, height) bound of the thumbnail.

    Returns:
        (uri, None) when the image decoded, else (None, the reason).
    """
    res = open_image(path)
    if not res.ok:
        return None, f"{res.status}: {res.error}"
    im = res.image.copy()
    im.thumbnail(size)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def card(row: dict[str, Any], fields: Iterable[tuple[str, Any]]) -> str:
    """One contact-sheet card: thumbnail, the given numbers, the caption and the pair id."""
    uri, why = thumbnail_uri(row.get(C.IMAGE_PATH))
    pic = (
        f'<img src="{uri}" alt="{esc(Path(str(row.get(C.IMAGE_PATH))).name)}">'
        if uri
        else f'<div class="noimg" title="{esc(why)}">image unavailable<br>{esc((why or "").split(":")[0])}</div>'
    )
    nums = " · ".join((f"{esc(k)} " if k else "") + f'<span class="num">{esc(_num(v))}</span>' for k, v in fields)
    ident = row.get(C.PAIR_ID) or Path(str(row.get(C.IMAGE_PATH))).name
    return (
        f'<div class="card">{pic}<div>{nums}</div>'
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


def contact_sheet(rows: list[dict[str, Any]], fields: tuple[str, ...] = (C.SCORE, C.BANK_RANK)) -> str:
    """A wrap of cards, one per row, each showing ``fields`` (score, rank) above the caption."""
    if not rows:
        return "<p>(none)</p>"
    labels = {C.SCORE: "score", C.BANK_RANK: "rank", C.REASON: ""}
    cards = [card(r, [(labels.get(f, f), r.get(f)) for f in fields if f in r]) for r in rows]
    return '<div class="sheet">' + "".join(cards) + "</div>"


def grid_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain HTML table of escaped cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(_num(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="grid"><tr>{head}</tr>{body}</table>'


def svg_histogram(hist: Bins, thresholds: Iterable[Cut] = (), width: int = 520, height: int = 220) -> str:
    """An inline SVG bar chart of a histogram, each threshold on its column as a red dashed line.

    Args:
        hist: the histogram (edges, counts, ``log`` for power-of-two bins drawn at equal width,
            ``dropped`` stacked above the kept counts when not ``None``).
        thresholds: the cuts to draw; those on another column are skipped.
        width, height: the chart size in pixels.

    Returns:
        The ``<svg>`` element as text.
    """
    mine = [t for t in thresholds if t.column == hist.column]
    left, right, top, bottom = 48, 12, 28 + 13 * len(mine), 40
    pw, ph = width - left - right, height - top - bottom
    n = len(hist.counts)
    dropped = hist.dropped or [0] * n
    peak = max((k + d for k, d in zip(hist.counts, dropped)), default=0) or 1
    bw = pw / max(n, 1)
    legend = (
        f'<rect x="{width - 150}" y="6" width="10" height="10" fill="#4a7bb7"/><text x="{width - 136}" y="15" font-size="11">kept</text>'
        f'<rect x="{width - 100}" y="6" width="10" height="10" fill="#f0a04b"/><text x="{width - 86}" y="15" font-size="11">dropped</text>'
        if hist.dropped is not None
        else ""
    )
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="histogram of {esc(hist.column)}">',
        f'<text x="{left}" y="15" font-size="13" font-weight="600">{esc(hist.column)}'
        f'{" (log2 bins)" if hist.log else ""} · ok rows</text>{legend}',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{peak:,}</text>',
        f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">0</text>',
    ]
    for i, (count, gone) in enumerate(zip(hist.counts, dropped)):
        h, hd = ph * count / peak, ph * gone / peak
        lo, hi = hist.edges[i], hist.edges[i + 1]
        x, w = left + i * bw + 0.5, max(bw - 1, 0.5)
        # Kept rows at the bottom of the bar, dropped rows stacked above them.
        parts.append(
            f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="#4a7bb7">'
            f"<title>[{_num(lo)}, {_num(hi)}): {count:,} kept</title></rect>"
        )
        if gone:
            parts.append(
                f'<rect x="{x:.1f}" y="{top + ph - h - hd:.1f}" width="{w:.1f}" height="{hd:.1f}" fill="#f0a04b">'
                f"<title>[{_num(lo)}, {_num(hi)}): {gone:,} dropped</title></rect>"
            )
    ticks = range(0, n + 1, max(1, n // 6)) if not hist.log else range(0, n + 1, max(1, math.ceil(n / 8)))
    for i in ticks:
        x = left + i * bw
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="10" text-anchor="middle">{esc(_tick(hist.edges[i]))}</text>')
    for k, threshold in enumerate(mine):
        x = _x_of(hist, threshold.value, left, bw)
        outside = not hist.edges[0] <= threshold.value <= hist.edges[-1]
        parts.append(f'<line x1="{x:.1f}" y1="{top - 2}" x2="{x:.1f}" y2="{top + ph}" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>')
        anchor = "start" if x < left + pw * 0.6 else "end"
        label = threshold.label + (" (outside the range shown)" if outside else "")
        parts.append(
            f'<text x="{x:.1f}" y="{30 + 13 * k}" font-size="11" fill="#d62728" text-anchor="{anchor}">{esc(label)}</text>'
        )
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#555">{esc(hist.column)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tick(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


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
