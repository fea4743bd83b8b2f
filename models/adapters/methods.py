"""The adapter-method registry: which class implements each ``--adapter`` method.

Kept free of torch, so the CLI can build ``--adapter``'s help from it (``tbps --help`` starts
without importing torch); :func:`variants` imports the methods' modules on first use. Adding a
method is one module (``models/adapters/NAME.py`` with a :class:`~.base.Variant` subclass) and
one line in :data:`REGISTRY`.

Besides the registered methods, ``full`` trains every parameter of the model and ``none``
freezes every one (evaluation); neither adds adapter modules.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbps.models.adapters.base import Variant

# method name -> "module:Class" of its Variant (the class's ``name`` is the key).
REGISTRY = {
    "wora": "tbps.models.adapters.wora:WoRA",
    "dora": "tbps.models.adapters.dora:DoRA",
    "lora": "tbps.models.adapters.lora:LoRA",
}

ADAPTER_METHODS = tuple(REGISTRY)
METHODS = (*ADAPTER_METHODS, "full", "none")


@functools.cache
def variants() -> dict[str, type[Variant]]:
    """Every registered method's class, by name (imports their modules, and torch, once).

    Returns:
        Method name -> its :class:`~.base.Variant` subclass, in registry order.
    """
    found = {}
    for name, where in REGISTRY.items():
        module, _, cls = where.partition(":")
        found[name] = getattr(importlib.import_module(module), cls)
    return found


def adapter_help() -> str:
    """The ``tbps train --adapter`` help: every method that trains (``none`` trains nothing)."""
    trains = [m for m in METHODS if m != "none"]
    return f"{', '.join(trains[:-1])} or {trains[-1]}."
