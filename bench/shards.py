"""Benchmark: ``tbps score`` from webdataset tar shards against the same pairs as image files.

The synthetic pool (``tbps synth``) is written twice: as image files with a JSON Lines table of
``pair_id``, ``image_path``, ``caption``, and as webdataset shards (``KEY.jpg``, ``KEY.txt``,
``KEY.json``; ``--shard-size`` samples per tar), holding the same image bytes and captions.
``run_score`` scores both with the tiny model on CPU, same settings, alternating the two
(``--rounds``); the figure is the scoring loop's pairs/s (``ScoreSummary.pairs_per_second``:
decoding, embedding and ranking, without model loading), and the ratio shards / files of each
round. The two score tables must agree row for row (same hashes and scores).

Usage: python bench/shards.py [--pairs 4000] [--shard-size 1000] [--rounds 2] [--workers 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps.curate.score import ScoreConfig, read_score_table, run_score  # noqa: E402
from tbps.data.readers import read_dataset  # noqa: E402
from tbps.data.synth import SynthConfig, synthesize  # noqa: E402
from tbps.files import write_text  # noqa: E402


def make_pairs(workdir: Path, pairs: int) -> pl.DataFrame:
    """The synthetic pool's ok pairs, one caption per image (so both layouts decode each image once)."""
    world = workdir / "world"
    pool = world / "pool" / "pool.json"
    if pool.exists() and len(json.loads(pool.read_text())) != pairs:
        shutil.rmtree(world)
    if not pool.exists():
        synthesize(SynthConfig(out=str(world), seed=0, pool_size=pairs, workers=2))
    frame = read_dataset(pool).filter(pl.col(C.STATUS) == C.STATUS_OK)
    return frame.unique(C.IMAGE_PATH, keep="first", maintain_order=True).select(C.PAIR_ID, C.IMAGE_PATH, C.CAPTION)


def write_files(frame: pl.DataFrame, workdir: Path) -> Path:
    """A JSON Lines table naming the pool's image files."""
    path = workdir / "files" / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"pair_id": f"p{k:07d}", "image_path": p, "caption": c}) for k, (p, c) in enumerate(zip(frame[C.IMAGE_PATH], frame[C.CAPTION])))
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_shards(frame: pl.DataFrame, workdir: Path, shard_size: int) -> Path:
    """The same pairs as webdataset shards, keys equal to the files' pair ids."""
    folder = workdir / "shards"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = list(zip(frame[C.IMAGE_PATH], frame[C.CAPTION]))
    for s in range(0, len(rows), shard_size):
        with tarfile.open(folder / f"{s // shard_size:05d}.tar", "w") as tf:
            for k in range(s, min(s + shard_size, len(rows))):
                path, caption = rows[k]
                for ext, data in (("jpg", Path(path).read_bytes()), ("txt", caption.encode()), ("json", json.dumps({"key": f"p{k:07d}"}).encode())):
                    info = tarfile.TarInfo(f"p{k:07d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def score(data: Path, bank: Path, out: Path, args, image_root: str | None = None) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = ScoreConfig(data=str(data), model="tbps-tiny", bank=str(bank), out=str(out), precision="fp32", batch_size=args.batch_size,
                      workers=args.workers, device="cpu", image_root=image_root, bank_size=args.bank_size)
    t0 = time.perf_counter()
    s = run_score(cfg)
    return {"loop": s.pairs_per_second, "wall": time.perf_counter() - t0, "rows": s.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bank-size", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tbps-bench-shards-"))
    workdir.mkdir(parents=True, exist_ok=True)

    frame = make_pairs(workdir, args.pairs)
    files = write_files(frame, workdir)
    shards = write_shards(frame, workdir, args.shard_size)
    bank = workdir / "bank.txt"
    write_text(bank, "\n".join(frame[C.CAPTION].to_list()) + "\n")
    n = frame.height
    print(f"{n:,} pairs; {len(list(shards.glob('*.tar')))} shards of {args.shard_size}", flush=True)

    rounds = []
    for r in range(args.rounds):
        # Alternate which layout goes first: the shared machine's load drifts.
        order = ("files", "shards") if r % 2 == 0 else ("shards", "files")
        got = {}
        for kind in order:
            got[kind] = score(files if kind == "files" else shards, bank, workdir / f"out-{kind}", args, image_root="/" if kind == "files" else None)
            print(f"round {r + 1} {kind}: {got[kind]['loop']:.0f} pairs/s (wall {got[kind]['wall']:.1f} s)", flush=True)
        got["ratio"] = got["shards"]["loop"] / got["files"]["loop"]
        rounds.append(got)
        print(f"round {r + 1}: shards / files = {got['ratio']:.3f}", flush=True)

    a = read_score_table(workdir / "out-files").collect().sort(C.PAIR_ID)
    b = read_score_table(workdir / "out-shards").collect().sort(C.PAIR_ID)
    same = a.height == b.height == n and a[C.IMAGE_HASH].equals(b[C.IMAGE_HASH]) and bool(np.allclose(a[C.SCORE].to_numpy(), b[C.SCORE].to_numpy()))
    print(f"tables agree row for row: {same}")
    if not same:
        raise SystemExit("the two score tables differ")

    lines = [
        "## webdataset shards (`bench/shards.py`)",
        "",
        f"`tbps score` (`run_score`, tbps-tiny, CPU, fp32, `--workers {args.workers}`, batch {args.batch_size}, bank {args.bank_size:,}) "
        f"on {n:,} synthetic pairs, once as image files named by a JSON Lines table and once as {len(list(shards.glob('*.tar')))} "
        f"webdataset shards of {args.shard_size:,} samples (the same image bytes and captions), alternating; pairs/s of the "
        "scoring loop (decoding, embedding, ranking; model loading excluded). The two score tables agree row for row.",
        "",
        "| round | files (pairs/s) | shards (pairs/s) | shards / files |",
        "| --- | --- | --- | --- |",
        *[f"| {k + 1} | {g['files']['loop']:.0f} | {g['shards']['loop']:.0f} | {g['ratio']:.3f} |" for k, g in enumerate(rounds)],
        "",
        f"Command: `python bench/shards.py --pairs {args.pairs} --shard-size {args.shard_size} --rounds {args.rounds} --workers {args.workers}`. "
        "The machine is shared and noisy: compare the two columns within a round.",
    ]
    if not args.no_write:
        print(f"wrote {write_section('webdataset-shards', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
