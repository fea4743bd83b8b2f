"""Benchmark ``tbps select`` on a 10,000,000-row score table (issue 4); section ``select``.

(Not named ``select.py``: a script's directory comes first on ``sys.path``, and a
``bench/select.py`` would shadow the standard library's ``select`` module for every script
in ``bench/``, breaking ``subprocess``.)

Goal: threshold + exact de-duplication + ``--keep 0.4`` in <= 30 s and <= 4 GiB peak RSS on
2 cores. The table is generated once into a temporary directory (never the repo): 10 parts
of realistic columns (captions of about 110 characters, 32-hex image hashes), 1% rows with a
failed status, 3% sharing another row's image hash and 3% another row's caption (changed
case and punctuation, so only the normalised caption matches).

The selection runs as ``tbps select`` in a fresh subprocess; its wall time and peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) are measured from here.

    .venv/bin/python bench/selection.py                 # generate, run, write RESULTS.md
    .venv/bin/python bench/selection.py --data DIR      # reuse (or create) the table in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from tbps import columns as C  # noqa: E402

GENDER = ["man", "woman", "young man", "young woman", "person"]
HAIR = ["short black", "long black", "short brown", "long brown", "blond", "grey", "curly dark", "tied-back red"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "purple", "pink", "brown", "orange", "navy"]
UPPER = ["t-shirt", "jacket", "coat", "shirt", "sweater", "hoodie", "blouse", "vest"]
LOWER = ["jeans", "trousers", "shorts", "skirt", "dress pants", "leggings"]
CARRY = ["a backpack", "a handbag", "nothing in hand", "a shopping bag", "an umbrella", "a phone"]


def _pick(words: list[str], idx: np.ndarray) -> pl.Series:
    return pl.Series(words).gather(idx)


def generate(out: Path, rows: int = 10_000_000, parts: int = 10, seed: int = 0) -> Path:
    """Write a synthetic score table of ``rows`` rows as ``parts`` Parquet files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // parts)
    for p in range(parts):
        rng = np.random.default_rng([seed, p])
        start, stop = p * per, min(rows, (p + 1) * per)
        n = stop - start
        i = np.arange(start, stop)
        col = lambda: rng.integers(0, len(COLOURS), n)  # noqa: E731
        caption = pl.concat_str(
            [
                pl.lit("A "), _pick(GENDER, rng.integers(0, len(GENDER), n)), pl.lit(" with "),
                _pick(HAIR, rng.integers(0, len(HAIR), n)), pl.lit(" hair, wearing a "), _pick(COLOURS, col()), pl.lit(" "),
                _pick(UPPER, rng.integers(0, len(UPPER), n)), pl.lit(" and "), _pick(COLOURS, col()), pl.lit(" "),
                _pick(LOWER, rng.integers(0, len(LOWER), n)), pl.lit(", with "), _pick(COLOURS, col()),
                pl.lit(" shoes, carrying "), _pick(CARRY, rng.integers(0, len(CARRY), n)), pl.lit(". Seen at "),
                pl.Series(i % 997).cast(pl.String), pl.lit("."),
            ]
        )
        h = rng.integers(0, 2**63, (n, 2), dtype=np.int64)
        image_hash = pl.format("{}{}", pl.Series(h[:, 0]).cast(pl.String).str.zfill(19), pl.Series(h[:, 1] % 10**13).cast(pl.String).str.zfill(13))
        score = rng.normal(0.25, 0.08, n).astype(np.float32)
        bank_rank = np.clip((10_000 * (1 / (1 + np.exp(30 * (score - 0.25))))) + rng.normal(0, 300, n), 0, 9_999).astype(np.int32)
        status = np.where(rng.random(n) < 0.01, C.STATUS_BAD_IMAGE, C.STATUS_OK)
        df = pl.DataFrame(
            {
                "_i": i,
                C.SOURCE: _pick(["pool-a", "pool-b", "pool-c"], rng.integers(0, 3, n)),
                C.SCORE: score,
                C.BANK_RANK: bank_rank,
                C.STATUS: status,
            }
        ).with_columns(caption.alias(C.CAPTION), image_hash.alias(C.IMAGE_HASH))
        # Plant exact duplicates: 3% copy an earlier row's image hash, 3% its caption, restyled.
        img_dup = np.flatnonzero(rng.random(n) < 0.03)
        cap_dup = np.flatnonzero(rng.random(n) < 0.03)
        src_img = rng.integers(0, n, len(img_dup))
        src_cap = rng.integers(0, n, len(cap_dup))
        hashes = df.get_column(C.IMAGE_HASH).scatter(img_dup, df.get_column(C.IMAGE_HASH).gather(src_img))
        restyled = df.get_column(C.CAPTION).gather(src_cap).str.to_uppercase().str.replace_all(",", " ;")
        captions = df.get_column(C.CAPTION).scatter(cap_dup, restyled)
        df = df.with_columns(hashes, captions).select(
            pl.format("pool-{}:0", pl.col("_i")).alias(C.PAIR_ID),
            pl.format("/data/pool/images/{}.jpg", pl.col("_i").cast(pl.String).str.zfill(8)).alias(C.IMAGE_PATH),
            pl.col(C.CAPTION),
            (pl.col("_i") // 4).cast(pl.String).alias(C.PERSON_ID),
            pl.col(C.SOURCE),
            pl.when(pl.col(C.STATUS) == C.STATUS_OK).then(pl.col(C.IMAGE_HASH)).alias(C.IMAGE_HASH),
            pl.when(pl.col(C.STATUS) == C.STATUS_OK).then(pl.col(C.SCORE)).alias(C.SCORE),
            pl.when(pl.col(C.STATUS) == C.STATUS_OK).then(pl.col(C.BANK_RANK)).alias(C.BANK_RANK),
            pl.when(pl.col(C.STATUS) == C.STATUS_OK).then(pl.col(C.BANK_RANK).cast(pl.Float32) / 100.0).alias(C.BANK_PERCENTILE),
            pl.lit(False).alias(C.TRUNCATED),
            pl.col(C.STATUS),
            pl.when(pl.col(C.STATUS) != C.STATUS_OK).then(pl.lit("cannot identify image file")).alias(C.ERROR),
        )
        df = df.cast(C.polars_schema(C.SCORE_SCHEMA))
        df.write_parquet(out / f"part-{p:06d}.parquet", metadata={"tbps.bank_size": "10000"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--data", type=Path, default=None, help="where the table is (generated there when absent)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="tbps-bench-select-")
    data = args.data or Path(tmp.name) / "scores"
    if not any(data.glob("*.parquet")) if data.exists() else True:
        t = time.perf_counter()
        generate(data, args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s at {data}", flush=True)
    size = sum(f.stat().st_size for f in data.glob("*.parquet"))
    out = Path(tmp.name) / "manifest.parquet"
    opts = ["--min-score", "0.1", "--dedup", "image,caption", "--keep", "0.4"]
    cmd = [sys.executable, "-m", "tbps", "select", str(data), *opts, "--out", str(out), "--quiet"]
    print("running twice:", " ".join(cmd), flush=True)
    walls, digests = [], []
    for _ in range(2):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            raise SystemExit(f"tbps select failed with exit code {proc.returncode}")
        record = json.loads(out.with_suffix(".json").read_text())
        digests.append((record["outputs"]["manifest"]["hash"], record["outputs"]["dropped"]["hash"]))
        print(f"run {len(walls)}: {walls[-1]:.1f} s, timings {record['timings']}", flush=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    steps = record["steps"]
    rows_in, kept = record["rows_in"], record["rows_kept"]
    dropped = pl.scan_parquet(out.with_name("manifest.dropped.parquet")).select(pl.len()).collect().item()
    assert kept + dropped == rows_in, (kept, dropped, rows_in)
    assert pl.scan_parquet(out).select(pl.len()).collect().item() == kept
    cutoff = record["resolved"]["budget"].get("score_cutoff")
    lines = [
        f"{rows_in:,}-row score table ({size / 2**30:.2f} GiB of Parquet in {len(list(data.glob('*.parquet')))} parts), "
        f"`{' '.join(opts)}`, each run in a fresh `tbps select` subprocess:",
        "",
        "| step | rows in | dropped | rows out |",
        "|---|---:|---:|---:|",
        *[f"| {s['step']} | {s['rows_in']:,} | {s['dropped']:,} | {s['rows_out']:,} |" for s in steps],
        "",
        f"- wall time: **{walls[0]:.1f} s** and **{walls[1]:.1f} s** (two runs; goal <= 30 s); in-process timings of the second: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in record["timings"].items()),
        f"- peak RSS: **{peak_kib / 2**20:.2f} GiB** (the larger of the two runs; goal <= 4 GiB)",
        f"- kept {kept:,} rows (`--keep 0.4` of {rows_in:,} input rows; score cut-off {cutoff:.4f}); "
        f"dropped {dropped:,}; kept + dropped = rows in",
        f"- byte-identical outputs across the two runs: {'yes' if digests[0] == digests[1] else 'NO'} (manifest {record['outputs']['manifest']['hash_algo']} {digests[0][0][:16]}...)",
        f"- host load average when it ended: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared)",
        "",
        "Command: `.venv/bin/python bench/selection.py`",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("select", "## select: 10M-row threshold + exact dedup + keep\n\n" + text)


if __name__ == "__main__":
    main()
