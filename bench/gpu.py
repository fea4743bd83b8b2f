"""All of issue #18's GPU measurements in one run, within a time budget: ``python bench/gpu.py``.

Meant for a lent GPU machine (an H100/H200 with 16 cores); on a CPU, ``--device cpu --pairs 200``
checks that the script runs, with tbps-tiny and small sizes (its figures say nothing about a GPU).
The machine must have torch (its own CUDA build: no torch wheel travels with the repository) and
open_clip, polars, pyarrow, typer importable; the script says in one line what is missing.

It measures, in this order, each phase skipped with a note once the budget (``--budget``, default
420 s: one run and a re-run fit 15 minutes of a lent machine) would be exceeded:
  1. versions: GPU, driver, CUDA, torch, open_clip, CPU cores;
  2. a profile of ``run_score``'s main process (bench/profile_score.py's timers; ``--sync``
     waits for the GPU at each timer, so the attribution is right and the run itself slower);
  3. model only vs the scoring loop vs end to end for ViT-B-16 at 384x128, bf16, batch 256 and a
     larger batch, with ``--workers`` decoding processes (default: the cores less two);
  4. speed options, each alone against the bf16 eager model: a larger batch, ``torch.compile``
     of the image tower, channels-last pixels; each with its model-only pairs/s and the Spearman
     correlation of its scores with fp32 (TF32 off) on ``--fp32-pairs`` pairs (kept only if >= 0.999);
     and whether attention runs through a fused kernel (scaled-dot-product attention);
  5. training: ``tbps train`` images/s for WoRA and full fine-tuning against a plain open_clip
     step (open_clip's ``ClipLoss``, AdamW) on the same ready batches; step time and peak memory
     of WoRA against LoRA on those batches.
It prints each figure, writes them as JSON (``--json``, default ``OUT/gpu.json``) and, on a GPU,
as the ``gpu`` section of bench/RESULTS.md.

Usage: python bench/gpu.py [--pairs 20000] [--workers N] [--budget 420] [--json PATH]
       python bench/gpu.py --device cpu --pairs 200      (a check of the script on a CPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISSING = [m for m in ("torch", "open_clip", "polars", "pyarrow", "typer") if importlib.util.find_spec(m) is None]
if MISSING:
    raise SystemExit(f"bench/gpu.py needs {', '.join(MISSING)} importable (pip install the wheels brought for this machine)")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from profile_score import model_only, profile_run, stage_table, vit_config  # noqa: E402
from score import bank_file  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps import models  # noqa: E402
from tbps.curate import score as score_mod  # noqa: E402
from tbps.curate.score import ScoreConfig, run_score  # noqa: E402
from tbps.data.images import open_image  # noqa: E402
from tbps.data.readers import read_dataset  # noqa: E402
from tbps.data.synth import SynthConfig, synthesize  # noqa: E402
from tbps.models.encode import embed_image_batch, encode_tokens, tokenize_captions  # noqa: E402
from tbps.train import checkpoint as ckpt  # noqa: E402
from tbps.train.loop import TrainConfig, prepare, train  # noqa: E402
from tbps.train.loss import contrastive_loss  # noqa: E402

SPEARMAN_MIN = 0.999


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class Budget:
    """The run's time budget: a phase starts only if its estimate fits what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, phase: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        self.skipped.append(f"{phase} (needed ~{estimate:.0f} s, {max(0, self.left()):.0f} s left)")
        print(f"skipped: {self.skipped[-1]}", flush=True)
        return False


def make_world(workdir: Path, pairs: int, identities: int) -> Path:
    """The synthetic world (a benchmark to train on, a pool of ``pairs`` to score), kept in ``workdir`` for a re-run."""
    world = workdir / "world"
    pool = world / "pool" / "pool.json"
    marker = world / "identities"
    if pool.exists() and marker.exists() and len(json.loads(pool.read_text())) == pairs and marker.read_text() == str(identities):
        return world
    synthesize(SynthConfig(out=str(world), seed=0, identities=identities, pool_size=pairs, workers=min(16, os.cpu_count() or 2)))
    marker.write_text(str(identities))
    return world


def versions(device: torch.device) -> dict:
    """The machine, driver and library versions (printed and recorded)."""
    info = {"torch": torch.__version__, "open_clip": open_clip.__version__, "cpu_cores": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoded_pairs(pool: Path, image_root: Path, n: int, loaded) -> tuple[torch.Tensor, list[str]]:
    """``n`` ok pairs of the pool, their images decoded and preprocessed to uint8 (once, for every option)."""
    rows = read_dataset(pool).filter(pl.col(C.STATUS) == C.STATUS_OK).head(n)
    to_uint8 = loaded.preprocess.to_uint8
    pixels = torch.stack([to_uint8(open_image(str(image_root / p)).image) for p in rows[C.IMAGE_PATH].to_list()])
    return pixels, rows[C.CAPTION].to_list()


def pair_scores_of(loaded, pixels: torch.Tensor, captions: list[str], device: torch.device, dtype, batch: int,
                   channels_last: bool = False) -> np.ndarray:
    """Each pair's cosine (the score column) through the forward paths run_score uses."""
    out = []
    for i in range(0, len(pixels), batch):
        chunk = pixels[i : i + batch].to(device)
        if channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        out.append(embed_image_batch(loaded, chunk, device=device, dtype=dtype))
    img = torch.cat(out)
    txt = encode_tokens(loaded, tokenize_captions(loaded, captions, truncated=False).tokens, device=device, dtype=dtype)
    return (img * txt).sum(1).float().cpu().numpy()


def image_only(loaded, batch: int, device: torch.device, dtype, rounds: int, channels_last: bool = False) -> float:
    """Images/s of the image forward alone on a ready batch (the option under test changes only the image side)."""
    pixels = torch.randint(0, 256, (batch, 3, *loaded.image_size), dtype=torch.uint8, device=device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        embed_image_batch(loaded, pixels, device=device, dtype=dtype)
    sync(device)
    t = time.perf_counter()
    for _ in range(rounds):
        embed_image_batch(loaded, pixels, device=device, dtype=dtype)
    sync(device)
    return rounds * batch / (time.perf_counter() - t)


def fused_attention(loaded, device: torch.device, dtype) -> dict:
    """Which attention kernels one image + text forward runs (from torch.profiler's op names)."""
    pixels = torch.randint(0, 256, (2, 3, *loaded.image_size), dtype=torch.uint8, device=device)
    tokens = tokenize_captions(loaded, ["a man in a red coat"], truncated=False).tokens
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        embed_image_batch(loaded, pixels, device=device, dtype=dtype)
        encode_tokens(loaded, tokens, device=device, dtype=dtype)
    names = {e.key for e in prof.key_averages()}
    fused = sorted(n for n in names if "scaled_dot_product" in n or "native_multi_head_attention" in n or "flash" in n.lower()
                   or "efficient_attention" in n)
    return {"fused_ops": fused, "unfused_softmax_bmm": "aten::bmm" in names and "aten::softmax" in names and not fused}


def train_figures(a, spec: str, data: Path, workdir: Path, device: torch.device, budget: Budget) -> dict:
    """``tbps train`` images/s (WoRA, full) against a plain open_clip step; WoRA vs LoRA step time and memory."""
    res: dict = {}
    base = dict(model=spec, data=str(data), batch_size=a.train_batch, workers=a.workers, device=str(device),
                precision=a.precision, save_every=10**9, val=None, lr=1e-5, warmup=0.0)
    # 5a. the real command, through its public API: images/s of its log lines after the first window.
    for adapter in ("wora", "full"):
        if not budget.allows(f"tbps train {adapter}", a.train_estimate):
            continue
        out = workdir / f"train-{adapter}"
        shutil.rmtree(out, ignore_errors=True)
        train(TrainConfig(out=str(out), adapter=adapter, steps=a.train_steps, log_every=max(1, a.train_steps // 4), **base))
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
        rates = [x["img_per_s"] for x in lines if x.get("kind") == "train"][1:] or [lines[-1]["img_per_s"]]
        res[f"tbps_train_{adapter}_img_per_s"] = round(float(np.mean(rates)), 1)
        print(f"tbps train {adapter}: {res[f'tbps_train_{adapter}_img_per_s']:,.0f} img/s", flush=True)
    # 5b. ready batches from tbps's own training loader, on the device.
    if not budget.allows("training steps on ready batches", a.train_estimate):
        return res
    setup = prepare(TrainConfig(out=str(workdir / "train-probe"), adapter="full", steps=a.step_batches, **base))
    batches = [(b.pixels.to(device), b.tokens.to(device), b.person_ids.to(device)) for _, b in zip(range(a.step_batches), setup.loader)]
    del setup
    dtype = torch.bfloat16 if a.precision == "bf16" else None
    n_img = sum(len(b[0]) for b in batches)

    def timed_steps(forward, params, loss_fn) -> tuple[float, float]:
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for rnd in range(2):  # round 0 warms up (kernels, allocator)
            sync(device)
            t = time.perf_counter()
            for pixels, tokens, pids in batches:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = loss_fn(forward(pixels, tokens), pids)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None  # no allocator figure on a CPU
        return n_img / seconds, peak

    # The plain open_clip step: the same config's model, open_clip's ClipLoss, every parameter trained.
    plain = models.load(spec)
    plain_model = plain.model.to(device).train()
    clip_loss = open_clip.loss.ClipLoss()

    def plain_forward(pixels, tokens):
        return plain_model(plain.preprocess.normalise(pixels) if pixels.dtype == torch.uint8 else pixels, tokens)

    rate, peak = timed_steps(plain_forward, plain_model.parameters(), lambda out, _p: clip_loss(*out[:3]))
    res.update(plain_open_clip_img_per_s=round(rate, 1), plain_open_clip_peak_mib=peak and round(peak))
    print(f"plain open_clip step: {rate:,.0f} img/s, peak {'n/a' if peak is None else f'{peak:,.0f} MiB'}", flush=True)
    del plain_model, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for adapter in ("wora", "lora", "full"):
        if not budget.allows(f"{adapter} steps", a.train_estimate / 3):
            continue
        loaded = ckpt.build_model(spec, 0, adapter, 8, None, "per-input")
        loaded.model.to(device).train()
        fwd = loaded.training_module().to(device).train()

        def tbps_loss(out, pids):
            return contrastive_loss("clip", out[0], out[1], out[2], pids)

        rate, peak = timed_steps(lambda p, t, fwd=fwd: fwd(p, t), fwd.parameters(), tbps_loss)
        res[f"{adapter}_step_img_per_s"], res[f"{adapter}_peak_mib"] = round(rate, 1), peak and round(peak)
        print(f"tbps {adapter} step on ready batches: {rate:,.0f} img/s, peak {'n/a' if peak is None else f'{peak:,.0f} MiB'}", flush=True)
        del loaded, fwd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "plain_open_clip_img_per_s" in res:
        for adapter in ("wora", "full"):
            if f"tbps_train_{adapter}_img_per_s" in res:
                res[f"tbps_train_{adapter}_ratio_to_plain"] = round(res[f"tbps_train_{adapter}_img_per_s"] / res["plain_open_clip_img_per_s"], 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of this script, with tbps-tiny)")
    ap.add_argument("--pairs", type=int, default=20_000, help="pairs of the end-to-end runs")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="decoding processes (default: cores - 2)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--large-batch", type=int, default=512)
    ap.add_argument("--bank-size", type=int, default=10_000)
    ap.add_argument("--fp32-pairs", type=int, default=4000, help="pairs of each option's Spearman against fp32")
    ap.add_argument("--profile-pairs", type=int, default=4000)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--step-batches", type=int, default=8, help="ready batches timed per training step variant")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (each phase is skipped if it would overrun)")
    ap.add_argument("--model", default=None, help="model spec (default: ViT-B-16 at 384x128 on a GPU, tbps-tiny on a CPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    budget = Budget(a.budget)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu to check the script, or on the GPU machine")
    cpu = device.type == "cpu"
    if cpu:  # a check of the script: small enough for a shared 2-core machine
        a.pairs, a.bank_size = min(a.pairs, 200), min(a.bank_size, 200)
        a.batch_size, a.large_batch = min(a.batch_size, 32), min(a.large_batch, 64)
        a.fp32_pairs, a.profile_pairs = min(a.fp32_pairs, 128), min(a.profile_pairs, 128)
        a.train_batch, a.train_steps, a.step_batches = min(a.train_batch, 16), min(a.train_steps, 4), min(a.step_batches, 2)
        a.workers = min(a.workers, 2)
        a.precision = "fp32" if a.precision == "bf16" else a.precision  # bf16 is emulated (slow) on most CPUs
    a.train_estimate = 60.0 if not cpu else 20.0
    # fp32 means fp32 (the reference of every Spearman): no TF32 in matmuls or cuDNN convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tbps-bench-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"versions": versions(device), "args": {k: v for k, v in vars(a).items()}}
    print(json.dumps(figures["versions"]), flush=True)

    t = time.perf_counter()
    world = make_world(workdir, max(a.pairs, a.fp32_pairs, a.profile_pairs), identities=60 if cpu else 600)
    bank = bank_file(world, workdir)
    pool, images = world / "pool" / "pool.json", world / "pool" / "images"
    spec = a.model or ("tbps-tiny" if cpu else str(vit_config(workdir)))
    figures["model"] = "tbps-tiny" if spec == "tbps-tiny" else ("ViT-B-16 at 384x128 (random weights)" if a.model is None else spec)
    print(f"world: {time.perf_counter() - t:.1f} s; model {figures['model']}", flush=True)
    dtype = torch.bfloat16 if a.precision == "bf16" else None

    def subset(n: int) -> Path:
        path = world / "pool" / f"pool-{n}.json"
        path.write_text(json.dumps(json.loads(pool.read_text())[:n]))
        return path

    def score_cfg(data: Path, out: str, batch: int, precision: str | None = None) -> ScoreConfig:
        shutil.rmtree(workdir / out, ignore_errors=True)
        return ScoreConfig(data=str(data), model=spec, bank=str(bank), out=str(workdir / out), precision=precision or a.precision,
                           bank_size=a.bank_size, batch_size=batch, workers=a.workers, device=str(device), image_root=str(images))

    # 2. the profile (timers, synchronised on a GPU).
    if budget.allows("profile", 60 if not cpu else 30):
        prof = profile_run(score_cfg(subset(a.profile_pairs), "profile", a.batch_size), device, sync=True)
        figures["profile"] = prof
        print("\n".join(stage_table(prof)), flush=True)

    # 3. model only vs loop vs end to end, at two batches; the pipeline's threads on (the GPU default) and off.
    loaded = models.load(spec)
    loaded.model.to(device).eval()
    captions = read_dataset(pool)[C.CAPTION].head(min(a.pairs, 8192)).to_list()
    runs = []
    for batch, background in ((a.batch_size, None), (a.large_batch, None), (a.batch_size, False)):
        if not budget.allows(f"throughput batch {batch} background {background}", 45 if not cpu else 20):
            continue
        score_mod.BACKGROUND = background
        mo = model_only(loaded, captions, batch, device, dtype)
        start = time.perf_counter()
        summary = run_score(score_cfg(pool, f"e2e-{batch}-{background}", batch))
        total = time.perf_counter() - start
        row = {"batch": batch, "background": "auto (on)" if background is None and not cpu else ("auto (off)" if background is None else "off"),
               "model_only": round(mo, 1), "loop": round(summary.pairs_per_second, 1), "e2e": round(summary.rows / total, 1)}
        row.update(loop_ratio=round(row["loop"] / row["model_only"], 3), e2e_ratio=round(row["e2e"] / row["model_only"], 3))
        if device.type == "cuda":
            row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        runs.append(row)
        print(f"throughput: {row}", flush=True)
    score_mod.BACKGROUND = None
    figures["throughput"] = runs

    # 4. speed options, each alone, each with its Spearman against fp32.
    options: list[dict] = []
    if budget.allows("speed options", 90 if not cpu else 30):
        pixels, caps = decoded_pairs(pool, images, a.fp32_pairs, loaded)
        reference = pair_scores_of(loaded, pixels, caps, device, None, a.batch_size)
        figures["fused_attention"] = fused_attention(loaded, device, dtype)
        print(f"attention kernels: {figures['fused_attention']}", flush=True)
        rounds = 20 if not cpu else 2

        def option(name: str, model, batch: int, channels_last: bool = False) -> None:
            if not budget.allows(f"option {name}", 20 if not cpu else 5):
                return
            try:
                rate = image_only(model, batch, device, dtype, rounds, channels_last)
                got = pair_scores_of(model, pixels, caps, device, dtype, batch, channels_last)
            except Exception as exc:  # noqa: BLE001 - an option that fails on this machine is reported, not fatal
                options.append({"option": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                print(f"option {name} failed: {options[-1]['error']}", flush=True)
                return
            rho = spearman(reference, got)
            options.append({"option": name, "batch": batch, "images_per_s": round(rate, 1), "spearman_vs_fp32": round(rho, 5),
                            "max_abs_diff": round(float(np.abs(reference - got).max()), 5), "within_tolerance": rho >= SPEARMAN_MIN})
            print(f"option {options[-1]}", flush=True)

        option(f"{a.precision} eager, batch {a.batch_size} (today)", loaded, a.batch_size)
        option(f"batch {a.large_batch}", loaded, a.large_batch)
        option(f"batch {2 * a.large_batch}", loaded, 2 * a.large_batch)
        option("channels-last pixels", loaded, a.batch_size, channels_last=True)
        if not cpu or os.environ.get("TBPS_BENCH_COMPILE"):  # inductor on a 2-core CPU takes minutes
            compiled = models.load(spec)
            compiled.model.to(device).eval()
            compiled.model.visual = torch.compile(compiled.model.visual)
            option("torch.compile (image tower)", compiled, a.batch_size)
        base = next((o for o in options if "images_per_s" in o), None)
        for o in options:
            if base and "images_per_s" in o:
                o["speedup"] = round(o["images_per_s"] / base["images_per_s"], 2)
    figures["options"] = options

    # 5. training.
    if budget.allows("training", 2 * a.train_estimate):
        figures["train"] = train_figures(a, spec, world / "benchmark" / "reid_raw.json", workdir, device, budget)
    figures["skipped"] = budget.skipped
    figures["seconds"] = round(a.budget - budget.left(), 1)
    out = Path(a.json or workdir / "gpu.json")
    out.write_text(json.dumps(figures, indent=2, default=str))
    body = render(figures, a)
    print(body, flush=True)
    print(f"figures: {out}; {figures['seconds']:.0f} s", flush=True)
    if not cpu:
        write_section("gpu", body)


def render(f: dict, a) -> str:
    """The ``gpu`` section of bench/RESULTS.md."""
    v = f["versions"]
    lines = ["## GPU throughput: score pipeline, speed options, training (issue #18)", "",
             f"Command: `python bench/gpu.py --pairs {a.pairs} --workers {a.workers} --batch-size {a.batch_size} --large-batch {a.large_batch}` "
             f"on {v.get('gpu', 'CPU')} (driver {v.get('driver', '-')}, CUDA {v.get('cuda', '-')}, {v['cpu_cores']} cores), torch {v['torch']}, "
             f"open_clip {v['open_clip']}; model {f['model']}, {a.precision}; {f['seconds']:.0f} s in all.", ""]
    if "profile" in f:
        lines += [f"Profile of `run_score` (timers synchronised with the device; {f['profile']['pairs']:,} pairs, batch {a.batch_size}):", "",
                  *stage_table(f["profile"]), ""]
    if f.get("throughput"):
        lines += ["| batch | pipeline threads | model only pairs/s | scoring loop pairs/s | end to end pairs/s | loop / model | end to end / model |",
                  "|---|---|---|---|---|---|---|",
                  *[f"| {r['batch']} | {r['background']} | {r['model_only']:,.0f} | {r['loop']:,.0f} | {r['e2e']:,.0f} | **{r['loop_ratio']:.2f}** | "
                    f"**{r['e2e_ratio']:.2f}** |" for r in f["throughput"]], ""]
    if f.get("options"):
        lines += [f"Speed options, each alone (image forward on ready tensors; Spearman of the pair scores against fp32, TF32 off, on "
                  f"{a.fp32_pairs:,} pairs; kept only at >= {SPEARMAN_MIN}); attention kernels seen: "
                  f"{', '.join(f.get('fused_attention', {}).get('fused_ops', [])) or 'no fused kernel'}", "",
                  "| option | images/s | x today | Spearman vs fp32 | max abs diff | within tolerance |", "|---|---|---|---|---|---|"]
        for o in f["options"]:
            if "error" in o:
                lines.append(f"| {o['option']} | failed: {o['error']} | | | | |")
            else:
                lines.append(f"| {o['option']} | {o['images_per_s']:,.0f} | {o.get('speedup', 1):.2f} | {o['spearman_vs_fp32']:.4f} | "
                             f"{o['max_abs_diff']:.4f} | {'yes' if o['within_tolerance'] else '**no**'} |")
        lines.append("")
    t = f.get("train") or {}
    if t:
        lines += ["Training (batch {0}, {1}):".format(a.train_batch, a.precision), "",
                  "| measure | img/s | peak MiB |", "|---|---|---|"]
        for key, label in (("tbps_train_wora", "`tbps train --adapter wora` (whole loop, its log)"), ("tbps_train_full", "`tbps train --adapter full`"),
                           ("plain_open_clip", "plain open_clip step (ClipLoss, AdamW) on ready batches"), ("wora_step", "WoRA step, ready batches"),
                           ("lora_step", "LoRA step, ready batches"), ("full_step", "full fine-tuning step, ready batches")):
            rate = t.get(f"{key}_img_per_s")
            if rate is not None:
                peak = t.get(f"{key.replace('_step', '')}_peak_mib", t.get(f"{key}_peak_mib"))
                lines.append(f"| {label} | {rate:,.0f} | {'' if peak is None else f'{peak:,}'} |")
        for adapter in ("wora", "full"):
            if f"tbps_train_{adapter}_ratio_to_plain" in t:
                lines.append(f"\n`tbps train --adapter {adapter}` / plain open_clip step: **{t[f'tbps_train_{adapter}_ratio_to_plain']:.2f}**")
        lines.append("")
    if f.get("skipped"):
        lines += ["Skipped for the time budget: " + "; ".join(f["skipped"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
