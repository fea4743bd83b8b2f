"""Keeping one split of a pair table: the one selector ``tbps eval`` and ``tbps train`` share.

The two callers differ only in their parameters:

* ``tbps eval`` (the defaults): no split asked means ``test`` when the data has splits and
  every row when it has none; a split the data lacks is an error, also when the data has no
  splits at all.
* ``tbps train`` (``default=None, strict=False, what="--data"``): no split asked means every
  row; a data file without splits gives every row whatever split was asked (``--train-split
  train`` is the default); a split missing from a file that has splits is an error naming the
  option.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tbps.columns import SPLIT
from tbps.errors import TbpsError

TEST_SPLIT = "test"


def splits_of(pairs: pl.DataFrame) -> list[str]:
    """The split names present in a pair table, sorted (nulls left out)."""
    return sorted(s for s in pairs.get_column(SPLIT).unique().to_list() if s is not None)


def select_split(
    pairs: pl.DataFrame,
    split: str | None,
    *,
    default: str | None = TEST_SPLIT,
    strict: bool = True,
    what: str | None = None,
    path: str | Path | None = None,
) -> tuple[pl.DataFrame, str | None]:
    """The rows of one split of a pair table.

    Args:
        pairs: a pair table (``PAIR_SCHEMA``).
        split: the split asked for, or ``None``.
        default: the split taken when none is asked and the data has splits; ``None`` keeps
            every row then.
        strict: a split asked of data without any split is an error; ``False`` keeps every row.
        what: the option that named the data (``--data``, ``--val``); the message of a missing
            split then names it, the file (``path``) and the splits it has.
        path: the data's path, for messages.

    Returns:
        (the rows of the split, the split name used or ``None`` for all rows).

    Raises:
        TbpsError: the split asked (or the default) is not in the data.
    """
    found = splits_of(pairs)
    if split is None:
        if default is None or not found:
            return pairs, None
        if default not in found:
            raise TbpsError(
                f"the data has splits but no {default!r} split",
                field=SPLIT,
                value=found,
                hint="name one with --split",
            )
        split = default
    if not found and not strict:
        return pairs, None
    if split not in found:
        if what is not None:
            raise TbpsError(
                f"split {split!r} not found in {what}",
                path=path,
                field=SPLIT,
                value=split,
                hint=f"splits in the file: {', '.join(found)}",
            )
        raise TbpsError(f"no rows of split {split!r}", path=path, field=SPLIT, value=found or "no splits in the data")
    return pairs.filter(pl.col(SPLIT) == split), split
