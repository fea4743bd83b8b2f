"""The one split selector: eval's defaults and train's, as a behaviour table."""

from __future__ import annotations

import polars as pl
import pytest

from tbps.columns import SPLIT
from tbps.data.splits import select_split
from tbps.errors import TbpsError

SPLIT_DATA = pl.DataFrame({SPLIT: ["train", "train", "val", "test"]})
UNSPLIT = pl.DataFrame({SPLIT: [None, None]}, schema={SPLIT: pl.String})
TRAIN = {"default": None, "strict": False, "what": "--data", "path": "pairs.csv"}  # tbps train's parameters


@pytest.mark.parametrize(
    "pairs, split, kwargs, expected",
    [
        # tbps eval (the defaults): test by default, every row of data without splits
        (SPLIT_DATA, None, {}, ("test", 1)),
        (SPLIT_DATA, "val", {}, ("val", 1)),
        (UNSPLIT, None, {}, (None, 2)),
        (SPLIT_DATA.filter(pl.col(SPLIT) != "test"), None, {}, "the data has splits but no 'test' split"),
        (SPLIT_DATA, "dev", {}, "no rows of split 'dev'"),
        (UNSPLIT, "test", {}, r"no rows of split 'test'.*no splits in the data"),
        # tbps train: every row when no split is asked or the file has none
        (SPLIT_DATA, "train", TRAIN, ("train", 2)),
        (SPLIT_DATA, None, TRAIN, (None, 4)),
        (UNSPLIT, "train", TRAIN, (None, 2)),
        (SPLIT_DATA, "dev", TRAIN, r"pairs.csv: field 'split': split 'dev' not found in --data.*splits in the file: test, train, val"),
    ],
)
def test_select_split(pairs, split, kwargs, expected):
    if isinstance(expected, str):
        with pytest.raises(TbpsError, match=expected):
            select_split(pairs, split, **kwargs)
        return
    rows, used = select_split(pairs, split, **kwargs)
    assert (used, rows.height) == expected
