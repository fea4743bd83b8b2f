"""The edges of ``tbps select``: reading score tables, writing the manifest, its sidecar and drop table.

Inputs (each of ``SelectConfig.scores``):

* a ``tbps score`` output directory (it has ``score.json``; :mod:`tbps.curate.layout`):
  ``DIR/scores/part-*.parquet`` and, for near de-duplication, ``DIR/embeddings/part-*.parquet``
  (temporaries skipped);
* a directory of Parquet part files (``*.parquet``, hidden files skipped);
* a single Parquet file.

Outputs, each written through :func:`tbps.files.atomic_write` (a temporary renamed into place
when complete); the two Parquet files only when both were written, the sidecar last, so its
presence means the set is complete:

* ``OUT`` (default ``manifests/<name>.parquet``): the kept rows, ``columns.SCORE_SCHEMA``,
  in input order; no time inside, so the same inputs and parameters give the same bytes;
* ``<OUT stem>.dropped.parquet``: ``columns.DROP_SCHEMA``, every dropped row with its reason;
* ``<OUT stem>.json``: provenance (``tbps.provenance.record``): the config, the inputs and
  outputs with content hashes (``hash``, and its algorithm in ``hash_algo``: ``tbps.files.HASH_ALGO``),
  what each rule resolved to (``resolved.scores_used``: the score that ordered the rows and the
  column each threshold applied to), rows after each step, score quantiles (and ``itm_quantiles``
  when the selection used ``itm_score``), truth metrics, versions, git commit, time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import pyarrow.parquet as pq

from tbps import columns as C
from tbps.curate.layout import RECORD_FILE, SCORES_DIR, ScoreDir, list_parts
from tbps.curate.select import ITM_HINT, SPLIT_STEP, SelectConfig, Selection, check_columns, itm_options, select
from tbps.curate.truth import truth_metrics
from tbps.errors import TbpsError
from tbps.files import HASH_ALGO, atomic_write, file_hash, sweep_temps, write_json
from tbps.provenance import record as provenance_record

MANIFESTS_DIR = "manifests"
ROW_GROUP = 1 << 18  # fixed row-group size: part of what makes the bytes reproducible


@dataclass
class ScoreInputs:
    """The score tables of a run, read lazily.

    Attributes:
        scores: all score rows (the tables concatenated in the order given).
        embeddings: all embedding rows, or None when some input has none.
        bank_size: the bank size shared by the inputs (None when unknown or mixed).
        tables: one record per input: path, kind, files with sizes and content hashes, rows, model.
        warnings: mixed models or bank sizes.
        without_split: the inputs whose tables have no ``split`` column (written before
            ``tbps score`` carried it); ``--split`` refuses them.
        without_itm: the inputs whose tables have no ``itm_score`` column (their model had no
            matching head); ``--by itm_score`` and ``--min-itm`` refuse them.
    """

    scores: pl.LazyFrame
    embeddings: pl.LazyFrame | None
    bank_size: int | None
    tables: list[dict]
    warnings: list[str] = field(default_factory=list)
    without_split: list[str] = field(default_factory=list)
    without_itm: list[str] = field(default_factory=list)


@dataclass
class OutputPaths:
    """Where a selection is written."""

    manifest: Path
    sidecar: Path
    dropped: Path


@dataclass
class SelectRun:
    """A finished ``tbps select``: the selection, where it went, and its provenance record."""

    config: SelectConfig
    selection: Selection
    paths: OutputPaths
    record: dict
    inputs: ScoreInputs


def _file_entry(path: Path, *, hash_now: bool = True) -> dict:
    """A file as provenance records it: path, size and content hash (None: filled in later)."""
    return {"path": str(path), "bytes": path.stat().st_size, "hash": file_hash(path) if hash_now else None, "hash_algo": HASH_ALGO}


def _parquet_files(directory: Path) -> list[Path]:
    """The Parquet files of a directory of parts (hidden files, temporaries among them, skipped)."""
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def _file_meta(path: Path) -> tuple[pl.Schema, int, dict[str, str]]:
    """Schema, row count and key-value metadata from a Parquet footer, or a TbpsError."""
    try:
        meta = pq.read_metadata(path)
        schema = pl.read_parquet_schema(path)
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise TbpsError(f"not a readable Parquet file ({type(exc).__name__}: {exc})", path=path) from None
    kv = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (meta.metadata or {}).items()}
    return pl.Schema(schema), meta.num_rows, kv


def _resolve(path: Path) -> tuple[str, list[Path], list[Path], dict | None]:
    """(kind, score files, embedding files, score.json) of one input path."""
    if not path.exists():
        raise TbpsError("no such file or directory", path=path)
    if path.is_file():
        return "parquet-file", [path], [], None
    run = ScoreDir(path)
    if run.is_complete():
        try:
            record = json.loads(run.record.read_text())
        except (OSError, ValueError) as exc:
            raise TbpsError(f"unreadable {RECORD_FILE} ({exc})", path=run.record) from None
        files = list_parts(run.scores)
        if not files:
            raise TbpsError(f"score run without part files in {SCORES_DIR}/", path=path)
        return "score-run", files, list_parts(run.embeddings), record
    if run.scores.is_dir():
        raise TbpsError(
            f"incomplete score run: {SCORES_DIR}/ exists but {RECORD_FILE} does not",
            path=path,
            hint="finish the run (re-running the same `tbps score` command resumes it), or pass its scores/ directory",
        )
    files = _parquet_files(path)
    if not files:
        raise TbpsError("directory holds no .parquet files", path=path)
    return "parquet-dir", files, [], None


def read_inputs(paths: Sequence[str | Path], *, need_embeddings: bool = False, hash_files: bool = True) -> ScoreInputs:
    """Open score tables lazily, check their columns, and hash their files.

    Args:
        paths: score run directories, directories of Parquet parts, or Parquet files.
        need_embeddings: also open the embeddings (every input must be a score run with them).
        hash_files: fill in each file's content hash now (else ``None``: see :func:`hash_inputs`).

    Returns:
        :class:`ScoreInputs`.

    Raises:
        TbpsError: a missing or unreadable input, missing columns, missing embeddings.
    """
    if not paths:
        raise TbpsError("no score tables given")
    scans, emb_scans, tables, warnings, without_split, without_itm = [], [], [], [], [], []
    bank_sizes, models, dims = set(), set(), set()
    for raw in paths:
        path = Path(raw)
        kind, files, emb_files, record = _resolve(path)
        rows, model, bank = 0, None, None
        hashed = []
        for f in files:
            schema, n, kv = _file_meta(f)
            check_columns(schema, where=f)
            if C.SPLIT not in schema and str(path) not in without_split:
                without_split.append(str(path))
            if C.ITM_SCORE not in schema and str(path) not in without_itm:
                without_itm.append(str(path))
            rows += n
            model = model or kv.get("tbps.model")
            bank = bank or kv.get("tbps.bank_size")
            hashed.append(_file_entry(f, hash_now=hash_files))
            scans.append(pl.scan_parquet(f))
        if bank is None and record is not None:
            bank = (record.get("config") or {}).get("bank_size") or record.get("bank_size")
        table = {"path": str(path.resolve()), "kind": kind, "rows": rows, "files": hashed, "bank_size": int(bank) if bank else None}
        if model:
            try:
                table["model"] = json.loads(model)
            except ValueError:
                table["model"] = model
            models.add(json.dumps(table["model"], sort_keys=True))
        if record is not None:
            table["score_record"] = _file_entry(ScoreDir(path).record)
        if need_embeddings:
            if not emb_files:
                raise TbpsError(
                    "near de-duplication needs embeddings, and this input has none",
                    path=path,
                    hint="pass the `tbps score` output directory (it holds embeddings/), or drop --dedup-threshold",
                )
            table["embedding_files"] = []
            for f in emb_files:
                schema, _, _ = _file_meta(f)
                missing = [c for c in (C.PAIR_ID, C.IMAGE_EMB, C.TEXT_EMB) if c not in schema]
                if missing:
                    raise TbpsError(
                        f"not an embeddings table: missing column(s) {', '.join(missing)}; expected {C.PAIR_ID}, {C.IMAGE_EMB}, {C.TEXT_EMB}; "
                        f"found {', '.join(schema.names())}",
                        path=f,
                    )
                dims.add(str(schema[C.IMAGE_EMB]))
                table["embedding_files"].append(_file_entry(f, hash_now=hash_files))
                emb_scans.append(pl.scan_parquet(f).select(C.PAIR_ID, C.IMAGE_EMB, C.TEXT_EMB))
        bank_sizes.add(table["bank_size"])
        tables.append(table)
    if len(dims) > 1:
        raise TbpsError(f"the inputs' embeddings have different shapes ({', '.join(sorted(dims))})", field=C.IMAGE_EMB)
    if len(models) > 1:
        warnings.append("the inputs were scored by different models; their scores are not on one scale")
    known = {b for b in bank_sizes if b is not None}
    bank_size = known.pop() if len(known) == 1 and None not in bank_sizes else None
    if len(known) > 1:
        warnings.append(f"the inputs were ranked against banks of different sizes ({', '.join(str(b) for b in sorted(known))})")
    scores = pl.concat(scans, how="diagonal_relaxed") if len(scans) > 1 else scans[0]
    embeddings = (pl.concat(emb_scans) if len(emb_scans) > 1 else emb_scans[0]) if need_embeddings else None
    return ScoreInputs(scores=scores, embeddings=embeddings, bank_size=bank_size, tables=tables, warnings=warnings,
                       without_split=without_split, without_itm=without_itm)


def hash_inputs(tables: list[dict]) -> threading.Thread:
    """Fill in the missing content hash of every input file, in a background thread.

    Hashing 1 GB takes about a second; a thread overlaps it with the single-threaded parts of
    the selection (hashlib and file reads release the GIL). ``join()`` the thread before
    using the hashes; a file that cannot be read gets ``"error: ..."`` instead of a digest.
    """

    def work() -> None:
        for table in tables:
            for entry in table["files"] + table.get("embedding_files", []):
                if entry["hash"] is None:
                    try:
                        entry["hash"] = file_hash(entry["path"])
                    except OSError as exc:
                        entry["hash"] = f"error: {exc}"

    thread = threading.Thread(target=work, name="tbps-hash-inputs", daemon=True)
    thread.start()
    return thread


def output_paths(config: SelectConfig) -> OutputPaths:
    """The manifest, sidecar and drop-table paths of a config (``--out`` or ``--name``)."""
    if config.out:
        manifest = Path(config.out)
    else:
        first = Path(config.scores[0]) if config.scores else Path("selection")
        name = config.name or (first.name if first.is_dir() else first.stem) or "selection"
        manifest = Path(MANIFESTS_DIR) / f"{name}.parquet"
    stem = manifest.name[: -len(".parquet")] if manifest.name.endswith(".parquet") else manifest.name
    return OutputPaths(
        manifest=manifest,
        sidecar=manifest.with_name(f"{stem}.json"),
        dropped=manifest.with_name(f"{stem}.dropped.parquet"),
    )


def read_truth(path: str | Path) -> pl.DataFrame:
    """The synthetic world's defect sidecar (``columns.TRUTH_SCHEMA``), checked.

    Raises:
        TbpsError: a missing file or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise TbpsError("no such truth file", path=path)
    schema, _, _ = _file_meta(path)
    missing = [c for c in (C.PAIR_ID, C.DEFECT) if c not in schema]
    if missing:
        raise TbpsError(
            f"not a truth sidecar: missing column(s) {', '.join(missing)}; expected {', '.join(C.TRUTH_SCHEMA.names)}; "
            f"found {', '.join(schema.names())}",
            path=path,
        )
    return pl.read_parquet(path, columns=[c for c in (C.PAIR_ID, C.DEFECT, C.DUPLICATE_OF) if c in schema])


def _check_writable(paths: OutputPaths) -> None:
    """Refuse outputs that cannot be written before any work is done."""
    for path in (paths.manifest, paths.dropped, paths.sidecar):
        if path.is_dir():
            raise TbpsError("the output path is a directory", path=path, field="out", hint="give --out a .parquet file name")
    parent = paths.manifest.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TbpsError("cannot create the output directory here", path=parent, field="out")


def run_select(config: SelectConfig, *, log: Callable[[str], None] | None = None) -> SelectRun:
    """Read the score tables, select, measure against the truth if given, and write the outputs.

    Nothing is written unless the selection succeeds; the manifest and the drop table are
    renamed into place from temporaries when both are complete, the sidecar is written last.

    Args:
        config: the selection.
        log: called with progress lines (stderr in the CLI).

    Returns:
        A :class:`SelectRun`.

    Raises:
        TbpsError: bad input (nothing is written).
    """
    t0 = time.perf_counter()
    say = (lambda msg: log(f"[{time.perf_counter() - t0:6.1f}s] {msg}")) if log else (lambda _msg: None)
    inputs = read_inputs(config.scores, need_embeddings=config.dedup_threshold is not None, hash_files=False)
    hashing = hash_inputs(inputs.tables)
    mixed_banks = len({t["bank_size"] for t in inputs.tables}) > 1
    if mixed_banks and (config.rule or config.max_bank_rank is not None or config.by == "bank_rank"):
        raise TbpsError(
            "bank ranks from banks of different sizes cannot be compared: "
            + ", ".join(f"{t['path']} ({t['bank_size']})" for t in inputs.tables),
            field="bank_rank",
            hint="select each table separately, or use --min-score and --by score",
        )
    if config.splits and inputs.without_split:
        raise TbpsError(
            "--split: the score table has no split column (it was written by a tbps score that did not carry splits)",
            path=inputs.without_split[0],
            field="split",
            hint="Score the dataset again to select by split, or drop --split",
        )
    if config.uses_itm and inputs.without_itm:
        raise TbpsError(
            f"{itm_options(config)}: this score table has no {C.ITM_SCORE} column (its model has no image-text matching head)",
            path=inputs.without_itm[0],
            field=C.ITM_SCORE,
            hint=ITM_HINT,
        )
    truth = read_truth(config.truth) if config.truth else None
    paths = output_paths(config)
    _check_writable(paths)
    t_read = time.perf_counter()
    selection = select(inputs.scores, config, embeddings=inputs.embeddings, bank_size=inputs.bank_size, log=say)
    selection.warnings[:0] = inputs.warnings
    t_select = time.perf_counter()
    if truth is not None:
        # Rows of other splits were never candidates: the filter is judged on the splits selected.
        in_scope = selection.outcome.filter(pl.col(C.STEP).is_null() | (pl.col(C.STEP) != SPLIT_STEP))
        selection.truth = truth_metrics(in_scope, truth)
    sweep_temps(paths.manifest.parent)  # what a killed run left
    say(f"writing {paths.manifest} and {paths.dropped.name}")
    meta = {"tbps.select": json.dumps({"config": _config_dict(config), "resolved": selection.resolved}, sort_keys=True, default=str)}
    models = [t["model"] for t in inputs.tables if "model" in t]
    if models:
        meta["tbps.model"] = json.dumps(models[0], sort_keys=True)
    with atomic_write(paths.dropped) as dropped_file, atomic_write(paths.manifest) as manifest_file, ThreadPoolExecutor(1) as pool:
        # The drop table is written while the manifest streams (Polars releases the GIL).
        dropped = pool.submit(lambda: selection.dropped().write_parquet(dropped_file, compression_level=1, row_group_size=ROW_GROUP))
        selection.manifest.sink_parquet(manifest_file, metadata=meta, compression_level=1, row_group_size=ROW_GROUP)
        dropped.result()
    t_write = time.perf_counter()
    hashing.join()
    timings = {
        "read_inputs_s": round(t_read - t0, 3),
        "select_s": round(t_select - t_read, 3),
        "write_s": round(t_write - t_select, 3),
        **selection.timings,
    }
    record = _record(config, selection, inputs, paths, timings=timings)
    write_json(paths.sidecar, record)
    return SelectRun(config=config, selection=selection, paths=paths, record=record, inputs=inputs)


def _config_dict(config: SelectConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _record(config: SelectConfig, selection: Selection, inputs: ScoreInputs, paths: OutputPaths, timings: dict) -> dict:
    kept = selection.rows_kept
    return provenance_record(
        config,
        inputs=inputs.tables,
        outputs={
            "manifest": {"path": str(paths.manifest), "rows": kept, "hash": file_hash(paths.manifest), "hash_algo": HASH_ALGO},
            "dropped": {"path": str(paths.dropped), "rows": selection.rows_in - kept, "hash": file_hash(paths.dropped), "hash_algo": HASH_ALGO},
        },
        rows_in=selection.rows_in,
        rows_kept=kept,
        steps=[{"step": s.step, "rows_in": s.rows_in, "dropped": s.dropped, "rows_out": s.rows_out} for s in selection.steps],
        resolved=selection.resolved,
        quantiles=selection.quantiles(),
        **({"itm_quantiles": selection.quantiles(column=C.ITM_SCORE)} if config.uses_itm else {}),
        truth=selection.truth,
        warnings=selection.warnings,
        notes=selection.notes,
        timings=timings,
    )


def drop_reasons(selection: Selection) -> pl.DataFrame:
    """Dropped rows per step and reason, most first (``--explain``).

    Args:
        selection: a finished selection.

    Returns:
        Columns ``step``, ``reason`` and ``len``; every ``duplicate-of:<id>`` reason of a step
        counted as one ``duplicate-of:<pair_id>``.
    """
    return (
        selection.outcome.filter(pl.col(C.STEP).is_not_null())
        .group_by(pl.col(C.STEP), pl.col(C.REASON).str.replace(r"^duplicate-of:.*", "duplicate-of:<pair_id>").alias(C.REASON))
        .len()
        .sort(["len", C.STEP], descending=[True, False])
    )
