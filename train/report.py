"""``RUN/report.html``: a training run's curves on one self-contained page (no network, inline SVG).

Drawn from ``RUN/log.jsonl`` (one line per log interval, ``kind: train``, and per validation,
``kind: val``) and ``RUN/run.json``:

* the training loss and the learning rate against the optimizer step, each on its own axis
  (a long run's points are averaged into at most :data:`MOST_POINTS` buckets, so the page stays
  small), and the throughput;
* one chart per validation metric (R@1, R@5, R@10, mAP, mINP) against the step, the best
  checkpoint's step marked (the first validation with the best R@1, then mAP, as the loop
  chooses it; else ``run.json``'s ``best``), and the validations as a table;
* the run's overview: status, steps, model, adapter, data, best metrics.

``tbps train`` writes it after each validation and at each checkpoint of ``last/``. The page is
one of the files :func:`tbps.train.checkpoint.recover` clears from a run killed before its first
``last/``, so such a run still restarts cleanly. Lines that do not parse
(a line torn by a kill) and values that are not finite numbers are left out, and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbps.eval.metrics import METRIC_KEYS
from tbps.models.runs import LOG_FILE, REPORT_FILE, RUN_MARKER
from tbps.report.html import Styled, grid_table, page, svg_line_chart, thin, write_html

MOST_POINTS = 1000  # points drawn per training curve; more are averaged in buckets
VAL_ROWS_SHOWN = 200  # validations listed in the table (all are drawn)
_LABELS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "mAP": "mAP", "mINP": "mINP"}


@dataclass
class TrainLog:
    """The lines of ``RUN/log.jsonl``, by kind.

    Attributes:
        train: the ``kind: train`` lines (step, loss, lr, img_per_s, ...), in file order.
        val: the ``kind: val`` lines (step, R1, R5, R10, mAP, mINP, queries, gallery).
        unreadable: lines that are not a JSON object (torn by a kill), left out.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    unreadable: int = 0


def read_log(run: str | Path) -> TrainLog:
    """Read ``RUN/log.jsonl`` (missing: an empty log).

    Args:
        run: the run directory.

    Returns:
        A :class:`TrainLog`.
    """
    log = TrainLog()
    path = Path(run) / LOG_FILE
    if not path.is_file():
        return log
    for text in path.read_text(errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if not isinstance(line, dict) or not _number(line.get("step")):
            log.unreadable += 1
            continue
        {"train": log.train, "val": log.val}.get(line.get("kind"), []).append(line)
    return log


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(lines: list[dict[str, Any]], key: str) -> list[tuple[float, float | None]]:
    """(step, value) of each line; a missing or non-finite value is ``None`` (a gap in the curve)."""
    return [(float(ln["step"]), float(ln[key]) if _number(ln.get(key)) else None) for ln in lines]


def best_step(record: dict[str, Any], val: list[dict[str, Any]]) -> int | None:
    """The best checkpoint's step: the first validation with the highest (R@1, mAP), as the loop picks it; else ``run.json``'s.

    The log comes first: right after a validation, ``run.json`` still names the previous best.
    """
    scored = [ln for ln in val if _number(ln.get("R1")) and _number(ln.get("mAP"))]
    if scored:
        return int(max(scored, key=lambda ln: (ln["R1"], ln["mAP"]))["step"])  # max keeps the first of equal ones
    best = record.get("best")
    return int(best["step"]) if isinstance(best, dict) and _number(best.get("step")) else None


def _record(run: Path) -> dict[str, Any]:
    try:
        record = json.loads((run / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def render_report(run: str | Path) -> str:
    """The ``RUN/report.html`` page of a run directory.

    Args:
        run: the run directory (its ``log.jsonl`` and ``run.json``; either may be missing).

    Returns:
        The HTML document as text.
    """
    run = Path(run)
    log, record = read_log(run), _record(run)
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    best = best_step(record, log.val)
    sections = ["<h2>Overview</h2>" + grid_table(["", "value"], _overview(record, config, log, best))]

    charts = [
        svg_line_chart({"loss": thin(_points(log.train, "loss"), MOST_POINTS)}, "step", "loss", title="Training loss",
                       width=390, show_legend=False),
        svg_line_chart({"lr": thin(_points(log.train, "lr"), MOST_POINTS)}, "step", "learning rate", title="Learning rate",
                       width=390, colours={"lr": "#ff7f0e"}, show_legend=False),
        svg_line_chart({"img/s": thin(_points(log.train, "img_per_s"), MOST_POINTS)}, "step", "images / s", title="Throughput",
                       width=390, colours={"img/s": "#7f7f7f"}, show_legend=False),
    ]
    sections.append('<h2>Training</h2><div class="charts">' + "".join(charts) + "</div>")

    keys = [k for k in METRIC_KEYS if any(_number(ln.get(k)) for ln in log.val)]
    if keys:
        marker = [(best, f"best checkpoint (step {best:,})")] if best is not None else []
        val_charts = [
            svg_line_chart({_LABELS[k]: _points(log.val, k)}, "step", f"{_LABELS[k]} (%)", title=f"Validation {_LABELS[k]}",
                           width=390, height=230, colours={_LABELS[k]: colour}, markers=marker, show_legend=False)
            for k, colour in zip(keys, ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#8c564b"))
        ]
        sections.append('<h2>Validation</h2><div class="charts">' + "".join(val_charts) + "</div>")
        shown = log.val[-VAL_ROWS_SHOWN:]
        rows = [[Styled(ln["step"], "strong") if ln["step"] == best else ln["step"], *(ln.get(k) for k in keys),
                 ln.get("queries"), ln.get("gallery")] for ln in shown]
        note = (f'<p class="note">The last {len(shown):,} of {len(log.val):,} validations.</p>' if len(shown) < len(log.val) else "")
        sections.append("<h3>Validations</h3>" + note + grid_table(["step", *(_LABELS[k] for k in keys), "queries", "gallery"], rows))
    else:
        sections.append('<h2>Validation</h2><p class="note">No validation in log.jsonl (the run was trained without --val, '
                        "or has not validated yet): the last checkpoint is the result.</p>")
    if log.unreadable:
        sections.append(f'<p class="note">{log.unreadable:,} line(s) of log.jsonl did not parse and are left out.</p>')
    title = f"tbps train: {run.resolve().name}"
    subtitle = f"{run} · {record.get('status', 'no run.json')} · step {record.get('step', '-')} of {record.get('total_steps', '-')}"
    return page(title, subtitle, "".join(sections))


def _overview(record: dict[str, Any], config: dict[str, Any], log: TrainLog, best: int | None) -> list[tuple[str, Any]]:
    """The overview table's rows: what ran, on what, how far, and the best checkpoint."""
    adapter = record.get("adapter") if isinstance(record.get("adapter"), dict) else {}
    params = record.get("parameters") if isinstance(record.get("parameters"), dict) else {}
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    training = record.get("training") if isinstance(record.get("training"), dict) else {}
    best_rec = record.get("best") if isinstance(record.get("best"), dict) else {}
    metrics = best_rec.get("metrics") if isinstance(best_rec.get("metrics"), dict) else {}
    last = log.train[-1] if log.train else {}
    rows: list[tuple[str, Any]] = [
        ("status", record.get("status", "-")),
        ("step", f"{record.get('step', last.get('step', '-'))} of {record.get('total_steps', '-')}"),
        ("model", config.get("model", "-")),
        ("adapter", f"{config.get('adapter', adapter.get('method', '-'))} (rank {config.get('rank', '-')})"),
        ("trainable parameters", params.get("trainable", "-")),
        ("data", f"{data.get('path', config.get('manifest') or config.get('data') or '-')}"
                 + (f" ({data['used']:,} pairs used)" if isinstance(data.get("used"), int) else "")),
        ("batch size × accum", f"{config.get('batch_size', '-')} × {config.get('accum', '-')}"),
        ("peak lr", config.get("lr", "-")),
        ("training time (s)", training.get("train_seconds", last.get("wall_s", "-"))),
        ("last loss", last.get("loss", "-")),
        ("result checkpoint", record.get("result_checkpoint", "-")),
        ("best step", best if best is not None else "-"),
    ]
    rows += [(f"best {_LABELS.get(k, k)}", v) for k, v in metrics.items()]
    return rows


def write_report(run: str | Path) -> Path:
    """Write ``RUN/report.html`` atomically from the run's log and record.

    Args:
        run: the run directory.

    Returns:
        The page's path.
    """
    return write_html(Path(run) / REPORT_FILE, render_report(run))
