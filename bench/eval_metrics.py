"""Benchmark of the retrieval metrics (section ``eval`` of bench/RESULTS.md).

1. CUHK-PEDES-sized test split: 6,156 queries x 3,074 gallery images of 1,000 person ids
   (about 3 images and 6 captions per id, as in CUHK-PEDES). Times ``retrieval_metrics`` on the
   dense similarity (after the embeddings are computed; goal <= 2 s) and, in the same run,
   the similarity product itself and ``retrieval_metrics_from_embeddings``.
2. 100,000 x 100,000 through ``retrieval_metrics_from_embeddings`` (blocks; the dense matrix
   would be 40 GB): time and peak RSS, measured in a child process so the figure is its own.

Run: .venv/bin/python bench/eval_metrics.py [--large-n 100000] [--dim 256] [--no-write]
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder (bench/) first on sys.path, and bench/ holds scripts named
# like stdlib modules (select.py): move it to the end, so the stdlib wins and _results imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

NOISE = 2.2  # per-dimension noise around the person's centre: R@1 in the range of real TBPS models


def _embeddings(n_q: int, n_g: int, n_ids: int, dim: int, seed: int = 0):
    """Random unit embeddings where captions sit near their person's images (a non-trivial ranking)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
    g_pids = np.sort(rng.integers(0, n_ids, size=n_g))
    g_pids[:n_ids] = np.arange(n_ids)  # every id has at least one image
    q_pids = g_pids[rng.integers(0, n_g, size=n_q)]
    image = centres[g_pids] + NOISE * rng.standard_normal((n_g, dim), dtype=np.float32)
    text = centres[q_pids] + NOISE * rng.standard_normal((n_q, dim), dtype=np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return text, image, q_pids, g_pids


def cuhk_sized(dim: int) -> dict:
    from tbps.eval.metrics import retrieval_metrics, retrieval_metrics_from_embeddings

    text, image, q_pids, g_pids = _embeddings(6156, 3074, 1000, dim)
    retrieval_metrics(text[:64] @ image.T, q_pids[:64], g_pids)  # warm-up: imports, BLAS threads
    t0 = time.perf_counter()
    sim = text @ image.T
    t1 = time.perf_counter()
    res = retrieval_metrics(sim, q_pids, g_pids)
    t2 = time.perf_counter()
    res_blocks = retrieval_metrics_from_embeddings(text, image, q_pids, g_pids)
    t3 = time.perf_counter()
    assert res_blocks == res, (res_blocks, res)
    return {"matmul_s": t1 - t0, "metrics_s": t2 - t1, "from_embeddings_s": t3 - t2, "metrics": res}


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def large_child(n: int, dim: int, chunk: int | None) -> dict:
    from tbps.eval.metrics import retrieval_metrics_from_embeddings

    n_ids = n // 3  # about 3 images per id, as in CUHK-PEDES
    text, image, q_pids, g_pids = _embeddings(n, n, n_ids, dim)
    retrieval_metrics_from_embeddings(text[:8], image[:8], g_pids[:8], g_pids[:8])  # warm-up: imports torch
    rss_inputs = _peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    res = retrieval_metrics_from_embeddings(text, image, q_pids, g_pids, chunk_size=chunk)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss_mib()
    return {"n": n, "dim": dim, "seconds": elapsed, "cpu_seconds": cpu, "load": os.getloadavg()[0], "peak_rss_mib": peak, "rss_after_inputs_mib": rss_inputs, "metrics": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--large-n", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=None, help="query rows per block (default: auto)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(large_child(args.large_n, args.dim, args.chunk)))
        return

    small = cuhk_sized(args.dim)
    m = small["metrics"]
    print(
        f"CUHK-sized 6156 x 3074 (dim {args.dim}): similarity product {small['matmul_s']:.3f} s, "
        f"retrieval_metrics {small['metrics_s']:.3f} s, from_embeddings (product + metrics) "
        f"{small['from_embeddings_s']:.3f} s | R1 {m['R1']:.2f} mAP {m['mAP']:.2f} mINP {m['mINP']:.2f}"
    )
    cmd = [sys.executable, __file__, "--child", "--large-n", str(args.large_n), "--dim", str(args.dim)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    big = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    dense_gib = big["n"] * big["n"] * 4 / 2**30
    print(
        f"{big['n']:,} x {big['n']:,} from embeddings (dim {big['dim']}): {big['seconds']:.1f} s wall, "
        f"{big['cpu_seconds']:.1f} s CPU (load average {big['load']:.1f} on {os.cpu_count()} cores), "
        f"peak RSS {big['peak_rss_mib']:.0f} MiB (before the metrics, with embeddings and torch loaded: {big['rss_after_inputs_mib']:.0f} MiB; "
        f"a dense float32 matrix would be {dense_gib:.1f} GiB) | R1 {big['metrics']['R1']:.2f}"
    )
    if args.no_write:
        return
    from _results import write_section  # noqa: E402 - bench/ is the script's directory

    command = "python bench/eval_metrics.py" + (f" --dim {args.dim}" if args.dim != 256 else "")
    if args.large_n != 100_000:
        command += f" --large-n {args.large_n}"
    write_section(
        "eval",
        f"""## eval: retrieval metrics (`tbps.retrieval_metrics`)

Command: `{command}` (random unit embeddings, dim {args.dim}, captions near their person's images).

| case | similarity product | metrics | total | peak RSS |
|---|---|---|---|---|
| CUHK-PEDES-sized, 6,156 queries x 3,074 images, 1,000 ids (dense matrix given) | {small['matmul_s']:.3f} s | {small['metrics_s']:.3f} s | {small['matmul_s'] + small['metrics_s']:.3f} s | |
| same, `retrieval_metrics_from_embeddings` (blocks) | | | {small['from_embeddings_s']:.3f} s | |
| {big['n']:,} x {big['n']:,}, {big['n'] // 3:,} ids, `retrieval_metrics_from_embeddings` | | | {big['seconds']:.1f} s wall, {big['cpu_seconds']:.1f} s CPU (load average {big['load']:.1f} on {os.cpu_count()} cores at the end) | {big['peak_rss_mib']:.0f} MiB (before the metrics, with embeddings and torch loaded: {big['rss_after_inputs_mib']:.0f} MiB; dense matrix would be {dense_gib:.1f} GiB) |

Goal: CUHK-sized metrics in <= 2 s after the embeddings are computed: measured
{small['metrics_s']:.3f} s ({small['metrics_s'] / 2:.0%} of the budget). In the same run the metrics took
{small['metrics_s'] / max(small['matmul_s'], 1e-9):.1f}x the time of the similarity product itself.
""",
    )


if __name__ == "__main__":
    main()
