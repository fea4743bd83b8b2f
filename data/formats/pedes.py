"""PEDES-style JSON datasets: CUHK-PEDES, ICFG-PEDES, RSTPReid and APTM/MALS.

Each file is a JSON list of records, one image per record with one or more captions; the
formats differ in their field names (:data:`SPECS`). ``pair_id`` is ``"{record}:{caption}"``
(caption index 0 for one-caption records), ``source`` is the format name, ``split`` comes from
the record when present. ``person_id`` comes from the record's ``id``; APTM/MALS records have
none (their ``image_id`` names an image, not a person: 800 "persons" in a pool of 200
identities), so it is null unless ``--id-col FIELD`` names the field that holds one.

Several files read as one dataset (a directory of ``.json`` files, or a quoted pattern such
as ``'mals/*.json'``; MALS ships several): the files are read in sorted order, each file's
``pair_id`` is prefixed by its stem (``g_4x_attrs:0:0``) so ids are unique across the files and
the same on every run, and ``source`` is the stem, so ``select --quota`` tells the files apart.
Every file must hold records of the same format. A single file keeps the ids above.

Detection: a ``.json`` file is parsed once, and the format whose required fields most of the
first 1,000 records have wins (ties go to the earlier format); ICFG-PEDES has CUHK-PEDES's
fields and is told apart by its file name or its ``train/``/``test/`` paths. A ``.json`` file
whose records fit none of them is an error naming the fields each format expects. For several
files, the first one decides.

Wrong types are per-row ``bad-record`` statuses naming the record and field: an image path or
caption that is not a string, an id or split that is a list, an object, a boolean or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tbps.columns import STATUS_BAD_RECORD, STATUS_EMPTY_CAPTION
from tbps.data.formats.base import FILE_OR_DIRECTORY, ColumnOptions, Format, Peek, file_prefixes, load_json, type_name
from tbps.data.formats.rows import Rows, finish, id_text
from tbps.data.paths import ImageResolver
from tbps.errors import TbpsError

CUHK_PEDES = "cuhk-pedes"
ICFG_PEDES = "icfg-pedes"
RSTPREID = "rstpreid"
APTM = "aptm"

# Records looked at to detect a format and to name the keys found in error messages.
_SAMPLE = 1000


@dataclass(frozen=True)
class JsonSpec:
    """The fields of one JSON dataset format.

    Attributes:
        path_key: the image path field.
        captions_key: the caption field (a list of captions, or one caption string).
        id_key: the person id field; ``None`` for a format without person ids.
        fields: every field of a record, as the format documents it.
        images_dir: the image folder its releases ship next to the json.
    """

    path_key: str
    captions_key: str
    id_key: str | None
    fields: tuple[str, ...]
    images_dir: str

    @property
    def required(self) -> tuple[str, str]:
        """The fields a record needs to be read."""
        return (self.path_key, self.captions_key)


_CUHK_FIELDS = ("split", "captions", "file_path", "processed_tokens", "id")
# The releases of CUHK-PEDES, ICFG-PEDES and RSTPReid ship ``imgs/``; ``tbps synth`` writes
# its APTM-format pool beside ``images/``.
SPECS = {
    CUHK_PEDES: JsonSpec("file_path", "captions", "id", _CUHK_FIELDS, "imgs"),
    ICFG_PEDES: JsonSpec("file_path", "captions", "id", _CUHK_FIELDS, "imgs"),
    RSTPREID: JsonSpec("img_path", "captions", "id", ("id", "img_path", "captions", "split"), "imgs"),
    APTM: JsonSpec("image", "caption", None, ("image", "caption", "image_id", "label"), "images"),
}


# --------------------------------------------------------------------------- detection


def found_keys(records: list, limit: int = _SAMPLE) -> list[str]:
    """The keys seen in the first ``limit`` records (for error messages)."""
    keys: set[str] = set()
    for rec in records[:limit]:
        if isinstance(rec, dict):
            keys.update(map(str, rec))
    return sorted(keys)


def _expected_fields_text() -> str:
    return "; ".join(f"{name} expects {list(spec.fields)}" for name, spec in SPECS.items())


def json_format(path: Path, peek: Peek) -> str:
    """The JSON format whose required fields most of the first records have.

    Args:
        path: the ``.json`` file.
        peek: its parsed records.

    Returns:
        One of :data:`SPECS`'s names.

    Raises:
        TbpsError: the file is not a JSON list of records, or no record fits any format.
    """
    records = peek.json()
    sample = [r for r in records[:_SAMPLE] if isinstance(r, dict)]
    counts = {}
    for name in (CUHK_PEDES, RSTPREID, APTM):  # icfg-pedes shares CUHK's fields
        required = SPECS[name].required
        counts[name] = sum(1 for r in sample if all(k in r for k in required))
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        found = found_keys(records)
        kinds = sorted({type(r).__name__ for r in records[:_SAMPLE]})
        raise TbpsError(
            f"the records match none of the JSON formats: {_expected_fields_text()}; "
            f"found keys {found[:30]} in records of type {kinds}",
            path=path,
            hint="For another table, convert it to csv/jsonl/parquet and use --image-col/--caption-col",
        )
    if best == CUHK_PEDES and _looks_like_icfg(sample, path):
        return ICFG_PEDES
    return best


def _looks_like_icfg(sample: list[dict], path: Path) -> bool:
    """ICFG-PEDES has CUHK's fields; its name or its ``train/``/``test/`` paths tell it apart."""
    if "icfg" in path.name.lower():
        return True
    paths = [str(r.get("file_path", "")).replace("\\", "/") for r in sample[:100]]
    return bool(paths) and all(p.startswith(("train/", "test/")) for p in paths)


# --------------------------------------------------------------------------- reading


def _json_rows(records: list, spec: JsonSpec, id_key: str | None, prefix: str) -> Rows:
    """One row per caption of each record; problems become per-row statuses.

    Args:
        records: the parsed records.
        spec: the format's fields.
        id_key: the person id field (``None``: no person ids).
        prefix: put before every ``pair_id`` (the file's stem and ``:`` for several files).
    """
    rows = Rows()
    appends = tuple(col.append for col in (rows.pair_id, rows.rel, rows.caption, rows.person, rows.split, rows.status, rows.error))
    pid_a, rel_a, cap_a, per_a, spl_a, st_a, err_a = appends
    path_key, caps_key = spec.path_key, spec.captions_key
    for i, rec in enumerate(records):
        # Fast path for well-formed records (millions of them in MALS); anything unusual goes
        # to _record_rows, which names the field at fault.
        if type(rec) is dict and type(rel := rec.get(path_key)) is str:
            caps = rec.get(caps_key)
            if type(caps) is str:
                caps = (caps,)
            elif type(caps) is not list or not caps or not all(type(c) is str for c in caps):
                _record_rows(rows, i, rec, spec, id_key, prefix)
                continue
            person = rec.get(id_key) if id_key is not None else None
            split = rec.get("split")
            if (person is not None and type(person) is not str) or (split is not None and type(split) is not str):
                (person, bad_person), (split, bad_split) = id_text(person), id_text(split)
                if bad_person or bad_split:
                    _record_rows(rows, i, rec, spec, id_key, prefix)
                    continue
            for j, cap in enumerate(caps):
                pid_a(f"{prefix}{i}:{j}")
                rel_a(rel)
                cap_a(cap)
                per_a(person)
                spl_a(split)
                st_a(None)
                err_a(None)
        else:
            _record_rows(rows, i, rec, spec, id_key, prefix)
    return rows


def _record_rows(rows: Rows, i: int, rec: Any, spec: JsonSpec, id_key: str | None, prefix: str) -> None:
    """The rows of one record that is not plainly well formed, each problem named."""
    add = rows.add
    path_key, caps_key = spec.path_key, spec.captions_key
    if not isinstance(rec, dict):
        # Keep the record as a row so that nothing in the input disappears silently.
        add(f"{prefix}{i}:0", None, None, None, None, STATUS_BAD_RECORD, f"record {i} is not an object (found {type_name(rec)})")
        return
    rel = rec.get(path_key)
    problems = []
    if rel is None:
        problems.append(f"record {i}: missing field {path_key!r}")
    elif not isinstance(rel, str):
        problems.append(f"record {i}: field {path_key!r} is a {type_name(rel)}, not a string")
        rel = None
    person, bad_person = id_text(rec.get(id_key) if id_key is not None else None)
    split, bad_split = id_text(rec.get("split"))
    if bad_person:
        problems.append(f"record {i}: field {id_key!r} is {bad_person}")
    if bad_split:
        problems.append(f"record {i}: field 'split' is {bad_split}")
    problem = "; ".join(problems) or None
    caps = rec.get(caps_key)
    if isinstance(caps, str):
        caps = [caps]  # training files of APTM (and some CUHK exports) hold one caption
    if caps is None or not isinstance(caps, list):
        what = "missing field" if caps is None else f"field is a {type_name(caps)}, not a list or string:"
        msg = f"record {i}: {what} {caps_key!r}"
        add(f"{prefix}{i}:0", rel, None, person, split, STATUS_BAD_RECORD, f"{problem}; {msg}" if problem else msg)
        return
    if not caps:
        status = STATUS_BAD_RECORD if problem else STATUS_EMPTY_CAPTION
        add(f"{prefix}{i}:0", rel, None, person, split, status, problem or f"record {i}: {caps_key!r} is an empty list")
        return
    for j, cap in enumerate(caps):
        # Each caption is its own pair; a non-string caption spoils only its own row.
        if problem:
            add(f"{prefix}{i}:{j}", rel, cap if isinstance(cap, str) else None, person, split, STATUS_BAD_RECORD, problem)
        elif not isinstance(cap, str):
            msg = f"record {i}: {caps_key!r}[{j}] is a {type_name(cap)}, not a string"
            add(f"{prefix}{i}:{j}", rel, None, person, split, STATUS_BAD_RECORD, msg)
        else:
            add(f"{prefix}{i}:{j}", rel, cap, person, split)


def _file_pairs(path: Path, records: list, name: str, resolver: ImageResolver, id_key: str | None, id_given: bool,
                prefix: str, source: str) -> pl.DataFrame:
    """The pair table of one JSON file's records, read as format ``name``."""
    spec = SPECS[name]
    sample = [r for r in records[:_SAMPLE] if isinstance(r, dict)]
    if not any(all(k in r for k in spec.required) for r in sample):
        raise TbpsError(
            f"none of the first records has the fields {name} expects ({list(spec.fields)}, "
            f"required {list(spec.required)}); found keys {found_keys(records)[:30]}",
            path=path,
            field="format",
            hint="Leave --format out to detect the format, or pick the matching one",
        )
    if id_given and not any(id_key in r for r in sample):
        raise TbpsError(
            f"none of the first records has the field {id_key!r} (from --id-col); found keys {found_keys(records)[:30]}",
            path=path,
            field=id_key,
        )
    rows = _json_rows(records, spec, id_key, prefix)
    records.clear()  # our own parsed copy: free the records before the table is built
    return finish(**vars(rows), source=source, resolver=resolver)


def _read_json(path: Path, name: str, root: Path, peek: Peek, id_col: str | None) -> pl.DataFrame:
    """The pair table of a JSON file, or of several read as one dataset, read as format ``name``."""
    id_key = id_col if id_col is not None else SPECS[name].id_key
    resolver = ImageResolver(root)
    files = peek.files
    if files is None:
        if path.is_dir():
            raise TbpsError(f"the directory holds no .json files for the {name} format", path=path, field="format")
        return _file_pairs(path, peek.take_json(), name, resolver, id_key, id_col is not None, "", name)
    frames = []
    for k, (file, stem_) in enumerate(zip(files, file_prefixes(files))):
        # One file's records at a time: MALS files hold over a million records each.
        records = peek.take_json() if k == 0 else load_json(file)
        frames.append(_file_pairs(file, records, name, resolver, id_key, id_col is not None, f"{stem_}:", stem_))
    return pl.concat(frames)


def _pedes_format(name: str, description: str, files: str, **extra: Any) -> Format:
    """The :class:`Format` of one JSON spec."""
    images_dir = SPECS[name].images_dir

    def detect(path: Path, peek: Peek) -> bool:
        if peek.files is None:
            return peek.suffix == ".json" and not path.is_dir() and json_format(path, peek) == name
        try:
            return json_format(peek.json_path, peek) == name
        except TbpsError as exc:
            if path.is_dir():
                more = "to read the folder as images with .txt captions, pass --format image-folder"
                exc.hint = f"{exc.hint}; {more}" if exc.hint else more
            raise

    def read(path: Path, options: ColumnOptions, root: Path | None, captions_only: bool, peek: Peek) -> pl.DataFrame:
        return _read_json(path, name, root, peek, options.id_col)

    def default_root(path: Path) -> Path:
        # The release's image folder beside the json (inside a folder of several) when it is
        # there, else the json's folder.
        folder = path if path.is_dir() else path.parent
        return folder / images_dir if (folder / images_dir).is_dir() else folder

    return Format(name, description, files, detect, read, default_root, path_kind=FILE_OR_DIRECTORY, **extra)


_SEVERAL = "; a folder of `.json` files or a quoted pattern (`'dir/*.json'`) is one dataset"

FORMATS = (
    _pedes_format(
        CUHK_PEDES,
        "a list of `{split, captions, file_path, processed_tokens, id}`; images resolve in `imgs/` next to the file by default",
        "`reid_raw.json` (also `CUHK-PEDES.json`, `caption_all.json`)",
    ),
    _pedes_format(
        ICFG_PEDES,
        "CUHK-PEDES's fields; told apart by the file name or its `train/`/`test/` paths; images in `imgs/`",
        "`ICFG-PEDES.json`",
    ),
    _pedes_format(
        RSTPREID,
        "a list of `{id, img_path, captions, split}`; images in `imgs/`",
        "`data_captions.json`",
    ),
    _pedes_format(
        APTM,
        "`{image, caption, image_id, label}`; train: one caption per record; test: caption lists; "
        "no person ids (`image_id` names an image; `--id-col image_id` reads it as the person id); images in `images/`",
        f"APTM/MALS processed json{_SEVERAL}",
        columns=frozenset({"id_col"}),
        no_person_ids="none in this format: MALS's image_id names an image, not a person (--id-col image_id reads it as one)",
    ),
)
