"""The ``tbps`` command line: options -> one config object -> one core call -> a summary.

Commands stay thin (about 15 lines): the work happens in ``tbps.curate``, ``tbps.train``,
``tbps.data`` and ``tbps.eval``, and :mod:`tbps.terminal` renders the summaries they return; only
this module prints. Bad input raises :class:`tbps.errors.TbpsError` in core code;
it is caught once in :func:`main`, printed without a traceback, and the exit code is 1.
A bad combination of options is a usage error: exit 2, naming the options.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console, RenderableType
from typer.core import TyperGroup

from tbps.config_files import apply_config, settle
from tbps.curate import select_io
from tbps.curate.inspect import InspectConfig, run_inspect
from tbps.curate.layout import PAPER_BANK_SIZE, PAPER_RULES
from tbps.curate.select import STEPS, SelectConfig
from tbps.data.formats import FORMATS
from tbps.data.readers import ReadConfig, describe
from tbps.data.synth import SynthConfig, synthesize
from tbps.demo.plan import DemoConfig
from tbps.models.adapters import adapter_help
from tbps.models.registry import model_help
from tbps.errors import TbpsError, UsageError
from tbps.files import as_disk_full
from tbps.terminal import (
    dataset_summary,
    demo_tables,
    embedding_score_summary,
    export_summary,
    inspect_report,
    metrics_table,
    score_summary,
    search_results,
    select_summary,
    synth_summary,
    train_summary,
)

MODEL_FORMS = model_help()  # from the model-family registry

out = Console()  # results
err = Console(stderr=True)  # progress, logs and errors


class _Group(TyperGroup):
    """Turns tbps errors into one printed line and an exit code, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            # typer's own exception types (it vendors click): exit 2 with the usage line.
            raise typer.BadParameter(str(exc), ctx=ctx) from None
        except TbpsError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            full = as_disk_full(exc)  # a full disk met outside tbps.files (a log append): one line too
            if full is None:
                raise
            err.print(f"[bold red]error:[/] {full}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="tbps",
    help="Text-based person search: score, select, train (WoRA) and evaluate.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Reader options shared by every command that reads a dataset.
FORMAT_NAMES = ", ".join(FORMATS)
FormatOpt = typer.Option(None, "--format", help=f"Dataset format, one of {FORMAT_NAMES}; auto-detected when omitted.")
ImageRootOpt = typer.Option(None, "--image-root", help="Directory the image paths resolve in (default: next to the file).")
ImageColOpt = typer.Option(None, "--image-col", help="Image path column of a CSV/JSONL/Parquet table.")
CaptionColOpt = typer.Option(None, "--caption-col", help="Caption column of a CSV/JSONL/Parquet table.")
IdColOpt = typer.Option(None, "--id-col", help="Person id column of a CSV/JSONL/Parquet table (webdataset shards: the .json field).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or logs on stderr.")


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "pairs", quiet: bool = False):
    """A rich progress bar on stderr; yields ``update(done, total)`` for core code to call.

    Example: ``with progress_bar("scoring", quiet=quiet) as update: run_score(cfg, progress=update)``
    """
    if quiet:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with contextlib.ExitStack() as stack:
        shown: dict = {}
        start = time.perf_counter()

        def update(done: int, total: int) -> None:
            if not shown:  # the bar appears at the first report: work that reports nothing (a cached index) shows no empty bar
                shown["bar"] = stack.enter_context(Progress(*columns, console=err, transient=False))
                shown["task"] = shown["bar"].add_task(description, total=total, rate="")
            rate = done / max(time.perf_counter() - start, 1e-9)
            shown["bar"].update(shown["task"], completed=done, total=total, rate=f"{rate:,.0f} {unit}/s")

        yield update


def log_line(quiet: bool):
    """A logger for core code: one line to stderr, or nothing with --quiet."""
    return (lambda msg: None) if quiet else (lambda msg: err.print(msg, highlight=False))


def show(parts: list[RenderableType]) -> None:
    """Print a summary's renderables (:mod:`tbps.terminal`) to stdout, in order."""
    for part in parts:
        out.print(part)


@app.command()
def version() -> None:
    """Print the tbps, torch and open_clip versions.

    Example: tbps version
    """
    from tbps.provenance import versions

    for name, value in versions().items():
        out.print(f"{name} {value}")


@app.command()
def score(
    data: str = typer.Argument(..., help="The pairs to score: any dataset the readers support."),
    model: str = typer.Option(..., "--model", help=f"The model that scores. {MODEL_FORMS}"),
    bank: str = typer.Option(..., "--bank", help="Reference bank: a dataset or a .txt file, one caption per line."),
    out_dir: str = typer.Option(..., "--out", help="Output directory (re-run the same command to resume)."),
    format: Optional[str] = FormatOpt,
    image_root: Optional[str] = ImageRootOpt,
    image_col: Optional[str] = ImageColOpt,
    caption_col: Optional[str] = CaptionColOpt,
    id_col: Optional[str] = IdColOpt,
    split: Optional[str] = typer.Option(None, "--split", help="NAME[,NAME]: score only the rows of these splits (default: every row)."),
    bank_size: int = typer.Option(10_000, "--bank-size", help="Bank captions sampled with --seed."),
    bank_split: str = typer.Option("train", "--bank-split", help="Split of a bank dataset to draw captions from (all: every row)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bank sample (and of random model weights)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding images."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where native), fp32 or bf16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    chunk_size: int = typer.Option(16_384, "--chunk-size", help="Pairs per output part (the unit of resume)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: score shard i of N (SLURM arrays)."),
    itm: bool = typer.Option(True, "--itm/--no-itm", help="With a model that has an image-text matching head (BLIP, BLIP-2, a run trained with --itm-head): also write each pair's itm_score."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="A clip-retrieval embeddings dir (img_emb/, text_emb/, metadata/): take each pair's embeddings from it, matched on pair_id or image_path+caption, instead of the forward pass; --model embeds the bank (same width)."),
    quiet: bool = QuietOpt,
) -> None:
    """Score every pair: image-caption cosine and rank against a reference caption bank (and the ITM match probability, where the model has a head).

    Writes OUT/scores/part-*.parquet (one row per input pair), OUT/embeddings/ and OUT/score.json.
    With --embeddings DIR the pairs' embeddings come from clip-retrieval's files; rows without one are status no-embedding.

    Example: tbps score world/pool/pool.json --model tbps-tiny --bank world/benchmark/reid_raw.json --out runs/scores
    """
    from tbps.curate.embeddings import score_from_embeddings
    from tbps.curate.score import ScoreConfig, run_score

    cfg = ScoreConfig(
        data=data, model=model, bank=bank, out=out_dir, format=format, image_root=image_root, image_col=image_col,
        caption_col=caption_col, id_col=id_col, split=split, bank_size=bank_size, bank_split=bank_split, seed=seed, batch_size=batch_size, workers=workers,
        precision=precision, device=device, chunk_size=chunk_size, shard=shard, itm=itm, embeddings=embeddings,
    )
    with progress_bar("scoring", quiet=quiet) as update:
        summary = (run_score if embeddings is None else score_from_embeddings)(cfg, progress=update, log=log_line(quiet))
    out.print(score_summary(summary) if embeddings is None else embedding_score_summary(summary))


@app.command(
    help=f"""Read a dataset and print its format, rows, statuses, splits, persons, images and first rows.

    Formats: {FORMAT_NAMES}.

    Example: tbps info runs/demo-world/benchmark/reid_raw.json --image-root runs/demo-world/benchmark/imgs
    """
)
def info(
    data: Path = typer.Argument(..., help="A dataset file or folder, in any format the readers support."),
    format: Optional[str] = FormatOpt,
    image_root: Optional[Path] = ImageRootOpt,
    image_col: Optional[str] = ImageColOpt,
    caption_col: Optional[str] = CaptionColOpt,
    id_col: Optional[str] = typer.Option(None, "--id-col", help="Person id column of a table; 'folder' for an image folder; the .json field of webdataset shards."),
    head: int = typer.Option(5, "--head", help="How many first rows to show."),
) -> None:
    config = ReadConfig(data=data, format=format, image_root=image_root, image_col=image_col, caption_col=caption_col, id_col=id_col)
    summary = describe(config, head=head)
    show(dataset_summary(summary))
    sample = summary.image_sample
    if sample.found < sample.checked:
        where = f"; a file of that name is in {sample.found_elsewhere}: check --image-root" if sample.found_elsewhere else "; check --image-root"
        err.print(f"warning: {sample.checked - sample.found:,} of {sample.checked:,} sampled image files do not exist "
                  f"(e.g. {sample.missing_example}){where}", highlight=False, soft_wrap=True)


# --- eval, inspect, search (tbps.eval) ---------------------------------------------------


@app.command("eval")
def eval_(
    data: Optional[list[Path]] = typer.Argument(None, help="The test dataset (with person ids); with --compare: eval JSON records."),
    model: Optional[str] = typer.Option(None, "--model", help=f"The model to evaluate. {MODEL_FORMS}"),
    data_opt: Optional[Path] = typer.Option(None, "--data", help="The test dataset (same as the DATA argument)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to evaluate (default: test when the data has splits, else all rows)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="JSON record to write (default: eval-<model>-<data>-<split>.json)."),
    compare: bool = typer.Option(False, "--compare", help="Print the eval JSON records given as arguments side by side."),
    format: Optional[str] = FormatOpt,
    image_root: Optional[Path] = ImageRootOpt,
    image_col: Optional[str] = ImageColOpt,
    caption_col: Optional[str] = CaptionColOpt,
    id_col: Optional[str] = IdColOpt,
    batch_size: int = typer.Option(256, "--batch-size", help="Images / captions per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (reproducible), bf16 or auto."),
    rerank: Optional[int] = typer.Option(None, "--rerank", help="Also re-rank each query's ITC top K images by the model's ITM match probability (needs a matching head) and report both."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page: the R@K curve (K = 1..gallery) and each query's first-correct rank."),
    quiet: bool = QuietOpt,
) -> None:
    """Text-to-image retrieval (R@1/5/10, mAP, mINP): every test caption queries every test image.

    With --rerank K the model's image-text matching head re-orders each query's top K images (APTM's protocol); both rankings are reported.

    Example: tbps eval --model runs/train --data runs/demo-world/benchmark/reid_raw.json --split test --html runs/eval.html
    """
    from tbps.eval.evaluate import EvalConfig, load_records, run_eval
    from tbps.eval.metrics import METRIC_KEYS

    if data_opt is not None:
        if data and not compare:
            raise UsageError("give the dataset once: as DATA or as --data", field="DATA / --data")
        data = [data_opt]
    if compare:
        out.print(metrics_table(load_records(data or []), METRIC_KEYS, names=[p.name for p in data or []]))
        return
    if not data or len(data) != 1 or model is None:
        raise UsageError("give one DATA and --model, or --compare A.json B.json ...", field="DATA / --model")
    cfg = EvalConfig(data=data[0], model=model, split=split, out=out_file, format=format, image_root=image_root, image_col=image_col,
                     caption_col=caption_col, id_col=id_col, batch_size=batch_size, workers=workers, device=device, precision=precision,
                     rerank=rerank, html=html)
    with progress_bar("evaluating", unit="embeddings", quiet=quiet) as update:
        rec = run_eval(cfg, log=log_line(quiet), progress=update)
    out.print(metrics_table([rec], METRIC_KEYS))
    for line in rec["warnings"]:  # the model trained on the evaluated split: said even with --quiet
        err.print(line, highlight=False, soft_wrap=True)
    err.print(f"wrote {rec['out']}" + (f" and {rec['html']}" if rec.get("html") else ""), highlight=False)


@app.command()
def inspect(
    table: Path = typer.Argument(..., help="A score run dir (DIR/scores/*.parquet), a Parquet score table, a manifest, or its NAME.dropped.parquet."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report (thumbnails, histograms)."),
    top: int = typer.Option(10, "--top", help="Pairs shown at each end by score, and per drop reason."),
    bins: int = typer.Option(20, "--bins", help="Bins of the score histogram."),
    image_root: Optional[Path] = typer.Option(
        None, "--image-root", help="The directory the table's images must lie in (HTML pictures); default: the root the score run recorded."
    ),
    reason: Optional[str] = typer.Option(None, "--reason", help="Only dropped rows with this reason (duplicate-of: every duplicate)."),
    step: Optional[str] = typer.Option(None, "--step", help="Only dropped rows of this selection step."),
) -> None:
    """Summarise a score table, manifest or drop table: counts, quantiles, histograms, extreme pairs, sources, drops.

    A drop table (NAME.dropped.parquet) shows its rows joined back to their scores, captions and
    images through the manifest's provenance, each duplicate beside its original.

    Example: tbps inspect runs/scores --html runs/scores/report.html --top 24
    """
    report = run_inspect(InspectConfig(table=table, html=html, top=top, bins=bins, image_root=image_root, reason=reason, step=step))
    show(inspect_report(report))
    if html is not None:
        err.print(f"wrote {html}", highlight=False)


@app.command()
def search(
    query: Optional[list[str]] = typer.Argument(None, help="Free-text queries (quote each one)."),
    gallery: Path = typer.Option(..., "--gallery", help="Images to search: any reader dataset or a folder of images."),
    model: str = typer.Option(..., "--model", help=f"The model that embeds. {MODEL_FORMS}"),
    queries: Optional[Path] = typer.Option(None, "--queries", help="A text file of more queries, one per line."),
    top_k: int = typer.Option(10, "--top-k", help="Matches per query."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained page of thumbnails."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Index cache (default $TBPS_CACHE_DIR or ~/.cache/tbps)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the gallery index even if a cached one matches."),
    format: Optional[str] = FormatOpt,
    image_root: Optional[Path] = ImageRootOpt,
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = QuietOpt,
) -> None:
    """Find the gallery images that best match a description (FAISS index, cached per gallery and model).

    Example: tbps search "a woman in a red coat with a black backpack" --gallery photos/ --model runs/train --html hits.html
    """
    from tbps.eval.search import SearchConfig, run_search

    cfg = SearchConfig(queries=query or [], gallery=gallery, model=model, queries_file=queries, top_k=top_k, html=html,
                       cache_dir=cache_dir, rebuild=rebuild, format=format, image_root=image_root, workers=workers, device=device)
    with progress_bar("embedding the gallery", unit="images", quiet=quiet) as update:
        result = run_search(cfg, log=log_line(quiet), progress=update)
    show(search_results(result))


# --- train, export (tbps.train) ------------------------------------------------------------


@app.command()
def train(
    ctx: typer.Context,
    run_dir: str = typer.Option(..., "--out", help="Run directory to write (or to continue with --resume)."),
    model: str = typer.Option(..., "--model", help=f"The base model. {MODEL_FORMS}"),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="Manifest Parquet written by `tbps select`."),
    data: Optional[str] = typer.Option(None, "--data", help="Or: a dataset any reader supports (instead of --manifest)."),
    format: Optional[str] = FormatOpt,
    image_root: Optional[str] = ImageRootOpt,
    image_col: Optional[str] = ImageColOpt,
    caption_col: Optional[str] = CaptionColOpt,
    id_col: Optional[str] = IdColOpt,
    train_split: Optional[str] = typer.Option("train", "--train-split", help="Split of --data to train on (when it has splits)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation dataset; picks the best checkpoint (never use test)."),
    val_split: Optional[str] = typer.Option("val", "--val-split", help="Split of --val to validate on (when it has splits)."),
    adapter: str = typer.Option("wora", "--adapter", help=adapter_help()),  # from the adapter-method registry
    rank: int = typer.Option(8, "--rank", help="Adapter rank r."),
    wora_norm: str = typer.Option("per-input", "--wora-norm", help="per-input (paper code) or per-output (DoRA)."),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help="Module name patterns to adapt (repeat or comma-separate); default all."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA/DoRA alpha: B*A scaled by alpha/r (default 16)."),
    fixed_scale: bool = typer.Option(False, "--fixed-scale", help="WoRA: keep alpha and beta at their initial values (not learned)."),
    also_train: Optional[list[str]] = typer.Option(None, "--also-train", help="Parameter name patterns trained besides the adapters, e.g. 'ln_*,*embedding*'."),
    loss: str = typer.Option("clip", "--loss", help="clip (InfoNCE) or sdm (same person_id = positive, IRRA)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the data (default 5; or give --steps)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Pairs per micro-batch, over all torchrun processes."),
    accum: int = typer.Option(1, "--accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay of matrices."),
    warmup: float = typer.Option(0.05, "--warmup", help="Linear warm-up: a share of the steps (below 1) or a number of steps; then cosine decay."),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Max gradient norm (0: off)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where native), fp32 or bf16."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights init, data order and augmentation."),
    val_every: int = typer.Option(500, "--val-every", help="Validate every N steps (and at the end)."),
    save_every: int = typer.Option(500, "--save-every", help="Write RUN/last every N steps (and at the end)."),
    log_every: int = typer.Option(10, "--log-every", help="One log line every N steps."),
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from RUN/last (same options)."),
    max_missing: float = typer.Option(0.05, "--max-missing", help="Share of rows with missing images skipped; above: refuse."),
    allow_test: bool = typer.Option(False, "--allow-test", help="Allow --val-split test (the checkpoint is then chosen on the test split)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Train although the training rows share images or persons with --val (refused otherwise; run.json records it)."),
    itm_head: bool = typer.Option(False, "--itm-head", help="Also train an image-text matching head (caption tokens attend to image tokens) on in-batch hard negatives; the run then scores itm_score (open_clip models)."),
    hard_negatives: bool = typer.Option(False, "--hard-negatives", help="Each caption with its colours swapped or replaced, or its garments swapped, is one more negative of its image (NegCLIP; and for --itm-head)."),
    log_to: Optional[list[str]] = typer.Option(None, "--log-to", help="Also log to csv (RUN/log.csv) and/or tensorboard (RUN/tensorboard/), comma-separated; log.jsonl is always written."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON file of options (keys: option names), or a RUN/run.json to re-run; command-line options win.",
                                          is_eager=True, callback=apply_config, exists=True),
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune a CLIP model with WoRA (or DoRA, LoRA, full) and write a run directory.

    RUN/run.json (config, data hash, parameters, training time, best step), RUN/log.jsonl, RUN/last/ and
    RUN/best/. Under torchrun: DDP over all processes. A run loads with --model RUN in score/eval/search.
    --config runs/wora/run.json --out runs/wora-again re-runs a recorded run.

    Example: tbps train --manifest manifests/finetune.parquet --model ViT-B-16:openai --adapter wora --val data/reid_raw.json --out runs/wora
    """
    options = {k: v for k, v in locals().items() if k not in ("ctx", "run_dir", "quiet", "log_to", "config")}  # field names = option names
    import os

    from tbps.train.loop import TrainConfig, train as run_train
    from tbps.train.sinks import LogSinks, parse_log_to

    sinks = parse_log_to(log_to)  # first: a missing tensorboard package is an option error
    cfg = TrainConfig(out=run_dir, **settle(ctx, options, run_dir))
    quiet = quiet or os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 reports
    with LogSinks(cfg.out, sinks) as mirror, progress_bar("training", unit="steps", quiet=quiet) as update:
        result = run_train(cfg, progress=mirror.follow(update), log=log_line(quiet))
    if result.rank == 0:
        out.print(train_summary(result))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory written by `tbps train`."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="With --merge: the checkpoint file (.pt); with --no-merge: a directory."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Fold the adapters into plain weights, or write the adapters alone (a small directory --model loads onto its base model)."),
    peft: Optional[Path] = typer.Option(None, "--peft", help="Instead of --out: a directory of LoRA/DoRA adapters in PEFT's format (peft.PeftModel.from_pretrained(base, DIR))."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best or last (default: the run's result)."),
) -> None:
    """Write a run's weights: a plain open_clip checkpoint with the adapters folded in (--merge), the adapters alone (--no-merge), or the adapters in PEFT's format (--peft DIR).

    --merge and --no-merge output loads with --model OUT in score, eval, search and train; --peft DIR loads with PEFT onto the base model.

    Example: tbps export runs/wora --merge --out runs/wora.pt
    """
    from tbps.models.runs import export_adapters, export_peft, export_run

    if (out_file is None) == (peft is None):
        raise UsageError("give one of --out and --peft", field="--out", value=(out_file, peft))
    if peft is not None:
        path, identity = export_peft(run, peft, checkpoint)
    else:
        path, identity = (export_run if merge else export_adapters)(run, out_file, checkpoint)
    out.print(f"wrote {path} (run {identity['run']}, {identity['checkpoint']} step {identity['step']}, weights {identity['sha']})", highlight=False)


@app.command("export-embeddings")
def export_embeddings_(
    score_dir: Path = typer.Argument(..., help="A complete `tbps score` output directory."),
    out_dir: Path = typer.Option(..., "--out", help="Directory to write: img_emb/, text_emb/, metadata/ (an earlier export there is replaced)."),
    format: str = typer.Option("clip-retrieval", "--format", help="Layout of the output: clip-retrieval."),
    rows_per_file: int = typer.Option(1_000_000, "--rows-per-file", help="Embedding rows per partition file (clip-retrieval's default: 1,000,000)."),
    quiet: bool = QuietOpt,
) -> None:
    """Write a score run's embeddings as clip-retrieval does: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy (float16, L2-normalised), metadata/metadata_N.parquet, row i the same pair.

    Only ok rows have embeddings; the others are counted in the summary, not written.

    Example: tbps export-embeddings runs/scores --format clip-retrieval --out runs/scores-clip
    """
    from tbps.curate.embeddings import ExportEmbeddingsConfig, export_embeddings

    cfg = ExportEmbeddingsConfig(score_dir=score_dir, out=out_dir, format=format, rows_per_file=rows_per_file)
    out.print(export_summary(export_embeddings(cfg, log=log_line(quiet))))


# --- synth (tbps.data.synth) ---------------------------------------------------------------


@app.command()
def synth(
    out_dir: Path = typer.Option(..., "--out", help="Directory to write the world to (a previous world there is replaced)."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed writes the same bytes."),
    identities: int = typer.Option(600, "--identities", help="Benchmark identities (person ids 1..N)."),
    split: str = typer.Option("4:1:1", "--split", help="TRAIN:VAL:TEST ratio of benchmark identities."),
    images_per_id: int = typer.Option(4, "--images-per-id", help="Benchmark images per identity (two captions each)."),
    pool_identities: int = typer.Option(5000, "--pool-identities", help="Identities of the pool, disjoint from the benchmark's."),
    pool_size: int = typer.Option(20000, "--pool-size", help="Image-caption pairs in the pool."),
    defect_rate: float = typer.Option(0.4, "--defect-rate", help="Share of defective pool pairs, in [0, 1]."),
    defect_mix: Optional[str] = typer.Option(None, "--defect-mix", help="KIND=WEIGHT,... share of each defect kind; kinds left out get 0 (default: built-in mix)."),
    image_size: str = typer.Option("96x32", "--image-size", help="HEIGHTxWIDTH with height = 3 x width."),
    colours: int = typer.Option(17, "--colours", help="Garment palette size, 2-17 (fewer: no near colours, easier)."),
    occlusion: float = typer.Option(0.25, "--occlusion", help="Probability of an object in front of the person."),
    lighting: float = typer.Option(0.3, "--lighting", help="Half-range of the per-image brightness change, 0-0.9."),
    clutter: int = typer.Option(3, "--clutter", help="Most background objects per image."),
    workers: int = typer.Option(2, "--workers", help="Rendering processes (1: in this process)."),
    quiet: bool = QuietOpt,
) -> None:
    """Write the synthetic pedestrian world: a CUHK-PEDES benchmark and an APTM/MALS pool with known defects.

    OUT/benchmark/reid_raw.json + imgs/, OUT/pool/pool.json + images/, OUT/pool/truth.parquet (defect truth), OUT/world.json.

    Example: tbps synth --out runs/demo-world --seed 0 --pool-size 20000 --defect-rate 0.4
    """
    options = {k: v for k, v in locals().items() if k not in ("out_dir", "quiet", "defect_mix")}  # field names = option names
    cfg = SynthConfig(out=out_dir, **options, **({"defect_mix": defect_mix} if defect_mix is not None else {}))
    with progress_bar("rendering", unit="images", quiet=quiet) as update:
        summary = synthesize(cfg, progress=update)
    out.print(synth_summary(summary))


# --- select (tbps.curate.select) -----------------------------------------------------------


def _select_help() -> str:
    """The help of ``tbps select``, its steps listed from ``STEPS``."""
    steps = "\n".join(f"{k}. {s.name} ({s.option}), reason {s.reason}: drops {s.drops}." for k, s in enumerate(STEPS, start=1))
    return f"""Select the training subset: status, score and bank-rank cuts, dedup, budgets -> a manifest.

Steps, in the order they run, each on the rows the steps before it kept:

{steps}

Writes the manifest, NAME.dropped.parquet (every dropped row with its step and reason) and NAME.json (provenance).

Example: tbps select runs/scores --rule paper-pretrain --keep 0.4 --name pool-40 --truth runs/world/pool/truth.parquet
"""


_RULE_HELP = " or ".join(f"{name} (bank_rank <= {k})" for name, k in PAPER_RULES.items())


@app.command("select", help=_select_help())
def select_(
    scores: list[Path] = typer.Argument(..., help="Score tables: `tbps score` output dirs, dirs of Parquet parts, or Parquet files."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Manifest path (default manifests/NAME.parquet)."),
    name: Optional[str] = typer.Option(None, "--name", help="Manifest name when --out is not given (default: the first input's name)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop rows with score below this."),
    min_itm: Optional[float] = typer.Option(None, "--min-itm", help="Drop rows with itm_score (ITM match probability) below this; the table needs itm_score."),
    max_bank_rank: Optional[int] = typer.Option(None, "--max-bank-rank", help="Drop rows with bank_rank above this."),
    rule: Optional[str] = typer.Option(None, "--rule", help=f"{_RULE_HELP}, for a {PAPER_BANK_SIZE:,}-caption bank; scaled to other bank sizes."),
    dedup: str = typer.Option("auto", "--dedup", help="Exact dedup keys: auto (pair when most images carry several distinct captions, else image,caption), image, caption (comma-separated), pair (both at once), or none."),
    dedup_threshold: Optional[float] = typer.Option(None, "--dedup-threshold", help="Also drop near duplicates: embedding cosine >= this (needs a `tbps score` dir)."),
    keep: Optional[float] = typer.Option(None, "--keep", help="Keep the best FRACTION of the input rows (all rows read), in (0, 1]."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Keep at most N rows."),
    by: str = typer.Option("score", "--by", help="What 'best' means: score (high first), bank_rank (low first) or itm_score (high first; the table needs it)."),
    max_per_person: Optional[int] = typer.Option(None, "--max-per-person", help="Keep at most N rows per person_id."),
    quota: Optional[list[str]] = typer.Option(None, "--quota", help="SOURCE=N: keep at most N rows of that source (repeatable)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="A synthetic world's pool/truth.parquet: measure precision, recall and AUROC."),
    split: Optional[str] = typer.Option(None, "--split", help="NAME[,NAME]: keep only the rows of these splits (the score table's split column); --keep then counts their rows."),
    explain: bool = typer.Option(False, "--explain", help="Also print why rows were dropped."),
    quiet: bool = QuietOpt,
) -> None:
    """Select the training subset (the help text, with the steps, is :func:`_select_help`)."""
    options = {k: v for k, v in locals().items() if k not in ("out_path", "explain", "quiet", "quota", "scores")}  # field names = option names
    cfg = SelectConfig(scores=tuple(scores), out=out_path, quota=tuple(quota or ()), **options)
    run = select_io.run_select(cfg, log=log_line(quiet))
    show(select_summary(run, explain=explain))


# --- demo (tbps.demo) ----------------------------------------------------------------------


@app.command()
def demo(
    out_dir: str = typer.Option("runs/demo", "--out", help="Run directory (a previous demo there is replaced)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny world, a few steps: every stage runs (under 3 minutes on 2 cores); the numbers mean nothing."),
    seeds: int = typer.Option(1, "--seeds", help="Training seeds repeating both training stages: mean ± std."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the scorer and the first training run."),
    tune: bool = typer.Option(False, "--tune", help="First choose each training method's learning rate on val from its grid (else: the recorded choice, demo/tuning.json)."),
    jobs: int = typer.Option(2, "--jobs", help="Training runs at a time (processes, one torch thread each)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader processes decoding images per run (0: in the run's process)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = QuietOpt,
) -> None:
    """The paradigm as an experiment on the synthetic world: pretrain on the full / filtered / random / oracle pool, fine-tune (full FT, WoRA, DoRA, LoRA), evaluate with intervals, judge the paper's claims.

    Prints the test-split table (95% bootstrap intervals over test identities), the gate and the claims; writes OUT/results.md, OUT/results.json and OUT/report.html.

    Example: tbps demo --quick --out runs/demo-quick
    """
    options = {k: v for k, v in locals().items() if k not in ("out_dir", "quiet")}  # field names = option names
    from tbps.demo.run import run_demo

    with progress_bar("demo", unit="stages", quiet=quiet) as update:
        result = run_demo(DemoConfig(out=out_dir, **options), progress=update, log=log_line(quiet))
    show(demo_tables(result))
    err.print(f"wrote {out_dir}/results.md, results.json and report.html ({result['seconds'] / 60:.1f} min)", highlight=False)


def main() -> None:
    """Entry point of the ``tbps`` console script and ``python -m tbps``."""
    from tbps.runtime import hold_freed_memory, offline_by_default

    # The program, not the library, sets process-wide policy: the allocator, and no downloads.
    offline_by_default()
    hold_freed_memory()
    app()


if __name__ == "__main__":
    main()
