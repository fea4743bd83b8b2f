"""The dataset-format registry: every format ``tbps`` reads, in detection order.

Each entry is a :class:`~tbps.data.formats.base.Format` built in its own module. To add a
format, write ``data/formats/NAME.py`` with a ``Format`` and add one line below; ``--format``,
the ``--help`` texts, detection and reading all go through :data:`FORMATS`.

Detection tries the formats in this order and the first whose ``detect`` says yes wins.
Webdataset shards come first: they claim ``.tar`` files, folders of them and patterns of
shards only, and a folder of img2dataset shards also holds ``.parquet`` and ``.json`` files. The
PEDES-style JSON formats claim ``.json`` files only (one that fits none of them is an error
naming their fields; a new JSON format joins their comparison in ``pedes.py``); tables and
caption files go by suffix; a directory is Parquet when it holds Parquet files, else an image
folder, which is why ``parquet`` comes before ``image-folder``.
"""

from __future__ import annotations

from tbps.data.formats import folder, pedes, tables, text, webdataset
from tbps.data.formats.base import Format

FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        webdataset.FORMAT,  # webdataset (first: a folder of shards also holds img2dataset's .parquet and .json files)
        *pedes.FORMATS,  # cuhk-pedes, icfg-pedes, rstpreid, aptm
        *tables.FORMATS,  # csv, jsonl, parquet
        folder.FORMAT,  # image-folder
        text.FORMAT,  # captions-txt
    )
}
