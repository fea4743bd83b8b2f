"""``tbps select``: score tables -> the training subset (a manifest), every dropped row explained.

The steps are one table, :data:`STEPS`: each entry names its step and drop reason, says when a
config runs it (``enabled``), drops rows (``run``) and says what it resolved to (``describe``).
They run in the table's order; each is optional except ``status``, and each sees only the rows
the steps before it kept, best first:

1. ``split``: ``--split NAME[,NAME]`` keeps only the rows of those splits (the score table's
   ``split`` column, carried from the dataset); the others are dropped with reason ``split``.
   A table without a ``split`` column (written by an older ``tbps score``) is refused.
2. ``status``: rows whose ``status`` is not ``ok`` are dropped (reason ``status``); so are ``ok``
   rows without a usable ``score`` or ``bank_rank`` (null or NaN; reason ``no-score``), and, when
   the selection uses ``itm_score`` (``--by itm_score`` or ``--min-itm``), ``ok`` rows without one.
3. ``min-score``: ``--min-score S`` drops rows with ``score < S``.
   ``min-itm``: ``--min-itm P`` drops rows with ``itm_score < P`` (the match probability of an
   image-text matching head, written by ``tbps score`` with a model that has one; a table
   without the column is refused, as is ``--by itm_score`` on it).
4. ``bank-rank``: ``--max-bank-rank K`` drops rows with ``bank_rank > K``. ``--rule
   paper-pretrain`` / ``paper-finetune`` mean ``K = 48`` / ``K = 1799``, the paper's cuts with a
   10,000-caption bank (own caption above index 49 / 1800 of 10,001 scores; see
   :mod:`tbps.curate.layout`). When the score table's bank has another size ``B``, the rule is
   *scaled* to keep the same share of ranks: ``K = round((K10k + 1) * (B + 1) / 10001) - 1``,
   and a warning says so. (``--max-bank-rank`` is taken as given.)
5. exact de-duplication (``--dedup``): ``exact-image`` groups rows with the same
   ``image_hash``, then ``exact-caption`` groups the remaining rows with the same normalised
   caption (:func:`tbps.curate.dedup.normalise_caption`); ``exact-pair`` (``--dedup pair``)
   instead groups rows whose image *and* caption both match. The default, ``auto``, looks at
   the data first: when more than half of its images (distinct ``image_hash`` of ``ok`` rows)
   carry several distinct captions (CUHK-PEDES has two per image), it means ``pair``, since
   ``image`` would keep one caption of each image and drop the rest as duplicates; otherwise
   (one caption per image, duplicates a minority defect, as in MALS and the synthetic pool) it
   means ``image,caption``. The choice is said on stderr and in the summary and recorded in
   the provenance; ``--dedup image,caption`` (or ``pair``, ``caption``, ``none``) chooses
   yourself, and an explicit ``image`` pass on such data is warned about.
6. ``near-duplicate`` (``--dedup-threshold T``): rows whose image embeddings, or caption
   embeddings, have cosine ``>= T`` (both, for ``pair``), resolved greedily in best-first order
   (:func:`tbps.curate.dedup.greedy_keep`). Needs the embeddings ``tbps score`` writes.
7. ``per-person``: ``--max-per-person N`` keeps the best N rows of each ``person_id``. Rows
   without a person id are not capped (they are not one person), and when no row has one
   (MALS has none) a warning says that the step does nothing.
8. ``quota``: ``--quota SOURCE=N`` keeps the best N rows of that ``source`` (repeatable;
   sources without a quota are not capped).
9. ``budget``: ``--keep F`` keeps the best ``floor(F * rows_in)`` remaining rows, where
   ``rows_in`` is **every input row**, as read (so ``--keep 0.4`` gives a manifest of 40% of
   the pool whichever filters ran before; when fewer rows are left, all of them are kept and
   the summary says so); with ``--split``, every row of those splits. ``--budget N`` keeps the
   best N remaining rows.

A de-duplication step (exact or near) that removes more than half of the rows it sees is
warned about on stderr, in the summary and in the provenance record, with what it matched: the
groups of equal keys (exact), or the nearest-neighbour cosines of a sample of rows beside the
threshold used (near), so a threshold that wipes out the pool is seen at once.

A new rule is one :class:`Step` entry in :data:`STEPS`, one :class:`SelectConfig` field and one
``tbps select`` option; ``--help`` and the summary are generated from the entry, and a test
checks that the README's table lists it.

"Best" is one total order, used by every step that keeps some rows of a group: with ``--by
score`` (default) higher ``score`` first, then lower ``bank_rank``, then ``pair_id``; with ``--by
bank_rank`` lower ``bank_rank`` first, then higher ``score``, then ``pair_id``; with ``--by
itm_score`` higher ``itm_score`` first, then higher ``score``, then ``pair_id``. Ties are
therefore broken the same way every run, whatever the input order. The manifest's provenance
says which score ordered the rows and which column each threshold applied to
(``resolved["scores_used"]``).

Dropped rows carry their step and reason: ``split``, ``status``, ``no-score``, ``min-score``,
``min-itm``, ``bank-rank``, ``duplicate-of:<pair_id>``, ``per-person``, ``quota``, ``budget``. Rows in =
kept + dropped, always. ``duplicate-of`` names the row the duplicate lost to: the best row of
its group in that pass (exact), or the best kept row it is a near copy of (near); a later step
may still drop that row for a reason of its own (the drop table then says so for it too).

Output order: the manifest and the drop table keep the input order (inputs in the order given,
part files by name, rows as stored), so the same inputs and parameters give the same bytes
without sorting millions of rows.

Memory: only a narrow projection of the table is collected (ids, scores, and 128-bit hashes
of the dedup keys, about 100 bytes a row); the manifest itself is a lazy frame the caller
streams to disk. Near de-duplication holds the embeddings of the rows still in play
(``rows * dim * 4`` bytes for each modality).
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Callable

import numpy as np
import polars as pl

from tbps import columns as C
from tbps.curate import dedup as D
from tbps.curate.layout import PAPER_BANK_SIZE, PAPER_RULES
from tbps.errors import TbpsError, UsageError

BY = ("score", "bank_rank", C.ITM_SCORE)
DEDUP_MODES = ("image", "caption", "pair")
DEDUP_AUTO = "auto"
SPLIT_STEP = "split"  # the step (and reason) of rows outside --split
# --dedup auto means pair when more than this share of the images carry several distinct captions.
MULTI_CAPTION_SHARE = 0.5
# A de-duplication step that removes more than this share of the rows it sees is warned about.
MOST_REMOVED = 0.5
REASON_NO_SCORE = "no-score"
REASON_DUPLICATE = "duplicate-of:"

REQUIRED_COLUMNS = (C.PAIR_ID, C.IMAGE_PATH, C.CAPTION, C.PERSON_ID, C.SOURCE, C.IMAGE_HASH, C.SCORE, C.BANK_RANK, C.STATUS)
_ROW = "_row"  # input row index (manifest join)

def _fail(field_: str, message: str, value: object) -> UsageError:
    return UsageError(message, field=field_, value=value)


@dataclass
class SelectConfig:
    """Everything ``tbps select`` does; field names are the option names.

    Args:
        scores: score tables: ``tbps score`` output directories, directories of Parquet
            parts, or Parquet files.
        out: the manifest path (default ``manifests/<name>.parquet``).
        name: the manifest name when ``out`` is not given (default: the first input's name).
        min_score: drop rows with ``score`` below this.
        min_itm: drop rows with ``itm_score`` (the ITM match probability) below this; needs a
            score table with ``itm_score``.
        max_bank_rank: drop rows with ``bank_rank`` above this.
        rule: ``paper-pretrain`` (bank_rank <= 48) or ``paper-finetune`` (<= 1799), scaled to
            the table's bank size; excludes ``max_bank_rank``.
        dedup: exact de-duplication keys: ``auto`` (``pair`` when most images carry several
            distinct captions, else ``image,caption``), ``image``, ``caption`` (comma-separated),
            ``pair``, or ``none``.
        dedup_threshold: cosine at or above which rows are near duplicates (needs embeddings).
        keep: keep this fraction of the input rows (0 < keep <= 1); excludes ``budget``.
        budget: keep at most this many rows; excludes ``keep``.
        by: ``score``, ``bank_rank`` or ``itm_score``: the order that decides which rows are best.
        max_per_person: keep at most this many rows per ``person_id``.
        quota: ``SOURCE=N`` entries: keep at most N rows of that source.
        truth: the synthetic world's defect sidecar, to measure the selection against.
        split: keep only the rows of these splits (``NAME[,NAME]``); ``None``: every row.
    """

    scores: tuple[str, ...] = ()
    out: str | None = None
    name: str | None = None
    min_score: float | None = None
    min_itm: float | None = None
    max_bank_rank: int | None = None
    rule: str | None = None
    dedup: str = DEDUP_AUTO
    dedup_threshold: float | None = None
    keep: float | None = None
    budget: int | None = None
    by: str = "score"
    max_per_person: int | None = None
    quota: tuple[str, ...] = ()
    truth: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        self.scores = tuple(str(s) for s in self.scores)
        self.quota = tuple(str(q) for q in self.quota)
        if isinstance(self.split, (list, tuple)):
            self.split = ",".join(str(s) for s in self.split)  # the API may name splits as a sequence
        for name in ("out", "truth"):
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name or "\x00" in self.name):
            raise _fail("name", "--name is a plain file name (manifests/NAME.parquet); give a path with --out", self.name)
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise _fail("min_score", "--min-score must be a finite number", self.min_score)
        if self.min_itm is not None and not (0.0 <= self.min_itm <= 1.0):
            raise _fail("min_itm", "--min-itm is a match probability in [0, 1]", self.min_itm)
        if self.max_bank_rank is not None and self.max_bank_rank < 0:
            raise _fail("max_bank_rank", "--max-bank-rank must be 0 or more", self.max_bank_rank)
        if self.rule is not None and self.rule not in PAPER_RULES:
            raise _fail("rule", f"--rule must be one of {', '.join(PAPER_RULES)}", self.rule)
        if self.rule is not None and self.max_bank_rank is not None:
            raise _fail("rule", "--rule and --max-bank-rank both set the bank-rank cut; give one", (self.rule, self.max_bank_rank))
        self.dedup_modes  # validates
        if self.dedup_threshold is not None:
            if not (0.0 < self.dedup_threshold <= 1.0):
                raise _fail("dedup_threshold", "--dedup-threshold is a cosine in (0, 1]", self.dedup_threshold)
            if not self.dedup_modes:
                raise _fail("dedup_threshold", "--dedup-threshold needs --dedup other than none", self.dedup)
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise _fail("keep", "--keep is a fraction of the input rows in (0, 1]", self.keep)
        if self.budget is not None and self.budget < 0:
            raise _fail("budget", "--budget must be 0 or more", self.budget)
        if self.keep is not None and self.budget is not None:
            raise _fail("keep", "--keep and --budget both set the manifest size; give one", (self.keep, self.budget))
        if self.by not in BY:
            raise _fail("by", f"--by must be one of {', '.join(BY)}", self.by)
        if self.max_per_person is not None and self.max_per_person < 1:
            raise _fail("max_per_person", "--max-per-person must be 1 or more", self.max_per_person)
        self.quotas  # validates
        self.splits  # validates

    @property
    def uses_itm(self) -> bool:
        """Whether the selection reads ``itm_score`` (``--by itm_score`` or ``--min-itm``)."""
        return self.by == C.ITM_SCORE or self.min_itm is not None

    @property
    def splits(self) -> tuple[str, ...]:
        """``--split`` as a tuple of split names (empty: every row)."""
        if self.split is None:
            return ()
        parts = [p.strip() for p in str(self.split).split(",")]
        if not all(parts):
            raise _fail("split", "--split takes split names, comma-separated (e.g. train or train,val)", self.split)
        return tuple(dict.fromkeys(parts))

    @property
    def dedup_modes(self) -> tuple[str, ...]:
        """The exact de-duplication passes, in the order they run (``auto`` before it has seen the data: ``image,caption``)."""
        parts = [p.strip() for p in str(self.dedup).split(",") if p.strip()]
        if parts == ["none"]:
            return ()
        if parts == [DEDUP_AUTO]:
            return ("image", "caption")
        bad = [p for p in parts if p not in DEDUP_MODES]
        if bad or not parts:
            raise _fail("dedup", "--dedup takes auto, image, caption (comma-separated), pair, or none", self.dedup)
        if "pair" in parts and len(parts) > 1:
            raise _fail("dedup", "--dedup pair already means image and caption together; give it alone", self.dedup)
        return tuple(m for m in ("image", "caption", "pair") if m in parts)

    @property
    def quotas(self) -> dict[str, int]:
        """``--quota`` entries as ``{source: limit}``."""
        found: dict[str, int] = {}
        for entry in self.quota:
            source, sep, limit = entry.rpartition("=")
            if not sep or not source or not limit.strip().isdigit():
                raise _fail("quota", "--quota takes SOURCE=N with N a whole number", entry)
            if source in found:
                raise _fail("quota", f"--quota gives source {source!r} twice", entry)
            found[source] = int(limit)
        return found


@dataclass
class StepCount:
    """Rows before and after one step."""

    step: str
    rows_in: int
    dropped: int

    @property
    def rows_out(self) -> int:
        return self.rows_in - self.dropped


@dataclass
class Selection:
    """What :func:`select` decided.

    Attributes:
        manifest: the kept rows, all score-table columns, in input order (lazy: the caller
            streams it to disk).
        outcome: one row per input row (``pair_id``, ``source``, ``status``, ``score``,
            ``bank_rank``, ``itm_score`` when the selection uses it, ``step``, ``reason``),
            ``step``/``reason`` null for kept rows.
        steps: rows in and dropped at each step that ran.
        resolved: what each rule resolved to (cuts, targets, search parameters).
        warnings: things the user should know (scaled rules, short budgets, a de-duplication
            that removed most of its input).
        notes: what the selection decided on its own (``--dedup auto``'s choice).
        truth: defect metrics, when measured (see :mod:`tbps.curate.truth`).
        timings: seconds spent in the slow parts (kept out of ``resolved``, which goes into
            the manifest's metadata and must not vary between identical runs).
    """

    manifest: pl.LazyFrame
    outcome: pl.DataFrame
    steps: list[StepCount]
    resolved: dict
    warnings: list[str] = field(default_factory=list)
    truth: dict | None = None
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return self.outcome.height

    @property
    def rows_kept(self) -> int:
        return self.steps[-1].rows_out if self.steps else 0

    def dropped(self) -> pl.DataFrame:
        """The drop table (``columns.DROP_SCHEMA``): every dropped row with its step and reason, in input order."""
        return self.outcome.filter(pl.col(C.STEP).is_not_null()).select(list(C.DROP_SCHEMA.names))

    def quantiles(self, qs: tuple[float, ...] = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0), column: str = C.SCORE) -> dict[str, dict]:
        """Score quantiles of the kept and of the dropped rows (rows without a score left out).

        Args:
            qs: the quantiles.
            column: ``score``, or ``itm_score`` when the selection used it (:attr:`outcome` has it).

        Returns:
            ``{"kept": {"n": ..., "q0.5": ...}, "dropped": {...}}``; quantiles are None when
            a side has no scored rows.
        """
        out = {}
        for side, cond in (("kept", pl.col(C.STEP).is_null()), ("dropped", pl.col(C.STEP).is_not_null())):
            scores = self.outcome.filter(cond & pl.col(column).is_not_nan()).get_column(column).drop_nulls().to_numpy()
            values = np.quantile(scores.astype(np.float64), qs).tolist() if len(scores) else [None] * len(qs)
            out[side] = {"n": int(len(scores)), **{f"q{q:g}": v for q, v in zip(qs, values)}}
        return out


def check_columns(schema: pl.Schema, where: object = None) -> None:
    """Refuse a table without the score-table columns, or with unusable types.

    Args:
        schema: the table's schema.
        where: the file or directory, for the message.

    Raises:
        TbpsError: naming the columns expected and those found.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in schema]
    if missing:
        raise TbpsError(
            f"not a score table: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}; "
            f"found {', '.join(schema.names()) or 'no columns'}",
            path=where,
            hint="score tables are written by `tbps score`",
        )
    for name in REQUIRED_COLUMNS:
        dtype = schema[name]
        if name == C.SCORE:
            ok = dtype.is_float() or dtype.is_integer()
        elif name == C.BANK_RANK:
            ok = dtype.is_integer()
        else:
            ok = dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum)) or dtype == pl.Null
        if not ok:
            raise TbpsError(f"column {name} has type {dtype}, expected {C.SCORE_SCHEMA.field(name).type}", path=where, field=name, value=str(dtype))
    if C.ITM_SCORE in schema and not (schema[C.ITM_SCORE].is_float() or schema[C.ITM_SCORE] == pl.Null):
        raise TbpsError(f"column {C.ITM_SCORE} has type {schema[C.ITM_SCORE]}, expected float", path=where, field=C.ITM_SCORE, value=str(schema[C.ITM_SCORE]))


def standardise(scores: pl.LazyFrame) -> pl.LazyFrame:
    """The score-table columns in schema order and types, optional ones filled with nulls, then any others.

    Columns the schema does not name (``split``, from a ``tbps score`` that carries it, or
    columns of your own) are kept as they are, after the schema's, so the manifest holds every
    column of the score table.

    Args:
        scores: a lazy score table with at least :data:`REQUIRED_COLUMNS`.

    Returns:
        A lazy frame with the columns of ``columns.SCORE_SCHEMA`` (with ``itm_score`` in its
        place when the table has it: ``columns.score_schema``), then the table's other columns.
    """
    schema = scores.collect_schema()
    check_columns(schema)
    target = C.polars_schema(C.score_schema(C.ITM_SCORE in schema))
    return scores.select(
        [
            (pl.col(name) if name in schema else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in target.items()
        ]
        + [pl.col(name) for name in schema.names() if name not in target]
    )


def order_columns(by: str) -> tuple[list[str], list[bool]]:
    """The best-first order: sort columns and their ``descending`` flags for ``--by``."""
    if by == "bank_rank":
        return [C.BANK_RANK, C.SCORE, C.PAIR_ID], [False, True, False]
    if by == C.ITM_SCORE:
        return [C.ITM_SCORE, C.SCORE, C.PAIR_ID], [True, True, False]
    return [C.SCORE, C.BANK_RANK, C.PAIR_ID], [True, False, False]


def scaled_rule(rule: str, bank_size: int) -> int:
    """The bank-rank cut of a paper rule for a bank of ``bank_size`` captions.

    The paper keeps the own caption within the top ``K + 1`` of ``10,001`` scores; a bank of
    ``B`` captions keeps the same share: ``round((K + 1) * (B + 1) / 10001) - 1``, at least 0.

    Args:
        rule: a key of :data:`tbps.curate.layout.PAPER_RULES`.
        bank_size: the captions in the score table's bank.

    Returns:
        The largest ``bank_rank`` kept.
    """
    k = PAPER_RULES[rule]
    return max(0, round((k + 1) * (bank_size + 1) / (PAPER_BANK_SIZE + 1)) - 1)


def keep_target(keep: float, rows_in: int) -> int:
    """``floor(keep * rows_in)``, computed on the decimal value given (0.29 * 100 is 29)."""
    return int(Decimal(repr(float(keep))) * rows_in)


def _sortable(score: np.ndarray) -> np.ndarray:
    """float32 scores as uint64 values in the same order (for one-column integer sorts)."""
    bits = (score.astype(np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # -0.0 becomes 0.0
    negative = (bits >> np.uint64(31)) == 1
    return np.where(negative, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))


def best_first(score: np.ndarray, bank_rank: np.ndarray, pair_id: pl.Series, rows: np.ndarray, by: str,
               itm: np.ndarray | None = None) -> np.ndarray:
    """Rows in best-first order (see the module docstring), ties broken by ``pair_id``.

    One integer sort on a packed 64-bit key (the order-preserving bits of the first two sort
    columns), then a string sort only inside runs of equal keys, so ten million rows cost one
    numeric sort.

    Args:
        score: float32 scores of all rows (input order).
        bank_rank: bank ranks of all rows.
        pair_id: pair ids of all rows.
        rows: the rows to order (indices into the arrays).
        by: ``score``, ``bank_rank`` or ``itm_score``.
        itm: float32 ITM scores of all rows (NaN: none), needed for ``by="itm_score"``.

    Returns:
        ``rows`` reordered, best first.
    """
    high_score_first = np.uint64(0xFFFFFFFF) - _sortable(score[rows])
    rank = (bank_rank[rows].astype(np.int64) + 2**31).astype(np.uint64)  # order-preserving for any int32
    if by == C.ITM_SCORE:
        if itm is None:
            raise TbpsError("--by itm_score needs the itm_score column", field=C.ITM_SCORE)
        key = ((np.uint64(0xFFFFFFFF) - _sortable(itm[rows])) << np.uint64(32)) | high_score_first
    elif by == "score":
        key = (high_score_first << np.uint64(32)) | rank
    else:
        key = (rank << np.uint64(32)) | high_score_first
    o = pl.Series(key).arg_sort().to_numpy()
    ordered, keys = rows[o], key[o]
    same = keys[1:] == keys[:-1]
    if same.any():
        # Runs of equal keys: order each run by pair_id (a run id keeps the runs where they are).
        tied = np.zeros(len(keys), dtype=bool)
        tied[1:] |= same
        tied[:-1] |= same
        at = np.flatnonzero(tied)
        run = np.cumsum(np.concatenate([[True], ~same]))[at]
        sub = pl.DataFrame({"run": run, "row": ordered[at], "pid": pair_id.gather(ordered[at])}).sort(["run", "pid"])
        ordered[at] = sub.get_column("row").to_numpy()
    return ordered


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One 64-bit word from two (for the image-and-caption key)."""
    return a * np.uint64(0x9E3779B97F4A7C15) + (b ^ (b >> np.uint64(29)))


# --- the steps ---------------------------------------------------------------------------


@dataclass
class Context:
    """What a step sees: the rows still kept and the columns it may read.

    Attributes:
        config: the selection parameters.
        narrow: the collected projection of the score table; row ``i`` is input row ``i``.
        pair_id: its ``pair_id`` column.
        score: its ``score`` column (null as NaN).
        bank_rank: its ``bank_rank`` column (null as 0; such rows leave at ``status``).
        itm: its ``itm_score`` column (null as NaN) when the selection uses it, else None.
        rows: the rows still kept, best first (indices into ``narrow``).
        rows_in: every input row.
        base_rows: the rows ``--keep`` is a share of: every input row, or those of ``--split``.
        bank_size: the captions in the table's bank (None: unknown).
        embeddings: the embeddings table, for near de-duplication.
        resolved: what each rule resolved to; a step adds its entry (goes into the manifest).
        warnings: things the user should know; a step appends to them.
        timings: seconds of the slow parts (kept out of ``resolved``).
        say: progress lines.
        notes: what the selection decided on its own.
    """

    config: SelectConfig
    narrow: pl.DataFrame
    pair_id: pl.Series
    score: np.ndarray
    bank_rank: np.ndarray
    rows: np.ndarray
    rows_in: int
    bank_size: int | None
    embeddings: pl.LazyFrame | None
    resolved: dict
    warnings: list[str]
    timings: dict
    say: Callable[[str], None]
    base_rows: int = 0
    notes: list[str] = field(default_factory=list)
    itm: np.ndarray | None = None

    def warn(self, message: str) -> None:
        """A warning for the summary and the record, said on stderr now."""
        self.warnings.append(message)
        self.say(f"warning: {message}")

    def note(self, message: str) -> None:
        """A decision for the summary and the record, said on stderr now."""
        self.notes.append(message)
        self.say(f"note: {message}")


@dataclass
class Drop:
    """The rows one step drops, as positions into :attr:`Context.rows`.

    Attributes:
        at: a boolean mask over ``rows``, or indices into it.
        duplicate_of: de-duplication steps: for each dropped row, in the order ``rows[at]``
            lists them, the position in ``rows`` of the kept row it duplicates (the reason
            becomes ``duplicate-of:<its pair_id>``).
        relabel: ``{reason: positions}`` for dropped rows whose reason is not the step's.
    """

    at: np.ndarray
    duplicate_of: np.ndarray | None = None
    relabel: dict[str, np.ndarray] = field(default_factory=dict)


def _no_columns(_config: SelectConfig) -> list[pl.Expr]:
    return []


@dataclass(frozen=True)
class Step:
    """One selection rule, a row of :data:`STEPS`.

    Attributes:
        name: the ``step`` of the rows it drops (the drop table, the summary, the sidecar).
        reason: the ``reason`` of the rows it drops (``duplicate-of:`` adds the pair_id).
        option: the options that turn it on, for ``--help`` and the README.
        drops: which rows it drops, in a phrase, for ``--help`` and the README.
        enabled: whether a config runs the step.
        run: what it drops of :attr:`Context.rows`; it records what it resolved to in
            :attr:`Context.resolved` (and any warning).
        describe: what the step resolved to, in a phrase: ``describe(resolved, config)``.
        columns: the columns it reads beyond ids, source, status, score and bank rank.
    """

    name: str
    reason: str
    option: str
    drops: str
    enabled: Callable[[SelectConfig], bool]
    run: Callable[[Context], Drop]
    describe: Callable[[dict, SelectConfig], str]
    columns: Callable[[SelectConfig], list[pl.Expr]] = _no_columns


def _split(ctx: Context) -> Drop:
    wanted = ctx.config.splits
    split = ctx.narrow.get_column(C.SPLIT).cast(pl.String)
    counts = dict(split.value_counts().drop_nulls().iter_rows())
    missing = [s for s in wanted if s not in counts]
    if missing:
        found = ", ".join(f"{k} ({v:,} rows)" for k, v in sorted(counts.items())) or "none: the dataset has no splits"
        raise TbpsError(f"no rows of split {missing[0]!r} in the score table", field="split", value=ctx.config.split, hint=f"splits in the table: {found}")
    keep = split.is_in(list(wanted)).fill_null(False).to_numpy()[ctx.rows]
    ctx.base_rows = int(keep.sum())
    ctx.resolved["split"] = {"splits": list(wanted), "rows": ctx.base_rows, "rows_per_split": {k: int(counts[k]) for k in wanted}}
    return Drop(~keep)


def _status(ctx: Context) -> Drop:
    ok = (ctx.narrow.get_column(C.STATUS) == C.STATUS_OK).fill_null(False).to_numpy()[ctx.rows]
    usable = ~np.isnan(ctx.score) & ctx.narrow.get_column(C.BANK_RANK).is_not_null().to_numpy()
    if ctx.itm is not None:
        usable &= ~np.isnan(ctx.itm)  # --by itm_score / --min-itm cannot place a row without one
    scored = usable[ctx.rows]
    return Drop(~(ok & scored), relabel={REASON_NO_SCORE: np.flatnonzero(ok & ~scored)})


def _min_score(ctx: Context) -> Drop:
    ctx.resolved["min_score"] = ctx.config.min_score
    return Drop(ctx.score[ctx.rows] < ctx.config.min_score)


def _min_itm(ctx: Context) -> Drop:
    ctx.resolved["min_itm"] = ctx.config.min_itm
    return Drop(ctx.itm[ctx.rows] < ctx.config.min_itm)


def _bank_rank(ctx: Context) -> Drop:
    cut = _bank_rank_cut(ctx.config, ctx.bank_size, ctx.warnings)
    ctx.resolved["bank_rank"] = cut
    return Drop(ctx.bank_rank[ctx.rows] > cut["max_bank_rank"])


def _describe_bank_rank(resolved: dict, _config: SelectConfig) -> str:
    cut = resolved["bank_rank"]
    bank = f", bank {cut['bank_size']:,}" if cut.get("bank_size") else ""
    return f"bank_rank > {cut['max_bank_rank']:,} ({cut['option']}{bank})"


# What keeps the rows an exact pass removed, for its warning.
_KEEP_HINT = {
    "image": "If the images carry several captions each, --dedup pair keeps every distinct caption",
    "caption": "If different images share short captions, --dedup image or pair keeps them",
    "pair": "--dedup none keeps them",
}

_IMAGE_KEY = "_image_key"
_CAPTION_KEY = "_caption_key"
_CAPTION_RAW = "_caption_raw"  # the caption's hash as written, to count captions per image
_NORMALISED = "_normalised_caption"


def _key_columns(key: str) -> list[pl.Expr]:
    """An exact-dedup key as two 64-bit words plus a validity flag (``{key}_0``, ``_1``, ``_ok``)."""
    if key == _IMAGE_KEY:
        # The content hash, hashed again to 128 bits: 16 bytes a row instead of about 48.
        words = [pl.col(C.IMAGE_HASH).hash(seed=s).alias(f"{key}_{s}") for s in (0, 1)]
        return [*words, pl.col(C.IMAGE_HASH).is_not_null().alias(f"{key}_ok")]
    return [*D.caption_key(pl.col(_NORMALISED), key), pl.col(C.CAPTION).is_not_null().alias(f"{key}_ok")]


def _exact(mode: str, keys: tuple[str, ...], option: str, same: str, drops: str) -> Step:
    """The exact de-duplication step of one ``--dedup`` mode."""

    def run(ctx: Context) -> Drop:
        ctx.say(f"exact de-duplication by {mode}")
        gone, first = D.exact_duplicates(*_exact_key(ctx.narrow, keys, ctx.rows))
        dedup = ctx.resolved.setdefault("dedup", {})
        dedup.setdefault("exact", []).append(mode)
        dedup.setdefault("caption_normalisation", D.NORMALISATION)
        n = len(ctx.rows)
        if n and len(gone) > MOST_REMOVED * n:
            groups = np.unique(first, return_counts=True)[1] + 1  # each kept row and its duplicates
            ctx.warn(
                f"exact-{mode} removed {len(gone):,} of its {n:,} input rows ({len(gone) / n:.0%}): {same} (exact match), "
                f"{n - len(gone):,} distinct left; the largest group holds {int(groups.max()):,} rows, the median "
                f"{int(np.median(groups)):,}. {_KEEP_HINT[mode]}"
            )
        return Drop(gone, duplicate_of=first)

    return Step(
        name=f"exact-{mode}",
        reason=f"{REASON_DUPLICATE}<pair_id>",
        option=option,
        drops=drops,
        enabled=lambda config: mode in config.dedup_modes,
        run=run,
        describe=lambda _resolved, _config: same,
        columns=lambda _config: [e for key in keys for e in _key_columns(key)],
    )


def _near(ctx: Context) -> Drop:
    config = ctx.config
    ctx.say(f"near de-duplication at cosine >= {config.dedup_threshold}")
    near, stats = _near_duplicates(ctx.pair_id.gather(ctx.rows), ctx.embeddings, config, ctx.say)
    for col in (C.IMAGE_EMB, C.TEXT_EMB):
        if "_seconds" in stats.get(col, {}):
            ctx.timings[f"near_{col}_s"] = stats[col].pop("_seconds")
    ctx.resolved.setdefault("dedup", {})["near"] = {"threshold": config.dedup_threshold, **stats}
    hit = np.flatnonzero(near >= 0)
    if "nearest_neighbour" in stats:
        n = len(ctx.rows)
        spread = "; ".join(
            f"{col}: " + " / ".join(f"{k} {v:.3f}" for k, v in nn.items() if k.startswith(("p", "median")))
            + f", {nn['share_at_threshold']:.0%} at or above it"
            for col, nn in stats["nearest_neighbour"].items()
        )
        sampled = next(iter(stats["nearest_neighbour"].values()))
        ctx.warn(
            f"near-duplicate removed {len(hit):,} of its {n:,} input rows ({len(hit) / n:.0%}) at --dedup-threshold "
            f"{config.dedup_threshold:g}; nearest-neighbour cosine of {sampled['queries']:,} sampled rows (against "
            f"{sampled['reference']:,}): {spread}. A threshold closer to 1 removes fewer"
        )
    return Drop(hit, duplicate_of=near[hit])


def _per_person(ctx: Context) -> Drop:
    cap = ctx.config.max_per_person
    ctx.resolved["max_per_person"] = cap
    persons = ctx.narrow.get_column(C.PERSON_ID).gather(ctx.rows)
    missing = persons.null_count()
    ctx.resolved["per_person"] = {"rows_without_person_id": int(missing)}
    if missing and missing == len(persons):
        ctx.warn(f"--max-per-person {cap}: none of the {missing:,} rows has a person id (MALS has none), so it caps nothing")
    elif missing:
        ctx.note(f"--max-per-person {cap}: {missing:,} of {len(persons):,} rows have no person id and are not capped")
    limit = pl.when(pl.col("key").is_not_null()).then(pl.lit(cap, dtype=pl.Int64))  # no person id: not capped (nulls are no one person)
    return Drop(_past_limit(persons, limit))


def _quota(ctx: Context) -> Drop:
    quotas = ctx.config.quotas
    limit = pl.col("key").replace_strict(quotas, default=None, return_dtype=pl.Int64)  # no quota: not capped
    at = _past_limit(ctx.narrow.get_column(C.SOURCE).gather(ctx.rows), limit)
    absent = sorted(set(quotas) - set(ctx.narrow.get_column(C.SOURCE).unique().drop_nulls().to_list()))
    if absent:
        ctx.warnings.append(f"--quota names source(s) not in the input: {', '.join(absent)}")
    ctx.resolved["quota"] = quotas
    return Drop(at)


def _budget(ctx: Context) -> Drop:
    config, rows = ctx.config, ctx.rows
    target = keep_target(config.keep, ctx.base_rows) if config.keep is not None else config.budget
    values = {"score": ctx.score, "bank_rank": ctx.bank_rank, C.ITM_SCORE: ctx.itm}[config.by]
    ctx.resolved["budget"] = _budget_resolved(config, values, rows, target, ctx.base_rows, ctx.warnings)
    return Drop(np.arange(min(target, len(rows)), len(rows)))


def _describe_budget(resolved: dict, _config: SelectConfig) -> str:
    b = resolved["budget"]
    key = b["by"]
    cutoff = b.get(f"{key}_cutoff")
    cut_text = ""
    if cutoff is not None:
        shown = f"{cutoff:.4f}" if isinstance(cutoff, float) else f"{cutoff:,}"  # a score, or a bank rank
        cut_text = f"; {key} {'<=' if key == 'bank_rank' else '>='} {shown}"
    if "keep" in b:
        return f"--keep {b['keep']:g} of {b['rows_in']:,} {b['of']} = {b['target_rows']:,} rows{cut_text}"
    return f"--budget {b['budget']:,} rows{cut_text}"


_RULE_CUTS = " / ".join(str(k) for k in PAPER_RULES.values())

# The steps, in the order they run. A dropped row's ``step`` is the name of the one that dropped it.
STEPS: tuple[Step, ...] = (
    Step(
        name=SPLIT_STEP,
        reason=SPLIT_STEP,
        option="--split NAME[,NAME]",
        drops="rows of the other splits (the score table's split column)",
        enabled=lambda config: bool(config.splits),
        run=_split,
        describe=lambda resolved, _config: f"split not {' or '.join(resolved['split']['splits'])}",
        columns=lambda _config: [pl.col(C.SPLIT)],
    ),
    Step(
        name="status",
        reason="status",
        option="always",
        drops=f"rows whose status is not ok, and ok rows without a score or bank_rank (reason {REASON_NO_SCORE})",
        enabled=lambda _config: True,
        run=_status,
        describe=lambda _resolved, _config: "status not ok, or no score",
    ),
    Step(
        name="min-score",
        reason="min-score",
        option="--min-score S",
        drops="rows with score < S",
        enabled=lambda config: config.min_score is not None,
        run=_min_score,
        describe=lambda resolved, _config: f"score < {resolved['min_score']:g}",
    ),
    Step(
        name="min-itm",
        reason="min-itm",
        option="--min-itm P",
        drops=f"rows with {C.ITM_SCORE} < P (the ITM head's match probability; the table must have it)",
        enabled=lambda config: config.min_itm is not None,
        run=_min_itm,
        describe=lambda resolved, _config: f"{C.ITM_SCORE} < {resolved['min_itm']:g}",
        columns=lambda _config: [pl.col(C.ITM_SCORE)],
    ),
    Step(
        name="bank-rank",
        reason="bank-rank",
        option=f"--max-bank-rank K, or --rule {' / '.join(PAPER_RULES)}",
        drops=f"rows with bank_rank > K (the rules: K = {_RULE_CUTS} for a {PAPER_BANK_SIZE:,}-caption bank, scaled to other sizes)",
        enabled=lambda config: config.max_bank_rank is not None or config.rule is not None,
        run=_bank_rank,
        describe=_describe_bank_rank,
    ),
    _exact("image", (_IMAGE_KEY,), "--dedup image; the default auto on one-caption-per-image data", "same image_hash",
           "rows with the image_hash of a better row"),
    _exact("caption", (_CAPTION_KEY,), "--dedup caption; the default auto on one-caption-per-image data", "same normalised caption",
           "rows with the normalised caption of a better row"),
    _exact("pair", (_IMAGE_KEY, _CAPTION_KEY), "--dedup pair; the default auto when most images carry several captions",
           "same image_hash and caption", "rows with the image_hash and the caption of a better row"),
    Step(
        name="near-duplicate",
        reason=f"{REASON_DUPLICATE}<pair_id>",
        option="--dedup-threshold T",
        drops="rows whose image or caption embedding (both, with --dedup pair) has cosine >= T with a better kept row",
        enabled=lambda config: config.dedup_threshold is not None,
        run=_near,
        describe=lambda resolved, config: f"cosine >= {resolved['dedup']['near']['threshold']:g} ({','.join(resolved['dedup'].get('modes', config.dedup_modes))})",
    ),
    Step(
        name="per-person",
        reason="per-person",
        option="--max-per-person N",
        drops="rows past the best N of their person_id",
        enabled=lambda config: config.max_per_person is not None,
        run=_per_person,
        describe=lambda resolved, _config: f"more than {resolved['max_per_person']:,} per person_id",
        columns=lambda _config: [pl.col(C.PERSON_ID)],
    ),
    Step(
        name="quota",
        reason="quota",
        option="--quota SOURCE=N",
        drops="rows past the best N of that source",
        enabled=lambda config: bool(config.quota),
        run=_quota,
        describe=lambda resolved, _config: ", ".join(f"{k}<={v:,}" for k, v in resolved["quota"].items()),
    ),
    Step(
        name="budget",
        reason="budget",
        option="--keep F, or --budget N",
        drops="rows past the best floor(F x every input row, or every row of --split), or past the best N",
        enabled=lambda config: config.keep is not None or config.budget is not None,
        run=_budget,
        describe=_describe_budget,
    ),
)
STEPS_BY_NAME = {step.name: step for step in STEPS}
_CODE = {step.name: k for k, step in enumerate(STEPS, start=1)}  # a row's step in a uint8 (0: kept)


def select(
    scores: pl.LazyFrame,
    config: SelectConfig,
    *,
    embeddings: pl.LazyFrame | None = None,
    bank_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Selection:
    """Select the training subset of a score table (no file I/O beyond the lazy frames given).

    Runs the enabled entries of :data:`STEPS` in order.

    Args:
        scores: the score table (``columns.SCORE_SCHEMA``; optional columns may be missing).
        config: the selection parameters.
        embeddings: ``pair_id``, ``image_emb``, ``text_emb`` (``columns.embedding_schema``), needed
            for ``dedup_threshold``.
        bank_size: the captions in the table's bank, for scaling ``rule`` (None: unknown,
            assumed 10,000 with a warning).
        log: called with progress lines.

    Returns:
        A :class:`Selection`; its manifest and outcome keep the input row order.

    Raises:
        TbpsError: missing columns (``itm_score`` for ``--by itm_score`` / ``--min-itm``), an
            empty table, duplicate ``pair_id``s, missing embeddings.
    """
    say = log or (lambda _msg: None)
    if config.dedup_threshold is not None and embeddings is None:
        raise TbpsError(
            "--dedup-threshold needs the embeddings `tbps score` writes next to the score table, and there are none",
            field="dedup_threshold",
            hint="pass a `tbps score` output directory, or drop --dedup-threshold",
        )
    if config.splits and C.SPLIT not in scores.collect_schema():
        raise TbpsError(
            "--split: the score table has no split column (it was written by a tbps score that did not carry splits)",
            field="split",
            value=config.split,
            hint="Score the dataset again to select by split, or drop --split",
        )
    if config.uses_itm and C.ITM_SCORE not in scores.collect_schema():
        raise TbpsError(
            f"{itm_options(config)}: the score table has no {C.ITM_SCORE} column (its model has no image-text matching head)",
            field=C.ITM_SCORE,
            hint=ITM_HINT,
        )
    steps = [step for step in STEPS if step.enabled(config)]
    lf = standardise(scores).with_row_index(_ROW)
    cols = _narrow_columns(config, steps)
    if any(_NORMALISED in e.meta.root_names() for e in cols):
        with_keys = lf.with_columns(D.normalise_caption(pl.col(C.CAPTION)).alias(_NORMALISED))  # once for both key words
    else:
        with_keys = lf
    say("reading the score table")
    narrow = with_keys.select(cols).collect(engine="streaming")
    rows_in = narrow.height
    if rows_in == 0:
        raise TbpsError("the score table has no rows", hint="check the inputs: nothing to select from")
    if not narrow.get_column(_ROW).is_sorted():
        narrow = narrow.sort(_ROW)  # row i of the arrays below must be input row i
    pair_id = narrow.get_column(C.PAIR_ID)
    _check_pair_ids(narrow, pair_id)
    score = narrow.get_column(C.SCORE).to_numpy()
    bank_rank = narrow.get_column(C.BANK_RANK).fill_null(0).to_numpy()
    itm = narrow.get_column(C.ITM_SCORE).cast(pl.Float32).fill_null(np.nan).to_numpy() if config.uses_itm else None
    ctx = Context(
        config=config, narrow=narrow, pair_id=pair_id, score=score, bank_rank=bank_rank, itm=itm,
        # Best first from the start: one total order, so dropping rows keeps the rest in it.
        rows=best_first(score, bank_rank, pair_id, np.arange(rows_in), config.by, itm=itm),
        rows_in=rows_in, bank_size=bank_size, embeddings=embeddings,
        resolved={"order": dict(zip(*order_columns(config.by))), "scores_used": scores_used(config)},
        warnings=[], timings={}, say=say, base_rows=rows_in,
    )
    if "image" in config.dedup_modes:
        ctx.config = _resolve_dedup(ctx)
        steps = [step for step in STEPS if step.enabled(ctx.config)]
    # Row-level results in input order: the code of the step that dropped each row (0: kept).
    code = np.zeros(rows_in, dtype=np.uint8)
    dup_of = np.full(rows_in, -1, dtype=np.int64)
    relabelled: list[tuple[np.ndarray, str]] = []
    counts = []
    for step in steps:
        rows, drop = ctx.rows, step.run(ctx)  # each step sees only what the ones before it kept
        mask = np.zeros(len(rows), dtype=bool)
        mask[drop.at] = True
        code[rows[mask]] = _CODE[step.name]
        if drop.duplicate_of is not None:
            dup_of[rows[drop.at]] = rows[drop.duplicate_of]
        relabelled += [(rows[at], reason) for reason, at in drop.relabel.items() if len(at)]
        counts.append(StepCount(step.name, len(rows), int(mask.sum())))
        ctx.rows = rows[~mask]

    if len(ctx.rows) == 0:
        ctx.warnings.append("no row was kept: the manifest is empty")
    outcome = _outcome(narrow, code, dup_of, relabelled)
    kept = pl.Series(_ROW, np.flatnonzero(code == 0), dtype=pl.get_index_type())
    manifest = lf.filter(pl.col(_ROW).is_in(kept.implode())).drop(_ROW)
    return Selection(manifest=manifest, outcome=outcome, steps=counts, resolved=ctx.resolved, warnings=ctx.warnings, timings=ctx.timings,
                     notes=ctx.notes)


ITM_HINT = "score with a model that has a matching head (tbps score --model with BLIP / BLIP-2, or a run trained with --itm-head), or order and cut by score"

# The column each threshold step compares with its option's value (for the provenance).
THRESHOLD_COLUMNS = {"min-score": C.SCORE, "min-itm": C.ITM_SCORE, "bank-rank": C.BANK_RANK}


def itm_options(config: SelectConfig) -> str:
    """The options that asked for ``itm_score``, as the user wrote them."""
    asked = ([f"--by {C.ITM_SCORE}"] if config.by == C.ITM_SCORE else []) + ([f"--min-itm {config.min_itm:g}"] if config.min_itm is not None else [])
    return " and ".join(asked)


def scores_used(config: SelectConfig) -> dict:
    """Which score ordered the rows and which column each threshold of ``config`` applied to (the provenance's ``scores_used``).

    Returns:
        ``{"by": ..., "order": [[column, "desc" | "asc"], ...], "thresholds": {step: {"column": ..., "value": ...}}}``;
        the order is also what the best-N steps (dedup, per-person, quota, budget) keep by.
    """
    cols, desc = order_columns(config.by)
    values = {"min-score": config.min_score, "min-itm": config.min_itm,
              "bank-rank": config.max_bank_rank if config.max_bank_rank is not None else (f"--rule {config.rule}" if config.rule else None)}
    return {
        "by": config.by,
        "order": [[c, "desc" if d else "asc"] for c, d in zip(cols, desc)],
        "thresholds": {step: {"column": THRESHOLD_COLUMNS[step], "value": v} for step, v in values.items() if v is not None},
    }


def _captions_per_image(narrow: pl.DataFrame) -> tuple[int, int]:
    """(images, images with several distinct captions) among the ``ok`` rows with an image hash."""
    caption = _CAPTION_KEY if f"{_CAPTION_KEY}_0" in narrow.columns else _CAPTION_RAW
    usable = (pl.col(C.STATUS) == C.STATUS_OK) & pl.col(f"{_IMAGE_KEY}_ok") & pl.col(f"{caption}_ok")
    per_image = (
        narrow.lazy().filter(usable.fill_null(False))
        .group_by(f"{_IMAGE_KEY}_0", f"{_IMAGE_KEY}_1")
        .agg(pl.col(f"{caption}_0").n_unique().alias("captions"))
        .select(pl.len().alias("images"), (pl.col("captions") > 1).sum().alias("several"))
        .collect()
    )
    return int(per_image["images"][0]), int(per_image["several"][0] or 0)


def _resolve_dedup(ctx: Context) -> SelectConfig:
    """What ``--dedup auto`` means for this data, and a warning for an ``image`` pass on multi-caption data.

    Returns:
        The config the steps run with: ``--dedup pair`` when ``auto`` meets data whose images
        mostly carry several distinct captions, else the config as given.
    """
    config = ctx.config
    images, several = _captions_per_image(ctx.narrow)
    multi = images > 0 and several > MULTI_CAPTION_SHARE * images
    share = f"{several:,} of {images:,} images ({several / images:.0%})" if images else "no image"
    auto = str(config.dedup).strip() == DEDUP_AUTO
    chosen = "pair" if (auto and multi) else ",".join(config.dedup_modes)
    ctx.resolved.setdefault("dedup", {}).update(
        {"option": config.dedup, "modes": [chosen] if chosen == "pair" else list(config.dedup_modes),
         "images": images, "images_with_several_captions": several}
    )
    if auto and multi:
        ctx.note(
            f"--dedup auto: {share} carry several distinct captions, so exact duplicates are rows whose image and caption "
            f"both repeat (exact-pair); --dedup image,caption would keep one caption per image"
        )
        return replace(config, dedup="pair")
    if not auto and multi:
        ctx.warn(
            f"--dedup {config.dedup}: {share} carry several distinct captions, and exact-image keeps one caption of each "
            f"image; --dedup pair (or the default, auto) keeps every distinct caption"
        )
    return config


def _narrow_columns(config: SelectConfig, steps: list[Step]) -> list[pl.Expr]:
    """The columns the enabled steps need, each once (and a caption hash where an image pass needs to count captions)."""
    cols = [pl.col(_ROW), pl.col(C.PAIR_ID), pl.col(C.SOURCE), pl.col(C.STATUS), pl.col(C.SCORE), pl.col(C.BANK_RANK)]
    if config.uses_itm:
        cols.append(pl.col(C.ITM_SCORE))
    for step in steps:
        cols += step.columns(config)
    if "image" in config.dedup_modes and "caption" not in config.dedup_modes:
        cols += [pl.col(C.CAPTION).hash(seed=0).alias(f"{_CAPTION_RAW}_0"), pl.col(C.CAPTION).is_not_null().alias(f"{_CAPTION_RAW}_ok")]
    unique: dict[str, pl.Expr] = {}
    for e in cols:
        unique.setdefault(e.meta.output_name(), e)
    return list(unique.values())


def _past_limit(keys: pl.Series, limit: pl.Expr) -> np.ndarray:
    """Positions of ``keys`` (best first) past the first ``limit`` of their key; a null limit caps nothing."""
    sub = pl.DataFrame({"key": keys}).with_row_index("at")
    over = sub.filter(limit.is_not_null() & (pl.int_range(pl.len()).over("key") >= limit))
    return over.get_column("at").to_numpy()


def _check_pair_ids(narrow: pl.DataFrame, pair_id: pl.Series) -> None:
    """Refuse null or repeated pair ids (a 64-bit hash screens; strings confirm)."""
    if pair_id.null_count():
        raise TbpsError("pair_id is null", field=C.PAIR_ID, record=int(pair_id.is_null().arg_true()[0]))
    if pair_id.hash().n_unique() < len(pair_id) and pair_id.n_unique() < len(pair_id):
        dup = pair_id.filter(pair_id.is_duplicated()).sort()
        raise TbpsError(
            f"pair_id is not unique across the inputs ({dup.n_unique()} ids repeat)",
            field=C.PAIR_ID,
            value=dup[0],
            hint="the same pairs read twice, or tables whose ids collide (each JSON file numbers its records from 0:0): "
            "score several JSON files together as one dataset (a folder or a quoted pattern: their ids carry the file's stem), "
            "or select the tables separately",
        )


def _exact_key(narrow: pl.DataFrame, keys: tuple[str, ...], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two 64-bit key words and validity of ``rows`` for one exact-dedup pass (one key, or two mixed)."""
    def part(prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # numpy gathers: the hash columns convert without a copy, and fancy indexing beats
        # a Polars gather by an int64 index Series several times over on ten million rows.
        return tuple(narrow.get_column(f"{prefix}_{suffix}").to_numpy()[rows] for suffix in ("0", "1", "ok"))

    if len(keys) == 1:
        return part(keys[0])
    (a0, a1, aok), (b0, b1, bok) = (part(key) for key in keys)
    return _mix(a0, b0), _mix(a1, b1), aok & bok


def _bank_rank_cut(config: SelectConfig, bank_size: int | None, warnings: list[str]) -> dict:
    """The resolved bank-rank cut of ``--max-bank-rank`` or ``--rule``."""
    if config.max_bank_rank is not None:
        return {"option": "--max-bank-rank", "max_bank_rank": config.max_bank_rank, "bank_size": bank_size}
    paper = PAPER_RULES[config.rule]
    if bank_size is None:
        warnings.append(
            f"--rule {config.rule}: the score table does not record its bank size; assuming the paper's "
            f"{PAPER_BANK_SIZE:,} captions (bank_rank <= {paper})"
        )
        k = paper
    elif bank_size != PAPER_BANK_SIZE:
        k = scaled_rule(config.rule, bank_size)
        warnings.append(
            f"--rule {config.rule} is defined for a {PAPER_BANK_SIZE:,}-caption bank (bank_rank <= {paper}); "
            f"this table's bank has {bank_size:,} captions, so the rule is scaled to bank_rank <= {k}"
        )
    else:
        k = paper
    return {"option": f"--rule {config.rule}", "paper_max_bank_rank": paper, "paper_bank_size": PAPER_BANK_SIZE, "bank_size": bank_size, "max_bank_rank": k}


def _budget_resolved(config: SelectConfig, values: np.ndarray, rows: np.ndarray, target: int, rows_in: int, warnings: list[str]) -> dict:
    """What ``--keep`` / ``--budget`` became: the row target and the cut-off it amounts to (in the ``--by`` column's ``values``)."""
    kept = rows[:target]
    key = config.by
    info: dict = {"by": config.by, "target_rows": int(target), "rows_available": int(len(rows)), "rows_kept": int(len(kept))}
    of = f"rows of split {config.split}" if config.splits else "input rows"
    if config.keep is not None:
        info.update({"keep": config.keep, "of": of, "rows_in": rows_in})
    else:
        info["budget"] = config.budget
    info[f"{key}_cutoff"] = values[kept[-1]].item() if len(kept) else None
    info[f"first_dropped_{key}"] = values[rows[target]].item() if len(rows) > target else None
    if len(rows) < target:
        what = f"--keep {config.keep} ({target:,} of {rows_in:,} {of})" if config.keep is not None else f"--budget {target:,}"
        warnings.append(f"{what}: only {len(rows):,} rows were left after the earlier steps; all are kept")
    return info


def _near_duplicates(ids: pl.Series, embeddings: pl.LazyFrame, config: SelectConfig, say) -> tuple[np.ndarray, dict]:
    """Greedy near-duplicate resolution of the rows with ``ids`` (best first).

    Returns:
        ``dup_of`` over the rows (``-1`` kept, else the index of the row it duplicates) and the
        search statistics.
    """
    schema = embeddings.collect_schema()
    missing = [c for c in (C.PAIR_ID, C.IMAGE_EMB, C.TEXT_EMB) if c not in schema]
    if missing:
        raise TbpsError(
            f"not an embeddings table: missing column(s) {', '.join(missing)}; expected {C.PAIR_ID}, {C.IMAGE_EMB}, {C.TEXT_EMB}; "
            f"found {', '.join(schema.names())}",
            field=missing[0],
        )
    modes = config.dedup_modes
    need = [C.IMAGE_EMB] if modes == ("image",) else [C.TEXT_EMB] if modes == ("caption",) else [C.IMAGE_EMB, C.TEXT_EMB]
    frame = pl.DataFrame({C.PAIR_ID: ids, "_k": np.arange(len(ids))})
    emb = frame.lazy().join(embeddings.select(C.PAIR_ID, *need), on=C.PAIR_ID, how="left").sort("_k").collect()
    if emb.height != frame.height:
        raise TbpsError("the embeddings table repeats pair_ids", field=C.PAIR_ID)
    lacking = emb.filter(pl.any_horizontal([pl.col(c).is_null() for c in need]))
    if lacking.height:
        raise TbpsError(
            f"{lacking.height:,} rows to de-duplicate have no embeddings",
            field=need[0],
            record=lacking.get_column(C.PAIR_ID)[0],
            hint="the embeddings must come from the same `tbps score` run as the scores",
        )
    n, t = len(ids), config.dedup_threshold
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stats: dict = {}
    for col in need:
        say(f"searching {col} for near duplicates among {n:,} rows")
        i, j, st = D.near_duplicate_pairs(emb.get_column(col).to_numpy(), t)
        found[col] = (i, j)
        seconds = st.pop("seconds", None)  # timings go to the sidecar, never into the manifest
        stats[col] = {**st, "pairs": int(len(i)), **({"_seconds": seconds} if seconds else {})}
    if modes == ("pair",):
        # Both embeddings must agree: keep the image pairs whose captions are close too.
        i, j = found[C.IMAGE_EMB]
        text = D.as_unit_float32(emb.get_column(C.TEXT_EMB).to_numpy())
        both = np.einsum("ij,ij->i", text[i], text[j]) >= t if len(i) else np.zeros(0, dtype=bool)
        i, j = i[both], j[both]
        stats["pairs_image_and_caption"] = int(len(i))
    else:
        i = np.concatenate([p[0] for p in found.values()])
        j = np.concatenate([p[1] for p in found.values()])
    dup_of = D.greedy_keep(n, i, j)
    if (dup_of >= 0).sum() > MOST_REMOVED * n:
        # Most rows went: measure how close the rows are to each other, for the warning.
        sets = {C.IMAGE_EMB: [C.IMAGE_EMB], C.TEXT_EMB: [C.TEXT_EMB]} if modes != ("pair",) else {"image_and_text": [C.IMAGE_EMB, C.TEXT_EMB]}
        stats["nearest_neighbour"] = {
            name: D.nearest_similarity_summary([emb.get_column(c).to_numpy() for c in cols], t)
            for name, cols in sets.items() if all(c in need for c in cols)
        }
    return dup_of, stats


def _outcome(narrow: pl.DataFrame, code: np.ndarray, dup_of: np.ndarray, relabelled: list[tuple[np.ndarray, str]]) -> pl.DataFrame:
    """One row per input row, in input order: ids, score (and itm_score when used), and the step and reason of dropped rows."""
    codes = pl.Series("_code", code)
    reason = codes.replace_strict({_CODE[s.name]: s.reason for s in STEPS}, default=None, return_dtype=pl.String)
    # Only duplicates and relabelled rows get a reason of their own; everything else is one string per step.
    for rows, text in relabelled:
        reason = reason.scatter(rows, text)
    dups = np.flatnonzero(dup_of >= 0)
    if len(dups):
        named = narrow.get_column(C.PAIR_ID).gather(dup_of[dups])
        reason = reason.scatter(dups, (REASON_DUPLICATE + named).rename(reason.name))
    itm = [pl.col(C.ITM_SCORE).cast(pl.Float32)] if C.ITM_SCORE in narrow.columns else []
    return narrow.select(C.PAIR_ID, C.SOURCE, C.STATUS, C.SCORE, C.BANK_RANK, *itm).with_columns(
        codes.replace_strict({_CODE[s.name]: s.name for s in STEPS}, default=None, return_dtype=pl.String).alias(C.STEP),
        reason.alias(C.REASON),
    )
