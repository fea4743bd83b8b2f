"""The demo's stages, in order, in one run directory: :func:`run_demo`."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl
import torch

from tbps import columns as C
from tbps.curate.inspect import InspectConfig, run_inspect
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.curate.select import SelectConfig
from tbps.curate.select_io import run_select
from tbps.data.readers import read_dataset
from tbps.data.splits import select_split
from tbps.data.synth import SynthConfig, synthesize
from tbps.demo.claims import METRICS, aggregate, judge_claims
from tbps.demo.plan import (
    FINETUNE,
    SUBSETS,
    VARIANTS,
    DemoConfig,
    DemoPlan,
    design_notes,
    full_manifest,
    plan_for,
    random_manifest,
    steps_for,
)
from tbps.demo.report import DemoResult, results_markdown
from tbps.errors import TbpsError
from tbps.eval.evaluate import evaluate
from tbps.files import atomic_write, write_json, write_text
from tbps.models import load as load_model
from tbps.models.runs import export_run
from tbps.provenance import record
from tbps.train.loop import TrainConfig, train

MARKER = ".tbps-demo"  # marks a directory this command made (and may therefore replace)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
SCORES_REPORT_HTML = "report-scores.html"


def prepare_out(path: str | Path) -> Path:
    """Create the run directory, replacing a previous demo there and refusing anything else.

    Args:
        path: the ``--out`` directory.

    Returns:
        The directory, empty but for the demo marker.

    Raises:
        TbpsError: the path is a file, or a non-empty directory that no demo made.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TbpsError("--out is a file, not a directory", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TbpsError("the output directory is not empty and holds no previous tbps demo", path=out,
                            hint="choose a new or empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MARKER, "written by tbps demo; a later tbps demo --out here replaces this directory\n")
    return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (0: left alone), then restored."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Demo:
    """The stages of one demo run; holds the paths and options they share."""

    def __init__(self, config: DemoConfig, plan: DemoPlan, out: Path, log: Callable[[str], None]) -> None:
        self.config, self.plan, self.out, self.say = config, plan, out, log
        self.world = out / "world"
        self.bench = self.world / "benchmark" / "reid_raw.json"
        self.pool = self.world / "pool" / "pool.json"
        self.truth = self.world / "pool" / "truth.parquet"
        self.manifests = out / "manifests"
        self.timings: dict[str, float] = {}
        self.train_rows = 0  # usable pairs of the benchmark's train split (read_benchmark)
        self.test_rows: pl.DataFrame | None = None  # the test split's rows (read_benchmark)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def make_world(self) -> dict[str, Any]:
        cfg = SynthConfig(out=self.world, seed=self.config.seed, workers=2, **self.plan.world)
        summary = synthesize(cfg)
        self.say(f"world: {summary.splits}, pool {summary.pool_pairs:,} pairs, defects {summary.defects}")
        return {"splits": summary.splits, "pool_pairs": summary.pool_pairs, "defects": summary.defects}

    def read_benchmark(self) -> Path:
        """Count the train split, keep the test split's rows, write the bank; returns the bank's path.

        The bank is the train split's captions, one per line: the scorer's reference bank.
        """
        pairs = read_dataset(self.bench)
        train_split = pairs.filter((pl.col(C.SPLIT) == "train") & (pl.col(C.STATUS) == C.STATUS_OK))
        self.train_rows = train_split.height
        self.test_rows = select_split(pairs, "test")[0]
        captions = train_split.get_column(C.CAPTION).to_list()
        path = self.out / "bank.txt"
        # One caption a line: a caption's own line breaks would split it.
        write_text(path, "".join(" ".join(c.split()) + "\n" for c in captions))
        return path

    def train(self, key: str, seed: int, *, model: str, adapter: str = "full", wora_norm: str = "per-input",
              manifest: Path | None = None, epochs: int) -> tuple[Path, Any]:
        """One ``tbps train`` run, validated on the benchmark's val split; returns (run dir, result)."""
        rows = pl.scan_parquet(manifest).select(pl.len()).collect().item() if manifest else self.train_rows
        steps = steps_for(rows, self.plan.batch_size, epochs)
        run = self.out / "runs" / (key if key == "baseline" else f"seed{seed}") / key
        cfg = TrainConfig(
            out=str(run), model=model, manifest=str(manifest) if manifest else None, data=None if manifest else str(self.bench),
            val=str(self.bench), adapter=adapter, wora_norm=wora_norm, rank=self.plan.rank, epochs=epochs,
            batch_size=self.plan.batch_size, lr=self.plan.lr, warmup=max(1, round(self.plan.warmup * steps)), precision="fp32",
            seed=seed, val_every=-(-steps // self.plan.validations), save_every=steps, log_every=max(1, steps // 4),
            workers=self.config.workers, device=self.config.device,
        )
        self.say(f"{key} seed {seed}: training {adapter}{' ' + wora_norm if adapter == 'wora' else ''}, {epochs} epoch(s) of {rows:,} pairs = {steps} steps")
        result = train(cfg, log=lambda m: self.say(f"{key} seed {seed}: {m}"))
        return run, result

    def evaluate(self, key: str, seed: int, model: str) -> dict[str, Any]:
        """Test-split metrics of a model (``tbps eval``'s protocol), also written as JSON."""
        loaded = load_model(model)
        result = evaluate(loaded, self.test_rows, batch_size=128, workers=self.config.workers, device=self.config.device, precision="fp32")
        write_json(self.out / "eval" / f"{key}-seed{seed}.json", {"model": loaded.identity, **result})
        m = result["metrics"]
        self.say(f"{key} seed {seed}: test R@1 {m['R1']:.2f} | mAP {m['mAP']:.2f}")
        return m

    def export(self, run: Path, key: str, seed: int) -> Path:
        """Export a stage-A run (adapters folded in) as the checkpoint a fine-tune starts from."""
        path, _ = export_run(run, self.out / "models" / f"seed{seed}" / f"{key}.pt")
        return path


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """A manifest written atomically (``tbps.files.atomic_write``)."""
    with atomic_write(path) as fh:
        frame.write_parquet(fh)


def _measurement(metrics: dict[str, Any], result: Any) -> dict[str, Any]:
    return {
        **{m: float(metrics[m]) for m in METRICS},
        "trainable": result.trainable,
        "total": result.total,
        "train_seconds": result.train_seconds,
        "pairs_seen": result.pairs_seen,
        "steps": result.steps,
        "val_R1": float(result.best_metrics.get("R1", float("nan"))),
        "best_step": result.best_step,
    }


def run_demo(config: DemoConfig, progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole paradigm on the synthetic world and measure the paper's claims.

    Args:
        config: the options.
        progress: called as ``progress(done, total)`` in stages (world, scorer, scoring,
            selection, each training run with its evaluation, the report).
        log: receives one-line progress messages (stderr in the CLI).

    Returns:
        The :class:`DemoResult`; ``results.md``, ``results.json`` and the HTML reports are in
        ``config.out``.

    Raises:
        TbpsError: the output directory holds something other than a previous demo.
    """
    say = log or (lambda _msg: None)
    plan = plan_for(config.quick)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    out = prepare_out(config.out)
    demo = _Demo(config, plan, out, say)
    seeds = list(range(config.seed, config.seed + config.seeds))
    finetunes = [v for v in VARIANTS if v.stage == FINETUNE]
    total = 4 + 1 + len(seeds) * (len(SUBSETS) + len(finetunes)) + 1
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    measured: dict[str, list[dict[str, Any]]] = {}
    with _threads(config.threads):
        if progress:
            progress(0, total)
        with demo.timed("world"):
            world = demo.make_world()
        bank = demo.read_benchmark()
        step()

        with demo.timed("scorer"):
            scorer, scorer_result = demo.train("baseline", config.seed, model="tbps-tiny", epochs=plan.scorer_epochs)
            say(f"scorer (= baseline) val R@1 {scorer_result.best_metrics.get('R1', float('nan')):.2f} at step {scorer_result.best_step}")
        step()

        with demo.timed("score"):
            scores_dir = out / "scores"
            run_score(ScoreConfig(data=str(demo.pool), model=str(scorer), bank=str(bank), out=str(scores_dir), bank_size=plan.bank_size,
                                  seed=config.seed, batch_size=128, workers=config.workers, precision="fp32", device=config.device), log=say)
        step()

        with demo.timed("select"):
            keep_name = f"keep {config.keep:g}"
            keep = run_select(SelectConfig(scores=(str(scores_dir),), out=str(demo.manifests / "filtered.parquet"), keep=config.keep,
                                           truth=str(demo.truth)), log=say)
            rule = run_select(SelectConfig(scores=(str(scores_dir),), out=str(demo.manifests / "paper-pretrain.parquet"), rule="paper-pretrain",
                                           truth=str(demo.truth)), log=say)
            selections = {keep_name: keep.selection.truth, "paper-pretrain rule": rule.selection.truth}
            table = read_score_table(scores_dir).collect()
            _write_parquet(full_manifest(table), demo.manifests / "full.parquet")
            kept = keep.selection.rows_kept
            run_inspect(InspectConfig(table=keep.paths.manifest, html=out / REPORT_HTML, top=12))
            run_inspect(InspectConfig(table=scores_dir, html=out / SCORES_REPORT_HTML, top=12))
            say(f"filter: kept {kept:,} of {keep.selection.rows_in:,}; AUROC of bank_rank {keep.selection.truth['overall']['auroc_bank_rank']}")
        step()

        with demo.timed("evaluate"):
            measured["baseline"] = [_measurement(demo.evaluate("baseline", config.seed, str(scorer)), scorer_result)]
        step()

        for seed in seeds:
            random_path = demo.manifests / f"random-seed{seed}.parquet"
            _write_parquet(random_manifest(table, kept, seed), random_path)
            paths = {"full": demo.manifests / "full.parquet", "filtered": keep.paths.manifest, "random": random_path}
            inits: dict[str, Path] = {}
            for subset in SUBSETS:
                key = f"pretrain-{subset}"
                with demo.timed("pretrain"):
                    run, result = demo.train(key, seed, model="tbps-tiny", manifest=paths[subset], epochs=plan.pretrain_epochs)
                    inits[subset] = demo.export(run, key, seed)
                with demo.timed("evaluate"):
                    measured.setdefault(key, []).append(_measurement(demo.evaluate(key, seed, str(run)), result))
                step()
            for v in finetunes:
                with demo.timed("finetune"):
                    run, result = demo.train(v.key, seed, model=str(inits[v.init]), adapter=v.adapter, wora_norm=v.wora_norm,
                                             epochs=plan.finetune_epochs)
                with demo.timed("evaluate"):
                    measured.setdefault(v.key, []).append(_measurement(demo.evaluate(v.key, seed, str(run)), result))
                step()

        rows = aggregate(measured)
        keep_truth = dict(keep.selection.truth)
        keep_truth["paper_rule"] = rule.selection.truth
        claims = judge_claims(measured, keep_truth, judged=not config.quick)
        design = design_notes(plan, config)
        seconds = time.perf_counter() - started
        load = {"start_1min": load_start, "end_1min": os.getloadavg()[0]}
        files = {"markdown": str(out / RESULTS_MD), "json": str(out / RESULTS_JSON), "report": str(out / REPORT_HTML),
                 "scores_report": str(out / SCORES_REPORT_HTML)}
        result = DemoResult(out, config.quick, rows, claims, selections, design, seconds, load, files)
        write_text(out / RESULTS_MD, results_markdown(result, config))
        write_json(out / RESULTS_JSON, record(
            config, plan=asdict(plan), world=world, design=design, table=rows, measured=measured,
            claims=[asdict(c) for c in claims], selections=selections, timings=demo.timings, seconds=seconds, load=load,
            cpu_count=os.cpu_count(), torch_threads=config.threads or "torch default",
        ))
        step()
    return result
