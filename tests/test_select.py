"""``tbps select``: each rule on small tables, dedup, budgets, accounting, determinism, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tbps import columns as C
from tbps.curate.select import STEPS, SelectConfig, best_first, keep_target, scaled_rule, select
from tbps.curate.select_io import run_select
from tbps.data.readers import read_dataset
from tbps.errors import TbpsError, UsageError
from tbps.files import HASH_ALGO, file_hash
from tbps.terminal import select_summary


def table(n: int = 0, **cols) -> pl.DataFrame:
    """A score table: ``n`` unique ok rows with descending scores unless columns are given."""
    n = n or len(next(iter(cols.values())))
    base = {
        C.PAIR_ID: [f"{i}:0" for i in range(n)],
        C.IMAGE_PATH: [f"/img/{i}.jpg" for i in range(n)],
        C.CAPTION: [f"caption number {i}" for i in range(n)],
        C.PERSON_ID: [str(i) for i in range(n)],
        C.SPLIT: [None] * n,
        C.SOURCE: ["pool"] * n,
        C.IMAGE_HASH: [f"{i:032x}" for i in range(n)],
        C.SCORE: [1.0 - i / (n + 1) for i in range(n)],
        C.BANK_RANK: list(range(n)),
        C.BANK_PERCENTILE: [float(i) for i in range(n)],
        C.TRUNCATED: [False] * n,
        C.STATUS: [C.STATUS_OK] * n,
        C.ERROR: [None] * n,
    }
    base.update(cols)
    return pl.DataFrame(base, schema=C.polars_schema(C.SCORE_SCHEMA))


def run(frame: pl.DataFrame, **options):
    """The core selection; returns ``{pair_id: reason or None}`` and the selection."""
    emb = options.pop("_emb", None)
    sel = select(frame.lazy(), SelectConfig(**options), embeddings=emb)
    return dict(sel.outcome.select(C.PAIR_ID, C.REASON).iter_rows()), sel


def kept(frame: pl.DataFrame, **options) -> list[str]:
    reasons, _ = run(frame, **options)
    return [p for p, r in reasons.items() if r is None]


# --- each step on small tables -----------------------------------------------------------


def test_status_rows_are_always_dropped_with_their_reason():
    f = table(**{C.STATUS: ["ok", "bad-image", "ok", "ok", None], C.SCORE: [0.5, 0.9, None, float("nan"), 0.4]})
    reasons, sel = run(f, dedup="none")
    assert reasons == {"0:0": None, "1:0": "status", "2:0": "no-score", "3:0": "no-score", "4:0": "status"}
    assert [s.step for s in sel.steps] == ["status"]


def test_min_score_keeps_the_boundary():
    f = table(**{C.SCORE: [0.3, 0.2, 0.1999, 0.5]})
    assert kept(f, min_score=0.2, dedup="none") == ["0:0", "1:0", "3:0"]


@pytest.mark.parametrize(
    ("options", "bank_size", "cut", "warns"),
    [
        ({"max_bank_rank": 2}, None, 2, False),
        ({"rule": "paper-pretrain"}, 10_000, 48, False),
        ({"rule": "paper-finetune"}, 10_000, 1799, False),
        ({"rule": "paper-pretrain"}, 1_000, 4, True),  # round(49 * 1001 / 10001) - 1
        ({"rule": "paper-finetune"}, 1_000, 179, True),  # round(1800 * 1001 / 10001) - 1
        ({"rule": "paper-pretrain"}, None, 48, True),  # unknown bank: assumed 10,000, said so
    ],
)
def test_bank_rank_cuts_and_paper_rules(options, bank_size, cut, warns):
    ranks = [0, cut, cut + 1, 9_999]
    f = table(**{C.BANK_RANK: ranks})
    sel = select(f.lazy(), SelectConfig(dedup="none", **options), bank_size=bank_size)
    reasons = dict(sel.outcome.select(C.PAIR_ID, C.REASON).iter_rows())
    assert reasons == {"0:0": None, "1:0": None, "2:0": "bank-rank", "3:0": "bank-rank"}
    assert sel.resolved["bank_rank"]["max_bank_rank"] == cut
    assert bool(sel.warnings) is warns


def test_scaled_rule_is_the_paper_rule_at_10k():
    assert scaled_rule("paper-pretrain", 10_000) == 48 and scaled_rule("paper-finetune", 10_000) == 1799
    assert scaled_rule("paper-pretrain", 10) == 0


def test_exact_image_dedup_keeps_the_best_and_breaks_ties_by_bank_rank_then_pair_id():
    f = table(
        **{
            C.PAIR_ID: ["a", "b", "c", "d", "e"],
            C.IMAGE_HASH: ["h1", "h1", "h1", "h2", "h2"],
            C.SCORE: [0.5, 0.7, 0.7, 0.6, 0.6],
            C.BANK_RANK: [0, 3, 2, 5, 5],
        }
    )
    reasons, sel = run(f, dedup="image")
    # h1: b and c tie on score; c has the lower bank_rank. h2: d and e tie on both; d < e.
    assert reasons == {"a": "duplicate-of:c", "b": "duplicate-of:c", "c": None, "d": None, "e": "duplicate-of:d"}
    assert set(sel.outcome.filter(pl.col(C.STEP).is_not_null())[C.STEP]) == {"exact-image"}


def test_exact_caption_dedup_normalises_and_null_hashes_never_match():
    f = table(
        **{
            C.CAPTION: ["A man, in RED.", "a man in red", "a  man in red!", "a man in blue", "x", "y"],
            C.IMAGE_HASH: ["1", "2", "3", "4", None, None],
        }
    )
    reasons, _ = run(f, dedup="image,caption")
    assert reasons == {"0:0": None, "1:0": "duplicate-of:0:0", "2:0": "duplicate-of:0:0", "3:0": None, "4:0": None, "5:0": None}


@pytest.mark.parametrize(
    ("dedup", "want"),
    [
        ("image", ["0:0", "2:0"]),  # 1 shares 0's image
        ("caption", ["0:0", "1:0"]),  # 2 shares 0's caption
        ("pair", ["0:0", "1:0", "2:0"]),  # only 3 shares both
        ("none", ["0:0", "1:0", "2:0", "3:0"]),
    ],
)
def test_dedup_modes(dedup, want):
    f = table(**{C.IMAGE_HASH: ["h", "h", "g", "h"], C.CAPTION: ["c", "d", "c", "c"]})
    assert kept(f, dedup=dedup) == want


def test_steps_run_in_the_documented_order():
    # 0 is the best of h but fails --min-score, so 1 keeps image h (filters run before dedup).
    f = table(**{C.IMAGE_HASH: ["h", "h", "g"], C.SCORE: [0.9, 0.5, 0.4], C.BANK_RANK: [0, 1, 2]})
    reasons, sel = run(f, min_score=0.0, max_bank_rank=0, dedup="image")
    assert reasons == {"0:0": None, "1:0": "bank-rank", "2:0": "bank-rank"}
    reasons, sel = run(f, max_bank_rank=1, dedup="image", keep=0.34)
    assert reasons == {"0:0": None, "1:0": "duplicate-of:0:0", "2:0": "bank-rank"}
    assert [s.step for s in sel.steps] == ["status", "bank-rank", "exact-image", "budget"]


def _emb(ids, img, txt) -> pl.LazyFrame:
    d = img.shape[1]
    t = pa.table(
        {
            C.PAIR_ID: ids,
            C.IMAGE_EMB: pa.FixedSizeListArray.from_arrays(pa.array(img.astype(np.float16).ravel()), d),
            C.TEXT_EMB: pa.FixedSizeListArray.from_arrays(pa.array(txt.astype(np.float16).ravel()), d),
        },
        schema=C.embedding_schema(d),
    )
    return pl.from_arrow(t).lazy()


def test_near_dedup_is_greedy_over_images_and_captions():
    # Images 0, 1, 2 at 0, 15 and 30 degrees: 0 ~ 1 and 1 ~ 2 (cos 0.966) but not 0 ~ 2 (0.866).
    # Captions: 3 ~ 4 (cos 0.995). Everything else is orthogonal.
    e = np.eye(8, dtype=np.float32)
    a = np.radians([0, 15, 30])
    img = np.stack([*(np.cos(t) * e[0] + np.sin(t) * e[1] for t in a), e[3], e[4]])
    txt = np.stack([e[5], e[6], e[7], e[2], 0.995 * e[2] + 0.0999 * e[1]])
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    f = table(5)
    emb = _emb(f[C.PAIR_ID].to_list(), img, txt)
    assert float(img[0] @ img[2]) < 0.95
    reasons, sel = run(f, dedup_threshold=0.95, _emb=emb)
    assert reasons == {"0:0": None, "1:0": "duplicate-of:0:0", "2:0": None, "3:0": None, "4:0": "duplicate-of:3:0"}
    near = sel.resolved["dedup"]["near"]
    assert near[C.IMAGE_EMB]["pairs"] == 2 and near[C.TEXT_EMB]["pairs"] == 1
    # pair mode: both embeddings must be close, and no pair here is.
    assert kept(f, dedup="pair", dedup_threshold=0.95, _emb=emb) == f[C.PAIR_ID].to_list()


def test_near_dedup_without_embeddings_is_an_error():
    f = table(3)
    with pytest.raises(TbpsError, match="needs the embeddings"):
        select(f.lazy(), SelectConfig(dedup_threshold=0.9))
    emb = _emb(["0:0", "1:0"], np.eye(2), np.eye(2))
    with pytest.raises(TbpsError, match="1 rows to de-duplicate have no embeddings"):
        select(f.lazy(), SelectConfig(dedup_threshold=0.9), embeddings=emb)


def test_per_person_cap_skips_rows_without_a_person():
    f = table(**{C.PERSON_ID: ["p", "p", "p", "q", None, None]})
    reasons, _ = run(f, max_per_person=2, dedup="none")
    assert [r for r in reasons.values()] == [None, None, "per-person", None, None, None]


def test_quota_per_source_and_a_warning_for_unknown_sources():
    f = table(**{C.SOURCE: ["a", "b", "a", "a", "b"]})
    reasons, sel = run(f, quota=("a=1", "zz=3"), dedup="none")
    assert list(reasons.values()) == [None, None, "quota", "quota", None]
    assert any("zz" in w for w in sel.warnings)


def test_keep_is_a_fraction_of_all_input_rows():
    # 10 rows in, 2 fail status: --keep 0.5 keeps 5 (of 10), not 4 (of the 8 left).
    f = table(**{C.STATUS: ["ok"] * 8 + ["bad-image"] * 2, C.SCORE: [0.9 - i / 20 for i in range(10)]})
    reasons, sel = run(f, keep=0.5, dedup="none")
    assert [p for p, r in reasons.items() if r is None] == ["0:0", "1:0", "2:0", "3:0", "4:0"]
    b = sel.resolved["budget"]
    assert (b["of"], b["rows_in"], b["target_rows"]) == ("input rows", 10, 5)
    assert b["score_cutoff"] == pytest.approx(0.7) and b["first_dropped_score"] == pytest.approx(0.65)
    # Fewer rows left than the target: all kept, with a warning.
    reasons, sel = run(f, keep=0.9, dedup="none")
    assert sum(r is None for r in reasons.values()) == 8 and "only 8 rows" in sel.warnings[0]


def test_keep_target_uses_the_decimal_value():
    assert keep_target(0.29, 100) == 29 and keep_target(0.4, 10_000_000) == 4_000_000 and keep_target(1.0, 7) == 7


@pytest.mark.parametrize(("by", "want"), [("score", ["1:0", "0:0"]), ("bank_rank", ["2:0", "0:0"])])
def test_budget_by_score_or_bank_rank(by, want):
    f = table(**{C.SCORE: [0.5, 0.9, 0.1], C.BANK_RANK: [1, 5, 0]})
    assert kept(f, budget=2, by=by, dedup="none") == sorted(want)


def test_best_first_is_a_total_order_with_pair_id_last():
    rng = np.random.default_rng(0)
    n = 300
    score = rng.choice([0.1, 0.2, -0.0, 0.0, -0.3], n).astype(np.float32)
    rank = rng.integers(0, 3, n).astype(np.int32)
    pid = pl.Series([f"id{v}" for v in rng.permutation(n)])
    got = best_first(score, rank, pid, np.arange(n), "score")
    want = sorted(range(n), key=lambda r: (-float(score[r]), int(rank[r]), pid[r]))
    assert got.tolist() == want
    got = best_first(score, rank, pid, np.arange(n), "bank_rank")
    assert got.tolist() == sorted(range(n), key=lambda r: (int(rank[r]), -float(score[r]), pid[r]))


def test_every_row_is_accounted_for():
    rng = np.random.default_rng(1)
    n = 400
    f = table(
        **{
            C.STATUS: rng.choice(["ok"] * 9 + ["bad-image"], n).tolist(),
            C.SCORE: rng.normal(0.3, 0.1, n).tolist(),
            C.BANK_RANK: rng.integers(0, 3000, n).tolist(),
            C.IMAGE_HASH: [f"{v}" for v in rng.integers(0, 300, n)],
            C.CAPTION: [f"c{v}" for v in rng.integers(0, 300, n)],
            C.PERSON_ID: [f"p{v}" for v in rng.integers(0, 40, n)],
            C.SOURCE: rng.choice(["a", "b"], n).tolist(),
        }
    )
    _, sel = run(f, min_score=0.1, rule="paper-finetune", max_per_person=3, quota=("a=40",), keep=0.2)
    out = sel.outcome
    kept_n = out.filter(pl.col(C.STEP).is_null()).height
    assert out.height == n and out[C.PAIR_ID].to_list() == f[C.PAIR_ID].to_list()  # input order
    assert kept_n + sel.dropped().height == n == sel.steps[0].rows_in
    assert kept_n == sel.rows_kept == sel.manifest.collect().height
    assert sel.dropped()[C.REASON].null_count() == 0
    assert all(s.rows_out == t.rows_in for s, t in zip(sel.steps, sel.steps[1:]))
    # A duplicate names a row that is better than it.
    dups = out.filter(pl.col(C.REASON).str.starts_with("duplicate-of:"))
    best = dict(out.select(C.PAIR_ID, C.SCORE).iter_rows())
    assert dups.height and all(best[r.split(":", 1)[1]] >= s for r, s in dups.select(C.REASON, C.SCORE).iter_rows())


# --- files: inputs, outputs, determinism, bad input ---------------------------------------


def write(frame: pl.DataFrame, path: Path, bank_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tbps.bank_size": str(bank_size)} if bank_size else None
    frame.write_parquet(path, metadata=meta)
    return path


def score_run(tmp_path: Path, frame: pl.DataFrame, bank_size: int = 1000, dim: int = 8) -> Path:
    """A `tbps score` output directory: score.json, scores/ and embeddings/."""
    d = tmp_path / "scored"
    write(frame, d / "scores" / "part-000000.parquet", bank_size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((frame.height, dim)).astype(np.float32)
    x[1] = x[0]  # row 1's image is a near copy of row 0's
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ok = frame.filter(pl.col(C.STATUS) == C.STATUS_OK)[C.PAIR_ID].to_list()
    idx = [frame[C.PAIR_ID].to_list().index(p) for p in ok]
    (d / "embeddings").mkdir()
    t = rng.standard_normal((len(idx), dim)).astype(np.float32)
    _emb(ok, x[idx], t / np.linalg.norm(t, axis=1, keepdims=True)).collect().write_parquet(d / "embeddings" / "part-000000.parquet")
    (d / "score.json").write_text(json.dumps({"config": {"bank_size": bank_size}}))
    return d


def test_score_run_directory_with_rule_scaling_and_near_dedup(tmp_path):
    d = score_run(tmp_path, table(6, **{C.BANK_RANK: [0, 1, 4, 5, 2, 3]}))
    (d / "scores" / ".part-000001.parquet.99999.x.tbps-tmp").write_bytes(b"a killed run's temporary")  # skipped
    r = run_select(SelectConfig(scores=(str(d),), out=str(tmp_path / "m.parquet"), rule="paper-pretrain", dedup_threshold=0.99))
    reasons = dict(r.selection.outcome.select(C.PAIR_ID, C.REASON).iter_rows())
    assert reasons == {"0:0": None, "1:0": "duplicate-of:0:0", "2:0": None, "3:0": "bank-rank", "4:0": None, "5:0": None}
    cut = r.selection.resolved["bank_rank"]
    assert (cut["max_bank_rank"], cut["bank_size"], cut["paper_max_bank_rank"]) == (4, 1000, 48)
    assert "scaled to bank_rank <= 4" in " ".join(r.selection.warnings)
    rec = json.loads((tmp_path / "m.json").read_text())
    assert rec["inputs"][0]["kind"] == "score-run" and rec["inputs"][0]["embedding_files"]
    assert [len(rec["inputs"][0][k]) for k in ("files", "embedding_files")] == [1, 1]
    assert rec["inputs"][0]["score_record"]["hash"] == file_hash(d / "score.json")
    assert {e["hash_algo"] for e in (rec["inputs"][0]["score_record"], *rec["inputs"][0]["embedding_files"])} == {HASH_ALGO}


def test_outputs_manifest_drop_table_and_sidecar(tmp_path):
    f = table(6, **{C.IMAGE_HASH: ["h", "h", "a", "b", "c", "d"]})
    src = write(f, tmp_path / "in" / "scores.parquet")
    out = tmp_path / "manifests" / "sub.parquet"
    r = run_select(SelectConfig(scores=(str(src),), out=str(out), keep=0.5))
    manifest = pl.read_parquet(out)
    dropped = pl.read_parquet(tmp_path / "manifests" / "sub.dropped.parquet")
    assert manifest.schema == pl.Schema(C.polars_schema(C.SCORE_SCHEMA))
    assert manifest[C.PAIR_ID].to_list() == ["0:0", "2:0", "3:0"]
    assert dropped.schema.names() == C.DROP_SCHEMA.names
    assert dict(dropped.select(C.PAIR_ID, C.REASON).iter_rows()) == {"1:0": "duplicate-of:0:0", "4:0": "budget", "5:0": "budget"}
    rec = json.loads((tmp_path / "manifests" / "sub.json").read_text())
    assert rec["rows_in"] == 6 and rec["rows_kept"] == 3
    assert rec["inputs"][0]["files"][0]["hash"] == file_hash(src) and rec["inputs"][0]["files"][0]["hash_algo"] == HASH_ALGO
    assert rec["outputs"]["manifest"]["hash"] == file_hash(out) and rec["outputs"]["manifest"]["hash_algo"] == HASH_ALGO
    assert rec["resolved"]["budget"]["target_rows"] == 3 and rec["config"]["keep"] == 0.5
    assert [s["rows_out"] for s in rec["steps"]] == [6, 5, 5, 3]
    assert {"versions", "git_commit", "created", "quantiles"} <= set(rec)
    assert r.paths.manifest == out


def test_summary_names_what_each_step_resolved_to(tmp_path):
    src = write(table(4, **{C.IMAGE_HASH: ["h", "h", "a", "b"]}), tmp_path / "s.parquet")
    r = run_select(SelectConfig(scores=(str(src),), out=str(tmp_path / "m.parquet"), min_score=0.5, budget=0))
    steps, *rest = select_summary(r)
    assert list(steps.columns[-1].cells) == ["status not ok, or no score", "score < 0.5", "same image_hash", "same normalised caption", "--budget 0 rows"]
    assert any("no row was kept" in part for part in rest if isinstance(part, str))


def test_default_output_path_is_manifests_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(table(3), tmp_path / "pool-scores" / "part-000000.parquet")
    r = run_select(SelectConfig(scores=("pool-scores",)))
    assert r.paths.manifest == Path("manifests/pool-scores.parquet") and (tmp_path / "manifests" / "pool-scores.json").is_file()


def test_same_inputs_give_byte_identical_outputs(tmp_path):
    rng = np.random.default_rng(2)
    n = 2000
    f = table(n, **{C.SCORE: rng.normal(0, 1, n).round(2).tolist(), C.IMAGE_HASH: [f"{v}" for v in rng.integers(0, 1500, n)]})
    src = write(f, tmp_path / "s.parquet")
    out = tmp_path / "o" / "m.parquet"
    digests = []
    for _ in range(2):
        run_select(SelectConfig(scores=(str(src),), out=str(out), keep=0.3, max_per_person=1))
        digests.append((out.read_bytes(), (tmp_path / "o" / "m.dropped.parquet").read_bytes()))
    assert digests[0] == digests[1]
    assert not list((tmp_path / "o").glob(".*"))  # no temporary files left


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep": 0.0}, "--keep is a fraction"),
        ({"keep": 1.5}, "--keep is a fraction"),
        ({"keep": -0.1}, "--keep is a fraction"),
        ({"keep": 0.4, "budget": 10}, "--keep and --budget"),
        ({"rule": "paper-pretrain", "max_bank_rank": 3}, "--rule and --max-bank-rank"),
        ({"rule": "paper"}, "--rule must be one of"),
        ({"dedup": "images"}, "--dedup takes"),
        ({"dedup": "pair,image"}, "give it alone"),
        ({"dedup": "none", "dedup_threshold": 0.9}, "--dedup-threshold needs --dedup"),
        ({"dedup_threshold": 1.5}, "cosine in"),
        ({"quota": ("a",)}, "SOURCE=N"),
        ({"quota": ("a=1", "a=2")}, "twice"),
        ({"max_per_person": 0}, "--max-per-person"),
        ({"by": "caption"}, "--by must be"),
        ({"min_score": float("nan")}, "--min-score"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(UsageError, match=message):
        SelectConfig(scores=("x",), **options)


def _nothing_written(tmp_path: Path) -> bool:
    out = tmp_path / "out"
    return not out.exists() or all(p.name == "m.parquet" and p.is_dir() for p in out.iterdir())


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda p: write(table(3).drop(C.SCORE, C.CAPTION), p / "s.parquet"), {}, "missing column.*caption, score.*expected.*found pair_id"),
        (lambda p: write(table(3).head(0), p / "s.parquet"), {}, "no rows"),
        (lambda p: write(table(3).with_columns(pl.col(C.SCORE).cast(pl.String)), p / "s.parquet"), {}, "column score has type"),
        (lambda p: p / "missing.parquet", {}, "no such file"),
        (lambda p: (p / "s.parquet").write_bytes(b"") or p / "s.parquet", {}, "not a readable Parquet"),
        (lambda p: (p / "empty").mkdir() or p / "empty", {}, "no .parquet files"),
        (lambda p: write(table(3), p / "run" / "scores" / "part-000000.parquet").parent.parent, {}, "incomplete score run"),
        (lambda p: write(table(3), p / "s.parquet"), {"dedup_threshold": 0.9}, "needs embeddings"),
        (lambda p: write(table(3, **{C.PAIR_ID: ["a", "b", "a"]}), p / "s.parquet"), {}, "pair_id is not unique"),
        (lambda p: write(table(3), p / "s.parquet"), {"truth": "nope.parquet"}, "no such truth file"),
        (lambda p: (p / "out" / "m.parquet").mkdir(parents=True) or write(table(3), p / "s.parquet"), {}, "output path is a directory"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, make, options, message):
    src = make(tmp_path)
    with pytest.raises(TbpsError, match=message):
        run_select(SelectConfig(scores=(str(src),), out=str(tmp_path / "out" / "m.parquet"), **options))
    assert _nothing_written(tmp_path)


def test_a_truth_of_another_pool_fails_after_selecting_and_writes_nothing(tmp_path):
    src = write(table(3), tmp_path / "s.parquet")
    truth = write(pl.DataFrame({C.PAIR_ID: ["x"], C.DEFECT: ["none"]}), tmp_path / "truth.parquet")
    with pytest.raises(TbpsError, match="truth"):
        run_select(SelectConfig(scores=(str(src),), out=str(tmp_path / "out" / "m.parquet"), truth=str(truth)))
    assert _nothing_written(tmp_path)


def test_inputs_with_different_bank_sizes_cannot_share_a_bank_rank_rule(tmp_path):
    a = write(table(2), tmp_path / "a.parquet", bank_size=1000)
    b = write(table(2, **{C.PAIR_ID: ["x", "y"]}), tmp_path / "b.parquet", bank_size=10_000)
    with pytest.raises(TbpsError, match="banks of different sizes"):
        run_select(SelectConfig(scores=(str(a), str(b)), out=str(tmp_path / "out" / "m.parquet"), rule="paper-pretrain"))
    r = run_select(SelectConfig(scores=(str(a), str(b)), out=str(tmp_path / "out" / "m.parquet"), min_score=0.0))
    assert r.selection.rows_in == 4 and any("different sizes" in w for w in r.selection.warnings)


# --- the command line ----------------------------------------------------------------------


def test_every_step_is_in_the_help_and_the_readme(cli):
    res = cli("select", "--help", env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    selection = readme[readme.index("## Selection\n") :].split("\n## ", 1)[0]
    for k, step in enumerate(STEPS, start=1):
        assert f"{k}. {step.name} ({step.option}), reason {step.reason}:" in res.output
        assert f"| `{step.name}` |" in selection
    assert len({s.name for s in STEPS}) == len(STEPS)


def test_cli_select_with_truth_and_explain(tmp_path, cli):
    f = table(6, **{C.IMAGE_HASH: ["h", "h", "a", "b", "c", "d"], C.SCORE: [0.9, 0.8, 0.1, 0.7, 0.6, 0.5]})
    src = write(f, tmp_path / "s.parquet")
    truth = write(
        pl.DataFrame({C.PAIR_ID: f[C.PAIR_ID], C.DEFECT: ["none", C.DEFECT_EXACT_DUP, C.DEFECT_BLANK, "none", "none", C.DEFECT_SWAPPED]}),
        tmp_path / "truth.parquet",
    )
    out = tmp_path / "m.parquet"
    res = cli("select", src, "--min-score", "0.2", "--keep", "0.5", "--out", out, "--truth", truth, "--explain", "-q", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("tbps select: 6 rows in, 3 kept", "exact-image", "duplicate-of:<pair_id>", "blank-image", "AUROC", "--keep 0.5 of 6 input rows"):
        assert text in res.output
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["truth"]["overall"]["recall"] == 1.0 and rec["truth"]["overall"]["precision"] == 1.0


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--keep", "1.5"], 2, "--keep is a fraction"),
        (["--keep", "0.4", "--budget", "3"], 2, "--keep and --budget"),
        (["--rule", "paper-pretrain", "--max-bank-rank", "3"], 2, "--rule and --max-bank-rank"),
    ],
)
def test_cli_option_errors_exit_2(tmp_path, args, code, text, cli):
    src = write(table(3), tmp_path / "s.parquet")
    res = cli("select", src, "--out", tmp_path / "out" / "m.parquet", *args)
    assert res.exit_code == code and text in res.output
    assert _nothing_written(tmp_path)


def test_cli_bad_input_exits_1(tmp_path, cli):
    src = write(table(3).drop(C.STATUS), tmp_path / "s.parquet")
    res = cli("select", src, "--out", tmp_path / "out" / "m.parquet")
    assert res.exit_code == 1 and "missing column(s) status" in res.output
    assert _nothing_written(tmp_path)


@pytest.mark.slow
def test_synth_score_select_end_to_end(tmp_path, cli):
    """The real `tbps score` output (metadata, embeddings, score.json) and truth sidecar."""
    wide = {"COLUMNS": "200"}
    world, scores, out = tmp_path / "w", tmp_path / "scores", tmp_path / "m.parquet"
    synth = ["synth", "--out", str(world), "--identities", "12", "--pool-identities", "20", "--pool-size", "80", "--workers", "1", "-q"]
    assert cli(*synth, env=wide).exit_code == 0
    score = ["score", str(world / "pool" / "pool.json"), "--model", "tbps-tiny", "--bank", str(world / "benchmark" / "reid_raw.json"),
             "--bank-size", "50", "--out", str(scores), "--workers", "0", "-q"]
    res = cli(*score, env=wide)
    assert res.exit_code == 0, res.output
    res = cli("select", scores, "--rule", "paper-finetune", "--dedup-threshold", "0.999", "--keep", "0.5",
              "--truth", world / "pool" / "truth.parquet", "--out", out, "-q", env=wide)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.with_suffix(".json").read_text())
    bank = rec["inputs"][0]["bank_size"]
    assert rec["resolved"]["bank_rank"]["max_bank_rank"] == scaled_rule("paper-finetune", bank) and bank <= 50
    assert rec["truth"]["matched"] == rec["rows_in"] == 80
    assert rec["rows_kept"] == pl.read_parquet(out).height <= 40
    assert pl.read_parquet(out.with_name("m.dropped.parquet")).height == 80 - rec["rows_kept"]


@pytest.mark.parametrize("name", ["../../evil", "a/b", "..", "", "x\x00y"])
def test_name_is_a_plain_file_name(name):
    with pytest.raises(UsageError, match="--name is a plain file name"):
        SelectConfig(scores=("s.parquet",), name=name)


# --- issue 16: splits, multi-caption data, de-duplication that wipes the pool, MALS ids ---


def _splits_table() -> pl.DataFrame:
    splits = ["train", "train", "val", "test", "train", "test", "val", "train"]
    return table(8, **{C.SPLIT: splits, C.PERSON_ID: [f"p{k // 2}" for k in range(8)]})


def test_split_keeps_only_those_splits_and_the_manifest_keeps_split_and_person_id(tmp_path):
    src = write(_splits_table().with_columns(pl.lit("x").alias("my_note")), tmp_path / "s.parquet")
    out = tmp_path / "m.parquet"
    r = run_select(SelectConfig(scores=(str(src),), out=str(out), split="train,val", keep=0.5))
    reasons = dict(r.selection.outcome.select(C.PAIR_ID, C.REASON).iter_rows())
    assert [reasons[f"{k}:0"] for k in (3, 5)] == ["split", "split"]  # the test rows
    # --keep 0.5 counts the 6 rows of the chosen splits: 3 kept, the best of them
    manifest = pl.read_parquet(out)
    assert manifest[C.PAIR_ID].to_list() == ["0:0", "1:0", "2:0"]
    assert set(manifest[C.SPLIT]) <= {"train", "val"} and manifest[C.PERSON_ID].to_list() == ["p0", "p0", "p1"]
    assert "my_note" in manifest.columns  # every column of the score table survives
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["config"]["split"] == "train,val"
    assert rec["resolved"]["split"] == {"splits": ["train", "val"], "rows": 6, "rows_per_split": {"train": 4, "val": 2}}
    assert rec["resolved"]["budget"]["rows_in"] == 6 and rec["steps"][0] == {"step": "split", "rows_in": 8, "dropped": 2, "rows_out": 6}
    assert json.loads(pq_meta(out)["tbps.select"])["config"]["split"] == "train,val"  # in the manifest itself too
    assert [s.step for s in r.selection.steps][:2] == ["split", "status"]


def pq_meta(path: Path) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (pq.read_metadata(path).metadata or {}).items()}


def test_split_is_refused_on_a_table_without_a_split_column_and_names_the_splits_it_has(tmp_path):
    old = write(table(3).drop(C.SPLIT), tmp_path / "old.parquet")
    with pytest.raises(TbpsError, match="no split column") as info:
        run_select(SelectConfig(scores=(str(old),), out=str(tmp_path / "out" / "m.parquet"), split="train"))
    assert "old.parquet" in str(info.value) and "Score the dataset again" in str(info.value)
    assert _nothing_written(tmp_path)
    with pytest.raises(TbpsError, match="no split column"):  # the core, on a frame
        select(table(3).drop(C.SPLIT).lazy(), SelectConfig(split="train"))
    new = write(_splits_table(), tmp_path / "new.parquet")
    with pytest.raises(TbpsError, match="no rows of split 'tset'.*test \\(2 rows\\), train \\(4 rows\\), val \\(2 rows\\)"):
        run_select(SelectConfig(scores=(str(new),), out=str(tmp_path / "out" / "m.parquet"), split="tset"))
    # a table whose rows carry no split at all says so
    with pytest.raises(TbpsError, match="the dataset has no splits"):
        select(table(3).lazy(), SelectConfig(split="train"))
    # one old input among new ones is named
    with pytest.raises(TbpsError, match="old.parquet.*no split column"):
        run_select(SelectConfig(scores=(str(new), str(old)), out=str(tmp_path / "out" / "m.parquet"), split="train"))
    with pytest.raises(UsageError, match="--split takes split names"):
        SelectConfig(split="train,,val")


def test_cli_select_split(tmp_path, cli):
    src = write(_splits_table(), tmp_path / "s.parquet")
    res = cli("select", src, "--split", "test", "--out", tmp_path / "m.parquet", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "split not test" in res.stdout and pl.read_parquet(tmp_path / "m.parquet")[C.SPLIT].to_list() == ["test", "test"]


def _cuhk_like(images: int = 24) -> pl.DataFrame:
    """Two distinct captions per image (CUHK-PEDES), plus two rows that repeat an image and its caption."""
    n = 2 * images
    frame = table(
        n,
        **{
            C.IMAGE_HASH: [f"img{k // 2}" for k in range(n)],
            C.CAPTION: [f"person {k // 2} caption {k % 2}" for k in range(n)],
            C.PERSON_ID: [f"p{k // 8}" for k in range(n)],
        },
    )
    dups = table(2, **{C.PAIR_ID: ["dup:0", "dup:1"], C.IMAGE_HASH: ["img0", "img1"], C.CAPTION: ["Person 0, caption 0.", "person 1 caption 1"],
                      C.SCORE: [0.0, 0.0]})
    return pl.concat([frame, dups])


def test_default_dedup_keeps_every_caption_of_multi_caption_data():
    f = _cuhk_like()
    logged: list[str] = []
    sel = select(f.lazy(), SelectConfig(), log=logged.append)
    reasons = dict(sel.outcome.select(C.PAIR_ID, C.REASON).iter_rows())
    # only the exact repeats of an image and its caption go; every other caption stays
    assert {p: r for p, r in reasons.items() if r} == {"dup:0": "duplicate-of:0:0", "dup:1": "duplicate-of:3:0"}
    assert [s.step for s in sel.steps] == ["status", "exact-pair"]
    assert sel.resolved["dedup"]["modes"] == ["pair"] and sel.resolved["dedup"]["images_with_several_captions"] == 24
    assert any("--dedup auto" in n and "--dedup image,caption" in n for n in sel.notes)
    assert any(line.startswith("note: --dedup auto") for line in logged)  # said on stderr
    # the old default, given explicitly, halves the data: a warning names the option that keeps them
    old = select(f.lazy(), SelectConfig(dedup="image,caption"))
    assert old.rows_kept == 24
    assert any("--dedup pair" in w and "24 of 24 images" in w for w in old.warnings)


def _synthetic_pool_scores(world: Path) -> pl.DataFrame:
    """The synthetic pool as a score table: real image hashes, arbitrary scores (the model does not matter here)."""
    pairs = read_dataset(world / "pool" / "pool.json")
    rng = np.random.default_rng(3)
    return pairs.select(C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SPLIT, C.SOURCE, C.STATUS, C.ERROR).with_columns(
        pl.Series(C.IMAGE_HASH, [file_hash(p) for p in pairs[C.IMAGE_PATH]]),
        pl.Series(C.SCORE, rng.normal(0.3, 0.1, pairs.height), dtype=pl.Float32),
        pl.Series(C.BANK_RANK, rng.integers(0, 50, pairs.height), dtype=pl.Int32),
    )


def test_default_dedup_on_the_synthetic_pool_keeps_the_rows_it_kept_before(synth_world):
    f = _synthetic_pool_scores(synth_world(0, pool_size=60))
    assert f[C.IMAGE_HASH].n_unique() < f.height  # the pool holds duplicates (a minority defect)
    auto = select(f.lazy(), SelectConfig(keep=0.5))
    before = select(f.lazy(), SelectConfig(dedup="image,caption", keep=0.5))
    assert auto.outcome.equals(before.outcome) and [s.step for s in auto.steps] == ["status", "exact-image", "exact-caption", "budget"]
    assert auto.resolved["dedup"]["modes"] == ["image", "caption"] and not auto.notes


def test_an_exact_pass_that_removes_most_rows_is_warned_about(tmp_path):
    f = table(10, **{C.IMAGE_HASH: ["h"] * 7 + ["a", "b", "c"]})
    logged: list[str] = []
    r = run_select(SelectConfig(scores=(str(write(f, tmp_path / "s.parquet")),), out=str(tmp_path / "m.parquet"), dedup="image"),
                   log=logged.append)
    (warning,) = [w for w in r.selection.warnings if "exact-image removed" in w]
    assert "6 of its 10 input rows (60%)" in warning and "the largest group holds 7 rows" in warning
    assert any("warning: exact-image removed" in line for line in logged)
    assert warning in json.loads((tmp_path / "m.json").read_text())["warnings"]
    # half or less is not "most": no warning
    assert not any("removed" in w for w in select(table(4, **{C.IMAGE_HASH: ["h", "h", "a", "b"]}).lazy(), SelectConfig(dedup="image")).warnings)


def test_a_near_dedup_that_wipes_out_the_pool_is_warned_about_with_the_similarities(tmp_path):
    rng = np.random.default_rng(5)
    n, d = 40, 16
    base = rng.standard_normal(d)
    img = base + 0.05 * rng.standard_normal((n, d))  # 40 near copies of one image
    img[-4:] = rng.standard_normal((4, d))  # and 4 others
    txt = rng.standard_normal((n, d))
    f = table(n)
    logged: list[str] = []
    sel = select(f.lazy(), SelectConfig(dedup="image", dedup_threshold=0.95), embeddings=_emb(f[C.PAIR_ID].to_list(), img, txt), log=logged.append)
    near = [s for s in sel.steps if s.step == "near-duplicate"][0]
    assert near.dropped > near.rows_in / 2
    (warning,) = [w for w in sel.warnings if "near-duplicate removed" in w]
    assert "--dedup-threshold 0.95" in warning and "nearest-neighbour cosine of 40 sampled rows" in warning and "median" in warning
    nn = sel.resolved["dedup"]["near"]["nearest_neighbour"][C.IMAGE_EMB]
    assert nn["queries"] == nn["reference"] == n and nn["median"] > 0.95 and nn["share_at_threshold"] >= 0.9
    assert any(line.startswith("warning: near-duplicate removed") for line in logged)
    # a step that removes few rows computes no distribution and says nothing
    few = select(f.lazy(), SelectConfig(dedup="caption", dedup_threshold=0.95), embeddings=_emb(f[C.PAIR_ID].to_list(), img, txt))
    assert "nearest_neighbour" not in few.resolved["dedup"]["near"] and not any("removed" in w for w in few.warnings)


def test_max_per_person_on_rows_without_person_ids_caps_nothing_and_says_so():
    f = table(6, **{C.PERSON_ID: [None] * 6})
    reasons, sel = run(f, max_per_person=1, dedup="none")
    assert set(reasons.values()) == {None}  # null ids are not one person
    assert any("none of the 6 rows has a person id" in w and "caps nothing" in w for w in sel.warnings)
    reasons, sel = run(table(**{C.PERSON_ID: ["p", "p", None, None]}), max_per_person=1, dedup="none")
    assert list(reasons.values()) == [None, "per-person", None, None]
    assert any("2 of 4 rows have no person id" in n for n in sel.notes) and sel.resolved["per_person"]["rows_without_person_id"] == 2


def test_several_json_files_select_together_and_quota_tells_them_apart(tmp_path):
    folder = tmp_path / "mals"
    folder.mkdir()
    for name, n in (("aptm", 3), ("pool", 4)):
        (folder / f"{name}.json").write_text(json.dumps([{"image": f"{name}{k}.jpg", "caption": f"{name} caption {k}", "image_id": f"{k}"}
                                                         for k in range(n)]))
    pairs = read_dataset(folder)
    assert pairs[C.PAIR_ID].to_list()[:2] == ["aptm:0:0", "aptm:1:0"] and pairs[C.PERSON_ID].null_count() == 7
    scored = pairs.with_columns(
        pl.col(C.IMAGE_PATH).alias(C.IMAGE_HASH), pl.lit(C.STATUS_OK).alias(C.STATUS),
        (1.0 - pl.int_range(pl.len()) / 10).cast(pl.Float32).alias(C.SCORE), pl.lit(0, dtype=pl.Int32).alias(C.BANK_RANK),
    )
    inputs = []
    for source in ("aptm", "pool"):  # scored as two tables, e.g. two shards of one run
        inputs.append(str(write(scored.filter(pl.col(C.SOURCE) == source), tmp_path / f"s_{source}.parquet")))
    r = run_select(SelectConfig(scores=tuple(inputs), out=str(tmp_path / "m.parquet"), quota=("aptm=1", "pool=2"), max_per_person=1))
    manifest = pl.read_parquet(tmp_path / "m.parquet")
    assert manifest[C.PAIR_ID].to_list() == ["aptm:0:0", "pool:0:0", "pool:1:0"]
    assert not any("zz" in w for w in r.selection.warnings) and any("caps nothing" in w for w in r.selection.warnings)


def test_truth_is_measured_on_the_selected_splits_only(tmp_path):
    f = _splits_table()
    src = write(f, tmp_path / "s.parquet")
    defects = ["none"] * 8
    defects[3] = defects[5] = C.DEFECT_BLANK  # the test rows: out of scope with --split train,val
    truth = write(pl.DataFrame({C.PAIR_ID: f[C.PAIR_ID], C.DEFECT: defects}), tmp_path / "truth.parquet")
    r = run_select(SelectConfig(scores=(str(src),), out=str(tmp_path / "m.parquet"), split="train,val", truth=str(truth)))
    assert r.selection.truth["matched"] == 6 and r.selection.truth["overall"]["removed"] == 0


# --- issue 14: ordering and cutting by the ITM head's itm_score ------------------------------


def itm_table(n: int = 0, itm: list | None = None, **cols) -> pl.DataFrame:
    """A score table with ``itm_score`` (``columns.score_schema(itm=True)``): ``itm`` given, or ascending."""
    base = table(n, **cols)
    values = itm if itm is not None else [(i + 1) / (base.height + 1) for i in range(base.height)]
    return base.with_columns(pl.Series(C.ITM_SCORE, values, dtype=pl.Float32)).select(C.score_schema(True).names)


def _five() -> pl.DataFrame:
    return itm_table(
        itm=[0.2, 0.9, 0.9, 0.5, 0.9],
        **{C.PAIR_ID: ["a", "b", "c", "d", "e"], C.SCORE: [0.1, 0.3, 0.5, 0.9, 0.5], C.BANK_RANK: [0, 3, 9, 0, 1]},
    )


def test_by_itm_score_orders_by_itm_then_score_then_pair_id():
    f = _five()
    itm = f[C.ITM_SCORE].to_numpy()
    order = best_first(f[C.SCORE].to_numpy(), f[C.BANK_RANK].to_numpy(), f[C.PAIR_ID], np.arange(5), C.ITM_SCORE, itm=itm)
    # itm 0.9: c and e tie on score 0.5 (c < e; bank_rank plays no part), then b; then d (0.5), a (0.2).
    assert [f[C.PAIR_ID][int(i)] for i in order] == ["c", "e", "b", "d", "a"]
    for budget, want in ((1, ["c"]), (2, ["c", "e"]), (4, ["b", "c", "d", "e"])):
        assert kept(f, budget=budget, by=C.ITM_SCORE, dedup="none") == want
    # By score the same table keeps d first: the order really is the itm one.
    assert kept(f, budget=1, dedup="none") == ["d"]


def test_best_first_by_itm_score_is_a_total_order():
    rng = np.random.default_rng(3)
    n = 300
    itm = rng.choice([0.0, 0.25, 0.5, 1.0], n).astype(np.float32)
    score = rng.choice([0.1, -0.2, 0.3], n).astype(np.float32)
    pid = pl.Series([f"id{v}" for v in rng.permutation(n)])
    got = best_first(score, np.zeros(n, np.int32), pid, np.arange(n), C.ITM_SCORE, itm=itm)
    assert got.tolist() == sorted(range(n), key=lambda r: (-float(itm[r]), -float(score[r]), pid[r]))


def test_min_itm_drops_below_the_cut_and_rows_without_itm_score_are_no_score():
    f = itm_table(itm=[0.5, 0.49, 0.8, None, float("nan"), 0.7], **{C.STATUS: ["ok"] * 5 + ["bad-image"]})
    reasons, sel = run(f, min_itm=0.5, dedup="none")
    assert reasons == {"0:0": None, "1:0": "min-itm", "2:0": None, "3:0": "no-score", "4:0": "no-score", "5:0": "status"}
    assert [(s.step, s.rows_in, s.dropped) for s in sel.steps] == [("status", 6, 3), ("min-itm", 3, 1)]
    assert sel.outcome[C.ITM_SCORE].to_list()[:3] == pytest.approx([0.5, 0.49, 0.8])  # the drop reasons' evidence
    # Not asked for, itm_score plays no part: the same rows all pass status on their score.
    reasons, _ = run(f, dedup="none")
    assert [r for r in reasons.values()] == [None] * 5 + ["status"]


def test_every_row_is_accounted_for_when_selecting_by_itm_score():
    rng = np.random.default_rng(4)
    n = 400
    itm = rng.uniform(0, 1, n).astype(np.float32)
    itm[rng.choice(n, 20, replace=False)] = np.nan
    f = itm_table(
        itm=itm.tolist(),
        **{
            C.STATUS: rng.choice(["ok"] * 9 + ["bad-image"], n).tolist(),
            C.SCORE: rng.normal(0.3, 0.1, n).tolist(),
            C.IMAGE_HASH: [f"{v}" for v in rng.integers(0, 300, n)],
            C.PERSON_ID: [f"p{v}" for v in rng.integers(0, 40, n)],
        },
    )
    _, sel = run(f, by=C.ITM_SCORE, min_itm=0.1, min_score=0.1, max_per_person=4, keep=0.3, dedup="image")
    out = sel.outcome
    kept_n = out.filter(pl.col(C.STEP).is_null()).height
    assert out.height == n and kept_n + sel.dropped().height == n and kept_n == sel.manifest.collect().height == sel.rows_kept
    assert [s.step for s in sel.steps] == ["status", "min-score", "min-itm", "exact-image", "per-person", "budget"]
    assert all(s.rows_out == t.rows_in for s, t in zip(sel.steps, sel.steps[1:]))
    # Every best-N step kept by itm_score: a duplicate names a row with a higher or equal itm_score,
    # and every row the budget dropped has an itm_score no higher than the lowest kept one.
    best = dict(out.select(C.PAIR_ID, C.ITM_SCORE).iter_rows())
    dups = out.filter(pl.col(C.REASON).str.starts_with("duplicate-of:"))
    assert dups.height and all(best[r.split(":", 1)[1]] >= s for r, s in dups.select(C.REASON, C.ITM_SCORE).iter_rows())
    lowest_kept = out.filter(pl.col(C.STEP).is_null())[C.ITM_SCORE].min()
    assert out.filter(pl.col(C.STEP) == "budget")[C.ITM_SCORE].max() <= lowest_kept
    assert out.filter(pl.col(C.REASON) == "min-itm")[C.ITM_SCORE].max() < 0.1


def test_itm_options_are_refused_on_a_table_without_itm_score(tmp_path):
    plain = write(table(3), tmp_path / "plain.parquet")
    for options, said in (({"by": C.ITM_SCORE}, "--by itm_score"), ({"min_itm": 0.5}, "--min-itm 0.5")):
        with pytest.raises(TbpsError, match=f"{said}: this score table has no itm_score column") as err:
            run_select(SelectConfig(scores=(str(plain),), out=str(tmp_path / "out" / "m.parquet"), **options))
        assert str(plain) in str(err.value)
        with pytest.raises(TbpsError, match="no itm_score column"):  # the core refuses it too
            select(table(3).lazy(), SelectConfig(dedup="none", **options))
    assert _nothing_written(tmp_path)
    # Two inputs, one without the column: the message names that one.
    with_itm = write(itm_table(2, **{C.PAIR_ID: ["x", "y"]}), tmp_path / "itm.parquet")
    with pytest.raises(TbpsError, match="no itm_score column") as err:
        run_select(SelectConfig(scores=(str(with_itm), str(plain)), out=str(tmp_path / "out" / "m.parquet"), by=C.ITM_SCORE))
    assert str(plain) in str(err.value) and str(with_itm) not in str(err.value)
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_min_itm_is_a_probability(value):
    with pytest.raises(UsageError, match=r"--min-itm is a match probability in \[0, 1\]"):
        SelectConfig(scores=("x",), min_itm=value)


def test_the_provenance_names_the_score_that_ordered_and_cut(tmp_path):
    n = 10
    f = itm_table(n, itm=[0.05 * k for k in range(n)][::-1])  # itm descending with the row, score too
    f = f.with_columns(pl.Series(C.SCORE, [0.1 * k for k in range(n)], dtype=pl.Float32))  # score ascending: the opposite order
    src = write(f, tmp_path / "s.parquet")
    out = tmp_path / "m.parquet"
    r = run_select(SelectConfig(scores=(str(src),), out=str(out), by=C.ITM_SCORE, min_itm=0.1, min_score=0.05, keep=0.5, dedup="none"))
    manifest = pl.read_parquet(out)
    # min-score drops row 0 (score 0), min-itm rows 8 and 9 (itm 0.05, 0): the best 5 by itm of rows 1..7 are 1..5.
    assert manifest[C.PAIR_ID].to_list() == [f"{k}:0" for k in range(1, 6)]
    assert manifest.columns == C.score_schema(True).names  # itm_score kept, in its schema place
    want = {
        "by": C.ITM_SCORE,
        "order": [[C.ITM_SCORE, "desc"], [C.SCORE, "desc"], [C.PAIR_ID, "asc"]],
        "thresholds": {"min-score": {"column": C.SCORE, "value": 0.05}, "min-itm": {"column": C.ITM_SCORE, "value": 0.1}},
    }
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["resolved"]["scores_used"] == want
    assert json.loads(pq_meta(out)["tbps.select"])["resolved"]["scores_used"] == want  # in the manifest itself too
    budget = rec["resolved"]["budget"]
    assert budget["by"] == C.ITM_SCORE and budget["itm_score_cutoff"] == pytest.approx(0.2) and budget["first_dropped_itm_score"] == pytest.approx(0.15)
    assert rec["itm_quantiles"]["kept"]["n"] == 5 and rec["itm_quantiles"]["kept"]["q0"] == pytest.approx(0.2)
    assert [s["step"] for s in rec["steps"]] == ["status", "min-score", "min-itm", "budget"]
    assert rec["rows_in"] == n == rec["rows_kept"] + rec["outputs"]["dropped"]["rows"]
    # The summary says it too.
    steps, *rest = select_summary(r, explain=True)
    assert list(steps.columns[-1].cells) == ["status not ok, or no score", "score < 0.05", "itm_score < 0.1", "--keep 0.5 of 10 input rows = 5 rows; itm_score >= 0.2000"]
    titles = [part.title for part in rest if hasattr(part, "title")]
    assert "score quantiles" in titles and "itm_score quantiles" in titles
    dropped_rows = next(part for part in rest if getattr(part, "title", "").startswith("dropped rows"))
    assert [c.header for c in dropped_rows.columns][-1] == C.ITM_SCORE


def test_a_table_with_itm_score_selected_by_score_says_so_and_keeps_the_column(tmp_path):
    src = write(_five(), tmp_path / "s.parquet")
    out = tmp_path / "m.parquet"
    r = run_select(SelectConfig(scores=(str(src),), out=str(out), min_score=0.2, rule="paper-pretrain", dedup="none"))
    assert C.ITM_SCORE in pl.read_parquet(out).columns and C.ITM_SCORE not in r.selection.outcome.columns
    used = json.loads(out.with_suffix(".json").read_text())["resolved"]["scores_used"]
    assert used["by"] == "score" and used["thresholds"] == {
        "min-score": {"column": C.SCORE, "value": 0.2}, "bank-rank": {"column": C.BANK_RANK, "value": "--rule paper-pretrain"}}


def test_cli_select_by_itm_score_and_its_refusals(tmp_path, cli):
    src = write(_five(), tmp_path / "s.parquet")
    out = tmp_path / "m.parquet"
    res = cli("select", src, "--by", "itm_score", "--min-itm", "0.4", "--budget", "2", "--dedup", "none", "--out", out, "-q", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out)[C.PAIR_ID].to_list() == ["c", "e"] and "itm_score < 0.4" in res.output
    assert dict(pl.read_parquet(tmp_path / "m.dropped.parquet").select(C.PAIR_ID, C.REASON).iter_rows()) == {"a": "min-itm", "b": "budget", "d": "budget"}
    plain = write(table(3), tmp_path / "plain.parquet")
    res = cli("select", plain, "--by", "itm_score", "--out", tmp_path / "out" / "m.parquet")
    assert res.exit_code == 1 and "no itm_score column" in res.output and "plain.parquet" in res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output
    res = cli("select", src, "--min-itm", "2", "--out", tmp_path / "out" / "m.parquet")
    assert res.exit_code == 2 and "--min-itm is a match probability" in res.output
    assert _nothing_written(tmp_path)
