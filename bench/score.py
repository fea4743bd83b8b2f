"""Benchmark of ``tbps score`` on the synthetic pool with the tiny model on CPU.

Measures, in one run:
  1. end-to-end pairs/s of ``run_score`` and its ratio to the model-only forward throughput
     (image + caption forward on ready tensors) at the same batch size;
  2. the bank-rank share of the total time, with a 10,000-caption bank;
  3. the speed-up over the paper's released approach (a forward pass per pair and a Python
     loop over the bank captions) on a sample of pairs;
  4. peak RSS of a fresh ``tbps score`` process at 1x and 10x input size;
  5. bf16 vs fp32 scores (rank agreement), where the CPU runs bf16 natively, else reported as skipped.

Usage: python bench/score.py [--pairs 20000] [--baseline-pairs 500] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps import models  # noqa: E402
from tbps.curate.score import ScoreConfig, bank_rank, read_score_table, run_score, sample_bank  # noqa: E402
from tbps.data.readers import read_captions, read_dataset  # noqa: E402
from tbps.models.encode import TEXT_BATCH, encode_texts  # noqa: E402
from tbps.runtime import hold_freed_memory  # noqa: E402


def make_world(workdir: Path, pairs: int, workers: int = 2) -> Path:
    from tbps.data.synth import SynthConfig, synthesize

    world = workdir / "world"
    pool = world / "pool" / "pool.json"
    if pool.exists() and len(json.loads(pool.read_text())) != pairs:
        shutil.rmtree(world)  # a world of another size, from an earlier run in this --workdir
    if not pool.exists():
        synthesize(SynthConfig(out=str(world), seed=0, pool_size=pairs, workers=workers))
    return world


def clear_outputs(workdir: Path) -> None:
    """Remove score outputs of an earlier run in a reused --workdir: a finished run would resume and measure nothing."""
    for out in workdir.glob("*"):
        if out.is_dir() and (out / "params.json").exists():
            shutil.rmtree(out)


def bank_file(world: Path, workdir: Path, size: int = 10_000) -> Path:
    """A 10,000-caption bank: the benchmark's captions plus pool captions (the world's own train split is smaller)."""
    path = workdir / "bank.txt"
    if not path.exists():
        caps = read_captions(world / "benchmark" / "reid_raw.json") + read_captions(world / "pool" / "pool.json")
        distinct = sorted(set(caps))
        if len(distinct) < size:
            print(f"note: only {len(distinct)} distinct captions for a {size}-caption bank; the bank is smaller")
        path.write_text("\n".join(distinct) + "\n")
    return path


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers) so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def model_only(loaded, pairs: pl.DataFrame, batch: int, n: int, bank: list[str]) -> dict[str, float]:
    """The model alone: forward passes on ready tensors, without decoding, I/O or tables.

    The same forward paths ``run_score`` uses (``embed_pixels``; the length-cut text tower of
    ``encode_texts`` on pre-tokenised captions) for ``n`` pairs, and the text forward of the bank
    (which a run embeds once, in batches of ``TEXT_BATCH``). Returns pairs per wall second and CPU seconds
    per pair of the pairs' forwards, and wall and CPU seconds of the bank's.
    """
    from tbps.models.encode import embed_pixels
    from tbps.models.openclip import encode_text_trimmed

    pixels = torch.randn(batch, 3, *loaded.image_size)
    tokens = loaded.tokenizer(pairs[C.CAPTION].head(n).to_list())
    tokens = tokens[torch.argsort(tokens.argmax(dim=-1), stable=True)]
    bank_tokens = loaded.tokenizer(bank)
    bank_tokens = bank_tokens[torch.argsort(bank_tokens.argmax(dim=-1), stable=True)]
    with torch.no_grad():  # one warm-up batch, untimed (first calls pay one-off kernel set-up)
        embed_pixels(loaded, pixels, device=torch.device("cpu"), dtype=None)
        encode_text_trimmed(loaded.model, tokens[:batch])
    t0, c0 = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            embed_pixels(loaded, pixels[: len(tokens[start : start + batch])], device=torch.device("cpu"), dtype=None)
            encode_text_trimmed(loaded.model, tokens[start : start + batch])
    t1, c1 = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        for start in range(0, len(bank_tokens), TEXT_BATCH):
            encode_text_trimmed(loaded.model, bank_tokens[start : start + TEXT_BATCH])
    t2, c2 = time.perf_counter(), cpu_seconds()
    return {"pairs_per_s": len(tokens) / (t1 - t0), "cpu_per_pair": (c1 - c0) / len(tokens), "bank_s": t2 - t1, "bank_cpu_s": c2 - c1}


def paper_baseline(loaded, pairs: pl.DataFrame, bank: list[str], n: int, device: str = "cpu", bf16: bool = False) -> float:
    """Seconds per pair of the paper's released filter, op for op, with the CLIP model in BLIP-2's place.

    ``read_cuhk_4x_top50.py`` in JT-Sun/Filtering-WoRA embeds the bank once into a list of
    per-caption features, then for each pair: opens and preprocesses the image, runs three
    feature extractions at batch 1 (multimodal, image, text), loops over the 10,000 bank
    features with ``(image @ feature[:, 0, :].t()).max().item()`` into a Python list, sorts the
    10,001 values and keeps the pair when its own score is at index 49 or above. Here the
    multimodal extraction is its vision-tower forward; its Q-Former part has no CLIP
    counterpart and is left out, which favours the baseline.
    ``device``/``bf16``: where the model is, and whether the forwards run under bf16 autocast.
    """
    import contextlib

    from PIL import Image

    dev = torch.device(device)
    cast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad(), cast:
        bank_emb = torch.cat([
            torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(bank[i : i + 1000]).to(dev)), dim=-1)
            for i in range(0, len(bank), 1000)
        ])
        features = [e.view(1, 1, -1) for e in bank_emb]  # one (1, tokens, dim) feature per caption, as released
        t0 = time.perf_counter()
        kept = 0
        for row in pairs.head(n).iter_rows(named=True):
            im = loaded.preprocess(Image.open(row[C.IMAGE_PATH]).convert("RGB")).unsqueeze(0).to(dev)
            loaded.model.encode_image(im)  # the multimodal pass runs the vision tower too (its Q-Former part is left out)
            img = torch.nn.functional.normalize(loaded.model.encode_image(im), dim=-1)
            txt = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer([row[C.CAPTION]]).to(dev)), dim=-1)
            own = (img @ txt.t()).max().item()
            result = [float(own)]
            for feature in features:  # the per-caption loop being measured
                result.append(float((img @ feature[:, 0, :].t()).max().item()))
            kept += own >= sorted(result, reverse=True)[49]
        sync()
    return (time.perf_counter() - t0) / n


def _probe_model_only(mode: str, pool: str, bank: str, batch: str) -> None:
    """(Run in a fresh process.) Model-only throughput and page faults with the allocator ``mode``: default or held."""
    applied = hold_freed_memory() if mode == "held" else False
    loaded = models.load("tbps-tiny")
    pairs = read_dataset(pool)
    model_only(loaded, pairs, int(batch), 512, ["a warm-up caption"])  # the process's first batches: the allocator's steady state
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    res = model_only(loaded, pairs, int(batch), 4096, sample_bank(read_captions(bank), 10_000, 0)[:256])
    res["faults_per_pair"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 4096
    res["applied"] = applied
    print("PROBE", json.dumps(res))


def allocator_probe(mode: str, pool: Path, bank: Path, batch: int) -> dict:
    """Model-only pairs/s and page faults per pair of a fresh process with glibc's defaults or freed memory kept."""
    res = subprocess.run([sys.executable, __file__, "--probe-model-only", mode, str(pool), str(bank), str(batch)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(next(line for line in res.stdout.splitlines() if line.startswith("PROBE"))[6:])


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child of this (large)
# benchmark process would report the benchmark's own peak.
_RSS_PROBE = """
import sys
from tbps.cli import main
sys.argv = ["tbps", "score", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("RSS", hwm)
"""


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB of the main process, seconds) of a fresh ``tbps score``."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _RSS_PROBE, *args, "--quiet"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    _, main_kb = next(line for line in res.stdout.splitlines() if line.startswith("RSS")).split()
    return int(main_kb) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--baseline-pairs", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--bf16-pairs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end runs, alternating with model-only runs")
    ap.add_argument("--probe-model-only", nargs=4, metavar=("MODE", "POOL", "BANK", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe_model_only:
        _probe_model_only(*a.probe_model_only)
        return
    hold_freed_memory()  # as the tbps program does before any command
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tbps-bench-score-"))
    clear_outputs(workdir)
    world = make_world(workdir, a.pairs)
    pool = world / "pool" / "pool.json"
    bank_path = bank_file(world, workdir)
    torch.manual_seed(0)
    loaded = models.load("tbps-tiny")
    pairs = read_dataset(pool)
    lines = []

    # 1 + 2: end to end, model only, and the bank-rank share. The machine is shared and its speed
    # drifts by 10-20% within minutes, so model-only and end-to-end runs alternate (model, run,
    # model, run, ..., model) and each run is compared with the model-only runs on either side.
    bank = sample_bank(read_captions(bank_path), 10_000, 0)
    fwd_runs = [model_only(loaded, pairs, a.batch_size, 4096, bank)]
    runs = []
    for r in range(a.repeats):
        cfg = ScoreConfig(data=str(pool), model="tbps-tiny", bank=str(bank_path), out=str(workdir / f"e2e{r}"), precision="fp32",
                          batch_size=a.batch_size, workers=a.workers, device="cpu")
        t0, c0 = time.perf_counter(), cpu_seconds()
        s = run_score(cfg)
        runs.append({"wall": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "loop": s.pairs_per_second, "rows": s.rows})
        fwd_runs.append(model_only(loaded, pairs, a.batch_size, 4096, bank))
    rows = runs[0]["rows"]
    per_run = []
    for r, run in enumerate(runs):
        around = fwd_runs[r : r + 2]
        fwd = sum(m["pairs_per_s"] for m in around) / 2
        cpu_fwd = sum(m["cpu_per_pair"] for m in around) / 2
        bank_fwd, bank_cpu = (sum(m["bank_s"] for m in around) / 2, sum(m["bank_cpu_s"] for m in around) / 2)
        per_run.append({
            "e2e": rows / run["wall"], "fwd": fwd, "wall_ratio": rows / run["wall"] / fwd, "cpu_ratio": cpu_fwd * rows / run["cpu"],
            # All the forward work of the run (every pair, and the bank once) on ready tensors, against the whole run.
            "all_wall_ratio": (rows / fwd + bank_fwd) / run["wall"], "all_cpu_ratio": (rows * cpu_fwd + bank_cpu) / run["cpu"],
            "loop": run["loop"], "loop_ratio": run["loop"] / fwd, "cpu_e2e": run["cpu"] / rows, "cpu_fwd": cpu_fwd,
            "bank_fwd": bank_fwd, "bank_cpu": bank_cpu, "wall": run["wall"],
        })

    def med(key: str) -> float:
        return float(np.median([x[key] for x in per_run]))

    def each(key: str, fmt: str = "{:.2f}") -> str:
        return ", ".join(fmt.format(x[key]) for x in per_run)

    fresh = models.load("tbps-tiny")  # a cold tokenizer word cache, as in a run
    t0 = time.perf_counter()
    bank_emb = torch.from_numpy(encode_texts(fresh, bank))
    t_bank_embed = time.perf_counter() - t0
    table = read_score_table(workdir / "e2e0").collect()
    ok = table.filter(pl.col(C.STATUS) == "ok")
    img = torch.nn.functional.normalize(torch.randn(ok.height, loaded.embed_dim), dim=1)
    t0 = time.perf_counter()
    bank_rank(img, torch.from_numpy(ok[C.SCORE].to_numpy()), bank_emb)
    t_rank = time.perf_counter() - t0
    total, e2e = med("wall"), med("e2e")
    alloc = {mode: allocator_probe(mode, pool, bank_path, a.batch_size) for mode in ("default", "held")}
    lines += [
        f"- pool: {rows:,} pairs ({ok.height:,} ok), bank {len(bank):,} captions, batch {a.batch_size} images / {TEXT_BATCH} captions, "
        f"{a.workers} workers, fp32; glibc keeps freed memory (`tbps.runtime.hold_freed_memory`, as the `tbps` program sets it)",
        f"- {a.repeats} end-to-end runs alternating with {a.repeats + 1} model-only runs; figures are medians over the runs, "
        f"each run compared with the model-only runs before and after it (per run in brackets)",
        f"- end to end (whole `run_score`, including model load and bank embedding): {total:.1f} s = **{e2e:,.0f} pairs/s** "
        f"[{each('e2e', '{:,.0f}')}]",
        f"- model-only forward (image + caption on ready tensors, same batch and forward paths): {med('fwd'):,.0f} pairs/s "
        f"[{each('fwd', '{:,.0f}')}] -> end-to-end / model-only (wall) **{med('wall_ratio'):.2f}** [{each('wall_ratio')}]",
        f"- CPU time per pair (this process + its DataLoader workers): end to end {1000 * med('cpu_e2e'):.2f} ms, model only "
        f"{1000 * med('cpu_fwd'):.2f} ms -> model-only / end-to-end (CPU) **{med('cpu_ratio'):.2f}** [{each('cpu_ratio')}]",
        f"- counting the bank's forward as model work too (its {len(bank):,} captions on ready tokens: {med('bank_fwd'):.1f} s, "
        f"{med('bank_cpu'):.1f} CPU-s): all the run's forward passes against the whole run -> (wall) **{med('all_wall_ratio'):.2f}** "
        f"[{each('all_wall_ratio')}], (CPU) **{med('all_cpu_ratio'):.2f}** [{each('all_cpu_ratio')}]",
        f"- the scoring loop alone (after model load and bank embedding; what dominates a run of millions of pairs): "
        f"{med('loop'):,.0f} pairs/s [{each('loop', '{:,.0f}')}] -> loop / model-only **{med('loop_ratio'):.2f}** [{each('loop_ratio')}]",
        f"- bank rank ({ok.height:,} x {len(bank):,}, fp32 chunked matmul): {t_rank:.2f} s = **{100 * t_rank / total:.1f}%** of the "
        f"end-to-end time; embedding the bank once (a fixed cost per run, {len(bank):,} captions): {t_bank_embed:.2f} s = "
        f"{100 * t_bank_embed / total:.1f}%; both together {100 * (t_rank + t_bank_embed) / total:.1f}%",
        f"- the allocator setting, model-only in two fresh processes: glibc's defaults {alloc['default']['pairs_per_s']:,.0f} pairs/s "
        f"({alloc['default']['faults_per_pair']:,.0f} page faults per pair), freed memory kept {alloc['held']['pairs_per_s']:,.0f} "
        f"pairs/s ({alloc['held']['faults_per_pair']:,.0f} page faults per pair; setting applied: {alloc['held']['applied']}): "
        f"x{alloc['held']['pairs_per_s'] / alloc['default']['pairs_per_s']:.2f}",
    ]
    print("\n".join(lines), flush=True)

    # 3: the paper's approach on a sample, against tbps's per-pair time measured above.
    per_pair = 0.0 if a.skip_baseline else paper_baseline(loaded, pairs.filter(pl.col(C.STATUS) == "ok"), bank, a.baseline_pairs)
    if per_pair:
        lines.append(
            f"- paper's released filter (`read_cuhk_4x_top50.py`, op for op: per pair three batch-1 extractions as released, i.e. "
            f"the multimodal pass's vision forward, an image and a text forward, then a Python loop over {len(bank):,} bank "
            f"features and a sort of the {len(bank) + 1:,} scores; bank embedded once; the Q-Former part of the multimodal "
            f"pass left out) on "
            f"{a.baseline_pairs} pairs: {per_pair * 1000:.0f} ms/pair = {1 / per_pair:.2f} pairs/s -> tbps is **{e2e * per_pair:,.0f}x** faster"
        )
        print(lines[-1], flush=True)

    # 4: peak RSS of fresh processes at 1x and 10x the input (10x: the pool's records repeated).
    if not a.skip_rss:
        records = json.loads(pool.read_text())
        big = world / "pool" / "pool10x.json"
        big.write_text(json.dumps(records * 10))
        common = ["--model", "tbps-tiny", "--bank", str(bank_path), "--precision", "fp32", "--workers", str(a.workers),
                  "--batch-size", str(a.batch_size), "--image-root", str(world / "pool" / "images")]
        rss1, sec1 = peak_rss_mb([str(pool), "--out", str(workdir / "rss1"), *common])
        rss10, sec10 = peak_rss_mb([str(big), "--out", str(workdir / "rss10"), *common])
        lines.append(f"- peak RSS (VmHWM) of a fresh `tbps score` process: 1x ({len(records):,} pairs) **{rss1:,.0f} MiB** "
                     f"({sec1:.0f} s); 10x ({10 * len(records):,} pairs, the pool's records repeated) **{rss10:,.0f} MiB** "
                     f"({sec10:.0f} s); ratio {rss10 / rss1:.2f}")
        print(lines[-1], flush=True)

    # 5: bf16 against fp32 on a subset (forced bf16 is emulated, and slow, on CPUs without native bf16).
    from tbps.models.device import bf16_supported

    sub = world / "pool" / "pool-bf16.json"
    sub.write_text(json.dumps(json.loads(pool.read_text())[: a.bf16_pairs]))
    runs = {}
    for prec in ("fp32", "bf16"):
        c = ScoreConfig(data=str(sub), model="tbps-tiny", bank=str(bank_path), out=str(workdir / f"sub-{prec}"), precision=prec,
                        batch_size=a.batch_size, workers=a.workers, device="cpu", image_root=str(world / "pool" / "images"))
        run_score(c)
        runs[prec] = read_score_table(workdir / f"sub-{prec}").collect().filter(pl.col(C.STATUS) == "ok").sort(C.PAIR_ID)
    s32, s16 = runs["fp32"][C.SCORE].to_numpy(), runs["bf16"][C.SCORE].to_numpy()
    r32, r16 = runs["fp32"][C.BANK_RANK].to_numpy(), runs["bf16"][C.BANK_RANK].to_numpy()
    spearman = np.corrcoef(np.argsort(np.argsort(s32)), np.argsort(np.argsort(s16)))[0, 1]
    keep32, keep16 = r32 <= 1799, r16 <= 1799
    lines.append(
        f"- bf16 vs fp32 ({len(s32):,} pairs; native bf16 on this CPU: {bf16_supported(torch.device('cpu'))}): "
        f"max |score diff| {np.abs(s32 - s16).max():.4f}, Spearman rank correlation of scores **{spearman:.4f}**, "
        f"median |bank_rank diff| {np.median(np.abs(r32 - r16)):.0f}, paper-finetune keep decisions agree on "
        f"**{100 * np.mean(keep32 == keep16):.2f}%** of pairs"
    )
    print(lines[-1], flush=True)
    load = os.getloadavg()
    lines.append(f"- host load average at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (a shared 2-core machine)")
    body = "## tbps score\n\nCommand: `python bench/score.py --pairs {} --baseline-pairs {}`\n\n{}".format(
        a.pairs, a.baseline_pairs, "\n".join(lines))
    write_section("score", body)
    print(f"wrote bench/RESULTS.md (workdir {workdir})")


if __name__ == "__main__":
    main()
