"""The one exception type for bad input.

Core code raises :class:`TbpsError` when an input file, record, field or value is unusable;
``cli.py`` catches it once, prints it without a traceback and exits 1. Per-row problems in
large inputs are *not* exceptions: they become a ``status``/``error`` pair on the row.
"""

from __future__ import annotations


class TbpsError(Exception):
    """Bad input, described by where it was found and what was found there.

    Args:
        message: what is wrong, in a sentence.
        path: the file or directory concerned.
        record: the record (row index, pair id, key) concerned.
        field: the field (column, JSON key, option) concerned.
        value: the value found.
        hint: what the user can do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        record: object = None,
        field: str | None = None,
        value: object = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.record = record
        self.field = field
        self.value = value
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}")
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        text = f"{': '.join(where)}: {self.message}" if where else self.message
        if self.value is not None:
            shown = repr(self.value)
            if len(shown) > 200:
                shown = shown[:197] + "..."
            text += f" (found {shown})"
        if self.hint:
            text += f". {self.hint}"
        return text


class UsageError(TbpsError):
    """A bad combination of options or parameters; the CLI exits 2 and names the options."""
