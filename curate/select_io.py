"""The edges of ``tbps select``: reading score tables, writing the manifest, its sidecar and drop table.

Inputs (each of ``SelectConfig.scores``):

* a ``tbps score`` output directory (it has ``score.json``): ``DIR/scores/*.parquet`` and,
  for near de-duplication, ``DIR/embeddings/*.parquet``;
* a directory of Parquet part files (``*.parquet``, hidden files skipped);
* a single Parquet file.

Outputs, all written to temporary files first and renamed into place only when everything
succeeded (the sidecar last, so its presence means the set is complete):

* ``OUT`` (default ``manifests/<name>.parquet``): the kept rows, ``columns.SCORE_SCHEMA``,
  sorted by ``pair_id``; no time inside, so the same inputs and parameters give the same bytes;
* ``<OUT stem>.dropped.parquet``: ``columns.DROP_SCHEMA``, every dropped row with its reason;
* ``<OUT stem>.json``: provenance (``tbps.provenance.record``): the config, the inputs with
  SHA-256 content hashes, what each rule resolved to, rows after each step, score quantiles,
  truth metrics, versions, git commit, time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import pyarrow.parquet as pq

from tbps import columns as C
from tbps.curate.select import SelectConfig, Selection, check_columns, select
from tbps.errors import TbpsError

SCORE_RECORD = "score.json"
SCORES_DIR = "scores"
EMBEDDINGS_DIR = "embeddings"
MANIFESTS_DIR = "manifests"
ROW_GROUP = 1 << 18  # fixed row-group size: part of what makes the bytes reproducible


@dataclass
class ScoreInputs:
    """The score tables of a run, read lazily.

    Attributes:
        scores: all score rows (the tables concatenated in the order given).
        embeddings: all embedding rows, or None when some input has none.
        bank_size: the bank size shared by the inputs (None when unknown or mixed).
        tables: one record per input: path, kind, files with sizes and SHA-256, rows, model.
        warnings: mixed models or bank sizes.
    """

    scores: pl.LazyFrame
    embeddings: pl.LazyFrame | None
    bank_size: int | None
    tables: list[dict]
    warnings: list[str] = field(default_factory=list)


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


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _parts(directory: Path) -> list[Path]:
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
    if (path / SCORE_RECORD).is_file():
        try:
            record = json.loads((path / SCORE_RECORD).read_text())
        except (OSError, ValueError) as exc:
            raise TbpsError(f"unreadable {SCORE_RECORD} ({exc})", path=path / SCORE_RECORD) from None
        files = _parts(path / SCORES_DIR)
        if not files:
            raise TbpsError(f"score run without part files in {SCORES_DIR}/", path=path)
        return "score-run", files, _parts(path / EMBEDDINGS_DIR), record
    if (path / SCORES_DIR).is_dir():
        raise TbpsError(
            f"incomplete score run: {SCORES_DIR}/ exists but {SCORE_RECORD} does not",
            path=path,
            hint="finish the run (re-running the same `tbps score` command resumes it), or pass its scores/ directory",
        )
    files = _parts(path)
    if not files:
        raise TbpsError("directory holds no .parquet files", path=path)
    return "parquet-dir", files, [], None


def read_inputs(paths: Sequence[str | Path], *, need_embeddings: bool = False, hash_files: bool = True) -> ScoreInputs:
    """Open score tables lazily, check their columns, and hash their files.

    Args:
        paths: score run directories, directories of Parquet parts, or Parquet files.
        need_embeddings: also open the embeddings (every input must be a score run with them).
        hash_files: fill in each file's SHA-256 now (else ``None``: see :func:`hash_inputs`).

    Returns:
        :class:`ScoreInputs`.

    Raises:
        TbpsError: a missing or unreadable input, missing columns, missing embeddings.
    """
    if not paths:
        raise TbpsError("no score tables given")
    scans, emb_scans, tables, warnings = [], [], [], []
    bank_sizes, models, dims = set(), set(), set()
    for raw in paths:
        path = Path(raw)
        kind, files, emb_files, record = _resolve(path)
        rows, model, bank = 0, None, None
        hashed = []
        for f in files:
            schema, n, kv = _file_meta(f)
            check_columns(schema, where=f)
            rows += n
            model = model or kv.get("tbps.model")
            bank = bank or kv.get("tbps.bank_size")
            hashed.append({"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f) if hash_files else None})
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
            table["score_record_sha256"] = sha256_file(path / SCORE_RECORD)
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
                table["embedding_files"].append({"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f) if hash_files else None})
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
    return ScoreInputs(scores=scores, embeddings=embeddings, bank_size=bank_size, tables=tables, warnings=warnings)


def hash_inputs(tables: list[dict]) -> threading.Thread:
    """Fill in the missing SHA-256 of every input file, in a background thread.

    Hashing 1 GB takes about a second; a thread overlaps it with the single-threaded parts of
    the selection (hashlib and file reads release the GIL). ``join()`` the thread before
    using the hashes; a file that cannot be read gets ``"error: ..."`` instead of a digest.
    """

    def work() -> None:
        for table in tables:
            for entry in table["files"] + table.get("embedding_files", []):
                if entry["sha256"] is None:
                    try:
                        entry["sha256"] = sha256_file(Path(entry["path"]))
                    except OSError as exc:
                        entry["sha256"] = f"error: {exc}"

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


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def run_select(config: SelectConfig, *, log: Callable[[str], None] | None = None) -> SelectRun:
    """Read the score tables, select, measure against the truth if given, and write the outputs.

    Nothing is written unless every step succeeds; each output is renamed into place from a
    temporary file, the sidecar last.

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
    truth = read_truth(config.truth) if config.truth else None
    paths = output_paths(config)
    _check_writable(paths)
    t_read = time.perf_counter()
    selection = select(inputs.scores, config, embeddings=inputs.embeddings, bank_size=inputs.bank_size, log=say)
    selection.warnings[:0] = inputs.warnings
    t_select = time.perf_counter()
    if truth is not None:
        from tbps.curate.truth import truth_metrics

        selection.truth = truth_metrics(selection.outcome, truth)
    temps = [_tmp(paths.dropped), _tmp(paths.manifest), _tmp(paths.sidecar)]
    try:
        paths.manifest.parent.mkdir(parents=True, exist_ok=True)
        say(f"writing {paths.manifest} and {paths.dropped.name}")
        meta = {"tbps.select": json.dumps({"config": _config_dict(config), "resolved": selection.resolved}, sort_keys=True, default=str)}
        models = [t["model"] for t in inputs.tables if "model" in t]
        if models:
            meta["tbps.model"] = json.dumps(models[0], sort_keys=True)
        with ThreadPoolExecutor(1) as pool:
            # The drop table is written while the manifest streams (Polars releases the GIL).
            dropped = pool.submit(lambda: selection.dropped().write_parquet(temps[0], compression_level=1, row_group_size=ROW_GROUP))
            selection.manifest.sink_parquet(temps[1], metadata=meta, compression_level=1, row_group_size=ROW_GROUP)
            dropped.result()
        t_write = time.perf_counter()
        hashing.join()
        timings = {
            "read_inputs_s": round(t_read - t0, 3),
            "select_s": round(t_select - t_read, 3),
            "write_s": round(t_write - t_select, 3),
            **selection.timings,
        }
        record = _record(config, selection, inputs, paths, temps, timings=timings)
        from tbps.provenance import write_json_atomic

        os.replace(temps[0], paths.dropped)
        os.replace(temps[1], paths.manifest)
        write_json_atomic(paths.sidecar, record)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return SelectRun(config=config, selection=selection, paths=paths, record=record, inputs=inputs)


def _config_dict(config: SelectConfig) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def _record(config: SelectConfig, selection: Selection, inputs: ScoreInputs, paths: OutputPaths, temps: list[Path], timings: dict) -> dict:
    from tbps.provenance import record

    kept = selection.rows_kept
    return record(
        config,
        inputs=inputs.tables,
        outputs={
            "manifest": {"path": str(paths.manifest), "rows": kept, "sha256": sha256_file(temps[1])},
            "dropped": {"path": str(paths.dropped), "rows": selection.rows_in - kept, "sha256": sha256_file(temps[0])},
        },
        rows_in=selection.rows_in,
        rows_kept=kept,
        steps=[{"step": s.step, "rows_in": s.rows_in, "dropped": s.dropped, "rows_out": s.rows_out} for s in selection.steps],
        resolved=selection.resolved,
        quantiles=selection.quantiles(),
        truth=selection.truth,
        warnings=selection.warnings,
        timings=timings,
    )


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _step_detail(step: str, resolved: dict, config: SelectConfig) -> str:
    """One phrase saying what a step's rule resolved to."""
    from tbps.curate import select as S

    if step == S.STEP_STATUS:
        return "status not ok, or no score"
    if step == S.STEP_MIN_SCORE:
        return f"score < {resolved['min_score']:g}"
    if step == S.STEP_BANK_RANK:
        cut = resolved["bank_rank"]
        bank = f", bank {cut['bank_size']:,}" if cut.get("bank_size") else ""
        return f"bank_rank > {cut['max_bank_rank']:,} ({cut['option']}{bank})"
    if step in S.STEP_EXACT.values():
        what = {"exact-image": "same image_hash", "exact-caption": "same normalised caption", "exact-pair": "same image_hash and caption"}
        return what[step]
    if step == S.STEP_NEAR:
        near = resolved["dedup"]["near"]
        return f"cosine >= {near['threshold']:g} ({config.dedup})"
    if step == S.STEP_PER_PERSON:
        return f"more than {resolved['max_per_person']:,} per person_id"
    if step == S.STEP_QUOTA:
        return ", ".join(f"{k}<={v:,}" for k, v in resolved["quota"].items())
    if step == S.STEP_BUDGET:
        b = resolved["budget"]
        key = "score" if b["by"] == "score" else "bank_rank"
        cutoff = b.get(f"{key}_cutoff")
        cut_text = f"; {key} {'>=' if key == 'score' else '<='} {_fmt(cutoff)}" if cutoff is not None else ""
        if "keep" in b:
            return f"--keep {b['keep']:g} of {b['rows_in']:,} input rows = {b['target_rows']:,} rows{cut_text}"
        return f"--budget {b['budget']:,} rows{cut_text}"
    return ""


def summary(run: SelectRun, *, explain: bool = False, explain_rows: int = 50) -> list:
    """Rich renderables describing a finished selection (for the CLI's stdout).

    Args:
        run: the finished run.
        explain: also list the reasons (counts per reason, then the first dropped rows).
        explain_rows: how many dropped rows ``explain`` prints.

    Returns:
        A list of rich tables and text lines.
    """
    from rich.table import Table

    sel, config = run.selection, run.config
    steps = Table(title=f"tbps select: {sel.rows_in:,} rows in, {sel.rows_kept:,} kept", title_justify="left")
    for col, justify in (("step", "left"), ("rows in", "right"), ("dropped", "right"), ("rows out", "right"), ("rule", "left")):
        steps.add_column(col, justify=justify)
    for s in sel.steps:
        steps.add_row(s.step, f"{s.rows_in:,}", f"{s.dropped:,}", f"{s.rows_out:,}", _step_detail(s.step, sel.resolved, config))
    out: list = [steps]
    quant = Table(title="score quantiles", title_justify="left")
    qs = sel.quantiles()
    keys = [k for k in qs["kept"] if k.startswith("q")]
    quant.add_column("rows")
    quant.add_column("n", justify="right")
    for k in keys:
        quant.add_column({"q0": "min", "q1": "max", "q0.5": "median"}.get(k, f"p{float(k[1:]) * 100:g}"), justify="right")
    for side in ("kept", "dropped"):
        quant.add_row(side, f"{qs[side]['n']:,}", *[f"{qs[side][k]:.3f}" if qs[side][k] is not None else "-" for k in keys])
    out.append(quant)
    if sel.truth:
        out.append(_truth_table(sel.truth))
    if explain:
        out.extend(_explain(sel, explain_rows, run.paths.dropped))
    for w in sel.warnings:
        out.append(f"[yellow]warning:[/] {w}")
    out.append(f"manifest {run.paths.manifest} ({sel.rows_kept:,} rows)")
    out.append(f"dropped  {run.paths.dropped} ({sel.rows_in - sel.rows_kept:,} rows, with reasons)")
    out.append(f"sidecar  {run.paths.sidecar}")
    return out


def _truth_table(truth: dict):
    from rich.table import Table

    t = Table(title=f"against the truth ({truth['matched']:,} pairs matched)", title_justify="left")
    for col, justify in (("defect", "left"), ("pairs", "right"), ("removed", "right"), ("recall", "right"), ("resolved", "right"), ("AUROC score", "right"), ("AUROC bank_rank", "right")):
        t.add_column(col, justify=justify)
    o = truth["overall"]
    t.add_row(
        "all defects", f"{o['defective']:,}", f"{o['removed_defective']:,}", _fmt(o["recall"]), "", _fmt(o["auroc_score"]), _fmt(o["auroc_bank_rank"])
    )
    for kind, k in truth["kinds"].items():
        t.add_row(
            f"  {kind}", f"{k['pairs']:,}", f"{k['removed']:,}", _fmt(k["recall"]), _fmt(k["resolved"]) if "resolved" in k else "",
            _fmt(k["auroc_score"]), _fmt(k["auroc_bank_rank"]),
        )
    t.caption = (
        f"precision of the removal {_fmt(o['precision'])} ({o['removed_defective']:,} of {o['removed']:,} removed pairs are defective; "
        f"{o['removed_clean']:,} clean pairs removed); resolved: the duplicate or its original is gone"
    )
    return t


def _explain(sel: Selection, limit: int, dropped_path: Path) -> list:
    from rich.table import Table

    reasons = (
        sel.outcome.filter(pl.col(C.STEP).is_not_null())
        .group_by(pl.col(C.STEP), pl.col(C.REASON).str.replace(r"^duplicate-of:.*", "duplicate-of:<pair_id>").alias(C.REASON))
        .len()
        .sort(["len", C.STEP], descending=[True, False])
    )
    counts = Table(title="why rows were dropped", title_justify="left")
    for col, justify in (("step", "left"), ("reason", "left"), ("rows", "right")):
        counts.add_column(col, justify=justify)
    for step, reason, n in reasons.iter_rows():
        counts.add_row(step, reason, f"{n:,}")
    rows = Table(title=f"dropped rows (the first {limit}; all {sel.rows_in - sel.rows_kept:,} in {dropped_path})", title_justify="left")
    for col in (C.PAIR_ID, C.STEP, C.REASON, C.SCORE, C.BANK_RANK):
        rows.add_column(col)
    for pid, step, reason, score, rank in sel.dropped().head(limit).select(C.PAIR_ID, C.STEP, C.REASON, C.SCORE, C.BANK_RANK).iter_rows():
        rows.add_row(str(pid), step, reason, _fmt(score), _fmt(rank))
    return [counts, rows]
