"""Benchmark of the adapters on tbps-tiny on CPU (section ``adapters`` of bench/RESULTS.md).

For WoRA (per-input norm, the default, and per-output), DoRA, LoRA and full fine-tuning at
rank 8: the trainable parameter share, the training step time (CLIP contrastive loss, AdamW)
and the peak memory.

- Step times: all methods in one process, warm-up steps first, then timed rounds in which every
  method takes one step, in an order rotated each round (interleaved, so that load changes on a
  shared machine hit all methods alike). Ratios are medians of the per-round ratios.
- Peak memory: one fresh child process per method (build the model, apply the method, train a
  few steps); its peak resident set size (VmHWM from /proc/self/status, ru_maxrss as fallback)
  and the rise of that peak during training over its value just before the first step.
- Shares: trainable parameters as a share of full fine-tuning's (all 7.8 M parameters of
  tbps-tiny, of which the text token embedding is 6.3 M) and of the adapted layers' weights W0.

Run: .venv/bin/python bench/adapters.py [--steps 12] [--warmup 3] [--batch 32] [--rank 8] [--threads 1] [--no-write]
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder (bench/) first on sys.path, and bench/ holds scripts named
# like stdlib modules (select.py): move it to the end, so the stdlib wins and _results imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _results import write_section  # noqa: E402 - bench/ is on sys.path (at its end)

from tbps.models.adapters import adapter_config, apply_adapters  # noqa: E402
from tbps.models.openclip import create  # noqa: E402
from tbps.models.protocol import count_parameters  # noqa: E402

# (label, method, wora_norm)
KINDS = [
    ("wora", "wora", "per-input"),
    ("wora per-output", "wora", "per-output"),
    ("dora", "dora", "per-input"),
    ("lora", "lora", "per-input"),
    ("full", "full", "per-input"),
]
CAPTIONS = [
    "a man in a red jacket and black trousers carrying a backpack",
    "a woman with long hair wearing a white shirt and blue jeans",
    "a young man in a grey hoodie, dark shorts and white sneakers",
    "an older woman in a long black coat holding a yellow umbrella",
]


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(batch: int, rank: int, kinds: list[tuple[str, str, str]]):
    """The base model, one adapted copy and AdamW per kind, a fixed batch and the loss."""
    loaded = create("tbps-tiny", seed=0)
    base = loaded.model.train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *loaded.image_size, generator=gen)
    tokens = loaded.tokenizer([CAPTIONS[i % len(CAPTIONS)] + f" ({i})" for i in range(batch)])
    labels = torch.arange(batch)

    def loss_fn(model):
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    runs = {}
    for label, method, norm in kinds:
        torch.manual_seed(0)
        model = apply_adapters(copy.deepcopy(base), method, rank=rank, wora_norm=norm)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[label] = (model, opt)
    return base, runs, loss_fn


def _step(model, opt, loss_fn) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _shares(base, runs) -> dict[str, dict]:
    total = count_parameters(base)[1]
    out = {}
    for label, (model, _) in runs.items():
        trainable = count_parameters(model)[0]
        modules = adapter_config(model)["modules"]
        layer_weights = sum(
            base.get_submodule(n).in_proj_weight.numel() if n.endswith(".attn") else base.get_submodule(n).weight.numel()
            for n in modules
        )
        out[label] = {
            "trainable": trainable,
            "share_of_full": trainable / total,
            "adapted_weights": layer_weights,
            "share_of_adapted": trainable / layer_weights if layer_weights else None,
        }
    return out


def timing(batch: int, rank: int, warmup: int, steps: int) -> tuple[dict, dict]:
    base, runs, loss_fn = _setup(batch, rank, KINDS)
    labels = list(runs)
    for _ in range(warmup):
        for label in labels:
            _step(*runs[label], loss_fn)
    wall = {label: [] for label in labels}
    cpu = {label: [] for label in labels}
    for r in range(steps):
        # Rotate the order each round: no method always runs right after the same neighbour.
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            t0, c0 = time.perf_counter(), time.process_time()
            _step(*runs[label], loss_fn)
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    return _shares(base, runs), {"wall": wall, "cpu": cpu}


def memory_child(label: str, batch: int, rank: int, steps: int) -> dict:
    kind = next(k for k in KINDS if k[0] == label)
    _, runs, loss_fn = _setup(batch, rank, [kind])
    model, opt = runs[label]
    before = _peak_rss_mib()
    for _ in range(steps):
        _step(model, opt, loss_fn)
    return {"label": label, "peak_rss_mib": _peak_rss_mib(), "before_mib": before}


def _paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed rounds (one step of every method each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of every method first")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory child")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)  # a benchmark script, not library code: it owns the process
    if args.child:
        print(json.dumps(memory_child(args.child, args.batch, args.rank, args.memory_steps)))
        return

    shares, times = timing(args.batch, args.rank, args.warmup, args.steps)
    wall, cpu = times["wall"], times["cpu"]
    memory = {}
    for label, _, _ in KINDS:
        cmd = [sys.executable, __file__, "--child", label, "--batch", str(args.batch), "--rank", str(args.rank)]
        cmd += ["--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
        memory[label] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]

    rows = []
    for label, _, _ in KINDS:
        s, m = shares[label], memory[label]
        of_layers = "—" if label == "full" else f"{s['share_of_adapted']:.2%}"
        rows.append(
            f"| {label} | {s['trainable']:,} | {s['share_of_full']:.2%} | {of_layers} | "
            f"{statistics.median(wall[label]) * 1000:.0f} ms | {statistics.median(cpu[label]) * 1000:.0f} ms | "
            f"{_paired_ratio(wall, label, 'lora'):.2f} | {_paired_ratio(wall, label, 'full'):.2f} | "
            f"{m['peak_rss_mib']:.0f} MiB | +{m['peak_rss_mib'] - m['before_mib']:.0f} MiB |"
        )
    header = (
        "| method | trainable | % of full | % of adapted weights | step (median wall) | step (median CPU) "
        "| / lora | / full | peak RSS | rise in training |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    ratio_lora, ratio_full = _paired_ratio(wall, "wora", "lora"), _paired_ratio(wall, "wora", "full")
    cpu_lora, cpu_full = _paired_ratio(cpu, "wora", "lora"), _paired_ratio(cpu, "wora", "full")
    adapted = shares["wora"]["adapted_weights"]
    print(table)
    print(
        f"wora/lora step time {ratio_lora:.2f} wall, {cpu_lora:.2f} CPU (goal <= 1.5); wora/full {ratio_full:.2f} wall, "
        f"{cpu_full:.2f} CPU; wora trains {shares['wora']['share_of_full']:.2%} of full (goal <= 5%); "
        f"{args.steps} timed rounds after {args.warmup} warm-up, {args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} cores"
    )
    if args.no_write:
        return
    command = "python bench/adapters.py" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (("steps", args.steps), ("warmup", args.warmup), ("batch", args.batch), ("rank", args.rank), ("threads", args.threads))
        if v != ap.get_default(k)
    )
    write_section(
        "adapters",
        f"""## adapters: WoRA / DoRA / LoRA / full on tbps-tiny (CPU)

Command: `{command}` (tbps-tiny, batch {args.batch} of random 96x32 images and 64-token captions,
CLIP contrastive loss, AdamW, rank {args.rank}, {args.threads} torch thread(s); wora is the default
per-input norm).

{table}

- **% of full**: trainable parameters over full fine-tuning's, i.e. all {shares['full']['trainable']:,}
  parameters of tbps-tiny (the text token embedding alone is 6.3 M of them). **% of adapted weights**:
  over the {adapted:,} weight elements W0 of the layers adapted (q/k/v, out_proj, c_fc, c_proj of both
  towers). Only adapter parameters train (the API default; `tbps train` also trains `logit_scale`).
- **Step time**: {args.steps} interleaved rounds after {args.warmup} warm-up steps of every method, in
  one process; "/ lora" and "/ full" are medians of the per-round ratios of wall times. Load average
  {load:.1f} on {os.cpu_count()} cores at the end (a shared machine: wall times are noisy, ratios less so).
  CPU-time ratios of the same steps: wora/lora {cpu_lora:.2f}, wora/full {cpu_full:.2f}.
- **Peak RSS**: a fresh child process per method (build, apply, {args.memory_steps} training steps);
  VmHWM of /proc/self/status, and its rise during the training steps over the peak just before
  them (model, batch, torch and open_clip already loaded).

Goals: WoRA trains <= 5% of full: {shares['wora']['share_of_full']:.2%}. WoRA/LoRA step time <= 1.5:
{ratio_lora:.2f}. WoRA/full: {ratio_full:.2f}.
""",
    )


if __name__ == "__main__":
    main()
