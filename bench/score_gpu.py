"""GPU benchmark of ``tbps score``: an open_clip ViT-B-16 at 384x128 (random weights) in bf16 on one GPU.

Run once on a GPU machine. It measures, in one run:
  1. end-to-end pairs/s of ``run_score`` on the synthetic pool (decode in DataLoader workers,
     bf16 autocast, a 10,000-caption bank), and the model-only forward throughput at the same batch;
  2. how far bf16 scores move from fp32 on a subset (rank agreement), on the GPU;
  3. the peak GPU memory.
It prints each figure and writes them as JSON (``--json``) and as the ``score-gpu`` section of
bench/RESULTS.md.

bench/gpu.py supersedes it for issue #18 (profile, pipeline ratios, speed options, training);
this script stays as the record of how the score-gpu figures were taken.

Usage: python bench/score_gpu.py [--pairs 20000] [--batch-size 256] [--workers 12] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from score import bank_file, clear_outputs, make_world, paper_baseline  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps import models  # noqa: E402
from tbps.curate.score import ScoreConfig, read_score_table, run_score, sample_bank  # noqa: E402
from tbps.data.readers import read_captions, read_dataset  # noqa: E402
from tbps.models.encode import embed_pixels  # noqa: E402
from tbps.models.openclip import encode_text_trimmed  # noqa: E402

NAME = "ViT-B-16-384x128"


def config_file(workdir: Path) -> Path:
    """open_clip's ViT-B-16 config with a 384x128 (height x width) pedestrian input."""
    config = open_clip.get_model_config("ViT-B-16")
    config["vision_cfg"]["image_size"] = [384, 128]
    path = workdir / f"{NAME}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def model_only(loaded, captions: list[str], batch: int, device: torch.device, bf16: bool = True) -> float:
    """Pairs/s of the (bf16) image + text forward on ready GPU tensors (the paths run_score uses)."""
    pixels = torch.randn(batch, 3, *loaded.image_size, device=device)
    tokens = loaded.tokenizer(captions)
    tokens = tokens[torch.argsort(tokens.argmax(dim=-1), stable=True)].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if bf16 else None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, 2 * batch, batch):  # warm-up
            embed_pixels(loaded, pixels, device=device, dtype=dtype)
            encode_text_trimmed(loaded.model, tokens[start : start + batch])
        sync()
        t0 = time.perf_counter()
        for start in range(0, len(tokens), batch):
            chunk = tokens[start : start + batch]
            embed_pixels(loaded, pixels[: len(chunk)], device=device, dtype=dtype)
            encode_text_trimmed(loaded.model, chunk)
        sync()
    return len(tokens) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--fp32-pairs", type=int, default=4000)
    ap.add_argument("--baseline-pairs", type=int, default=100)
    ap.add_argument("--bank-size", type=int, default=10_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a quick check of this script only)")
    ap.add_argument("--precision", default="bf16", help="of the main run: bf16 (the benchmark) or fp32 (for a CPU check)")
    a = ap.parse_args()
    # fp32 means fp32: no TF32 in cuDNN convolutions (PyTorch allows it there by default) or matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs on a GPU machine")
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tbps-bench-score-gpu-"))
    clear_outputs(workdir)
    t0 = time.perf_counter()
    world = make_world(workdir, a.pairs)
    print(f"world: {time.perf_counter() - t0:.1f} s", flush=True)
    pool, bank_path, spec = world / "pool" / "pool.json", bank_file(world, workdir), str(config_file(workdir))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (script check only)"
    figures: dict = {"gpu": gpu, "torch": torch.__version__, "model": NAME, "batch_size": a.batch_size, "workers": a.workers}

    def score(data: Path, out: str, precision: str):
        cfg = ScoreConfig(data=str(data), model=spec, bank=str(bank_path), out=str(workdir / out), precision=precision,
                          bank_size=a.bank_size, batch_size=a.batch_size, workers=a.workers, device=a.device, image_root=str(world / "pool" / "images"))
        t = time.perf_counter()
        summary = run_score(cfg)
        return summary, time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary, total = score(pool, "e2e", a.precision)
    figures.update(pairs=summary.rows, seconds=round(total, 2), pairs_per_s=round(summary.rows / total, 1),
                   steady_pairs_per_s=round(summary.pairs_per_second, 1),
                   peak_gpu_mib=round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else 0)
    print(f"end to end: {summary.rows:,} pairs in {total:.1f} s = {summary.rows / total:,.0f} pairs/s; after model load and "
          f"bank embedding: {summary.pairs_per_second:,.0f} pairs/s", flush=True)
    loaded = models.load(spec)
    loaded.model.to(device)
    captions = read_dataset(pool)[C.CAPTION].head(8192).to_list()
    figures["model_only_pairs_per_s"] = round(model_only(loaded, captions, a.batch_size, device, a.precision == "bf16"), 1)
    figures["ratio"] = round(figures["pairs_per_s"] / figures["model_only_pairs_per_s"], 3)
    print(f"model only: {figures['model_only_pairs_per_s']:,.0f} pairs/s; ratio {figures['ratio']:.2f}", flush=True)

    bank = sample_bank(read_captions(bank_path), a.bank_size, 0)
    ok_pairs = read_dataset(pool).filter(pl.col(C.STATUS) == "ok")
    per_pair = paper_baseline(loaded, ok_pairs, bank, a.baseline_pairs, device=a.device, bf16=a.precision == "bf16")
    figures.update(baseline_ms_per_pair=round(1000 * per_pair, 1), speedup=round(figures["pairs_per_s"] * per_pair, 1))
    print(f"paper's released filter: {1000 * per_pair:.0f} ms/pair -> tbps {figures['speedup']:,.0f}x", flush=True)

    sub = world / "pool" / "pool-fp32.json"
    sub.write_text(json.dumps(json.loads(pool.read_text())[: a.fp32_pairs]))
    runs = {}
    for prec in ("fp32", "bf16"):  # a CPU check runs fp32 twice (bf16 is emulated, and slow, there)
        score(sub, f"sub-{prec}", prec if device.type == "cuda" else "fp32")
        runs[prec] = read_score_table(workdir / f"sub-{prec}").collect().filter(pl.col(C.STATUS) == "ok").sort(C.PAIR_ID)
    s32, s16 = runs["fp32"][C.SCORE].to_numpy(), runs["bf16"][C.SCORE].to_numpy()
    r32, r16 = runs["fp32"][C.BANK_RANK].to_numpy(), runs["bf16"][C.BANK_RANK].to_numpy()
    figures.update(
        agreement_pairs=len(s32),
        max_abs_score_diff=round(float(np.abs(s32 - s16).max()), 4),
        spearman=round(float(np.corrcoef(np.argsort(np.argsort(s32)), np.argsort(np.argsort(s16)))[0, 1]), 4),
        median_abs_bank_rank_diff=float(np.median(np.abs(r32 - r16))),
        finetune_rule_agreement=round(float(np.mean((r32 <= 1799) == (r16 <= 1799))), 4),
    )
    print(json.dumps(figures, indent=2), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    body = "\n".join([
        "## tbps score on a GPU",
        "",
        f"Command: `python bench/score_gpu.py --pairs {a.pairs} --batch-size {a.batch_size} --workers {a.workers} "
        f"--precision {a.precision} --bank-size {a.bank_size} --baseline-pairs {a.baseline_pairs} --fp32-pairs {a.fp32_pairs}` "
        f"on a lent machine ({gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}).",
        "",
        f"- model: open_clip ViT-B-16 at 384x128 (height x width), random weights, {a.precision} (autocast); bank {a.bank_size:,} captions",
        f"- end to end (whole `run_score`: model load, bank embedding, decoding in {a.workers} DataLoader workers): "
        f"{figures['pairs']:,} pairs in {figures['seconds']:.1f} s = **{figures['pairs_per_s']:,.0f} pairs/s**; the scoring loop alone "
        f"(after model load and bank embedding): {figures['steady_pairs_per_s']:,.0f} pairs/s",
        f"- model-only {a.precision} forward (image + caption on ready GPU tensors, batch {a.batch_size}): "
        f"{figures['model_only_pairs_per_s']:,.0f} pairs/s -> end-to-end / model-only **{figures['ratio']:.2f}**",
        f"- peak GPU memory allocated: {figures['peak_gpu_mib']:,} MiB",
        f"- the paper's released filter op for op (see bench/score.py; {a.precision}, bank embedded once) on "
        f"{a.baseline_pairs} pairs: {figures['baseline_ms_per_pair']:,.1f} ms/pair -> tbps is **{figures['speedup']:,.0f}x** faster",
        f"- bf16 vs fp32 (TF32 off) on the GPU ({figures['agreement_pairs']:,} pairs): max |score diff| {figures['max_abs_score_diff']:.4f}, "
        f"Spearman **{figures['spearman']:.4f}**, median |bank_rank diff| {figures['median_abs_bank_rank_diff']:.0f}, "
        f"paper-finetune decisions agree on **{100 * figures['finetune_rule_agreement']:.2f}%**",
    ])
    if device.type == "cuda":
        write_section("score-gpu", body)


if __name__ == "__main__":
    main()
