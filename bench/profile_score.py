"""Where ``tbps score``'s main process spends its time: timers around each stage of the scoring loop.

The run is the real ``run_score`` (same code path, same DataLoader workers); the stages are timed
by wrapping the functions it calls, for the length of one run only (nothing in ``tbps`` has a
profiling hook). Each stage's seconds are split into those spent on the main thread (the
critical path: the model waits) and those spent on background threads (off the critical path).

Stages:
  worker wait      the main thread waiting for the next decoded batch from the DataLoader
  tokenise         the tokenizer (captions of each part)
  image forward    ``encode_image`` (on a GPU with ``--sync``: until its kernels finish)
  text forward     ``encode_text``
  copy+normalise   the rest of ``embed_image_batch``: host-to-device copy, uint8 normalisation, L2 norm
  bank rank        ``bank_rank`` (a chunked matmul against the bank)
  part tables      the rest of building a part's score and embedding tables
  parquet write    both atomic Parquet writes of each part
  bank embedding   embedding (or reading) the bank once per run
  other            the rest of the scoring loop (gathering, progress, bookkeeping)

On a GPU, a kernel launch returns at once, so without ``--sync`` a stage's time is the time it
kept the CPU busy and the wait lands wherever the next synchronisation is; ``--sync`` waits for
the GPU at each timer (and so changes the run it measures: use it for attribution only).

Collation of a batch runs in the DataLoader workers; its cost is measured apart, on one batch in
this process (``collate`` row, per batch).

Usage: python bench/profile_score.py [--pairs 2000] [--vit-pairs 256] [--vit-batch 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from score import bank_file, cpu_seconds, make_world  # noqa: E402

from tbps import columns as C  # noqa: E402
from tbps import models  # noqa: E402
from tbps.curate import score as score_mod  # noqa: E402
from tbps.curate.score import ScoreConfig, run_score  # noqa: E402
from tbps.data.readers import read_dataset  # noqa: E402
from tbps.models import encode as encode_mod  # noqa: E402
from tbps.models.encode import embed_pixels  # noqa: E402
from tbps.models.openclip import encode_text_trimmed  # noqa: E402
from tbps.runtime import hold_freed_memory  # noqa: E402

VIT = "ViT-B-16-384x128"
STAGES = ("worker wait", "tokenise", "image forward", "text forward", "copy+normalise", "bank rank", "part tables",
          "parquet write", "bank embedding", "other")


def vit_config(workdir: Path) -> Path:
    """open_clip's ViT-B-16 config with a 384x128 (height x width) pedestrian input (random weights)."""
    config = open_clip.get_model_config("ViT-B-16")
    config["vision_cfg"]["image_size"] = [384, 128]
    path = workdir / f"{VIT}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class Stages:
    """Seconds per stage, split into main-thread and background-thread time."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.main: dict[str, float] = defaultdict(float)
        self.background: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._open: dict[int, list[str]] = defaultdict(list)  # per thread: stages entered (nested ones are subtracted)
        self._children: dict[int, float] = {}  # per thread: the seconds of the stages timed so far

    @contextlib.contextmanager
    def timed(self, name: str):
        stack = self._open[threading.get_ident()]
        if "bank embedding" in stack:  # the bank's own forward passes count as bank embedding, not as the loop's
            yield
            return
        self.sync()
        stack.append(name)
        t = time.perf_counter()
        child0 = self._child_total()
        try:
            yield
        finally:
            self.sync()
            spent = time.perf_counter() - t
            stack.pop()
            # A stage's own time: minus the stages timed inside it (bank rank inside part tables).
            own = spent - (self._child_total() - child0)
            target = self.main if threading.current_thread() is threading.main_thread() else self.background
            target[name] += own
            self.calls[name] += 1
            self._children[threading.get_ident()] = self._children.get(threading.get_ident(), 0.0) + own

    def _child_total(self) -> float:
        return self._children.get(threading.get_ident(), 0.0)

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed_fn(*args, **kwargs):
            with self.timed(name):
                return fn(*args, **kwargs)
        timed_fn.__wrapped__ = fn
        return timed_fn

    def wrap_iterator(self, fn: Callable, name: str) -> Callable:
        """A generator function whose every ``next`` is timed as ``name``."""
        def timed_gen(*args, **kwargs):
            it = iter(fn(*args, **kwargs))
            while True:
                with self.timed(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item
        return timed_gen


class _TimedTokenizer:
    def __init__(self, inner, stages: Stages) -> None:
        self.inner, self.stages = inner, stages

    def __call__(self, *args, **kwargs):
        with self.stages.timed("tokenise"):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def instrumented(stages: Stages):
    """Wrap the functions ``run_score`` calls for the length of the block (restored after)."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, attr: str, new) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    real_load = score_mod.load

    def load(spec, seed=0):
        loaded = real_load(spec, seed=seed)
        loaded.encode_image = stages.wrap(loaded.encode_image, "image forward")
        loaded.encode_text = stages.wrap(loaded.encode_text, "text forward")
        loaded.tokenizer = _TimedTokenizer(loaded.tokenizer, stages)
        return loaded

    patch(score_mod, "load", load)
    patch(score_mod, "iter_image_batches", stages.wrap_iterator(score_mod.iter_image_batches, "worker wait"))
    for name, stage in (("bank_rank", "bank rank"), ("_part_tables", "part tables"), ("_write_parquet", "parquet write"),
                        ("_bank_embeddings", "bank embedding")):
        patch(score_mod, name, stages.wrap(getattr(score_mod, name), stage))
    for name in ("embed_image_batch", "embed_pixels"):
        if hasattr(score_mod, name):
            patch(score_mod, name, stages.wrap(getattr(score_mod, name), "copy+normalise"))
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def collate_seconds(loaded, paths: list[str], batch: int) -> float:
    """One batch's collation (stacking the decoded images), timed in this process."""
    ds = encode_mod._ImageFiles(paths[:batch], loaded.preprocess, loaded.image_size, None)
    items = [ds[i] for i in range(len(ds))]
    t = time.perf_counter()
    for _ in range(5):
        encode_mod._collate(items)
    return (time.perf_counter() - t) / 5


def score_config(world: Path, spec: str, bank: Path, out: Path, **kw) -> ScoreConfig:
    return ScoreConfig(data=str(world / "pool" / "pool.json"), model=spec, bank=str(bank), out=str(out),
                       image_root=str(world / "pool" / "images"), **kw)


def profile_run(cfg: ScoreConfig, device: torch.device, sync: bool = False) -> dict:
    """One ``run_score`` with every stage timed.

    Returns:
        ``{"stages": {name: {"main_s", "background_s", "calls"}}, "loop_s", "total_s", "pairs", "loop_pairs_per_s"}``.
    """
    sync_fn = (lambda: torch.cuda.synchronize(device)) if sync and device.type == "cuda" else (lambda: None)
    stages = Stages(sync_fn)
    t, c = time.perf_counter(), cpu_seconds()
    with instrumented(stages):
        summary = run_score(cfg)
    total, cpu = time.perf_counter() - t, cpu_seconds() - c
    loop = summary.rows / summary.pairs_per_second if summary.pairs_per_second else 0.0
    timed_loop = sum(v for k, v in stages.main.items() if k != "bank embedding")
    # "other": the loop's main-thread time the named stages do not cover (before the loop: model load, reading).
    stages.main["other"] = max(0.0, loop - timed_loop)
    table = {name: {"main_s": round(stages.main.get(name, 0.0), 3), "background_s": round(stages.background.get(name, 0.0), 3),
                    "calls": stages.calls.get(name, 0)} for name in STAGES}
    return {"stages": table, "loop_s": round(loop, 3), "total_s": round(total, 3), "pairs": summary.rows,
            "loop_pairs_per_s": round(summary.pairs_per_second, 1), "e2e_pairs_per_s": round(summary.rows / total, 1),
            "cpu_ms_per_pair": round(1000 * cpu / summary.rows, 3)}


def stage_table(result: dict, collate_s: float | None = None, batch: int | None = None) -> list[str]:
    """Markdown rows: stage, main-thread seconds and share of the loop, background seconds, calls."""
    loop = result["loop_s"] or 1.0
    rows = ["| stage | main thread s | share of loop | background s | calls |", "|---|---|---|---|---|"]
    for name, v in result["stages"].items():
        share = "" if name == "bank embedding" else f"{100 * v['main_s'] / loop:.1f}%"
        rows.append(f"| {name} | {v['main_s']:.3f} | {share} | {v['background_s']:.3f} | {v['calls'] or ''} |")
    if collate_s is not None:
        rows.append(f"| collate (in workers; one batch of {batch}, timed apart) | {collate_s * 1000:.1f} ms per batch | | | |")
    return rows


def model_only(loaded, captions: list[str], batch: int, device: torch.device, dtype: torch.dtype | None, rounds: int = 1) -> float:
    """Pairs/s of the image + caption forward on ready tensors (the forward paths run_score uses)."""
    pixels = torch.randint(0, 256, (batch, 3, *loaded.image_size), dtype=torch.uint8, device=device)
    tokens = loaded.tokenizer(captions)
    tokens = tokens[torch.argsort(tokens.argmax(dim=-1), stable=True)].to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        embed_pixels(loaded, pixels, device=device, dtype=dtype)  # warm-up
        encode_text_trimmed(loaded.model, tokens[:batch])
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            for start in range(0, len(tokens), batch):
                chunk = tokens[start : start + batch]
                embed_pixels(loaded, pixels[: len(chunk)], device=device, dtype=dtype)
                encode_text_trimmed(loaded.model, chunk)
        sync()
    return rounds * len(tokens) / (time.perf_counter() - t0)


def fmt_stage_summary(result: dict) -> str:
    return ", ".join(f"{k} {v['main_s']:.2f}" for k, v in result["stages"].items() if v["main_s"] or v["background_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000, help="pairs of the tiny-model profile")
    ap.add_argument("--batch-size", type=int, default=256, help="batch of the tiny-model profile")
    ap.add_argument("--vit-pairs", type=int, default=256, help="pairs of the ViT-B-16 profile and ratio runs")
    ap.add_argument("--vit-batch", type=int, default=16)
    ap.add_argument("--bank-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="ViT runs of (model only, end to end), alternated")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--only", choices=("tiny", "vit", "all"), default="all")
    ap.add_argument("--background", choices=("auto", "on", "off"), default="auto",
                    help="tbps.curate.score.BACKGROUND: tokenise ahead and write parts in threads (auto: on a GPU only)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    if hasattr(score_mod, "BACKGROUND"):  # absent in the code before the pipeline (for a before/after comparison)
        score_mod.BACKGROUND = {"auto": None, "on": True, "off": False}[a.background]
    hold_freed_memory()  # as the tbps program does
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tbps-profile-score-"))
    world = make_world(workdir, max(a.pairs, a.vit_pairs))
    bank = bank_file(world, workdir)
    device = torch.device("cpu")
    out: dict = {"machine": "cpu", "torch": torch.__version__}

    def fresh(name: str) -> Path:
        path = workdir / name
        if path.exists():
            import shutil  # only here: clearing a benchmark output

            shutil.rmtree(path)
        return path

    pool = read_dataset(world / "pool" / "pool.json")
    paths = [str(world / "pool" / "images" / p) for p in pool[C.IMAGE_PATH].head(256).to_list()]
    captions_all = pool[C.CAPTION].to_list()

    # 1. tiny model, fp32, the default batch.
    if a.only == "vit":
        return vit_part(a, world, bank, workdir, device, fresh, paths, captions_all, out, None, None)
    tiny = models.load("tbps-tiny")
    cfg = score_config(world, "tbps-tiny", bank, fresh("tiny"), bank_size=a.bank_size, batch_size=a.batch_size, workers=a.workers,
                       precision="fp32", device="cpu", chunk_size=max(256, a.pairs // 4))
    sub = world / "pool" / f"pool-{a.pairs}.json"
    sub.write_text(json.dumps(json.loads((world / "pool" / "pool.json").read_text())[: a.pairs]))
    cfg.data = str(sub)
    tiny_res = profile_run(cfg, device)
    tiny_collate = collate_seconds(tiny, paths, a.batch_size)
    out["tiny"] = tiny_res
    print(f"tiny: loop {tiny_res['loop_pairs_per_s']:,.0f} pairs/s; {fmt_stage_summary(tiny_res)}", flush=True)
    if a.only == "tiny":
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
        print("\n".join(stage_table(tiny_res, tiny_collate, a.batch_size)))
        return None
    return vit_part(a, world, bank, workdir, device, fresh, paths, captions_all, out, tiny_res, tiny_collate)


def vit_part(a, world, bank, workdir, device, fresh, paths, captions_all, out, tiny_res, tiny_collate) -> None:
    # 2. ViT-B-16 384x128 at a small batch: profile, then model only vs loop vs end to end, alternated.
    spec = str(vit_config(workdir))
    vit = models.load(spec)
    vsub = world / "pool" / f"pool-{a.vit_pairs}.json"
    vsub.write_text(json.dumps(json.loads((world / "pool" / "pool.json").read_text())[: a.vit_pairs]))
    vcfg = dict(bank_size=a.bank_size, batch_size=a.vit_batch, workers=a.workers, precision="fp32", device="cpu",
                chunk_size=max(a.vit_batch, a.vit_pairs // 2))
    rounds = []
    for r in range(a.repeats):
        mo = model_only(vit, captions_all[: a.vit_pairs], a.vit_batch, device, None)
        c = score_config(world, spec, bank, fresh(f"vit-{r}"), **vcfg)
        c.data = str(vsub)
        res = profile_run(c, device)
        rounds.append({"model_only": round(mo, 2), **res})
        print(f"ViT-B-16 round {r}: model only {mo:.1f} pairs/s, loop {res['loop_pairs_per_s']:.1f}, end to end {res['e2e_pairs_per_s']:.1f}; "
              f"{fmt_stage_summary(res)}", flush=True)
    mo_last = model_only(vit, captions_all[: a.vit_pairs], a.vit_batch, device, None)
    vit_collate = collate_seconds(vit, paths, a.vit_batch)
    for i, r in enumerate(rounds):  # each run against the model-only runs before and after it
        after = rounds[i + 1]["model_only"] if i + 1 < len(rounds) else mo_last
        r["model_only_mean"] = round((r["model_only"] + after) / 2, 2)
        r["loop_ratio"] = round(r["loop_pairs_per_s"] / r["model_only_mean"], 3)
        r["e2e_ratio"] = round(r["e2e_pairs_per_s"] / r["model_only_mean"], 3)
    out["vit"] = rounds
    print(json.dumps({"tiny": tiny_res["loop_pairs_per_s"], "vit_loop_ratio": [r["loop_ratio"] for r in rounds],
                      "vit_e2e_ratio": [r["e2e_ratio"] for r in rounds]}), flush=True)
    (workdir / "profile.json").write_text(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))

    best = rounds[-1]
    body = [
        "## tbps score: where the scoring loop spends its time (CPU)",
        "",
        f"Command: `python bench/profile_score.py --pairs {a.pairs} --batch-size {a.batch_size} --vit-pairs {a.vit_pairs} "
        f"--vit-batch {a.vit_batch} --bank-size {a.bank_size} --workers {a.workers}` (fp32, the shared 2-core machine). "
        "Timers wrap the functions `run_score` calls (same code path); main-thread seconds are the critical path, "
        "background seconds run beside the model.",
        "",
        *([f"tbps-tiny, {tiny_res['pairs']:,} pairs, batch {a.batch_size}: loop {tiny_res['loop_s']:.2f} s = "
           f"{tiny_res['loop_pairs_per_s']:,.0f} pairs/s (end to end {tiny_res['e2e_pairs_per_s']:,.0f})",
           "", *stage_table(tiny_res, tiny_collate, a.batch_size), ""] if tiny_res else []),
        f"ViT-B-16 at 384x128, {best['pairs']:,} pairs, batch {a.vit_batch} (last of {len(rounds)} rounds): loop {best['loop_s']:.2f} s",
        "",
        *stage_table(best, vit_collate, a.vit_batch),
        "",
        f"ViT-B-16 at 384x128, batch {a.vit_batch}, {a.vit_pairs} pairs, model-only runs alternated with profiled `run_score` runs "
        "(each run against the mean of the model-only runs before and after it):",
        "",
        "| round | model only pairs/s | scoring loop pairs/s | end to end pairs/s | loop / model | end to end / model |",
        "|---|---|---|---|---|---|",
        *[f"| {i} | {r['model_only_mean']:.1f} | {r['loop_pairs_per_s']:.1f} | {r['e2e_pairs_per_s']:.1f} | **{r['loop_ratio']:.2f}** | "
          f"{r['e2e_ratio']:.2f} |" for i, r in enumerate(rounds)],
    ]
    if not a.no_write:
        write_section("score-profile-cpu", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
