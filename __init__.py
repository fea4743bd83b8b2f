"""tbps: text-based person search with the Filtering-WoRA paradigm.

Score image-caption pairs (``tbps.curate``), select the decisive subset, fine-tune with WoRA
(``tbps.train``) and evaluate text-to-image retrieval (``tbps.eval``).
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from tbps.errors import TbpsError

try:
    __version__ = version("tbps")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# Public functions re-exported lazily: ``import tbps`` stays cheap (no torch) until one is used.
_LAZY = {
    "retrieval_metrics": "tbps.eval.metrics",
    "apply_adapters": "tbps.models.adapters",
    "merge_adapters": "tbps.models.adapters",
}

__all__ = ["TbpsError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tbps' has no attribute {name!r}")
