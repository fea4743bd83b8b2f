"""Training logs besides ``RUN/log.jsonl``: ``RUN/log.csv`` and TensorBoard event files (``tbps train --log-to``).

``log.jsonl`` stays the record (always written, by the loop: :func:`tbps.train.checkpoint.append_log`);
the other targets mirror it, the same lines and the same numbers. :class:`LogSinks` follows the
file while training appends to it: :meth:`LogSinks.follow` wraps the ``progress`` callback of
:func:`tbps.train.loop.train`, which the loop calls on rank 0 after each step's log and
validation lines, so the loop itself is unchanged and the mirrors are never ahead of the record.

Resume: the sinks open at the first progress report of a process, after a resumed run has cut
``log.jsonl`` back to its checkpoint (:func:`~tbps.train.checkpoint.truncate_log`). Opening
rewrites each target from ``log.jsonl``, so a resumed run's CSV has no rows past the checkpoint
and none twice, and its TensorBoard directory holds one event file with each step once (the
earlier event files are removed; the new one starts with TensorBoard's purge marker at step 0,
so a TensorBoard that is already reading the directory drops what it had). From then on each
new line is appended. A target left out of ``--log-to`` on a resume is left as it was.

``log.csv``
    One header, one row per ``log.jsonl`` line (``kind`` is ``train`` or ``val``); the columns
    are every key seen, in first-seen order (``kind, step, epoch, loss, lr, img_per_s, wall_s``,
    then the validation metrics). A key first seen later rewrites the file with the wider header.
``tensorboard/``
    Written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package, the
    ``tbps[tensorboard]`` extra): every number of a line as the scalar ``KIND/KEY``
    (``train/loss``, ``train/lr``, ``train/img_per_s``, ``val/R1``, ``val/mAP``, ...) at
    ``global_step = step``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Callable

from tbps.errors import UsageError
from tbps.files import write_text
from tbps.models.runs import CSV_LOG_FILE, LOG_FILE, TENSORBOARD_DIR

LOG_TARGETS = ("jsonl", "csv", "tensorboard")  # jsonl is always written
TENSORBOARD_EXTRA = "tbps[tensorboard]"
_EVENTS = "events.out.tfevents.*"  # the event files SummaryWriter writes
_NOT_SCALARS = ("kind", "step")


def parse_log_to(values: list[str] | str | None) -> tuple[str, ...]:
    """The targets ``--log-to`` names besides ``log.jsonl``, checked (repeat the option or comma-separate).

    Args:
        values: the option's values, e.g. ``["tensorboard,csv"]``; None: jsonl only.

    Returns:
        ``csv`` and/or ``tensorboard``, each once, in the order given.

    Raises:
        UsageError: an unknown target, or ``tensorboard`` without the tensorboard package.
    """
    if isinstance(values, str):
        values = [values]
    names = [t.strip() for item in values or () for t in str(item).split(",") if t.strip()]
    for name in names:
        if name not in LOG_TARGETS:
            raise UsageError(f"--log-to takes {', '.join(LOG_TARGETS)}", field="--log-to", value=name)
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(f"--log-to tensorboard needs the tensorboard package: pip install '{TENSORBOARD_EXTRA}'", field="--log-to", value="tensorboard")
    return tuple(dict.fromkeys(n for n in names if n != "jsonl"))


def _lines(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of complete log lines (a line a kill tore is skipped, as truncate_log drops it)."""
    found = []
    for text in data.decode("utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            found.append(line)
    return found


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """A log line's numbers as TensorBoard tags: ``{"train/loss": 2.31, "train/lr": 3e-4, ...}``."""
    kind = line.get("kind", "train")
    return {
        f"{kind}/{key}": float(value)
        for key, value in line.items()
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class LogSinks:
    """Mirror ``RUN/log.jsonl`` into ``RUN/log.csv`` and ``RUN/tensorboard/`` as training writes it.

    Use it around :func:`tbps.train.loop.train`, on every rank (only rank 0 reports progress, so
    only rank 0 writes)::

        with LogSinks(config.out, ("csv", "tensorboard")) as sinks:
            train(config, progress=sinks.follow(progress))

    Args:
        run: the run directory.
        targets: ``csv`` and/or ``tensorboard`` (see :func:`parse_log_to`); none: a no-op.
    """

    def __init__(self, run: str | Path, targets: tuple[str, ...] | list[str]) -> None:
        self.run = Path(run)
        self.targets = tuple(targets)
        self._offset: int | None = None  # bytes of log.jsonl mirrored so far; None: not opened yet
        self._columns: list[str] = []
        self._writer = None  # SummaryWriter, created with the first line

    def __enter__(self) -> LogSinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def follow(self, progress: Callable[[int, int], None] | None = None) -> Callable[[int, int], None]:
        """A progress callback that brings the targets up to date with log.jsonl, then calls ``progress``."""

        def update(step: int, total: int) -> None:
            self.sync()
            if progress is not None:
                progress(step, total)

        return update

    def sync(self) -> None:
        """Write the lines log.jsonl gained since the last call (everything, the first time)."""
        if not self.targets:
            return
        path = self.run / LOG_FILE
        size = path.stat().st_size if path.exists() else 0
        if self._offset is None or size < self._offset:  # first call, or the log was cut back: mirror it afresh
            self._open()
            return
        if size == self._offset:
            return
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self._offset += len(complete)
        self._write(_lines(complete))

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- the targets -----------------------------------------------------------------

    def _read_all(self) -> list[dict[str, Any]]:
        path = self.run / LOG_FILE
        data = path.read_bytes() if path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        self._offset = len(complete)
        return _lines(complete)

    def _open(self) -> None:
        lines = self._read_all()
        if "csv" in self.targets:
            self._rewrite_csv(lines)
        if "tensorboard" in self.targets:
            self.close()
            for old in (self.run / TENSORBOARD_DIR).glob(_EVENTS):
                old.unlink()  # replaced by the file written from log.jsonl below
            self._tensorboard(lines)

    def _write(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        if "csv" in self.targets:
            if any(key not in self._columns for line in lines for key in line):
                self._rewrite_csv(self._read_all())  # a new column: one header for every row
            else:
                with open(self.run / CSV_LOG_FILE, "a", newline="") as f:
                    writer = csv.writer(f, lineterminator="\n")
                    writer.writerows([_cell(line.get(key)) for key in self._columns] for line in lines)
        if "tensorboard" in self.targets:
            self._tensorboard(lines)

    def _rewrite_csv(self, lines: list[dict[str, Any]]) -> None:
        path = self.run / CSV_LOG_FILE
        self._columns = list(dict.fromkeys(key for line in lines for key in line))
        if not lines:
            if path.exists():
                path.unlink()  # nothing logged (yet): no file, as log.jsonl has none
            return
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self._columns)
        writer.writerows([_cell(line.get(key)) for key in self._columns] for line in lines)
        write_text(path, buffer.getvalue())

    def _tensorboard(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency (tbps[tensorboard]): only for --log-to tensorboard

            # purge_step=0: a TensorBoard reading the directory forgets the event files removed before.
            self._writer = SummaryWriter(log_dir=str(self.run / TENSORBOARD_DIR), purge_step=0)
        for line in lines:
            step = int(line.get("step", 0))
            for tag, value in scalars(line).items():
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
