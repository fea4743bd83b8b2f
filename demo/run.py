"""The demo's stages in one run directory: :func:`run_demo`.

Training runs are independent jobs (train, export a stage-A model, evaluate on test) with
dependencies between them (a fine-tune needs its stage-A model; the filtered subsets need the
scorer). :func:`_execute` runs them ``--jobs`` at a time in worker processes, one torch thread
each; every run is seeded and single-threaded, so its numbers do not depend on what ran beside it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch

from tbps import columns as C
from tbps.curate.inspect import InspectConfig, run_inspect
from tbps.curate.score import ScoreConfig, read_score_table, run_score
from tbps.curate.select import SelectConfig, keep_target
from tbps.curate.select_io import run_select
from tbps.data.readers import read_dataset
from tbps.data.splits import select_split
from tbps.data.synth import SynthConfig, synthesize
from tbps.demo import stats
from tbps.demo.claims import compare, judge_claims, judge_gate
from tbps.demo.plan import (
    ARM,
    ARMS,
    METHODS,
    PRETRAIN,
    SCORER_ARM,
    TRAIN_SCORER_ARM,
    DemoConfig,
    DemoPlan,
    MAX_EXTENSIONS,
    choose_lr,
    grid_extension,
    quick_tuning,
    design_notes,
    ok_rows,
    oracle_rows,
    plan_for,
    random_rows,
    read_tuning,
    steps_for,
)
from tbps.demo.report import render_report_html, results_markdown
from tbps.errors import TbpsError
from tbps.eval.evaluate import evaluate
from tbps.files import atomic_write, write_json, write_text
from tbps.models import load as load_model
from tbps.models.runs import export_run
from tbps.provenance import git_commit, record
from tbps.train.loop import TrainConfig, train

MARKER = ".tbps-demo"  # marks a directory this command made (and may therefore replace)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
SCORES_REPORT_HTML = "report-scores.html"
TUNING_JSON = "tuning.json"


def prepare_out(path: str | Path) -> Path:
    """Create the run directory, replacing a previous demo there and refusing anything else.

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


def _rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def _parquet(frame: pl.DataFrame, path: Path) -> Path:
    with atomic_write(path) as fh:
        frame.write_parquet(fh)
    return path


# ------------------------------------------------------------------------------------------
# Jobs: module-level functions of a plain dict, run in worker processes.


def _embedding_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of the token embedding (81% of tbps-tiny's 7.8M)."""
    emb = [p for n, p in model.named_parameters() if "token_embedding" in n]
    return sum(p.numel() for p in emb), sum(p.numel() for p in emb if p.requires_grad)


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run; export it (stage A) and evaluate it on the test split when asked.

    Args:
        spec: ``train`` (TrainConfig fields), ``export`` (checkpoint path or None), ``test``
            (``{"data": benchmark path, "out": eval JSON path, "device"}`` or None).

    Returns:
        The run's numbers: ``train_seconds``, ``pairs_seen``, ``steps``, ``trainable``, ``total``,
        ``embedding``, ``val_R1``, ``best_step``, ``export``, ``test`` (metrics) and ``eval`` (path).
    """
    if spec.get("skip"):
        return {"run": spec["train"]["out"], "skipped": spec["skip"]}
    torch.set_num_threads(1)
    result = train(TrainConfig(**spec["train"]))
    out: dict[str, Any] = {
        "run": spec["train"]["out"], "train_seconds": result.train_seconds, "pairs_seen": result.pairs_seen, "steps": result.steps,
        "trainable": result.trainable, "total": result.total, "val_R1": result.best_metrics.get("R1"), "best_step": result.best_step,
    }
    if spec.get("export"):
        out["export"] = str(export_run(spec["train"]["out"], spec["export"])[0])
    if spec.get("test"):
        test = spec["test"]
        loaded = load_model(spec["train"]["out"])
        out["embedding"], out["embedding_trainable"] = _embedding_parameters(loaded.model)
        rows = select_split(read_dataset(test["data"]), "test")[0]
        res = evaluate(loaded, rows, batch_size=128, workers=0, device=test["device"], precision="fp32", per_query=True)
        per_query = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.pop("per_query").items()}
        write_json(test["out"], {"model": loaded.identity, **res, "per_query": per_query})
        out["test"], out["eval"] = res["metrics"], test["out"]
    return out


def score_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Score the pool and the benchmark's train split with the scorer; write the filtered selections.

    Returns:
        ``filtered`` and ``rule`` (manifest paths and truth metrics), ``ftfilter`` (the train split's
        paper-finetune manifest), the pool's inspect pages.
    """
    torch.set_num_threads(1)
    out, scorer = Path(spec["out"]), spec["scorer"]
    common = {"model": scorer, "bank": spec["bank"], "seed": spec["seed"], "batch_size": 128, "workers": 0, "precision": "fp32",
              "device": spec["device"], "bank_size": spec["bank_size"]}
    run_score(ScoreConfig(data=spec["pool"], out=str(out / "scores"), **common))
    keep = run_select(SelectConfig(scores=(str(out / "scores"),), out=spec["filtered"], keep=spec["keep"], truth=spec["truth"]))
    rule = run_select(SelectConfig(scores=(str(out / "scores"),), out=spec["rule"], rule="paper-pretrain", truth=spec["truth"]))
    # The train split as a table of absolute paths: they resolve inside the benchmark's image folder. Its
    # scorer has never seen that split (the stage-A model), as the paper's zero-shot BLIP-2 had not: a
    # model fine-tuned on the split would rank every one of its own captions first.
    train_common = {**common, "model": spec["train_scorer"]}
    run_score(ScoreConfig(data=spec["bench_train"], image_root=spec["bench_images"], out=str(out / "scores-train"), **train_common))
    ftf = run_select(SelectConfig(scores=(str(out / "scores-train"),), out=spec["ftfilter"], rule="paper-finetune", dedup="none"))
    pages = {}
    for name, table in (("pool", out / "scores"), ("filtered", keep.paths.manifest), ("rule", rule.paths.manifest)):
        page = out / f"inspect-{name}.html"
        run_inspect(InspectConfig(table=str(table), html=str(page), top=12))
        pages[name] = page.name
    return {
        "filtered": {"rows": keep.selection.rows_kept, "truth": keep.selection.truth},
        "rule": {"rows": rule.selection.rows_kept, "truth": rule.selection.truth},
        "ftfilter": {"rows": ftf.selection.rows_kept, "of": ftf.selection.rows_in},
        "pages": pages,
    }


# ------------------------------------------------------------------------------------------
# A small dependency-ordered executor (one machine; scale-out is torchrun's job).


@dataclass
class Job:
    """A unit of work: ``fn(build(done))`` once every job named in ``deps`` is done."""

    name: str
    deps: tuple[str, ...]
    fn: Callable[[dict[str, Any]], dict[str, Any]]
    build: Callable[[dict[str, Any]], dict[str, Any]]


def _execute(jobs: list[Job], workers: int, done: dict[str, Any],
             on_done: Callable[[str, dict[str, Any]], list[Job] | None]) -> None:
    """Run ``jobs`` in list order as their dependencies allow, ``workers`` at a time.

    ``on_done(name, result)`` may return new jobs (a grid that grows): each is queued in front of
    the jobs not yet started, and one named like a job not yet started replaces it (a barrier whose
    dependencies grew).

    Raises:
        TbpsError: a job's dependency is never run (a mistake in the plan); a job's own error propagates.
    """
    pending: list[Job] = []
    known = set(done)

    def add(new: list[Job], front: bool) -> None:
        names = {j.name for j in new}
        kept = [j for j in pending if j.name not in names]
        pending[:] = (new + kept) if front else (kept + new)
        known.update(names)
        for job in new:
            missing = [d for d in job.deps if d not in known]
            if missing:
                raise TbpsError(f"demo job {job.name} depends on unknown jobs {missing}")

    add(list(jobs), front=False)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running: dict[Any, str] = {}
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if all(d in done for d in job.deps):
                    running[pool.submit(job.fn, job.build(done))] = job.name
                    pending.remove(job)
            if not running:
                raise TbpsError(f"demo jobs wait on each other: {', '.join(j.name for j in pending)}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                done[name] = future.result()
                add(on_done(name, done[name]) or [], front=True)


# ------------------------------------------------------------------------------------------
# The demo.


class _Demo:
    """Paths, options and job builders of one demo run."""

    def __init__(self, config: DemoConfig, plan: DemoPlan, out: Path, say: Callable[[str], None]) -> None:
        self.config, self.plan, self.out, self.say = config, plan, out, say
        self.world = out / "world"
        self.bench = self.world / "benchmark" / "reid_raw.json"
        self.pool = self.world / "pool" / "pool.json"
        self.truth = self.world / "pool" / "truth.parquet"
        self.manifests = out / "manifests"
        self.seeds = list(range(config.seed, config.seed + config.seeds))
        self.train_rows = 0
        self.subset_rows = 0
        self.lr: dict[str, float] = {}

    def prepare_data(self) -> dict[str, Any]:
        """The world, the bank (train split captions), the train split as a table, the scorer-free subsets."""
        world = synthesize(SynthConfig(out=self.world, seed=self.config.seed, workers=2, **self.plan.world))
        pairs = read_dataset(self.bench)
        train_split = pairs.filter((pl.col(C.SPLIT) == "train") & (pl.col(C.STATUS) == C.STATUS_OK))
        self.train_rows = train_split.height
        # One caption a line: a caption's own line breaks would split it.
        write_text(self.out / "bank.txt", "".join(" ".join(c.split()) + "\n" for c in train_split.get_column(C.CAPTION).to_list()))
        _parquet(train_split, self.manifests / "benchmark-train.parquet")
        pool = read_dataset(self.pool)
        truth = pl.read_parquet(self.truth)
        self.clean_share = round(1.0 - self.plan.world["defect_rate"], 6)
        self.subset_rows = keep_target(self.clean_share, pool.height)
        _parquet(ok_rows(pool), self.manifests / "full.parquet")
        for seed in self.seeds:
            _parquet(random_rows(pool, self.subset_rows, seed), self.manifests / f"random-seed{seed}.parquet")
            _parquet(oracle_rows(pool, truth, self.subset_rows, seed), self.manifests / f"oracle-seed{seed}.parquet")
        self.say(f"world: {world.splits}, pool {world.pool_pairs:,} pairs; subsets of {self.subset_rows:,} pairs (the clean share {self.clean_share:g})")
        return {"splits": world.splits, "pool_pairs": world.pool_pairs, "defects": world.defects, "train_pairs": self.train_rows}

    def manifest(self, data: str, seed: int) -> Path:
        names = {"full": "full.parquet", "filtered": "filtered.parquet", "rule": "paper-pretrain.parquet",
                 "random": f"random-seed{seed}.parquet", "oracle": f"oracle-seed{seed}.parquet",
                 "benchmark-filtered": "paper-finetune.parquet"}
        return self.manifests / names[data]

    def train_spec(self, name: str, seed: int, *, method: str | None, data: str, init: str | None, lr: float, epochs: int | None,
                   steps: int | None, rows: int, export: bool, test: bool) -> dict[str, Any]:
        """The job spec of one training run (validated on the benchmark's val split)."""
        run = self.out / "runs" / name
        skip = None
        if rows < self.plan.batch_size:
            skip = f"{rows} pairs, fewer than one batch of {self.plan.batch_size}"
        elif init is not None and init.startswith("skipped:"):
            skip = f"its stage-A model was not trained ({init[len('skipped:'):]})"
        total = steps or steps_for(rows, self.plan.batch_size, epochs)
        opts = METHODS[method].train_options(self.plan.rank) if method else {"adapter": "full"}
        manifest = None if data == "benchmark" else str(self.manifest(data, seed))
        train_cfg = {
            "out": str(run), "model": init or "tbps-tiny", "manifest": manifest, "data": None if manifest else str(self.bench),
            "val": str(self.bench), "rank": self.plan.rank, "epochs": None if steps else epochs, "steps": steps,
            "batch_size": self.plan.batch_size, "lr": lr, "warmup": max(1, round(self.plan.warmup * total)), "precision": "fp32",
            "seed": seed, "val_every": -(-total // self.plan.validations), "save_every": total, "log_every": max(1, total // 8),
            "workers": self.config.workers, "device": self.config.device, **opts,
        }
        return {
            "train": train_cfg,
            "skip": skip,
            "export": str(self.out / "models" / f"{name}.pt") if export else None,
            "test": {"data": str(self.bench), "out": str(self.out / "eval" / f"{name}.json"), "device": self.config.device} if test else None,
        }

    def arm_job(self, key: str, seed: int) -> Job:
        """The job of one arm and seed, with its dependencies."""
        arm, name = ARM[key], f"seed{seed}/{key}"
        deps: list[str] = []
        if arm.stage == PRETRAIN:
            if arm.data in ("filtered", "rule"):
                deps.append("score")
        else:
            if arm.init:
                deps.append(f"seed{seed}/{arm.init}")
            if arm.data == "benchmark-filtered":
                deps.append("score")
            if self.config.tune:
                deps.append(_Tuning.BARRIER)

        def build(done: dict[str, Any]) -> dict[str, Any]:
            rows = self.train_rows if arm.data == "benchmark" else _rows(self.manifest(arm.data, seed))
            if arm.stage == PRETRAIN:
                # Equal steps: the filtered subset's size is planned (keep = the clean share of the pool's rows).
                steps = steps_for(self.subset_rows, self.plan.batch_size, self.plan.pretrain_epochs) if arm.steps_of else None
                return self.train_spec(name, seed, method=None, data=arm.data, init=None, lr=self.plan.pretrain_lr,
                                       epochs=self.plan.pretrain_epochs, steps=steps, rows=rows, export=True, test=True)
            stage_a = done[f"seed{seed}/{arm.init}"] if arm.init else None
            init = None if stage_a is None else stage_a.get("export") or f"skipped:{stage_a.get('skipped')}"
            return self.train_spec(name, seed, method=arm.method, data=arm.data, init=init, lr=self.lr[arm.method],
                                   epochs=self.plan.finetune_epochs, steps=None, rows=rows, export=False, test=True)

        return Job(name, tuple(dict.fromkeys(deps)), train_job, build)

    def score_job(self) -> Job:
        scorer, train_scorer = f"seed{self.config.seed}/{SCORER_ARM}", f"seed{self.config.seed}/{TRAIN_SCORER_ARM}"

        def build(done: dict[str, Any]) -> dict[str, Any]:
            return {"out": str(self.out), "scorer": done[scorer]["run"], "train_scorer": done[train_scorer]["export"],
                    "bank": str(self.out / "bank.txt"), "seed": self.config.seed,
                    "device": self.config.device, "bank_size": self.plan.bank_size, "pool": str(self.pool), "truth": str(self.truth),
                    "keep": self.clean_share, "filtered": str(self.manifest("filtered", 0)), "rule": str(self.manifest("rule", 0)),
                    "bench_train": str(self.manifests / "benchmark-train.parquet"), "bench_images": str(self.bench.parent / "imgs"),
                    "ftfilter": str(self.manifest("benchmark-filtered", 0))}

        return Job("score", (scorer, train_scorer), score_job, build)

    def tuning_job(self, method: str, lr: float) -> Job:
        """One method at one learning rate, validated only (the test split is never touched)."""
        seed, name = self.config.seed, f"tune/{method}/{lr:g}"
        init = None if method == "alone" else f"seed{seed}/A-full"

        def build(done: dict[str, Any]) -> dict[str, Any]:
            return self.train_spec(name, seed, method=method, data="benchmark", init=done[init]["export"] if init else None,
                                   lr=lr, epochs=self.plan.finetune_epochs, steps=None, rows=self.train_rows, export=False, test=False)

        return Job(name, (init,) if init else (), train_job, build)


class _Tuning:
    """The learning-rate search: every method's grid, grown past an edge choice (``grid_extension``)."""

    BARRIER = "tuned"

    def __init__(self, demo: _Demo) -> None:
        self.demo = demo
        self.val: dict[str, dict[float, float]] = {m: {} for m in METHODS}
        self.waiting: dict[str, set[float]] = {m.name: set(m.grid) for m in METHODS.values()}
        self.added: dict[str, list[float]] = {m: [] for m in METHODS}

    def jobs(self) -> list[Job]:
        """The first grid of every method, and the barrier that stage B waits on."""
        grid = [self.demo.tuning_job(m.name, lr) for m in METHODS.values() for lr in m.grid]
        return grid + [self._barrier()]

    def _barrier(self) -> Job:
        names = tuple(f"tune/{m}/{lr:g}" for m in METHODS for lr in sorted(set(self.val[m]) | self.waiting[m]))
        return Job(self.BARRIER, names, _no_op, lambda done: {})

    def finished(self, name: str, result: dict[str, Any]) -> list[Job]:
        """Take one tuning run's val R@1; a method's grid grows when its best rate lies at an edge."""
        _, method, lr_text = name.split("/")
        lr = float(lr_text)
        self.waiting[method].discard(lr)
        self.val[method][lr] = float(result["val_R1"])
        if self.waiting[method]:
            return []
        extra = grid_extension(self.val[method], len(self.added[method]))
        if extra is None:
            return []
        self.added[method].append(extra)
        self.waiting[method].add(extra)
        return [self.demo.tuning_job(method, extra), self._barrier()]

    def record(self) -> dict[str, Any]:
        """The tuning record: every rate tried, its val R@1, the choice, and the grids' growth."""
        chosen = choose_lr(self.val)
        at_edge = [m for m, scores in self.val.items() if chosen[m] in (min(scores), max(scores))]
        return {
            "grid": {m: sorted(scores) for m, scores in self.val.items()},
            "first_grid": {m.name: list(m.grid) for m in METHODS.values()},
            "extended": {m: added for m, added in self.added.items() if added},
            "at_edge": at_edge,
            "val_R1": {m: {f"{lr:g}": v for lr, v in sorted(scores.items())} for m, scores in self.val.items()},
            "chosen": chosen,
            "note": "each method's learning rate with the best val R@1 of a stage-B run (alone: from scratch; the others from the first "
                    "seed's 'pool 100%' stage-A model), chosen once; a grid grows by one step past an edge while its best rate lies at "
                    f"that edge (at most {MAX_EXTENSIONS} steps); the test split was not used",
        }


def _summaries(demo: _Demo, done: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The table rows (intervals), the comparisons and the gate, from every arm's per-query test outcomes."""
    values: dict[str, list[dict[str, np.ndarray]]] = {}
    for arm in ARMS:
        runs = [done.get(f"seed{s}/{arm.key}") for s in demo.seeds]
        if all(r and not r.get("skipped") for r in runs):
            values[arm.key] = [stats.query_values(json.loads(Path(r["eval"]).read_text())["per_query"]) for r in runs]
    if not values:
        raise TbpsError("no arm was evaluated")
    groups = next(iter(values.values()))[0]["person_id"]
    rows = []
    for arm in ARMS:
        if arm.key not in values:
            continue
        runs = [done[f"seed{s}/{arm.key}"] for s in demo.seeds]
        first = runs[0]
        lr = demo.plan.pretrain_lr if arm.stage == PRETRAIN else demo.lr.get(arm.method)
        rows.append({
            "key": arm.key, "label": arm.label, "stage": arm.stage, "adapter": METHODS[arm.method].adapter if arm.stage != PRETRAIN else "full",
            "method": arm.method if arm.stage != PRETRAIN else "pretrain", "seeds": len(runs), "lr": lr,
            "metrics": {m: stats.bootstrap_mean([v[m] for v in values[arm.key]], groups) for m in stats.METRIC_KEYS},
            "trainable": first["trainable"], "total": first["total"], "non_embedding_total": first["total"] - first.get("embedding", 0),
            "trainable_non_embedding": first["trainable"] - first.get("embedding_trainable", 0),
            "train_seconds": _mean_std([r["train_seconds"] for r in runs]), "pairs_seen": first["pairs_seen"], "steps": first["steps"],
            "val_R1": _mean_std([r["val_R1"] for r in runs if r["val_R1"] is not None]),
        })

    def paired(a: str, b: str, metric: str) -> dict[str, Any] | None:
        if a not in values or b not in values:
            return None
        return stats.paired_difference([v[metric] for v in values[a]], [v[metric] for v in values[b]], groups)

    comparisons = compare(paired, stats.verdict)
    gate = judge_gate({k: [done[f"seed{s}/{k}"]["val_R1"] for s in demo.seeds] for k in ("oracle", "alone") if k in values}, seeds=demo.seeds)
    return rows, comparisons, gate


def _mean_std(xs: list[float]) -> dict[str, float | None]:
    arr = np.asarray(xs, dtype=np.float64)
    if not len(arr):
        return {"mean": None, "std": None}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None}


def _filter_record(score: dict[str, Any]) -> dict[str, Any]:
    selections = {}
    for name, label in (("filtered", f"score filter (keep the clean share)"), ("rule", "paper-pretrain rule")):
        truth = score[name]["truth"]
        o, rel = truth["overall"], truth.get("relevance", {})
        selections[label] = {
            "kept": score[name]["rows"], "rows": o["pairs"], "precision": o["precision"], "recall": o["recall"],
            "auroc_score": o["auroc_score"], "auroc_bank_rank": o["auroc_bank_rank"],
            "auroc_relevance_score": rel.get("auroc_score"), "auroc_relevance_bank_rank": rel.get("auroc_bank_rank"),
            "per_kind": {k: {key: v.get(key) for key in ("pairs", "removed", "recall", "auroc_score", "auroc_bank_rank")} for k, v in truth["kinds"].items()},
        }
    return {"selections": selections, "duplicate_kinds": [C.DEFECT_EXACT_DUP, C.DEFECT_NEAR_DUP]}


def run_demo(config: DemoConfig, progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the experiment (see :mod:`tbps.demo.plan`) and write its record and reports.

    Args:
        config: the options.
        progress: called as ``progress(done, total)`` as jobs finish.
        log: receives one-line progress messages (stderr in the CLI).

    Returns:
        The results record (also ``results.json``); ``results.md`` and ``report.html`` beside it.

    Raises:
        TbpsError: the output directory holds something other than a previous demo, or the
            recorded tuning is missing (run ``--tune``).
    """
    say = log or (lambda _msg: None)
    plan = plan_for(config.quick)
    tuning = None if config.tune else read_tuning() if not config.quick else quick_tuning()
    started, load_start, commit = time.perf_counter(), os.getloadavg()[0], git_commit()  # the code that runs, not the tree at the end
    out = prepare_out(config.out)
    demo = _Demo(config, plan, out, say)
    world = demo.prepare_data()
    if tuning:
        demo.lr = dict(tuning["chosen"])

    # List order is priority: the scorer's path first (A-full -> full -> score), then the first seed, then the others.
    order = ("A-full", "alone", "full", "A-oracle", "A-random", "A-full-steps", "A-filtered", "A-rule", "oracle", "random", "full-steps",
             "filtered", "rule", "filtered-ftfilter", "filtered-wora", "filtered-wora-fixed", "filtered-dora", "filtered-lora", "filtered-wora-plus")
    jobs: list[Job] = [demo.arm_job("A-full", config.seed), demo.score_job()]
    tuner = _Tuning(demo) if config.tune else None
    if tuner:
        jobs += tuner.jobs()
    for seed in demo.seeds:
        jobs += [demo.arm_job(k, seed) for k in order if not (seed == config.seed and k == "A-full")]
    done: dict[str, Any] = {}
    finished = [0]

    def on_done(name: str, res: dict[str, Any]) -> list[Job]:
        finished[0] += 1
        more: list[Job] = []
        if tuner and name.startswith("tune/"):
            more = tuner.finished(name, res)
            total[0] += len([j for j in more if j.name != _Tuning.BARRIER])
        if name == _Tuning.BARRIER:
            record_ = tuner.record()
            demo.lr = dict(record_["chosen"])
            done[name] = record_
            write_json(out / TUNING_JSON, record_)
            say(f"tuning: chosen {record_['chosen']}" + (f"; still at a grid edge: {', '.join(record_['at_edge'])}" if record_["at_edge"] else ""))
        elif name == "score":
            say(f"scored: filtered {res['filtered']['rows']:,}, rule {res['rule']['rows']:,}, paper-finetune {res['ftfilter']['rows']:,} of {res['ftfilter']['of']:,}")
        elif res.get("skipped"):
            say(f"{name}: not trained ({res['skipped']})")
        else:
            test = res.get("test") or {}
            say(f"{name}: val R@1 {res['val_R1'] if res['val_R1'] is None else round(res['val_R1'], 2)}, test R@1 "
                f"{test.get('R1', float('nan')):.2f}, {res['steps']} steps in {res['train_seconds']:.0f} s")
        if progress:
            progress(finished[0], total[0])
        return more

    total = [len(jobs)]
    _execute(jobs, config.jobs, done, on_done)
    tuning = done.get(_Tuning.BARRIER) or tuning
    rows, comparisons, gate = _summaries(demo, done)
    by_key = {r["key"]: r for r in rows}
    times = {k: r["train_seconds"]["mean"] for k, r in by_key.items()}
    shares = {k: 100.0 * r["trainable_non_embedding"] / r["non_embedding_total"] for k, r in by_key.items() if r["non_embedding_total"]}
    filt = _filter_record(done["score"])
    steps = {k: float(r["steps"]) for k, r in by_key.items()}
    claims = judge_claims(comparisons, times, shares, done["score"]["filtered"]["truth"], gate, steps=steps, judged=not config.quick)
    seconds = time.perf_counter() - started
    results = {
        "quick": config.quick, "seconds": seconds, "load": {"start_1min": load_start, "end_1min": os.getloadavg()[0]},
        "command": "tbps demo" + (" --quick" if config.quick else "") + (f" --seeds {config.seeds}" if config.seeds > 1 else "")
                   + (" --tune" if config.tune else "") + f" --out {config.out}",
        "design": design_notes(plan, config, tuning), "world": world, "plan": asdict(plan), "gate": gate, "tuning": tuning,
        "table": rows, "comparisons": comparisons, "claims": claims, "filter": filt,
        "runs": [{"key": name.split("/", 1)[1], "seed": int(name.split("/")[0][4:]), "dir": str(Path(res["run"]).relative_to(out))}
                 for name, res in done.items() if name.startswith("seed") and not res.get("skipped")],
        "links": {"pool": done["score"]["pages"]["pool"], "selections": {k: v for k, v in done["score"]["pages"].items() if k != "pool"}},
        "subset_rows": demo.subset_rows, "cpu_count": os.cpu_count(), "jobs": config.jobs, "git_commit_at_start": commit,
    }
    write_json(out / RESULTS_JSON, record(config, **results))
    write_text(out / RESULTS_MD, results_markdown(results))
    write_text(out / REPORT_HTML, render_report_html(results, out))
    return results


def _no_op(spec: dict[str, Any]) -> dict[str, Any]:
    """The barrier job after the tuning grid (its record is made in the main process)."""
    return {}
