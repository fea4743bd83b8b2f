"""Issue #14's GPU figure: ``tbps score`` pairs/s with a BLIP-2-sized ITM model, with and without the ITM pass.

A ``Blip2ForImageTextRetrieval`` at BLIP-2's published size (``Salesforce/blip2-itm-vit-g``: ViT-g/14
at 224, 39 layers of width 1408; a BERT-base Q-Former with 32 queries) with random weights (no
weights reach the lent machine), saved with ``save_pretrained`` and a word-level tokenizer over the
world's captions, then scored by ``run_score`` as ``hf:DIR`` on ``--pairs`` pairs of the embedded
world, bf16 autocast: once with ``--no-itm`` (ITC cosine and bank rank only) and once with
``itm_score`` (the ITM head's pass over every pair, on the vision states of the same ViT pass).
Random weights cost what trained ones do; the scores mean nothing.

    python bench/itm_gpu.py [--pairs 20000] [--workers N] [--batch-size 256]   (a lent GPU, < 10 min)
    python bench/itm_gpu.py --device cpu --tiny --pairs 40                     (a check of the script)

It prints each figure, writes ``OUT/itm-gpu.json`` and, on a GPU, the ``itm-gpu`` section of
bench/RESULTS.md. Needs transformers and tokenizers importable beside gpu.py's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import make_world, versions  # noqa: E402  (its import checks torch, open_clip, polars, pyarrow, typer)

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _results import write_section  # noqa: E402

from tbps.curate.score import ScoreConfig, run_score  # noqa: E402
from tbps.data.readers import read_captions  # noqa: E402

# Salesforce/blip2-itm-vit-g's shapes (its config.json).
VISION = {"image_size": 224, "patch_size": 14, "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
          "num_attention_heads": 16}
QFORMER = {"vocab_size": 30523, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "max_position_embeddings": 512, "encoder_hidden_size": 1408, "cross_attention_frequency": 2}
QUERIES, ITC_DIM, CONTEXT = 32, 256, 64
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_QFORMER = {"vocab_size": 30523, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 128, "encoder_hidden_size": 32}
PAD, UNK, CLS, SEP = 0, 1, 2, 3


def tokenizer(captions: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' words ([CLS] caption [SEP]): BERT's role without its files."""
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    vocab = {"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP, **{w: i + 4 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", model_max_length=CONTEXT)


def build_model(path: Path, captions: list[str], tiny: bool, device: torch.device) -> int:
    """Save a random BLIP-2 retrieval model (and its tokenizer) to ``path``; returns its parameter count."""
    qformer = {**(TINY_QFORMER if tiny else QFORMER), "pad_token_id": PAD, "use_qformer_text_input": True}
    config = transformers.Blip2Config(
        vision_config=TINY_VISION if tiny else VISION, qformer_config=qformer, num_query_tokens=4 if tiny else QUERIES,
        image_text_hidden_size=16 if tiny else ITC_DIM,
        text_config={"model_type": "opt", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "ffn_dim": 32, "word_embed_proj_dim": 16},  # unused by the retrieval model; the config requires one
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.2B-parameter init on the host would take minutes
        model = transformers.Blip2ForImageTextRetrieval(config).eval()
    model.save_pretrained(path)
    tokenizer(captions).save_pretrained(path)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--bank-size", type=int, default=10_000)
    ap.add_argument("--tiny", action="store_true", help="a tiny random BLIP-2 config (a CPU check of the script)")
    ap.add_argument("--workdir", default=None, help="kept between runs: the world and the saved model (default: a temp dir)")
    ap.add_argument("--out", default="runs/bench-itm-gpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/itm_gpu.py: no CUDA device here; pass --device cpu --tiny for a check of the script")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="tbps-itm-gpu-"))
    info = versions(device)
    info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)

    t0 = time.perf_counter()
    world = make_world(workdir, a.pairs, identities=max(50, a.pairs // 20))
    pool, bank = world / "pool" / "pool.json", world / "benchmark" / "reid_raw.json"
    print(f"world: {a.pairs:,} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    model_dir = workdir / ("blip2-tiny" if a.tiny else "blip2-vit-g")
    t0 = time.perf_counter()
    params = build_model(model_dir, read_captions(str(pool)) + read_captions(str(bank)), a.tiny, device)
    print(f"model: {params / 1e6:,.0f} M parameters, built and saved in {time.perf_counter() - t0:.0f} s", flush=True)

    figures = {"versions": info, "pairs": a.pairs, "parameters": params, "batch_size": a.batch_size, "workers": a.workers,
               "tiny": a.tiny, "runs": {}}
    for name, itm in (("itc only (--no-itm)", False), ("itc + itm", True)):
        t0 = time.perf_counter()
        summary = run_score(ScoreConfig(data=str(pool), model=f"hf:{model_dir}", bank=str(bank), out=str(workdir / f"scores-{itm}"),
                                        bank_size=a.bank_size, batch_size=a.batch_size, workers=a.workers, precision="bf16",
                                        device=str(device), itm=itm))
        wall = time.perf_counter() - t0
        figures["runs"][name] = {"loop_pairs_per_s": summary.pairs_per_second, "end_to_end_pairs_per_s": a.pairs / wall, "wall_s": wall,
                                 "status_counts": summary.status_counts}
        if device.type == "cuda":
            figures["runs"][name]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        print(f"{name}: loop {summary.pairs_per_second:,.1f} pairs/s, end to end {a.pairs / wall:,.1f} pairs/s ({wall:.0f} s)", flush=True)
    runs = figures["runs"]
    cost = runs["itc only (--no-itm)"]["loop_pairs_per_s"] / max(runs["itc + itm"]["loop_pairs_per_s"], 1e-9)
    figures["itm_cost"] = cost
    (out / "itm-gpu.json").write_text(json.dumps(figures, indent=2, default=str))

    lines = [
        f"`tbps score` with a random-weight BLIP-2 retrieval model ({params / 1e6:,.0f} M parameters"
        + (", tiny config" if a.tiny else ", ViT-g/14 at 224 + BERT-base Q-Former, 32 queries") + f") on {a.pairs:,} pairs, bf16 autocast, "
        f"batch {a.batch_size}, {a.workers} decoding workers, bank {a.bank_size:,}; {info.get('gpu', info['device'])}, "
        f"driver {info.get('driver', '-')}, torch {info['torch']}, transformers {info['transformers']}.",
        "",
        f"Command: `python bench/itm_gpu.py --pairs {a.pairs} --batch-size {a.batch_size} --workers {a.workers}`",
        "",
        "| run | scoring loop pairs/s | end to end pairs/s | wall s |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {n} | {r['loop_pairs_per_s']:,.1f} | {r['end_to_end_pairs_per_s']:,.1f} | {r['wall_s']:.0f} |" for n, r in runs.items()],
        "",
        f"The ITM pass costs {cost:.2f}x the ITC-only loop's time per pair.",
    ]
    print("\n".join(lines))
    if device.type == "cuda" and not a.tiny:
        write_section("itm-gpu", "## BLIP-2 ITM scoring on a GPU (issue 14)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
