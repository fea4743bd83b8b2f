"""The one place that knows a ``tbps score`` output directory and the paper's bank constants.

Output directory::

    OUT/params.json            the parameters that fix the result (checked on resume), with the
                               resolved image root the dataset was read with (``image_root``)
    OUT/bank.parquet           the sampled bank captions
    OUT/bank-embeddings.npy    their embeddings (float32, L2-normalised): computed once, read on resume
    OUT/scores/part-NNNNNN.parquet      columns.SCORE_SCHEMA, one row per input pair
    OUT/embeddings/part-NNNNNN.parquet  columns.embedding_schema(D), ok pairs only (float16)
    OUT/score.json             provenance, counts, timings (written when every part exists)

The paper's rules, in bank ranks. With a bank of 10,000 captions the own caption is one of
10,001 scores. The paper keeps a pretraining pair when the own caption sorts above index 49 of
those 10,001 scores (0-based, descending), i.e. at most 48 bank captions beat it
(``bank_rank <= 48``, ``tbps select --rule paper-pretrain``), and a fine-tuning pair when it
sorts above index 1800 (``bank_rank <= 1799``, ``--rule paper-finetune``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tbps.data.formats import FORMATS
from tbps.data.readers import detect_format
from tbps.errors import TbpsError
from tbps.files import is_temp

PAPER_BANK_SIZE = 10_000
PAPER_RULES = {"paper-pretrain": 48, "paper-finetune": 1799}

PARAMS_FILE = "params.json"
RECORD_FILE = "score.json"
BANK_FILE = "bank.parquet"
BANK_EMBEDDINGS_FILE = "bank-embeddings.npy"
SCORES_DIR = "scores"
EMBEDDINGS_DIR = "embeddings"
PART_GLOB = "part-*.parquet"


def part_name(k: int) -> str:
    """The file name of part ``k``."""
    return f"part-{k:06d}.parquet"


def list_parts(directory: Path) -> list[Path]:
    """The part files of a ``scores/`` or ``embeddings/`` directory, sorted, temporaries skipped."""
    return sorted(p for p in Path(directory).glob(PART_GLOB) if p.is_file() and not is_temp(p))


@dataclass(frozen=True)
class ScoreDir:
    """The paths of one ``tbps score`` output directory."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def record(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def bank(self) -> Path:
        return self.root / BANK_FILE

    @property
    def bank_embeddings(self) -> Path:
        return self.root / BANK_EMBEDDINGS_FILE

    @property
    def scores(self) -> Path:
        return self.root / SCORES_DIR

    @property
    def embeddings(self) -> Path:
        return self.root / EMBEDDINGS_DIR

    def score_part(self, k: int) -> Path:
        return self.scores / part_name(k)

    def embedding_part(self, k: int) -> Path:
        return self.embeddings / part_name(k)

    def is_score_run(self) -> bool:
        """Whether the directory looks like a score run (complete or still being written)."""
        return self.params.is_file() or self.scores.is_dir()

    def is_complete(self) -> bool:
        """Whether every part was written (``score.json`` is written last)."""
        return self.record.is_file()

    def image_root(self) -> str | None:
        """The resolved image root the run read its dataset with; None when it cannot be known.

        ``params.json`` names it (``image_root``); for a run written before it did, it is the
        reader's absolute ``--image-root``, or the format's default root next to the dataset.
        """
        try:
            params = json.loads(self.params.read_text())
            if params.get("image_root"):
                return os.path.realpath(params["image_root"])
            reader, data = params.get("reader") or {}, Path(params["data"])
            if reader.get("image_root"):
                root = Path(reader["image_root"])
                # A relative --image-root was relative to where score ran, which is not known here.
                return os.path.realpath(root) if root.is_absolute() and root.is_dir() else None
            fmt = FORMATS[reader.get("format") or detect_format(data)]
            root = fmt.default_root(data) if fmt.default_root is not None else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, TbpsError):
            return None
        return os.path.realpath(root) if root is not None and Path(root).is_dir() else None


def score_run_of(path: str | Path) -> ScoreDir | None:
    """The score run a score table path belongs to (the run directory, its ``scores/``, or a part in it); None if none."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        run = ScoreDir(candidate)
        if run.params.is_file() and (path == candidate or path.relative_to(candidate).parts[:1] == (SCORES_DIR,)):
            return run
    return None
