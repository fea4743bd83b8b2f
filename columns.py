"""Column names and the Parquet schemas of every table tbps reads or writes.

A schema change is one edit here. Each stage is table -> table:

pair table (readers)  -> score table (``tbps score``) -> manifest (``tbps select``)

Pair table (what every reader returns)
    pair_id      str    unique within a dataset: "<record>:<caption>" for JSON formats
                        (caption index 0 for one-caption records; "<file stem>:<record>:<caption>"
                        for several JSON files read as one), "<row>:0" for tables,
                        the relative path for image folders, unless an id column is given
    image_path   str    resolved absolute path; null when the row was refused
    caption      str
    person_id    str    null when the dataset has none (APTM/MALS: none)
    split        str    "train" / "val" / "test" or null
    source       str    dataset name (file stem or format name; each file's stem for several JSON files)
    status       str    "ok", or the kind of problem (see STATUS_*)
    error        str    human-readable reason, null when ok

Score table (``tbps score``): pair table columns (``split`` null in tables written before it was
carried; readers fill it in), plus
    image_hash   str    blake2b-128 hex of the image file's bytes (exact de-duplication)
    score        f32    cosine of the L2-normalised image and caption embeddings
    bank_rank    i32    bank captions scoring strictly higher against the image
    bank_percentile f32 bank_rank / bank size * 100 (0 = the own caption beats every bank caption)
    truncated    bool   the caption was longer than the model's context
    itm_score    f32    only when the model has an image-text matching head (BLIP, BLIP-2, a tbps
                        run trained with --itm-head): the head's match probability of the pair
                        (bank_rank stays on the ITC cosine: a cross-encoder over a 10,000-caption
                        bank would take 10,000 forward passes per image)

Embeddings (next to the score table, ``embeddings/``)
    pair_id      str
    image_emb    fixed_size_list<float16>[D], L2-normalised (BLIP-2: [Q * D], its Q query
                        embeddings, each L2-normalised; the score is the largest of their cosines)
    text_emb     fixed_size_list<float16>[D], L2-normalised

Manifest (``tbps select``): score table columns of the kept rows (``split`` and ``person_id``
among them, and any other column the score table has), in input order.

Drop table (``tbps select``, ``<manifest stem>.dropped.parquet``): one row per dropped row, in input order
    pair_id, source, status, score, bank_rank
    step         str    the selection step that dropped the row (``tbps.curate.select.STEPS``)
    reason       str    split / status / no-score / min-score / bank-rank / duplicate-of:<pair_id> /
                        per-person / quota / budget

Truth sidecar (``tbps synth``): one row per pool pair
    pair_id, defect (DEFECT_*), detail, duplicate_of
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

PAIR_ID = "pair_id"
IMAGE_PATH = "image_path"
CAPTION = "caption"
PERSON_ID = "person_id"
SPLIT = "split"
SOURCE = "source"
STATUS = "status"
ERROR = "error"

IMAGE_HASH = "image_hash"
SCORE = "score"
BANK_RANK = "bank_rank"
BANK_PERCENTILE = "bank_percentile"
TRUNCATED = "truncated"
ITM_SCORE = "itm_score"

IMAGE_EMB = "image_emb"
TEXT_EMB = "text_emb"

STEP = "step"
REASON = "reason"

DEFECT = "defect"
DETAIL = "detail"
DUPLICATE_OF = "duplicate_of"

# Row statuses. "ok" rows are usable; the others say what went wrong with the row.
STATUS_OK = "ok"
STATUS_PATH_OUTSIDE_ROOT = "path-outside-root"
STATUS_MISSING_IMAGE = "missing-image"
STATUS_EMPTY_FILE = "empty-file"
STATUS_BAD_IMAGE = "bad-image"
STATUS_DECOMPRESSION_BOMB = "decompression-bomb"
STATUS_EMPTY_CAPTION = "empty-caption"
STATUS_BAD_RECORD = "bad-record"
STATUS_DOWNLOAD_FAILED = "download-failed"  # img2dataset could not download the sample (webdataset shards)
# Only in a score table made from stored embeddings (``tbps score --embeddings``).
STATUS_NO_EMBEDDING = "no-embedding"
STATUS_BAD_EMBEDDING = "bad-embedding"

# Defect kinds in the synthetic pool's truth sidecar.
DEFECT_NONE = "none"
DEFECT_SWAPPED = "swapped-attribute"
DEFECT_WRONG = "wrong-attribute"
DEFECT_OTHER_ID = "other-identity"
DEFECT_BLANK = "blank-image"
DEFECT_GARBLED = "garbled-image"
DEFECT_EXACT_DUP = "exact-duplicate"
DEFECT_NEAR_DUP = "near-duplicate"
DEFECT_KINDS = (
    DEFECT_SWAPPED,
    DEFECT_WRONG,
    DEFECT_OTHER_ID,
    DEFECT_BLANK,
    DEFECT_GARBLED,
    DEFECT_EXACT_DUP,
    DEFECT_NEAR_DUP,
)

PAIR_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (IMAGE_PATH, pa.string()),
        (CAPTION, pa.string()),
        (PERSON_ID, pa.string()),
        (SPLIT, pa.string()),
        (SOURCE, pa.string()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
    ]
)

SCORE_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (IMAGE_PATH, pa.string()),
        (CAPTION, pa.string()),
        (PERSON_ID, pa.string()),
        (SPLIT, pa.string()),
        (SOURCE, pa.string()),
        (IMAGE_HASH, pa.string()),
        (SCORE, pa.float32()),
        (BANK_RANK, pa.int32()),
        (BANK_PERCENTILE, pa.float32()),
        (TRUNCATED, pa.bool_()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
    ]
)

def score_schema(itm: bool) -> pa.Schema:
    """The score table's schema: :data:`SCORE_SCHEMA`, with ``itm_score`` before ``status`` when the model has an ITM head."""
    if not itm:
        return SCORE_SCHEMA
    return SCORE_SCHEMA.insert(SCORE_SCHEMA.get_field_index(STATUS), pa.field(ITM_SCORE, pa.float32()))


TRUTH_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (DEFECT, pa.string()),
        (DETAIL, pa.string()),
        (DUPLICATE_OF, pa.string()),
    ]
)


DROP_SCHEMA = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (SOURCE, pa.string()),
        (STATUS, pa.string()),
        (SCORE, pa.float32()),
        (BANK_RANK, pa.int32()),
        (STEP, pa.string()),
        (REASON, pa.string()),
    ]
)


def embedding_schema(dim: int, image_dim: int | None = None) -> pa.Schema:
    """The schema of the embeddings written next to a score table.

    Args:
        dim: the embedding width of the model.
        image_dim: the image embedding's width when it differs (BLIP-2: its query vectors x ``dim``).

    Returns:
        A pyarrow schema with ``pair_id`` and two float16 fixed-size-list columns.
    """
    return pa.schema([(PAIR_ID, pa.string()), (IMAGE_EMB, pa.list_(pa.float16(), image_dim or dim)), (TEXT_EMB, pa.list_(pa.float16(), dim))])


def polars_schema(schema: pa.Schema) -> dict:
    """The Polars dtypes of a pyarrow schema, for building empty or typed frames."""
    return dict(pl.from_arrow(schema.empty_table()).schema)
