"""Benchmark of ``tbps synth``: the default world (600 benchmark identities x 4 images and a
20,000-pair pool) with the default 2 workers. The issue's target: 20,000 pool pairs in <= 30 s
on 2 cores.

Measures, in one run: wall seconds of :func:`tbps.data.synth.synthesize`, pool pairs/s and
images/s, and the CPU seconds of the main process and the workers, whose ratio to the wall time
shows how much of the 2 cores the run actually got on a shared machine. With
``--compare-workers`` it also times the same world with 1 worker, for the speed-up ratio.

Usage: python bench/synth.py [--pool-size 20000] [--workers 2] [--compare-workers] [--workdir DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running a file in bench/ puts bench/ first on sys.path, where select.py shadows the stdlib
# module of that name (imported by subprocess and multiprocessing): take bench/ off the path
# and load the results helper by file name.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from tbps.data.synth import SynthConfig, synthesize  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_results", _HERE / "_results.py")
_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_results)
write_section = _results.write_section


def timed(config: SynthConfig) -> dict:
    """Run one synthesis: wall seconds, CPU seconds (main process + workers), counts."""
    start = time.perf_counter()
    summary = synthesize(config)
    wall = time.perf_counter() - start
    images = sum(s["images"] for s in summary.splits.values()) + summary.pool_pairs
    return {"wall": wall, "cpu": summary.cpu_seconds, "pairs": summary.pool_pairs, "images": images}


def file_probe(directory: Path, n: int = 1000) -> float:
    """Microseconds to create one small file in ``directory`` (the disk's share of the cost)."""
    directory.mkdir(parents=True)
    payload = b"\xff" * 3000  # about one 96x32 JPEG
    start = time.perf_counter()
    for i in range(n):
        with open(directory / f"{i}.jpg", "wb") as fh:
            fh.write(payload)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare-workers", action="store_true", help="also time 1 worker, for the speed-up ratio")
    parser.add_argument("--workdir", type=Path, default=None, help="where the world is written (default: a temp dir, removed)")
    args = parser.parse_args()

    command = "python bench/synth.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--pool-size {args.pool_size}", args.pool_size != 20_000),
            (f"--workers {args.workers}", args.workers != 2),
            ("--compare-workers", args.compare_workers),
        ) if on
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tbps-bench-synth-"))
    load = os.getloadavg()
    try:
        config = SynthConfig(out=workdir / "world", seed=0, pool_size=args.pool_size, workers=args.workers)
        probe_us = file_probe(workdir / "probe-before")
        run = timed(config)
        probe_after_us = file_probe(workdir / "probe-after")
        single = None
        if args.compare_workers and args.workers != 1:
            single = timed(SynthConfig(out=workdir / "world", seed=0, pool_size=args.pool_size, workers=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    bench_images = run["images"] - run["pairs"]
    if args.pool_size == 20_000 and args.workers == 2:
        verdict = "met" if run["wall"] <= 30.0 else "NOT met"
    else:
        verdict = "n/a (the target is for the default run)"
    lines = [
        f"Default world: {config.identities} benchmark identities x {config.images_per_id} images "
        f"({bench_images:,} images, 2 captions each) + a {run['pairs']:,}-pair pool, {args.workers} workers, "
        f"{config.image_size[0]}x{config.image_size[1]} JPEGs.",
        "",
        f"Command: `{command}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall time (benchmark + pool, everything written) | {run['wall']:.1f} s |",
        f"| pool pairs/s (pool pairs / whole wall time) | {run['pairs'] / run['wall']:,.0f} |",
        f"| images/s (all {run['images']:,} images) | {run['images'] / run['wall']:,.0f} |",
        f"| CPU time, main + workers | {run['cpu']:.1f} s ({run['cpu'] / run['wall']:.2f} cores busy on average) |",
        f"| CPU time per image | {run['cpu'] / run['images'] * 1e6:,.0f} us |",
        f"| file-creation probe, same disk, before / after (1,000 x 3 KB files) | {probe_us:,.0f} / {probe_after_us:,.0f} us per file |",
        f"| load average when started (1/5/15 min) | {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} |",
        f"| target: 20,000 pool pairs <= 30 s on 2 cores | {verdict} |",
    ]
    if single is not None:
        lines.append(f"| 1 worker, same world: wall / speed-up of {args.workers} workers | {single['wall']:.1f} s / {single['wall'] / run['wall']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    print(f"\nwrote section 'synth' of {write_section('synth', text)}")


if __name__ == "__main__":
    main()
